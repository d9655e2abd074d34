"""AdaScale and gradient statistics on 2 real ranks (gloo): golden gains, the same statistics as one rank with
the same micro-batches, rank consistency, and DeepSpeed ZeRO-1/2/3 agreeing with DDP."""


import numpy as np
import pytest

from test_multiprocess import run_workers

pytestmark = pytest.mark.multiprocess

GOLDEN = [{"name": kind, "model": kind, "per_device": 1, "ga": 2, "steps": 1, "lr": 0.0,
           "callbacks": ["adascale_raw"], "args": {"lr_scaling": "adascale", "base_batch_size": 1}}
          for kind in ("orthogonal", "identical")]
STATS = {"name": "stats", "model": "gaussian", "per_device": 4, "ga": 2, "steps": 16, "lr": 0.1,
         "callbacks": ["adascale_raw"], "args": {"lr_scaling": "adascale", "base_batch_size": 4}}


def step_logs(result, key="adascale_gain"):
    return [h for h in result["log_history"] if key in h]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("ddp"), [*GOLDEN, STATS])


def test_golden_gains(ddp):
    for rank in ddp:
        assert rank["orthogonal"]["dist_world_size"] == 2
        # orthogonal per-micro-batch gradients: ||G||^2 = 0, the gain is the full scale S = 4
        assert step_logs(rank["orthogonal"])[0]["adascale_gain"] == pytest.approx(4.0, rel=1e-6)
        # identical gradients: no variance, the gain is 1
        assert step_logs(rank["identical"])[0]["adascale_gain"] == pytest.approx(1.0, abs=1e-5)


def test_two_ranks_match_one_rank_with_the_same_micro_batches(ddp):
    """2 ranks x 2 micro-batches and 1 rank x 4 micro-batches of the same global batch give the same statistics."""
    from workers.train_worker import run_one

    single = run_one({**STATS, "ga": 4}, None)  # this process: 1 rank x 4 micro-batches of 4
    one, two = step_logs(single), step_logs(ddp[0]["stats"])
    assert len(one) == len(two) >= 4
    for key in ("grad_sqr", "grad_var", "adascale_gain", "progress", "learning_rate"):
        np.testing.assert_allclose([h[key] for h in one], [h[key] for h in two], rtol=1e-5)


def test_rank_consistency(ddp):
    r0, r1 = (step_logs(r["stats"]) for r in ddp)
    assert ddp[0]["stats"]["fingerprints"] != ddp[1]["stats"]["fingerprints"]
    for key in ("adascale_gain", "progress", "grad_sqr", "grad_var", "learning_rate"):
        assert [h[key] for h in r0] == [h[key] for h in r1]


@pytest.mark.parametrize("config", ["ds_zero1.json", "ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_statistics_match_ddp(tmp_path, ddp, config):
    result = run_workers(tmp_path, [STATS], deepspeed=config)
    for rank in result:
        assert rank["stats"]["dist_world_size"] == 2
        ds_logs, ddp_logs = step_logs(rank["stats"]), step_logs(ddp[0]["stats"])
        assert len(ds_logs) == len(ddp_logs) >= 4
        for key in ("grad_sqr", "grad_var", "adascale_gain", "progress", "learning_rate"):
            np.testing.assert_allclose([h[key] for h in ds_logs], [h[key] for h in ddp_logs], rtol=1e-5)

"""Two real processes on CPU (gloo): DDP through torchrun, and DeepSpeed ZeRO-1/2/3 through torchrun with the
configs in recipes/configs (``"auto"`` values). Every test asserts both ranks saw a world of 2 and different data,
so a silent single-process run (or two independent ones) fails."""

import json
import math

import numpy as np
import pytest

from helpers import REPO, launch, launch_nodes, read_rank_results
from test_split_invariance import reference_params
from workers.train_worker import run_one

pytestmark = pytest.mark.multiprocess

# LR trajectory run: B = 2 ranks x 4 x GA 2 = 16, base batch 2 => S = 8; 256 examples => 16 steps/epoch;
# LEGW base warm-up 1/16 epoch => W = S * w0 * 16 = 8 steps; cosine decay to step 12.
LR_RUN = {"name": "lr", "model": "resnet", "per_device": 4, "ga": 2, "steps": 12, "lr": 0.1,
          "lr_scheduler_type": "cosine",
          "args": {"lr_scaling": "legw", "base_batch_size": 2, "legw_base_warmup_epochs": 1 / 16}}
# One NaN example among 64 (4 steps of 2 x 8 per epoch, 2 epochs): the step holding it is skipped on both ranks.
NAN_RUN = {"name": "nan", "model": "poisoned", "per_device": 8, "ga": 1, "steps": 8, "lr": 0.1}
SPLIT_RUNS = [{"name": f"{kind}_ga{ga}", "model": kind, "per_device": 8 // ga, "ga": ga, "steps": 2}
              for kind in ("resnet", "bert", "gpt2") for ga in (1, 2)]
# Stateful LM: 8 streams carried over 5 steps, as 2 ranks x 4 and 2 ranks x 2 x 2 (each rank owns its streams)
STREAM_RUNS = [{"name": f"lstm_streams_ga{ga}", "model": "lstm_streams", "per_device": 4 // ga, "ga": ga,
                "steps": 5, "args": {"train_sampling_strategy": "sequential"}} for ga in (1, 2)]


def expected_legw_lrs(lr0=0.1, scale=8, warmup=8, total=12):
    peak = math.sqrt(scale) * lr0
    return [peak * t / warmup if t < warmup else
            peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) for t in range(total)]


def run_workers(tmp_path, runs, deepspeed=None, deepspeed_fp16_on_cpu=False, nodes=1):
    """``deepspeed``: a config of recipes/configs, or a path; ``deepspeed_fp16_on_cpu``: see
    ``workers/train_worker.py::allow_deepspeed_fp16_on_cpu``."""
    spec = {"runs": runs, "deepspeed_fp16_on_cpu": deepspeed_fp16_on_cpu}
    if deepspeed:
        spec["deepspeed"] = str(REPO / "recipes" / "configs" / deepspeed)  # an absolute path stays itself
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker_args = [str(tmp_path / "spec.json"), str(tmp_path)]
    if nodes > 1:
        launch_nodes("tests/workers/train_worker.py", worker_args, nodes)
    else:
        launch("tests/workers/train_worker.py", worker_args)
    return read_rank_results(tmp_path)


def assert_two_consistent_ranks(r0, r1):
    assert r0["dist_world_size"] == r1["dist_world_size"] == 2
    assert r0["args_world_size"] == r1["args_world_size"] == 2
    assert r0["fingerprints"] != r1["fingerprints"], "both ranks trained on the same data"
    assert r0["learning_rates"] == r1["learning_rates"]
    np.testing.assert_array_equal(r0["params"], r1["params"])


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("ddp"), [LR_RUN, NAN_RUN, *SPLIT_RUNS, *STREAM_RUNS])


@pytest.fixture(scope="module", params=["ds_zero1.json", "ds_zero2.json", "ds_zero3.json"])
def deepspeed_runs(request, tmp_path_factory):
    return request.param, run_workers(tmp_path_factory.mktemp("ds"), [LR_RUN, NAN_RUN], deepspeed=request.param)


@pytest.mark.parametrize("kind", ["resnet", "bert", "gpt2"])
def test_ddp_splits_match_single_process(ddp, kind):
    reference = reference_params(kind, 16, 1)  # 1 x 16 in this process
    for ga in (1, 2):  # 2 ranks x 8, 2 ranks x 2 x 4
        r0, r1 = (r[f"{kind}_ga{ga}"] for r in ddp)
        assert_two_consistent_ranks(r0, r1)
        np.testing.assert_allclose(r0["params"], reference, rtol=0, atol=2e-6)


def test_ddp_stateful_streams_match_one_process(ddp):
    """1 rank x 2 micro-batches = 2 ranks: rank r's k-th micro-batch holds the same streams at every step."""
    reference = run_one({**STREAM_RUNS[0], "per_device": 4, "ga": 2}, None)["params"]
    for ga in (1, 2):
        r0, r1 = (r[f"lstm_streams_ga{ga}"] for r in ddp)
        assert_two_consistent_ranks(r0, r1)
        np.testing.assert_allclose(r0["params"], reference, rtol=0, atol=2e-6)


def test_ddp_legw_lr_trajectory(ddp):
    r0, r1 = (r["lr"] for r in ddp)
    assert_two_consistent_ranks(r0, r1)
    assert r0["scale"] == 8
    np.testing.assert_allclose(r0["learning_rates"], expected_legw_lrs(), rtol=1e-12)


def test_deepspeed_legw_lr_trajectory_and_weights(deepspeed_runs, ddp):
    r0, r1 = (r["lr"] for r in deepspeed_runs[1])
    assert_two_consistent_ranks(r0, r1)
    np.testing.assert_allclose(r0["learning_rates"], expected_legw_lrs(), rtol=1e-12)
    # Same data, same maths: DeepSpeed's partitioned update lands where DDP's does.
    np.testing.assert_allclose(r0["params"], ddp[0]["lr"]["params"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(r0["losses"], ddp[0]["lr"]["losses"], rtol=1e-5)


def assert_nan_step_skipped(results):
    r0, r1 = (r["nan"] for r in results)
    assert_two_consistent_ranks(r0, r1)
    assert np.isfinite(r0["params"]).all() and r0["buffers_finite"] and r1["buffers_finite"]
    logged = [entry["nonfinite_steps"] for entry in r0["log_history"] if "nonfinite_steps" in entry]
    assert len(logged) == 8 and logged[-1] == 2  # the poisoned example once per epoch


def test_ddp_nan_example_skips_its_step_on_every_rank(ddp):
    """The trainer drops the update on both ranks (the reduced gradient is NaN on both); BatchNorm's running
    statistics kept, the ranks equal, the count logged."""
    assert_nan_step_skipped(ddp)


def test_deepspeed_nan_example_skips_its_step_on_every_rank(deepspeed_runs):
    """DeepSpeed ZeRO in fp32 skips the update itself; the trainer counts it and keeps BatchNorm's statistics."""
    assert_nan_step_skipped(deepspeed_runs[1])


def test_two_nodes_train_as_the_two_rank_run(tmp_path, ddp):
    """``torchrun --nnodes 2`` (two one-process nodes on this machine, c10d rendezvous on 127.0.0.1): S, the data
    split and the LR rule use the global world, so the run equals the one-node, two-process run."""
    r0, r1 = (r["lr"] for r in run_workers(tmp_path, [LR_RUN], nodes=2))
    assert_two_consistent_ranks(r0, r1)
    assert r0["scale"] == 8
    np.testing.assert_allclose(r0["learning_rates"], expected_legw_lrs(), rtol=1e-12)
    assert r0["fingerprints"] == ddp[0]["lr"]["fingerprints"] and r1["fingerprints"] == ddp[1]["lr"]["fingerprints"]
    np.testing.assert_allclose(r0["params"], ddp[0]["lr"]["params"], rtol=0, atol=1e-7)

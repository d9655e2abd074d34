"""ConAdv on two real processes (gloo): the attack issues no collective; DDP and DeepSpeed ZeRO-2 runs keep the
ranks in lockstep and agree with each other."""

import numpy as np
import pytest

from helpers import launch, read_rank_results
from test_multiprocess import assert_two_consistent_ranks, run_workers

pytestmark = pytest.mark.multiprocess

CONADV_RUNS = [{"name": f"conadv_{kind}", "model": kind, "per_device": 4, "ga": 2, "steps": 3,
                "args": {"adversarial": "conadv", "adversarial_args": "epsilon=0.05"}} for kind in ("resnet", "bert")]


def test_attack_issues_no_collective(tmp_path):
    launch("tests/workers/attack_collective_worker.py", [str(tmp_path)])
    r0, r1 = read_rank_results(tmp_path)
    assert (r0["attacks"], r1["attacks"]) == (3, 0)
    assert r0["check"] == r1["check"] == 3.0  # the all-reduce after the attacks paired with the right call
    assert r0["grads_before_none"] and r1["grads_before_none"]  # the attacks left no parameter gradient
    assert r0["grads_equal_across_ranks"] and r1["grads_equal_across_ranks"]


@pytest.fixture(scope="module")
def ddp_conadv(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("ddp_conadv"), CONADV_RUNS)


@pytest.mark.parametrize("kind", ["resnet", "bert"])
def test_ddp_conadv_ranks_stay_consistent(ddp_conadv, kind):
    r0, r1 = (r[f"conadv_{kind}"] for r in ddp_conadv)
    assert_two_consistent_ranks(r0, r1)
    assert all("adversarial_attack_loss" in h for h in r0["log_history"][:-1])


@pytest.mark.parametrize("index", [0, 1], ids=["resnet", "bert"])
def test_zero2_conadv_matches_ddp(tmp_path, ddp_conadv, index):
    run = CONADV_RUNS[index]  # one DeepSpeed run a process (Accelerate allows one DeepSpeed plugin)
    r0, r1 = (r[run["name"]] for r in run_workers(tmp_path, [run], deepspeed="ds_zero2.json"))
    assert_two_consistent_ranks(r0, r1)
    np.testing.assert_allclose(r0["params"], ddp_conadv[0][run["name"]]["params"], rtol=0, atol=1e-5)

"""ConAdv and EXTRAP-SGD on two real processes (gloo): their local passes issue no collective; DDP and DeepSpeed
ZeRO-2 runs keep the ranks in lockstep and agree with each other."""

import numpy as np
import pytest

from helpers import launch, read_rank_results
from test_multiprocess import assert_two_consistent_ranks, run_workers
from workers.train_worker import run_one

pytestmark = pytest.mark.multiprocess

CONADV_RUNS = [{"name": f"conadv_{kind}", "model": kind, "per_device": 4, "ga": 2, "steps": 3,
                "args": {"adversarial": "conadv", "adversarial_args": "epsilon=0.05"}} for kind in ("resnet", "bert")]
EXTRAP_RUNS = [{"name": f"extrap_{kind}", "model": kind, "per_device": 4, "ga": 2, "steps": 3, "lr": 0.1,
                "args": {"extrapolation": "fresh", "optim_args": "momentum=0.9,nesterov=True"}}
               for kind in ("resnet", "gpt2")]

# Deterministic variants, for a single-process reference (2 ranks x 4 x 2 = 1 x 4 x 4): ConAdv without random starts
# (they are drawn per rank and micro-batch), EXTRAP-SGD along the previous step's reduced gradient (the same on every
# rank; 'fresh' takes each rank's own first micro-batch, which one process cannot reproduce)
REFERENCE_RUNS = [{**run, "name": f"{run['name']}_det", "args": {**run["args"], **change}}
                  for run, change in [(CONADV_RUNS[0], {"adversarial_args": "epsilon=0.05,random_start=0"}),
                                      (CONADV_RUNS[1], {"adversarial_args": "epsilon=0.05,random_start=0"}),
                                      (EXTRAP_RUNS[0], {"extrapolation": "past"}),
                                      (EXTRAP_RUNS[1], {"extrapolation": "past"})]]


def test_local_passes_issue_no_collective(tmp_path):
    """ConAdv's attack and EXTRAP-SGD's extrapolation gradient, run on rank 0 only, between DDP steps."""
    launch("tests/workers/local_pass_worker.py", [str(tmp_path)])
    r0, r1 = read_rank_results(tmp_path)
    assert (r0["local_passes"], r1["local_passes"]) == (6, 0)
    assert r0["check"] == r1["check"] == 3.0  # the all-reduce after the local passes paired with the right call
    assert r0["grads_before_none"] and r1["grads_before_none"]  # the local passes left no parameter gradient
    assert r0["grads_equal_across_ranks"] and r1["grads_equal_across_ranks"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("ddp_runs"), CONADV_RUNS + EXTRAP_RUNS + REFERENCE_RUNS)


@pytest.mark.parametrize("run", CONADV_RUNS + EXTRAP_RUNS, ids=lambda run: run["name"])
def test_ddp_ranks_stay_consistent(ddp_runs, run):
    r0, r1 = (r[run["name"]] for r in ddp_runs)
    assert_two_consistent_ranks(r0, r1)
    key = "adversarial_attack_loss" if "adversarial" in run["args"] else "extrapolation_distance"
    assert all(h[key] > 0 for h in r0["log_history"][:-1])


@pytest.mark.parametrize("run", REFERENCE_RUNS, ids=lambda run: run["name"])
def test_ddp_matches_one_process(ddp_runs, run):
    """A defect on the DDP path that both ranks share (both would still agree) shows against one process."""
    r0, r1 = (r[run["name"]] for r in ddp_runs)
    assert_two_consistent_ranks(r0, r1)
    single = run_one({**run, "ga": 4}, None)
    np.testing.assert_allclose(r0["params"], single["params"], rtol=0, atol=1e-5)
    key = "adversarial_attack_loss" if "adversarial" in run["args"] else "extrapolation_distance"
    np.testing.assert_allclose([h[key] for h in r0["log_history"][:-1]],
                               [h[key] for h in single["log_history"][:-1]], rtol=1e-4)


@pytest.mark.parametrize("run", CONADV_RUNS + EXTRAP_RUNS, ids=lambda run: run["name"])
def test_zero2_matches_ddp(tmp_path, ddp_runs, run):
    # one DeepSpeed run a process (Accelerate allows one DeepSpeed plugin)
    r0, r1 = (r[run["name"]] for r in run_workers(tmp_path, [run], deepspeed="ds_zero2.json"))
    assert_two_consistent_ranks(r0, r1)
    np.testing.assert_allclose(r0["params"], ddp_runs[0][run["name"]]["params"], rtol=0, atol=1e-5)

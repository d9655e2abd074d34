"""Golden trajectories: every algorithm and LR rule, ~10 steps on tiny models, in one process, on 2 DDP ranks and
under DeepSpeed ZeRO-2 (2 ranks), against the values recorded in ``golden_trajectories.json``: the applied LR and
the loss of every step, every logged metric, and a fingerprint of the final weights (sum, sum of squares, 16
entries).

A guard for refactoring: behaviour must not move. Record anew only when a change of behaviour is intended, and say
so in the commit:

    HF_LARGEBATCH_RECORD_GOLDEN=1 python -m pytest tests/test_golden_trajectories.py

The comparison allows 1e-5 relative (1e-9 absolute): on the recording machine the values are reproduced exactly,
and the margin only absorbs a machine whose CPU kernels sum in another order; any change of what is computed moves
these trajectories far more.
"""

import json
import math
import os

import numpy as np
import pytest

from helpers import REPO
from test_multiprocess import run_workers

GOLDEN = REPO / "tests" / "golden_trajectories.json"
RECORD = os.environ.get("HF_LARGEBATCH_RECORD_GOLDEN") == "1"
RTOL, ATOL = 1e-5, 1e-9

_RULE = {"per_device": 8, "ga": 2, "steps": 10, "lr": 0.1, "lr_scheduler_type": "cosine"}
CASES = {
    "none": {**_RULE, "model": "linear", "args": {"lr_scaling": "none", "warmup_steps": 3}},
    "linear": {**_RULE, "model": "linear", "args": {"lr_scaling": "linear", "base_batch_size": 8, "warmup_steps": 3}},
    "sqrt": {**_RULE, "model": "linear", "args": {"lr_scaling": "sqrt", "base_batch_size": 8, "warmup_steps": 3}},
    "legw": {**_RULE, "model": "linear",
             "args": {"lr_scaling": "legw", "base_batch_size": 8, "legw_base_warmup_epochs": 0.25}},
    "adascale": {**_RULE, "model": "gaussian", "steps": 24, "args": {"lr_scaling": "adascale", "base_batch_size": 4}},
    "adamscale": {**_RULE, "model": "bert_zipf", "steps": 48, "lr": 1e-3, "optim": "adamw_torch",
                  "args": {"lr_scaling": "adascale", "base_batch_size": 8}},
    "noise_scale_monitor": {**_RULE, "model": "gaussian", "callbacks": ["noise_monitor"],
                            "args": {"lr_scaling": "linear", "base_batch_size": 8}},
    "autowu": {**_RULE, "model": "linear", "steps": 16, "lr": 1.0,
               "args": {"lr_schedule": "autowu", "autowu_args": "vote_every=2,patience=2"}},
    "conadv": {**_RULE, "model": "linear", "args": {"adversarial": "conadv", "adversarial_args": "epsilon=0.3,input_name=x"}},
    "extrapolation": {**_RULE, "model": "linear",
                      "args": {"extrapolation": "fresh", "optim_args": "momentum=0.9,nesterov=True"}},
    "adaptive_batch": {**_RULE, "model": "linear", "args": {
        "adaptive_batch": "norm", "adaptive_batch_args": "max_batch_size=128,eta=0.5,smoothing=0",
        "lr_scaling": "linear", "base_batch_size": 16}},
    "lars": {**_RULE, "model": "linear", "optim": "lars", "lr": 1.0, "args": {}},
    "lamb": {**_RULE, "model": "linear", "optim": "lamb", "lr": 0.01, "args": {}},
    "adamp": {**_RULE, "model": "linear", "optim": "adamp", "lr": 0.01, "args": {}},
    "local_sgd": {**_RULE, "model": "linear", "args": {"local_sgd_steps": 2}},
}
ONLY_MULTI_RANK = {"local_sgd"}
# what each backend runs: ZeRO-2 refuses the adaptive batch, local SGD, AdamScale and the layer-wise optimizers
BACKENDS = {
    "single": [name for name in CASES if name not in ONLY_MULTI_RANK],
    "ddp": list(CASES),
    "zero2": [name for name in CASES if name not in
              {"adaptive_batch", "local_sgd", "adamscale", "lars", "lamb", "adamp"}],
}
#: logged values that measure time, not behaviour; and those kept apart (per-step lists) or not metrics
_TIMING = ("runtime", "per_second", "total_flos", "autowu_gp_seconds")
_NOT_METRICS = ("step", "epoch", "loss", "learning_rate")


def trajectory(result: dict) -> dict:
    """What must not move: per-step applied LR and loss, every logged metric by step, a weight fingerprint."""
    metrics: dict[str, dict[str, float]] = {}
    for entry in result["log_history"]:
        for key, value in entry.items():
            if key in _NOT_METRICS or any(t in key for t in _TIMING) or not isinstance(value, (int, float)):
                continue
            metrics.setdefault(key, {})[str(entry["step"])] = float(value)
    params = np.asarray(result["params"], dtype=np.float64)
    every = max(len(params) // 16, 1)
    return {"learning_rates": result["learning_rates"], "losses": result["losses"], "metrics": metrics,
            "param_sum": float(params.sum()), "param_sq_sum": float((params ** 2).sum()),
            "param_sample": params[::every][:16].tolist()}


def _runs(backend: str) -> list[dict]:
    return [{"name": name, **CASES[name]} for name in BACKENDS[backend]]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from workers.train_worker import run_one

    out = {"single": {run["name"]: trajectory(run_one(run, None)) for run in _runs("single")}}
    for backend, config in (("ddp", None), ("zero2", "ds_zero2.json")):
        ranks = run_workers(tmp_path_factory.mktemp(backend), _runs(backend), deepspeed=config)
        for name in BACKENDS[backend]:
            assert ranks[0][name]["dist_world_size"] == 2
            assert ranks[0][name]["learning_rates"] == ranks[1][name]["learning_rates"]
        out[backend] = {name: trajectory(ranks[0][name]) for name in BACKENDS[backend]}
    if RECORD:
        GOLDEN.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")).replace('},"', '},\n"') + "\n")
    return out


def _assert_close(path: str, got, want) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys {sorted(set(got) ^ set(want))} differ"
        for key in want:
            _assert_close(f"{path}.{key}", got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} values, recorded {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(f"{path}[{i}]", g, w)
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), f"{path}: {got}, recorded nan"
    else:
        assert got == pytest.approx(want, rel=RTOL, abs=ATOL), f"{path}: {got}, recorded {want}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_trajectories_match_the_recorded_ones(measured, backend):
    recorded = json.loads(GOLDEN.read_text())
    assert set(measured[backend]) == set(recorded[backend])
    for name, want in recorded[backend].items():
        _assert_close(f"{backend}.{name}", measured[backend][name], want)

"""The advisor's probe: every step's unbiased gradient statistics, kept whole for ``hf-largebatch advise``.

The noise-scale monitor smooths and floors its estimates for logging; the advisor needs each step's estimates as
they are (a single step's ``||G||^2`` estimate is often negative, and flooring it before the mean over steps would
bias the noise scale low) to average them, bootstrap them and follow their trend. It changes nothing in training.
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..core.events import Algorithm
from ..core.statistics import SmoothedNoiseScale, require_two_micro_batches

PROBE_FILE = "noise_probe.json"


class GradientNoiseProbe(Algorithm):
    """Records, per optimizer step, ``grad_sqr`` (the unbiased ``||G||^2``) and ``trace`` (the unbiased trace of one
    example's gradient covariance, ``tr(Sigma)``: a micro-batch gradient's variance times its examples), and at the
    end writes them with the run's settings to ``<output_dir>/noise_probe.json`` (``hf_largebatch.advisor`` reads
    it). Training stops after ``steps`` optimizer steps (``None``: runs its course), on the run's own LR schedule.
    Steps without an estimate (a single micro-batch, a non-finite norm) are left out and counted. With AdamScale in
    the run the estimator measures its preconditioned gradients, and so does the probe (one measurement a run)."""

    name = "noise_probe"
    option = "noise_probe_steps=N"
    needs_gradient_statistics = True
    unsupported_under_fsdp = SmoothedNoiseScale.unsupported_under_fsdp
    excludes = SmoothedNoiseScale.excludes

    def __init__(self, steps: int | None = None):
        self.stop_after = steps
        self.steps: list[int] = []
        self.grad_sqr: list[float] = []
        self.trace: list[float] = []
        self.skipped_steps = 0
        self.run: dict = {}

    def settings(self) -> dict:
        return {"steps": self.stop_after, "writes": PROBE_FILE}

    def check(self, plan) -> None:
        require_two_micro_batches(plan, "GradientNoiseProbe (noise_probe_steps, hf-largebatch advise)")
        self.run = {"global_batch": plan.global_batch_size, "base_batch_size": plan.base_batch_size,
                    "world_size": plan.world_size, "probe_steps": self.stop_after, "accumulation": plan.accumulation,
                    "optimizer": plan.optimizer_cls.__name__ if plan.optimizer_cls else None,
                    "lr_scaling": plan.lr_scaling}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        self.run.update({"learning_rate": args.learning_rate, "optim": str(args.optim),
                         "warmup_steps": args.warmup_steps, "run_steps": state.max_steps,
                         "legw_base_warmup_epochs": getattr(args, "legw_base_warmup_epochs", 0.0),
                         "train_examples": len(dataset) if dataset is not None and hasattr(dataset, "__len__")
                         else None})

    def on_reduced_gradients(self, args, state, control, *, statistics=None, **kwargs):
        if statistics is None:
            return
        grad_sqr, micro_var = statistics.unfloored
        if not statistics.valid or math.isnan(grad_sqr) or math.isnan(micro_var):
            self.skipped_steps += 1
            return
        self.steps.append(state.global_step + 1)  # the step being taken
        self.grad_sqr.append(grad_sqr)
        self.trace.append(micro_var * statistics.examples / statistics.n)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_after is not None and state.global_step >= self.stop_after:
            control.should_training_stop = True

    def record(self) -> dict:
        return {"run": self.run, "steps": self.steps, "grad_sqr": self.grad_sqr, "trace": self.trace,
                "skipped_steps": self.skipped_steps}

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, PROBE_FILE), "w") as f:
                json.dump(self.record(), f)

    def state_dict(self) -> dict:
        return {"steps": torch.tensor(self.steps, dtype=torch.long),
                "grad_sqr": torch.tensor(self.grad_sqr, dtype=torch.float64),
                "trace": torch.tensor(self.trace, dtype=torch.float64), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state) -> None:
        self.steps = state["steps"].tolist()
        self.grad_sqr = state["grad_sqr"].tolist()
        self.trace = state["trace"].tolist()
        self.skipped_steps = int(state["skipped_steps"])

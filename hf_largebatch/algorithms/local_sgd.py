"""Local SGD (ALGORITHMS.md section 6; Lau et al. 2024): H optimizer steps on each rank's own gradients, then the
weights are averaged over ranks. With ``adaptive_batch`` the batch test runs at each synchronisation round
(``adaptive_batch.py``)."""

from __future__ import annotations

from ..core import backends
from ..core.events import Algorithm
from ..core.option_strings import option_name


class LocalSGD(Algorithm):
    """Local SGD: H optimizer steps on each rank's own gradients, then the parameters and floating-point buffers
    are averaged over ranks (every backward runs under DDP's ``no_sync``: ``gradient_sync_context``).

    The optimizer state (momentum) stays local, as in local SGD; it is saved per rank with this algorithm's state
    and restored on resume (HF's checkpoint holds rank 0's only). Checkpoints must fall on synchronisation rounds,
    where every rank holds the same weights (checked at ``train()``); the end of training synchronises before its
    final save and evaluation, wherever it falls."""

    name = "local_sgd"
    unsupported_under_fsdp = "FSDP reduce-scatters every backward's gradients: there is no local step to take"
    excludes = {other: "both change what one optimizer step is; use lr_scaling none | linear | sqrt | legw with it"
                for other in ("autowu", "conadv", "extrapolation")}

    #: the trainer's gradient statistics are then each worker's own (``core.statistics``)
    keeps_gradients_local = True

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"local_sgd_steps must be >= 1, got {steps}")
        self.steps = steps
        self.option = f"local_sgd_steps={steps}"
        self._synced_step = -1
        self.syncs = 0
        self._optimizer = None
        self._loaded_optimizer_state = None

    def settings(self) -> dict:
        return {"steps": self.steps}

    def check(self, plan) -> None:
        """Refuses DeepSpeed, and checkpoints or evaluations between synchronisation rounds."""
        if plan.backend == "deepspeed":
            raise ValueError(f"{self.option} is not supported under DeepSpeed: the engine fixes its gradient "
                             "reduction at initialisation. Use DDP (accelerate launch / torchrun)")
        for kind in ("save", "eval"):
            strategy = getattr(plan.args, f"{kind}_strategy")
            strategy, every = option_name(strategy), getattr(plan.args, f"{kind}_steps")
            if strategy == "no" or (strategy == "steps" and every and float(every).is_integer()
                                    and every % self.steps == 0):
                continue
            raise ValueError(f"{self.option}: the ranks hold the same weights only every {self.steps} steps, so "
                             f"{kind}_strategy must be 'no' or 'steps' with {kind}_steps a multiple of {self.steps} "
                             f"(got {kind}_strategy={strategy!r}, {kind}_steps={every})")

    def gradient_sync_context(self, model, accelerator):
        return accelerator.no_sync(model)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._optimizer = optimizer
        if self._loaded_optimizer_state is not None and optimizer is not None:
            optimizer.load_state_dict(self._loaded_optimizer_state)
            self._loaded_optimizer_state = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # every H steps, and at a save / evaluation / stop that falls between rounds (the end of training): a
        # checkpoint must never hold one rank's unsynchronised weights
        if (state.global_step % self.steps == 0 or control.should_save or control.should_evaluate
                or control.should_training_stop or state.global_step >= state.max_steps):
            self.synchronize(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._synced_step != state.global_step:  # leave every rank with the same final model
            self.synchronize(model, state.global_step)

    def synchronize(self, model, step: int) -> None:
        tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        backends.average_across_ranks_(tensors)
        self.syncs += 1
        self._synced_step = step

    def log_metrics(self) -> dict[str, float]:
        return {"local_sgd_syncs": self.syncs}

    def state_dict(self) -> dict:
        state = {"syncs": self.syncs}
        if self._optimizer is not None:
            state["optimizer"] = self._optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.syncs = int(state["syncs"])
        self._loaded_optimizer_state = state.get("optimizer")

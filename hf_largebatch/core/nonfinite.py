"""Non-finite steps: a NaN or an inf in the gradient never reaches the weights unannounced.

**Detection** computes nothing new: HF computes the norm of the step's gradient at every optimizer step (the
clipping norm, or a norm with an infinite threshold when clipping is off; under DeepSpeed the engine's); reading it
is one host sync a step, where HF's NaN filter of the logged loss already syncs at every micro-batch. It is the norm of
the *reduced* gradient, equal on every rank, so every rank decides alike without another collective (under local
SGD each worker decides on its own gradient, which is what it would apply). A non-finite loss almost always makes
the gradient non-finite too; one whose gradient is finite (a ``-inf`` logit under cross-entropy) updates normally.

**What a non-finite step does**, by who applies the update:

* no loss scaler (fp32, bf16): with ``on_nonfinite_step="skip"`` (the default) the update is dropped, as fp16's
  GradScaler drops one: the gradients are released before the optimizer reads them, so the weights and the
  optimizer's state (momentum, Adam's moments and step count) stay as they were. ``"stop"`` raises
  ``FloatingPointError`` instead, before the update.
* a loss scaler (fp16: torch's GradScaler, DeepSpeed's): the scaler skips the update and lowers the scale, under
  either policy (an overflow while the scale is searched is its normal work, not a fault).
* DeepSpeed ZeRO skips a non-finite update itself in fp32 and fp16; in bf16 only with ``"bf16":
  {"check_grad_overflow": true}``. An update DeepSpeed applied stops the run: the weights are no longer finite.

In every skipped step the running statistics of normalisation layers (BatchNorm's running mean and variance, which
the step's forward already moved, to NaN when the input was NaN) are put back as they were before the step. The step
still counts as a step (``global_step``, the data, the schedule on the steps clock); AdaScale's progress does not
advance (no LR was applied). ``nonfinite_steps`` counts the skipped steps (logged with every loss, kept in
checkpoints), and ``MAX_CONSECUTIVE`` non-finite steps in a row stop the run under any policy: then the data or the
model produce them at every step, and skipping would only hide it.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")

#: Consecutive non-finite steps that stop any run: far above a loss scaler's start-up search (its scale halves at
#: each overflow: 25 halvings take 2^16 down to 2^-9), and a run that skips this many in a row learns nothing.
MAX_CONSECUTIVE = 25


def check_policy(policy: str) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"unknown on_nonfinite_step={policy!r}; choose one of {', '.join(NONFINITE_POLICIES)}")


class NonFiniteGuard:
    """Decides what a step with a non-finite gradient norm does, counts such steps, and keeps the normalisation
    layers' running statistics of the step before (``snapshot`` at each step's start, ``restore`` on a skip)."""

    def __init__(self, policy: str = "skip"):
        check_policy(policy)
        self.policy = policy
        self.count = 0
        self.consecutive = 0
        self._live: list[torch.Tensor] | None = None
        self._saved: list[torch.Tensor] = []

    def snapshot(self, model: torch.nn.Module) -> None:
        """Copy the buffers that a training forward changes (modules that track running statistics)."""
        if self._live is None:
            self._live = [buf for module in model.modules() if getattr(module, "track_running_stats", False)
                          for buf in module.buffers(recurse=False)]
            self._saved = [buf.detach().clone() for buf in self._live]
        elif self._live:
            torch._foreach_copy_(self._saved, self._live)

    def restore(self) -> None:
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._saved)

    def on_norm(self, grad_norm, step: int, *, scaler: bool, applied: bool, announce: bool) -> bool:
        """Whether the step whose gradient norm is ``grad_norm`` must be skipped (a finite norm, or none known:
        False). ``scaler``: a loss scaler skips it; ``applied``: the update already ran (DeepSpeed decided)."""
        norm = None if grad_norm is None else float(grad_norm)
        if norm is None or math.isfinite(norm):
            self.consecutive = 0
            return False
        if applied:
            raise FloatingPointError(
                f"step {step}: the gradient norm is {norm} and DeepSpeed applied the update, so the weights are no "
                'longer finite. Under bf16 set "bf16": {"check_grad_overflow": true} in the DeepSpeed config: '
                "DeepSpeed then skips such steps")
        if self.policy == "stop" and not scaler:
            raise FloatingPointError(
                f"step {step}: the gradient norm is {norm}; stopped before the update (on_nonfinite_step='stop'). "
                "Look for NaN/inf in the inputs or a diverging loss (lower learning_rate, add warm-up or "
                "max_grad_norm); on_nonfinite_step='skip' drops such updates and trains on")
        self.count += 1
        self.consecutive += 1
        self.restore()
        if self.consecutive >= MAX_CONSECUTIVE:
            raise FloatingPointError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite gradient norm (the last "
                f"{norm}): the inputs or the model produce NaN/inf at every step; training stopped. The weights "
                "are those before the first of them")
        if announce:
            skipper = "the loss scaler skipped" if scaler else "skipped (on_nonfinite_step='skip')"
            logger.warning(f"step {step}: gradient norm {norm}; update {skipper}, normalisation statistics kept; "
                           f"{self.count} non-finite step(s) so far")
        return True

    def state_dict(self) -> dict:
        return {"nonfinite_steps": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["nonfinite_steps"])

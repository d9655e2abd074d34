"""EXTRAP-SGD (Lin et al., ICML 2020): take each step's gradient at an extrapolated point.

One optimizer step of ``LargeBatchTrainer`` with ``extrapolation`` set::

    d  = the extrapolation direction, on each rank, without any collective:
           fresh  the local gradient of this rank's first micro-batch of the step, at x (the samples are the step's
                  own: the HF loop hands out a step's batches, so no extra ones are drawn)
           past   the previous step's reduced (clipped) gradient (no extra pass; none on the first step)
           noise  a standard Gaussian draw, seeded by (seed, step, rank)
    x~ = x - gamma_t d              in place; gamma_t = extrapolation_ratio x the step's scheduled LR
    h  = the usual all-reduced gradient of the step's micro-batches, computed at x~
    x  <- restored exactly (in place, a saved copy), then the optimizer's update from x with h

so the scheduler, the loss scaler and the optimizer state advance once per step, and a checkpoint never holds x~.
The extrapolation pass runs on the unwrapped model with ``torch.autograd.grad``: no ``.grad`` is written, no DDP or
DeepSpeed hook fires, and BatchNorm buffers are restored after it (the running statistics move once per micro-batch
of the real pass, as without extrapolation). Pair it with Nesterov SGD (``optim="sgd", optim_args="momentum=0.9,
nesterov=True"``) for the paper's method; any optimizer works.

Under DeepSpeed ZeRO-1/2 the optimizer updates its own fp32 partitions (holding x) and then overwrites the module's
parameters, so x~ never reaches the update there either; ``past`` needs readable gradients and is refused under
DeepSpeed, and ZeRO-3 (partitioned parameters) is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.events import Algorithm
from ..core.option_strings import require_positive_finite

EXTRAPOLATIONS = ("none", "fresh", "past", "noise")


def extrapolate_(params: list[torch.Tensor], direction: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """``x <- x - gamma d`` in place; returns the saved ``x`` (clones) for ``restore_``."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_([p.detach() for p in params], [d.to(p.dtype) for d, p in zip(direction, params)],
                            alpha=-gamma)
    return saved


@torch.no_grad()
def restore_(tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Exactly the saved values, in place (the optimizer and DDP keep referring to the same tensors)."""
    torch._foreach_copy_([t.detach() for t in tensors], saved)


def noise_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 7]).generate_state(1)[0])


class Extrapolation(Algorithm):
    """The state of EXTRAP-SGD between the two points of a step (x saved while the model sits at x~) and across
    steps (the ``past`` direction, checkpointed): ``begin`` at the step's start (``on_train_step_begin``, before
    its first micro-batch), ``finish`` inside ``optimizer.step`` before the update (``on_before_update``; or at
    ``on_step_end`` if the update was skipped, e.g. an fp16 overflow)."""

    name = "extrapolation"
    unsupported_under_fsdp = ("the move to x~ and the local gradient of 'fresh' work on the full parameters, which "
                              "FSDP holds as shards outside its forward and backward")
    excludes = {"conadv": "the adversarial attack would copy the extrapolated weights x~ as its 'previous step' "
                          "weights"}

    def check(self, plan) -> None:
        """DeepSpeed: no ZeRO-3 (x~ is set on partitioned parameters), no 'past' (partitioned reduced gradients)."""
        if plan.zero_stage == 3:
            raise ValueError(
                f"{self.option} is not supported under DeepSpeed ZeRO-3: the extrapolated point is set on the "
                "module's parameters, which ZeRO-3 partitions across ranks. Use ZeRO-1/2 or DDP.")
        if self.mode == "past" and plan.backend == "deepspeed":
            raise ValueError(
                "extrapolation='past' is not supported under DeepSpeed: it keeps each parameter's reduced gradient, "
                "which ZeRO holds as partitioned flat buffers. Use extrapolation='fresh' (or DDP).")

    def __init__(self, mode: str, ratio: float = 1.0):
        if mode not in EXTRAPOLATIONS[1:]:
            raise ValueError(f"unknown extrapolation={mode!r}; choose one of {', '.join(EXTRAPOLATIONS)}")
        require_positive_finite(ratio, "extrapolation_ratio")
        self.mode = mode
        self.ratio = ratio
        self.option = f"extrapolation={mode!r}"
        self.past: list[torch.Tensor] | None = None
        self._saved: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._distance = 0.0

    def settings(self) -> dict:
        return {"mode": self.mode, "ratio": self.ratio}

    def on_train_step_begin(self, args, state, control, *, model, local_gradient, scheduled_lr: float, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        seed = noise_seed(args.seed, state.global_step, args.process_index)
        self.begin(params, scheduled_lr, self.direction(params, lambda: local_gradient(params), seed))

    def on_before_update(self, args, state, control, **kwargs):
        self.finish()

    def begin(self, params: list[torch.Tensor], lr: float, direction: list[torch.Tensor] | None) -> None:
        """Move ``params`` to x~ (no-op when ``direction`` is None, e.g. ``past`` on the first step)."""
        self._params = params
        if direction is None:
            self._saved, self._distance = None, 0.0
            return
        gamma = self.ratio * lr
        self._saved = extrapolate_(params, direction, gamma)
        self._distance = gamma * torch.stack([n.float() for n in torch._foreach_norm(direction)]).norm()

    def direction(self, params: list[torch.Tensor], local_gradient, seed: int) -> list[torch.Tensor] | None:
        if self.mode == "fresh":
            return local_gradient()
        if self.mode == "past":
            return self.past
        generator = torch.Generator(device=params[0].device).manual_seed(seed)
        return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]

    def finish(self) -> None:
        """Before the update: back to x exactly; remember the step's gradient for ``past``."""
        if self._saved is not None:
            restore_(self._params, self._saved)
            self._saved = None
        if self.mode == "past" and self._params:
            grads = [p.grad for p in self._params]
            if any(g is None for g in grads):
                raise RuntimeError("extrapolation='past' needs every parameter's reduced gradient")
            self.past = [g.detach().float().clone() for g in grads]

    def on_step_end(self, args, state, control, **kwargs):
        if self._saved is not None:  # the optimizer skipped its update (fp16 overflow): the weights must be x again
            restore_(self._params, self._saved)
            self._saved = None

    def log_metrics(self) -> dict[str, float]:
        """``extrapolation_distance``: ||x~ - x|| = gamma ||d|| of the last step."""
        return {"extrapolation_distance": float(self._distance)}

    def state_dict(self) -> dict:
        return {} if self.past is None else {"past": list(self.past)}

    def load_state_dict(self, state: dict) -> None:
        past = state.get("past")
        self.past = None if past is None else [t.clone() for t in past]

"""Gradient statistics (ALGORITHMS.md section 0): the true gradient's squared norm and the gradient variance,
estimated without bias from the ``n = world_size x micro-batches`` micro-batch gradients of every optimizer step.

* ``L = mean_i ||g_i||^2``: local squared norms, read by a tensor hook during each micro-batch's backward (before
  any all-reduce and before accumulation into ``.grad``), divided by the micro-batch's loss weight so each ``g_i``
  is that micro-batch's own mean-loss gradient; summed over ranks with one scalar all-reduce per step.
* ``T = ||g_bar||^2``: the reduced gradient, before clipping, loss scale removed (``on_reduced_gradients``).

Then ``||G||^2 ~ (n T - L) / (n - 1)`` and the variance of one micro-batch gradient ``~ n (L - T) / (n - 1)``.
We store the variance at the *base* batch (``S (L - T) / (n - 1)``), so a change of S needs no rescaling, and the
gradient noise scale ``B_simple = tr(Sigma) / ||G||^2 = B0 * var_B0 / ||G||^2`` (McCandlish et al. 2018), from
separately smoothed numerator and denominator.

[decide] With ``n = 1`` there is no unbiased estimate: we refuse with a message that says how to get ``n >= 2``
(gradient accumulation or a second rank) rather than offer a biased differenced estimator.
"""

from __future__ import annotations

import math

import torch

from . import backends
from .algorithm import Algorithm

VAR_FLOOR = 1e-6


def unbiased_estimates(local_sq_mean: float, reduced_sq: float, n: int) -> tuple[float, float]:
    """``(||G||^2, variance of one micro-batch gradient)`` from ``L``, ``T`` and ``n`` micro-batches (floored)."""
    if n < 2:
        raise ValueError("unbiased gradient statistics need n >= 2 micro-batch gradients per step")
    grad_sqr = (n * reduced_sq - local_sq_mean) / (n - 1)
    micro_var = n * (local_sq_mean - reduced_sq) / (n - 1)
    return max(grad_sqr, 0.0), max(micro_var, 0.0)


def smoothing_for_scale(scale: float) -> float:
    """AdaScale's averaging coefficient ``theta = max(1 - S/1000, 0)`` (0: no averaging)."""
    return max(1.0 - scale / 1000.0, 0.0)


class BiasCorrectedEMA:
    """``m_t = theta m_{t-1} + (1 - theta) x_t``, reported as ``m_t / (1 - theta^t)``: the plain mean of the first
    samples blends into the EMA without a start-up bias; ``theta = 0`` returns the latest sample."""

    def __init__(self, theta: float):
        self.theta = theta
        self.avg = 0.0
        self.count = 0

    def update(self, x: float) -> None:
        self.avg = self.theta * self.avg + (1.0 - self.theta) * x
        self.count += 1

    @property
    def value(self) -> float:
        if self.count == 0:
            return float("nan")
        return self.avg / (1.0 - self.theta ** self.count)

    def state_dict(self) -> dict:
        return {"theta": self.theta, "avg": self.avg, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.theta, self.avg, self.count = float(state["theta"]), float(state["avg"]), int(state["count"])


class GradientStatistics(Algorithm):
    """Measures ``L``, ``T`` every step and keeps smoothed ``||G||^2`` and base-batch variance.

    Used on its own it is the **noise-scale monitor**: it changes nothing in training and logs ``grad_sqr``,
    ``grad_var`` (at the base batch), ``noise_scale`` (B_simple, in examples: the critical batch size estimate)
    every logging step. ``theta`` defaults to AdaScale's ``max(1 - S/1000, 0)``.
    """

    name = "gradient_statistics"

    def __init__(self, theta: float | None = None, base_batch_size: int | None = None):
        self._theta = theta
        self._base_batch_size = base_batch_size
        self.grad_sqr = BiasCorrectedEMA(0.0)
        self.grad_var = BiasCorrectedEMA(0.0)
        self.last_raw: tuple[float, float] | None = None
        self.skipped_steps = 0
        self._local_sq = None
        self._micro_norms: list[torch.Tensor] = []
        self._micro_weight = 1.0
        self.scale = 1.0

    # -- setup
    def on_train_begin(self, args, state, control, **kwargs):
        world = args.world_size
        ga = args.gradient_accumulation_steps
        if world * ga < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 micro-batch gradients per optimizer step for an unbiased "
                f"estimate, but world_size x gradient_accumulation_steps = {world} x {ga} = 1. Set "
                "gradient_accumulation_steps >= 2 (same global batch: halve per_device_train_batch_size) or run "
                "on >= 2 ranks.")
        base = self._base_batch_size or getattr(args, "base_batch_size", None)
        global_batch = args.per_device_train_batch_size * ga * world
        self.base_batch_size = base or global_batch
        self.scale = global_batch / self.base_batch_size
        if self.grad_sqr.count == 0:  # fresh run (a resumed one keeps its restored averages)
            theta = smoothing_for_scale(self.scale) if self._theta is None else self._theta
            self.grad_sqr, self.grad_var = BiasCorrectedEMA(theta), BiasCorrectedEMA(theta)

    # -- per micro-batch: local norms, no host sync
    def on_local_gradient(self, args, state, control, *, grad, weight, **kwargs):
        # one norm kernel per parameter; squared, summed and unweighted once per micro-batch (fewer launches)
        self._micro_norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32))
        self._micro_weight = weight

    def on_micro_batch_end(self, args, state, control, **kwargs):
        self._flush_micro_batch()

    def _flush_micro_batch(self) -> None:
        """Add the finished micro-batch's ``||g_i||^2`` to this step's local sum. Also called when the reduced
        gradients arrive: under DeepSpeed they do inside the last backward, before ``on_micro_batch_end``."""
        if not self._micro_norms:
            return
        sq = torch.stack(self._micro_norms).square().sum() / (self._micro_weight * self._micro_weight)
        self._micro_norms = []
        self._local_sq = sq if self._local_sq is None else self._local_sq + sq

    # -- per step: one scalar all-reduce, then the estimates
    def on_reduced_gradients(self, args, state, control, *, grad_sq_norm, num_micro_batches, **kwargs):
        self._flush_micro_batch()
        device = grad_sq_norm.device
        local = self._local_sq if self._local_sq is not None else torch.zeros((), device=device)
        self._local_sq = None
        packed = torch.stack([local.float().to(device), torch.tensor(float(num_micro_batches), device=device)])
        backends.all_reduce_sum(packed)
        total_sq, n = packed.tolist()
        n = int(round(n))
        self.update(total_sq / n, float(grad_sq_norm), n)

    def update(self, local_sq_mean: float, reduced_sq: float, n: int) -> None:
        """One step's ``L``, ``T``, ``n`` into the smoothed estimates. Skipped (the previous estimates stand) when
        anything is non-finite, or when the step had a single micro-batch (the short last accumulation group of an
        epoch whose micro-batches do not divide by gradient_accumulation_steps)."""
        if n < 2 or not (math.isfinite(local_sq_mean) and math.isfinite(reduced_sq)):
            self.skipped_steps += 1
            return
        grad_sqr, micro_var = unbiased_estimates(local_sq_mean, reduced_sq, n)
        var_base = max(micro_var * self.scale / n, VAR_FLOOR)  # variance of a gradient over B0 examples
        self.last_raw = (grad_sqr, var_base)
        self.grad_sqr.update(grad_sqr)
        self.grad_var.update(var_base)

    @property
    def noise_scale(self) -> float:
        """``B_simple`` in examples: ``tr(Sigma) / ||G||^2`` from the smoothed numerator and denominator."""
        sqr = self.grad_sqr.value
        return self.grad_var.value * self.base_batch_size / sqr if sqr > 0 else float("inf")

    def log_metrics(self) -> dict[str, float]:
        if self.grad_sqr.count == 0:
            return {}
        return {"grad_sqr": self.grad_sqr.value, "grad_var": self.grad_var.value, "noise_scale": self.noise_scale}

    def state_dict(self) -> dict:
        return {"grad_sqr": self.grad_sqr.state_dict(), "grad_var": self.grad_var.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.grad_sqr.load_state_dict(state["grad_sqr"])
        self.grad_var.load_state_dict(state["grad_var"])
        self.skipped_steps = int(state["skipped_steps"])


class NoiseScaleMonitor(GradientStatistics):
    """The gradient-noise-scale telemetry on its own: add it to any run (``callbacks=[NoiseScaleMonitor()]``) to
    log ``grad_sqr``, ``grad_var`` and ``noise_scale`` (B_simple, an estimate of the critical batch size in
    examples) without changing training. Needs ``world_size x gradient_accumulation_steps >= 2``."""

    name = "noise_scale_monitor"

"""Gradient statistics (ALGORITHMS.md section 0): the true gradient's squared norm and the gradient variance,
estimated without bias from the ``n = world_size x micro-batches`` micro-batch gradients of every optimizer step.

* ``L = sum_i w_i ||g_i||^2``: local squared norms, read by a tensor hook during each micro-batch's backward (before
  any all-reduce and before accumulation into ``.grad``), divided by the micro-batch's loss weight so each ``g_i``
  is that micro-batch's own mean-loss gradient; summed over ranks with one small all-reduce per step. ``w_i`` is the
  micro-batch's share of the reduced gradient ``g_bar = sum_i w_i g_i`` (``1/n`` under the ``mean`` rule, its share
  of the step's label tokens under ``tokens``): weighting ``L`` like ``g_bar`` keeps the estimates unbiased when
  micro-batches hold different token counts (each ``g_i`` a per-token mean of variance ``v / tokens_i``).
* ``T = ||g_bar||^2``: the reduced gradient, before clipping, loss scale removed (``on_reduced_gradients``), with
  the norms taken in fp32 (``reduced_sq_norm``: bf16 norms lose ~1e-3, which the difference ``n T - L`` amplifies).

Then ``||G||^2 ~ (n T - L) / (n - 1)`` and the variance of one micro-batch gradient ``~ n (L - T) / (n - 1)``.
We store the variance at the *base* batch (``S_step (L - T) / (n - 1)``, with ``S_step`` = this step's examples /
B0, so a short last accumulation group is measured at its own batch), so a change of S needs no rescaling, and the
gradient noise scale ``B_simple = tr(Sigma) / ||G||^2 = B0 * var_B0 / ||G||^2`` (McCandlish et al. 2018), from
separately smoothed numerator and denominator. With few micro-batches a single step's ``||G||^2`` estimate is often
``<= 0`` (floored to 0 before smoothing, as the spec says): while the *smoothed* value is not positive there is no
estimate (``has_estimate`` is false, ``noise_scale`` is nan) and the adaptive batch decides nothing from it.

Who does what (adaptdl's estimator / policy split):

* ``GradientStatistics`` is the **estimator**: one per trainer, created when any algorithm sets
  ``needs_gradient_statistics``. The trainer feeds it the hook gradients and the reduced norm; once per step it
  reduces its sums over ranks (one small all-reduce) into a ``StepStatistics`` that every consumer receives in
  ``on_reduced_gradients(statistics=...)``. What it measures is a ``Measurement``: the gradients themselves
  (``GradientNorms``) or, when an algorithm provides one (``gradient_measurement``: AdamScale's preconditioned
  gradients), that algorithm's, which every consumer then shares. Under local SGD (an algorithm that
  ``keeps_gradients_local``) the "reduced" gradient is each worker's own: each worker's estimates are formed from
  its own micro-batches and averaged over workers instead.
* ``SmoothedNoiseScale`` is a **consumer**: its own smoothing of the step estimates (its own ``theta``), the noise
  scale, its logs and checkpoint state. The noise-scale monitor, AdaScale and the adaptive batch are consumers.

[decide] With ``n = 1`` there is no unbiased estimate: we refuse with a message that says how to get ``n >= 2``
(gradient accumulation or a second rank) rather than offer a biased differenced estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from . import backends
from .events import Algorithm

VAR_FLOOR = 1e-6


def unbiased_estimates(local_sq_mean: float, reduced_sq: float, n: int, floor: bool = True) -> tuple[float, float]:
    """``(||G||^2, variance of one micro-batch gradient)`` from ``L``, ``T`` and ``n`` micro-batches, floored at 0
    unless ``floor`` is false (a mean over many steps must keep the negative ones to stay unbiased)."""
    if n < 2:
        raise ValueError("unbiased gradient statistics need n >= 2 micro-batch gradients per step")
    grad_sqr = (n * reduced_sq - local_sq_mean) / (n - 1)
    micro_var = n * (local_sq_mean - reduced_sq) / (n - 1)
    return (max(grad_sqr, 0.0), max(micro_var, 0.0)) if floor else (grad_sqr, micro_var)


def reduced_sq_norm(grads: list[torch.Tensor], loss_scale: float = 1.0) -> torch.Tensor:
    """``sum_p ||grad_p||^2 / loss_scale^2`` in fp32: each norm upcasts before squaring (a bf16 norm would round)."""
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return norms.square().sum() / loss_scale ** 2


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


@dataclass(frozen=True)
class StepStatistics:
    """One step's unbiased estimates: ``grad_sqr`` (``||G||^2``, floored at 0) and ``micro_var`` (the variance of one
    micro-batch gradient), from ``n`` micro-batch gradients holding ``examples`` examples (over all ranks, or one
    worker's under local SGD). ``valid`` is false (and the estimates nan) when the step cannot give an estimate:
    fewer than 2 micro-batches, or a non-finite norm (an fp16 overflow). ``unfloored`` keeps the two estimates
    before the floor at 0 (nan under local SGD's worker average): the advisor's probe averages them over steps."""

    grad_sqr: float
    micro_var: float
    n: int
    examples: float
    unfloored: tuple[float, float] = (math.nan, math.nan)

    @property
    def valid(self) -> bool:
        return self.n >= 2 and math.isfinite(self.grad_sqr) and math.isfinite(self.micro_var)

    @classmethod
    def from_norms(cls, local_sq_mean: float, reduced_sq: float, n: int, examples: float) -> StepStatistics:
        """From ``L`` (weighted mean of the micro-batches' squared norms), ``T`` and ``n``."""
        if n < 2 or not (math.isfinite(local_sq_mean) and math.isfinite(reduced_sq)):
            return cls(math.nan, math.nan, n, examples)
        unfloored = unbiased_estimates(local_sq_mean, reduced_sq, n, floor=False)
        return cls(max(unfloored[0], 0.0), max(unfloored[1], 0.0), n, examples, unfloored)


class Measurement(Protocol):
    """What the estimator measures: this rank's ``[sum_i w_i ||g_i||^2, sum_i w_i]`` over the step's micro-batches
    and ``T``, for some notion of gradient (the gradients themselves, or AdamScale's preconditioned ones). ``w_i``
    is the micro-batch's share of the reduced gradient (its loss weight over the world size); the hook gradient is
    ``weight x g_i``."""

    def begin_step(self) -> None: ...

    def add_local(self, param, grad: torch.Tensor, weight: float, share: float) -> None: ...

    def end_micro_batch(self, weight: float, share: float) -> None:
        """May be called twice for the last micro-batch (also when the reduced gradients arrive): add it once."""

    def take(self, model, grad_sq_norm: torch.Tensor, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the local sums as a 2-vector, ``T``) of the step, then start afresh."""


class GradientNorms:
    """The default ``Measurement``: ``L`` from the norms of the hook gradients, ``T`` from the reduced gradient."""

    def __init__(self):
        self._local_sq = None
        self._micro_norms: list[torch.Tensor] = []

    def begin_step(self) -> None:
        """Start the step's local sums afresh: a step whose update never ran (DeepSpeed skips the optimizer on an
        fp16 overflow, and with it the reduced gradients) must not leak its micro-batches into the next step."""
        self._local_sq = None
        self._micro_norms = []

    def add_local(self, param, grad: torch.Tensor, weight: float, share: float) -> None:
        # one norm kernel per parameter; squared, summed and unweighted once per micro-batch (fewer launches)
        self._micro_norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def end_micro_batch(self, weight: float, share: float) -> None:
        """Add the finished micro-batch's ``w_i ||g_i||^2`` and ``w_i``. Also called when the reduced gradients
        arrive: under DeepSpeed they do inside the last backward, before the micro-batch's end. The hook gradient
        is ``weight x g_i``."""
        if not self._micro_norms:
            return
        sq = torch.stack(self._micro_norms).square().sum() * (share / (weight * weight))
        self._micro_norms = []
        step = torch.stack([sq, torch.as_tensor(share, dtype=torch.float32, device=sq.device)])
        self._local_sq = step if self._local_sq is None else self._local_sq + step

    def take(self, model, grad_sq_norm: torch.Tensor, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's ``[sum_i w_i ||g_i||^2, sum_i w_i]``, ``T``) of the step, and reset the sums."""
        local = self._local_sq if self._local_sq is not None else torch.zeros(2, device=grad_sq_norm.device)
        self._local_sq = None
        return local.float().to(grad_sq_norm.device), grad_sq_norm


class GradientStatistics:
    """The estimator: one per trainer, fed by the trainer, its ``StepStatistics`` shared by every consumer."""

    def __init__(self, world_size: int, measurement: Measurement | None = None, local_workers: bool = False):
        self.world_size = world_size
        self.measurement = measurement or GradientNorms()
        self.local_workers = local_workers  # local SGD: each worker's own estimates, averaged
        self._weight = 1.0

    def begin_step(self) -> None:
        self.measurement.begin_step()

    def on_local_gradient(self, param, grad: torch.Tensor, weight: float) -> None:
        self._weight = weight
        self.measurement.add_local(param, grad, weight, weight / self.world_size)

    def on_micro_batch_end(self) -> None:
        self.measurement.end_micro_batch(self._weight, self._weight / self.world_size)

    def measure(self, model, grad_sq_norm: torch.Tensor, num_micro_batches: int, num_examples: int,
                loss_scale: float) -> StepStatistics:
        """The step's estimates: this rank's ``n`` micro-batches of ``num_examples`` examples, its reduced
        ``||g_bar||^2`` (loss scale removed); one small all-reduce."""
        self.on_micro_batch_end()
        local, reduced_sq = self.measurement.take(model, grad_sq_norm, loss_scale)
        device = grad_sq_norm.device  # where collectives run (a CUDA tensor under NCCL)
        if self.local_workers:
            return self._worker_average(local, reduced_sq, num_micro_batches, num_examples, device)
        packed = torch.cat([local.to(device), torch.tensor([float(num_micro_batches), float(num_examples)],
                                                           device=device)])
        backends.all_reduce_sum(packed)
        weighted_sq, weights, n, examples = packed.tolist()
        return StepStatistics.from_norms(weighted_sq / weights if weights > 0 else math.nan, float(reduced_sq),
                                         int(round(n)), examples)

    def _worker_average(self, local, reduced_sq, n: int, examples: int, device) -> StepStatistics:
        """Local SGD: each worker's own unbiased estimates (its micro-batches against its own gradient, weighted by
        their shares of it), averaged over workers with one scalar all-reduce."""
        weighted_sq, weights = local.tolist()
        local_mean = weighted_sq / weights if weights > 0 else math.nan
        estimates = unbiased_estimates(local_mean, float(reduced_sq), n) if n >= 2 else (math.nan, math.nan)
        packed = backends.all_reduce_sum(torch.tensor([*estimates, 1.0], dtype=torch.float64, device=device))
        grad_sqr, micro_var, workers = packed.tolist()
        return StepStatistics(grad_sqr / workers, micro_var / workers, n, examples)


def require_two_micro_batches(plan, who: str) -> None:
    """Refused at ``train()`` before any work: fewer than 2 micro-batch gradients per step."""
    if plan.micro_batches_per_step < 2:
        raise ValueError(
            f"{who} needs at least 2 micro-batch gradients per optimizer step for an unbiased estimate, but "
            f"world_size x gradient_accumulation_steps = {plan.world_size} x {plan.accumulation} = 1. Set "
            "gradient_accumulation_steps >= 2 (same global batch: halve per_device_train_batch_size) or run on "
            ">= 2 ranks.")


class SmoothedNoiseScale(Algorithm):
    """A consumer of the step statistics: smoothed ``||G||^2`` and base-batch variance, the noise scale, their logs
    (``grad_sqr``, ``grad_var`` at the base batch, ``noise_scale``: B_simple in examples) and checkpoint state.
    ``theta`` defaults to AdaScale's ``max(1 - S/1000, 0)``."""

    needs_gradient_statistics = True
    unsupported_under_fsdp = ("the statistics read each micro-batch's local gradient in tensor hooks before any "
                              "reduction, but FSDP reduce-scatters gradients during the backward and its parameters "
                              "are shards: the hooks would see reduced shards, not local micro-batch gradients")
    #: the reduced gradient is rank-local under local SGD (every backward under no_sync)
    excludes = {"local_sgd": "local SGD never all-reduces gradients, so the 'reduced' gradient T would be each rank's "
                             "own; adaptive_batch with local_sgd_steps measures the workers' local statistics instead"}

    def __init__(self, theta: float | None = None, base_batch_size: int | None = None):
        self._theta = theta
        self._base_batch_size = base_batch_size
        self.grad_sqr = BiasCorrectedEMA(0.0)
        self.grad_var = BiasCorrectedEMA(0.0)
        self.skipped_steps = 0
        self.base_batch_size = base_batch_size or 1
        self.scale = 1.0  # the configured S = B / B0
        self.step_scale = 1.0  # the last measured step's own batch / B0 (smaller for a short last group)

    def check(self, plan) -> None:
        require_two_micro_batches(plan, type(self).__name__)

    def settings(self) -> dict:
        return {"theta": "max(1 - S/1000, 0)" if self._theta is None else self._theta}

    def on_train_begin(self, args, state, control, **kwargs):
        base = self._base_batch_size or getattr(args, "base_batch_size", None)
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.base_batch_size = base or global_batch
        self.scale = self.step_scale = global_batch / self.base_batch_size
        if self.grad_sqr.count == 0:  # fresh run (a resumed one keeps its restored averages)
            theta = smoothing_for_scale(self.scale) if self._theta is None else self._theta
            self.grad_sqr, self.grad_var = BiasCorrectedEMA(theta), BiasCorrectedEMA(theta)

    def on_reduced_gradients(self, args, state, control, *, statistics: StepStatistics | None, **kwargs):
        if statistics is not None:  # None: a step no consumer asked to measure
            self.add(statistics)

    def add(self, step: StepStatistics) -> None:
        """One step's estimates into the smoothed ones, at the step's own batch over B0. Skipped (the previous
        estimates stand) when the step gave none (non-finite, or a single micro-batch: the short last accumulation
        group of an epoch with one micro-batch)."""
        if not step.valid:
            self.skipped_steps += 1
            return
        self.step_scale = step.examples / self.base_batch_size
        self.grad_sqr.update(step.grad_sqr)
        self.grad_var.update(max(step.micro_var * self.step_scale / step.n, VAR_FLOOR))  # a gradient over B0

    def update(self, local_sq_mean: float, reduced_sq: float, n: int) -> None:
        """``add`` from ``L``, ``T`` and ``n`` at the configured batch."""
        self.add(StepStatistics.from_norms(local_sq_mean, reduced_sq, n, self.scale * self.base_batch_size))

    @property
    def has_estimate(self) -> bool:
        """A positive smoothed ``||G||^2`` exists: only then may a gain or a batch be decided from the statistics."""
        return self.grad_sqr.count > 0 and self.grad_sqr.value > 0

    @property
    def noise_scale(self) -> float:
        """``B_simple`` in examples: ``tr(Sigma) / ||G||^2`` from the smoothed numerator and denominator (nan while
        the smoothed ``||G||^2`` is not positive: no estimate yet)."""
        if not self.has_estimate:
            return math.nan
        return self.grad_var.value * self.base_batch_size / self.grad_sqr.value

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

"""LR scaling rules: how the peak learning rate and the warm-up follow the batch size.

Functional core only (ALGORITHMS.md section 2). With ``S = B / B0``:

* ``linear``: peak ``S * lr0``, the user's warm-up;
* ``sqrt``:   peak ``sqrt(S) * lr0``, the user's warm-up;
* ``legw``:   peak ``sqrt(S) * lr0``, warm-up of ``S * w0`` epochs (``w0`` = the base run's warm-up in epochs),
  i.e. the base run's warm-up *step count*, while the epoch budget stays fixed;
* ``none``:   the user's LR as given;
* ``adascale``: the user's LR and warm-up, with a per-step gain and a schedule on progress (``adascale.py``).

``step_decay`` multiplies any of them by a factor at given epochs (``lr_decay_epochs``), placed as fractions of the
run so that the milestones fall at the same share of the budget on every clock.

The trainer turns these numbers into one LambdaLR (HF's ``get_scheduler``) so that warm-up and any
``lr_scheduler_type`` decay are applied by a single scheduler that owns the LR.
"""

from __future__ import annotations

import math
from fractions import Fraction

SCALING_RULES = ("none", "linear", "sqrt", "legw", "adascale")


def check_rule(rule: str) -> str:
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown lr_scaling={rule!r}; choose one of {', '.join(SCALING_RULES)}")
    return rule


def batch_scale(global_batch_size: int, base_batch_size: int) -> float:
    """``S = B / B0``, refusing ratios that cannot be meant (neither size divides the other)."""
    if base_batch_size is None or base_batch_size <= 0:
        raise ValueError(f"base_batch_size must be a positive integer, got {base_batch_size!r}")
    if global_batch_size <= 0:
        raise ValueError(f"the global batch size must be positive, got {global_batch_size}")
    ratio = Fraction(global_batch_size, base_batch_size)
    if ratio.numerator != 1 and ratio.denominator != 1:
        raise ValueError(
            f"global batch {global_batch_size} (per_device_train_batch_size x gradient_accumulation_steps x "
            f"world_size) is not a multiple or a divisor of base_batch_size={base_batch_size}: the scale "
            f"S={float(ratio):.4g} would not correspond to any base run. Choose sizes where one divides the other."
        )
    return float(ratio)


def peak_lr_multiplier(rule: str, scale: float) -> float:
    """Factor applied to the user's ``learning_rate`` (tuned at ``base_batch_size``)."""
    check_rule(rule)
    if rule == "linear":
        return scale
    if rule in ("sqrt", "legw"):
        return math.sqrt(scale)
    return 1.0


def steps_per_epoch(micro_batches: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``micro_batches`` per rank at ``accumulation`` micro-batches a step (a short
    last group is a step too, as in HF's loop); at least 1."""
    return max(micro_batches // accumulation + int(micro_batches % accumulation > 0), 1)


def legw_warmup_steps(scale: float, base_warmup_epochs: float, steps_per_epoch: int) -> int:
    """LEGW warm-up in optimizer steps: ``S * w0`` epochs at the current batch.

    ``S * w0 * steps_per_epoch(B) = w0 * N / B0``: the base run's warm-up step count, kept constant while the
    batch grows (so the warm-up covers S times more epochs).
    """
    if base_warmup_epochs < 0:
        raise ValueError(f"legw_base_warmup_epochs must be >= 0, got {base_warmup_epochs}")
    return int(round(scale * base_warmup_epochs * steps_per_epoch))


def check_step_decay(epochs: list[float] | None, factor: float) -> None:
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"lr_decay_factor must be a finite number > 0, got {factor}")
    if epochs and (any(not math.isfinite(e) or e <= 0 for e in epochs) or list(epochs) != sorted(epochs)):
        raise ValueError(f"lr_decay_epochs must be increasing epochs > 0, got {epochs}")


def step_decay(schedule_lambda, milestones: list[float], factor: float):
    """``schedule_lambda`` times ``factor`` once for every milestone (in the schedule's steps) already reached."""
    def decayed(step):
        return schedule_lambda(step) * factor ** sum(step >= m for m in milestones)
    return decayed


def decay_milestones(epochs: list[float], run_epochs: float, schedule_length: int) -> list[float]:
    """The milestones of ``lr_decay_epochs`` in the schedule's steps: epoch ``e`` of a ``run_epochs`` run is the
    fraction ``e / run_epochs`` of the schedule's ``schedule_length`` steps, whatever its clock counts."""
    late = [e for e in epochs if e >= run_epochs]
    if late:
        raise ValueError(f"lr_decay_epochs {late} are not inside the run's {run_epochs:g} epochs")
    return [e / run_epochs * schedule_length for e in epochs]

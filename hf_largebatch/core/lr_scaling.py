"""LR scaling rules: how the peak learning rate and the warm-up follow the batch size.

Functional core only (ALGORITHMS.md section 2). With ``S = B / B0``:

* ``linear``: peak ``S * lr0``, the user's warm-up;
* ``sqrt``:   peak ``sqrt(S) * lr0``, the user's warm-up;
* ``legw``:   peak ``sqrt(S) * lr0``, warm-up of ``S * w0`` epochs (``w0`` = the base run's warm-up in epochs),
  i.e. the base run's warm-up *step count*, while the epoch budget stays fixed;
* ``none``:   the user's LR as given;
* ``adascale``: the user's LR and warm-up, with a per-step gain and a schedule on progress (``adascale.py``).

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

"""One composition check over the algorithms a run actually has, however they were configured.

``LargeBatchTrainer`` builds a ``RunPlan`` (world size, accumulation, backend, precision, optimizer name, the rules
in force) at ``train()`` and hands it, with its ``Algorithm`` callbacks, to ``check_composition``: every algorithm
checks what it needs (``Algorithm.check``), and every pair is refused when either ``excludes`` the other. The
algorithms come from options (``LargeBatchArguments``) or from ``callbacks=[...]`` alike, so the same combination
gets the same message both ways; nothing depends on which option strings were set.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

from ..optim.lars_lamb_adamp import LARGE_BATCH_OPTIMIZERS
from .events import OWNED_EVENTS
from .option_strings import option_name


@dataclass(frozen=True)
class RunPlan:
    """What the algorithms may ask about a run before it starts."""

    world_size: int
    accumulation: int  # micro-batches per rank per step as configured (before an adaptive batch takes over)
    per_device_batch_size: int
    base_batch_size: int | None
    backend: str  # "single" | "ddp" | "deepspeed" | "fsdp"
    zero_stage: int  # 0 outside DeepSpeed
    optimizer_cls: type | None  # the class of the optimizer the run will use (None: not importable here)
    lr_scaling: str
    lr_schedule: str
    warmup: bool  # warmup_steps or warmup_ratio set
    custom_loss: bool  # compute_loss_func given
    user_scheduler: bool  # a scheduler passed in ``optimizers=(optimizer, scheduler)``
    algorithms: tuple[str, ...]  # the ``name`` of every algorithm present
    args: Any  # the training arguments, for what only one algorithm asks about (cadence, its own option)

    @property
    def micro_batches_per_step(self) -> int:
        return self.world_size * self.accumulation

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.accumulation * self.world_size

    @property
    def scale(self) -> float:
        return self.global_batch_size / self.base_batch_size if self.base_batch_size else 1.0


def describe(algorithm) -> str:
    """How a message names an algorithm: its class and the option that turns it on."""
    option = f" ({algorithm.option})" if algorithm.option else ""
    return f"{type(algorithm).__name__}{option}"


def check_fsdp(algorithms, plan: RunPlan) -> None:
    """Under FSDP the LR rules (none / linear / sqrt / LEGW), AutoWU, the loss normalisation and the non-finite
    guard act on what FSDP leaves whole (the LR, the loss, the global gradient norm); what reads or moves per-layer
    or per-micro-batch gradients or weights is refused with its reason (``Algorithm.unsupported_under_fsdp``)."""
    for algorithm in algorithms:
        if algorithm.unsupported_under_fsdp:
            raise ValueError(f"{describe(algorithm)} is not supported under FSDP: {algorithm.unsupported_under_fsdp}. "
                             "Use DDP, or DeepSpeed ZeRO (recipes/configs/ds_zero2.json)")
    optim = option_name(getattr(plan.args, "optim", ""))
    if optim in LARGE_BATCH_OPTIMIZERS:
        raise ValueError(f"optim={optim!r} is not supported under FSDP: its per-layer trust ratios need whole "
                         "layers, and FSDP hands the optimizer shards. Use DDP")


def check_composition(algorithms, plan: RunPlan) -> None:
    """Raise ``ValueError`` for the first algorithm the run cannot host or the first pair that cannot run together
    (in the order of their names, so the message does not depend on the order they were added in): a pair one of
    which ``excludes`` the other, or two algorithms answering the same owned event (``events.OWNED_EVENTS``: the
    schedule's clock, the micro-batches of a step, ...), which only one may decide."""
    algorithms = sorted(algorithms, key=lambda algorithm: algorithm.name)
    if plan.backend == "fsdp":
        check_fsdp(algorithms, plan)
    for algorithm in algorithms:
        algorithm.check(plan)
    for a, b in combinations(algorithms, 2):
        reason = a.excludes.get(b.name) or b.excludes.get(a.name)
        if reason:
            raise ValueError(f"{describe(a)} cannot be combined with {describe(b)}: {reason}. Remove one of them")
    for event in OWNED_EVENTS:
        owners = [algorithm for algorithm in algorithms if algorithm.overrides(event)]
        if len(owners) > 1:
            raise ValueError(f"{describe(owners[0])} and {describe(owners[1])} both decide {event}, which one "
                             "algorithm of a run may decide. Remove one of them")

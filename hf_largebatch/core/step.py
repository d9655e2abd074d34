"""What the trainer knows about the run being set up (``RunSetup``) and the optimizer step in progress
(``StepContext``): the state that algorithms read through events instead of through trainer attributes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class RunSetup:
    """Handed to ``Algorithm.on_setup`` at ``train()``: the run's arguments, scale and counts, and ``override``,
    which changes an argument for this ``train()`` only (put back when it ends, error or not)."""

    def __init__(self, args, scale: float, steps_per_epoch: Callable[[], int],
                 train_micro_batches: Callable[[], int]):
        self.args = args
        self.scale = scale
        #: optimizer steps per epoch at the configured accumulation
        self.steps_per_epoch = steps_per_epoch
        #: this rank's micro-batches per epoch
        self.train_micro_batches = train_micro_batches
        self._saved: dict = {}

    def override(self, name: str, value) -> None:
        self._saved.setdefault(name, getattr(self.args, name))
        setattr(self.args, name, value)

    def configured(self, name: str):
        """The argument as the user gave it (before any override)."""
        return self._saved.get(name, getattr(self.args, name))

    def restore(self) -> None:
        for name, value in self._saved.items():
            setattr(self.args, name, value)
        self._saved = {}


@dataclass
class StepContext:
    """The optimizer step in progress, as ``LargeBatchTrainer`` tracks it.

    ``micro_weight``: the hook gradient of the current micro-batch is ``micro_weight`` times the gradient of its
    own mean loss (its share of the reduced gradient times the world size, times the fp16 loss scale);
    ``examples``: this rank's examples so far in the step; ``loss_sum``: the sum of its micro-batch losses;
    ``applied_lrs``: the LR of each param group the update applied."""

    shifts_labels: bool = False  # a decoder-only LM: labels are shifted inside the model's loss
    micro_step: int = 0
    num_micro_batches: int = 1
    micro_weight: float = 1.0
    examples: int = 0
    loss_sum: torch.Tensor | None = None
    applied_lrs: list[float] = field(default_factory=list)
    reduced_fired: bool = False
    lr_applied_fired: bool = False
    unscaled_group_lrs: list[float] | None = None
    example_inputs: dict | None = None  # the step's first micro-batch, kept when per-example gradients are wanted
    skip_update: bool = False  # a non-finite gradient: the optimizer must not apply it (nonfinite.py)

    def begin(self) -> None:
        """A new optimizer step (its first micro-batch)."""
        self.examples, self.loss_sum, self.applied_lrs = 0, None, []
        self.reduced_fired = self.lr_applied_fired = self.skip_update = False

    @property
    def last_micro_batch(self) -> bool:
        return self.micro_step == self.num_micro_batches - 1

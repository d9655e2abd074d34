"""``LargeBatchArguments``: ``TrainingArguments`` plus the large-batch options, usable with ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from . import backends
from .loss import LOSS_NORMALIZATIONS
from .scaling import SCALING_RULES, check_rule


@dataclass
class LargeBatchArguments(TrainingArguments):
    """Training arguments for large-batch runs.

    ``learning_rate`` and ``warmup_steps`` are the values tuned at ``base_batch_size``; ``lr_scaling`` says how to
    carry them to the real global batch ``per_device_train_batch_size x gradient_accumulation_steps x world_size``.
    """

    lr_scaling: str = field(
        default="none",
        metadata={"help": f"How the LR follows the batch size: {' | '.join(SCALING_RULES)}.",
                  "choices": list(SCALING_RULES)},
    )
    base_batch_size: int | None = field(
        default=None,
        metadata={"help": "Global batch size B0 that learning_rate (and warm-up) were tuned for. Required unless "
                          "lr_scaling is 'none'."},
    )
    legw_base_warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "LEGW: warm-up of the base run in epochs (w0); the run warms up for S*w0 epochs."},
    )
    loss_normalization: str = field(
        default="auto",
        metadata={"help": "How micro-batch losses are weighted so every split of the global batch gives the same "
                          "gradient: 'mean' (each micro-batch's mean loss, equal weights), 'tokens' (token-level "
                          "cross-entropy summed and divided by the global count of label tokens), 'auto' (tokens "
                          "when labels are integer sequences, else mean).",
                  "choices": list(LOSS_NORMALIZATIONS)},
    )

    def __post_init__(self):
        check_rule(self.lr_scaling)
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"unknown loss_normalization={self.loss_normalization!r}; choose one of "
                             f"{', '.join(LOSS_NORMALIZATIONS)}")
        if self.base_batch_size is not None and self.base_batch_size <= 0:
            raise ValueError(f"base_batch_size must be a positive integer, got {self.base_batch_size}")
        if self.lr_scaling != "none" and self.base_batch_size is None:
            raise ValueError(f"lr_scaling={self.lr_scaling!r} needs base_batch_size (the global batch size "
                             "your learning_rate was tuned for)")
        if self.lr_scaling == "legw":
            if self.warmup_steps:
                raise ValueError("lr_scaling='legw' sets the warm-up itself: give the base run's warm-up as "
                                 "legw_base_warmup_epochs and leave warmup_steps at 0")
            if self.legw_base_warmup_epochs <= 0:
                raise ValueError("lr_scaling='legw' needs legw_base_warmup_epochs > 0 (the base run's warm-up "
                                 "in epochs)")
        backends.check_launch()
        ds_config = backends.load_deepspeed_config(self.deepspeed)
        backends.check_deepspeed_config(ds_config)
        backends.check_algorithms_on_deepspeed(self.lr_scaling, str(getattr(self.optim, "value", self.optim)),
                                               ds_config)
        if ds_config is not None:
            self.accelerator_config = backends.prepare_cpu_deepspeed(self.accelerator_config)
        super().__post_init__()
        backends.check_world_size(self.world_size)

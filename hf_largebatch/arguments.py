"""``LargeBatchArguments``: ``TrainingArguments`` plus the large-batch options, usable with ``HfArgumentParser``."""

from __future__ import annotations

import math

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from .algorithms import from_arguments
from .core import backends
from .algorithms.autowu import AutoWUConfig
from .algorithms.adaptive_batch import ADAPTIVE_TESTS, AdaptiveBatchConfig
from .algorithms.conadv import ADVERSARIAL_MODES, ConAdvConfig
from .algorithms.extrapolation import EXTRAPOLATIONS
from .core.loss import LOSS_NORMALIZATIONS
from .core.nonfinite import NONFINITE_POLICIES, check_policy
from .optim.lars_lamb_adamp import LARGE_BATCH_OPTIMIZERS, optimizer_cls_and_kwargs
from .core.option_strings import option_name, require_positive_finite
from .core.lr_scaling import SCALING_RULES, check_rule, check_step_decay


LR_SCHEDULES = ("hf", "autowu")
_HF_DEFAULT_OPTIM = next(f.default for f in fields(TrainingArguments) if f.name == "optim")


@dataclass
class LargeBatchArguments(TrainingArguments):
    """Training arguments for large-batch runs.

    ``learning_rate`` and ``warmup_steps`` are the values tuned at ``base_batch_size``; ``lr_scaling`` says how to
    carry them to the real global batch ``per_device_train_batch_size x gradient_accumulation_steps x world_size``.
    """

    optim: str = field(
        default=_HF_DEFAULT_OPTIM,
        metadata={"help": "The optimizer: any of transformers' OptimizerNames, or lars | lamb | adamp "
                          "(optim/lars_lamb_adamp.py; "
                          "their options through optim_args, e.g. 'trust_coefficient=0.001,momentum=0.9').",
                  "choices": [o.value for o in OptimizerNames] + list(LARGE_BATCH_OPTIMIZERS)},
    )
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
    on_nonfinite_step: str = field(
        default="skip",
        metadata={"help": "A step whose gradient norm is NaN or inf (fp32, bf16): 'skip' drops its update (weights, "
                          "optimizer state and BatchNorm statistics stay as before the step; counted in the logged "
                          "nonfinite_steps), 'stop' raises before the update. fp16's loss scaler skips such steps "
                          "under either; 25 consecutive ones stop any run.",
                  "choices": list(NONFINITE_POLICIES)},
    )
    lr_schedule: str = field(
        default="hf",
        metadata={"help": "'hf': lr_scheduler_type with warm-up (and lr_scaling); 'autowu': AutoWU's automatic "
                          "exponential warm-up, switch at the GP-smoothed loss minimum, then decay (learning_rate "
                          "is then AutoWU's max_lr, the top of the warm-up range).",
                  "choices": list(LR_SCHEDULES)},
    )
    lr_decay_epochs: list[float] | None = field(
        default=None,
        metadata={"help": "Step decay on top of lr_scheduler_type: at each of these epochs the LR is multiplied by "
                          "lr_decay_factor (Zaremba's PTB schedule: 4 5 6 ... 12 with 0.5; ResNet: 0.5 and 0.75 of "
                          "the run with 0.1). Placed as fractions of the run, so they hold on any schedule clock "
                          "(AdaScale's progress, the adaptive batch's samples).",
                  "nargs": "+"},
    )
    lr_decay_factor: float = field(
        default=0.1,
        metadata={"help": "The factor of each lr_decay_epochs milestone."},
    )
    autowu_args: str | None = field(
        default=None,
        metadata={"help": "AutoWU parameters as 'key=value,key=value' (e.g. 'min_lr=1e-5,patience=3,vote_every=20,"
                          "decay=const-cos'); keys: " + ", ".join(AutoWUConfig.__dataclass_fields__)},
    )

    adversarial: str = field(
        default="none",
        metadata={"help": "Adversarial training: 'conadv' (one-step attack on the previous step's weights, ConAdv), "
                          "'sequential' (the same attack on the current weights) or 'none'. The loss averages clean "
                          "and adversarial examples.",
                  "choices": list(ADVERSARIAL_MODES)},
    )
    adversarial_args: str | None = field(
        default=None,
        metadata={"help": "The attack as 'key=value,...': epsilon (model input units), pixel_epsilon ([0, 1] "
                          "pixels, converted with the image processor's image_mean/image_std) or relative_epsilon "
                          "(text: a fraction of the input embeddings' RMS), alpha (default eps, in the same units), "
                          "random_start (0.8), targeted (false), input_name (auto)."},
    )

    extrapolation: str = field(
        default="none",
        metadata={"help": "EXTRAP-SGD: take each step's gradient at x - gamma d and update from x, with d the local "
                          "gradient of the step's first micro-batch ('fresh'), the previous step's gradient ('past') "
                          "or Gaussian noise ('noise'). Pair with optim sgd, optim_args 'momentum=0.9,nesterov=True'.",
                  "choices": list(EXTRAPOLATIONS)},
    )
    extrapolation_ratio: float = field(
        default=1.0,
        metadata={"help": "gamma_t = extrapolation_ratio x the step's scheduled learning rate."},
    )

    adaptive_batch: str = field(
        default="none",
        metadata={"help": "Adaptive batch size: grow the global batch (by raising gradient accumulation at a step "
                          "boundary) when the 'norm' test (tr(Sigma)/b > eta^2 ||G||^2), the 'inner_product' test "
                          "or the 'augmented' (inner product + orthogonality) test says so; 'none' keeps it fixed. "
                          "The LR schedule and the budget then count samples.",
                  "choices": list(ADAPTIVE_TESTS)},
    )
    adaptive_batch_args: str | None = field(
        default=None,
        metadata={"help": "The test as 'key=value,...': max_batch_size (required), eta (0.1), theta (0.5), nu (1.0), "
                          "test_examples per rank for the per-example tests (8), smoothing (EMA, 0.9), "
                          "test_interval in steps (1)."},
    )
    local_sgd_steps: int = field(
        default=0,
        metadata={"help": "Local SGD: each rank takes this many optimizer steps on its own gradients between "
                          "parameter averages (0: off, gradients are all-reduced every step). With adaptive_batch "
                          "the test runs at every synchronisation and grows the local batches."},
    )
    noise_probe_steps: int = field(
        default=0,
        metadata={"help": "The probe of `hf-largebatch advise`: record each step's unbiased gradient statistics, "
                          "stop training after this many optimizer steps (the LR schedule is the configured run's) "
                          "and write them to <output_dir>/noise_probe.json (0: off). Needs world_size x "
                          "gradient_accumulation_steps >= 2."},
    )

    def __post_init__(self):
        self.check_batch_and_lr()
        check_rule(self.lr_scaling)
        self.check_lr_schedule()
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"unknown loss_normalization={self.loss_normalization!r}; choose one of "
                             f"{', '.join(LOSS_NORMALIZATIONS)}")
        check_policy(self.on_nonfinite_step)
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
        self.check_adversarial()
        self.check_extrapolation()
        self.check_adaptive_batch()
        backends.check_optimizer_on_deepspeed(option_name(self.optim), ds_config)
        if ds_config is not None:
            self.accelerator_config = backends.prepare_cpu_deepspeed(self.accelerator_config)
        # TrainingArguments accepts only its own optimizer names: validate ours here and hand it a stand-in
        optim = option_name(self.optim)
        if optim in LARGE_BATCH_OPTIMIZERS:
            self.optim = "sgd"
        backends.init_cpu_process_group(self)  # with ddp_timeout, before transformers starts it without
        super().__post_init__()
        if optim in LARGE_BATCH_OPTIMIZERS:
            self.optim = optim
            optimizer_cls_and_kwargs(optim, self.learning_rate, self.weight_decay, self.adam_beta1, self.adam_beta2,
                                     self.adam_epsilon, self.optim_args)  # a bad optim_args fails here, not later
        elif self.optim_args:
            self.check_hf_optim_args(optim)
        backends.check_world_size(self.world_size)
        backends.check_fsdp_device(self)

    def check_batch_and_lr(self) -> None:
        """Values that HF accepts and that then fail deep inside the first step (a division by zero, a sampler's
        error) or train wrongly (a negative or nan learning rate)."""
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate}")

    def check_hf_optim_args(self, optim: str) -> None:
        """HF parses ``optim_args`` per optimizer and silently drops the keys that optimizer does not read (a
        typo such as 'momentun=0.9' for sgd trains without momentum); a value it cannot convert fails only when
        the optimizer is built. Both are refused here: a key is kept only if removing it changes what HF builds."""
        from transformers import Trainer

        items = [item for item in self.optim_args.replace(" ", "").split(",") if item]
        if any(item.count("=") != 1 for item in items):
            raise ValueError(f"optim_args={self.optim_args!r}: expected 'key=value,key=value'")

        def built(text):
            saved, self.optim_args = self.optim_args, text
            try:
                return Trainer.get_optimizer_cls_and_kwargs(self)
            finally:
                self.optim_args = saved

        try:
            full = built(self.optim_args)
        except ImportError:  # the optimizer's package is missing: HF says so when it builds it
            return
        except ValueError as error:
            raise ValueError(f"optim_args={self.optim_args!r} for optim={optim!r}: {error}") from None
        for item in items:
            if built(",".join(other for other in items if other != item)) == full:
                raise ValueError(f"optim_args key {item.split('=')[0]!r} is not read by optim={optim!r}, which "
                                 "would drop it silently: check its spelling, or the optimizer's own arguments")

    def check_lr_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule={self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        check_step_decay(self.lr_decay_epochs, self.lr_decay_factor)
        if self.lr_schedule != "autowu":
            if self.autowu_args:
                raise ValueError("autowu_args is set but lr_schedule is not 'autowu'")
            return
        if self.lr_decay_epochs:
            raise ValueError("lr_decay_epochs decays lr_schedule='hf'; AutoWU decides its own decay: drop one")
        config = self.autowu_config()  # parse now: a bad key fails before any work
        if self.learning_rate <= config.min_lr:
            raise ValueError(f"AutoWU warms up from min_lr={config.min_lr} to learning_rate={self.learning_rate}: "
                             "the learning rate (AutoWU's max_lr; the spec's default is 1.0) must be larger than "
                             "min_lr")

    def check_adversarial(self) -> None:
        if self.adversarial not in ADVERSARIAL_MODES:
            raise ValueError(f"unknown adversarial={self.adversarial!r}; choose one of {', '.join(ADVERSARIAL_MODES)}")
        if self.adversarial == "none":
            if self.adversarial_args:
                raise ValueError("adversarial_args is set but adversarial is 'none'")
            return
        self.conadv_config()  # parse now: a bad key or a missing epsilon fails before any work

    def check_extrapolation(self) -> None:
        if self.extrapolation not in EXTRAPOLATIONS:
            raise ValueError(f"unknown extrapolation={self.extrapolation!r}; choose one of "
                             f"{', '.join(EXTRAPOLATIONS)}")
        require_positive_finite(self.extrapolation_ratio, "extrapolation_ratio")

    def check_adaptive_batch(self) -> None:
        if self.adaptive_batch not in ADAPTIVE_TESTS:
            raise ValueError(f"unknown adaptive_batch={self.adaptive_batch!r}; choose one of "
                             f"{', '.join(ADAPTIVE_TESTS)}")
        if self.local_sgd_steps < 0:
            raise ValueError(f"local_sgd_steps must be >= 0, got {self.local_sgd_steps}")
        if self.noise_probe_steps < 0:
            raise ValueError(f"noise_probe_steps must be >= 0 (0: no probe), got {self.noise_probe_steps}")
        if self.adaptive_batch == "none":
            if self.adaptive_batch_args:
                raise ValueError("adaptive_batch_args is set but adaptive_batch is 'none'")
        else:
            self.adaptive_batch_config()  # parse now: a bad key or a missing max_batch_size fails before any work

    def build_algorithms(self, present=()) -> list:
        """The algorithms these options ask for, less those of a kind already ``present`` (``callbacks=[...]``):
        ``algorithms.from_arguments``, called by ``LargeBatchTrainer``."""
        return from_arguments(self, present)

    def adaptive_batch_config(self) -> AdaptiveBatchConfig:
        return AdaptiveBatchConfig.from_string(self.adaptive_batch_args)

    def conadv_config(self, **extra) -> ConAdvConfig:
        """The attack of ``adversarial_args``; ``extra`` adds what the data knows (``image_mean``, ``image_std``)."""
        return ConAdvConfig.from_string(self.adversarial_args, **extra)

    def autowu_config(self) -> AutoWUConfig:
        return AutoWUConfig.from_string(self.autowu_args)

"""``LargeBatchTrainer``: a drop-in ``transformers.Trainer`` that scales to large batches.

What it adds to ``Trainer`` (same constructor):

* **split-invariant gradients** (``loss.py``): the same global batch gives the same update however it is split
  over gradient-accumulation steps and ranks;
* **one scheduler that owns the LR** (``scaling.py``): the scaling rule's peak LR and warm-up, followed by any HF
  ``lr_scheduler_type`` decay, in a single HF ``LambdaLR`` that HF and DeepSpeed step once per optimizer step;
* **the events of** ``Algorithm`` (``algorithm.py``) and their checkpoint state;
* **honest logs**: ``learning_rate`` is the LR the optimizer applied in the step (read inside ``optimizer.step``),
  plus ``scale`` (S = B / B0) and every algorithm's metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import partial

import torch
from transformers import Trainer
from transformers.optimization import get_scheduler

from . import backends
from . import loss as loss_rules
from ..algorithms.adascale import AdaScale, innermost_optimizer
from .events import EVENTS, Algorithm
from .composition import RunPlan, check_composition
from ..algorithms.autowu import AutoWU
from ..algorithms.adaptive_batch import EXAMPLE_TESTS, AdaptiveBatch, LocalSGD, per_example_gradients
from ..algorithms.conadv import ConAdv, micro_batch_seed
from ..algorithms.extrapolation import Extrapolation, local_gradient, noise_seed
from ..optim.lars_lamb_adamp import LARGE_BATCH_OPTIMIZERS, optimizer_cls_and_kwargs
from .option_strings import option_name
from .lr_scaling import batch_scale, legw_warmup_steps, peak_lr_multiplier, steps_per_epoch
from .statistics import reduced_sq_norm

ALGORITHM_STATE_FILE = "hf_largebatch_algorithms_rank{rank}.pt"

_DEFAULTS = {"lr_scaling": "none", "base_batch_size": None, "legw_base_warmup_epochs": 0.0,
             "loss_normalization": "auto", "lr_schedule": "hf", "autowu_args": None,
             "adversarial": "none", "extrapolation": "none", "adaptive_batch": "none", "local_sgd_steps": 0}


class _StepBatches(list):
    """The micro-batches of one optimizer step, handed to ``training_step`` as one input (adaptive batch sizes:
    the HF loop then runs with an accumulation of 1 and the step's accumulation is ours to choose)."""


def _num_examples(batch) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


class LargeBatchTrainer(Trainer):
    """``Trainer`` with large-batch LR scaling, split-invariant gradients and algorithm events.

    Accepts plain ``TrainingArguments`` too (then: no LR scaling, ``loss_normalization="auto"``).
    Algorithms are ``Algorithm`` callbacks passed through ``callbacks=[...]`` or ``add_callback``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # We weight micro-batches ourselves (loss.py); never let the model normalise by num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        backends.check_world_size(self.args.world_size)
        self.global_batch_size = (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        )
        base = self._option("base_batch_size")
        self.scale = 1.0 if base is None else batch_scale(self.global_batch_size, base)
        self._shifts_labels = loss_rules.shifts_labels(self.accelerator.unwrap_model(self.model))
        self._micro_step = 0
        self._micro_weight = 1.0
        self._step_loss_sum = None
        self._step_examples = 0
        self._applied_lrs: list[float] = []
        self._reduced_fired = False
        self._lr_applied_fired = False
        self._grad_hook_handles: list = []
        self._unscaled_group_lrs: list | None = None
        self._muted_hooks = False
        if self._option("lr_scaling") == "adascale" and self._adascale() is None:
            self.add_callback(AdaScale())
        if self._option("lr_schedule") == "autowu" and self._autowu() is None:
            self.add_callback(AutoWU(self.args.autowu_config()))
        if self._option("adversarial") != "none" and self._conadv() is None:
            config = self.args.conadv_config()
            if config.pixel_epsilon is not None and config.image_std is None:
                raise ValueError("adversarial_args gives pixel_epsilon, which needs the images' per-channel std: pass "
                                 "callbacks=[ConAdv(args.conadv_config(image_mean=..., image_std=...), "
                                 "args.adversarial)] (the image recipe does), or give epsilon in input units")
            self.add_callback(ConAdv(config, self.args.adversarial))
        if self._option("extrapolation") != "none" and self._extrapolation() is None:
            self.add_callback(Extrapolation(self.args.extrapolation, self.args.extrapolation_ratio))
        if self._option("adaptive_batch") != "none" and self._find(AdaptiveBatch) is None:
            self.add_callback(AdaptiveBatch(self.args.adaptive_batch, self.args.adaptive_batch_config(),
                                            self._option("lr_scaling"), base, self._option("local_sgd_steps")))
        if self._option("local_sgd_steps") and self._find(LocalSGD) is None:
            self.add_callback(LocalSGD(self.args.local_sgd_steps))
        self._test_inputs = None
        self._index_listeners()

    # ------------------------------------------------------------------ options and algorithms
    def _option(self, name):
        return getattr(self.args, name, _DEFAULTS[name])

    @property
    def algorithms(self) -> list[Algorithm]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, Algorithm)]

    def _index_listeners(self) -> None:
        """Which algorithms override which extra event (and the ConAdv / EXTRAP-SGD algorithms the step drives),
        looked up once per ``train()``, not per micro-batch or gradient hook."""
        self._listeners = {event: [alg for alg in self.algorithms if alg.overrides(event)] for event in EVENTS}
        self._adversary, self._extrapolator = self._conadv(), self._extrapolation()
        self._adaptive, self._local_sgd = self._find(AdaptiveBatch), self._find(LocalSGD)

    def _fire(self, event: str, **kwargs) -> None:
        for alg in self._listeners[event]:
            getattr(alg, event)(self.args, self.state, self.control, **kwargs)

    def _wanted(self, event: str) -> bool:
        return bool(self._listeners[event])

    def _find(self, kind: type) -> Algorithm | None:
        return next((alg for alg in self.algorithms if isinstance(alg, kind)), None)

    def _adascale(self) -> AdaScale | None:
        return self._find(AdaScale)

    def _autowu(self) -> AutoWU | None:
        return self._find(AutoWU)

    def _conadv(self) -> ConAdv | None:
        return self._find(ConAdv)

    def _extrapolation(self) -> Extrapolation | None:
        return self._find(Extrapolation)

    # ------------------------------------------------------------------ optimizer and LR ownership
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        inner = innermost_optimizer(optimizer)  # on a second train() it is in Accelerate's wrapper (no step hooks)
        if not getattr(inner, "_hf_largebatch_hooked", False):
            inner.register_step_pre_hook(self._before_optimizer_step)
            inner.register_step_post_hook(self._after_optimizer_step)
            inner._hf_largebatch_hooked = True
        return optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """HF's optimizers, plus ``optim`` = ``lars`` | ``lamb`` | ``adamp`` (``optimizers.py``)."""
        name = option_name(args.optim)
        if name in LARGE_BATCH_OPTIMIZERS:
            return optimizer_cls_and_kwargs(name, args.learning_rate, args.weight_decay, args.adam_beta1,
                                            args.adam_beta2, args.adam_epsilon, args.optim_args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def lr_plan(self, num_training_steps: int) -> tuple[float, int]:
        """(peak-LR multiplier, warm-up steps) of the configured scaling rule at this run's scale."""
        rule = self._option("lr_scaling")
        multiplier = peak_lr_multiplier(rule, self.scale)
        if rule == "legw":
            warmup = legw_warmup_steps(self.scale, self._option("legw_base_warmup_epochs"),
                                       self._update_steps_per_epoch())
        else:
            warmup = self.args.get_warmup_steps(num_training_steps)
        return multiplier, warmup

    def _update_steps_per_epoch(self) -> int:
        micro_batches = len(self.get_train_dataloader())
        adaptive = self._adaptive
        ga = adaptive.initial_accumulation if adaptive is not None else self.args.gradient_accumulation_steps
        return steps_per_epoch(micro_batches, ga)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            if self._option("lr_scaling") != "none" and not self._created_lr_scheduler:
                raise ValueError("lr_scaling needs LargeBatchTrainer to build the LR scheduler: do not pass a "
                                 "scheduler in `optimizers=(optimizer, scheduler)`; use lr_scheduler_type instead")
            return self.lr_scheduler
        optimizer = optimizer if optimizer is not None else self.optimizer
        adaptive = self._adaptive
        if adaptive is not None:  # the schedule counts samples, in steps of the initial batch
            num_training_steps = math.ceil(adaptive.budget_micro_batches / adaptive.initial_accumulation)
        multiplier, warmup = self.lr_plan(num_training_steps)
        # The scheduler's base LR is the scaled peak: warm-up and decay then act on it, in one LambdaLR. The
        # unscaled LR is kept in the group so that a second train() does not scale twice.
        for group in optimizer.param_groups:
            base_lr = group.setdefault("unscaled_lr", group["lr"])
            group["lr"] = group["initial_lr"] = base_lr * multiplier
        autowu = self._autowu()
        if autowu is not None:  # AutoWU decides the LR as it goes; the groups' base LR is its max_lr
            autowu.build(self.args.learning_rate, num_training_steps, self._update_steps_per_epoch())
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, autowu.multiplier)
        else:
            schedule = option_name(self.args.lr_scheduler_type)
            if schedule == "constant" and warmup > 0:  # HF's "constant" ignores the warm-up silently
                schedule = "constant_with_warmup"
            self.lr_scheduler = get_scheduler(
                schedule,
                optimizer=optimizer,
                num_warmup_steps=warmup,
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        adascale = self._adascale()
        if adascale is not None:  # AdaScale: the schedule runs on progress tau (base-batch steps), not on steps
            self._run_schedule_on(lambda: int(adascale.progress), "lr_scaling='adascale' needs a schedule of progress")
        if adaptive is not None:
            self._run_schedule_on(lambda: adaptive.schedule_step, "adaptive_batch needs a schedule of samples")
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _run_schedule_on(self, clock, requirement: str) -> None:
        """Evaluate the scheduler's LR lambdas at ``clock()`` instead of at the optimizer step count."""
        if not hasattr(self.lr_scheduler, "lr_lambdas"):
            raise ValueError(f"{requirement}; lr_scheduler_type={self.args.lr_scheduler_type!r} is not a LambdaLR "
                             "schedule (use constant, linear, cosine, polynomial, ... with warm-up)")
        self.lr_scheduler.lr_lambdas = [(lambda _step, f=f: f(clock())) for f in self.lr_scheduler.lr_lambdas]

    def _before_optimizer_step(self, optimizer, args, kwargs):
        # Under DeepSpeed ZeRO this runs once per param group (the engine steps groups one by one).
        if self._extrapolator is not None:  # back from x~ to x before the update (idempotent)
            self._extrapolator.finish()
        if not self._reduced_fired and self._wanted("on_reduced_gradients"):
            self._fire_reduced_gradients(self.model)
        factor = 1.0
        for alg in self._listeners["lr_factor"]:
            factor *= alg.lr_factor()
        if factor != 1.0:
            self._unscaled_group_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor
        self._applied_lrs.extend(group["lr"] for group in optimizer.param_groups)

    def _after_optimizer_step(self, optimizer, args, kwargs):
        if not self._lr_applied_fired:  # under ZeRO the engine steps group by group: report group 0's LR once
            self._lr_applied_fired = True
            self._fire("on_lr_applied", learning_rate=self._applied_lrs[0])
        if self._unscaled_group_lrs is not None:  # the scheduler keeps owning the base LR
            for group, lr in zip(optimizer.param_groups, self._unscaled_group_lrs):
                group["lr"] = lr
            self._unscaled_group_lrs = None

    def _get_learning_rate(self) -> float:
        if self._applied_lrs:
            return self._applied_lrs[0]
        return super()._get_learning_rate()

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        # ``dataloader_drop_last`` keeps the training global batch constant (which LR scaling assumes); HF applies
        # it to evaluation and prediction too, where it would silently leave sentences out of the corpus metric.
        drop_last = self.args.dataloader_drop_last
        if not is_training:
            self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn=sampler_fn,
                                           is_training=is_training, dataloader_key=dataloader_key)
        finally:
            self.args.dataloader_drop_last = drop_last

    # ------------------------------------------------------------------ split-invariant loss
    def _loss_mode(self, labels) -> str:
        return loss_rules.resolve(self._option("loss_normalization"), labels)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        adaptive = self._adaptive
        if adaptive is not None:  # the step's accumulation is the adaptive batch's (HF's loop runs with 1)
            num_batches = adaptive.micro_batches_for_next_step()
        batch_samples, num_items = self._step_micro_batches(epoch_iterator, num_batches, device)
        if adaptive is not None and batch_samples:
            adaptive.consumed(len(batch_samples), sum(_num_examples(b) for b in batch_samples))
            batch_samples = [_StepBatches(batch_samples)]
        return batch_samples, num_items

    def _step_micro_batches(self, epoch_iterator, num_batches, device):
        """HF's micro-batches of one step, with the global count of label tokens under the token rule."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.compute_loss_func is not None or not batch_samples:
            return batch_samples, num_items
        if self._loss_mode(batch_samples[0].get("labels")) != "tokens":
            return batch_samples, None
        count = sum(loss_rules.count_label_tokens(b["labels"], self._shifts_labels) for b in batch_samples)
        count = backends.all_reduce_sum(torch.as_tensor(count, device=device))
        return batch_samples, count

    def _run_epoch(self, **kwargs):
        if self._adaptive is not None:  # where the sampler stands: HF skipped this many micro-batches on resume
            resumed = kwargs["epoch"] == kwargs["epochs_trained"] and kwargs["resume_from_checkpoint"] is not None
            self._adaptive.begin_epoch(kwargs["epoch"], kwargs["steps_in_epoch"],
                                       kwargs["steps_trained_in_current_epoch"] if resumed else 0)
        return super()._run_epoch(**kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        if self._adaptive is None or resume_from_checkpoint is None or self.state.global_step == 0:
            return epochs, steps
        # HF counts the position in steps x a fixed accumulation; ours is the sampler position itself
        self._load_algorithm_states(resume_from_checkpoint)
        epoch, position = self._adaptive.epoch, self._adaptive.position
        if position >= num_update_steps_per_epoch:  # saved at the very end of an epoch
            epoch, position = epoch + 1, 0
        return epoch, (0 if self.args.ignore_data_skip else position)

    def floating_point_ops(self, inputs):
        if isinstance(inputs, _StepBatches):
            return sum(super(LargeBatchTrainer, self).floating_point_ops(batch) or 0 for batch in inputs)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs):
        for batch in inputs if isinstance(inputs, _StepBatches) else [inputs]:
            super()._track_num_input_tokens(batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._adversary is None:
            return self._training_loss(model, inputs, return_outputs, num_items_in_batch)
        # ConAdv: the loss of [clean; adversarial], with the clean batch's normalisation (mean of the two halves)
        batch, perturbing = self._adversary.training_batch(
            self.accelerator.unwrap_model(model), inputs,
            seed=micro_batch_seed(self.args.seed, self.state.global_step, self._micro_step, self.args.process_index),
            last_micro_batch=self._micro_step == self.current_gradient_accumulation_steps - 1,
            shift_labels=self._shifts_labels)
        with perturbing:
            return self._training_loss(model, batch, return_outputs, num_items_in_batch, copies=2)

    def _training_loss(self, model, inputs, return_outputs, num_items_in_batch, copies: int = 1):
        """The split-invariant training loss (loss.py); ``copies``: the batch holds each example that many times
        (ConAdv), which the token rule divides out (a per-micro-batch mean already averages them)."""
        labels = inputs.get("labels")
        if self._loss_mode(labels) == "mean":
            # A per-micro-batch mean: the Trainer divides it by the micro-batches of this step; DDP averages ranks.
            self.loss_is_scaled_for_ga = False
            self._micro_weight = 1.0 / self.current_gradient_accumulation_steps * self._hook_loss_scale()
            return super().compute_loss(model, inputs, return_outputs)
        if num_items_in_batch is None:
            raise ValueError("loss_normalization='tokens' needs integer per-token `labels` in every batch")
        summed, outputs = self._summed_token_loss(model, inputs)
        world = self.args.world_size
        # Sum over this micro-batch / tokens of the whole global batch; x world undoes the ranks' averaging.
        loss = summed * world / (num_items_in_batch * copies)
        self.loss_is_scaled_for_ga = True
        if self._wanted("on_local_gradient"):
            tokens = loss_rules.count_label_tokens(labels, self._shifts_labels)
            self._micro_weight = float(world * tokens / (num_items_in_batch * copies)) * self._hook_loss_scale()
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ per-micro-batch and per-step events
    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(inputs, _StepBatches):
            return self._accumulated_step(model, inputs, num_items_in_batch)
        with self._local_sgd_context(model):
            return self._micro_batch_step(model, inputs, num_items_in_batch)

    def _local_sgd_context(self, model):
        """Local SGD: no gradient all-reduce in any backward (the parameters are averaged every H steps)."""
        return self.accelerator.no_sync(model) if self._local_sgd is not None else contextlib.nullcontext()

    def _accumulated_step(self, model, micro_batches, num_items_in_batch):
        """One optimizer step's micro-batches (adaptive batch sizes): all but the last without gradient sync."""
        self.current_gradient_accumulation_steps = len(micro_batches)
        total = None
        for i, inputs in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self.accelerator.gradient_state._set_sync_gradients(last)
            context = self._local_sgd_context(model) if last else self.accelerator.no_sync(model)
            with context:
                loss = self._micro_batch_step(model, inputs, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _micro_batch_step(self, model, inputs, num_items_in_batch):
        if self._micro_step == 0:
            self._applied_lrs = []
            self._reduced_fired = False
            self._lr_applied_fired = False
            self._step_loss_sum = None
            self._step_examples = 0
            if self._extrapolator is not None:
                model.train()  # the direction in training mode (HF's training_step sets it only after this)
                self._extrapolate(model, inputs)
            if self._adaptive is not None and self._adaptive.test in EXAMPLE_TESTS:
                self._test_inputs = inputs  # the per-example test statistics are taken on its first examples
        self._step_examples += _num_examples(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss_sum = loss if self._step_loss_sum is None else self._step_loss_sum + loss
        last = self.accelerator.sync_gradients
        self._fire("on_micro_batch_end", micro_step=self._micro_step,
                   num_micro_batches=self.current_gradient_accumulation_steps, loss=loss)
        self._micro_step += 1
        if last:
            self._micro_step = 0
            if self._wanted("on_reduced_gradients") and not self.is_deepspeed_enabled:
                self._fire_reduced_gradients(model)
            if self._wanted("on_step_loss"):
                total = backends.all_reduce_sum(self._step_loss_sum.detach().float().clone())
                self._fire("on_step_loss", loss=total.item() / self.args.world_size)
        return loss

    def _extrapolate(self, model, inputs) -> None:
        """EXTRAP-SGD: move the weights to x~ before the step's micro-batches (extrapolation.py)."""
        unwrapped = self.accelerator.unwrap_model(model)
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        seed = noise_seed(self.args.seed, self.state.global_step, self.args.process_index)
        direction = self._extrapolator.direction(params, lambda: self._local_gradient(unwrapped, inputs, params), seed)
        self._extrapolator.begin(params, self.lr_scheduler.get_last_lr()[0], direction)

    def _local_gradient(self, model, inputs, params) -> list[torch.Tensor]:
        """This rank's gradient of its micro-batch's mean loss (extrapolation.local_gradient: no collective)."""
        inputs = self._prepare_inputs(inputs)
        self._muted_hooks = True  # algorithms' on_local_gradient must not see this pass
        try:
            with self.compute_loss_context_manager():
                return local_gradient(model, params, lambda: self._mean_loss(model, inputs))
        finally:
            self._muted_hooks = False

    def _mean_loss(self, model, inputs) -> torch.Tensor:
        """The micro-batch's own mean loss: per example, or per label token under the token rule; the training
        objective itself (HF's loss, with its ``label_smoothing_factor``)."""
        labels = inputs.get("labels")
        if self._loss_mode(labels) != "tokens":
            return Trainer.compute_loss(self, model, dict(inputs))
        summed, _ = self._summed_token_loss(model, inputs)
        return summed / loss_rules.count_label_tokens(labels, self._shifts_labels).clamp(min=1)

    def _summed_token_loss(self, model, inputs):
        """(sum of the micro-batch's token cross-entropies, the model's outputs)."""
        # A decoder-only LM needs its labels only for its own loss, which we recompute: do not compute it twice.
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"} if self._shifts_labels else inputs
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0 if model_inputs is not inputs else 1]
        summed = loss_rules.summed_token_cross_entropy(logits, inputs["labels"], self._shifts_labels,
                                                       self.args.label_smoothing_factor)
        return summed, outputs

    def _fire_reduced_gradients(self, model) -> None:
        self._reduced_fired = True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        loss_scale = self._loss_scale()
        if grads:
            sq = reduced_sq_norm(grads, loss_scale)
        else:  # DeepSpeed ZeRO: gradients live in the engine's partitions, the engine has the global norm
            norm = getattr(getattr(self.model_wrapped, "optimizer", None), "_global_grad_norm", None)
            if norm is None:
                raise RuntimeError("reduced gradients are not readable under this backend")
            sq = torch.as_tensor(float(norm), dtype=torch.float32) ** 2
        extra = {}
        if self._test_inputs is not None:
            extra["example_gradients"] = partial(self._example_gradients, self._test_inputs, loss_scale)
        self._fire("on_reduced_gradients", model=self.model, grad_sq_norm=sq,
                   num_micro_batches=self.current_gradient_accumulation_steps, num_examples=self._step_examples,
                   loss_scale=loss_scale, **extra)
        self._test_inputs = None

    def _example_gradients(self, inputs, loss_scale, count):
        """(this step's gradient ``.grad``, an iterator over the gradients of the first ``count`` examples of
        ``inputs`` at the current weights: ``batching.per_example_gradients``, hooks muted).

        Per-example losses are the micro-batch's loss rule taken per example: cross-entropy over classes
        (``mean`` rule, integer class labels) or the example's mean token cross-entropy (``tokens`` rule)."""
        model = self.accelerator.unwrap_model(self.model)
        params = [p for p in model.parameters() if p.requires_grad]
        reduced = [torch.zeros_like(p) if p.grad is None else p.grad / loss_scale for p in params]
        size = _num_examples(inputs)
        count = min(count, size)
        inputs = self._prepare_inputs({k: v[:count] if isinstance(v, torch.Tensor) and v.dim() > 0
                                       and v.shape[0] == size else v for k, v in inputs.items()})
        labels = inputs["labels"]
        tokens = self._loss_mode(labels) == "tokens"
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"} if tokens and self._shifts_labels else inputs

        def forward():
            self._muted_hooks = True
            try:
                with self.compute_loss_context_manager():
                    return model(**model_inputs)
            finally:
                self._muted_hooks = False

        def example_losses(outputs):
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0 if model_inputs is not inputs else 1]
            smoothing = self.args.label_smoothing_factor
            if tokens:
                return [loss_rules.summed_token_cross_entropy(logits[i:i + 1], labels[i:i + 1], self._shifts_labels,
                                                              smoothing)
                        / loss_rules.count_label_tokens(labels[i:i + 1], self._shifts_labels).clamp(min=1)
                        for i in range(count)]
            if logits.dim() != 2 or labels.dim() != 1 or labels.is_floating_point():
                raise ValueError(f"adaptive_batch={self._adaptive.test!r} takes per-example losses as cross-entropy "
                                 "over classes or tokens; this model's labels/logits are neither (use "
                                 "adaptive_batch='norm', which needs no per-example gradients)")
            losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none",
                                                       label_smoothing=smoothing)
            return list(losses)

        return reduced, per_example_gradients(model, params, forward, example_losses)

    def _hook_loss_scale(self) -> float:
        """The loss scale the hook gradients of this micro-batch carry, read once per micro-batch (a host sync on
        GPU) and only when some algorithm listens to local gradients."""
        return self._loss_scale() if self._wanted("on_local_gradient") else 1.0

    def _loss_scale(self) -> float:
        """The fp16 loss scale that hook and ``.grad`` values carry (1 without one): DeepSpeed's own loss scaler
        under DeepSpeed, Accelerate's GradScaler otherwise."""
        if self.is_deepspeed_enabled:
            return backends.deepspeed_loss_scale(self.model_wrapped)
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def train(self, *args, **kwargs):
        self._micro_step = 0
        self._index_listeners()  # callbacks may have been added since __init__
        check_composition(self.algorithms, self.run_plan())
        if self._option("lr_scaling") == "adascale":
            # The budget is the base run's: T_base optimizer steps at B0 (an upper bound, since the gain r >= 1).
            if self.args.max_steps <= 0:
                self.args.max_steps = math.ceil(self.args.num_train_epochs * self._update_steps_per_epoch()
                                                * self.scale)
        restore_args = self._start_adaptive_batch() if self._adaptive is not None else {}
        if self._wanted("on_local_gradient"):
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    self._grad_hook_handles.append(param.register_hook(self._local_gradient_hook(name, param)))
        try:
            return super().train(*args, **kwargs)
        finally:
            for handle in self._grad_hook_handles:
                handle.remove()
            self._grad_hook_handles = []
            for name, value in restore_args.items():
                setattr(self.args, name, value)

    def run_plan(self) -> RunPlan:
        """What the algorithms' checks may ask about this run (``composition.py``), from the arguments as the user
        gave them (before an adaptive batch takes the accumulation over)."""
        args = self.args
        ds_config = backends.load_deepspeed_config(getattr(args, "deepspeed", None))
        if self.optimizer is not None:
            optimizer_cls = type(innermost_optimizer(self.optimizer))
        else:
            try:
                optimizer_cls = self.get_optimizer_cls_and_kwargs(args, self.model)[0]
            except (ImportError, ValueError):  # e.g. an 8-bit optimizer whose package is missing: fails later
                optimizer_cls = None
        return RunPlan(
            world_size=args.world_size, accumulation=args.gradient_accumulation_steps,
            per_device_batch_size=args.per_device_train_batch_size, base_batch_size=self._option("base_batch_size"),
            backend="deepspeed" if ds_config else ("ddp" if args.world_size > 1 else "single"),
            zero_stage=backends.zero_stage(ds_config),
            optimizer_cls=optimizer_cls, lr_scaling=self._option("lr_scaling"),
            lr_schedule=self._option("lr_schedule"),
            warmup=bool(args.warmup_steps or getattr(args, "warmup_ratio", 0)),
            custom_loss=self.compute_loss_func is not None,
            user_scheduler=self.lr_scheduler is not None and not getattr(self, "_created_lr_scheduler", False),
            algorithms=tuple(alg.name for alg in self.algorithms), args=args)

    def _start_adaptive_batch(self) -> dict:
        """Hand the accumulation to the adaptive batch: HF's loop runs with 1 (one ``_StepBatches`` per step) and
        ``max_steps`` counts micro-batches, the budget (``max_steps`` or ``num_train_epochs`` at the initial batch).
        Returns the arguments to put back after ``train()``."""
        args = self.args
        saved = {"gradient_accumulation_steps": args.gradient_accumulation_steps, "max_steps": args.max_steps}
        accumulation = args.gradient_accumulation_steps
        if args.max_steps > 0:
            budget = args.max_steps * accumulation
        else:
            budget = math.ceil(args.num_train_epochs * len(self.get_train_dataloader()))
        self._adaptive.start(accumulation, args.per_device_train_batch_size, args.world_size, budget)
        args.gradient_accumulation_steps = 1
        if args.max_steps > 0:
            args.max_steps = budget
        return saved

    def _local_gradient_hook(self, name, param):
        """The tensor hook of one parameter: hands its local micro-batch gradient to the listening algorithms.
        It runs once per parameter per micro-batch, so the listeners' bound methods are looked up here, once."""
        listeners = [alg.on_local_gradient for alg in self._listeners["on_local_gradient"]]

        def hook(grad):
            if not self._muted_hooks:
                for listener in listeners:
                    listener(self.args, self.state, self.control, name=name, param=param, grad=grad,
                             weight=self._micro_weight)

        return hook

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs:
            adaptive = self._adaptive
            logs["scale"] = self.scale if adaptive is None else adaptive.batch_size / adaptive.base_batch_size
            for alg in self.algorithms:
                logs.update(alg.log_metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoint state
    def _algorithm_state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, ALGORITHM_STATE_FILE.format(rank=self.args.process_index))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        algorithms = self.algorithms
        if algorithms:
            os.makedirs(output_dir, exist_ok=True)
            torch.save({alg.name: alg.state_dict() for alg in algorithms}, self._algorithm_state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_algorithm_states(checkpoint)

    def _load_algorithm_states(self, checkpoint: str) -> None:
        algorithms = self.algorithms
        if not algorithms:
            return
        path = self._algorithm_state_path(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint holds no state for the algorithms "
                                    f"{[a.name for a in algorithms]}, so resuming would restart them")
        states = torch.load(path, weights_only=True)
        for alg in algorithms:
            if alg.name not in states:
                raise KeyError(f"checkpoint {checkpoint} has no state for algorithm {alg.name!r} "
                               f"(it has {sorted(states)})")
            alg.load_state_dict(states[alg.name])


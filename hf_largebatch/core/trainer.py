"""``LargeBatchTrainer``: a drop-in ``transformers.Trainer`` that scales to large batches.

The trainer is step plumbing and event firing; it knows no algorithm by name. What it adds to ``Trainer`` (same
constructor):

* **split-invariant gradients** (``loss.py``): the same global batch gives the same update however it is split
  over gradient-accumulation steps and ranks;
* **one scheduler that owns the LR** (``lr_scaling.py``): the scaling rule's peak LR and warm-up, followed by any HF
  ``lr_scheduler_type`` decay, in a single HF ``LambdaLR`` that HF and DeepSpeed step once per optimizer step, on
  the clock an algorithm may own (``Algorithm.schedule_clock``);
* **the events of** ``Algorithm`` (``events.py``, whose docstring shows where each fires in the loop), the step's
  state in a ``StepContext`` (``step.py``), one gradient-statistics estimator for all its consumers
  (``statistics.py``), one composition check at ``train()`` (``composition.py``) and every algorithm's checkpoint
  state;
* **honest logs**: ``learning_rate`` is the LR the optimizer applied in the step (read inside ``optimizer.step``),
  plus ``scale`` (S = B / B0), ``examples_seen`` (examples read, counted: each epoch's short last step reads
  fewer than a global batch) and every algorithm's metrics.

Algorithms come from the options (``LargeBatchArguments.build_algorithms``) or from ``callbacks=[...]``.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.utils import logging
from transformers.optimization import get_scheduler

from . import backends
from . import loss as loss_rules
from ..optim.lars_lamb_adamp import LARGE_BATCH_OPTIMIZERS, optimizer_cls_and_kwargs
from .backends import innermost_optimizer
from .carried_state import check_stream_order
from .checkpoints import checkpoint_problem, newest_complete_checkpoint
from .composition import RunPlan, check_composition
from .events import EVENTS, OWNED_EVENTS, Algorithm
from .nonfinite import NonFiniteGuard
from .progress import ClockProgressCallback
from .run_summary import follow_process_log_level, format_summary, warmup_warning
from .lr_scaling import (batch_scale, decay_milestones, legw_warmup_steps, peak_lr_multiplier, step_decay,
                         steps_per_epoch)
from .option_strings import option_name
from .local_gradients import local_gradient, per_example_gradients
from .statistics import GradientStatistics, reduced_sq_norm
from .step import RunSetup, StepContext

ALGORITHM_STATE_FILE = "hf_largebatch_algorithms_rank{rank}.pt"
RUN_RECORD = "__run__"  # the key of the run's batch, world size and S in every rank's algorithm-state file
NONFINITE_RECORD = "__nonfinite__"  # the key of the non-finite steps' count, in the same file
CARRIED_RECORD = "__carried_state__"  # a recurrent model's per-stream state (carried_state.py), per rank
SUMMARY_RECORD = "__run_summary__"  # the start-up summary (run_summary.py), for reports (run_report.py)
EXAMPLES_RECORD = "__examples_seen__"  # the examples read by all ranks so far
logger = logging.get_logger(__name__)

#: the options the trainer itself reads, with their values under plain ``TrainingArguments``
_DEFAULTS = {"lr_scaling": "none", "base_batch_size": None, "legw_base_warmup_epochs": 0.0,
             "loss_normalization": "auto", "lr_schedule": "hf", "on_nonfinite_step": "skip",
             "lr_decay_epochs": None, "lr_decay_factor": 0.1}


class _StepBatches(list):
    """The micro-batches of one optimizer step, handed to ``training_step`` as one input (when an algorithm owns
    ``micro_batches_for_step``: the HF loop then runs with an accumulation of 1 and the step's is the algorithm's)."""


def _num_examples(batch) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


class LargeBatchTrainer(Trainer):
    """``Trainer`` with large-batch LR scaling, split-invariant gradients and algorithm events.

    Accepts plain ``TrainingArguments`` too (then: no LR scaling, ``loss_normalization="auto"``).
    Algorithms are ``Algorithm`` callbacks passed through ``callbacks=[...]`` or ``add_callback``, or built from
    ``LargeBatchArguments`` options.
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
        self.step_context = StepContext(shifts_labels=self._shifts_labels)
        self._run: RunSetup | None = None
        self._statistics: GradientStatistics | None = None
        self._grad_hook_handles: list = []
        self._muted_hooks = False
        self._nonfinite = NonFiniteGuard(self._option("on_nonfinite_step"))
        self._schedule_clock = None  # the clock the LR schedule runs on, when an algorithm owns it
        self.run_summary: dict = {}  # what the library decided (run_summary.py), once the schedule is built
        self.examples_seen = 0  # by all ranks, counted per step (steps x global batch overcounts short steps)
        build = getattr(self.args, "build_algorithms", None)
        if build is not None:  # the algorithms the options ask for and callbacks=[...] did not bring
            for algorithm in build(present=self.algorithms):
                self.add_callback(algorithm)
        self._index_listeners()

    # ------------------------------------------------------------------ options and algorithms
    def _option(self, name):
        return getattr(self.args, name, _DEFAULTS[name])

    @property
    def algorithms(self) -> list[Algorithm]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, Algorithm)]

    def algorithm(self, name: str) -> Algorithm | None:
        """The run's algorithm called ``name`` (its ``Algorithm.name``), or None."""
        return next((alg for alg in self.algorithms if alg.name == name), None)

    def _index_listeners(self) -> None:
        """Which algorithms answer which extra event, looked up once per ``train()``, not per micro-batch or
        gradient hook; the owner of each owned event (``check_composition`` refuses two)."""
        algorithms = self.algorithms
        self._listeners = {event: [alg for alg in algorithms if alg.overrides(event)] for event in EVENTS}
        self._owner = {event: next(iter(self._listeners[event]), None) for event in OWNED_EVENTS}
        self._statistics_consumers = [alg for alg in algorithms if alg.needs_gradient_statistics]
        self._needs_example_gradients = any(alg.needs_example_gradients for alg in algorithms)
        self._gradients_stay_local = any(alg.keeps_gradients_local for alg in algorithms)
        self._hooks_wanted = bool(self._statistics_consumers) or bool(self._listeners["on_local_gradient"])

    def _fire(self, event: str, **kwargs) -> None:
        for alg in self._listeners[event]:
            getattr(alg, event)(self.args, self.state, self.control, **kwargs)

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
        """HF's optimizers, plus ``optim`` = ``lars`` | ``lamb`` | ``adamp`` (``optim/lars_lamb_adamp.py``)."""
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
        """Optimizer steps per epoch at the accumulation the user configured (an algorithm may own it in train)."""
        return steps_per_epoch(len(self.get_train_dataloader()), self._configured_accumulation())

    def _configured_accumulation(self) -> int:
        """The user's gradient_accumulation_steps, also while an algorithm's ``on_setup`` overrides it."""
        return (self._run.configured("gradient_accumulation_steps") if self._run is not None
                else self.args.gradient_accumulation_steps)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            if self._option("lr_scaling") != "none" and not self._created_lr_scheduler:
                raise ValueError("lr_scaling needs LargeBatchTrainer to build the LR scheduler: do not pass a "
                                 "scheduler in `optimizers=(optimizer, scheduler)`; use lr_scheduler_type instead")
            return self.lr_scheduler
        optimizer = optimizer if optimizer is not None else self.optimizer
        clock_owner = self._owner["schedule_clock"]
        clock = clock_owner.schedule_clock(num_training_steps) if clock_owner is not None else None
        if clock is not None and clock.length is not None:
            num_training_steps = clock.length
        multiplier, warmup = self.lr_plan(num_training_steps)
        # The scheduler's base LR is the scaled peak: warm-up and decay then act on it, in one LambdaLR. The
        # unscaled LR is kept in the group so that a second train() does not scale twice.
        for group in optimizer.param_groups:
            base_lr = group.setdefault("unscaled_lr", group["lr"])
            group["lr"] = group["initial_lr"] = base_lr * multiplier
        shape_owner = self._owner["lr_lambda"]
        lr_lambda = (shape_owner.lr_lambda(self.args.learning_rate, num_training_steps,
                                           self._update_steps_per_epoch()) if shape_owner is not None else None)
        if lr_lambda is not None:  # the algorithm decides the LR as it goes; the groups' base LR is its max_lr
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
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
        if self._option("lr_decay_epochs"):
            self._decay_at_epochs(num_training_steps, clock)
        if clock is not None:
            self._run_schedule_on(clock.now, clock.requirement)
        self._created_lr_scheduler = True
        self._schedule_clock = clock
        self._say_what_was_decided(multiplier, warmup if lr_lambda is None else 0, num_training_steps, clock,
                                   shape_owner if lr_lambda is not None else None)
        return self.lr_scheduler

    def _say_what_was_decided(self, multiplier, warmup, length, clock, shape_owner) -> None:
        """The start-up summary (``run_summary.py``), logged once by the main process."""
        base = self._option("base_batch_size")
        self.run_summary = {
            "global batch B": self.global_batch_size,
            "split": f"{self.args.world_size} process(es) x {self._configured_accumulation()} micro-batch(es) x "
                     f"{self.args.per_device_train_batch_size} examples",
            "base batch B0": base if base is not None else "(not set: no scaling)",
            "scale S": self.scale,
            "rule": self._option("lr_scaling"),
            "peak_lr": self.args.learning_rate * multiplier,
            "schedule": (f"{shape_owner.name} (decides the LR as it goes)" if shape_owner is not None
                         else option_name(self.args.lr_scheduler_type) + self._decay_said()),
            "warmup": warmup,
            "clock": clock.unit if clock is not None else "optimizer steps",
            "schedule_length": length,
            "on_nonfinite_step": self._option("on_nonfinite_step"),
            "algorithms": {alg.name: alg.settings() for alg in self.algorithms},
        }
        if not self.is_world_process_zero():
            return
        follow_process_log_level(self.args.get_process_log_level())
        logger.info(format_summary(self.run_summary))
        warning = warmup_warning(self.run_summary)
        if warning:
            logger.warning(warning)

    def _decay_at_epochs(self, schedule_length: int, clock) -> None:
        """``lr_decay_epochs`` on top of the schedule (``lr_scaling.step_decay``), placed as fractions of the run as
        the user configured it (epochs, or max_steps at the configured batch; on another clock max_steps may count
        other steps, so there only epochs are taken)."""
        if not hasattr(self.lr_scheduler, "lr_lambdas"):
            raise ValueError(f"lr_decay_epochs needs a LambdaLR schedule; lr_scheduler_type="
                             f"{self.args.lr_scheduler_type!r} is not one")
        configured = self._run.configured if self._run is not None else partial(getattr, self.args)
        max_steps = configured("max_steps")
        if max_steps > 0 and clock is not None:
            raise ValueError(f"lr_decay_epochs with max_steps: the schedule runs on {clock.unit}, where max_steps "
                             "is not a count of epochs of this batch; give the budget as num_train_epochs")
        run_epochs = (max_steps / self._update_steps_per_epoch() if max_steps > 0
                      else configured("num_train_epochs"))
        milestones = decay_milestones(self._option("lr_decay_epochs"), run_epochs, schedule_length)
        factor = self._option("lr_decay_factor")
        self.lr_scheduler.lr_lambdas = [step_decay(f, milestones, factor) for f in self.lr_scheduler.lr_lambdas]

    def _decay_said(self) -> str:
        epochs = self._option("lr_decay_epochs")
        if not epochs:
            return ""
        return f", x{self._option('lr_decay_factor'):g} at epochs {', '.join(f'{e:g}' for e in epochs)}"

    def _run_schedule_on(self, clock, requirement: str) -> None:
        """Evaluate the scheduler's LR lambdas at ``clock()`` instead of at the optimizer step count."""
        if not hasattr(self.lr_scheduler, "lr_lambdas"):
            raise ValueError(f"{requirement}; lr_scheduler_type={self.args.lr_scheduler_type!r} is not a LambdaLR "
                             "schedule (use constant, linear, cosine, polynomial, ... with warm-up)")
        self.lr_scheduler.lr_lambdas = [(lambda _step, f=f: f(clock())) for f in self.lr_scheduler.lr_lambdas]

    def _before_optimizer_step(self, optimizer, args, kwargs):
        # Under DeepSpeed ZeRO this runs once per param group (the engine steps groups one by one).
        step = self.step_context
        if step.skip_update:  # a non-finite gradient (nonfinite.py): the optimizer finds no gradient to apply
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            return
        self._fire("on_before_update")
        if not step.reduced_fired and self._listeners["on_reduced_gradients"]:
            self._fire_reduced_gradients()
        factor = 1.0
        for alg in self._listeners["lr_factor"]:
            factor *= alg.lr_factor()
        if factor != 1.0:
            step.unscaled_group_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor
        step.applied_lrs.extend(group["lr"] for group in optimizer.param_groups)

    def _after_optimizer_step(self, optimizer, args, kwargs):
        step = self.step_context
        if step.skip_update:
            return
        if not step.lr_applied_fired:  # under ZeRO the engine steps group by group: report group 0's LR once
            step.lr_applied_fired = True
            self._fire("on_lr_applied", learning_rate=step.applied_lrs[0])
        if step.unscaled_group_lrs is not None:  # the scheduler keeps owning the base LR
            for group, lr in zip(optimizer.param_groups, step.unscaled_group_lrs):
                group["lr"] = lr
            step.unscaled_group_lrs = None

    def _get_grad_norm(self, model, grad_norm=None):
        """HF's norm of the step's gradient, computed every step: a non-finite one makes the step skipped or stopped
        (``nonfinite.py``), decided before ``optimizer.step()`` except under DeepSpeed, whose engine has stepped."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        deepspeed = self.is_deepspeed_enabled
        scaler = (self.model_wrapped.fp16_enabled() if deepspeed
                  else getattr(self.accelerator, "scaler", None) is not None)
        skip = self._nonfinite.on_norm(grad_norm, self.state.global_step + 1, scaler=scaler,
                                       applied=deepspeed and not self.accelerator.optimizer_step_was_skipped,
                                       announce=self.is_world_process_zero())
        self.step_context.skip_update = skip and not deepspeed and not scaler
        return grad_norm

    def _get_learning_rate(self) -> float:
        if self.step_context.applied_lrs:
            return self.step_context.applied_lrs[0]
        return super()._get_learning_rate()

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        # ``dataloader_drop_last`` keeps the training global batch constant (which LR scaling assumes); HF applies
        # it to evaluation and prediction too, where it would silently leave sentences out of the corpus metric.
        check_stream_order(dataset, batch_size * self.args.world_size * (
            self._configured_accumulation() if is_training else 1), is_training, self.args.train_sampling_strategy,
            batch_changes=self._owner["micro_batches_for_step"] is not None)
        drop_last = self.args.dataloader_drop_last
        if not is_training:
            self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn=sampler_fn,
                                           is_training=is_training, dataloader_key=dataloader_key)
        finally:
            self.args.dataloader_drop_last = drop_last


    # ------------------------------------------------------------------ the step's micro-batches
    def _loss_mode(self, labels) -> str:
        return loss_rules.resolve(self._option("loss_normalization"), labels)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        owner = self._owner["micro_batches_for_step"]
        if owner is not None:  # the step's accumulation is the algorithm's (HF's loop runs with 1)
            num_batches = owner.micro_batches_for_step()
        batch_samples, num_items = self._step_micro_batches(epoch_iterator, num_batches, device)
        if self._listeners["on_micro_batches_drawn"] and batch_samples:
            self._fire("on_micro_batches_drawn", micro_batches=len(batch_samples),
                       examples=sum(_num_examples(b) for b in batch_samples), batches=list(batch_samples))
        if owner is not None and batch_samples:
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
        if self.control.should_training_stop:  # an algorithm's budget was spent before the run resumed
            return None
        if self._listeners["on_epoch_position"]:  # where the sampler stands: HF skipped this many on resume
            resumed = kwargs["epoch"] == kwargs["epochs_trained"] and kwargs["resume_from_checkpoint"] is not None
            self._fire("on_epoch_position", epoch=kwargs["epoch"], steps_in_epoch=kwargs["steps_in_epoch"],
                       position=kwargs["steps_trained_in_current_epoch"] if resumed else 0)
        return super()._run_epoch(**kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        owner = self._owner["resume_position"]
        if owner is None or resume_from_checkpoint is None or self.state.global_step == 0:
            return epochs, steps
        # HF counts the position in steps x a fixed accumulation; the owner knows the sampler position itself
        self._load_algorithm_states(resume_from_checkpoint)
        epoch, position = owner.resume_position(num_update_steps_per_epoch)
        return epoch, (0 if self.args.ignore_data_skip else position)

    def floating_point_ops(self, inputs):
        if isinstance(inputs, _StepBatches):
            return sum(super(LargeBatchTrainer, self).floating_point_ops(batch) or 0 for batch in inputs)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs):
        for batch in inputs if isinstance(inputs, _StepBatches) else [inputs]:
            super()._track_num_input_tokens(batch)

    # ------------------------------------------------------------------ split-invariant loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        owner = self._owner["transform_micro_batch"]
        if owner is None:
            return self._training_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = owner.transform_micro_batch(self.args, self.state, self.control, step=self.step_context,
                                            model=self.model, inputs=inputs)
        with batch.context:
            return self._training_loss(model, batch.inputs, return_outputs, num_items_in_batch, copies=batch.copies)

    def _training_loss(self, model, inputs, return_outputs, num_items_in_batch, copies: int = 1):
        """The split-invariant training loss (loss.py); ``copies``: the batch holds each example that many times
        (a ``transform_micro_batch``'s ``MicroBatch.copies``), which the token rule divides out (a per-micro-batch
        mean already averages them)."""
        labels = inputs.get("labels")
        if self._loss_mode(labels) == "mean":
            # A per-micro-batch mean: the Trainer divides it by the micro-batches of this step; DDP averages ranks.
            self.loss_is_scaled_for_ga = False
            self.step_context.micro_weight = (1.0 / self.current_gradient_accumulation_steps
                                              * self._hook_loss_scale())
            return super().compute_loss(model, inputs, return_outputs)
        if num_items_in_batch is None:
            raise ValueError("loss_normalization='tokens' needs integer per-token `labels` in every batch")
        summed, outputs = self._summed_token_loss(model, inputs)
        world = self.args.world_size
        # Sum over this micro-batch / tokens of the whole global batch; x world undoes the ranks' averaging.
        loss = summed * world / (num_items_in_batch * copies)
        self.loss_is_scaled_for_ga = True
        if self._hooks_wanted:
            tokens = loss_rules.count_label_tokens(labels, self._shifts_labels)
            share = float(world * tokens / (num_items_in_batch * copies))
            self.step_context.micro_weight = share * self._hook_loss_scale()
        return (loss, outputs) if return_outputs else loss

    def _mean_loss(self, model, inputs) -> torch.Tensor:
        """The micro-batch's own mean loss: per example, or per label token under the token rule; the training
        objective itself (HF's loss, with its ``label_smoothing_factor``)."""
        labels = inputs.get("labels")
        if self._loss_mode(labels) != "tokens":
            return Trainer.compute_loss(self, model, dict(inputs))
        summed, _ = self._summed_token_loss(model, inputs)
        return summed / loss_rules.count_label_tokens(labels, self._shifts_labels).clamp(min=1)

    def _model_inputs(self, inputs, tokens: bool) -> dict:
        """A decoder-only LM needs its labels only for its own loss, which the token rule recomputes: do not
        compute it twice."""
        return {k: v for k, v in inputs.items() if k != "labels"} if tokens and self._shifts_labels else inputs

    def _summed_token_loss(self, model, inputs):
        """(sum of the micro-batch's token cross-entropies, the model's outputs)."""
        model_inputs = self._model_inputs(inputs, tokens=True)
        outputs = model(**model_inputs)
        logits = loss_rules.logits_of(outputs, loss_first=model_inputs is inputs)
        summed = loss_rules.summed_token_cross_entropy(logits, inputs["labels"], self._shifts_labels,
                                                       self.args.label_smoothing_factor)
        return summed, outputs

    # ------------------------------------------------------------------ per-micro-batch and per-step events
    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(inputs, _StepBatches):
            return self._accumulated_step(model, inputs, num_items_in_batch)
        with self._gradient_sync_context(model):
            return self._micro_batch_step(model, inputs, num_items_in_batch)

    def _gradient_sync_context(self, model):
        """The algorithms' sync contexts for a backward that ends the step (local SGD: no all-reduce)."""
        if not self._listeners["gradient_sync_context"]:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for alg in self._listeners["gradient_sync_context"]:
            context = alg.gradient_sync_context(model, self.accelerator)
            if context is not None:
                stack.enter_context(context)
        return stack

    def _accumulated_step(self, model, micro_batches, num_items_in_batch):
        """One optimizer step's micro-batches (an algorithm owns their count): all but the last without sync."""
        self.current_gradient_accumulation_steps = len(micro_batches)
        total = None
        for i, inputs in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self.accelerator.gradient_state._set_sync_gradients(last)
            context = self._gradient_sync_context(model) if last else self.accelerator.no_sync(model)
            with context:
                loss = self._micro_batch_step(model, inputs, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _micro_batch_step(self, model, inputs, num_items_in_batch):
        step = self.step_context
        step.num_micro_batches = self.current_gradient_accumulation_steps
        if step.micro_step == 0:
            self._begin_step(model, inputs)
        step.examples += _num_examples(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        step.loss_sum = loss if step.loss_sum is None else step.loss_sum + loss
        last = self.accelerator.sync_gradients
        if self._statistics is not None:
            self._statistics.on_micro_batch_end()
        self._fire("on_micro_batch_end", micro_step=step.micro_step, num_micro_batches=step.num_micro_batches,
                   loss=loss)
        step.micro_step += 1
        if last:
            step.micro_step = 0
            # every rank reads as many examples a step (accelerate's even_batches pads a short last batch)
            self.examples_seen += step.examples * self.args.world_size
            if self._listeners["on_reduced_gradients"] and not self.is_deepspeed_enabled:
                self._fire_reduced_gradients()
            if self._listeners["on_step_loss"]:
                total = backends.all_reduce_sum(step.loss_sum.detach().float().clone())
                self._fire("on_step_loss", loss=total.item() / self.args.world_size)
        return loss

    def _begin_step(self, model, inputs) -> None:
        """Before the step's first micro-batch: a fresh step context and statistics, then ``on_train_step_begin``
        (with the model in training mode: HF's training_step sets it only after this)."""
        self.step_context.begin()
        # ``self.model`` is HF's core model (``unwrap_model`` costs ~0.45 ms: once per step showed in a 5 ms step)
        self._nonfinite.snapshot(self.model)
        if self._statistics_consumers:
            if self._statistics is None:  # after on_train_begin: the optimizer is known to the algorithms
                owner = self._owner["gradient_measurement"]
                self._statistics = GradientStatistics(self.args.world_size,
                                                      owner.gradient_measurement() if owner else None,
                                                      local_workers=self._gradients_stay_local)
            self._statistics.begin_step()
        if self._listeners["on_train_step_begin"]:
            model.train()
            self._fire("on_train_step_begin", step=self.step_context, model=self.model, inputs=inputs,
                       local_gradient=partial(self._local_gradient, self.model, inputs),
                       scheduled_lr=self.lr_scheduler.get_last_lr()[0])
        if self._needs_example_gradients:
            self.step_context.example_inputs = inputs  # the per-example gradients are taken on its first examples

    def _local_gradient(self, model, inputs, params) -> list[torch.Tensor]:
        """This rank's gradient of its micro-batch's mean loss (``local_gradients.local_gradient``: no collective,
        no hooks fired)."""
        inputs = self._prepare_inputs(inputs)
        with self._hooks_muted(), self.compute_loss_context_manager():
            return local_gradient(model, params, lambda: self._mean_loss(model, inputs))

    @contextlib.contextmanager
    def _hooks_muted(self):
        """The algorithms' ``on_local_gradient`` (and the statistics) must not see an extra pass."""
        self._muted_hooks = True
        try:
            yield
        finally:
            self._muted_hooks = False

    def _fire_reduced_gradients(self) -> None:
        step = self.step_context
        step.reduced_fired = True
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
        if self._statistics is not None:
            wanted = any(alg.wants_statistics_at(self.state.global_step) for alg in self._statistics_consumers)
            extra["statistics"] = (self._statistics.measure(self.model, sq, self.current_gradient_accumulation_steps,
                                                            step.examples, loss_scale) if wanted else None)
        if step.example_inputs is not None:
            extra["example_gradients"] = partial(self._example_gradients, step.example_inputs, loss_scale)
        self._fire("on_reduced_gradients", model=self.model, grad_sq_norm=sq,
                   num_micro_batches=self.current_gradient_accumulation_steps, num_examples=step.examples,
                   loss_scale=loss_scale, **extra)
        step.example_inputs = None

    def _example_gradients(self, inputs, loss_scale, count):
        """(this step's gradient ``.grad``, an iterator over the gradients of the first ``count`` examples of
        ``inputs`` at the current weights: ``local_gradients.per_example_gradients``, hooks muted).

        Per-example losses are the micro-batch's loss rule taken per example: cross-entropy over classes
        (``mean`` rule, integer class labels) or the example's mean token cross-entropy (``tokens`` rule)."""
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        reduced = [torch.zeros_like(p) if p.grad is None else p.grad / loss_scale for p in params]
        size = _num_examples(inputs)
        count = min(count, size)
        inputs = self._prepare_inputs({k: v[:count] if isinstance(v, torch.Tensor) and v.dim() > 0
                                       and v.shape[0] == size else v for k, v in inputs.items()})
        labels = inputs["labels"]
        tokens = self._loss_mode(labels) == "tokens"
        model_inputs = self._model_inputs(inputs, tokens)

        def forward():
            with self._hooks_muted(), self.compute_loss_context_manager():
                return model(**model_inputs)

        def example_losses(outputs):
            logits = loss_rules.logits_of(outputs, loss_first=model_inputs is inputs)
            smoothing = self.args.label_smoothing_factor
            if tokens:
                return [loss_rules.summed_token_cross_entropy(logits[i:i + 1], labels[i:i + 1], self._shifts_labels,
                                                              smoothing)
                        / loss_rules.count_label_tokens(labels[i:i + 1], self._shifts_labels).clamp(min=1)
                        for i in range(count)]
            if logits.dim() != 2 or labels.dim() != 1 or labels.is_floating_point():
                raise ValueError("per-example losses are taken as cross-entropy over classes or tokens; this "
                                 "model's labels/logits are neither")
            losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none",
                                                       label_smoothing=smoothing)
            return list(losses)

        return reduced, per_example_gradients(model, params, forward, example_losses)

    def _hook_loss_scale(self) -> float:
        """The loss scale the hook gradients of this micro-batch carry, read once per micro-batch (a host sync on
        GPU) and only when the hooks are wired."""
        return self._loss_scale() if self._hooks_wanted else 1.0

    def _loss_scale(self) -> float:
        """The fp16 loss scale that hook and ``.grad`` values carry (1 without one): DeepSpeed's own loss scaler
        under DeepSpeed, Accelerate's GradScaler otherwise."""
        if self.is_deepspeed_enabled:
            return backends.deepspeed_loss_scale(self.model_wrapped)
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    # ------------------------------------------------------------------ the run
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        resume_from_checkpoint = self._complete_checkpoint(resume_from_checkpoint)
        self.step_context = StepContext(shifts_labels=self._shifts_labels)
        self._statistics = None
        self._index_listeners()  # callbacks may have been added since __init__
        self._bar_on_the_schedule_clock()
        self._check_training_set()
        check_composition(self.algorithms, self.run_plan())
        self._run = RunSetup(self.args, self.scale, self._update_steps_per_epoch,
                             lambda: len(self.get_train_dataloader()))
        try:
            self._fire("on_setup", run=self._run)
            if self._hooks_wanted:
                for name, param in self.model.named_parameters():
                    if param.requires_grad:
                        self._grad_hook_handles.append(param.register_hook(self._local_gradient_hook(name, param)))
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            for handle in self._grad_hook_handles:
                handle.remove()
            self._grad_hook_handles = []
            self._run.restore()

    def _bar_on_the_schedule_clock(self) -> None:
        """When an algorithm owns the schedule's clock, HF's progress bar becomes one on that clock (progress.py)."""
        bar = next((cb for cb in self.callback_handler.callbacks if type(cb) is ProgressCallback), None)
        if bar is not None and self._owner["schedule_clock"] is not None:
            self.callback_handler.remove_callback(bar)
            self.callback_handler.add_callback(ClockProgressCallback(lambda: self._schedule_clock))

    def _complete_checkpoint(self, resume_from_checkpoint):
        """``resume_from_checkpoint=True``: the newest *complete* checkpoint (``checkpoints.py``), naming the newer
        ones skipped; a path: refused if that checkpoint is incomplete."""
        if resume_from_checkpoint is True:
            folder, skipped = newest_complete_checkpoint(self.args.output_dir)
            for path, problem in skipped:
                logger.warning(f"not resuming from {path}: {problem}")
            if folder is None:
                reasons = "".join(f"; {path}: {problem}" for path, problem in skipped)
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from{reasons}")
            return folder
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = checkpoint_problem(str(resume_from_checkpoint))
            if problem is not None and os.path.isdir(resume_from_checkpoint):
                newest, _ = newest_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
                hint = f"resume from {newest} instead" if newest else "no complete checkpoint is next to it"
                raise ValueError(f"checkpoint {resume_from_checkpoint} is incomplete: {problem}; {hint} (or pass "
                                 "resume_from_checkpoint=True for the newest complete one)")
        return resume_from_checkpoint

    def _check_training_set(self) -> None:
        """A training set smaller than one global batch trains on short steps only (or on none, with
        ``dataloader_drop_last``): refused before any work, as is an empty one."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        args = self.args
        if len(dataset) < self.global_batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} examples, fewer than one global batch ({self.global_batch_size}"
                f" = per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} x world_size {args.world_size}): lower the batch or give more "
                "data")

    def run_plan(self) -> RunPlan:
        """What the algorithms' checks may ask about this run (``composition.py``), from the arguments as the user
        gave them (before any algorithm's ``on_setup`` overrides them)."""
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
            backend="deepspeed" if ds_config else "fsdp" if self.is_fsdp_enabled else (
                "ddp" if args.world_size > 1 else "single"),
            zero_stage=backends.zero_stage(ds_config),
            optimizer_cls=optimizer_cls, lr_scaling=self._option("lr_scaling"),
            lr_schedule=self._option("lr_schedule"),
            warmup=bool(args.warmup_steps or getattr(args, "warmup_ratio", 0)),
            custom_loss=self.compute_loss_func is not None,
            user_scheduler=self.lr_scheduler is not None and not getattr(self, "_created_lr_scheduler", False),
            algorithms=tuple(alg.name for alg in self.algorithms), args=args)

    def _local_gradient_hook(self, name, param):
        """The tensor hook of one parameter: hands its local micro-batch gradient to the statistics and the
        listening algorithms. It runs once per parameter per micro-batch, so the listeners' bound methods are looked
        up here, once."""
        listeners = [alg.on_local_gradient for alg in self._listeners["on_local_gradient"]]

        def hook(grad):
            if self._muted_hooks:
                return
            weight = self.step_context.micro_weight
            if self._statistics is not None:
                self._statistics.on_local_gradient(param, grad, weight)
            for listener in listeners:
                listener(self.args, self.state, self.control, name=name, param=param, grad=grad, weight=weight)

        return hook

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["examples_seen"] = self.examples_seen  # evaluations too: a metric-vs-examples curve reads it
        if "learning_rate" in logs:
            logs["scale"] = self.scale  # an algorithm that changes the batch logs its own
            logs["nonfinite_steps"] = self._nonfinite.count
            for alg in self.algorithms:
                logs.update(alg.log_metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoint state
    def _algorithm_state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, ALGORITHM_STATE_FILE.format(rank=self.args.process_index))

    def _run_record(self) -> dict:
        """What a resume must not change: the global batch and its split (as configured), the world size, S."""
        return {"global_batch_size": self.global_batch_size, "world_size": self.args.world_size,
                "per_device_train_batch_size": self.args.per_device_train_batch_size,
                "gradient_accumulation_steps": self._configured_accumulation(), "scale": self.scale}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        states = {alg.name: alg.state_dict() for alg in self.algorithms}
        records = {RUN_RECORD: self._run_record(), NONFINITE_RECORD: self._nonfinite.state_dict(),
                   SUMMARY_RECORD: self.run_summary, EXAMPLES_RECORD: self.examples_seen}
        carried = getattr(self.model, "carried_state", None)
        if carried is not None:
            records[CARRIED_RECORD] = carried.state_dict()
        torch.save({**states, **records}, self._algorithm_state_path(output_dir))

    def _save_rng_state(self, output_dir: str) -> None:
        # every rank's own files (algorithm state, RNG state) are whole before rank 0 writes trainer_state.json,
        # the last file of a checkpoint: its presence marks a complete one (checkpoints.py)
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and self.algorithms and not self.is_deepspeed_enabled:
            # HF skips both files silently when one is missing: fresh momentum and schedule with restored progress
            missing = [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME)
                       if not os.path.isfile(os.path.join(checkpoint, name))]
            if missing:
                raise FileNotFoundError(f"checkpoint {checkpoint} has no {' and no '.join(missing)} (saved with "
                                        "save_only_model, or damaged): resuming would restore the algorithms "
                                        "but restart the optimizer and the LR schedule; resume from a full one")
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_algorithm_states(checkpoint)

    def _check_same_run(self, checkpoint: str) -> None:
        """Refuse a resume with another global batch, split, world size or S: the scale-dependent state (AdaScale's
        gain, the LR rule) would jump, HF would skip the data by a count of steps of another batch, and even another
        split of the same batch changes the micro-batch statistics (their n). Checkpoints written before the record
        existed are not checked."""
        path = os.path.join(checkpoint, ALGORITHM_STATE_FILE.format(rank=0))
        if not os.path.isfile(path):
            return
        saved = self._read_states(path).get(RUN_RECORD)
        if saved is None or saved == self._run_record():
            return
        now = self._run_record()
        changed = ", ".join(f"{key} {saved[key]} -> {now[key]}" for key in now if saved.get(key) != now[key])
        raise ValueError(f"checkpoint {checkpoint} was written by a run with another batch or world size "
                         f"({changed}): resuming would change S or the statistics and skip the data by the wrong "
                         f"count. Resume with per_device_train_batch_size={saved['per_device_train_batch_size']}, "
                         f"gradient_accumulation_steps={saved['gradient_accumulation_steps']} on "
                         f"{saved['world_size']} processes")

    @staticmethod
    def _read_states(path: str) -> dict:
        try:
            return torch.load(path, weights_only=True)
        except Exception as error:  # a truncated or damaged file: torch's message does not name it
            raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); the checkpoint is "
                             "damaged: resume from an earlier one") from None

    def _load_algorithm_states(self, checkpoint: str) -> None:
        self._check_same_run(checkpoint)
        algorithms = self.algorithms
        path = self._algorithm_state_path(checkpoint)
        # what a checkpoint written before the count was kept implies: full global batches
        self.examples_seen = self.state.global_step * self.global_batch_size
        if not algorithms and not os.path.isfile(path):
            return  # a checkpoint from before the file was always written: nothing to restore
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint holds no state for the algorithms "
                                    f"{[a.name for a in algorithms]}, so resuming would restart them")
        states = self._read_states(path)
        if NONFINITE_RECORD in states:  # absent from checkpoints written before it was kept
            self._nonfinite.load_state_dict(states[NONFINITE_RECORD])
        if EXAMPLES_RECORD in states:
            self.examples_seen = int(states[EXAMPLES_RECORD])
        carried = getattr(self.model, "carried_state", None)
        if carried is not None and CARRIED_RECORD in states:
            carried.load_state_dict(states[CARRIED_RECORD])
        for alg in algorithms:
            if alg.name not in states:
                raise KeyError(f"checkpoint {checkpoint} has no state for algorithm {alg.name!r} "
                               f"(it has {sorted(states)})")
            try:
                alg.load_state_dict(states[alg.name])
            except KeyError as error:
                raise ValueError(f"{path}: the state of algorithm {alg.name!r} lacks {error} (saved by another "
                                 "version, or damaged): resume from a checkpoint this version wrote") from None


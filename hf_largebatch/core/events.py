"""``Algorithm``: a ``TrainerCallback`` with the events large-batch methods need and HF callbacks lack.

An algorithm plugs into ``LargeBatchTrainer`` only through these events; the trainer knows none by name. Where each
fires in ``train()`` (``(HF)``: HF's own callback events, in their usual place; ``[query]``: the trainer asks and
uses the answer; ``[owner]``: at most one algorithm may answer, refused at ``train()`` otherwise)::

    setup
      check(plan)                                   refuse this run before any work (composition.py)
      on_setup(run)                                 take arguments over for this train() (run.override)
      on_train_begin                                (HF)
      gradient_measurement()              [owner]   what the gradient statistics measure (AdamScale: the
                                                    preconditioned gradients; default: the gradients)
      schedule_clock(num_training_steps)  [owner]   the clock the LR schedule runs on, and its length
                                                    (default: optimizer steps; AdaScale: progress; adaptive
                                                    batch: samples, in steps of the initial batch)
      lr_lambda(max_lr, num_training_steps,         the schedule's shape, replacing warm-up + HF decay
                steps_per_epoch)          [owner]   (AutoWU)
      resume_position(steps_per_epoch)    [owner]   on resume: (epoch, micro-batches into it) where the sampler
                                                    stands, when steps x accumulation cannot say it
    per epoch
      on_epoch_position(epoch, steps_in_epoch,      the sampler's position at the epoch's start
                        position)
    per optimizer step
      micro_batches_for_step()            [owner]   how many micro-batches this step draws (adaptive batch;
                                                    default: gradient_accumulation_steps)
      on_micro_batches_drawn(micro_batches,         what this rank drew for the step; ``batches``: its
                             examples, batches)     micro-batches in training order, as the data loader gave
                                                    them (ConAdv starts their attacks on a worker thread)
      on_step_begin                                 (HF)
      per micro-batch k = 0..n-1
        gradient_sync_context(model, accelerator)   the backward's sync context (local SGD: no all-reduce)
        on_train_step_begin(step, model, inputs,    k = 0 only: after model.train(), before the step's first
                            local_gradient,         forward; may move the weights (EXTRAP-SGD's x~)
                            scheduled_lr)
        transform_micro_batch(step, model, inputs)  [owner]  the batch to train on and the context of its
                                                    forward (ConAdv: [clean; adversarial])
        on_local_gradient(name, param, grad,        once per parameter, during backward: the *local, unreduced*
                          weight)                   micro-batch gradient (a tensor hook); ``grad / weight`` is the
                                                    gradient of that micro-batch's own mean loss
        on_micro_batch_end(micro_step, num_micro_batches, loss)
        on_substep_end                              (HF, not after the last micro-batch)
      on_reduced_gradients(model, grad_sq_norm,     the step's reduced (rank-averaged) gradient, before clipping,
                           num_micro_batches,       loss scale removed; ``p.grad`` is readable in single process
                           num_examples,            and DDP, ``None`` under DeepSpeed ZeRO (where this event fires
                           loss_scale, statistics,  from inside the optimizer step, before the update);
                           [example_gradients])     ``statistics``: the step's ``StepStatistics``
      on_step_loss(loss)                            the step's loss averaged over micro-batches and ranks
      on_pre_optimizer_step                         (HF)
        on_before_update()                          inside optimizer.step, before the update (EXTRAP-SGD back to
                                                    x); under ZeRO once per param group
        lr_factor()                       [query]   multiplies this step's LR (product over algorithms)
        on_lr_applied(learning_rate)                right after the update: the LR it applied (group 0); not
                                                    fired when the update was skipped (fp16 overflow)
      on_optimizer_step, on_step_end                (HF)
    logging: log_metrics() adds each algorithm's numbers to every logging step
    checkpoints: state_dict() / load_state_dict(state), saved with every checkpoint, per rank

Every algorithm declares what it needs (``check(plan)``, given the ``composition.RunPlan`` of the run) and which
other algorithms it cannot run with (``excludes``, by ``name``, with the reason); ``LargeBatchTrainer`` checks the
algorithms actually present at ``train()``, however they were configured (arguments or ``callbacks=[...]``), so a
combination is refused with the same message either way (``composition.check_composition``).

An algorithm that sets ``needs_gradient_statistics`` (or ``needs_example_gradients``) gets the step's
``StepStatistics`` (or per-example gradients) in ``on_reduced_gradients``: one estimator per trainer
(``statistics.GradientStatistics``), computed once per step for all its consumers; ``keeps_gradients_local`` (local
SGD) makes it estimate per worker. The expensive events (per-parameter gradient hooks, the reduced norm, the loss
all-reduce) are only wired when some algorithm overrides them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from .option_strings import option_name

#: the events and queries LargeBatchTrainer fires beyond HF's callback events (listeners indexed once per train)
EVENTS = ("on_setup", "gradient_measurement", "schedule_clock", "lr_lambda", "resume_position", "on_epoch_position",
          "micro_batches_for_step", "on_micro_batches_drawn", "on_train_step_begin", "gradient_sync_context",
          "transform_micro_batch", "on_local_gradient", "on_micro_batch_end", "on_reduced_gradients",
          "on_step_loss", "on_before_update", "lr_factor", "on_lr_applied")

#: the events at most one algorithm of a run may answer
OWNED_EVENTS = ("gradient_measurement", "schedule_clock", "lr_lambda", "resume_position", "micro_batches_for_step",
                "transform_micro_batch")


@dataclass(frozen=True)
class Clock:
    """The clock an LR schedule runs on: ``now()`` is the scheduler's step, ``length`` the schedule's length in
    that clock's steps (None: the trainer's count of optimizer steps); ``requirement`` says why, for the message
    when the schedule cannot be re-clocked (not a ``LambdaLR``); ``unit`` names its steps (start-up summary,
    progress bar)."""

    now: Callable[[], int]
    requirement: str
    length: int | None = None
    unit: str = "optimizer steps"


@dataclass
class MicroBatch:
    """What ``transform_micro_batch`` trains on instead of the micro-batch: ``inputs``, the ``context`` the forward
    runs in, and ``copies`` (how many times each example appears: the token rule divides it out)."""

    inputs: dict
    context: contextlib.AbstractContextManager
    copies: int = 1


class Algorithm(TrainerCallback):
    """Base class: override the events you need; keep the maths in a plain function next to it."""

    #: key under which this algorithm's state is stored in checkpoints (and by which ``excludes`` names it)
    name: str = "algorithm"
    #: how a user turns it on, for messages (e.g. ``"lr_scaling='adascale'"``)
    option: str = ""
    #: why the algorithm cannot run under FSDP (None: it can); ``check_composition`` refuses it there
    unsupported_under_fsdp: str | None = None
    #: ``{name of another algorithm: why they cannot run together}``
    excludes: dict[str, str] = {}
    #: receives the step's ``StepStatistics`` in ``on_reduced_gradients`` (``statistics=``)
    needs_gradient_statistics: bool = False
    #: its backward never all-reduces (local SGD): the gradient statistics are then each worker's own
    keeps_gradients_local: bool = False
    #: receives ``example_gradients(count)`` in ``on_reduced_gradients`` (per-example gradients of the step's first
    #: micro-batch, at the step's weights)
    needs_example_gradients: bool = False

    def settings(self) -> dict:
        """What the start-up summary shows of this algorithm (``run_summary.py``): its ``config`` dataclass's
        fields by default."""
        config = getattr(self, "config", None)
        return asdict(config) if is_dataclass(config) else {}

    def check(self, plan) -> None:
        """Raise ``ValueError`` naming the setting and the fix if this run (``composition.RunPlan``) cannot host
        the algorithm. Called at ``train()``, before any work."""

    def wants_statistics_at(self, global_step: int) -> bool:
        """With ``needs_gradient_statistics``: whether step ``global_step`` must be measured (its all-reduce is
        skipped when no consumer wants it; ``statistics`` is then None)."""
        return True

    # -- setup
    def on_setup(self, args, state, control, *, run, **kwargs):
        """At ``train()``, after the composition check: ``run`` is the trainer's ``RunSetup``."""

    def gradient_measurement(self):
        """What the trainer's gradient statistics measure, if not the gradients themselves (a
        ``core.statistics`` measurement: AdamScale's preconditioned gradients); asked at the first step."""
        return None

    def schedule_clock(self, num_training_steps: int) -> Clock | None:
        return None

    def lr_lambda(self, max_lr: float, num_training_steps: int, steps_per_epoch: int) -> Callable | None:
        """A ``LambdaLR`` factor of the scheduler's step (the groups' base LR is ``max_lr``), or None."""
        return None

    def resume_position(self, steps_per_epoch: int) -> tuple[int, int] | None:
        """On resume (after ``load_state_dict``): ``(epoch, micro-batches already drawn in it)``, or None."""
        return None

    def on_epoch_position(self, args, state, control, *, epoch: int, steps_in_epoch: int, position: int,
                          **kwargs):
        pass

    # -- per step
    def micro_batches_for_step(self) -> int | None:
        return None

    def on_micro_batches_drawn(self, args, state, control, *, micro_batches: int, examples: int, batches: list,
                               **kwargs):
        pass

    def on_train_step_begin(self, args, state, control, *, step, model, inputs: dict, local_gradient,
                            scheduled_lr: float, **kwargs):
        """``model``: the unwrapped model in training mode; ``local_gradient(params)``: this rank's gradient of the
        step's first micro-batch's mean loss (no collective, no hooks fired); ``scheduled_lr``: the scheduler's LR
        for this step (group 0, before any ``lr_factor``)."""

    def gradient_sync_context(self, model, accelerator) -> contextlib.AbstractContextManager | None:
        return None

    def transform_micro_batch(self, args, state, control, *, step, model, inputs: dict) -> MicroBatch | None:
        return None

    def on_local_gradient(self, args, state, control, *, name: str, param: torch.nn.Parameter,
                          grad: torch.Tensor, weight: float, **kwargs):
        pass

    def on_micro_batch_end(self, args, state, control, *, micro_step: int, num_micro_batches: int,
                           loss: torch.Tensor, **kwargs):
        pass

    def on_reduced_gradients(self, args, state, control, *, model, grad_sq_norm: torch.Tensor,
                             num_micro_batches: int, loss_scale: float = 1.0, **kwargs):
        pass

    def on_step_loss(self, args, state, control, *, loss: float, **kwargs):
        pass

    def on_before_update(self, args, state, control, **kwargs):
        """Inside ``optimizer.step``, before the update; must be idempotent (ZeRO fires it per param group)."""

    def lr_factor(self) -> float:
        """Multiplier of the LR of the step being taken, applied inside ``optimizer.step`` (after the step's
        ``on_reduced_gradients``) and undone after it: the scheduler keeps owning the base LR."""
        return 1.0

    def on_lr_applied(self, args, state, control, *, learning_rate: float, **kwargs):
        pass

    # -- logs and checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def log_metrics(self) -> dict[str, float]:
        return {}

    def overrides(self, event: str) -> bool:
        return getattr(type(self), event) is not getattr(Algorithm, event)


def final_save_and_evaluation(args, control, strategies: tuple[str, ...]) -> None:
    """Ask for the end-of-training checkpoint and evaluation that HF's ``DefaultFlowCallback`` gives a run reaching
    ``max_steps``, for an algorithm that ends training earlier (AdaScale's budget of progress, the adaptive batch's
    budget of samples), for the ``save_strategy`` / ``eval_strategy`` values in ``strategies``."""
    if option_name(args.save_strategy) in strategies:
        control.should_save = True
    if option_name(args.eval_strategy) in strategies:
        control.should_evaluate = True

"""``Algorithm``: a ``TrainerCallback`` with the events large-batch methods need and HF callbacks lack.

``LargeBatchTrainer`` fires, for every algorithm among its callbacks, in this order within one optimizer step
(single process and DDP; tested in ``tests/test_events.py``)::

    on_step_begin                                   (HF)
      per micro-batch k = 0..n-1:
        on_local_gradient(name, param, grad, weight)   once per parameter, during backward: the *local,
                                                       unreduced* micro-batch gradient (a tensor hook);
                                                       ``grad / weight`` is the gradient of that micro-batch's
                                                       own mean loss
        on_micro_batch_end(micro_step, num_micro_batches, loss)
        on_substep_end                              (HF, not after the last micro-batch)
    on_reduced_gradients(model, grad_sq_norm,       the step's reduced (rank-averaged) gradient, before
                         num_micro_batches,
                         loss_scale)
                                                    clipping; ``p.grad`` is readable in single process and DDP,
                                                    ``None`` under DeepSpeed ZeRO (where this event fires from
                                                    inside the optimizer step, before the update)
    on_step_loss(loss)                              the step's loss averaged over micro-batches and ranks
    on_pre_optimizer_step                           (HF)
      lr_factor()                                   inside optimizer.step: multiplies this step's LR
      on_lr_applied(learning_rate)                  right after the update: the LR it applied (group 0)
    on_optimizer_step                               (HF)
    on_step_end                                     (HF)

Every algorithm declares what it needs (``check(plan)``, given the ``composition.RunPlan`` of the run) and which
other algorithms it cannot run with (``excludes``, by ``name``, with the reason); ``LargeBatchTrainer`` checks the
algorithms actually present at ``train()``, however they were configured (arguments or ``callbacks=[...]``), so a
combination is refused with the same message either way (``composition.check_composition``).

Every algorithm also owns its checkpoint state: ``state_dict()`` returns plain tensors/numbers (saved with
``torch.save`` in each checkpoint and loaded with ``weights_only=True`` on resume), ``load_state_dict`` restores
it, and ``log_metrics()`` adds its numbers to every logging step.

The expensive events (per-parameter gradient hooks, the reduced norm, the loss all-reduce) are only wired when
some algorithm overrides them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from .option_strings import option_name

#: the events LargeBatchTrainer fires (and ``lr_factor``, which it queries), beyond HF's callback events
EVENTS = ("on_local_gradient", "on_micro_batch_end", "on_reduced_gradients", "on_step_loss", "on_lr_applied",
          "lr_factor")


class Algorithm(TrainerCallback):
    """Base class: override the events you need; keep the maths in a plain function next to it."""

    #: key under which this algorithm's state is stored in checkpoints (and by which ``excludes`` names it)
    name: str = "algorithm"
    #: how a user turns it on, for messages (e.g. ``"lr_scaling='adascale'"``)
    option: str = ""
    #: ``{name of another algorithm: why they cannot run together}``
    excludes: dict[str, str] = {}

    def check(self, plan) -> None:
        """Raise ``ValueError`` naming the setting and the fix if this run (``composition.RunPlan``) cannot host
        the algorithm. Called at ``train()``, before any work."""

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

    def on_lr_applied(self, args, state, control, *, learning_rate: float, **kwargs):
        pass

    def lr_factor(self) -> float:
        """Multiplier of the LR of the step being taken, applied inside ``optimizer.step`` (after the step's
        ``on_reduced_gradients``) and undone after it: the scheduler keeps owning the base LR."""
        return 1.0

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

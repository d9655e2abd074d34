"""AdaScale (Johnson et al., ICML 2020): an LR gain from the measured gradient variance, and scale-invariant
progress (ALGORITHMS.md section 1).

    r_t     = (var + sqr) / (var / S + sqr)       var: smoothed variance at B0, sqr: smoothed ||G||^2
    lr_t    = r_t * schedule(floor(tau_t))        the schedule (warm-up and decay) indexed by progress
    tau_t+1 = tau_t + r_t                         progress in base-batch iterations; stop at tau >= T_base

Integration (thin; the maths is ``adascale_gain``):

* the gain multiplies the LR inside the optimizer's ``step()`` of the *same* step whose statistics produced it
  (``lr_factor``, applied by ``LargeBatchTrainer`` in a step pre-hook and restored after), the one place that
  sees the step's statistics before the update in single process, DDP and DeepSpeed ZeRO alike;
* the scheduler built by ``LargeBatchTrainer`` evaluates its LR lambda at ``floor(progress)``; the run's
  ``max_steps`` is the base budget ``T_base`` (from ``num_train_epochs`` or ``max_steps`` at ``base_batch_size``), an
  upper bound since ``r >= 1``;
* evaluation and checkpoint cadence (``eval_strategy``/``save_strategy`` ``steps`` or ``epoch``) and the ``epoch``
  in logs are counted on progress, in base-batch steps and base epochs.

[decide] Clipping: statistics are taken before clipping (the paper has none); the gain multiplies the LR of the
clipped update. [decide] ``r_0``: the first step already has its own statistics, so its gain is used.
AdamScale: with an Adam-family optimizer the gain is ``sqrt(r)`` and, once Adam has ``warm_adam_steps`` of
``v_hat``, the statistics are taken on preconditioned gradients ``g / (sqrt(v_hat) + eps)``.
"""

from __future__ import annotations

import math

import torch

from .stats import GradientStatistics


def adascale_gain(var_base: float, grad_sqr: float, scale: float) -> float:
    """``r = (var + sqr) / (var/S + sqr)``, in ``[1, S]``; exactly 1 at ``S = 1``."""
    if scale == 1:
        return 1.0
    gain = (var_base + grad_sqr) / (var_base / scale + grad_sqr)
    return min(max(gain, 1.0), scale)


def is_adam_family(optimizer) -> bool:
    inner = optimizer
    while hasattr(inner, "optimizer") and isinstance(getattr(inner, "optimizer"), torch.optim.Optimizer):
        inner = inner.optimizer
    return "adam" in type(inner).__name__.lower() or "lamb" in type(inner).__name__.lower()


class AdaScale(GradientStatistics):
    """AdaScale / AdamScale as an algorithm. Added by ``LargeBatchTrainer`` when ``lr_scaling="adascale"``."""

    name = "adascale"

    def __init__(self, theta: float | None = None, warm_adam_steps: int = 5):
        super().__init__(theta=theta)
        self.warm_adam_steps = warm_adam_steps
        self.progress = 0.0
        self.gain = 1.0
        self.adam = False
        self._optimizer = None
        self._base_steps_per_epoch = 1.0
        self._previous = 0.0

    # -- setup
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._optimizer = optimizer
        self.adam = is_adam_family(optimizer)
        # (beta2, eps) by parameter, looked up per gradient hook
        self._adam_hparams = ({p: (g["betas"][1], g["eps"]) for g in optimizer.param_groups for p in g["params"]}
                              if self.adam else {})
        micro = len(train_dataloader)
        ga = args.gradient_accumulation_steps
        self._base_steps_per_epoch = max(micro // ga + int(micro % ga > 0), 1) * self.scale

    # -- AdamScale: statistics of preconditioned gradients
    def _preconditioner(self, param):
        if not self.adam or self._optimizer is None:
            return None
        st = self._optimizer.state.get(param)
        if not st or "exp_avg_sq" not in st:
            return None
        step = float(st["step"])
        if step < self.warm_adam_steps:
            return None
        beta2, eps = self._adam_hparams[param]
        return st["exp_avg_sq"].div(1 - beta2 ** step).sqrt_().add_(eps)

    def on_local_gradient(self, args, state, control, *, param, grad, weight, **kwargs):
        denom = self._preconditioner(param)
        super().on_local_gradient(args, state, control, grad=grad if denom is None else grad / denom,
                                  weight=weight)

    def on_reduced_gradients(self, args, state, control, *, model, grad_sq_norm, num_micro_batches,
                             loss_scale=1.0, **kwargs):
        if self.adam:  # T on the same preconditioned gradients as L
            parts = []
            for p in model.parameters():
                if p.grad is not None:
                    denom = self._preconditioner(p)
                    g = p.grad if denom is None else p.grad / denom
                    parts.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())
            if parts:
                grad_sq_norm = torch.stack(parts).sum() / loss_scale ** 2
        super().on_reduced_gradients(args, state, control, grad_sq_norm=grad_sq_norm,
                                     num_micro_batches=num_micro_batches)
        if self.grad_sqr.count:
            self.gain = adascale_gain(self.grad_var.value, self.grad_sqr.value, self.scale)

    def lr_factor(self) -> float:
        """Multiplier of this step's LR, applied inside ``optimizer.step``."""
        return math.sqrt(self.gain) if self.adam else self.gain

    # -- progress, stopping and cadence on tau
    def on_step_begin(self, args, state, control, **kwargs):
        self._previous = self.progress

    def on_lr_applied(self, args, state, control, *, learning_rate, **kwargs):
        # Fired only by an update that ran: a step the fp16 GradScaler skipped (overflow) makes no progress, so
        # the schedule (on progress) and the budget do not move either.
        self.progress += self.gain

    def on_step_end(self, args, state, control, **kwargs):
        previous = self._previous
        state.epoch = self.progress / self._base_steps_per_epoch
        for strategy, every, flag in ((args.eval_strategy, args.eval_steps, "should_evaluate"),
                                      (args.save_strategy, args.save_steps, "should_save")):
            strategy = str(getattr(strategy, "value", strategy))
            if strategy == "steps":
                period = every if every >= 1 else every * state.max_steps
            elif strategy == "epoch":
                period = self._base_steps_per_epoch
            else:
                continue
            setattr(control, flag, math.floor(self.progress / period) > math.floor(previous / period))
        if self.progress >= state.max_steps:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        # Data epochs are not progress epochs: evaluation and saving follow progress (set in on_step_end).
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "epoch":
            control.should_evaluate = False
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "epoch":
            control.should_save = False

    def log_metrics(self) -> dict[str, float]:
        metrics = super().log_metrics()
        metrics.update({"adascale_gain": self.gain, "progress": self.progress})
        return metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "progress": self.progress, "gain": self.gain}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.progress, self.gain = float(state["progress"]), float(state["gain"])

"""AdaScale (Johnson et al., ICML 2020): an LR gain from the measured gradient variance, and scale-invariant
progress (ALGORITHMS.md section 1).

    r_t     = (var + sqr) / (var / S + sqr)       var: smoothed variance at B0, sqr: smoothed ||G||^2
    lr_t    = r_t * schedule(floor(tau_t))        the schedule (warm-up and decay) indexed by progress
    tau_t+1 = tau_t + r_t                         progress in base-batch iterations; stop at tau >= T_base

Integration (thin; the maths is ``adascale_gain``):

* the gain multiplies the LR inside the optimizer's ``step()`` of the *same* step whose statistics produced it
  (``lr_factor``, applied by ``LargeBatchTrainer`` in a step pre-hook and restored after), the one place that
  sees the step's statistics before the update in single process, DDP and DeepSpeed ZeRO alike;
* the scheduler built by ``LargeBatchTrainer`` evaluates its LR lambda at ``floor(progress)`` (``schedule_clock``);
  the run's ``max_steps`` is the base budget ``T_base`` (from ``num_train_epochs`` or ``max_steps`` at
  ``base_batch_size``, set in ``on_setup``), an upper bound since ``r >= 1``;
* evaluation and checkpoint cadence (``eval_strategy``/``save_strategy`` ``steps`` or ``epoch``) and the ``epoch``
  in logs are counted on progress, in base-batch steps and base epochs.

[decide] Clipping: statistics are taken before clipping (the paper has none); the gain multiplies the LR of the
clipped update. [decide] ``r_0``: the first step already has its own statistics, so its gain is used; a smoothed
``||G||^2`` of 0 gives ``r = S`` (the spec's golden case: orthogonal gradients); unlike the adaptive batch, whose
decision is irreversible, a gain is taken again every step. [decide] ``S < 1`` is refused (AdaScale scales up
from the base batch; its gain would lie in ``[S, 1]`` and the budget ``T_base`` would not bound the steps).

AdamScale (Adam-family optimisers): the gain is ``sqrt(r)`` and the statistics are those of preconditioned gradients
``g / P``, with ``P`` **the preconditioner Adam applied in the previous step, its bias correction counted per row**:
``P = sqrt(v_{t-1} / c_{t-1}) + eps`` where ``c`` is 1 - beta2^t on a row touched every step (Adam's own correction)
and, on a row touched only at some steps, the same EMA of "touched" indicators (``row_history``), so that ``v / c``
is the row's own mean ``g^2``. Rows whose second moment rests on fewer than ``MIN_SECOND_MOMENT_SAMPLES`` (5) touches
are left out of both L and T. Why each part (measured on Multi30k captions with a word vocabulary, most rows rare:
``benchmarks/adamscale_text.py``, BENCHMARKS.md):

* *the previous step's P*: independent of this step's micro-batches, so ``(n T - L) / (n - 1)`` stays unbiased
  given P. This step's own ``P_t`` (which includes ``g_bar_t^2``) makes ``g_i / P_t`` heavy-tailed where the
  micro-batches nearly cancel in ``g_bar``: one step's variance estimate reached 3e8 and the gain sat at S whether
  the labels were learnable or random;
* *per-row bias correction*: Adam's ``v / (1 - beta2^t)`` counts the steps that missed a row as zeros, so a rare
  word's row looks up to 1/(1 - beta2) = 1000 times too small and its ``(g / P)^2`` that much too large (the
  bounded remnant of the ``g / eps`` that the ``v_hat`` of earlier steps gives a row never seen: adaptdl's choice,
  with which one embedding matrix held ~100% of ``||g||^2``);
* *at least 5 touches*: with ``v`` from k samples a noise coordinate's ``(g / P)^2`` follows an F(1, k) law, whose
  variance is infinite for k <= 4; a row never touched, or the whole model at its first steps, has no P at all.
  So the first 5 steps give no estimate (the gain stays 1: the paper's ``r_0 = 1``), and there is never a raw
  statistic to switch from: the EMAs hold one quantity for the whole run. What 5 touches cannot tame is a row whose
  gradient scale itself jumps (a token seen 5 times where it barely matters, then where it does): Adam's own step
  on it is large too, and it shows as a burst of variance (seen on a synthetic Zipf vocabulary at a fixed model:
  ``L`` and ``T`` ~1e9 against ~1e3 the step before).

``L`` is formed at the reduced gradients from a per-parameter sum of the squared micro-batch gradients (one fp32
buffer per parameter during the step, AdamScale only); the row histories (two numbers per row) are checkpointed.

Optimisers are recognised by class (``optimizer_kind``): SGD and LARS get AdaScale, Adam / AdamW / LAMB / AdamP
AdamScale with their own ``P``; anything else (8-bit or schedule-free Adam, Adafactor, ...) is refused at the start:
its preconditioner is not ``sqrt(v_hat) + eps`` of ``exp_avg_sq``, and guessing it would be silently wrong.
"""

from __future__ import annotations

import math

import torch

from ..optim import lars_lamb_adamp
from ..core.events import Clock, final_save_and_evaluation
from ..core.option_strings import option_name
from ..core.lr_scaling import steps_per_epoch
from ..core.backends import innermost_optimizer
from ..core.statistics import SmoothedNoiseScale, require_two_micro_batches

#: optimiser classes AdaScale knows, and how each preconditions: None (plain SGD-type update), "eps_after"
#: (``sqrt(v / (1 - beta2^t)) + eps``: torch's Adam/AdamW, our LAMB) or "eps_before" (``(sqrt(v) + eps) /
#: sqrt(1 - beta2^t)``: pytorch_optimizer's AdamP). Looked up along the class's MRO (AdamW before Adam).
_OPTIMIZER_KINDS = {torch.optim.SGD: None, lars_lamb_adamp.LARS: None, torch.optim.AdamW: "eps_after",
                    torch.optim.Adam: "eps_after", lars_lamb_adamp.LAMB: "eps_after",
                    lars_lamb_adamp.AdamP: "eps_before"}


#: AdamScale: a row enters the statistics once its second moment rests on this many steps that touched it.
#: With v_hat from k samples a noise coordinate's (g / P)^2 follows an F(1, k) law, of infinite variance for k <= 4:
#: single huge ratios then dominate the smoothed statistics for hundreds of steps.
MIN_SECOND_MOMENT_SAMPLES = 5


def adascale_gain(var_base: float, grad_sqr: float, scale: float) -> float:
    """``r = (var + sqr) / (var/S + sqr)``, in ``[1, S]`` for ``S >= 1``; exactly 1 at ``S = 1``."""
    if scale < 1:
        raise ValueError(f"AdaScale's gain needs S >= 1, got S = {scale}")
    if scale == 1:
        return 1.0
    gain = (var_base + grad_sqr) / (var_base / scale + grad_sqr)
    return min(max(gain, 1.0), scale)


def row_shape(param_like: torch.Tensor) -> tuple[int, ...]:
    """The shape of a per-row quantity, broadcastable to the parameter: ``[rows, 1, ...]`` (a vector or a scalar
    is one row)."""
    if param_like.dim() <= 1:
        return (1,) * max(param_like.dim(), 1)
    return (param_like.shape[0],) + (1,) * (param_like.dim() - 1)


def row_history(history: torch.Tensor, grad: torch.Tensor, beta2: float) -> torch.Tensor:
    """Per row, ``[coverage, touches]`` after a step with gradient ``grad`` (``history``: ``[2, *row_shape]``); a
    row is touched when any of its gradient entries is non-zero.

    * coverage ``c_t = beta2 c_{t-1} + (1 - beta2) [touched]``: on a row touched every step ``c_t = 1 - beta2^t``,
      Adam's own bias correction; on a row touched k times, ``v_t / c_t`` is the mean of its ``g^2`` over those
      steps, where Adam's ``v_t / (1 - beta2^t)`` counts the steps that missed it as zeros (the remnant of the
      ``g / eps`` pitfall: a rare word's row looks ~1/(1 - beta2) times too small);
    * touches: how many steps touched the row (how many samples its second moment rests on)."""
    coverage, touches = history
    rows = coverage.shape[0] if grad.dim() > 1 else 1
    touched = grad.reshape(rows, -1).ne(0).any(dim=1).reshape(coverage.shape).to(coverage.dtype)
    return torch.stack([coverage.mul(beta2).add_(touched, alpha=1 - beta2), touches + touched])


def optimizer_class_kind(optimizer_cls: type | None) -> str | None:
    """None for an SGD-type optimizer class, the preconditioner's form for an Adam-type one; refuses any other."""
    for cls in getattr(optimizer_cls, "__mro__", ()):
        if cls in _OPTIMIZER_KINDS:
            return _OPTIMIZER_KINDS[cls]
    known = ", ".join(sorted(c.__name__ for c in _OPTIMIZER_KINDS))
    name = getattr(optimizer_cls, "__name__", "(unknown)")
    raise ValueError(f"lr_scaling='adascale' does not know the optimizer {name}: AdaScale needs to know how it "
                     f"preconditions the gradient (it recognises {known}). Use optim='sgd', 'adamw_torch', 'lars', "
                     "'lamb' or 'adamp', or another lr_scaling rule")


def optimizer_kind(optimizer) -> str | None:
    """``optimizer_class_kind`` of the user's optimizer inside its wrappers; AMSGrad is refused."""
    inner = innermost_optimizer(optimizer)
    kind = optimizer_class_kind(type(inner))
    if kind is not None and any(group.get("amsgrad") for group in inner.param_groups):
        raise ValueError("lr_scaling='adascale' does not support amsgrad=True: AMSGrad preconditions with the running "
                         "maximum of v, not with this step's v_hat")
    return kind


class PreconditionedGradients:
    """AdamScale's ``Measurement`` (``core.statistics``): ``L`` and ``T`` of the gradients divided by the
    previous step's ``P`` (``AdaScale._preconditioner``). ``P`` is known only at the reduced gradients, so each
    micro-batch adds its squared gradient per element (one fp32 buffer per parameter during the step) and the
    division happens once per step."""

    def __init__(self, adascale: AdaScale):
        self._adascale = adascale
        self._sq_sums: dict = {}  # per parameter, sum_i w_i (g_i / weight_i)^2 of this step
        self._local_sq = None  # [0, sum_i w_i] of this step
        self._micro_batch_open = False

    def begin_step(self) -> None:
        self._sq_sums, self._local_sq, self._micro_batch_open = {}, None, False

    def add_local(self, param, grad: torch.Tensor, weight: float, share: float) -> None:
        self._micro_batch_open = True
        g = grad.float()
        buffer = self._sq_sums.get(param)
        if buffer is None:
            self._sq_sums[param] = g.square().mul_(share / (weight * weight))
        else:
            buffer.addcmul_(g, g, value=share / (weight * weight))

    def end_micro_batch(self, weight: float, share: float) -> None:
        if self._micro_batch_open:  # the weights' sum: the micro-batch's share of the reduced gradient
            self._micro_batch_open = False
            step = torch.as_tensor([0.0, share])
            self._local_sq = step if self._local_sq is None else self._local_sq + step

    def take(self, model, grad_sq_norm: torch.Tensor, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        local, reduced = self._adascale.preconditioned_sums(model, self._sq_sums, loss_scale)
        self._sq_sums = {}
        weights = self._local_sq[1] if self._local_sq is not None else torch.zeros(())
        self._local_sq = None
        return torch.stack([local, weights.to(local.device)]).to(grad_sq_norm.device).float(), reduced


class AdaScale(SmoothedNoiseScale):
    """AdaScale / AdamScale as an algorithm: a consumer of the trainer's gradient statistics (with AdamScale, it
    provides their measurement), the LR gain (``lr_factor``) and the schedule's clock (progress). Built from
    ``lr_scaling="adascale"``."""

    name = "adascale"
    option = "lr_scaling='adascale'"
    excludes = {"local_sgd": "under local SGD the reduced gradient is rank-local (no all-reduce), so the gain "
                             "would be measured on one rank's gradient",
                "adaptive_batch": "both change what one optimizer step is (AdaScale's progress vs the batch)",
                "autowu": "both own the LR schedule"}

    def __init__(self, theta: float | None = None):
        super().__init__(theta=theta)
        self.progress = 0.0
        self.gain = 1.0
        self.adam = False
        self._kind = None
        self._optimizer = None
        self._base_steps_per_epoch = 1.0
        self._previous = 0.0
        self._rows: dict = {}  # AdamScale: per parameter, its rows' [coverage, touches] (row_history)
        self._pending_rows: dict = {}  # this step's, committed when its update runs
        self._restored_rows: list | None = None  # from a checkpoint, in parameter order, until train begins

    # -- setup
    def check(self, plan) -> None:
        require_two_micro_batches(plan, type(self).__name__)
        if plan.lr_scaling != "adascale":
            raise ValueError("an AdaScale callback needs lr_scaling='adascale' (it owns the LR gain and progress); "
                             f"got lr_scaling={plan.lr_scaling!r}")
        if optimizer_class_kind(plan.optimizer_cls) is not None and plan.backend == "deepspeed":
            raise ValueError(
                f"lr_scaling='adascale' with {plan.optimizer_cls.__name__} (AdamScale) is not supported under "
                "DeepSpeed: its statistics are taken on Adam-preconditioned gradients, and ZeRO keeps v as flattened "
                "shards, so they would silently be wrong. Use DDP (accelerate launch / torchrun) for AdamScale, or "
                "optim='sgd' for AdaScale under DeepSpeed.")
        if plan.scale < 1:
            raise ValueError(f"lr_scaling='adascale' scales up from base_batch_size, but the global batch "
                             f"{plan.global_batch_size} is smaller than base_batch_size={plan.base_batch_size} "
                             f"(S = {plan.scale:g} < 1): set base_batch_size <= the global batch")

    def on_setup(self, args, state, control, *, run, **kwargs):
        # The budget is the base run's: T_base optimizer steps at B0 (an upper bound, since the gain r >= 1).
        # Through ``run.override``: the user's own budget stays readable (``lr_decay_epochs`` places its epochs by
        # it) and comes back when train() ends.
        if args.max_steps <= 0:
            run.override("max_steps", math.ceil(args.num_train_epochs * run.steps_per_epoch() * run.scale))

    def schedule_clock(self, num_training_steps: int) -> Clock:
        """The schedule runs on progress tau (base-batch steps), not on optimizer steps."""
        return Clock(lambda: int(self.progress), "lr_scaling='adascale' needs a schedule of progress",
                     unit="base-batch steps of progress")

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._optimizer = innermost_optimizer(optimizer)
        self._kind = optimizer_kind(optimizer)
        self.adam = self._kind is not None
        self._groups = {p: g for g in self._optimizer.param_groups for p in g["params"]}  # (beta2, eps) by parameter
        self._pending_rows = {}
        if self._restored_rows is not None:
            self._rows = {p: h for p, h in zip(self._groups, self._restored_rows) if h.numel()}
            self._restored_rows = None
        micro = len(train_dataloader)
        ga = args.gradient_accumulation_steps
        self._base_steps_per_epoch = steps_per_epoch(micro, ga) * self.scale
        if self.progress >= state.max_steps:  # resumed from the run's final checkpoint: nothing left to train
            control.should_training_stop = True

    # -- AdamScale: statistics of gradients preconditioned by the previous step's P
    def gradient_measurement(self) -> PreconditionedGradients | None:
        return PreconditionedGradients(self) if self.adam else None
    def _preconditioner(self, param, reduced: torch.Tensor) -> torch.Tensor | None:
        """The statistics' ``P`` for ``param``: the preconditioner Adam applied in the *previous* step, its bias
        correction counted per row (``row_history``); ``inf`` on rows whose second moment rests on fewer than
        ``MIN_SECOND_MOMENT_SAMPLES`` steps (they drop out), None before Adam has state for it. This
        step's row history (from its reduced gradient) waits in ``_pending_rows`` until the update runs
        (``on_lr_applied``)."""
        group = self._groups[param]
        beta2, eps = group["betas"][1], group["eps"]
        st = self._optimizer.state.get(param) or {}
        g = reduced.float()
        if group.get("weight_decay") and type(self._optimizer) is torch.optim.Adam \
                and not group.get("decoupled_weight_decay"):
            g = g + group["weight_decay"] * param.detach().float()  # torch Adam's L2 decay: every row is touched
        history = self._rows.get(param)
        if history is None:  # rows are taken as dense over the optimizer's earlier steps (none in a fresh run)
            steps = float(st.get("step", 0))
            history = torch.stack([torch.full(row_shape(g), 1 - beta2 ** steps, device=g.device),
                                   torch.full(row_shape(g), steps, device=g.device)])
        self._pending_rows[param] = row_history(history, g, beta2)
        coverage, touches = history
        if "exp_avg_sq" not in st:
            return None
        v = st["exp_avg_sq"].float()
        correction = coverage.clamp(min=1e-30)
        if self._kind == "eps_after":
            precond = v.div(correction).sqrt_().add_(eps)
        else:
            precond = v.sqrt().add_(eps).div_(correction.sqrt())
        too_short = touches < MIN_SECOND_MOMENT_SAMPLES
        return precond.masked_fill_(too_short.expand_as(precond), math.inf)

    def preconditioned_sums(self, model, sq_sums: dict, loss_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's ``sum_i w_i ||g_i / P||^2`` from ``sq_sums``, per parameter ``sum_i w_i g_i^2``, and
        ``||g_bar / P||^2``); both nan while no row has enough second-moment history (the first
        ``MIN_SECOND_MOMENT_SAMPLES`` steps: no estimate, the gain stays 1)."""
        local, reduced, measured = [], [], []
        for p in model.parameters():
            if p.grad is None:
                continue
            sq_sum = sq_sums.get(p)
            denom = self._preconditioner(p, p.grad / loss_scale)
            if denom is None:
                continue
            measured.append(torch.isfinite(denom).any())  # a row in the statistics (kept on the device: no sync)
            reduced.append((p.grad.float() / loss_scale / denom).square().sum())
            if sq_sum is not None:
                local.append(sq_sum.div_(denom.square()).sum())
        if not reduced:
            nan = torch.tensor(math.nan)
            return nan, nan
        any_row = torch.stack(measured).any()
        nan = torch.full((), math.nan, device=any_row.device)
        local_sum = torch.stack(local).sum() if local else torch.zeros((), device=any_row.device)
        return torch.where(any_row, local_sum, nan), torch.where(any_row, torch.stack(reduced).sum(), nan)

    def on_reduced_gradients(self, args, state, control, *, statistics, **kwargs):
        super().on_reduced_gradients(args, state, control, statistics=statistics)
        if self.grad_sqr.count:  # the golden test: orthogonal gradients (||G||^2 estimate 0) give r = S
            self.gain = adascale_gain(self.grad_var.value, self.grad_sqr.value, self.step_scale)

    def lr_factor(self) -> float:
        """Multiplier of this step's LR, applied inside ``optimizer.step``."""
        return math.sqrt(self.gain) if self.adam else self.gain

    # -- progress, stopping and cadence on tau
    def on_step_begin(self, args, state, control, **kwargs):
        self._previous = self.progress

    def on_lr_applied(self, args, state, control, *, learning_rate, **kwargs):
        # Fired only by an update that ran: a step the fp16 GradScaler skipped (overflow) makes no progress, so
        # the schedule (on progress) and the budget do not move either; nor does AdamScale's row history, as
        # Adam's own state does not.
        self.progress += self.gain
        self._rows.update(self._pending_rows)
        self._pending_rows = {}

    def on_step_end(self, args, state, control, **kwargs):
        previous = self._previous
        state.epoch = self.progress / self._base_steps_per_epoch
        for strategy, every, flag in ((args.eval_strategy, args.eval_steps, "should_evaluate"),
                                      (args.save_strategy, args.save_steps, "should_save")):
            strategy = option_name(strategy)
            if strategy == "steps":
                period = every if every >= 1 else every * state.max_steps
            elif strategy == "epoch":
                period = self._base_steps_per_epoch
            else:
                continue
            setattr(control, flag, math.floor(self.progress / period) > math.floor(previous / period))
        if self.progress >= state.max_steps:
            control.should_training_stop = True
            # the base budget is spent before HF's max_steps: the end-of-training save and evaluation are ours
            final_save_and_evaluation(args, control, ("steps", "epoch"))

    def on_epoch_end(self, args, state, control, **kwargs):
        # Data epochs are not progress epochs: evaluation and saving follow progress (set in on_step_end).
        if option_name(args.eval_strategy) == "epoch":
            control.should_evaluate = False
        if option_name(args.save_strategy) == "epoch":
            control.should_save = False

    def log_metrics(self) -> dict[str, float]:
        metrics = super().log_metrics()
        metrics.update({"adascale_gain": self.gain, "progress": self.progress})
        return metrics

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "progress": self.progress, "gain": self.gain}
        if self.adam:  # in the optimizer's parameter order; an empty tensor for a parameter not yet touched
            state["row_history"] = [self._rows.get(p, torch.empty(0)).cpu() for p in self._groups]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.progress, self.gain = float(state["progress"]), float(state["gain"])
        if "row_history" in state:
            self._restored_rows = list(state["row_history"])

"""Adaptive batch sizes and local SGD (ALGORITHMS.md section 6; Byrd et al. 2012, Bollapragada et al. 2018,
Lau et al. 2024).

The tests ask whether the current global batch ``b`` is large enough for the gradient's direction to be trusted, and
if not, which batch would be:

    norm           grow while tr(Sigma) / b > eta^2 ||G||^2         b_new = tr(Sigma) / (eta^2 ||G||^2) = B_simple/eta^2
    inner_product  grow while Var_i <g_i, g> / b > theta^2 ||g||^4   b_new = Var_i <g_i, g> / (theta^2 ||g||^4)
    orthogonality  grow while E ||g_i - proj_g g_i||^2 / b > nu^2 ||g||^2
    augmented      the larger of inner_product and orthogonality

``tr(Sigma)`` and ``||G||^2`` are the unbiased micro-batch estimates of ``stats.py`` (section 0: no extra pass, one
scalar all-reduce per step). The inner-product and orthogonality tests need per-example gradients: they are taken on
the first ``test_examples`` examples of each rank's first micro-batch (one small backward each, at the step's
weights: one forward of those examples, then one ``torch.autograd.grad`` per example's loss — no ``.grad`` written,
no collective, BatchNorm normalising over the sub-batch as in training and its buffers restored), dotted
with the step's gradient ``g`` and reduced as four scalars. Numerators and denominators are smoothed separately
(bias-corrected EMA, ``smoothing``), never their ratio.

How the batch grows (``LargeBatchTrainer`` drives it): the global batch is ``per_device_train_batch_size x
accumulation x world_size`` and only the accumulation changes, at a step boundary, to the smallest value whose batch
passes the test (capped by ``max_batch_size``). The data loader is untouched, so the data order is exactly that of a
fixed-batch run: a step simply draws more micro-batches. The LR schedule and the budget count samples (in steps of
the initial batch); the LR follows the batch through ``lr_scaling`` (``none``: unchanged; ``linear``/``sqrt``/
``legw``: the rule's multiplier at the current batch). Decisions come from all-reduced values and are all-reduced
(max) once more, so every rank takes the same one.

Local SGD (``local_sgd_steps = H``): every rank takes H optimizer steps on its own gradients (no all-reduce), then
the parameters (and floating-point buffers) are averaged. The adaptive test then runs at each synchronisation round
on the workers' *local* statistics (each rank's micro-batch estimates with its own gradient, averaged over ranks),
and grows the local batch of every worker alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ..core import backends
from ..core.events import Algorithm, final_save_and_evaluation
from ..core.option_strings import option_name, parse_key_values
from ..core.lr_scaling import peak_lr_multiplier
from ..core.statistics import VAR_FLOOR, BiasCorrectedEMA, GradientStatistics, unbiased_estimates

ADAPTIVE_TESTS = ("none", "norm", "inner_product", "augmented")
EXAMPLE_TESTS = ("inner_product", "augmented")


# ---------------------------------------------------------------- functional core
def norm_test_batch(noise_scale: float, eta: float) -> float:
    """The batch the norm test asks for: ``tr(Sigma) / (eta^2 ||G||^2) = B_simple / eta^2``."""
    return noise_scale / eta ** 2


def inner_product_test_batch(inner_var: float, grad_sqr: float, theta: float) -> float:
    """``Var_i <g_i, g> / (theta^2 ||g||^4)``."""
    return inner_var / (theta ** 2 * grad_sqr ** 2) if grad_sqr > 0 else math.inf


def orthogonality_test_batch(orth_var: float, grad_sqr: float, nu: float) -> float:
    """``E ||g_i - (<g_i, g> / ||g||^2) g||^2 / (nu^2 ||g||^2)``."""
    return orth_var / (nu ** 2 * grad_sqr) if grad_sqr > 0 else math.inf


def example_variances(dot_sum: float, dot_sq_sum: float, sq_norm_sum: float, count: int,
                      grad_sqr: float) -> tuple[float, float]:
    """``(Var_i <g_i, g>, E ||g_i^perp||^2)`` from per-example sums: ``sum <g_i, g>``, ``sum <g_i, g>^2`` and
    ``sum ||g_i||^2`` over ``count >= 2`` examples, and ``||g||^2``. ``||g_i^perp||^2 = ||g_i||^2 - <g_i, g>^2 /
    ||g||^2``; both are sample variances (divided by ``count - 1``), floored at 0."""
    if count < 2:
        raise ValueError("per-example test statistics need at least 2 examples")
    inner_var = (dot_sq_sum - dot_sum ** 2 / count) / (count - 1)
    orth_var = (sq_norm_sum - dot_sq_sum / grad_sqr) / (count - 1) if grad_sqr > 0 else math.inf
    return max(inner_var, 0.0), max(orth_var, 0.0)


def grown_accumulation(requested_batch: float, accumulation: int, examples_per_micro_step: int,
                       max_accumulation: int, max_growth: float = math.inf) -> int:
    """The accumulation whose batch ``accumulation x examples_per_micro_step`` first reaches ``requested_batch``;
    never smaller than now (the batch only grows), at most ``max_growth`` times the current one (at least +1 when
    growing), never above ``max_accumulation``. A nan request (no estimate) keeps the batch."""
    if math.isnan(requested_batch):
        return accumulation
    wanted = (math.ceil(requested_batch / examples_per_micro_step - 1e-9) if math.isfinite(requested_batch)
              else max_accumulation)
    if wanted > accumulation and math.isfinite(max_growth):
        wanted = min(wanted, max(math.floor(accumulation * max_growth), accumulation + 1))
    return min(max(accumulation, wanted), max_accumulation)


def average_across_ranks_(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over ranks (one all-reduce of a flat buffer; identity alone)."""
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def per_example_gradients(model: torch.nn.Module, params: list[torch.Tensor], forward,
                          example_losses) -> Iterator[list[torch.Tensor]]:
    """The gradient of each example's loss, one at a time: one forward of the sub-batch (``forward()`` returns the
    model's outputs; BatchNorm normalises over the sub-batch, as in training, and its buffers are put back), then
    ``example_losses(outputs)`` and one ``torch.autograd.grad`` per loss (no ``.grad`` written, no collective)."""
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:  # the buffers go back after the last backward (BatchNorm's backward still reads them)
        losses = example_losses(forward())
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            yield [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def all_ranks_max(value: int) -> int:
    """The largest ``value`` over ranks: one decision for all even if float sums differ in the last bit."""
    tensor = torch.tensor([value], dtype=torch.float64,
                          device=torch.device("cuda", torch.cuda.current_device())
                          if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl" else None)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


# ---------------------------------------------------------------- configuration
@dataclass
class AdaptiveBatchConfig:
    """``adaptive_batch_args``: the tests' constants (defaults of ALGORITHMS.md section 6), the cap, the number of
    examples per rank for per-example statistics, the EMA coefficient, the test interval in steps and the largest
    growth of the batch per test (``max_growth``: a factor; ``inf`` lets one test jump to any batch).

    [decide] ``max_growth=2``: the smoothed statistics of the first steps rest on a handful of samples, and one
    over-large estimate would otherwise move the batch (which never shrinks) straight to the cap; doubling per test
    still reaches any batch in ``log2(cap / initial)`` tests."""

    max_batch_size: int = 0
    eta: float = 0.1
    theta: float = 0.5
    nu: float = 1.0
    test_examples: int = 8
    smoothing: float = 0.9
    test_interval: int = 1
    max_growth: float = 2.0

    @classmethod
    def from_string(cls, text: str | None) -> AdaptiveBatchConfig:
        kinds = {"float": float, "int": int}
        config = cls(**parse_key_values(text, {f.name: kinds[f.type] for f in fields(cls)}, "adaptive_batch_args"))
        config.check()
        return config

    def check(self) -> None:
        if self.max_batch_size <= 0:
            raise ValueError("adaptive_batch needs adaptive_batch_args 'max_batch_size=N' (the global batch it may "
                             "grow to; a multiple of per_device_train_batch_size x world_size)")
        for name in ("eta", "theta", "nu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"adaptive_batch_args: {name} must be > 0, got {getattr(self, name)}")
        if self.test_examples < 2:
            raise ValueError(f"adaptive_batch_args: test_examples must be >= 2, got {self.test_examples}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"adaptive_batch_args: smoothing must be in [0, 1), got {self.smoothing}")
        if self.test_interval < 1:
            raise ValueError(f"adaptive_batch_args: test_interval must be >= 1, got {self.test_interval}")
        if not self.max_growth > 1:
            raise ValueError(f"adaptive_batch_args: max_growth must be > 1 (a factor per test), got {self.max_growth}")


# ---------------------------------------------------------------- the algorithm
class AdaptiveBatch(GradientStatistics):
    """The adaptive-batch state and decisions. ``LargeBatchTrainer`` draws ``micro_batches_for_next_step()``
    micro-batches per optimizer step and reports them with ``consumed``; the rest happens in events.

    Checkpointed: accumulation, samples and micro-batches seen, the epoch position, the smoothed statistics and
    the history ``(samples seen, global batch chosen for the following steps, requested batch)`` of every test
    (for the batch-size plot)."""

    name = "adaptive_batch"
    excludes = {other: "both change what one optimizer step is; use lr_scaling none | linear | sqrt | legw with it"
                for other in ("autowu", "conadv", "extrapolation")}

    def __init__(self, test: str, config: AdaptiveBatchConfig, lr_scaling: str = "none",
                 base_batch_size: int | None = None, local_sgd_steps: int = 0):
        if test not in ADAPTIVE_TESTS[1:]:
            raise ValueError(f"unknown adaptive_batch={test!r}; choose one of {', '.join(ADAPTIVE_TESTS)}")
        config.check()
        super().__init__(theta=config.smoothing, base_batch_size=base_batch_size)
        self.grad_sqr, self.grad_var = BiasCorrectedEMA(config.smoothing), BiasCorrectedEMA(config.smoothing)
        self.test, self.config, self.lr_scaling = test, config, lr_scaling
        self.option = f"adaptive_batch={test!r}"
        self.local_sgd_steps = local_sgd_steps
        self.inner_var, self.orth_var, self.bar_sqr = (BiasCorrectedEMA(config.smoothing) for _ in range(3))
        self.accumulation = 0  # 0: not started (set by ``start``)
        self.initial_accumulation = 0
        self.micro_batch_size = 0  # examples per micro-batch per rank
        self.world_size = 1
        self.max_accumulation = 0
        self.budget_micro_batches = 0
        self.micro_batches_seen = 0  # per rank, over the whole run
        self.samples_seen = 0  # global
        self.epoch = 0
        self.position = 0  # micro-batches drawn in the current epoch (the sampler position)
        self.requested_batch = float("nan")
        self.history: list[tuple[int, int, float]] = []
        self._steps_in_epoch = 1
        self._pending: int | None = None
        self._step_micro_batches = 0
        self._device = None

    # -- set-up (trainer)
    def start(self, accumulation: int, micro_batch_size: int, world_size: int, budget_micro_batches: int) -> None:
        """A fresh run (a resumed one keeps its restored state, but takes the new budget)."""
        examples = micro_batch_size * world_size
        max_accumulation = self.config.max_batch_size // examples
        if max_accumulation < accumulation:
            raise ValueError(f"adaptive_batch_args max_batch_size={self.config.max_batch_size} is smaller than the "
                             f"initial global batch {accumulation * examples} (per_device_train_batch_size "
                             f"{micro_batch_size} x gradient_accumulation_steps {accumulation} x world_size "
                             f"{world_size})")
        self.micro_batch_size, self.world_size = micro_batch_size, world_size
        self.max_accumulation, self.budget_micro_batches = max_accumulation, budget_micro_batches
        if self.accumulation == 0:
            self.accumulation = self.initial_accumulation = accumulation

    @property
    def batch_size(self) -> int:
        return self.accumulation * self.micro_batch_size * self.world_size

    @property
    def initial_batch_size(self) -> int:
        return self.initial_accumulation * self.micro_batch_size * self.world_size

    @property
    def schedule_step(self) -> int:
        """Where the LR schedule is: samples seen, in steps of the initial batch."""
        return self.micro_batches_seen // self.initial_accumulation

    def begin_epoch(self, epoch: int, steps_in_epoch: int, position: int) -> None:
        self.epoch, self._steps_in_epoch, self.position = epoch, max(steps_in_epoch, 1), position

    def micro_batches_for_next_step(self) -> int:
        return max(min(self.accumulation, self.budget_micro_batches - self.micro_batches_seen), 0)

    def consumed(self, micro_batches: int, examples: int) -> None:
        """This rank drew ``micro_batches`` holding ``examples`` examples for the step about to run."""
        self.position += micro_batches
        self._step_micro_batches = micro_batches
        self.micro_batches_seen += micro_batches
        self.samples_seen += examples * self.world_size

    # -- statistics
    def check(self, plan) -> None:
        if plan.backend == "deepspeed":
            raise ValueError(f"{self.option} is not supported under DeepSpeed: the engine fixes gradient accumulation "
                             "and its gradient reduction at initialisation. Use DDP (accelerate launch / torchrun)")
        if plan.user_scheduler:
            raise ValueError(f"{self.option} runs the LR schedule on samples, but the scheduler passed in "
                             "optimizers=(optimizer, scheduler) counts optimizer steps, whose batch grows: pass "
                             "(optimizer, None) and choose the schedule with lr_scheduler_type")
        if ("local_sgd" in plan.algorithms) != bool(self.local_sgd_steps):
            raise ValueError(f"{self.option} with local SGD must know its period: configure both through the "
                             "arguments (adaptive_batch and local_sgd_steps) or pass AdaptiveBatch(..., "
                             "local_sgd_steps=H) with LocalSGD(H)")
        if self.test == "norm" and self.local_sgd_steps == 0 and plan.micro_batches_per_step < 2:
            raise ValueError("adaptive_batch='norm' estimates the variance from >= 2 micro-batch gradients per step: "
                             "set gradient_accumulation_steps >= 2 (halve per_device_train_batch_size) or use 2 ranks")
        if self.test == "norm" and self.local_sgd_steps > 0 and plan.accumulation < 2:
            raise ValueError("adaptive_batch='norm' with local SGD estimates each worker's variance from its own "
                             ">= 2 micro-batch gradients: set gradient_accumulation_steps >= 2")

    def on_train_begin(self, args, state, control, **kwargs):
        self._world_size = args.world_size
        base = self._base_batch_size or getattr(args, "base_batch_size", None)
        self.base_batch_size = base or self.initial_batch_size

    def is_test_step(self, global_step: int) -> bool:
        """Test at every ``test_interval``-th step; under local SGD at the steps that end with a synchronisation."""
        if self.local_sgd_steps:
            return (global_step + 1) % self.local_sgd_steps == 0
        return (global_step + 1) % self.config.test_interval == 0

    def on_reduced_gradients(self, args, state, control, *, grad_sq_norm, num_micro_batches, num_examples=None,
                             example_gradients=None, **kwargs):
        self._device = grad_sq_norm.device  # where collectives run (a CUDA tensor under NCCL)
        if not self.local_sgd_steps:  # DDP: micro-batch norms of all ranks against the reduced gradient
            super().on_reduced_gradients(args, state, control, grad_sq_norm=grad_sq_norm,
                                         num_micro_batches=num_micro_batches, num_examples=num_examples)
        elif self.is_test_step(state.global_step):
            self._local_statistics(float(grad_sq_norm), num_micro_batches, num_examples)
        else:
            self._micro_norms, self._local_sq = [], None
        if not self.is_test_step(state.global_step):
            return
        if self.test in EXAMPLE_TESTS:
            self._example_statistics(example_gradients, float(grad_sq_norm))
        self._decide()

    def _local_statistics(self, grad_sq: float, num_micro_batches: int, num_examples: int | None) -> None:
        """Local SGD: each worker's own unbiased estimates (its micro-batches against its own gradient, weighted by
        their shares of it), averaged over workers with one scalar all-reduce."""
        weighted_sq, weights = self._take_local_sums(self._device).tolist()
        n = num_micro_batches
        # the worker's own gradient is sum_i weight_i g_i: its shares are the loss weights (world_size x ours)
        local_mean = weighted_sq / weights if weights > 0 else math.nan
        estimates = unbiased_estimates(local_mean, grad_sq, n) if n >= 2 else (math.nan, math.nan)
        packed = backends.all_reduce_sum(torch.tensor([*estimates, 1.0], dtype=torch.float64, device=self._device))
        grad_sqr, micro_var, workers = packed.tolist()
        if not (math.isfinite(grad_sqr) and math.isfinite(micro_var)):
            self.skipped_steps += 1
            return
        grad_sqr, micro_var = grad_sqr / workers, micro_var / workers
        examples = num_examples if num_examples is not None else n * self.micro_batch_size
        self.grad_sqr.update(grad_sqr)
        self.grad_var.update(max(micro_var * examples / n / self.base_batch_size, VAR_FLOOR))

    def _example_statistics(self, example_gradients, grad_sq: float) -> None:
        if example_gradients is None:
            raise RuntimeError(f"adaptive_batch={self.test!r} needs per-example gradients, which this backend does "
                               "not provide (LargeBatchTrainer does under single process, DDP and local SGD)")
        dot_sum = dot_sq_sum = sq_norm_sum = 0.0
        count = 0
        reduced, gradients = example_gradients(self.config.test_examples)
        for grads in gradients:
            dot = float(sum(torch.vdot(g.reshape(-1).float(), r.reshape(-1).float()) for g, r in zip(grads, reduced)))
            sq = float(sum(torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads))
            dot_sum, dot_sq_sum, sq_norm_sum, count = dot_sum + dot, dot_sq_sum + dot * dot, sq_norm_sum + sq, count + 1
        packed = backends.all_reduce_sum(torch.tensor([dot_sum, dot_sq_sum, sq_norm_sum, count, grad_sq, 1.0],
                                                      dtype=torch.float64, device=self._device))
        dot_sum, dot_sq_sum, sq_norm_sum, count, grad_sq, workers = packed.tolist()
        grad_sq /= workers
        if count < 2 or not all(math.isfinite(v) for v in (dot_sq_sum, sq_norm_sum, grad_sq)):
            self.skipped_steps += 1
            return
        inner_var, orth_var = example_variances(dot_sum, dot_sq_sum, sq_norm_sum, int(count), grad_sq)
        self.inner_var.update(inner_var)
        self.orth_var.update(orth_var)
        self.bar_sqr.update(grad_sq)

    def requested(self) -> float:
        """The batch the configured test asks for, from the smoothed statistics (nan while there is no estimate:
        no statistics yet, or a smoothed ``||G||^2`` that is not positive)."""
        if self.test == "norm":
            return norm_test_batch(self.noise_scale, self.config.eta)  # noise_scale is nan without an estimate
        if self.bar_sqr.count == 0 or not self.bar_sqr.value > 0:
            return math.nan
        inner = inner_product_test_batch(self.inner_var.value, self.bar_sqr.value, self.config.theta)
        if self.test == "inner_product":
            return inner
        return max(inner, orthogonality_test_batch(self.orth_var.value, self.bar_sqr.value, self.config.nu))

    def _decide(self) -> None:
        self.requested_batch = self.requested()
        if math.isnan(self.requested_batch):
            return
        examples = self.micro_batch_size * self.world_size
        wanted = grown_accumulation(self.requested_batch, self.accumulation, examples, self.max_accumulation,
                                    self.config.max_growth)
        self._pending = all_ranks_max(wanted)
        self.history.append((self.samples_seen, self._pending * examples, self.requested_batch))

    # -- step end: the new batch from the next step on, the epoch and the budget in samples
    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            self.accumulation, self._pending = max(self.accumulation, self._pending), None
        state.epoch = self.epoch + self.position / self._steps_in_epoch
        if self.micro_batches_seen >= self.budget_micro_batches:
            control.should_training_stop = True
            # HF's loop counts micro-batches here and may not reach its max_steps: the final save/eval are ours
            final_save_and_evaluation(args, control, ("steps",))

    def lr_factor(self) -> float:
        """The scaling rule's multiplier at this step's batch (the last one of an epoch may be short) over the one
        at the initial batch (built into the scheduler); 1 with ``lr_scaling='none'``."""
        step_accumulation = self._step_micro_batches or self.accumulation
        if self.lr_scaling == "none" or step_accumulation == self.initial_accumulation:
            return 1.0
        base = self.base_batch_size
        step_batch = step_accumulation * self.micro_batch_size * self.world_size
        return (peak_lr_multiplier(self.lr_scaling, step_batch / base)
                / peak_lr_multiplier(self.lr_scaling, self.initial_batch_size / base))

    def log_metrics(self) -> dict[str, float]:
        logs = {**super().log_metrics(), "batch_size": self.batch_size, "samples": self.samples_seen,
                "requested_batch": self.requested_batch}
        if self.test in EXAMPLE_TESTS and self.bar_sqr.count:
            logs.update(inner_product_var=self.inner_var.value, orthogonal_var=self.orth_var.value)
        return logs

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "inner_var": self.inner_var.state_dict(), "orth_var": self.orth_var.state_dict(),
                "bar_sqr": self.bar_sqr.state_dict(),
                "accumulation": self.accumulation, "initial_accumulation": self.initial_accumulation,
                "micro_batches_seen": self.micro_batches_seen, "samples_seen": self.samples_seen,
                "epoch": self.epoch, "position": self.position, "requested_batch": self.requested_batch,
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name in ("inner_var", "orth_var", "bar_sqr"):
            getattr(self, name).load_state_dict(state[name])
        for name in ("accumulation", "initial_accumulation", "micro_batches_seen", "samples_seen", "epoch",
                     "position"):
            setattr(self, name, int(state[name]))
        self.requested_batch = float(state["requested_batch"])
        self.history = [(int(s), int(b), float(r)) for s, b, r in state["history"].tolist()]


class LocalSGD(Algorithm):
    """Local SGD: H optimizer steps on each rank's own gradients, then the parameters and floating-point buffers
    are averaged over ranks (``LargeBatchTrainer`` runs every backward under DDP's ``no_sync``).

    The optimizer state (momentum) stays local, as in local SGD; it is saved per rank with this algorithm's state
    and restored on resume (HF's checkpoint holds rank 0's only). Checkpoints must fall on synchronisation rounds,
    where every rank holds the same weights (checked at ``train()``); the end of training synchronises before its
    final save and evaluation, wherever it falls."""

    name = "local_sgd"
    excludes = {other: "both change what one optimizer step is; use lr_scaling none | linear | sqrt | legw with it"
                for other in ("autowu", "conadv", "extrapolation")}

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"local_sgd_steps must be >= 1, got {steps}")
        self.steps = steps
        self.option = f"local_sgd_steps={steps}"
        self._synced_step = -1
        self.syncs = 0
        self._optimizer = None
        self._loaded_optimizer_state = None

    def check(self, plan) -> None:
        """Refuses DeepSpeed, and checkpoints or evaluations between synchronisation rounds."""
        if plan.backend == "deepspeed":
            raise ValueError(f"{self.option} is not supported under DeepSpeed: the engine fixes its gradient "
                             "reduction at initialisation. Use DDP (accelerate launch / torchrun)")
        for kind in ("save", "eval"):
            strategy = getattr(plan.args, f"{kind}_strategy")
            strategy, every = option_name(strategy), getattr(plan.args, f"{kind}_steps")
            if strategy == "no" or (strategy == "steps" and every and float(every).is_integer()
                                    and every % self.steps == 0):
                continue
            raise ValueError(f"{self.option}: the ranks hold the same weights only every {self.steps} steps, so "
                             f"{kind}_strategy must be 'no' or 'steps' with {kind}_steps a multiple of {self.steps} "
                             f"(got {kind}_strategy={strategy!r}, {kind}_steps={every})")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._optimizer = optimizer
        if self._loaded_optimizer_state is not None and optimizer is not None:
            optimizer.load_state_dict(self._loaded_optimizer_state)
            self._loaded_optimizer_state = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # every H steps, and at a save / evaluation / stop that falls between rounds (the end of training): a
        # checkpoint must never hold one rank's unsynchronised weights
        if (state.global_step % self.steps == 0 or control.should_save or control.should_evaluate
                or control.should_training_stop or state.global_step >= state.max_steps):
            self.synchronize(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._synced_step != state.global_step:  # leave every rank with the same final model
            self.synchronize(model, state.global_step)

    def synchronize(self, model, step: int) -> None:
        tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        average_across_ranks_(tensors)
        self.syncs += 1
        self._synced_step = step

    def log_metrics(self) -> dict[str, float]:
        return {"local_sgd_syncs": self.syncs}

    def state_dict(self) -> dict:
        state = {"syncs": self.syncs}
        if self._optimizer is not None:
            state["optimizer"] = self._optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.syncs = int(state["syncs"])
        self._loaded_optimizer_state = state.get("optimizer")

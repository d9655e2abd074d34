"""Adaptive batch sizes and local SGD (ALGORITHMS.md section 6; Byrd et al. 2012, Bollapragada et al. 2018,
Lau et al. 2024).

The tests ask whether the current global batch ``b`` is large enough for the gradient's direction to be trusted, and
if not, which batch would be:

    norm           grow while tr(Sigma) / b > eta^2 ||G||^2         b_new = tr(Sigma) / (eta^2 ||G||^2) = B_simple/eta^2
    inner_product  grow while Var_i <g_i, g> / b > theta^2 ||g||^4   b_new = Var_i <g_i, g> / (theta^2 ||g||^4)
    orthogonality  grow while E ||g_i - proj_g g_i||^2 / b > nu^2 ||g||^2
    augmented      the larger of inner_product and orthogonality

``tr(Sigma)`` and ``||G||^2`` are the unbiased micro-batch estimates of the trainer's gradient statistics
(``core/statistics.py``, section 0: no extra pass, one scalar all-reduce per step). The inner-product and
orthogonality tests need per-example gradients: they are taken on the first ``test_examples`` examples of each
rank's first micro-batch (one small backward each, at the step's weights: one forward of those examples, then one
``torch.autograd.grad`` per example's loss — no ``.grad`` written, no collective, BatchNorm normalising over the
sub-batch as in training and its buffers restored), dotted with the step's gradient ``g`` and reduced as four
scalars. Numerators and denominators are smoothed separately (bias-corrected EMA, ``smoothing``), never their
ratio.

How the batch grows (through the trainer's events): the global batch is ``per_device_train_batch_size x
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
from dataclasses import dataclass, fields

import torch

from ..core import backends
from ..core.events import Algorithm, Clock, final_save_and_evaluation
from ..core.lr_scaling import peak_lr_multiplier
from ..core.option_strings import parse_key_values, require_positive_finite
from ..core.statistics import BiasCorrectedEMA, SmoothedNoiseScale

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
            require_positive_finite(getattr(self, name), f"adaptive_batch_args: {name}")
        if self.test_examples < 2:
            raise ValueError(f"adaptive_batch_args: test_examples must be >= 2, got {self.test_examples}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"adaptive_batch_args: smoothing must be in [0, 1), got {self.smoothing}")
        if self.test_interval < 1:
            raise ValueError(f"adaptive_batch_args: test_interval must be >= 1, got {self.test_interval}")
        if not self.max_growth > 1:
            raise ValueError(f"adaptive_batch_args: max_growth must be > 1 (a factor per test), got {self.max_growth}")


# ---------------------------------------------------------------- the algorithm
class AdaptiveBatch(SmoothedNoiseScale):
    """The adaptive-batch state and decisions, all through events: it owns how many micro-batches each step draws
    (``micro_batches_for_step``), the schedule's clock (samples) and, on resume, the sampler's position; it consumes
    the trainer's gradient statistics (and per-example gradients for the inner-product tests).

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

    # -- set-up
    @property
    def needs_example_gradients(self) -> bool:
        return self.test in EXAMPLE_TESTS

    def on_setup(self, args, state, control, *, run, **kwargs):
        """Take the accumulation over: HF's loop runs with 1 (one step's micro-batches per loop step) and
        ``max_steps`` counts micro-batches, the budget (``max_steps`` or ``num_train_epochs`` at the initial
        batch); both go back after ``train()``."""
        accumulation = args.gradient_accumulation_steps
        if args.max_steps > 0:
            budget = args.max_steps * accumulation
        else:
            budget = math.ceil(args.num_train_epochs * run.train_micro_batches())
        self.start(accumulation, args.per_device_train_batch_size, args.world_size, budget)
        run.override("gradient_accumulation_steps", 1)
        if args.max_steps > 0:
            run.override("max_steps", budget)

    def schedule_clock(self, num_training_steps: int) -> Clock:
        """The schedule counts samples, in steps of the initial batch."""
        return Clock(lambda: self.schedule_step, "adaptive_batch needs a schedule of samples",
                     length=math.ceil(self.budget_micro_batches / self.initial_accumulation),
                     unit="steps of the initial batch's samples")

    def resume_position(self, steps_per_epoch: int) -> tuple[int, int]:
        """HF counts the position in steps x a fixed accumulation; ours is the sampler position itself."""
        if self.position >= steps_per_epoch:  # saved at the very end of an epoch
            return self.epoch + 1, 0
        return self.epoch, self.position

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

    def on_epoch_position(self, args, state, control, *, epoch: int, steps_in_epoch: int, position: int,
                          **kwargs):
        self.epoch, self._steps_in_epoch, self.position = epoch, max(steps_in_epoch, 1), position

    def micro_batches_for_step(self) -> int:
        return max(min(self.accumulation, self.budget_micro_batches - self.micro_batches_seen), 0)

    def on_micro_batches_drawn(self, args, state, control, *, micro_batches: int, examples: int, **kwargs):
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
        # (not SmoothedNoiseScale's: the arguments' accumulation is ours by now, the smoothing is the config's)
        base = self._base_batch_size or getattr(args, "base_batch_size", None)
        self.base_batch_size = base or self.initial_batch_size

    def settings(self) -> dict:
        return {"test": self.test, **Algorithm.settings(self)}

    def wants_statistics_at(self, global_step: int) -> bool:
        """Every step (smoothed between tests), but under local SGD only at synchronisation rounds: the workers'
        statistics are all-reduced there, where local SGD communicates anyway."""
        return not self.local_sgd_steps or self.is_test_step(global_step)

    def is_test_step(self, global_step: int) -> bool:
        """Test at every ``test_interval``-th step; under local SGD at the steps that end with a synchronisation."""
        if self.local_sgd_steps:
            return (global_step + 1) % self.local_sgd_steps == 0
        return (global_step + 1) % self.config.test_interval == 0

    def on_reduced_gradients(self, args, state, control, *, grad_sq_norm, statistics, example_gradients=None,
                             **kwargs):
        self._device = grad_sq_norm.device  # where collectives run (a CUDA tensor under NCCL)
        if statistics is not None:
            self.add(statistics)
        if not self.is_test_step(state.global_step):
            return
        if self.test in EXAMPLE_TESTS:
            self._example_statistics(example_gradients, float(grad_sq_norm))
        self._decide()

    def _example_statistics(self, example_gradients, grad_sq: float) -> None:
        if example_gradients is None:
            raise RuntimeError(f"adaptive_batch={self.test!r} needs per-example gradients, which this backend does "
                               "not provide (LargeBatchTrainer does under single process, DDP and local SGD)")
        dot_sum = dot_sq_sum = sq_norm_sum = 0.0
        count = 0
        reduced, gradients = example_gradients(self.config.test_examples)
        try:
            for grads in gradients:  # one example's gradient at a time
                dot = float(sum(torch.vdot(g.reshape(-1).float(), r.reshape(-1).float())
                                for g, r in zip(grads, reduced)))
                sq = float(sum(torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads))
                dot_sum, dot_sq_sum, sq_norm_sum, count = (dot_sum + dot, dot_sq_sum + dot * dot, sq_norm_sum + sq,
                                                           count + 1)
        except ValueError as error:  # the model's outputs have no per-example loss
            raise ValueError(f"adaptive_batch={self.test!r}: {error} (use adaptive_batch='norm', which needs no "
                             "per-example gradients)") from error
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
        self._pending = backends.all_ranks_max(wanted)
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
        logs = {**super().log_metrics(), "scale": self.batch_size / self.base_batch_size,
                "batch_size": self.batch_size, "samples": self.samples_seen,
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

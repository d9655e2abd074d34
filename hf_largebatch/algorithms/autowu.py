"""AutoWU (Kim et al., 2021): an exponential warm-up that stops by itself when a Gaussian-process-smoothed training
loss has passed its minimum, then decays to zero (ALGORITHMS.md section 3).

    warm-up:  lr_t = min_lr * gamma^t,  gamma = (max_lr / min_lr)^(1 / cap),  cap = warmup_fraction * T
    vote:     every ``vote_every`` optimizer steps, fit a GP (scikit-learn: constant * RBF(lengthscale, fixed)
              + white noise) to all n warm-up losses vs x = t / n; on ``posteriors`` fresh subsamples predict the
              latent curve f on a grid of [0, x_now]; a posterior says yes if max_i P(f(x_i) < f(x_now)) > confidence;
              the vote is yes if at least ``min_yes`` posteriors say yes
    switch:   after ``patience`` consecutive yes-votes, or at the cap: lr <- the LR at the predicted minimum of f
              (mean over posteriors of the LR at each posterior mean's argmin)
    decay:    ``cos``: cosine from the switch LR to 0 over the remaining steps; ``const-cos``: constant, then cosine
              over the last ``cos_fraction`` of the run

``AutoWUController`` is the functional core (no torch, no Trainer): ``record(loss)`` per optimizer step,
``vote()`` (the GP work, a pure function of the state), ``apply(vote)`` and ``lr(step)``. ``AutoWU`` is the thin
Trainer integration: fed the globally averaged loss of every step (``on_step_loss``), rank 0 votes and broadcasts
the result, so every rank takes the same decision; ``LargeBatchTrainer`` builds a ``LambdaLR`` on ``lr(step)``.

[decide] ``learning_rate`` is AutoWU's ``max_lr`` (the top of the warm-up range; the spec's default is 1.0, so set
it). Time is normalised by the number of losses so far, as in the reference (kakaobrain/autowu,
``Regressor.subsample_and_condition``): x in [0, 1) at every vote, the lengthscale 0.2 is a fifth of the history,
and the vote on a loss history does not depend on the cap. A non-finite loss is recorded as the largest finite
loss so far (a divergence is a loss that stopped falling). The GP's "constant mean" is scikit-learn's
``normalize_y`` (the losses' mean and scale). The switch takes effect from the next optimizer step. ``const-cos``
starts its cosine at ``(1 - cos_fraction) T`` (or at the switch, if later).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..core import backends
from ..core.events import Algorithm
from ..core.option_strings import parse_key_values

DECAYS = ("cos", "const-cos")


@dataclass
class AutoWUConfig:
    """Every AutoWU parameter, with the spec's defaults (``max_lr`` is the run's ``learning_rate``)."""

    min_lr: float = 1e-5
    warmup_fraction: float = 0.5  # the warm-up cap, as a fraction of the run's optimizer steps
    vote_every: int = 0  # optimizer steps per vote ("epoch" of voting); 0: one epoch of optimizer steps
    patience: int = 3  # consecutive yes-votes that end the warm-up
    posteriors: int = 5
    min_yes: int = 3  # posteriors that must say yes for a yes-vote
    confidence: float = 0.95
    lengthscale: float = 0.2
    noise: float = 1e-3  # initial noise level of the GP (fitted)
    fit_points: int = 100  # subsample for the hyper-parameter fit
    sample_points: int = 500  # subsample per posterior
    grid_points: int = 500
    decay: str = "cos"
    cos_fraction: float = 0.2  # const-cos: the cosine covers this last fraction of the run
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.min_lr > 0, "min_lr must be > 0"),
            (0 < self.warmup_fraction <= 1, "warmup_fraction must be in (0, 1]"),
            (self.vote_every >= 0, "vote_every must be >= 0 (0: one epoch)"),
            (self.patience >= 1, "patience must be >= 1"),
            (1 <= self.min_yes <= self.posteriors, "min_yes must be in [1, posteriors]"),
            (0 < self.confidence < 1, "confidence must be in (0, 1)"),
            (self.lengthscale > 0 and self.noise > 0, "lengthscale and noise must be > 0"),
            (min(self.fit_points, self.sample_points, self.grid_points) >= 2, "point counts must be >= 2"),
            (self.decay in DECAYS, f"decay must be one of {', '.join(DECAYS)}"),
            (0 < self.cos_fraction <= 1, "cos_fraction must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AutoWU: {message}")

    @classmethod
    def from_string(cls, text: str | None) -> AutoWUConfig:
        """From ``"key=value,key=value"`` (the ``autowu_args`` option, in the style of HF's ``optim_args``)."""
        kinds = {"float": float, "int": int, "str": str}  # field types are strings here (postponed annotations)
        return cls(**parse_key_values(text, {f.name: kinds[f.type] for f in fields(cls)}, "autowu_args"))


@dataclass
class Vote:
    yes: bool
    probability: float  # the median over posteriors of max_i P(f(x_i) < f(x_now))
    predicted_lr: float  # LR at the predicted minimum of the smoothed loss


class AutoWUController:
    """AutoWU's state machine over optimizer steps ``0 .. total_steps - 1`` (see the module docstring)."""

    def __init__(self, config: AutoWUConfig, max_lr: float, total_steps: int, steps_per_epoch: int = 1):
        if max_lr <= config.min_lr:
            raise ValueError(f"AutoWU warms up from min_lr={config.min_lr} to learning_rate={max_lr}: the learning "
                             "rate (AutoWU's max_lr; the spec's default is 1.0) must be larger than min_lr")
        self.config = config
        self.max_lr = max_lr
        self.total_steps = max(int(total_steps), 2)
        self.cap = max(int(round(config.warmup_fraction * self.total_steps)), 2)
        self.vote_every = config.vote_every or max(int(steps_per_epoch), 1)
        self.log_gamma = math.log(max_lr / config.min_lr) / self.cap
        self.losses: list[float] = []
        self.votes: list[tuple[int, bool, float, float]] = []  # (step, yes, probability, predicted LR)
        self.consecutive_yes = 0
        self.switch_step: int | None = None
        self.switch_lr: float | None = None
        self.gp_seconds = 0.0

    # -- the schedule
    def warmup_lr(self, step: float) -> float:
        return self.config.min_lr * math.exp(self.log_gamma * min(step, self.cap))

    def lr(self, step: int) -> float:
        """The LR of optimizer step ``step`` given what has been decided so far."""
        if self.switch_step is None or step < self.switch_step:
            return self.warmup_lr(step)
        start = self.switch_step
        if self.config.decay == "const-cos":
            start = max(start, int(round((1 - self.config.cos_fraction) * self.total_steps)))
            if step < start:
                return self.switch_lr
        span = max(self.total_steps - start, 1)
        return self.switch_lr * 0.5 * (1 + math.cos(math.pi * min(step - start, span) / span))

    @property
    def in_warmup(self) -> bool:
        return self.switch_step is None

    # -- decisions
    def record(self, loss: float) -> bool:
        """One optimizer step's (global mean) loss; True when a vote is due now."""
        if not self.in_warmup:
            return False
        if not math.isfinite(loss):
            finite = [x for x in self.losses if math.isfinite(x)]
            loss = max(finite) if finite else 0.0
        self.losses.append(float(loss))
        n = len(self.losses)
        return n % self.vote_every == 0 or n >= self.cap

    def vote(self) -> Vote:
        """The GP vote on the losses so far (deterministic: seeded by the vote's index)."""
        start = time.perf_counter()
        try:
            return self._vote()
        finally:
            self.gp_seconds += time.perf_counter() - start

    def _vote(self) -> Vote:
        with warnings.catch_warnings():  # a smooth curve drives the noise to its bound: expected, not a problem
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._gp_vote()

    def _gp_vote(self) -> Vote:
        from scipy.stats import norm
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        cfg = self.config
        rng = np.random.default_rng([cfg.seed, len(self.votes)])
        y = np.asarray(self.losses, dtype=np.float64)
        x = np.arange(len(y), dtype=np.float64) / len(y)  # time / history length (module docstring)
        if len(y) < 3 or np.ptp(y) == 0:  # nothing to fit yet: no, and stay where we are
            return Vote(False, 0.0, self.warmup_lr(len(y) - 1))

        def subsample(k):
            idx = np.sort(rng.choice(len(y), size=min(k, len(y)), replace=False))
            return x[idx, None], y[idx]

        kernel = (ConstantKernel(1.0) * RBF(cfg.lengthscale, length_scale_bounds="fixed")
                  + WhiteKernel(cfg.noise, noise_level_bounds=(1e-8, 1e1)))
        fit = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(*subsample(cfg.fit_points))
        fitted = fit.kernel_
        noise = fitted.k2.noise_level
        grid = np.linspace(0.0, x[-1], cfg.grid_points)[:, None]
        probabilities, lrs = [], []
        for _ in range(cfg.posteriors):
            gp = GaussianProcessRegressor(fitted, optimizer=None, normalize_y=True).fit(*subsample(cfg.sample_points))
            mean, cov = gp.predict(grid, return_cov=True)
            cov = cov - noise * gp._y_train_std ** 2 * np.eye(len(grid))  # the latent f: no observation noise
            var = np.diag(cov)
            diff_var = np.maximum(var[:-1] + var[-1] - 2 * cov[:-1, -1], 1e-12)
            p_below = norm.cdf((mean[-1] - mean[:-1]) / np.sqrt(diff_var))  # P(f(x_i) < f(x_now))
            probabilities.append(float(p_below.max()))
            lrs.append(self.warmup_lr(grid[int(np.argmin(mean)), 0] * len(y)))
        yes = sum(p > cfg.confidence for p in probabilities) >= cfg.min_yes
        return Vote(yes, float(np.median(probabilities)), float(np.mean(lrs)))

    def apply(self, vote: Vote) -> None:
        """Take a vote (the same on every rank): count it, and switch after ``patience`` yes-votes or at the cap."""
        step = len(self.losses)
        self.votes.append((step, bool(vote.yes), float(vote.probability), float(vote.predicted_lr)))
        self.consecutive_yes = self.consecutive_yes + 1 if vote.yes else 0
        if self.consecutive_yes >= self.config.patience or step >= self.cap:
            self.switch_step = step  # the next optimizer step runs on the new LR
            self.switch_lr = float(vote.predicted_lr)

    # -- checkpoint state
    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "losses": list(self.losses),
                "votes": [list(v) for v in self.votes], "consecutive_yes": self.consecutive_yes,
                "switch_step": -1 if self.switch_step is None else self.switch_step,
                "switch_lr": 0.0 if self.switch_lr is None else self.switch_lr, "gp_seconds": self.gp_seconds}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config):
            raise ValueError(f"this checkpoint's AutoWU ran with {state['config']}, this run asks for "
                             f"{asdict(self.config)}: resume with the same autowu_args")
        self.losses = [float(v) for v in state["losses"]]
        self.votes = [(int(s), bool(y), float(p), float(lr)) for s, y, p, lr in state["votes"]]
        self.consecutive_yes = int(state["consecutive_yes"])
        self.switch_step = None if int(state["switch_step"]) < 0 else int(state["switch_step"])
        self.switch_lr = None if self.switch_step is None else float(state["switch_lr"])
        self.gp_seconds = float(state["gp_seconds"])


class AutoWU(Algorithm):
    """AutoWU as an algorithm (built from ``lr_schedule="autowu"``): it owns the schedule's shape (``lr_lambda``:
    the trainer's ``LambdaLR`` runs on ``controller.lr``) and votes on the step losses (``on_step_loss``)."""

    name = "autowu"
    option = "lr_schedule='autowu'"

    def check(self, plan) -> None:
        """AutoWU owns the whole LR schedule: no scaling rule, no warm-up of the user's, no user scheduler."""
        if plan.lr_schedule != "autowu":
            raise ValueError("an AutoWU callback needs lr_schedule='autowu' (it owns the LR schedule); got "
                             f"lr_schedule={plan.lr_schedule!r}")
        if plan.lr_scaling != "none":
            raise ValueError(f"lr_schedule='autowu' finds the learning rate itself; it cannot be combined with "
                             f"lr_scaling={plan.lr_scaling!r}. Use lr_scaling='none' and set learning_rate to the "
                             "top of AutoWU's warm-up range (max_lr)")
        if plan.warmup:
            raise ValueError("lr_schedule='autowu' owns the warm-up: leave warmup_steps (and warmup_ratio) at 0")

    def __init__(self, config: AutoWUConfig | None = None):
        self.config = config or AutoWUConfig()
        self.controller: AutoWUController | None = None
        self._pending_state: dict | None = None

    def lr_lambda(self, max_lr: float, num_training_steps: int, steps_per_epoch: int):
        """Asked when the scheduler is created (the run's length is known there); the groups' base LR is
        ``max_lr``."""
        self.controller = AutoWUController(self.config, max_lr, num_training_steps, steps_per_epoch)
        if self._pending_state is not None:
            self.controller.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.multiplier

    def multiplier(self, step: int) -> float:
        """``LambdaLR`` factor of step ``step``: the groups' base LR is ``max_lr``."""
        return self.controller.lr(step) / self.controller.max_lr

    def on_step_loss(self, args, state, control, *, loss, **kwargs):
        if not self.controller.record(loss):
            return
        vote = self.controller.vote() if args.process_index == 0 else Vote(False, 0.0, 0.0)
        yes, probability, predicted_lr = backends.broadcast_floats(
            [float(vote.yes), vote.probability, vote.predicted_lr])
        self.controller.apply(Vote(yes > 0.5, probability, predicted_lr))

    def log_metrics(self) -> dict[str, float]:
        c = self.controller
        if c is None:
            return {}
        metrics = {"autowu_phase": 0.0 if c.in_warmup else 1.0, "autowu_consecutive_yes": float(c.consecutive_yes),
                   "autowu_votes": float(len(c.votes)), "autowu_gp_seconds": c.gp_seconds}
        if c.votes:
            metrics["autowu_vote_probability"] = c.votes[-1][2]
            metrics["autowu_predicted_lr"] = c.votes[-1][3]
        if not c.in_warmup:
            metrics["autowu_switch_step"] = float(c.switch_step)
            metrics["autowu_switch_lr"] = c.switch_lr
        return metrics

    def state_dict(self) -> dict:
        return self.controller.state_dict() if self.controller is not None else (self._pending_state or {})

    def load_state_dict(self, state: dict) -> None:
        if self.controller is None:  # the scheduler (and the controller) may not exist yet
            self._pending_state = state
        else:
            self.controller.load_state_dict(state)

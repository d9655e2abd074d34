"""Adding an algorithm needs no change to the trainer: a new method written in one file, against the public API.

The toy method is *gradient clipping by noise scale*: when a step's reduced gradient is much longer than the
estimated true gradient (``||g_bar||^2 > factor^2 * smoothed ||G||^2``), the excess is noise, so the gradient is
scaled back to that bound before the update. It reads the trainer's shared gradient statistics (one estimator per
trainer: ``needs_gradient_statistics``), changes ``p.grad`` in ``on_reduced_gradients`` (before HF's clipping and the
update), refuses the runs it cannot serve in ``check``, and checkpoints its state. Everything below the class is what
a contributor would test for it.
"""

import math
import tempfile

import pytest
import torch

from hf_largebatch import Algorithm, LargeBatchArguments, LargeBatchTrainer, NoiseScaleMonitor
from hf_largebatch.core.statistics import GradientStatistics
from helpers import DictDataset

DIM = 6


# ---------------------------------------------------------------- the new algorithm: its own file in the library
class NoiseScaleClipping(Algorithm):
    """Clip the step's reduced gradient to ``factor * sqrt(smoothed ||G||^2)`` (the smoothing: an EMA of the
    trainer's per-step estimates with coefficient ``theta``)."""

    name = "noise_scale_clipping"
    option = "callbacks=[NoiseScaleClipping()]"
    needs_gradient_statistics = True
    excludes = {"local_sgd": "under local SGD the reduced gradient is each rank's own"}

    def __init__(self, factor: float = 1.0, theta: float = 0.9):
        self.factor, self.theta = factor, theta
        self.mean_sq: float | None = None
        self.clipped_steps = 0
        self.bounds: list[float] = []  # the bound of each clipped step (for the test)

    def check(self, plan) -> None:
        if plan.micro_batches_per_step < 2:
            raise ValueError(f"{self.option} needs >= 2 micro-batches per step for the statistics: set "
                             "gradient_accumulation_steps >= 2 or run on >= 2 ranks")
        if plan.backend == "deepspeed":
            raise ValueError(f"{self.option} rescales p.grad, which DeepSpeed ZeRO keeps in its partitions: use DDP")

    def on_reduced_gradients(self, args, state, control, *, model, grad_sq_norm, statistics, **kwargs):
        if statistics.valid:
            x = statistics.grad_sqr
            self.mean_sq = x if self.mean_sq is None else self.theta * self.mean_sq + (1 - self.theta) * x
        if not self.mean_sq:
            return
        bound = self.factor ** 2 * self.mean_sq
        if float(grad_sq_norm) > bound:
            scale = math.sqrt(bound / float(grad_sq_norm))
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            self.clipped_steps += 1
            self.bounds.append(bound)

    def log_metrics(self):
        return {"noise_clipped_steps": self.clipped_steps}

    def state_dict(self):
        return {"mean_sq": -1.0 if self.mean_sq is None else self.mean_sq, "clipped_steps": self.clipped_steps}

    def load_state_dict(self, state):
        self.mean_sq = None if state["mean_sq"] < 0 else float(state["mean_sq"])
        self.clipped_steps = int(state["clipped_steps"])


# ---------------------------------------------------------------- its tests
class MeanEstimator(torch.nn.Module):
    """loss = mean_j 0.5 ||w - x_j||^2 over Gaussian points: a noisy gradient whose true norm is known."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DIM))

    def forward(self, x, labels=None):
        return {"loss": 0.5 * ((self.w - x) ** 2).sum(-1).mean()}


def gaussian_points(n=512):
    g = torch.Generator().manual_seed(0)
    return DictDataset(x=0.3 + 2.0 * torch.randn(n, DIM, generator=g), labels=torch.zeros(n, dtype=torch.long))


class GradientNormAtUpdate(Algorithm):
    """Records the gradient norm the optimizer is handed (after every algorithm and HF's clipping)."""

    name = "gradient_norm_at_update"

    def __init__(self):
        self.sq_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.sq_norms.append(float(sum(p.grad.double().square().sum() for p in model.parameters())))


def train(callbacks, output_dir=None, ga=2, steps=12, resume=None, **extra):
    options = dict(output_dir=output_dir or tempfile.mkdtemp(), per_device_train_batch_size=8,
                   gradient_accumulation_steps=ga, max_steps=steps, optim="sgd", learning_rate=0.1,
                   lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no",
                   logging_steps=1, disable_tqdm=True, seed=0)
    trainer = LargeBatchTrainer(model=MeanEstimator(), args=LargeBatchArguments(**{**options, **extra}),
                                train_dataset=gaussian_points(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_the_new_algorithm_clips_to_its_bound_through_the_trainer_unchanged():
    clipping, at_update = NoiseScaleClipping(factor=1.0), GradientNormAtUpdate()
    trainer = train([clipping, at_update])
    assert clipping.clipped_steps >= 3  # small batches of a noisy gradient: ||g_bar|| > ||G|| often
    clipped = [sq for sq in at_update.sq_norms if any(math.isclose(sq, b, rel_tol=1e-5) for b in clipping.bounds)]
    assert len(clipped) == clipping.clipped_steps  # the update saw exactly the bound at every clipped step
    assert trainer.state.log_history[-2]["noise_clipped_steps"] == clipping.clipped_steps
    plain = train([GradientNormAtUpdate()])
    assert not torch.equal(plain.model.w, trainer.model.w)


def test_the_statistics_are_measured_once_per_step_and_shared(monkeypatch):
    """With two consumers (the new algorithm and the noise-scale monitor) the trainer's one estimator measures once
    per step, and both receive the same ``StepStatistics``."""
    measured, seen_by_monitor = [], []
    measure = GradientStatistics.measure
    monkeypatch.setattr(GradientStatistics, "measure",
                        lambda self, *a, **k: measured.append(measure(self, *a, **k)) or measured[-1])

    class RecordingMonitor(NoiseScaleMonitor):
        def on_reduced_gradients(self, args, state, control, *, statistics, **kwargs):
            seen_by_monitor.append(statistics)
            super().on_reduced_gradients(args, state, control, statistics=statistics, **kwargs)

    clipping, monitor = NoiseScaleClipping(), RecordingMonitor(theta=0.0)
    train([clipping, monitor], steps=6)
    assert len(measured) == 6
    assert all(a is b for a, b in zip(measured, seen_by_monitor))
    assert monitor.grad_sqr.value == measured[-1].grad_sqr  # theta = 0: the last step's own estimate


def test_the_new_algorithm_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        train([NoiseScaleClipping()], ga=1)


def test_the_new_algorithm_resumes_exactly(tmp_path):
    full = train([NoiseScaleClipping()])
    train([NoiseScaleClipping()], output_dir=str(tmp_path), save_strategy="steps", save_steps=6)
    resumed = train([NoiseScaleClipping()], output_dir=str(tmp_path), resume=str(tmp_path / "checkpoint-6"))
    assert torch.equal(resumed.model.w, full.model.w)
    clipping = resumed.algorithm("noise_scale_clipping")
    assert clipping.mean_sq == full.algorithm("noise_scale_clipping").mean_sq
    assert clipping.clipped_steps == full.algorithm("noise_scale_clipping").clipped_steps

"""Gradient statistics (ALGORITHMS.md section 0) on a model whose gradient distribution is known exactly.

Mixed precision: fp16 runs on CPU too, with fp16 autocast and a real ``torch.amp.GradScaler`` installed by
``use_cpu_grad_scaler`` (accelerate makes the scaler only on an accelerator); the cases marked ``gpu`` run the same
checks with accelerate's own CUDA scaler and are skipped without CUDA (they have not run yet: no GPU was lent)."""

import math
import tempfile

import numpy as np
import pytest
import torch

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch import NoiseScaleMonitor
from hf_largebatch.core.statistics import (BiasCorrectedEMA, GradientStatistics, smoothing_for_scale,
                                           unbiased_estimates)
from helpers import ON_CUDA, DictDataset, use_cpu_grad_scaler

DIM, MU, SIGMA = 10, 0.5, 2.0


class MeanEstimator(torch.nn.Module):
    """loss = mean_j 0.5 ||w - x_j||^2, so the per-example gradient is w - x_j: with x ~ N(MU, SIGMA^2 I) and w = 0,
    ||G||^2 = DIM MU^2 and tr(Sigma) = DIM SIGMA^2 per example."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DIM))

    def forward(self, x, labels=None):
        return {"loss": 0.5 * ((self.w - x) ** 2).sum(-1).mean()}


def gaussian_points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DictDataset(x=MU + SIGMA * torch.randn(n, DIM, generator=g), labels=torch.zeros(n, dtype=torch.long))


def test_unbiased_estimates_by_simulation():
    rng = np.random.default_rng(0)
    n, b, trials = 4, 8, 20000
    G = np.full(DIM, MU)
    # micro-batch mean gradients of b examples each: G + noise of variance SIGMA^2 / b per coordinate
    g = G + SIGMA / np.sqrt(b) * rng.standard_normal((trials, n, DIM))
    L = (g ** 2).sum(-1).mean(-1)
    T = (g.mean(1) ** 2).sum(-1)
    est = np.array([unbiased_estimates(l, t, n) for l, t in zip(L, T)])
    # floors at 0 bias the mean only negligibly here (||G||^2 = 2.5, noise of T is small)
    assert est[:, 0].mean() == pytest.approx(DIM * MU ** 2, rel=0.02)
    assert est[:, 1].mean() == pytest.approx(DIM * SIGMA ** 2 / b, rel=0.02)
    with pytest.raises(ValueError, match="n >= 2"):
        unbiased_estimates(1.0, 1.0, 1)


def test_bias_corrected_ema():
    ema = BiasCorrectedEMA(0.9)
    ema.update(2.0)
    assert ema.value == pytest.approx(2.0)  # no start-up bias towards 0
    ema.update(4.0)
    assert ema.value == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81))
    raw = BiasCorrectedEMA(0.0)
    for x in (1.0, 5.0):
        raw.update(x)
    assert raw.value == 5.0
    assert smoothing_for_scale(1) == pytest.approx(0.999) and smoothing_for_scale(2000) == 0.0


@pytest.mark.parametrize("per_device,ga,bf16", [(8, 4, False), (4, 8, False), (8, 4, True)])
def test_monitor_recovers_known_statistics_through_the_trainer(per_device, ga, bf16):
    """lr = 0 keeps w = 0, so every step samples the same distribution; the smoothed estimates converge (also under
    bf16 autocast)."""
    stats = NoiseScaleMonitor(theta=0.99)
    args = LargeBatchArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=per_device, bf16=bf16,
                               gradient_accumulation_steps=ga, max_steps=300, learning_rate=0.0, optim="sgd",
                               base_batch_size=8, use_cpu=True, report_to=[], save_strategy="no", logging_steps=50,
                               disable_tqdm=True, seed=0, max_grad_norm=1e-3)  # clipping must not matter
    trainer = LargeBatchTrainer(model=MeanEstimator(), args=args, train_dataset=gaussian_points(32 * 300),
                                callbacks=[stats])
    trainer.train()
    assert stats.scale == 4 and stats.base_batch_size == 8
    assert_known_statistics(stats)  # variance at B0 = 8; tr(Sigma)/||G||^2 = 16
    logged = [h for h in trainer.state.log_history if "noise_scale" in h]
    assert len(logged) == 6 and logged[-1]["noise_scale"] == pytest.approx(stats.noise_scale)


def train_monitor(dataset, precision: str | None = None, steps: int = 300, cuda: bool = False):
    """The monitor at lr 0 (every step samples the same distribution) under ``precision`` (None, "fp16", "bf16"):
    fp16 on CUDA gets accelerate's GradScaler, fp16 on CPU the same machinery through ``use_cpu_grad_scaler``."""
    stats = NoiseScaleMonitor(theta=0.99)
    args = LargeBatchArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8,
                               gradient_accumulation_steps=4, max_steps=steps, learning_rate=0.0, optim="sgd",
                               base_batch_size=8, report_to=[], save_strategy="no", logging_steps=50,
                               disable_tqdm=True, seed=0, fp16=precision == "fp16", bf16=precision == "bf16",
                               use_cpu=not cuda)
    trainer = LargeBatchTrainer(model=MeanEstimator(), args=args, train_dataset=dataset, callbacks=[stats])
    if precision == "fp16" and not cuda:
        use_cpu_grad_scaler(trainer)
    trainer.train()
    return trainer, stats


def assert_known_statistics(stats):
    assert stats.grad_sqr.value == pytest.approx(DIM * MU ** 2, rel=0.15)
    assert stats.grad_var.value == pytest.approx(DIM * SIGMA ** 2 / 8, rel=0.1)
    assert stats.noise_scale == pytest.approx(SIGMA ** 2 / MU ** 2, rel=0.2)


@pytest.mark.parametrize("precision,cuda", [("fp16", False), pytest.param("fp16", True, marks=ON_CUDA),
                                            pytest.param("bf16", True, marks=ON_CUDA)])
def test_monitor_under_mixed_precision_recovers_the_known_statistics(precision, cuda):
    """Under fp16, hook and .grad gradients carry the GradScaler's 2^16 (4e9 in the squared norms) the whole run;
    removed, the estimates are the known ones. (bf16 on CPU: test_monitor_recovers_known_statistics_...)"""
    trainer, stats = train_monitor(gaussian_points(32 * 300), precision, cuda=cuda)
    if precision == "fp16":
        assert trainer.accelerator.scaler.get_scale() == 2.0 ** 16
    assert stats.skipped_steps == 0
    assert_known_statistics(stats)


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=ON_CUDA)])
def test_monitor_skips_the_step_the_grad_scaler_skips(cuda):
    dataset = gaussian_points(32 * 100)
    dataset.columns["x"][123] = float("inf")  # one example: one micro-batch of one step overflows
    trainer, stats = train_monitor(dataset, "fp16", steps=100, cuda=cuda)
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 15  # the scaler skipped exactly one step
    assert stats.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert stats.grad_sqr.value == pytest.approx(DIM * MU ** 2, rel=0.3)  # 100 steps: a looser check


def test_monitor_refuses_a_single_micro_batch():
    args = LargeBatchArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=2,
                               use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = LargeBatchTrainer(model=MeanEstimator(), args=args, train_dataset=gaussian_points(64),
                                callbacks=[NoiseScaleMonitor()])
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        trainer.train()


# ---------------------------------------------------------------- review defects (each failed on the old code)
def test_reduced_norm_of_bf16_gradients_is_taken_in_fp32():
    """The reduced norm upcasts before squaring: a bf16 norm rounds to ~1e-3, which n T - L amplifies."""
    from hf_largebatch.core.statistics import reduced_sq_norm
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4097, generator=g).bfloat16() for _ in range(8)]
    exact = sum(float(x.double().square().sum()) for x in grads)
    assert float(reduced_sq_norm(grads)) == pytest.approx(exact, rel=1e-5)
    # the former path (torch._foreach_norm on bf16, upcast after) is off by far more
    old = float(torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum())
    assert abs(old - exact) / exact > 1e-4


def feed_step(stats, micro_grads, weights, world=1):
    """One step as the trainer runs it: the estimator gets the hook gradients ``weight x g_i`` and the reduced
    gradient, the consumer its step statistics."""
    estimator = GradientStatistics(world_size=world)
    estimator.begin_step()
    for g, w in zip(micro_grads, weights):
        estimator.on_local_gradient(None, w * g, w)
        estimator.on_micro_batch_end()
    reduced = sum(w * g for g, w in zip(micro_grads, weights)) / world
    step = estimator.measure(None, reduced.double().square().sum().float(), len(micro_grads), 8 * len(micro_grads),
                             loss_scale=1.0)
    stats.on_reduced_gradients(ARGS, None, None, statistics=step)


class _Args:
    per_device_train_batch_size, gradient_accumulation_steps, world_size, base_batch_size = 8, 2, 1, 16


ARGS = _Args()


def test_token_weighted_micro_batches_give_an_unbiased_squared_norm():
    """Under the token rule g_bar = sum_i (tokens_i / N) g_i; with 100 and 300 tokens (per-token variance v) the
    equally weighted L biased ||G||^2 by -Dv/600; weighting L like g_bar removes it."""
    rng = np.random.default_rng(0)
    dim, per_token_var, tokens = 50, 4.0, np.array([100, 300])
    G = np.full(dim, 0.2)  # ||G||^2 = 2
    weights = tokens / tokens.sum()
    estimates = []
    for _ in range(4000):
        stats = NoiseScaleMonitor(theta=0.0)
        stats.on_train_begin(ARGS, None, None)
        grads = [torch.tensor(G + rng.normal(0, np.sqrt(per_token_var / t), dim), dtype=torch.float32)
                 for t in tokens]
        feed_step(stats, grads, [float(w) for w in weights])
        estimates.append(stats.grad_sqr.value)
    # unfloored, the old estimator's mean was 2 - 50*4/600 = 1.667; the floor at 0 barely matters here
    assert np.mean(estimates) == pytest.approx(float(G @ G), rel=0.03)


def test_short_last_group_measures_the_variance_at_its_own_batch():
    """n = 2 of 4 micro-batches: the variance at B0 is S_step (L - T)/(n - 1) with S_step = its 16 examples / B0,
    not the configured S (which inflated it 2x: 12.46 against 6.25 in the review)."""
    stats = NoiseScaleMonitor(theta=0.0)
    args = _Args()
    args.gradient_accumulation_steps = 4
    stats.on_train_begin(args, None, None)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    feed_step(stats, [g1, g2], [0.5, 0.5])
    L, T = (1 + 9) / 2, float(((g1 + g2) / 2).square().sum())
    assert stats.grad_var.value == pytest.approx((16 / 16) * (L - T) / (2 - 1))
    assert stats.step_scale == 1.0 and stats.scale == 2.0


def test_no_estimate_from_a_non_positive_squared_norm():
    """A step whose ||G||^2 estimate is <= 0 (floored to 0) gives no noise scale (was inf), so nothing is decided."""
    stats = NoiseScaleMonitor(theta=0.0)
    stats.on_train_begin(ARGS, None, None)
    feed_step(stats, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], [0.5, 0.5])  # T = 0 < L / n
    assert stats.grad_sqr.value == 0.0 and not stats.has_estimate
    assert math.isnan(stats.noise_scale)


def test_the_monitor_does_not_change_training(tmp_path):
    """The noise-scale monitor is telemetry: a monitored run applies the same LRs and ends at the same weights as
    the same run without it (with a non-zero, decaying LR, so an lr_factor or a stray update would show)."""
    from helpers import TinyLinearClassifier, flat_params, random_points
    from hf_largebatch import LRHistory

    def run(callbacks):
        history = LRHistory(0)
        args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                   gradient_accumulation_steps=2, max_steps=8, optim="sgd",
                                   optim_args="momentum=0.9", learning_rate=0.2, lr_scheduler_type="linear",
                                   use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
        model = TinyLinearClassifier()
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=random_points(256),
                                    callbacks=[history, *callbacks])
        trainer.train()
        return history.learning_rates, flat_params(model)

    monitor = NoiseScaleMonitor()
    lrs, weights = run([monitor])
    plain_lrs, plain_weights = run([])
    assert monitor.grad_sqr.count == 8  # it did measure every step
    assert lrs == plain_lrs and len(set(lrs)) > 1
    np.testing.assert_array_equal(weights, plain_weights)

"""CUDA-only checks of the gradient statistics under mixed precision, where gradients carry the fp16 GradScaler's
loss scale and overflowed steps are skipped by the scaler. CI has no GPU, so these are skipped there; they have
not run on a GPU yet (none was lent to the sessions so far). bf16 autocast needs no scaler; its CPU case in
test_stats.py runs the statistics through the trainer under autocast, though this model's elementwise ops stay
fp32 there."""

import tempfile

import pytest
import torch

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer, NoiseScaleMonitor
from test_stats import DIM, MU, SIGMA, MeanEstimator, gaussian_points

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def train_monitor(precision: str, dataset, steps: int = 300):
    stats = NoiseScaleMonitor(theta=0.99)
    args = LargeBatchArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8,
                               gradient_accumulation_steps=4, max_steps=steps, learning_rate=0.0, optim="sgd",
                               base_batch_size=8, report_to=[], save_strategy="no", logging_steps=50,
                               disable_tqdm=True, seed=0, fp16=precision == "fp16", bf16=precision == "bf16")
    trainer = LargeBatchTrainer(model=MeanEstimator(), args=args, train_dataset=dataset, callbacks=[stats])
    trainer.train()
    return trainer, stats


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_statistics_under_mixed_precision_recover_the_known_distribution(precision):
    trainer, stats = train_monitor(precision, gaussian_points(32 * 300))
    scaler = getattr(trainer.accelerator, "scaler", None)
    if precision == "fp16":  # the gradients really carried a loss scale of 2^16, which must have been removed
        assert scaler is not None and scaler.get_scale() == 2.0 ** 16
    assert stats.skipped_steps == 0
    assert stats.grad_sqr.value == pytest.approx(DIM * MU ** 2, rel=0.15)
    assert stats.grad_var.value == pytest.approx(DIM * SIGMA ** 2 / 8, rel=0.1)
    assert stats.noise_scale == pytest.approx(SIGMA ** 2 / MU ** 2, rel=0.2)


def test_fp16_overflow_step_is_skipped_by_statistics_and_scaler_alike():
    dataset = gaussian_points(32 * 100)
    dataset.columns["x"][123] = float("inf")  # one example: one micro-batch of one step overflows
    trainer, stats = train_monitor("fp16", dataset, steps=100)
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 15  # the scaler skipped exactly one step
    assert stats.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert stats.grad_sqr.value == pytest.approx(DIM * MU ** 2, rel=0.3)

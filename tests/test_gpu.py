"""CUDA-only checks of the gradient statistics under mixed precision, where gradients carry the fp16 GradScaler's
loss scale and overflowed steps are skipped by the scaler. CI has no GPU, so these are skipped there; they have
not run on a GPU yet (none was lent to the sessions so far). The same checks run on CPU in test_stats.py: fp16
autocast and a real ``torch.amp.GradScaler`` installed with ``use_cpu_grad_scaler`` (accelerate makes the scaler
only on an accelerator), and bf16 autocast through the trainer."""

import pytest
import torch

from test_stats import DIM, MU, assert_known_statistics, gaussian_points, train_monitor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_statistics_under_mixed_precision_recover_the_known_distribution(precision):
    trainer, stats = train_monitor(gaussian_points(32 * 300), precision, cuda=True)
    scaler = getattr(trainer.accelerator, "scaler", None)
    if precision == "fp16":  # the gradients really carried a loss scale of 2^16, which must have been removed
        assert scaler is not None and scaler.get_scale() == 2.0 ** 16
    assert stats.skipped_steps == 0
    assert_known_statistics(stats)


def test_fp16_overflow_step_is_skipped_by_statistics_and_scaler_alike():
    dataset = gaussian_points(32 * 100)
    dataset.columns["x"][123] = float("inf")  # one example: one micro-batch of one step overflows
    trainer, stats = train_monitor(dataset, "fp16", steps=100, cuda=True)
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 15  # the scaler skipped exactly one step
    assert stats.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert stats.grad_sqr.value == pytest.approx(DIM * MU ** 2, rel=0.3)  # 100 steps: a looser check

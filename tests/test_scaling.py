"""LR scaling rules, end to end: the LR every optimizer step applies under the real ``LargeBatchTrainer``.

The expected trajectories are written out here from the rules' definitions (ALGORITHMS.md section 2), not computed
with library code: with ``S = B / B0`` and the user's ``lr0`` (tuned at ``B0``),

* ``legw``:   peak ``sqrt(S) * lr0``, linear warm-up over ``W = S * w0`` epochs, then the cosine decay;
* ``linear``: peak ``S * lr0``, the user's warm-up, then linear decay to 0;
* ``sqrt``:   peak ``sqrt(S) * lr0``, the user's warm-up, then constant;
* ``none``:   ``lr0`` as given.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer, LRHistory
from hf_largebatch.core.lr_scaling import batch_scale, legw_warmup_steps, peak_lr_multiplier
from helpers import TinyLinearClassifier, random_points, single_thread

N_EXAMPLES = 2048
PER_DEVICE = 16
GRAD_ACCUM = 4
GLOBAL_BATCH = PER_DEVICE * GRAD_ACCUM  # 64
EPOCHS = 4
STEPS_PER_EPOCH = N_EXAMPLES // GLOBAL_BATCH  # 32
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH  # 128
LR0 = 0.05
USER_WARMUP = 10


one_cpu_thread = pytest.fixture(autouse=True)(single_thread)


def train_and_record(tmp_path, scale: int, **overrides):
    """Train the tiny classifier at B=64 with base_batch_size=64/S; return (trainer, LRHistory)."""
    options = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
        optim="sgd",
        max_grad_norm=0,
        learning_rate=LR0,
        per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=EPOCHS,
        base_batch_size=GLOBAL_BATCH // scale,
        logging_strategy="no",
        seed=0,
    )
    options.update(overrides)
    args = LargeBatchArguments(**options)
    history = LRHistory(GLOBAL_BATCH)
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(),
                                callbacks=[history])
    trainer.train()
    return trainer, history


# ---------------------------------------------------------------- expected trajectories, from the definitions
def expected_legw(scale: int) -> np.ndarray:
    peak = math.sqrt(scale) * LR0
    warmup = scale  # S * w0 * steps_per_epoch with w0 = 1/32 epoch and 32 steps per epoch
    lrs = []
    for t in range(TOTAL_STEPS):
        if t < warmup:
            lrs.append(peak * t / max(1, warmup))
        else:
            lrs.append(peak * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (TOTAL_STEPS - warmup))))
    return np.array(lrs)


def expected_linear(scale: int) -> np.ndarray:
    peak = scale * LR0
    return np.array([peak * t / USER_WARMUP if t < USER_WARMUP
                     else peak * (TOTAL_STEPS - t) / (TOTAL_STEPS - USER_WARMUP)
                     for t in range(TOTAL_STEPS)])


def expected_sqrt(scale: int) -> np.ndarray:
    peak = math.sqrt(scale) * LR0
    return np.array([peak * t / USER_WARMUP if t < USER_WARMUP else peak for t in range(TOTAL_STEPS)])


def expected_none(scale: int) -> np.ndarray:
    return np.full(TOTAL_STEPS, LR0)


RULES = {
    "legw": (dict(lr_scaling="legw", legw_base_warmup_epochs=1 / 32, lr_scheduler_type="cosine"), expected_legw),
    "linear": (dict(lr_scaling="linear", warmup_steps=USER_WARMUP, lr_scheduler_type="linear"), expected_linear),
    "sqrt": (dict(lr_scaling="sqrt", warmup_steps=USER_WARMUP, lr_scheduler_type="constant_with_warmup"),
             expected_sqrt),
    "none": (dict(lr_scaling="none", lr_scheduler_type="constant"), expected_none),
}


@pytest.mark.parametrize("scale", [1, 2, 8, 64])
@pytest.mark.parametrize("rule", list(RULES))
def test_applied_lr_trajectory(tmp_path, rule, scale):
    overrides, expected = RULES[rule]
    trainer, history = train_and_record(tmp_path, scale, **overrides)

    assert trainer.global_batch_size == GLOBAL_BATCH
    assert trainer.scale == scale
    assert trainer.state.global_step == TOTAL_STEPS
    assert len(history.learning_rates) == TOTAL_STEPS
    assert history.steps == list(range(1, TOTAL_STEPS + 1))
    assert history.examples[-1] == TOTAL_STEPS * GLOBAL_BATCH
    np.testing.assert_allclose(history.learning_rates, expected(scale), rtol=1e-12, atol=0)


def test_legw_keeps_the_base_runs_warmup_step_count_and_epoch_budget(tmp_path):
    """LEGW at S=8: warm-up of S*w0 = 8/32 epoch = 8 steps; the peak is reached exactly at step index 8."""
    _, history = train_and_record(tmp_path, 8, **RULES["legw"][0])
    lrs = np.array(history.learning_rates)
    peak = math.sqrt(8) * LR0
    assert lrs[0] == 0.0
    assert np.all(np.diff(lrs[:9]) > 0)
    assert lrs[8] == pytest.approx(peak, rel=1e-12)
    assert lrs.max() == pytest.approx(peak, rel=1e-12)
    assert np.all(np.diff(lrs[8:]) < 0)


def test_logged_learning_rate_is_the_applied_one(tmp_path):
    scale = 8
    trainer, history = train_and_record(tmp_path, scale, logging_strategy="steps", logging_steps=1,
                                        **RULES["legw"][0])
    step_logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["step"] for entry in step_logs] == list(range(1, TOTAL_STEPS + 1))
    logged = [entry["learning_rate"] for entry in step_logs]
    # Exactly the LR the optimizer used in that same step (not the scheduler's next value).
    assert logged == history.learning_rates
    np.testing.assert_allclose(logged, expected_legw(scale), rtol=1e-12, atol=0)
    assert all(entry["scale"] == scale for entry in step_logs)


def test_second_train_call_repeats_the_scaled_schedule(tmp_path):
    """Trainer supports calling train() again (it rebuilds the scheduler); the scaled LR must not compound."""
    trainer, history = train_and_record(tmp_path, 8, **RULES["linear"][0])
    first = list(history.learning_rates)
    history.steps.clear()
    history.learning_rates.clear()
    history.losses.clear()
    trainer.train()
    assert len(history.learning_rates) == TOTAL_STEPS
    np.testing.assert_allclose(first, expected_linear(8), rtol=1e-12, atol=0)
    np.testing.assert_allclose(history.learning_rates, expected_linear(8), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- the pure functions, hand-computed values
@pytest.mark.parametrize("global_batch, base, expected", [
    (64, 64, 1.0), (64, 32, 2.0), (64, 8, 8.0), (64, 1, 64.0), (4096, 256, 16.0), (32, 64, 0.5), (16, 64, 0.25),
])
def test_batch_scale(global_batch, base, expected):
    assert batch_scale(global_batch, base) == expected


@pytest.mark.parametrize("global_batch, base", [(48, 32), (32, 48), (96, 64), (100, 64)])
def test_batch_scale_refuses_unrelated_sizes(global_batch, base):
    with pytest.raises(ValueError, match="not a multiple or a divisor of base_batch_size"):
        batch_scale(global_batch, base)


@pytest.mark.parametrize("base", [0, -4, None])
def test_batch_scale_refuses_non_positive_base(base):
    with pytest.raises(ValueError, match="base_batch_size must be a positive integer"):
        batch_scale(64, base)


@pytest.mark.parametrize("global_batch", [0, -64])
def test_batch_scale_refuses_non_positive_global_batch(global_batch):
    with pytest.raises(ValueError, match="global batch size must be positive"):
        batch_scale(global_batch, 32)


@pytest.mark.parametrize("rule, scale, expected", [
    ("linear", 8.0, 8.0),
    ("linear", 0.5, 0.5),
    ("sqrt", 4.0, 2.0),
    ("sqrt", 8.0, 2.8284271247461903),
    ("sqrt", 0.25, 0.5),
    ("legw", 16.0, 4.0),
    ("legw", 2.0, 1.4142135623730951),
    ("none", 64.0, 1.0),
    ("none", 1.0, 1.0),
])
def test_peak_lr_multiplier(rule, scale, expected):
    assert peak_lr_multiplier(rule, scale) == pytest.approx(expected, rel=1e-15)


def test_peak_lr_multiplier_unknown_rule():
    with pytest.raises(ValueError, match="unknown lr_scaling='cubic'; choose one of none, linear, sqrt, legw"):
        peak_lr_multiplier("cubic", 2.0)


@pytest.mark.parametrize("scale, w0, steps_per_epoch, expected", [
    (1.0, 1 / 32, 32, 1),      # the configuration of the trainer tests above
    (8.0, 1 / 32, 32, 8),
    (64.0, 1 / 32, 32, 64),
    (8.0, 0.25, 100, 200),     # 8 * 0.25 epoch * 100 steps
    (4.0, 2.0, 250, 2000),     # base run: 2 epochs of 1000 steps = 2000 steps; at 4x batch still 2000 steps
    (2.0, 0.3, 10, 6),         # 2 * 0.3 * 10 = 6.000000000000001 -> 6
    (1.0, 0.1, 33, 3),         # 3.3 -> 3
    (1.0, 0.2, 33, 7),         # 6.6 -> 7
    (1.0, 0.0, 50, 0),
])
def test_legw_warmup_steps(scale, w0, steps_per_epoch, expected):
    assert legw_warmup_steps(scale, w0, steps_per_epoch) == expected


def test_legw_warmup_steps_is_the_base_runs_step_count():
    """S * w0 * steps_per_epoch(B) = w0 * N / B0 whatever the batch B."""
    n, base, w0 = 51200, 256, 0.5
    for batch in (256, 512, 1024, 2048, 51200):
        assert legw_warmup_steps(batch / base, w0, n // batch) == 100


def test_legw_warmup_steps_refuses_negative_warmup():
    with pytest.raises(ValueError, match="legw_base_warmup_epochs must be >= 0"):
        legw_warmup_steps(2.0, -0.5, 10)


def test_constant_schedule_keeps_the_warmup(tmp_path):
    """HF's 'constant' schedule drops num_warmup_steps; a LEGW warm-up must not vanish with it."""
    _, history = train_and_record(tmp_path, 8, lr_scaling="legw", legw_base_warmup_epochs=1 / 32,
                                  lr_scheduler_type="constant")
    peak = math.sqrt(8) * LR0
    expected = [peak * t / 8 if t < 8 else peak for t in range(TOTAL_STEPS)]
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-12)


def test_warmup_steps_below_one_is_a_fraction_of_the_run(tmp_path):
    """README: the user's warm-up is ``warmup_steps``, a count or a fraction < 1 of the run (HF's convention):
    0.125 of 128 steps warms the scaled peak up over 16 steps."""
    trainer, history = train_and_record(tmp_path, 4, lr_scaling="linear", warmup_steps=0.125,
                                        lr_scheduler_type="linear")
    peak, warmup = 4 * LR0, 16
    expected = [peak * t / warmup if t < warmup else peak * (TOTAL_STEPS - t) / (TOTAL_STEPS - warmup)
                for t in range(TOTAL_STEPS)]
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-12, atol=1e-15)
    assert trainer.run_summary["warmup"] == warmup


def test_lr_decay_epochs_multiply_the_scaled_schedule_at_epoch_boundaries(tmp_path):
    """Zaremba-style step decay on LEGW's schedule: x0.5 at epochs 2 and 3 of 4 (steps 64 and 96), after LEGW's
    4-step warm-up (S = 4, w0 = 1/32 epoch) to the sqrt(S)-scaled peak."""
    trainer, history = train_and_record(tmp_path, 4, lr_scaling="legw", legw_base_warmup_epochs=1 / 32,
                                        lr_scheduler_type="constant", lr_decay_epochs=[2, 3], lr_decay_factor=0.5)
    peak = 2 * LR0
    expected = [(peak * t / 4 if t < 4 else peak) * 0.5 ** ((t >= 64) + (t >= 96)) for t in range(TOTAL_STEPS)]
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-12, atol=1e-15)
    assert trainer.run_summary["schedule"] == "constant, x0.5 at epochs 2, 3"  # the start-up summary says it


def test_lr_decay_epochs_of_a_max_steps_run_count_epochs_of_the_configured_batch(tmp_path):
    _, history = train_and_record(tmp_path, 1, lr_scheduler_type="constant", max_steps=48, lr_decay_epochs=[1.0],
                                  lr_decay_factor=0.1)
    expected = [LR0 * (0.1 if t >= STEPS_PER_EPOCH else 1.0) for t in range(48)]
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-12)


@pytest.mark.parametrize("settings, message", [
    ({"lr_decay_epochs": [4.0]}, r"not inside the run's 4 epochs"),
    ({"lr_decay_epochs": [2.0, 1.0]}, "increasing"),
    ({"lr_decay_epochs": [1.0], "lr_decay_factor": 0.0}, "lr_decay_factor"),
])
def test_bad_lr_decay_is_refused_before_training(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        train_and_record(tmp_path, 1, lr_scheduler_type="constant", **settings)


def test_lr_decay_with_max_steps_on_adascales_clock_is_refused(tmp_path):
    """AdaScale's max_steps counts base-batch steps of progress: epochs of the run cannot be read from it."""
    with pytest.raises(ValueError, match="give the budget as num_train_epochs"):
        train_and_record(tmp_path, 4, lr_scaling="adascale", lr_scheduler_type="constant", max_steps=64,
                         lr_decay_epochs=[1.0], lr_decay_factor=0.5)

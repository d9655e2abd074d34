"""The batch-size advisor: its probe through the real trainer on a model whose noise scale is known exactly, the
McCandlish trade-off and the recommendation it derives, its outputs, and the CLI on a recipe with real data."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from hf_largebatch import LargeBatchArguments
from hf_largebatch.advisor import (DOUBLING_SPEEDUP, Advice, adascale_gain, advice_from_probe, advise,
                                   estimate_noise_scale, largest_efficient_batch, predicted_steps,
                                   steps_along_trajectory, steps_over_min)
from test_stats import DIM, MU, SIGMA, MeanEstimator, gaussian_points

TRUE_NOISE_SCALE = DIM * SIGMA ** 2 / (DIM * MU ** 2)  # tr(Sigma) / ||G||^2 at w = 0: 16 examples
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                    learning_rate=0.0, optim="sgd", use_cpu=True, report_to=[], save_strategy="no", seed=0,
                    num_train_epochs=5)
    return LargeBatchArguments(**{**settings, **overrides})


def test_probe_through_the_trainer_recovers_the_known_noise_scale_and_stops(tmp_path):
    # batch 16 of 4 micro-batches of 4: every step's estimates are unbiased; their ratio of means converges on 16
    advice = advise(MeanEstimator(), probe_args(tmp_path), gaussian_points(16 * 400), probe_steps=300)
    noise = advice.noise
    assert noise.steps == 300  # stopped after the probe's steps (5 epochs were configured: 2000 steps)
    assert abs(noise.value / TRUE_NOISE_SCALE - 1) < 0.15  # measured: 17.4 (68% interval 16.4 .. 18.5)
    assert noise.low < noise.value < noise.high
    # the weights never move (lr 0): the two halves estimate the same noise scale
    assert abs(noise.early / noise.late - 1) < 0.35
    # probe batch 16, B_noise ~16: the doubling to 32 buys (1 + 1)/(1 + 0.5) = 1.33x < 1.5x: stay at 16
    assert advice.recommended == 16
    record = json.loads((tmp_path / "run" / "advice" / "probe" / "noise_probe.json").read_text())
    assert len(record["grad_sqr"]) == 300
    # the written outputs
    out = tmp_path / "run" / "advice"
    assert json.loads((out / "advice.json").read_text())["noise_scale"]["value"] == pytest.approx(noise.value)
    assert (out / "advice.png").stat().st_size > 10_000
    assert f"{noise.value:.4g}" in (out / "advice.md").read_text()


def test_negative_step_estimates_are_averaged_not_floored():
    # half the steps estimate ||G||^2 below zero: the ratio of means keeps them (flooring would give 5 / 2 = 2.5)
    grad_sqr, trace = [3.0, -1.0] * 20, [5.0] * 40
    est = estimate_noise_scale(grad_sqr, trace, resamples=500)
    assert est.value == pytest.approx(5.0 / 1.0)
    assert est.steps == 40


def test_bootstrap_interval_narrows_with_more_steps():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        grad_sqr = 1.0 + rng.normal(0, 2.0, n)
        trace = 100.0 + rng.normal(0, 30.0, n)
        est = estimate_noise_scale(grad_sqr, trace, resamples=1000)
        assert est.low < est.value < est.high
        widths.append(est.high - est.low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x narrower for 16x the steps


def test_trend_follows_a_noise_scale_that_grows_during_the_probe():
    grad_sqr = np.concatenate([np.full(50, 4.0), np.full(50, 1.0)])  # the gradient shrinks, its noise stays
    est = estimate_noise_scale(grad_sqr, np.full(100, 400.0), resamples=200)
    assert est.early == pytest.approx(100.0) and est.late == pytest.approx(400.0) and est.trend == pytest.approx(4)


def test_the_trade_off_and_the_recommended_range():
    noise = 1000.0
    # each doubling inside the range buys >= 1.5x fewer steps, the next one would not
    best = largest_efficient_batch(32, noise)
    assert best == 512  # 32 * 2^4 <= 1000 < 1024
    assert steps_over_min(best / 2, noise) / steps_over_min(best, noise) >= DOUBLING_SPEEDUP
    assert steps_over_min(best, noise) / steps_over_min(2 * best, noise) < DOUBLING_SPEEDUP
    # McCandlish et al.: at B = B_noise both the steps and the examples are twice their minimum
    assert steps_over_min(noise, noise) == 2.0
    # AdaScale's gain is the step saving the same statistics predict
    assert adascale_gain(32, 512, noise) == pytest.approx(predicted_steps(100, 512, 32, noise) / 100)
    assert predicted_steps(100, 32, 512, noise) == pytest.approx(100 * (1 + 1000 / 512) / (1 + 1000 / 32))


def test_steps_along_a_trajectory_whose_noise_scale_grows():
    # 50 steps at noise scale 100 then 50 at 400 (same trace, the gradient shrinks 4x), base batch 50, batch 200
    grad_sqr, trace = [4.0] * 50 + [1.0] * 50, [400.0] * 100
    expected = 50 * (1 + 100 / 200) / (1 + 100 / 50) + 50 * (1 + 400 / 200) / (1 + 400 / 50)
    assert steps_along_trajectory(grad_sqr, trace, 50, 200, window=25) == pytest.approx(expected)
    # one constant noise scale: the same as predicted_steps
    assert steps_along_trajectory([1.0] * 100, [300.0] * 100, 50, 200) == pytest.approx(
        predicted_steps(100, 50, 200, 300.0))
    # a window lost in its noise counts B0/B of its steps
    assert steps_along_trajectory([-1.0] * 25, [5.0] * 25, 50, 200) == pytest.approx(25 * 50 / 200)


def test_steps_to_target_use_the_trajectory_the_probe_covered():
    # the noise scale quadruples halfway through a 100-step probe at batch 50
    record = {"run": {"global_batch": 50, "learning_rate": 0.1, "optimizer": "SGD"}, "steps": list(range(1, 101)),
              "grad_sqr": [4.0] * 50 + [1.0] * 50, "trace": [400.0] * 100}
    advice = Advice.from_record(record, resamples=100)
    covered = 50 * (1 + 100 / 200) / (1 + 100 / 50) + 50 * (1 + 400 / 200) / (1 + 400 / 50)
    assert advice.steps_to_target(200, 100) == pytest.approx(covered)
    # a target beyond the probe: the probe's one noise scale (160 = 400 / mean 2.5)
    assert advice.noise.value == pytest.approx(160)
    assert advice.steps_to_target(200, 300) == pytest.approx(predicted_steps(300, 50, 200, 160))


def test_a_gradient_lost_in_its_noise_scales_perfectly(tmp_path):
    """Mean ||G||^2 <= 0 over the probe: an infinite noise scale, every doubling halves the steps."""
    record = {"run": {"global_batch": 32, "learning_rate": 0.1, "optimizer": "SGD"}, "steps": list(range(1, 11)),
              "grad_sqr": [1.0, -2.0] * 5, "trace": [50.0] * 10}
    advice = Advice.from_record(record, resamples=100)
    assert math.isinf(advice.noise.value)
    assert advice.recommended == 32 * 2 ** 12
    assert advice.plans[0].peak_lr == pytest.approx(0.1 * 2 ** 12)  # AdaScale's gain is S
    assert advice.steps_to_target(64, 5) == pytest.approx(5 / 2)  # covered by the probe: each window halves
    assert advice.steps_to_target(64, 100) == pytest.approx(100 / 2)
    paths = advice.write(str(tmp_path))
    assert json.loads(open(paths["json"]).read())["recommended_batch_range"] == [32, 32 * 2 ** 12]


def test_lr_plans_follow_the_optimizer_family():
    record = {"run": {"global_batch": 32, "base_batch_size": 32, "learning_rate": 0.1, "optimizer": "SGD",
                      "legw_base_warmup_epochs": 0.5},
              "grad_sqr": [1.0] * 10, "trace": [1000.0] * 10}
    sgd = Advice.from_record(record, resamples=100)
    assert sgd.recommended == 512
    gain = (1 + 1000 / 32) / (1 + 1000 / 512)
    adascale, legw = sgd.plans
    assert (adascale.rule, legw.rule) == ("adascale", "legw")
    assert adascale.peak_lr == pytest.approx(0.1 * gain)
    assert legw.peak_lr == pytest.approx(0.1 * 4.0) and legw.warmup_epochs == pytest.approx(16 * 0.5)
    adam = Advice.from_record({**record, "run": {**record["run"], "optimizer": "AdamW", "learning_rate": 1e-3}},
                              resamples=100)
    assert adam.plans[0].peak_lr == pytest.approx(1e-3 * math.sqrt(gain))  # AdamScale: sqrt of the gain
    assert [c["batch"] for c in sgd.candidates if c["recommended"]] == [32, 64, 128, 256, 512]


def test_too_few_probe_steps_and_a_missing_probe_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 4"):
        estimate_noise_scale([1.0, 2.0], [3.0, 4.0])
    with pytest.raises(FileNotFoundError, match="noise_probe_steps"):
        advice_from_probe(str(tmp_path))
    with pytest.raises(ValueError, match="noise_probe_steps must be >= 0"):
        probe_args(tmp_path, noise_probe_steps=-1)


def test_probe_needs_two_micro_batches(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        advise(MeanEstimator(), probe_args(tmp_path, gradient_accumulation_steps=1), gaussian_points(64),
               probe_steps=5)


def test_cli_advises_on_the_image_recipe_with_real_data(tmp_path):
    out = tmp_path / "advice"
    cmd = [sys.executable, "-m", "hf_largebatch.cli", "advise", "--recipe", "image", "--probe-steps", "20",
           "--output-dir", str(out), "--", "--preset", "tiny", "--max_train_samples", "640",
           "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2", "--learning_rate", "0.05",
           "--use_cpu", "--dataloader_num_workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    advice = json.loads((out / "advice.json").read_text())
    record = json.loads((out / "probe" / "noise_probe.json").read_text())
    assert len(record["grad_sqr"]) == 20 and advice["probe_batch"] == 32
    assert advice["noise_scale"]["value"] == pytest.approx(
        np.mean(record["trace"]) / np.mean(record["grad_sqr"]))
    assert "recommended batch" in result.stdout and (out / "advice.png").is_file()


def test_cli_predicts_steps_from_a_probe_already_run(tmp_path, capsys):
    """``advise --from-probe``: a base run's probe (here written by hand), the predicted steps of each batch."""
    from hf_largebatch.cli import main

    record = {"run": {"global_batch": 50, "learning_rate": 0.1, "optimizer": "SGD"}, "steps": list(range(1, 101)),
              "grad_sqr": [4.0] * 50 + [1.0] * 50, "trace": [400.0] * 100}
    (tmp_path / "noise_probe.json").write_text(json.dumps(record))
    advice = Advice.from_record(record)

    def cli(steps):
        assert main(["advise", "--from-probe", str(tmp_path), "--steps-to-target", str(steps), "--output-dir",
                     str(tmp_path / "out")]) == 0
        return capsys.readouterr().out

    out = cli(100)
    assert f"| 200 | {advice.candidates[2]['steps_vs_probe']:.3f} |" in out
    assert f"| {advice.steps_to_target(200, 100):.0f} |" in out and "along the noise scale the probe measured" in out
    assert "a lower bound of the saving" in cli(300)
    with pytest.raises(SystemExit, match="noise_probe_steps"):
        main(["advise", "--from-probe", str(tmp_path / "none")])

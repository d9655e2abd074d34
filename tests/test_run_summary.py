"""What the library decided, said at start (``core/run_summary.py``), the progress bar on the schedule's clock
(``core/progress.py``) and the public exports."""

import inspect
import logging
import math
import re

import pytest

import hf_largebatch
from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.core.events import Algorithm
from helpers import TinyLinearClassifier, random_points


def trainer_for(tmp_path, n=320, **options):
    options = {"per_device_train_batch_size": 8, "num_train_epochs": 1, "disable_tqdm": True, **options}
    args = LargeBatchArguments(output_dir=str(tmp_path), optim="sgd", learning_rate=0.1, use_cpu=True,
                               report_to=[], seed=0, save_strategy="no", log_level="info", **options)
    return LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(n))


def test_the_summary_says_batch_scale_rule_peak_lr_warmup_and_clock(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_largebatch")
    trainer = trainer_for(tmp_path, gradient_accumulation_steps=2, lr_scaling="legw", base_batch_size=4,
                          legw_base_warmup_epochs=0.05, lr_scheduler_type="cosine")
    trainer.train()
    summary = trainer.run_summary
    assert summary["global batch B"] == 16 and summary["scale S"] == 4
    assert summary["peak_lr"] == pytest.approx(0.1 * math.sqrt(4))
    # LEGW: S x w0 epochs of 20 steps
    assert summary["warmup"] == 4 and summary["schedule_length"] == 20 and summary["clock"] == "optimizer steps"
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hf_largebatch"))
    assert "peak_lr: 0.2" in logged and "rule: legw" in logged
    assert "never reaches its peak" not in logged


def test_a_warmup_longer_than_the_run_is_a_warning(tmp_path, caplog):
    """The issue's case: LEGW with legw_base_warmup_epochs=1 on a 20-step run warms up past the end."""
    caplog.set_level(logging.INFO, logger="hf_largebatch")
    trainer = trainer_for(tmp_path, gradient_accumulation_steps=2, lr_scaling="legw", base_batch_size=4,
                          legw_base_warmup_epochs=1)
    trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("warm-up (80 optimizer steps) is not shorter than the run (20 optimizer steps)" in w
               and "never reaches its peak 0.2" in w for w in warnings), warnings


def test_adascale_summary_counts_its_budget_in_progress(tmp_path):
    trainer = trainer_for(tmp_path, gradient_accumulation_steps=2, lr_scaling="adascale", base_batch_size=8)
    trainer.train()
    summary = trainer.run_summary
    assert summary["clock"] == "base-batch steps of progress"
    assert summary["schedule_length"] == 40  # 1 epoch of 20 steps at S = 2, in base-batch steps
    assert summary["algorithms"] == {"adascale": {"theta": "max(1 - S/1000, 0)"}}


def test_adascale_progress_bar_ends_full(tmp_path, capfd):
    """HF's bar counts optimizer steps up to AdaScale's budget in base steps: it ended at about 20/40."""
    trainer = trainer_for(tmp_path, gradient_accumulation_steps=2, lr_scaling="adascale", base_batch_size=8,
                          disable_tqdm=False)
    trainer.train()
    assert trainer.state.global_step < 40
    bars = re.findall(r"(\d+)/(\d+) \[", capfd.readouterr().err)
    assert bars and bars[-1] == ("40", "40"), bars[-3:]


def test_every_public_class_is_exported():
    """Every algorithm a user may pass in callbacks=[...] and both trainers import from the package root."""
    modules = [hf_largebatch.algorithms.adascale, hf_largebatch.algorithms.adaptive_batch,
               hf_largebatch.algorithms.autowu, hf_largebatch.algorithms.conadv,
               hf_largebatch.algorithms.extrapolation, hf_largebatch.algorithms.local_sgd,
               hf_largebatch.algorithms.noise_scale, hf_largebatch.algorithms.noise_probe]
    algorithms = {cls.__name__ for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, Algorithm) and cls.__module__ == module.__name__}
    assert algorithms >= {"AdaScale", "AdaptiveBatch", "AutoWU", "ConAdv", "Extrapolation", "LocalSGD",
                          "NoiseScaleMonitor", "GradientNoiseProbe"}
    for name in algorithms | {"LargeBatchTrainer", "LargeBatchSeq2SeqTrainer", "LargeBatchArguments",
                              "LargeBatchSeq2SeqArguments"}:
        assert name in hf_largebatch.__all__ and getattr(hf_largebatch, name) is not None


@pytest.mark.parametrize("make, expected", [
    (lambda: hf_largebatch.AdaScale(), {"theta": "max(1 - S/1000, 0)"}),
    (lambda: hf_largebatch.NoiseScaleMonitor(theta=0.5), {"theta": 0.5}),
    (lambda: hf_largebatch.Extrapolation("past", 0.5), {"mode": "past", "ratio": 0.5}),
    (lambda: hf_largebatch.LocalSGD(4), {"steps": 4}),
    (lambda: hf_largebatch.ConAdv(hf_largebatch.ConAdvConfig(epsilon=0.1)), {"mode": "conadv", "epsilon": 0.1}),
    (lambda: hf_largebatch.AdaptiveBatch("norm", hf_largebatch.AdaptiveBatchConfig(max_batch_size=64)),
     {"test": "norm", "max_batch_size": 64}),
    (lambda: hf_largebatch.AutoWU(), {"min_lr": 1e-5}),
    (lambda: hf_largebatch.GradientNoiseProbe(200), {"steps": 200}),
])
def test_every_algorithm_reports_its_settings_and_metrics_before_its_first_step(make, expected):
    """What the summary shows of each algorithm; and nothing it logs is left uninitialised by its constructor."""
    algorithm = make()
    settings = algorithm.settings()
    assert {key: settings[key] for key in expected} == expected
    assert isinstance(algorithm.log_metrics(), dict)

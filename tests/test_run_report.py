"""``hf-largebatch report``: a real run of every algorithm renders its pictures, and the summary's numbers are the
log history's; a run still going (its newest checkpoint) and a run with nothing but HF's trainer_state.json are
read too; TensorBoard receives the same scalars."""

import re
import shutil
import subprocess
import sys

import pytest

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer, NoiseScaleMonitor
from hf_largebatch.run_report import load_run, write_report
from helpers import digits_dataset, single_thread, tiny_resnet

_threads = pytest.fixture(autouse=True)(single_thread)

# option sets that turn each algorithm on, and the pictures each run must have beyond loss and learning_rate
RUNS = {
    "adascale": (dict(lr_scaling="adascale", base_batch_size=16), {"adascale", "noise_scale"}),
    "adaptive_batch": (dict(adaptive_batch="norm", adaptive_batch_args="max_batch_size=128,smoothing=0"),
                       {"batch_size", "noise_scale"}),
    "autowu": (dict(lr_schedule="autowu", autowu_args="vote_every=2"), {"autowu"}),
    "conadv": (dict(adversarial="conadv", adversarial_args="epsilon=0.05"), {"adversarial"}),
    "extrapolation": (dict(extrapolation="past"), {"extrapolation"}),
    "local_sgd": (dict(local_sgd_steps=2), {"local_sgd"}),
    "noise_monitor": ({}, {"noise_scale"}),
}


def train(out, max_steps=12, callbacks=(), save_steps=6, **options):
    args = LargeBatchArguments(
        output_dir=str(out), per_device_train_batch_size=16, gradient_accumulation_steps=2, max_steps=max_steps,
        optim="sgd", learning_rate=0.1, use_cpu=True, report_to=options.pop("report_to", []), logging_steps=2,
        eval_strategy="steps", eval_steps=6, save_strategy="steps", save_steps=save_steps, disable_tqdm=True, seed=0,
        dataloader_drop_last=True, **options)
    trainer = LargeBatchTrainer(model=tiny_resnet(), args=args, train_dataset=digits_dataset(640),
                                eval_dataset=digits_dataset(64), callbacks=list(callbacks))
    trainer.train()
    return trainer


def table_values(markdown: str) -> dict[str, float]:
    return {key: float(value) for key, value in re.findall(r"^\| (\w+) \| ([-\d.e+]+) \|$", markdown, re.M)}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_of_every_algorithm_renders_its_pictures_and_its_numbers(tmp_path, name):
    options, families = RUNS[name]
    trainer = train(tmp_path / "run", callbacks=[NoiseScaleMonitor()] if name == "noise_monitor" else (), **options)
    trainer.save_state()
    report = write_report(str(tmp_path / "run"))
    assert set(report["pictures"]) == {"loss", "learning_rate"} | families
    for path in report["pictures"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = open(report["summary"]).read()
    # every number of the summary is the last one the log history holds for it
    last = {}
    for entry in trainer.state.log_history:
        last.update({k: v for k, v in entry.items() if k not in ("step", "epoch") and isinstance(v, (int, float))})
    values = table_values(markdown)
    assert set(values) == set(last)
    for key, value in values.items():
        assert value == pytest.approx(last[key], rel=1e-5, abs=1e-12), key
    # what was decided at start is there
    assert f"- global batch B: {trainer.global_batch_size}" in markdown
    assert f"- rule: {trainer.run_summary['rule']}" in markdown


def test_a_run_still_going_is_read_from_its_newest_complete_checkpoint(tmp_path):
    trainer = train(tmp_path / "run", lr_scaling="adascale", base_batch_size=16, save_steps=2)
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert len(steps) >= 2
    (tmp_path / "run" / f"checkpoint-{steps[-1]}" / "trainer_state.json").unlink()  # a save cut short by a kill
    report = write_report(str(tmp_path / "run"), str(tmp_path / "report"))
    run = report["run"]
    assert run.in_progress and run.source.endswith(f"checkpoint-{steps[-2]}/trainer_state.json")
    assert run.last_step == steps[-2] and run.global_batch == 32
    assert any(f"checkpoint-{steps[-1]}" in note for note in run.notes)
    markdown = open(report["summary"]).read()
    assert "may still be going" in markdown and "- algorithm adascale" in markdown
    # progress on the x axis: the AdaScale picture is drawn against it
    assert "AdaScale progress" in run.axes()
    gains = [e["adascale_gain"] for e in trainer.state.log_history
             if e.get("step", 1e9) <= steps[-2] and "adascale_gain" in e]
    assert table_values(markdown)["adascale_gain"] == pytest.approx(gains[-1], rel=1e-5)


def test_a_run_with_only_hf_files_is_reported(tmp_path):
    """A run from before the start-up summary was kept: trainer_state.json and training_args.bin, no records."""
    trainer = train(tmp_path / "run", lr_scaling="adascale", base_batch_size=16, max_steps=6)
    trainer.save_state()
    trainer.save_model()
    for checkpoint in (tmp_path / "run").glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    report = write_report(str(tmp_path / "run"))
    run = report["run"]
    assert run.run_summary is None and run.global_batch == 32  # from training_args.bin
    markdown = open(report["summary"]).read()
    assert "Not recorded" in markdown and {"adascale", "noise_scale"} <= set(report["pictures"])


def test_tensorboard_receives_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = train(tmp_path / "run", lr_scaling="adascale", base_batch_size=16, report_to=["tensorboard"])
    events = EventAccumulator(str(next((tmp_path / "run" / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for key in ("adascale_gain", "progress", "noise_scale", "grad_sqr", "learning_rate", "loss"):
        logged = [(e["step"], e[key]) for e in trainer.state.log_history if key in e]
        scalars = [(s.step, s.value) for s in events.Scalars(f"train/{key}")]
        assert [step for step, _ in scalars] == [step for step, _ in logged]
        assert [value for _, value in scalars] == pytest.approx([value for _, value in logged], rel=1e-6)


def test_cli_writes_the_report(tmp_path):
    train(tmp_path / "run", extrapolation="past", max_steps=6).save_state()
    result = subprocess.run([sys.executable, "-m", "hf_largebatch.cli", "report", str(tmp_path / "run"), "--out",
                             str(tmp_path / "pictures")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == {"report.md", "loss.png", "learning_rate.png",
                                                                   "extrapolation.png"}
    assert "report.md" in result.stdout


def test_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_state"):
        load_run(str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "hf_largebatch.cli", "report", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "save_state" in result.stderr

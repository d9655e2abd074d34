"""A kill at any moment leaves a resumable run: killed at a step or anywhere inside a checkpoint's save, the run
resumed with ``resume_from_checkpoint=True`` ends bit-for-bit where the uninterrupted run ends (an AdaScale run:
its progress, the optimizer and the LR schedule all resume). The kills are deterministic (the worker exits with
status 137 at a chosen point: ``tests/workers/kill_worker.py``)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO

KILL_POINTS = ["mid_step", "model", "optimizer", "algorithm_state", "trainer_state", "rotation"]


def run(output_dir, point, result):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "kill_worker.py"), str(output_dir), point,
                           str(result)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = run(tmp / "out", "none", tmp / "result.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, point):
    killed = run(tmp_path / "out", point, tmp_path / "unused.json")
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = run(tmp_path / "out", "resume", tmp_path / "result.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == uninterrupted


def test_resume_true_skips_incomplete_checkpoints_and_names_them(tmp_path):
    from hf_largebatch.core.checkpoints import newest_complete_checkpoint

    for step, state in ((2, "{}"), (4, None), (6, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    folder, skipped = newest_complete_checkpoint(str(tmp_path))
    assert folder == str(tmp_path / "checkpoint-2")
    assert [(path.rsplit("-", 1)[1], problem.split(" ")[1]) for path, problem in skipped] == [("6", "is"),
                                                                                            ("4", "is")]
    assert "cut short" in skipped[0][1] and "missing" in skipped[1][1]


def test_an_incomplete_checkpoint_given_by_path_is_refused(tmp_path):
    from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
    from helpers import TinyLinearClassifier, random_points

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, use_cpu=True,
                               report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(64))
    with pytest.raises(ValueError, match=r"checkpoint-4 is incomplete: trainer_state.json is missing .* resume from "
                                         r".*checkpoint-2 instead"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


# ---------------------------------------------------------------- damaged checkpoints: an error naming the file
def _checkpointed_adascale_run(output_dir):
    from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
    from helpers import TinyLinearClassifier, random_points

    args = LargeBatchArguments(output_dir=str(output_dir), per_device_train_batch_size=8,
                               gradient_accumulation_steps=2, max_steps=6, optim="sgd", learning_rate=0.1,
                               lr_scaling="adascale", base_batch_size=8, save_strategy="steps", save_steps=2,
                               use_cpu=True, report_to=[], disable_tqdm=True, seed=0)
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(256))
    trainer.train()
    return trainer, sorted(output_dir.glob("checkpoint-*"))[0]


def test_an_algorithm_state_missing_a_field_names_the_file_and_the_field(tmp_path):
    import torch

    trainer, checkpoint = _checkpointed_adascale_run(tmp_path)
    path = checkpoint / "hf_largebatch_algorithms_rank0.pt"
    states = torch.load(path, weights_only=True)
    del states["adascale"]["progress"]
    torch.save(states, path)
    with pytest.raises(ValueError, match=rf"{path}: the state of algorithm 'adascale' lacks 'progress'"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_checkpoint_without_optimizer_state_is_refused_when_algorithms_resume(tmp_path):
    trainer, checkpoint = _checkpointed_adascale_run(tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no optimizer.pt .* restart the optimizer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_conadv_state_without_its_attack_copy_is_refused():
    from hf_largebatch import ConAdv, ConAdvConfig

    with pytest.raises(KeyError, match="attack_model"):
        ConAdv(ConAdvConfig(epsilon=0.1)).load_state_dict({})


# ---------------------------------------------------------------- a resume with another batch or world size
def _resume_with(checkpoint, output_dir, **overrides):
    from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
    from helpers import TinyLinearClassifier, random_points

    options = dict(output_dir=str(output_dir), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                   max_steps=6, optim="sgd", learning_rate=0.1, lr_scaling="adascale", base_batch_size=8,
                   save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=0)
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=LargeBatchArguments(**{**options, **overrides}),
                                train_dataset=random_points(256))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_a_resume_with_another_global_batch_is_refused_naming_both(tmp_path):
    _, checkpoint = _checkpointed_adascale_run(tmp_path)
    with pytest.raises(ValueError, match=r"global_batch_size 16 -> 32, gradient_accumulation_steps 2 -> 4, scale 2.0 "
                                         r"-> 4.0\): resuming would change S .* per_device_train_batch_size=8, "
                                         r"gradient_accumulation_steps=2 on 1 processes"):
        _resume_with(checkpoint, tmp_path, gradient_accumulation_steps=4)


def test_another_split_of_the_same_global_batch_is_refused(tmp_path):
    """Same B, other n: AdaScale's statistics (and its gains) would differ from the run that was interrupted."""
    _, checkpoint = _checkpointed_adascale_run(tmp_path)
    with pytest.raises(ValueError, match=r"per_device_train_batch_size 8 -> 4, gradient_accumulation_steps 2 -> 4\)"):
        _resume_with(checkpoint, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=4)


@pytest.mark.parametrize("budget", ["max_steps", "epochs", "adascale", "adaptive_batch"])
def test_a_finished_run_resumed_trains_nothing(tmp_path, budget):
    """A finished run resumed (``resume_from_checkpoint=True``, twice) trains nothing: its weights and step count
    stay as saved. HF's own budgets (max_steps, epochs) hold; AdaScale's budget of progress and the adaptive batch's
    budget of samples end a run before HF's max_steps, and resumed it took one more step each time."""
    from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
    from helpers import TinyLinearClassifier, flat_params, random_points

    options = {"max_steps": {"max_steps": 4}, "epochs": {"num_train_epochs": 2},
               "adascale": {"num_train_epochs": 2, "lr_scaling": "adascale", "base_batch_size": 8,
                            "gradient_accumulation_steps": 2},
               "adaptive_batch": {"num_train_epochs": 2, "adaptive_batch": "norm", "gradient_accumulation_steps": 2,
                                  "adaptive_batch_args": "max_batch_size=32,eta=0.5"}}[budget]

    def run(resume):
        args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, optim="sgd",
                                   learning_rate=0.1, save_strategy="epoch" if budget != "max_steps" else "steps",
                                   save_steps=4, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                                   **options)
        trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(32))
        trainer.train(resume_from_checkpoint=resume)
        return trainer.state.global_step, flat_params(trainer.model)

    steps, weights = run(None)
    for _ in range(2):
        resumed_steps, resumed_weights = run(True)
        assert resumed_steps == steps
        np.testing.assert_array_equal(resumed_weights, weights)


def test_ddp_timeout_holds_on_cpu(tmp_path):
    """transformers builds the CPU process group without ``ddp_timeout``: a frozen rank held the others for 30
    minutes (here: until the sleeping rank left). With ``LargeBatchArguments`` the wait ends at the timeout."""
    from helpers import launch
    from workers.timeout_worker import SLEEP

    launch(str(REPO / "tests" / "workers" / "timeout_worker.py"), [str(tmp_path)])
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] is not None
    assert result["waited"] < SLEEP / 2, result

"""A run resumed from a checkpoint continues exactly as the uninterrupted run, algorithm state included."""

import glob
import os

import numpy as np
import pytest
import torch

from hf_largebatch import Algorithm, LargeBatchArguments, LargeBatchTrainer, LRHistory
from hf_largebatch.core.trainer import ALGORITHM_STATE_FILE
from helpers import digits_dataset, flat_params, tiny_resnet
from test_golden_trajectories import BACKENDS, CASES


class LossEMA(Algorithm):
    """A stateful algorithm: an EMA of the step loss and a step counter, both needed to continue exactly."""

    name = "loss_ema"

    def __init__(self):
        self.ema = torch.zeros((), dtype=torch.float64)
        self.count = 0
        self.trace = []

    def on_step_loss(self, args, state, control, *, loss, **kw):
        self.count += 1
        self.ema = 0.9 * self.ema + 0.1 * loss
        self.trace.append(float(self.ema))

    def state_dict(self):
        return {"ema": self.ema.clone(), "count": self.count}

    def load_state_dict(self, state):
        self.ema, self.count = state["ema"].clone(), int(state["count"])

    def log_metrics(self):
        return {"loss_ema": float(self.ema)}


def make(output_dir):
    args = LargeBatchArguments(
        output_dir=str(output_dir), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=10,
        learning_rate=0.05, optim="sgd", optim_args="momentum=0.9", lr_scaling="legw", base_batch_size=4,
        legw_base_warmup_epochs=0.25, lr_scheduler_type="cosine", use_cpu=True, report_to=[], save_steps=4,
        save_strategy="steps", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True)
    history, ema = LRHistory(16), LossEMA()
    model = tiny_resnet()  # BatchNorm running statistics must come back too
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(160), callbacks=[history, ema])
    return trainer, model, history, ema


def test_resume_matches_uninterrupted_run(tmp_path):
    full, full_model, full_hist, full_ema = make(tmp_path / "full")
    full.train()
    assert full_ema.count == 10
    # 160 examples / 16 = 10 steps an epoch; LEGW warm-up 0.25 epoch x S=4 = 10 steps: checkpoint-4 is mid-warm-up
    checkpoint = tmp_path / "full" / "checkpoint-4"
    state_file = checkpoint / ALGORITHM_STATE_FILE.format(rank=0)
    saved = torch.load(state_file, weights_only=True)
    assert saved["loss_ema"]["count"] == 4 and len(saved["lr_history"]["steps"]) == 4

    resumed, resumed_model, resumed_hist, resumed_ema = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed_hist.steps == full_hist.steps == list(range(1, 11))
    np.testing.assert_allclose(resumed_hist.learning_rates, full_hist.learning_rates, rtol=1e-12)
    np.testing.assert_allclose(resumed_hist.losses, full_hist.losses, rtol=1e-6)
    assert resumed_ema.count == 10
    np.testing.assert_allclose(resumed_ema.trace, full_ema.trace[4:], rtol=1e-6)
    np.testing.assert_allclose(flat_params(resumed_model), flat_params(full_model), rtol=0, atol=1e-6)
    for name, buf in full_model.named_buffers():
        torch.testing.assert_close(dict(resumed_model.named_buffers())[name], buf)
    logged = [h["loss_ema"] for h in resumed.state.log_history if "loss_ema" in h]
    assert logged[-1] == resumed_ema.trace[-1]


def test_every_checkpoint_holds_algorithm_state(tmp_path):
    trainer, *_ = make(tmp_path)
    trainer.train()
    checkpoints = sorted(glob.glob(str(tmp_path / "checkpoint-*")))
    assert [os.path.basename(c) for c in checkpoints] == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    for c in checkpoints:
        assert os.path.isfile(os.path.join(c, ALGORITHM_STATE_FILE.format(rank=0)))


@pytest.mark.parametrize("case", BACKENDS["single"])
def test_every_algorithm_resumes_exactly(tmp_path, case):
    """Each algorithm and LR rule of the golden trajectories, interrupted at a checkpoint in the middle of its run
    and resumed in a fresh trainer: the same applied LRs, losses, logged metrics and weights as uninterrupted."""
    from workers.train_worker import run_one

    run = {**CASES[case], "save_steps": 2}
    full = run_one({**run, "output_dir": str(tmp_path / "full")}, None)
    final_step = full["log_history"][-1]["step"]
    checkpoints = sorted((c for c in (tmp_path / "full").glob("checkpoint-*")
                          if 1 < int(c.name.split("-")[1]) < final_step), key=lambda c: int(c.name.split("-")[1]))
    assert checkpoints, "no checkpoint inside the run"
    middle = checkpoints[len(checkpoints) // 2]
    resumed = run_one({**run, "output_dir": str(tmp_path / "resumed"), "resume": str(middle)}, None)
    assert resumed["learning_rates"] == pytest.approx(full["learning_rates"], rel=1e-12)
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6)
    np.testing.assert_allclose(resumed["params"], full["params"], rtol=0, atol=1e-6)
    after = int(middle.name.split("-")[1])
    for key in {k for h in full["log_history"] for k in h} - {"train_runtime", "train_samples_per_second",
                                                              "train_steps_per_second", "total_flos", "train_loss",
                                                              "autowu_gp_seconds"}:
        want = [h.get(key) for h in full["log_history"] if h["step"] > after and "train_runtime" not in h]
        got = [h.get(key) for h in resumed["log_history"] if h["step"] > after and "train_runtime" not in h]
        assert got == pytest.approx(want, rel=1e-6, nan_ok=True), key


def test_examples_seen_counts_each_epochs_short_last_step_and_survives_a_resume(tmp_path):
    """150 examples in micro-batches of 8, two to a step: each epoch is 9 full steps and a last step of one
    micro-batch of 6 examples, so 2 epochs read 300 examples, not 20 steps x 16. The count is logged with every
    log entry, written to the summary and carried through a checkpoint."""
    from hf_largebatch import write_summary

    def run(output_dir, resume=None):
        args = LargeBatchArguments(
            output_dir=str(output_dir), per_device_train_batch_size=8, gradient_accumulation_steps=2,
            num_train_epochs=2, learning_rate=0.05, optim="sgd", use_cpu=True, report_to=[], save_steps=7,
            save_strategy="steps", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0)
        trainer = LargeBatchTrainer(model=tiny_resnet(), args=args, train_dataset=digits_dataset(150))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, write_summary(trainer, {}, str(output_dir / "summary.json"))

    full, summary = run(tmp_path / "full")
    assert summary["optimizer_steps"] == 20 and summary["global_batch_size"] == 16
    assert summary["examples_seen"] == 2 * 150
    logged = {h["step"]: h["examples_seen"] for h in full.state.log_history if "loss" in h}
    assert [logged[s] for s in (1, 9, 10, 11, 20)] == [16, 144, 150, 166, 300]

    resumed, resumed_summary = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-14"))
    assert resumed_summary["examples_seen"] == 300
    # the history up to step 14 comes back from the checkpoint; the steps after it are counted on from there
    assert {h["step"]: h["examples_seen"] for h in resumed.state.log_history if "loss" in h} == logged

    # a checkpoint written before the count was kept: its steps count as full global batches (14 x 16, not 214)
    state_file = tmp_path / "full" / "checkpoint-14" / ALGORITHM_STATE_FILE.format(rank=0)
    states = torch.load(state_file, weights_only=True)
    del states["__examples_seen__"]
    torch.save(states, state_file)
    _, legacy_summary = run(tmp_path / "legacy", resume=str(tmp_path / "full" / "checkpoint-14"))
    assert legacy_summary["examples_seen"] == 14 * 16 + 300 - logged[14]

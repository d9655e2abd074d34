"""A non-finite gradient never reaches the weights unannounced (``core/nonfinite.py``): one NaN example in the data
makes its step's update skipped (weights, optimizer state and BatchNorm running statistics as before the step),
counted in ``nonfinite_steps``; ``on_nonfinite_step="stop"`` stops before the update; a run where every step is
non-finite stops; AdaScale makes no progress in a skipped step; the fp16 GradScaler's skips keep the BatchNorm
statistics too."""

import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.core.nonfinite import MAX_CONSECUTIVE
from helpers import BatchNormClassifier, poisoned_points, use_cpu_grad_scaler

def state_vector(model):
    return np.concatenate([t.detach().double().reshape(-1).numpy()
                           for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()])


class Record(TrainerCallback):
    """The model's parameters and buffers after every step, the logged nonfinite_steps and AdaScale's progress."""

    def __init__(self, model):
        self.model, self.states, self.logged, self.progress = model, [state_vector(model)], [], []
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(state_vector(self.model))
        adascale = self.trainer.algorithm("adascale")
        if adascale is not None:
            self.progress.append(adascale.progress)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "nonfinite_steps" in logs:
            self.logged.append(logs["nonfinite_steps"])


def train(tmp_path, data, epochs=2, **options):
    model = BatchNormClassifier()
    options = {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.1, "max_grad_norm": 0.0,
               "per_device_train_batch_size": 8, "save_strategy": "no", **options}
    args = LargeBatchArguments(output_dir=str(tmp_path), num_train_epochs=epochs, use_cpu=True, report_to=[],
                               logging_steps=1, disable_tqdm=True, seed=0, **options)
    record = Record(model)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=data, callbacks=[record])
    record.trainer = trainer
    return trainer, record


def skipped_steps(record):
    return [i for i in range(1, len(record.states)) if np.array_equal(record.states[i], record.states[i - 1])]


@pytest.mark.parametrize("clipping", [0.0, 1.0])
def test_a_nan_example_skips_its_step_and_keeps_weights_optimizer_and_batchnorm_statistics(tmp_path, clipping):
    trainer, record = train(tmp_path, poisoned_points(), max_grad_norm=clipping)
    trainer.train()
    assert all(np.isfinite(s).all() for s in record.states)
    # the poisoned example is in one step per epoch: exactly those steps leave everything as it was
    assert len(skipped_steps(record)) == 2 and len(record.states) == 1 + 16
    assert record.logged[-1] == 2 and record.logged[0] in (0, 1)
    momentum = [trainer.optimizer.state[p]["momentum_buffer"] for p in trainer.model.parameters()]
    assert all(torch.isfinite(m).all() for m in momentum)


def test_stop_policy_raises_before_the_update(tmp_path):
    trainer, record = train(tmp_path, poisoned_points(), on_nonfinite_step="stop")
    with pytest.raises(FloatingPointError, match="on_nonfinite_step='stop'"):
        trainer.train()
    assert all(np.isfinite(p.detach().numpy()).all() for p in trainer.model.parameters())


def test_a_run_non_finite_at_every_step_stops(tmp_path):
    n = 8 * (MAX_CONSECUTIVE + 5)
    trainer, record = train(tmp_path, poisoned_points(n, poisoned=range(n)), epochs=1)
    with pytest.raises(FloatingPointError, match=f"{MAX_CONSECUTIVE} consecutive steps"):
        trainer.train()
    assert np.array_equal(state_vector(trainer.model), record.states[0])  # nothing was ever applied


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite_step='ignore'"):
        LargeBatchArguments(output_dir="unused", on_nonfinite_step="ignore", use_cpu=True)


def test_adascale_makes_no_progress_in_a_skipped_step(tmp_path):
    trainer, record = train(tmp_path, poisoned_points(), per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, lr_scaling="adascale", base_batch_size=4)
    trainer.train()
    skipped = skipped_steps(record)  # the run on AdaScale's budget takes part of a third epoch
    assert len(skipped) == record.logged[-1] >= 2
    progress = [0.0, *record.progress]
    gains = np.diff(progress)
    assert all(gains[i - 1] == 0 for i in skipped)
    assert all(gains[i - 1] >= 1 for i in range(1, len(progress)) if i not in skipped)
    assert math.isfinite(trainer.algorithm("adascale").progress)


def test_fp16_grad_scaler_skip_keeps_batchnorm_statistics(tmp_path):
    trainer, record = train(tmp_path, poisoned_points(), fp16=True, epochs=1)
    use_cpu_grad_scaler(trainer, init_scale=1.0)  # a scale of 1: no overflow but the NaN example's
    trainer.train()
    assert all(np.isfinite(s).all() for s in record.states)
    assert len(skipped_steps(record)) == 1 and record.logged[-1] == 1


def test_nonfinite_steps_survive_a_resume(tmp_path):
    trainer, _ = train(tmp_path, poisoned_points(), epochs=1, save_strategy="steps", save_steps=8)
    trainer.train()
    resumed, record = train(tmp_path, poisoned_points(), epochs=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert record.logged[-1] == 2

"""Trains a tiny AdaScale run (a checkpoint every 2 units of progress) and kills itself at a chosen point, or
resumes.

Usage: kill_worker.py OUTPUT_DIR KILL_POINT RESULT_JSON. KILL_POINT is a point of ``install`` (the process exits
with status 137, as under SIGKILL, at that point of the second checkpoint's save, or after step 3), ``none`` (train
to the end) or ``resume`` (``resume_from_checkpoint=True``, to the end). At the end it writes the final weights and
AdaScale's progress to RESULT_JSON.
"""

import json
import os
import sys

import torch
import transformers

from hf_largebatch import Algorithm, LargeBatchArguments, LargeBatchTrainer
from helpers import TinyLinearClassifier, random_points

KILLED = 137
_CHECKPOINTS: list[str] = []


def die():
    os._exit(KILLED)


def in_second_checkpoint(path: str) -> bool:
    """Whether ``path`` lies in the second checkpoint folder this run writes (AdaScale saves on progress, so the
    folders' step numbers depend on its gains)."""
    folder = next((part for part in str(path).split(os.sep) if part.startswith("checkpoint-")), None)
    if folder is None:
        return False
    if folder not in _CHECKPOINTS:
        _CHECKPOINTS.append(folder)
    return _CHECKPOINTS.index(folder) == 1


def truncating(save, path_of, marker):
    """``save`` that writes the first bytes of its file (those of the real save, cut short) and dies, when the
    file's name contains ``marker`` and this is the second checkpoint."""
    def patched(*args, **kwargs):
        path = str(path_of(*args, **kwargs))
        if marker in path and in_second_checkpoint(path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 cut short")
            die()
        return save(*args, **kwargs)
    return patched


class KillAtStep(Algorithm):
    name = "kill_at_step"

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            die()


def install(point: str) -> list:
    trainer_module = sys.modules["transformers.trainer"]
    if point == "model":  # inside the model's save: the weights file cut short
        save = transformers.Trainer.save_model

        def save_then_cut(self, output_dir=None, _internal_call=False):
            save(self, output_dir, _internal_call)
            if output_dir and in_second_checkpoint(output_dir):
                for name in os.listdir(output_dir):
                    os.truncate(os.path.join(output_dir, name), 10)
                die()

        transformers.Trainer.save_model = save_then_cut
    elif point == "algorithm_state":
        torch.save = truncating(torch.save, lambda obj, path, *a, **k: path, "hf_largebatch_algorithms")
    elif point == "optimizer":
        torch.save = truncating(torch.save, lambda obj, path, *a, **k: path, "optimizer.pt")
    elif point == "trainer_state":
        state_cls = transformers.trainer_callback.TrainerState
        state_cls.save_to_json = truncating(state_cls.save_to_json, lambda self, path: path, "trainer_state")
    elif point == "rotation":  # the checkpoint is written; killed while older ones are being deleted
        rotate, calls = trainer_module.rotate_checkpoints, []

        def rotate_then_die(*args, **kwargs):
            rotate(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                die()

        trainer_module.rotate_checkpoints = rotate_then_die
    elif point == "mid_step":
        return [KillAtStep()]
    elif point not in ("none", "resume"):
        raise ValueError(point)
    return []


def main(output_dir: str, point: str, result: str) -> None:
    callbacks = install(point)
    args = LargeBatchArguments(output_dir=output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                               max_steps=12, optim="sgd", learning_rate=0.1, lr_scheduler_type="linear",
                               lr_scaling="adascale", base_batch_size=8, save_strategy="steps", save_steps=2,
                               save_total_limit=2, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                               data_seed=0)
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points(256),
                                callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if point == "resume" else None)
    with open(result, "w") as f:
        json.dump({"weights": [p.detach().flatten().tolist() for p in trainer.model.parameters()],
                   "progress": trainer.algorithm("adascale").progress}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])

"""Multi-process worker for adaptive batch sizes and local SGD (run under torchrun, 2 ranks, gloo on CPU).

Usage: adaptive_batch_worker.py OUT_DIR MODE [CHECKPOINT]
  ddp_adaptive    DDP, norm test, 1 micro-batch per rank to start
  ddp_adaptive_unequal  the same, rank 1 wishing one micro-batch more than rank 0: both take the larger
  local_sgd       local SGD with H = 3, fixed batch, checkpoints every 3 steps (CHECKPOINT: resume from it);
                  the local_sgd modes train a model with BatchNorm (running statistics to average)
  local_adaptive  local SGD with H = 2 and the norm test at synchronisation rounds
  local_sgd_final local SGD with H = 3 and max_steps = 8: the final checkpoint falls between two rounds

Writes OUT_DIR/rank{r}.json: world size, per-step examples and parameters (before and after the algorithms'
step end), the adaptive batch's history and the indices this rank trained on (rank{r}_resumed.json after a
resume).
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch import AdaptiveBatch, LocalSGD
from helpers import IndexedBatchNormClassifier, IndexedClassifier, flat_buffers, flat_params, indexed_points

MICRO = 8


class Snapshot(TrainerCallback):
    """Parameters and examples at each step end: before or after the trainer's algorithms act, by where it is added."""

    def __init__(self, model, store):
        self.model, self.store, self.start = model, store, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.store.append({"step": state.global_step, "params": flat_params(self.model).tolist(),
                           "buffers": flat_buffers(self.model), "examples": len(self.model.seen) - self.start})
        self.start = len(self.model.seen)


def main(out_dir: str, mode: str, resume: str | None = None) -> None:
    torch.set_num_threads(1)
    options = {
        "ddp_adaptive": dict(gradient_accumulation_steps=1, adaptive_batch="norm",
                             adaptive_batch_args="max_batch_size=64,eta=0.5,smoothing=0"),
        "ddp_adaptive_unequal": dict(gradient_accumulation_steps=1, adaptive_batch="norm",
                                     adaptive_batch_args="max_batch_size=64,eta=0.5,smoothing=0"),
        "local_sgd": dict(gradient_accumulation_steps=1, local_sgd_steps=3, max_steps=9, save_strategy="steps",
                          save_steps=3),
        "local_sgd_final": dict(gradient_accumulation_steps=1, local_sgd_steps=3, max_steps=8,
                                save_strategy="steps", save_steps=3),
        "local_adaptive": dict(gradient_accumulation_steps=2, local_sgd_steps=2, adaptive_batch="norm",
                               adaptive_batch_args="max_batch_size=128,eta=0.5,smoothing=0"),
    }[mode]
    options.setdefault("save_strategy", "no")
    if mode == "ddp_adaptive_unequal":  # the ranks' wishes differ (as float sums can in their last bit): rank 1
        import hf_largebatch.algorithms.adaptive_batch as adaptive  # asks one micro-batch more than rank 0

        wished = adaptive.grown_accumulation
        rank = int(os.environ["RANK"])
        adaptive.grown_accumulation = lambda *a, **k: min(wished(*a, **k) + rank, 8)
    args = LargeBatchArguments(output_dir=out_dir, per_device_train_batch_size=MICRO, num_train_epochs=2,
                               optim="sgd", optim_args="momentum=0.9", learning_rate=0.1,
                               lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, use_cpu=True,
                               report_to=[], logging_steps=1, disable_tqdm=True, seed=0,
                               data_seed=0, dataloader_drop_last=True, **options)
    # local SGD averages floating-point buffers with the parameters: its model has BatchNorm running statistics
    model = IndexedBatchNormClassifier() if mode.startswith("local_sgd") else IndexedClassifier()
    before, after = [], []
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=indexed_points(),
                                callbacks=[Snapshot(model, before)])
    trainer.add_callback(Snapshot(model, after))  # after LocalSGD / AdaptiveBatch (added by the trainer)
    trainer.train(resume_from_checkpoint=resume)
    adaptive = next((a for a in trainer.algorithms if isinstance(a, AdaptiveBatch)), None)
    local = next((a for a in trainer.algorithms if isinstance(a, LocalSGD)), None)
    result = {
        "world_size": args.world_size,
        "before": before,
        "after": after,
        "final_params": flat_params(model).tolist(),
        "seen": model.seen,
        "history": adaptive.history if adaptive else [],
        "samples_seen": adaptive.samples_seen if adaptive else None,
        "syncs": local.syncs if local else None,
        "global_step": trainer.state.global_step,
    }
    Path(out_dir, f"rank{args.process_index}{'_resumed' if resume else ''}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from hf_largebatch.core.backends import run_recipe

    run_recipe(main, *sys.argv[1:])

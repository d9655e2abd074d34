"""``hf-largebatch demo``: the main job on data every machine has.

scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download) and a small HF
``ResNetForImageClassification``: a base run at ``B0`` and runs at ``S x B0`` with the linear rule (+ warm-up), with
LEGW (both on the base run's epoch budget) and with AdaScale (on the base run's budget in *progress*: it stops
once its gains add up to the base run's step count). Prints a table and writes a PNG of LR and loss vs examples.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import LargeBatchArguments, LargeBatchTrainer, LRHistory, plot_lr_and_loss  # the public API only


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values, labels):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def digits_splits(test_fraction: float = 0.2, seed: int = 0):
    """Stratified train/test split of sklearn's digits, as 1x8x8 float images normalised to mean 0, std 1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = (x - x.mean()) / x.std()
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=test_fraction, random_state=seed,
                                              stratify=d.target)
    make = lambda x_, y_: _TensorDataset(torch.from_numpy(x_).unsqueeze(1), torch.from_numpy(y_).long())
    return make(x_tr, y_tr), make(x_te, y_te)


def small_resnet(seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                          layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    return ResNetForImageClassification(config)


def accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


@dataclass
class DemoRun:
    label: str
    lr_scaling: str
    scale: int
    warmup_steps: float = 0.0


def run_demo(output_dir: str = "hf_largebatch_demo", base_batch_size: int = 16, scale: int = 16,
             epochs: float = 15.0, learning_rate: float = 0.05, base_warmup_epochs: float = 0.5,
             seed: int = 0) -> list[dict]:
    """Train the three runs and return one row per run (also written to ``results.json``)."""
    os.makedirs(output_dir, exist_ok=True)
    train, test = digits_splits(seed=seed)
    runs = [
        DemoRun(f"base B0={base_batch_size}", "legw", 1),
        DemoRun(f"linear+warmup {scale}xB0", "linear", scale, warmup_steps=0.1),
        DemoRun(f"LEGW {scale}xB0", "legw", scale),
        DemoRun(f"AdaScale {scale}xB0", "adascale", scale),
    ]
    rows, histories = [], {}
    for run in runs:
        batch = base_batch_size * run.scale
        micro_batches = 2 if run.lr_scaling == "adascale" else 1  # AdaScale measures variance over micro-batches
        args = LargeBatchArguments(
            output_dir=os.path.join(output_dir, run.lr_scaling + f"_x{run.scale}"),
            per_device_train_batch_size=batch // micro_batches, gradient_accumulation_steps=micro_batches,
            per_device_eval_batch_size=512, num_train_epochs=epochs,
            learning_rate=learning_rate, lr_scaling=run.lr_scaling, base_batch_size=base_batch_size,
            legw_base_warmup_epochs=base_warmup_epochs if run.lr_scaling == "legw" else 0.0,
            warmup_steps=run.warmup_steps if run.lr_scaling != "adascale" else base_warmup_epochs / epochs,
            lr_scheduler_type="cosine", optim="sgd",
            optim_args="momentum=0.9", weight_decay=5e-4, use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", eval_strategy="no", seed=seed, data_seed=seed, dataloader_drop_last=True,
        )
        model = small_resnet(seed)
        history = LRHistory(batch)
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                    compute_metrics=accuracy, callbacks=[history])
        print(f"\n== {run.label}: global batch {batch}, S={trainer.scale:g}, lr_scaling={run.lr_scaling}")
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        metrics = trainer.evaluate()
        histories[run.label] = history
        rows.append({
            "run": run.label, "global_batch": batch, "scale": trainer.scale,
            "peak_lr": max(history.learning_rates), "warmup_steps": trainer.lr_plan(trainer.state.max_steps)[1],
            "steps": trainer.state.global_step, "test_accuracy": metrics["eval_accuracy"], "wall_s": wall,
            "mean_gain": (trainer.algorithm("adascale").progress / trainer.state.global_step
                          if run.lr_scaling == "adascale" else None),
        })
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot_lr_and_loss(histories, os.path.join(output_dir, "lr_and_loss.png"),
                     title=f"digits, small ResNet, {epochs:g} epochs")
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| run | global batch | S | peak LR (applied) | warm-up steps | steps | AdaScale mean gain "
            "| test accuracy | wall time (s) |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    body = [f"| {r['run']} | {r['global_batch']} | {r['scale']:g} | {r['peak_lr']:.4g} | {r['warmup_steps']} | "
            f"{r['steps']} | {'-' if r['mean_gain'] is None else format(r['mean_gain'], '.2f')} | "
            f"{r['test_accuracy']:.4f} | {r['wall_s']:.1f} |" for r in rows]
    return "\n".join([head, sep, *body])

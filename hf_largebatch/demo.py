"""``hf-largebatch demo``: the main job on data every machine has.

scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download) and a small HF
``ResNetForImageClassification``. A base run at ``B0`` (16, SGD lr 0.05 with momentum, cosine, 20 epochs), then
runs at ``S x B0`` (S = 64 by default): the linear rule (+ warm-up) and LEGW on the base run's epoch budget, and
AdaScale on its budget in *progress* (it stops once its gains add up to the base run's step count). At 64x an
epoch is only a step, so a fixed rule gets 20 steps to learn in and loses 30+ points; AdaScale keeps the base
run's accuracy in ~14x fewer steps (seeing more examples). The setting was chosen by measurement over 6 seeds
(BENCHMARKS.md, "demo"). Prints a table with a conclusion computed from it, writes a PNG of LR and loss vs
examples and each run's report pictures (``run_report``), and ends with the batch-size advisor's recommendation
for this task.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import LargeBatchArguments, LargeBatchTrainer, LRHistory, advise, plot_lr_and_loss  # the public API only
from .run_report import write_report


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


def demo_arguments(output_dir: str, batch: int, micro_batches: int, run: DemoRun, base_batch_size: int,
                   epochs: float, learning_rate: float, base_warmup_epochs: float, seed: int,
                   train_examples: int) -> LargeBatchArguments:
    return LargeBatchArguments(
        output_dir=output_dir, per_device_train_batch_size=batch // micro_batches,
        gradient_accumulation_steps=micro_batches, per_device_eval_batch_size=512, num_train_epochs=epochs,
        learning_rate=learning_rate, lr_scaling=run.lr_scaling, base_batch_size=base_batch_size,
        legw_base_warmup_epochs=base_warmup_epochs if run.lr_scaling == "legw" else 0.0,
        warmup_steps=run.warmup_steps if run.lr_scaling != "adascale" else base_warmup_epochs / epochs,
        lr_scheduler_type="cosine", optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="steps",
        # about 10 log lines a run (AdaScale's ~130 steps: every 10), enough for the report's curves
        logging_steps=10 if run.lr_scaling == "adascale" else max(1, int(epochs * train_examples // batch) // 10),
        eval_strategy="no", seed=seed, data_seed=seed, dataloader_drop_last=True)


def run_demo(output_dir: str = "hf_largebatch_demo", base_batch_size: int = 16, scale: int = 64,
             epochs: float = 20.0, learning_rate: float = 0.05, base_warmup_epochs: float = 0.5,
             seed: int = 0, probe_steps: int = 100) -> dict:
    """Train the four runs, write their reports and the advisor's advice; returns ``{"rows": [...], "conclusion":
    str, "advice": Advice | None}`` (also written to ``results.json``). ``probe_steps=0`` skips the advisor."""
    os.makedirs(output_dir, exist_ok=True)
    train, test = digits_splits(seed=seed)
    runs = [
        DemoRun(f"base B0={base_batch_size}", "legw", 1),  # LEGW at S = 1: the base run's w0 epochs of warm-up
        DemoRun(f"linear+warmup {scale}xB0", "linear", scale, warmup_steps=0.1),
        DemoRun(f"LEGW {scale}xB0", "legw", scale),
        DemoRun(f"AdaScale {scale}xB0", "adascale", scale),
    ]
    rows, histories = [], {}
    for run in runs:
        batch = base_batch_size * run.scale
        micro_batches = 2 if run.lr_scaling == "adascale" else 1  # AdaScale measures variance over micro-batches
        name = "base" if run.scale == 1 else f"{run.lr_scaling}_x{run.scale}"
        run_dir = os.path.join(output_dir, name)
        args = demo_arguments(run_dir, batch, micro_batches, run, base_batch_size, epochs, learning_rate,
                              base_warmup_epochs, seed, len(train))
        model = small_resnet(seed)
        history = LRHistory(batch)
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                    compute_metrics=accuracy, callbacks=[history])
        print(f"\n== {run.label}: global batch {batch}, S={trainer.scale:g}, lr_scaling={run.lr_scaling}")
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        metrics = trainer.evaluate()
        trainer.save_state()
        write_report(run_dir, os.path.join(output_dir, f"report_{name}"))
        histories[run.label] = history
        steps = trainer.state.global_step
        rows.append({
            "run": run.label, "rule": "base" if run.scale == 1 else run.lr_scaling, "global_batch": batch,
            "scale": trainer.scale, "peak_lr": max(history.learning_rates),
            "warmup_steps": trainer.lr_plan(trainer.state.max_steps)[1], "steps": steps,
            "examples_seen": trainer.examples_seen, "test_accuracy": metrics["eval_accuracy"], "wall_s": wall,
            "mean_gain": (trainer.algorithm("adascale").progress / steps if run.lr_scaling == "adascale" else None),
        })
    conclusion = conclude(rows)
    plot_lr_and_loss(histories, os.path.join(output_dir, "lr_and_loss.png"),
                     title=f"digits, small ResNet, {epochs:g} epochs")
    advice = None
    if probe_steps:
        print(f"\n== advisor: a {probe_steps}-step probe at the base batch (2 micro-batches of "
              f"{base_batch_size // 2})")
        probe = DemoRun("probe", "legw", 1)  # the base run's settings
        advice = advise(small_resnet(seed), demo_arguments(os.path.join(output_dir, "advice"), base_batch_size, 2,
                                                           probe, base_batch_size, epochs, learning_rate,
                                                           base_warmup_epochs, seed, len(train)),
                        train, probe_steps=probe_steps, output_dir=os.path.join(output_dir, "advice"))
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "conclusion": conclusion,
                   "advice": advice.to_dict() if advice else None}, f, indent=2)
    return {"rows": rows, "conclusion": conclusion, "advice": advice}


def conclude(rows: list[dict]) -> str:
    """One sentence from the numbers: how AdaScale and the best fixed rule did against the base run."""
    base = rows[0]
    adascale = next(r for r in rows if r["rule"] == "adascale")
    fixed = max((r for r in rows[1:] if r["rule"] != "adascale"), key=lambda r: r["test_accuracy"])
    points = lambda r: 100 * (r["test_accuracy"] - base["test_accuracy"])  # noqa: E731
    held = points(adascale) >= -1.0  # within 1 point of the base run, or above it
    sentence = (f"At {adascale['scale']:g}x the batch, AdaScale {'kept' if held else 'did not keep'} the base run's "
                f"accuracy ({100 * adascale['test_accuracy']:.1f}% vs {100 * base['test_accuracy']:.1f}%, "
                f"{points(adascale):+.1f} points) in {base['steps'] / adascale['steps']:.1f}x fewer steps "
                f"({adascale['steps']} vs {base['steps']}), seeing "
                f"{adascale['examples_seen'] / base['examples_seen']:.1f}x the examples; ")
    if points(fixed) <= -2.0:
        sentence += (f"on the base run's epoch budget the best fixed rule, {fixed['rule']}, lost "
                     f"{-points(fixed):.1f} points in {fixed['steps']} steps.")
    else:
        sentence += (f"the best fixed rule, {fixed['rule']}, came within {abs(points(fixed)):.1f} points of the base "
                     f"run in {fixed['steps']} steps: this setting does not need AdaScale.")
    return sentence


def format_table(rows: list[dict]) -> str:
    head = ("| run | rule | S | peak LR (applied) | warm-up (steps) | steps | examples seen | test accuracy "
            "| AdaScale mean gain | wall time (s) |")
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    body = [f"| {r['run']} | {r['rule']} | {r['scale']:g} | {r['peak_lr']:.4g} | {r['warmup_steps']} | "
            f"{r['steps']} | {r['examples_seen']} | {r['test_accuracy']:.4f} | "
            f"{'-' if r['mean_gain'] is None else format(r['mean_gain'], '.2f')} | {r['wall_s']:.1f} |"
            for r in rows]
    return "\n".join([head, sep, *body])

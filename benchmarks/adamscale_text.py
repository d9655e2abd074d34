"""AdamScale on a text classifier with a real, Zipf-distributed vocabulary: does the gain follow gradient noise?

Task: Multi30k captions (train split, English and German lines), a word-level vocabulary of every word of the
sampled sentences (most embedding rows are rare: seen for the first time late in training, or never), a small
BERT classifier (``BertForSequenceClassification`` from a config), AdamW, S = 8 (B0 = 8, 8 micro-batches of 8).
Two labellings of the same sentences:

* ``language``  English vs German: a strong, learnable signal early, which fades as the loss goes to 0
* ``random``    random labels: pure noise, nothing to learn

If the gain responds to gradient noise it starts well below S on ``language``, rises as the task is learned,
and sits near S on ``random``. If rare embedding rows took over the statistics (the old estimator's ``g/eps``),
both would sit at S. Logged: the gain, the smoothed ``||G||^2`` and variance (Adam's metric), and the share of
the step's preconditioned ``||g_bar / P||^2`` that the word-embedding matrix holds.

    python benchmarks/adamscale_text.py --out benchmarks/results/adamscale_text          # seeds 0 1 2
    PYTHONPATH=<checkout of another version> python benchmarks/adamscale_text.py ...   # compare estimators

Writes ``results.json`` (per-step curves, window means), ``table.md`` and ``gain.png`` (gain and loss vs step) to
``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.algorithms.adascale import AdaScale
from hf_largebatch.data import dataset_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling  # noqa: E402  (the benchmark scripts are not a package)


def sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """``count`` captions, half English, half German (disjoint lines), shuffled; label 1 = German."""
    folder = dataset_dir("multi30k", ("train.en.gz", "train.de.gz"))
    lines = {}
    for lang in ("en", "de"):
        with gzip.open(folder / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            lines[lang] = f.read().splitlines()
    rng = random.Random(seed)
    order = list(range(len(lines["en"])))
    rng.shuffle(order)
    half = count // 2
    pairs = [(lines["en"][i], 0) for i in order[:half]] + [(lines["de"][i], 1) for i in order[half:2 * half]]
    rng.shuffle(pairs)
    return [s for s, _ in pairs], [y for _, y in pairs]


def encode(texts: list[str], length: int) -> tuple[torch.Tensor, int, np.ndarray]:
    """Word-level ids (0 pad, 1 [CLS]); returns (ids, vocabulary size, each word id's count)."""
    vocab: dict[str, int] = {}
    rows = []
    for text in texts:
        words = re.findall(r"\w+|[^\w\s]", text.lower())[:length - 1]
        rows.append([1] + [vocab.setdefault(w, len(vocab) + 2) for w in words])
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=len(vocab) + 2)
    return ids, len(vocab) + 2, counts


class Dataset(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": (self.ids[i] > 0).long(), "labels": self.labels[i]}


class Recorder(TrainerCallback):
    """Per step: the gain, the smoothed statistics, the loss and the embedding's share of ``||g_bar / P||^2``."""

    def __init__(self, alg: AdaScale, embedding: torch.nn.Parameter):
        self.alg, self.embedding = alg, embedding
        self.rows: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the step's reduced gradient is in .grad and Adam's state is still the previous step's: P as AdaScale forms
        # it (calling it again only recomputes the step's pending row coverage, from the same values)
        if not hasattr(self.alg, "_rows"):  # another estimator (an older version): no share
            self._share = float("nan")
            return
        shares = {}
        for p in (q for g in self.alg._optimizer.param_groups for q in g["params"]):
            precond = None if p.grad is None else self.alg._preconditioner(p, p.grad)
            if precond is not None:
                shares[p] = float((p.grad.float() / precond).square().sum())
        self._share = shares.get(self.embedding, 0.0) / max(sum(shares.values()), 1e-30)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "adascale_gain" in logs:
            self.rows.append({"step": state.global_step, "gain": logs["adascale_gain"], "loss": logs.get("loss"),
                              "grad_sqr": logs.get("grad_sqr"), "grad_var": logs.get("grad_var"),
                              "embedding_share": getattr(self, "_share", float("nan"))})


def run(labels: str, opts) -> dict:
    texts, language = sentences(opts.sentences, opts.seed)
    ids, vocab_size, counts = encode(texts, opts.length)
    y = language if labels == "language" else list(np.random.default_rng(opts.seed).integers(0, 2, len(texts)))
    torch.manual_seed(opts.seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=opts.hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * opts.hidden, max_position_embeddings=opts.length, num_labels=2))
    alg = AdaScale(theta=opts.theta)
    recorder = Recorder(alg, model.get_input_embeddings().weight)
    args = LargeBatchArguments(
        output_dir=str(Path(opts.out) / labels), per_device_train_batch_size=opts.base_batch,
        gradient_accumulation_steps=opts.scale, base_batch_size=opts.base_batch, lr_scaling="adascale",
        max_steps=opts.steps * opts.scale, learning_rate=opts.lr, optim="adamw_torch", weight_decay=0.01,
        lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=opts.seed)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=Dataset(ids, [int(v) for v in y]),
                                callbacks=[alg, recorder])
    trainer.train()
    rows = recorder.rows
    windows = {}
    # no estimate yet (the current estimator), the language task being learned (loss 0.69 -> ~0.05), learned
    for lo, hi in ((1, 5), (6, 30), (31, 150), (151, 10 ** 9)):
        part = [r for r in rows if lo <= r["step"] <= hi]
        if part:
            windows[f"{lo}-{hi if hi < 10 ** 9 else rows[-1]['step']}"] = {
                key: float(np.nanmean([r[key] for r in part])) for key in ("gain", "loss", "embedding_share")}
    return {"labels": labels, "vocab_size": vocab_size, "rows_used": int((counts[2:] > 0).sum()),
            "rows_seen_once": int((counts[2:] == 1).sum()), "steps": len(rows), "windows": windows, "per_step": rows}


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gain_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        style = dict(color=f"C{r['seed']}", linestyle="-" if r["labels"] == "language" else "--",
                     label=f"{r['labels']}, seed {r['seed']}")
        steps = [row["step"] for row in r["per_step"]]
        gain_ax.plot(steps, [row["gain"] for row in r["per_step"]], **style)
        loss_ax.plot(steps, [row["loss"] for row in r["per_step"]], **style)
    gain_ax.set(xlabel="optimizer step", ylabel="AdamScale gain r (S = 8)", xscale="log")
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", xscale="log")
    loss_ax.legend(fontsize=7)
    scaling.save_figure(fig, path, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/adamscale_text")
    parser.add_argument("--sentences", type=int, default=8000)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--base-batch", type=int, default=8)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="budget in base-batch steps / S (AdaScale may stop "
                                                                "earlier)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--theta", type=float, default=None, help="AdaScale's smoothing (default: 1 - S/1000)")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in opts.seeds:  # each seed: its own sample of sentences, vocabulary, initial weights and labels
        for labels in ("language", "random"):
            runs.append({"seed": seed, **run(labels, argparse.Namespace(**{**vars(opts), "seed": seed}))})
    results = {"machine": f"{platform.machine()}, 1 torch thread", "options": vars(opts), "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"S = {opts.scale}, B0 = {opts.base_batch}, {opts.sentences} sentences; mean gain per window of steps "
             "(mean training loss; share of the step's ||g_bar / P||^2 in the word embeddings)", "",
             "| seed | labels | vocabulary (words seen once) | steps | windows |", "|---:|---|---:|---:|---|"]
    for r in runs:
        cells = "; ".join(f"{w}: **{v['gain']:.2f}** ({v['loss']:.3f}, {v['embedding_share']:.2f})"
                          for w, v in r["windows"].items())
        lines.append(f"| {r['seed']} | {r['labels']} | {r['vocab_size']} ({r['rows_seen_once']}) | {r['steps']} | "
                     f"{cells} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(runs, out / "gain.png", f"AdamScale on Multi30k captions ({opts.out})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

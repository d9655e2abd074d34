"""Per-step time and peak memory of a variant against plain ``LargeBatchTrainer`` at the same batch.

Each (repeat, variant) pair runs in a fresh child process, interleaved (A B A B ...), so that order effects and
allocator state do not favour one side; the child times every optimizer step (``on_step_begin`` to
``on_step_end``) after a warm-up and reports the median; the parent reads the child's peak RSS from ``wait4``
(and, on CUDA, the child's ``max_memory_allocated``). Reported: the median over repeats of each variant's median
step time, and the ratio variant / baseline, with the spread of per-repeat ratios.

``--same-process`` times every variant in each child instead, in mirrored order (A B B A), each run on a fresh model
and trainer: on a shared machine a process's own speed varies by up to 20% (same variant, same core), which this
cancels in the per-repeat ratio; peak memory then comes from the default mode only.

    python benchmarks/overhead.py --variants plain hf_trainer noise_monitor adascale --steps 60 --repeats 5
    python benchmarks/overhead.py --variants plain sequential_adv conadv --out benchmarks/results/overhead_adv
    python benchmarks/overhead.py --variants plain extrap_fresh extrap_past --out benchmarks/results/overhead_extrap
    python benchmarks/overhead.py --variants plain adascale noise_monitor --data fashion_mnist --batch 512 \
        --same-process --steps 40 --warmup 5 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _variants():
    """name -> (trainer class, args class, callbacks factory, extra arguments). New algorithms register here."""
    from transformers import Trainer, TrainingArguments

    from hf_largebatch import LargeBatchArguments, LargeBatchTrainer, LRHistory, NoiseScaleMonitor

    return {
        "hf_trainer": (Trainer, TrainingArguments, lambda batch: [], {}),
        "plain": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [], {}),
        "lr_history": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [LRHistory(batch)], {}),
        "noise_monitor": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [NoiseScaleMonitor()], {}),
        "adascale": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [],
                     {"lr_scaling": "adascale", "base_batch_size_divisor": 8}),
        # adversarial training: the same one-step attack on stale (ConAdv) or current weights
        "conadv": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [],
                   {"adversarial": "conadv", "adversarial_args": "epsilon=0.05"}),
        "sequential_adv": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [],
                           {"adversarial": "sequential", "adversarial_args": "epsilon=0.05"}),
        # ConAdv's attacks in line (as sequential training runs them), and sequential with every core's intra-op
        # threads: conadv's worker thread adds a thread of its own, so this is the same cores used the other way
        "conadv_in_line": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [],
                           {"adversarial": "conadv", "adversarial_args": "epsilon=0.05,concurrent=False"}),
        "sequential_adv_all_cores": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [],
                                     {"adversarial": "sequential", "adversarial_args": "epsilon=0.05",
                                      "torch_threads": os.cpu_count()}),
        # EXTRAP-SGD: a local forward/backward a step (fresh) or none (past)
        "extrap_fresh": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [], {"extrapolation": "fresh"}),
        "extrap_past": (LargeBatchTrainer, LargeBatchArguments, lambda batch: [], {"extrapolation": "past"}),
    }


DATA = ("digits", "fashion_mnist")
VARIANTS = ("hf_trainer", "plain", "lr_history", "noise_monitor", "adascale", "conadv", "sequential_adv",
            "conadv_in_line", "sequential_adv_all_cores", "extrap_fresh", "extrap_past")


def _training_data(data: str):
    """``digits``: sklearn's 8x8 digits (a ~10 ms CPU step: the fixed per-parameter cost at its largest);
    ``fashion_mnist``: the image task of ``benchmarks/scaling.py`` (28x28, its 10,000-image subset and random
    crops). Both feed the same model, the image task's ``tiny`` ResNet (``demo.small_resnet``)."""
    if data == "digits":
        from hf_largebatch.demo import digits_splits

        return digits_splits()[0]
    from hf_largebatch.data.images import ImageClassificationDataset, load_image_splits

    splits = load_image_splits(data)
    return ImageClassificationDataset(splits.train.subset(10000), splits.mean, splits.std, splits.augmentation)


def _timed_run(variant: str, train, batch: int, grad_accum: int, steps: int, warmup: int) -> dict:
    """Train a fresh model with ``variant`` for ``steps`` optimizer steps; the median time of the steps after
    ``warmup``."""
    from transformers import TrainerCallback

    from hf_largebatch.demo import small_resnet

    trainer_cls, args_cls, callbacks, extra = _variants()[variant]
    extra = dict(extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(extra.pop("torch_threads", threads))  # this variant's intra-op threads, then back
    if "base_batch_size_divisor" in extra:  # AdaScale at S = 8; max_steps then counts base steps, so stretch it
        extra["base_batch_size"] = batch * grad_accum // extra.pop("base_batch_size_divisor")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if len(times) >= steps:  # AdaScale would go on until its progress reaches the base budget
                control.should_training_stop = True

    args = args_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                    gradient_accumulation_steps=grad_accum, max_steps=steps * (8 if "base_batch_size" in extra else 1),
                    learning_rate=0.05, optim="sgd", report_to=[], save_strategy="no", logging_steps=10,
                    disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True,
                    **extra)
    trainer = trainer_cls(model=small_resnet(), args=args, train_dataset=train,
                          callbacks=[StepTimer(), *callbacks(batch)])
    trainer.train()
    torch.set_num_threads(threads)
    times = times[warmup:steps]
    result = {"variant": variant, "median_step_s": statistics.median(times), "steps_timed": len(times)}
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _child(sequence: list[str], batch: int, grad_accum: int, steps: int, warmup: int, data: str) -> list[dict]:
    train = _training_data(data)
    return [_timed_run(variant, train, batch, grad_accum, steps, warmup) for variant in sequence]


def _run_child(sequence: list[str], opts) -> tuple[list[dict], int]:
    """The runs of ``sequence`` in one fresh process, and that process's peak RSS in bytes."""
    cmd = [sys.executable, __file__, "--child", ",".join(sequence), "--batch", str(opts.batch), "--grad-accum",
           str(opts.grad_accum), "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--data", opts.data]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return json.loads(text.strip().splitlines()[-1]), usage.ru_maxrss * 1024  # Linux reports KiB


def _repeat_separate(opts) -> dict[str, dict]:
    """One process per variant (interleaved A B A B over repeats): step time and peak RSS per process."""
    results = {}
    for variant in opts.variants:
        (run,), rss = _run_child([variant], opts)
        results[variant] = {**run, "peak_rss_bytes": rss}
    return results


def _repeat_same_process(opts) -> dict[str, dict]:
    """All variants in one process, in mirrored order (A B B A): the process's own speed, which varies by up to
    20% between processes on a shared machine, cancels in the ratio. Each variant's step time is the mean of its
    two runs; peak RSS cannot be told apart, so it is not reported."""
    runs, _ = _run_child(opts.variants + opts.variants[::-1], opts)
    results = {}
    for variant in opts.variants:
        own = [r for r in runs if r["variant"] == variant]
        results[variant] = {"variant": variant, "median_step_s": statistics.fmean(r["median_step_s"] for r in own),
                            "steps_timed": sum(r["steps_timed"] for r in own)}
    return results


def measure(opts) -> dict:
    repeat = _repeat_same_process if opts.same_process else _repeat_separate
    runs = {v: [] for v in opts.variants}
    for _ in range(opts.repeats):
        for variant, result in repeat(opts).items():
            runs[variant].append(result)
    base = opts.variants[0]
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores"
               + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only"),
               "data": opts.data, "batch": opts.batch, "grad_accum": opts.grad_accum, "steps": opts.steps,
               "warmup": opts.warmup, "repeats": opts.repeats, "same_process": opts.same_process,
               "baseline": base, "variants": {}}
    for variant, results in runs.items():
        ratios = [r["median_step_s"] / b["median_step_s"] for r, b in zip(results, runs[base])]
        entry = {"median_step_s": statistics.median(r["median_step_s"] for r in results),
                 "step_time_ratio": statistics.median(ratios),
                 "step_time_ratio_min_max": [min(ratios), max(ratios)]}
        if not opts.same_process:
            entry["peak_rss_mib"] = statistics.median(r["peak_rss_bytes"] for r in results) / 2**20
            entry["peak_rss_ratio"] = statistics.median(r["peak_rss_bytes"] / b["peak_rss_bytes"]
                                                        for r, b in zip(results, runs[base]))
        summary["variants"][variant] = {**entry, "runs": results}
    return summary


def to_markdown(summary: dict) -> str:
    where = "all variants in each process (A B B A)" if summary["same_process"] else "one process per variant"
    lines = [f"Baseline `{summary['baseline']}`, data `{summary['data']}`, {summary['grad_accum']} micro-batches of "
             f"{summary['batch']} a step, {summary['steps']} steps ({summary['warmup']} untimed), "
             f"{summary['repeats']} interleaved repeats, {where}; {summary['machine']}.", "",
             "| variant | median step (ms) | step-time ratio (median) | ratio min-max | peak RSS (MiB) | RSS ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, v in summary["variants"].items():
        lo, hi = v["step_time_ratio_min_max"]
        memory = (f"{v['peak_rss_mib']:.0f} | {v['peak_rss_ratio']:.3f}" if "peak_rss_mib" in v
                  else "- | -")
        lines.append(f"| {name} | {1000 * v['median_step_s']:.2f} | {v['step_time_ratio']:.3f} | {lo:.3f}-{hi:.3f} "
                     f"| {memory} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["plain", "lr_history"],
                   help=f"first one is the baseline; choices: {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=128, help="per-device micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (AdaScale needs >= 2)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", default="digits", choices=DATA,
                   help="digits: 8x8 images, a ~10 ms CPU step; fashion_mnist: the image task (28x28)")
    p.add_argument("--out", default="benchmarks/results/overhead")
    p.add_argument("--quick", action="store_true", help="CI smoke test: 2 repeats of 12 steps")
    p.add_argument("--same-process", action="store_true",
                   help="time all variants in each process (A B B A); no peak RSS. Steadier ratios on a shared machine")
    p.add_argument("--child", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        print(json.dumps(_child(opts.child.split(","), opts.batch, opts.grad_accum, opts.steps, opts.warmup,
                                opts.data)))
        return 0
    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if opts.quick:
        opts.steps, opts.warmup, opts.repeats, opts.batch = 12, 2, 2, 64
    summary = measure(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(summary, indent=1))
    table = to_markdown(summary)
    (out / "overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

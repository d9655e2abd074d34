"""Batch-size scaling benchmark: one task at a base batch and at multiples of it, with chosen LR methods, on the
same epoch budget. Each run is a recipe process (``recipes/*.py``); runs are interleaved over repeats.

Writes ``results.json`` (every run's summary), ``table.md`` (final metric, optimizer steps, examples seen, wall
time) and PNG plots (metric vs steps and vs examples; applied LR vs steps) to ``--out``.

    python benchmarks/scaling.py --task image --multiples 1 8 16 --methods linear sqrt legw
    python benchmarks/scaling.py --task image --quick        # CI smoke test

Warm-up, as the methods define it: the base run warms up for ``--warmup-epochs`` (w0); ``linear`` and ``sqrt`` keep
that warm-up in epochs (Goyal et al.'s recipe); ``legw`` stretches it to ``S * w0`` epochs; ``adascale`` keeps the
base run's warm-up in *progress* (base-batch steps) and runs 2 micro-batches per step (it measures the gradient
variance across them), stopping when its progress reaches the base run's step budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("linear", "sqrt", "legw", "adascale", "autowu_lamb", "autowu_lars")

# Per task: the recipe, its fixed arguments, the base batch, LR and epochs tuned for the base run, the metric.
TASKS = {
    "image": {
        "recipe": "recipes/image_classification.py",
        "args": ["--dataset", "fashion_mnist", "--preset", "tiny", "--max_train_samples", "10000",
                 "--max_eval_samples", "2000", "--optim", "sgd", "--optim_args", "momentum=0.9",
                 "--weight_decay", "5e-4", "--lr_scheduler_type", "cosine"],
        "base_batch": 64, "learning_rate": 0.05, "epochs": 4, "warmup_epochs": 0.25,
        "metric": "eval_accuracy", "higher_is_better": True,
        "quick": ["--max_train_samples", "512", "--max_eval_samples", "256"],
        # AutoWU searches [min_lr, learning_rate]: the top of each optimizer's range, and a vote every 5 steps
        # (a 32x run of the full 60k training set has 29 optimizer steps per epoch)
        "autowu": {"lamb": ["--learning_rate", "1.0", "--optim_args", ""],
                   "lars": ["--learning_rate", "20.0", "--optim_args", "momentum=0.9"],
                   "autowu_args": "vote_every=5"},
    },
    "cifar10": {
        # He et al.'s ResNet-20 on the full CIFAR-10 (JPEG q~75 copy), standard augmentation (4-pixel pad + crop,
        # flip), SGD momentum 0.9, weight decay 5e-4, cosine decay; evaluated on the full 10,000-image test set
        "recipe": "recipes/image_classification.py",
        "args": ["--dataset", "cifar10", "--preset", "resnet20", "--optim", "sgd", "--optim_args", "momentum=0.9",
                 "--weight_decay", "5e-4", "--lr_scheduler_type", "cosine", "--per_device_eval_batch_size", "500"],
        # 30 epochs reached 86.98% with a training loss still at 0.22 (under-trained): 100 is the budget now
        "base_batch": 128, "learning_rate": 0.1, "epochs": 100, "warmup_epochs": 1.0,
        # S x 128 examples a step as S data-parallel workers of the base batch: batch norm's statistics over 128
        # examples at every scale (the base run's; as Goyal et al.'s per-worker batch norm), AdaScale's gain from S
        # gradients; on one CPU core also far cheaper an epoch than one micro-batch of 4096 (BENCHMARKS.md)
        "micro_batch": 128,
        "logging_steps": 50,
        "metric": "eval_accuracy", "higher_is_better": True,
        "quick": ["--max_train_samples", "512", "--max_eval_samples", "256"],
        # as the image task's: AutoWU searches up to LAMB's LR 1.0 (its trust ratio scales each layer's step to
        # the layer's norm), a vote every 5 steps (a 32x run has 12 optimizer steps per epoch)
        "autowu": {"lamb": ["--learning_rate", "1.0", "--optim_args", ""],
                   "lars": ["--learning_rate", "20.0", "--optim_args", "momentum=0.9"],
                   "autowu_args": "vote_every=5"},
    },
    "lstm": {
        # the first LSTM table's task (BENCHMARKS.md): the tiny LSTM on a PTB subset, stateless 35-token chunks
        "recipe": "recipes/language_modeling_lstm.py",
        # Zaremba's SGD lr 1 / clip 5 on the summed-over-time loss == lr 35 / clip 5/35 on the token mean
        "args": ["--dataset", "ptb", "--preset", "tiny", "--stateful", "False", "--max_train_samples", "4000",
                 "--max_eval_samples", "1000", "--optim", "sgd", "--max_grad_norm", "0.142857",
                 "--lr_scheduler_type", "cosine"],
        "base_batch": 20, "learning_rate": 35.0, "epochs": 2, "warmup_epochs": 0.1,
        "metric": "eval_perplexity", "higher_is_better": False,
        "quick": ["--max_train_samples", "400", "--max_eval_samples", "100"],
    },
    "ptb": {
        # Zaremba's small LSTM on PTB, stateful (truncated BPTT over B streams), his schedule: SGD lr 1 / clip 5 on
        # the loss summed over 20 time steps == lr 20 / clip 0.25 on the token mean, x0.5 per epoch after epoch 4
        "recipe": "recipes/language_modeling_lstm.py",
        "args": ["--dataset", "ptb", "--preset", "zaremba_small", "--seq_len", "20", "--optim", "sgd",
                 "--max_grad_norm", "0.25", "--lr_scheduler_type", "constant", "--per_device_eval_batch_size", "20"],
        "base_batch": 20, "learning_rate": 20.0, "epochs": 13, "warmup_epochs": 0.0,
        "decay_epochs": list(range(4, 13)), "decay_factor": 0.5,
        # LEGW's base warm-up w0 (Zaremba's base run has none): S * w0 epochs at S
        "legw_warmup_epochs": 0.05,
        "logging_steps": 50,
        "metric": "eval_perplexity", "higher_is_better": False,
        "quick": ["--max_train_samples", "400", "--max_eval_samples", "200"],
    },
    "multi30k": {
        # the full Multi30k (29,000 pairs), the small Transformer (d_model 256, 3+3 layers), label smoothing 0.1,
        # Adam with inverse-sqrt decay after one epoch of warm-up, greedy decoding; BLEU on val each epoch and on
        # test2016 at the end (sacrebleu)
        "recipe": "recipes/translation.py",
        "args": ["--preset", "small", "--optim", "adamw_torch", "--weight_decay", "0.0", "--label_smoothing_factor",
                 "0.1", "--lr_scheduler_type", "inverse_sqrt", "--generation_num_beams", "1", "--do_predict"],
        "base_batch": 128, "learning_rate": 1e-3, "epochs": 10, "warmup_epochs": 1.0,
        "logging_steps": 50,
        "metric": "eval_bleu", "higher_is_better": True, "extra_metrics": ["test_bleu"],
        "quick": ["--max_train_samples", "256", "--max_eval_samples", "32", "--max_predict_samples", "32"],
    },
    "translation": {
        "recipe": "recipes/translation.py",
        "args": ["--preset", "tiny", "--max_train_samples", "6000", "--max_eval_samples", "200",
                 "--optim", "adamw_torch", "--lr_scheduler_type", "linear", "--generation_num_beams", "1"],
        # base run (B0 = 32, 3 epochs): lr 1e-3 gives BLEU 1.59, lr 5e-4 gives 0.31 (the tiny Marian learns slowly)
        "base_batch": 32, "learning_rate": 1e-3, "epochs": 3, "warmup_epochs": 0.1,
        "metric": "eval_bleu", "higher_is_better": True,
        "quick": ["--max_train_samples", "256", "--max_eval_samples", "32"],
    },
}


# Johnson et al.'s AdaScale CIFAR-10 model (ResNet-18, CIFAR stem) on the cifar10 task's recipe, for 30 epochs: the
# budget in which ResNet-20 fell short of 90% (86.98%); whether this one passes is still to measure (BENCHMARKS.md)
TASKS["cifar10_resnet18"] = {**TASKS["cifar10"], "epochs": 30, "args": [
    "cifar_resnet18" if arg == "resnet20" else arg for arg in TASKS["cifar10"]["args"]]}


def run_configs(multiples, methods):
    """(label, multiple, method): the base run first, then each multiple with each method."""
    configs = [("base", 1, "base")] if 1 in multiples else []
    configs += [(f"{m}x {method}", m, method) for m in multiples if m != 1 for method in methods]
    return configs


def recipe_command(task: dict, multiple: int, method: str, epochs: float, out_dir: Path, extra: list[str],
                   quick: bool, device: str = "cpu") -> list[str]:
    base = task["base_batch"]
    w0 = task["warmup_epochs"]
    micro = task.get("micro_batch")  # examples per micro-batch at every scale above it, where the task fixes it
    if micro and base * multiple > micro and base * multiple % micro:
        raise SystemExit(f"--micro_batch {micro} does not divide the global batch {base * multiple} of the "
                         f"{multiple}x runs: give a divisor of it")
    micro_batches = max(base * multiple // micro, 1) if micro else 1
    if method == "adascale":  # its gain needs two gradients of the step at least
        micro_batches = max(micro_batches, 2)
    epochs_text = f"{epochs:g}" if float(epochs).is_integer() else str(epochs)  # --epochs 30 runs the task's 30
    cmd = [sys.executable, task["recipe"], *task["args"], "--output_dir", str(out_dir),
           "--per_device_train_batch_size", str(base * multiple // micro_batches),
           "--gradient_accumulation_steps", str(micro_batches), "--num_train_epochs", epochs_text,
           "--learning_rate", str(task["learning_rate"]), "--base_batch_size", str(base),
           "--eval_strategy", "epoch", "--logging_steps", str(task.get("logging_steps", 1)),
           # every run checkpoints each epoch (only the newest kept): a killed benchmark resumes it there
           "--save_strategy", "epoch", "--save_total_limit", "1", "--report_to", "none",
           "--seed", "0", "--disable_tqdm", "true"] + (["--use_cpu"] if device == "cpu" else [])
    if task.get("decay_epochs"):  # the task's step decay, at the same fractions of a shorter or longer budget
        cmd += ["--lr_decay_epochs", *(f"{e * epochs / task['epochs']:g}" for e in task["decay_epochs"]),
                "--lr_decay_factor", str(task["decay_factor"])]
    if method == "legw":
        cmd += ["--lr_scaling", "legw", "--legw_base_warmup_epochs", str(task.get("legw_warmup_epochs", w0))]
    elif method.startswith("autowu_"):  # AutoWU finds its own LR: no scaling rule, no warm-up setting
        optimizer = method.removeprefix("autowu_")
        if "autowu" not in task:
            raise ValueError(f"task has no AutoWU settings for method {method!r}")
        cmd += ["--lr_scaling", "none", "--lr_schedule", "autowu", "--autowu_args", task["autowu"]["autowu_args"],
                "--optim", optimizer, *task["autowu"][optimizer]]
    else:  # base, linear, sqrt, adascale: the base run's warm-up, in epochs, as a fraction of the run (of the
        # base run's budget for adascale, whose schedule runs on progress)
        cmd += ["--lr_scaling", "none" if method == "base" else method, "--warmup_steps", str(min(w0 / epochs, 0.5))]
    if quick:
        cmd += task["quick"]
    return cmd + extra


def with_micro_batch(task: dict, micro_batch: int | None) -> dict:
    """The task with every step above ``micro_batch`` examples split into micro-batches of that size: what fits a
    machine's memory. The LR rules' updates do not depend on the split (the library's split-invariant loss), but
    batch norm's statistics do: a CIFAR-10 grid compares runs only at its task's own 128 (the base batch)."""
    return task if micro_batch is None else {**task, "micro_batch": micro_batch}


def same_run(a: list[str], b: list[str]) -> bool:
    """Two recipe commands train the same run: the same script and arguments (the interpreter's path is not part
    of the run: a GPU machine's Python is elsewhere, and a table is built where the runs' folders are copied)."""
    return a[1:] == b[1:]


def run_one(cmd: list[str], log_path: Path, threads: int | None = None, heartbeat=None) -> float:
    """Run a recipe process to its end, its output to ``log_path`` (appended); its wall time. ``heartbeat(wall)``
    is called every ``HEARTBEAT_S`` while it runs. A failed run raises with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while True:
            try:
                proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                if heartbeat is not None:
                    heartbeat(time.perf_counter() - start)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return wall


HEARTBEAT_S = 30.0


def run_each(work, items: list, jobs: int) -> list:
    """``work(item)`` for every item, ``jobs`` at once, the results in order. A failed run stops none of the others
    (their hours are not lost to it); the failures are raised together once all have ended."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, item) for item in items]
    failures = [future.exception() for future in futures if future.exception() is not None]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(items)} runs failed:\n" + "\n".join(map(str, failures)))
    return [future.result() for future in futures]


class Sittings:
    """The wall time a run took over the sittings it needed (a killed benchmark resumes it from its checkpoint):
    ``sittings.json`` in its folder holds one entry per sitting, written when it starts and rewritten every
    ``HEARTBEAT_S`` while it runs, so a kill loses at most that much of the record. The total includes the work a
    resume repeats (the machine spent it)."""

    def __init__(self, run_dir: Path, machine: str = ""):
        self.path = run_dir / "sittings.json"
        self.machine = machine
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else []

    def run(self, cmd: list[str], log_path: Path, threads: int | None) -> None:
        self._record(0.0, finished=False)
        wall = run_one(cmd, log_path, threads, heartbeat=lambda wall: self._record(wall, finished=False))
        self._record(wall, finished=True)

    def _record(self, wall: float, finished: bool) -> None:
        entry = {"wall_s": wall, "finished": finished, "machine": self.machine}
        self.path.write_text(json.dumps([*self.done, entry], indent=1))

    @property
    def total_s(self) -> float:
        return sum(entry["wall_s"] for entry in json.loads(self.path.read_text()))

    @property
    def machines(self) -> list[str]:
        """The machines the run's sittings ran on, each once."""
        return sorted({entry["machine"] for entry in json.loads(self.path.read_text())})


def machine_name(device: str = "cpu") -> str:
    """The CPU model the runs train on, and the GPU where they train on one."""
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} (host CPU: {machine_name()})"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return model or platform.processor() or platform.machine()


def sitting_machine(device: str, threads: int | None, jobs: int) -> str:
    """What a sitting records of where it ran: the machine and the setting its wall time depends on."""
    return (f"{machine_name(device)}, {os.cpu_count()} CPU cores, torch threads per run "
            f"{threads or os.environ.get('OMP_NUM_THREADS', 'default')}"
            + (f", {jobs} runs at once" if jobs > 1 else ""))


def machines_line(machines: Iterable[str]) -> str:
    """Each machine of a table's runs once, with the setting its sittings recorded; a sitting recorded with the bare
    CPU name (before sittings named their setting) folds into the same CPU's entry that has one."""
    names = set(machines)
    return "; ".join(sorted(m for m in names if not any(o.startswith(f"{m}, ") for o in names)))


def run_resumably(run_dir: Path, cmd: list[str], label: str, threads: int | None, fresh: bool,
                  machine: str) -> float:
    """Run ``cmd`` in ``run_dir`` to its end: skipped if it finished, continued from its newest complete checkpoint
    if it started (``refuse_other_commands_runs`` has checked the folder first); its wall time over all sittings,
    each recorded with ``machine``."""
    started = run_dir / "command.json"
    if fresh or (started.is_file() and not same_run(json.loads(started.read_text()), cmd)):
        shutil.rmtree(run_dir, ignore_errors=True)  # --fresh, or another command's run that had not begun
    run_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(cmd))
    sittings = Sittings(run_dir, machine)
    if not finished(run_dir):
        resume = resume_flags(run_dir)
        print(f"[{label}] {' '.join(cmd + resume)}", flush=True)
        sittings.run(cmd + resume, run_dir / "log.txt", threads)
    return sittings.total_s


def finished(run_dir: Path) -> bool:
    """The run in ``run_dir`` ended: its summary is written and its last sitting ended."""
    sittings = Sittings(run_dir).done
    return bool(sittings) and sittings[-1]["finished"] and (run_dir / "summary.json").is_file()


def refuse_other_commands_runs(runs: list[tuple[Path, list[str]]]) -> None:
    """A run folder that holds another command's work (a checkpoint or a finished run) stops the benchmark before
    anything runs: resuming it with this command would mix two runs, and replacing it would lose hours."""
    for run_dir, cmd in runs:
        started = run_dir / "command.json"
        if not started.is_file() or same_run(json.loads(started.read_text()), cmd):
            continue
        if (run_dir / "summary.json").is_file() or any(run_dir.glob("checkpoint-*")):
            old, new = flag_values(json.loads(started.read_text())), flag_values(cmd)
            changed = "; ".join(f"{flag} {' '.join(old.get(flag, ['(absent)']))} -> "
                                f"{' '.join(new.get(flag, ['(absent)']))}"
                                for flag in sorted(old.keys() | new.keys()) if old.get(flag) != new.get(flag))
            changed = changed or "the same arguments in another order"
            raise SystemExit(f"{run_dir} holds a run of another command ({changed}); rerun with that run's command "
                             "to continue it, pass another --out for this one, or --fresh to discard the runs in "
                             "--out and start them again")


def flag_values(cmd: list[str]) -> dict[str, list[str]]:
    """A recipe command's ``--flag value...`` arguments by flag (the interpreter and script under '')."""
    values, flag = {"": []}, ""
    for token in cmd:
        if token.startswith("--"):
            flag = token
            values.setdefault(flag, [])
        else:
            values[flag].append(token)
    return values


def resume_flags(run_dir: Path) -> list[str]:
    """``--resume_from_checkpoint`` at the run's newest complete checkpoint, if it has one."""
    from hf_largebatch.core.checkpoints import newest_complete_checkpoint

    folder, _ = newest_complete_checkpoint(str(run_dir))
    return [] if folder is None else ["--resume_from_checkpoint", folder]


def added_rows(paths: list[str], task: str, epochs: float, labels: set[str]) -> list[dict]:
    """The rows of earlier ``results.json`` files that this table lacks, each with the machine it ran on; a file of
    another task or epoch budget is refused (its runs would not be comparable)."""
    rows = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        if results["task"] != task or results["epochs"] != epochs:
            raise SystemExit(f"{path} holds {results['task']} runs of {results['epochs']:g} epochs, not {task} of "
                             f"{epochs:g}: its rows would not be comparable")
        rows += [{"machines": [results["machine"]], **row} for row in results["runs"]
                 if row["run"] not in labels | {r["run"] for r in rows}]
    return rows


def summarise(label, multiple, method, summary: dict, wall: float, metric: str, repeat: int,
              extra_metrics: tuple[str, ...] = ()) -> dict:
    evals = [h for h in summary["log_history"] if metric in h]
    return {
        "run": label, "multiple": multiple, "method": method, "repeat": repeat,
        "global_batch": summary["global_batch_size"], "scale": summary["scale"],
        "metric": summary["metrics"][metric], "optimizer_steps": summary["optimizer_steps"],
        "extra_metrics": {name: summary["metrics"].get(name) for name in extra_metrics},
        "examples_seen": summary["examples_seen"], "wall_s": wall,
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),  # what a GPU sitting must fit (None off CUDA)
        "eval_curve": [(h["step"], h[metric]) for h in evals],
        # examples read at each evaluation, as the trainer counted them (entries logged before it did: steps x batch)
        "eval_examples": [h.get("examples_seen", h["step"] * summary["global_batch_size"]) for h in evals],
        "lr_curve": [(h["step"], h["learning_rate"]) for h in summary["log_history"] if "learning_rate" in h],
        "loss_curve": [(h["step"], h["loss"]) for h in summary["log_history"] if "loss" in h],
        # AutoWU's record, per logging step: (step, phase, votes so far, last vote's probability), and its cost
        "autowu_curve": [(h["step"], h["autowu_phase"], h["autowu_votes"], h.get("autowu_vote_probability", 0.0))
                         for h in summary["log_history"] if "autowu_phase" in h],
        "autowu_switch_step": next((h["autowu_switch_step"] for h in reversed(summary["log_history"])
                                    if "autowu_switch_step" in h), None),
        # the LR it switched to (logs from before it was logged: the switching vote's, the last vote's prediction)
        "autowu_switch_lr": next((h.get("autowu_switch_lr", h["autowu_predicted_lr"])
                                  for h in reversed(summary["log_history"]) if "autowu_switch_step" in h), None),
        "autowu_gp_seconds": next((h["autowu_gp_seconds"] for h in reversed(summary["log_history"])
                                   if "autowu_gp_seconds" in h), None),
        # AdaScale's own record, per logging step: (progress, gain, applied LR)
        "adascale_curve": [(h["progress"], h["adascale_gain"], h["learning_rate"]) for h in summary["log_history"]
                           if "adascale_gain" in h],
    }


def to_markdown(rows: list[dict], task: dict, machine: str) -> str:
    metric = task["metric"]
    base_steps = next((r["optimizer_steps"] for r in rows if r["method"] == "base"), None)
    extra = task.get("extra_metrics", [])
    lines = [f"Metric `{metric}` ({'higher' if task['higher_is_better'] else 'lower'} is better); {machine}.", "",
             f"| run | global batch | {metric} | {''.join(f'{m} | ' for m in extra)}optimizer steps | step speed-up | "
             "examples seen | wall time (s) |",
             "|---|---:|---:|" + "---:|" * len(extra) + "---:|---:|---:|---:|"]
    for r in rows:
        speedup = f"{base_steps / r['optimizer_steps']:.1f}x" if base_steps else "-"
        values = "".join(f"{r['extra_metrics'][m]:.4g} | " if r["extra_metrics"].get(m) is not None else "- | "
                         for m in extra)
        lines.append(f"| {r['run']} | {r['global_batch']} | {r['metric']:.4g} | {values}{r['optimizer_steps']} | "
                     f"{speedup} | {r['examples_seen']} | {r['wall_s']:.0f} |")
    for r in rows:
        if r["method"] == "adascale" and base_steps:
            # Johnson et al.'s step efficiency: the ideal T_base / S steps over the steps AdaScale took (the paper
            # reports 73% at S = 16 for ResNet-18 on CIFAR-10)
            ideal = base_steps / r["scale"]
            lines.append(f"\nAdaScale {r['run']}: {r['optimizer_steps']} steps against the ideal T_base / S = "
                         f"{ideal:.0f}: step efficiency {100 * ideal / r['optimizer_steps']:.0f}%.")
    for r in rows:
        if r.get("autowu_curve"):
            # over the run's wall time in all its sittings (HF's train_runtime is the last sitting's alone)
            share = r["autowu_gp_seconds"] / r["wall_s"] if r["wall_s"] else float("nan")
            lines.append(f"\nAutoWU {r['run']}: switch at step {r['autowu_switch_step']:.0f} of {r['optimizer_steps']} "
                         f"(LR {r['autowu_switch_lr']:.4g}); GP time {r['autowu_gp_seconds']:.2f} s = "
                         f"{100 * share:.2f}% of the run's wall time ({r['wall_s']:.0f} s).")
    return "\n".join(lines)


def save_figure(fig, path: Path, title: str) -> Path:
    """Title, lay out, write (PNG, 110 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: list[dict], task: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for r in rows:
        steps = [s for s, _ in r["eval_curve"]]
        values = [v for _, v in r["eval_curve"]]
        axes[0].plot(steps, values, marker="o", label=r["run"])
        examples = r.get("eval_examples") or [s * r["global_batch"] for s in steps]  # results.json before the count
        axes[1].plot(examples, values, marker="o", label=r["run"])
        axes[2].plot([s for s, _ in r["lr_curve"]], [v for _, v in r["lr_curve"]], label=r["run"])
    for ax, xlabel, ylabel in ((axes[0], "optimizer steps", metric), (axes[1], "examples seen", metric),
                               (axes[2], "optimizer steps", "learning rate (applied)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("linear")
    if "perplexity" in metric:  # a diverging run's perplexity is orders of magnitude above the others'
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    paths = [save_figure(fig, out / "scaling.png", title)]
    adascale = [r for r in rows if r.get("adascale_curve")]
    if adascale:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for r in adascale:
            progress, gain, lr = zip(*r["adascale_curve"])
            axes[0].plot(progress, gain, label=f"{r['run']} (S={r['scale']:g})")
            axes[1].plot(progress, lr, label=r["run"])
        base = next((r for r in rows if r["method"] == "base"), None)
        if base:  # the base run's progress is its step count
            axes[1].plot([s for s, _ in base["lr_curve"]], [v for _, v in base["lr_curve"]], "k--", label="base")
        for ax, ylabel in ((axes[0], "gain r"), (axes[1], "learning rate (applied)")):
            ax.set_xlabel("progress (base-batch steps)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / "adascale.png", f"{title}: AdaScale gain and LR vs progress"))
    autowu = [r for r in rows if r.get("autowu_curve")]
    if autowu:
        paths.append(plot_autowu(autowu, out / "autowu.png", title))
    return paths


def plot_autowu(rows: list[dict], path: Path, title: str) -> Path:
    """Per AutoWU run: applied LR and training loss (raw and EMA-smoothed) vs steps, each vote marked (filled: yes
    at the 0.95 level, hollow: no) and the switch step as a vertical line."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(6.5 * len(rows), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        steps, losses = zip(*r["loss_curve"])
        smooth, ema = [], None
        for value in losses:
            ema = value if ema is None else 0.8 * ema + 0.2 * value
            smooth.append(ema)
        ax.plot(steps, losses, color="0.75", lw=0.8, label="loss")
        ax.plot(steps, smooth, color="C0", label="loss (EMA 0.8)")
        by_step = dict(zip(steps, smooth))
        previous = 0
        for step, _, votes, probability in r["autowu_curve"]:
            if votes > previous:
                ax.plot(step, by_step.get(step, smooth[-1]), "o", color="C3",
                        fillstyle="full" if probability > 0.95 else "none")
            previous = votes
        if r["autowu_switch_step"] is not None:
            ax.axvline(r["autowu_switch_step"], color="C3", ls="--", label="switch")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("training loss")
        lr_ax = ax.twinx()
        lr_ax.plot([s for s, _ in r["lr_curve"]], [v for _, v in r["lr_curve"]], color="C2", label="LR")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate (applied)")
        ax.set_title(r["run"])
        ax.legend(fontsize=8, loc="upper right")
    return save_figure(fig, path, f"{title}: AutoWU votes (filled = yes) and switch")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--methods", nargs="+", default=["linear", "sqrt", "legw"], choices=METHODS)
    p.add_argument("--epochs", type=float, help="epoch budget of every run (default: the task's)")
    p.add_argument("--repeats", type=int, default=1, help="runs are interleaved over repeats")
    p.add_argument("--out", help="output folder (default benchmarks/results/<task>)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke test: a data subset, 1 epoch (unless --epochs), multiples 1 and 2")
    p.add_argument("--runs", nargs="+", help="only these run labels, e.g. base '8x legw' (default: every combination)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every run trains")
    p.add_argument("--micro_batch", type=int,
                   help="examples per micro-batch of every step larger than it (default: the task's; else one "
                        "micro-batch a step): a large batch that does not fit the machine's memory at once")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with --threads torch threads (their wall times then compete)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: 1 with --jobs > 1)")
    p.add_argument("--fresh", action="store_true",
                   help="start every run anew (default: a rerun of the same command skips finished runs and "
                        "resumes unfinished ones from their newest complete checkpoint)")
    p.add_argument("--table_only", action="store_true",
                   help="run nothing: the table and plots of the runs in --out that finished (with this command), "
                        "e.g. copied back from the GPU machine they ran on; the others are named as unfinished")
    p.add_argument("--add_results", nargs="+", default=[], metavar="RESULTS_JSON",
                   help="rows of another sitting's results.json (same task and epochs; e.g. the base run on the CPU "
                        "beside large-batch runs on a GPU) join the table where this command has no run of theirs")
    opts, extra = p.parse_known_args(argv)
    task = with_micro_batch(TASKS[opts.task], opts.micro_batch)
    epochs = opts.epochs or task["epochs"]
    if opts.quick:
        opts.multiples, epochs = [1, 2], opts.epochs or 1
    out = Path(opts.out or REPO / "benchmarks" / "results" / opts.task)
    out.mkdir(parents=True, exist_ok=True)
    threads = opts.threads or (1 if opts.jobs > 1 else None)
    machine = sitting_machine(opts.device, threads, opts.jobs)

    plan = [(label, multiple, method, repeat) for repeat in range(opts.repeats)
            for label, multiple, method in run_configs(opts.multiples, opts.methods)
            if not opts.runs or label in opts.runs]

    def folder_and_command(label, multiple, method, repeat) -> tuple[Path, list[str]]:
        run_dir = out / "runs" / f"{label.replace(' ', '_')}_r{repeat}"
        return run_dir, recipe_command(task, multiple, method, epochs, run_dir, extra, opts.quick, opts.device)

    if not opts.fresh:  # before any run starts: a run of another command is never overwritten unasked
        refuse_other_commands_runs([folder_and_command(*config) for config in plan])

    unfinished = []  # named once the other sittings' rows are known: one of them may stand in for the run

    def execute(label, multiple, method, repeat) -> dict | None:
        run_dir, cmd = folder_and_command(label, multiple, method, repeat)
        if opts.table_only:
            if not finished(run_dir):
                unfinished.append(label)
                return None
            wall = Sittings(run_dir).total_s
        else:
            wall = run_resumably(run_dir, cmd, label, threads, opts.fresh, machine)
        summary = json.loads((run_dir / "summary.json").read_text())
        row = summarise(label, multiple, method, summary, wall, task["metric"], repeat, task.get("extra_metrics", ()))
        row["machines"] = Sittings(run_dir).machines  # where it trained, as its sittings recorded it
        print(f"[{label}] {task['metric']}={row['metric']:.4g} steps={row['optimizer_steps']} wall={wall:.0f}s",
              flush=True)
        return row

    # Several runs at once only where the machine has room for them (a GPU box); their wall times then compete.
    rows = [row for row in run_each(lambda config: execute(*config), plan, opts.jobs) if row is not None]
    added = added_rows(opts.add_results, opts.task, epochs, {row["run"] for row in rows})
    supplied = {row["run"] for row in added}
    for label in unfinished:
        print(f"[{label}] " + ("from --add_results" if label in supplied else "unfinished: not in the table"),
              flush=True)
    rows = added + rows
    if not rows:
        raise SystemExit(f"no run in {out} has finished")
    machines = machines_line(m for row in rows for m in row["machines"])

    (out / "results.json").write_text(json.dumps({"task": opts.task, "epochs": epochs, "machine": machines,
                                                  "command": " ".join(sys.argv), "runs": rows}, indent=1))
    table = to_markdown(rows, task, machines)
    (out / "table.md").write_text(table + "\n")
    plot(rows, task, out, f"{opts.task}: base batch {task['base_batch']}, {epochs:g} epochs")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

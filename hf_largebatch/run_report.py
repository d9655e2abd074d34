"""``hf-largebatch report OUTPUT_DIR``: what a run did, as pictures and a markdown summary.

Everything comes from what a run leaves behind, so it works on a finished run, on one still going (its newest
complete checkpoint) and on runs from before this module: the log history (``trainer_state.json`` of
``trainer.save_state()`` or of a checkpoint, or a recipe's ``summary.json``), the global batch (the recipe summary,
the checkpoint's run record, or ``training_args.bin``) and the start-up summary (``LargeBatchTrainer.run_summary``,
kept in recipe summaries and checkpoints; "not recorded" for older runs). The freshest source wins.

One PNG per family of logged numbers present in the run (loss, LR applied, AdaScale's gain and progress, the noise
scale, the adaptive batch, AutoWU's votes and switch, ConAdv's attack loss, EXTRAP-SGD's distance, local SGD's
synchronisations), each number against optimizer steps, examples seen and (AdaScale) progress. The same numbers go
to TensorBoard with ``report_to="tensorboard"``: ``LargeBatchTrainer.log`` adds them to HF's logs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .core.checkpoints import TRAINER_STATE, newest_complete_checkpoint
from .core.run_summary import summary_lines
from .core.trainer import ALGORITHM_STATE_FILE, RUN_RECORD, SUMMARY_RECORD


@dataclass(frozen=True)
class Family:
    """A picture: ``keys`` logged by one part of the library; drawn when any of them was logged."""

    name: str
    title: str
    keys: tuple[str, ...]


FAMILIES = (
    Family("loss", "Loss", ("loss", "eval_loss")),
    Family("learning_rate", "Learning rate applied", ("learning_rate",)),
    Family("adascale", "AdaScale / AdamScale", ("adascale_gain", "progress")),
    Family("noise_scale", "Gradient statistics", ("noise_scale", "grad_sqr", "grad_var")),
    Family("batch_size", "Adaptive batch size", ("batch_size", "requested_batch")),
    Family("autowu", "AutoWU", ("autowu_vote_probability", "autowu_predicted_lr", "autowu_consecutive_yes")),
    Family("adversarial", "ConAdv", ("adversarial_attack_loss",)),
    Family("extrapolation", "EXTRAP-SGD", ("extrapolation_distance",)),
    Family("local_sgd", "Local SGD", ("local_sgd_syncs",)),
)


@dataclass
class RunLog:
    """What the report reads: the log history and what is known of the run."""

    source: str
    log_history: list[dict]
    global_batch: int | None = None
    run_summary: dict | None = None
    in_progress: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        return max((entry.get("step", 0) for entry in self.log_history), default=0)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of every log entry holding ``key`` (finite numbers only)."""
        pairs = [(entry["step"], entry[key]) for entry in self.log_history
                 if isinstance(entry.get(key), (int, float)) and "step" in entry and math.isfinite(entry[key])]
        steps, values = zip(*pairs) if pairs else ((), ())
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)

    def axes(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """The x axes this run can be drawn against: step -> x, for ``steps`` always, ``examples`` (the adaptive
        batch's logged ``samples``, else steps x the global batch) and ``progress`` (AdaScale) where known."""
        axes = {"optimizer steps": lambda steps: steps}
        samples = self.series("samples")
        if len(samples[0]):
            axes["examples seen"] = lambda steps, s=samples: np.interp(steps, *s)
        elif self.global_batch:
            axes["examples seen"] = lambda steps: steps * self.global_batch
        progress = self.series("progress")
        if len(progress[0]):
            axes["AdaScale progress"] = lambda steps, p=progress: np.interp(steps, *p)
        return axes

    def final_metrics(self) -> dict[str, float]:
        """The last logged value of every number (a run's end metrics, eval metrics, and each family's last)."""
        final = {}
        for entry in self.log_history:
            for key, value in entry.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    final[key] = value
        return final


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _checkpoint_records(checkpoint: str) -> dict:
    """Rank 0's records in a checkpoint's algorithm-state file ({} when absent: a plain HF checkpoint)."""
    import torch

    path = os.path.join(checkpoint, ALGORITHM_STATE_FILE.format(rank=0))
    if not os.path.isfile(path):
        return {}
    return torch.load(path, weights_only=True)


def _batch_from_training_args(folder: str) -> int | None:
    """The global batch from the ``training_args.bin`` HF saves (a pickle: read only from the user's own run)."""
    import torch

    path = os.path.join(folder, "training_args.bin")
    if not os.path.isfile(path):
        return None
    try:
        args = torch.load(path, weights_only=False)
    except Exception:  # another transformers version's class: no batch from it
        return None
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def load_run(output_dir: str) -> RunLog:
    """The freshest log of the run in ``output_dir``: its final ``trainer_state.json``, a recipe's
    ``summary.json`` or its newest complete checkpoint (a run still going)."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"{output_dir} is not a folder: give the output_dir of a run")
    runs = []
    final_state = os.path.join(output_dir, TRAINER_STATE)
    if os.path.isfile(final_state):
        runs.append(RunLog(final_state, _read_json(final_state)["log_history"]))
    summary_path = os.path.join(output_dir, "summary.json")
    if os.path.isfile(summary_path):
        summary = _read_json(summary_path)
        if "log_history" in summary:
            runs.append(RunLog(summary_path, summary["log_history"], summary.get("global_batch_size"),
                               summary.get("run_summary")))
    checkpoint, skipped = newest_complete_checkpoint(output_dir)
    if checkpoint is not None:
        records = _checkpoint_records(checkpoint)
        runs.append(RunLog(os.path.join(checkpoint, TRAINER_STATE),
                           _read_json(os.path.join(checkpoint, TRAINER_STATE))["log_history"],
                           records.get(RUN_RECORD, {}).get("global_batch_size"), records.get(SUMMARY_RECORD),
                           notes=[f"skipped incomplete {path}: {why}" for path, why in skipped]))
    if not runs:
        raise FileNotFoundError(f"{output_dir} holds no {TRAINER_STATE}, summary.json or complete checkpoint: save "
                                "checkpoints (save_strategy), call trainer.save_state(), or use a recipe")
    # the freshest source; on a tie the final files, which hold the end-of-run metrics
    run = max(runs, key=lambda r: (r.last_step, -runs.index(r)))
    run.in_progress = run.source.startswith(os.path.join(output_dir, "checkpoint-")) and not (
        os.path.isfile(final_state) or os.path.isfile(summary_path))
    for other in runs:  # what the freshest source lacks, the others may know
        run.global_batch = run.global_batch or other.global_batch
        run.run_summary = run.run_summary or other.run_summary
    run.global_batch = run.global_batch or _batch_from_training_args(output_dir) or (
        _batch_from_training_args(checkpoint) if checkpoint else None)
    return run


def plot_family(run: RunLog, family: Family, path: str) -> str | None:
    """One PNG: a row per logged key of ``family``, a column per x axis. None when nothing of it was logged."""
    keys = [key for key in family.keys if len(run.series(key)[0])]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = run.axes()
    fig, grid = plt.subplots(len(keys), len(axes), figsize=(4.2 * len(axes), 2.8 * len(keys)), squeeze=False)
    switch = run.series("autowu_switch_step")
    for row, key in enumerate(keys):
        steps, values = run.series(key)
        for col, (label, to_x) in enumerate(axes.items()):
            ax = grid[row][col]
            ax.plot(to_x(steps), values, ".-" if len(steps) < 50 else "-", markersize=3)
            if family.name == "autowu" and len(switch[0]):
                ax.axvline(float(to_x(np.asarray([switch[1][-1]]))[0]), color="C3", linestyle="--",
                           label="switch to decay")
                ax.legend(fontsize=7)
            ax.set_ylabel(key)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
    fig.suptitle(family.title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_markdown(run: RunLog, output_dir: str, pictures: dict[str, str]) -> str:
    lines = [f"# Run report: {output_dir}", "",
             f"Read from `{run.source}`: {run.last_step} optimizer steps"
             + (" (its newest complete checkpoint, with no final trainer_state.json or summary.json: the run may "
                "still be going)" if run.in_progress else "")
             + (f", global batch {run.global_batch}" if run.global_batch else ", global batch not recorded") + ".",
             *(f"- {note}" for note in run.notes), "", "## Decided at start", ""]
    if run.run_summary:
        lines += [f"- {line}" for line in summary_lines(run.run_summary)]
    else:
        lines.append("Not recorded (a run from before the start-up summary was kept in checkpoints and summaries).")
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {key} | {value:.6g} |" for key, value in run.final_metrics().items()]
    lines += ["", "## Pictures", ""] + [f"![{name}]({os.path.basename(path)})" for name, path in pictures.items()]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str, report_dir: str | None = None) -> dict:
    """The report of the run in ``output_dir``, written to ``report_dir`` (default ``<output_dir>/report``):
    ``report.md`` and one ``<family>.png`` per family logged. Returns ``{"summary": path, "pictures": {...}}``."""
    run = load_run(output_dir)
    report_dir = report_dir or os.path.join(output_dir, "report")
    os.makedirs(report_dir, exist_ok=True)
    pictures = {}
    for family in FAMILIES:
        path = plot_family(run, family, os.path.join(report_dir, f"{family.name}.png"))
        if path:
            pictures[family.name] = path
    summary = os.path.join(report_dir, "report.md")
    with open(summary, "w") as f:
        f.write(summary_markdown(run, output_dir, pictures))
    return {"summary": summary, "pictures": pictures, "run": run}

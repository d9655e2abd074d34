"""What a run did, per optimizer step, and plots of it.

``LRHistory`` records the LR each optimizer step applied, the step's globally averaged loss and the examples
seen. It is an ``Algorithm`` so its record is part of every checkpoint and a resumed run plots the whole run.
"""

from __future__ import annotations

import torch

from .algorithms import AdaptiveBatch, LocalSGD
from .core.events import Algorithm


class LRHistory(Algorithm):
    """Per-step record: ``step``, ``examples`` (global batch x steps), ``learning_rate`` (applied), ``loss``."""

    name = "lr_history"

    def __init__(self, global_batch_size: int):
        self.global_batch_size = global_batch_size
        self.steps: list[int] = []
        self.learning_rates: list[float] = []
        self.losses: list[float] = []
        self._pending_loss = float("nan")
        self._pending_lr = float("nan")

    def on_step_loss(self, args, state, control, *, loss, **kwargs):
        self._pending_loss = loss

    def on_lr_applied(self, args, state, control, *, learning_rate, **kwargs):
        self._pending_lr = float(learning_rate)

    def on_step_end(self, args, state, control, **kwargs):
        # Recorded here, when both are known: under DeepSpeed the update (and on_lr_applied) happens inside the
        # last backward, before the step's loss is averaged.
        self.steps.append(state.global_step)
        self.learning_rates.append(self._pending_lr)
        self.losses.append(self._pending_loss)

    @property
    def examples(self) -> list[int]:
        return [s * self.global_batch_size for s in self.steps]

    def state_dict(self):
        return {
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "learning_rates": torch.tensor(self.learning_rates, dtype=torch.float64),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
        }

    def load_state_dict(self, state):
        self.steps = state["steps"].tolist()
        self.learning_rates = state["learning_rates"].tolist()
        self.losses = state["losses"].tolist()


def plot_lr_and_loss(histories: dict[str, LRHistory], path: str, title: str = "") -> str:
    """Two panels against examples seen: applied LR and training loss, one line per run. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lr, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in histories.items():
        ax_lr.plot(hist.examples, hist.learning_rates, label=label)
        ax_loss.plot(hist.examples, hist.losses, label=label, alpha=0.8)
    ax_lr.set_xlabel("examples seen")
    ax_lr.set_ylabel("learning rate (applied)")
    ax_loss.set_xlabel("examples seen")
    ax_loss.set_ylabel("training loss (step mean)")
    ax_loss.set_yscale("log")
    for ax in (ax_lr, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(trainer, metrics: dict, path: str, **extra) -> dict:
    """The final JSON summary every recipe writes: what ran, the metric, the budget used (steps, examples,
    synchronisations), the adaptive batch's ``(samples, batch size, requested batch)`` record and the log
    history."""
    import json

    args = trainer.args
    adaptive = next((alg for alg in trainer.algorithms if isinstance(alg, AdaptiveBatch)), None)
    local = next((alg for alg in trainer.algorithms if isinstance(alg, LocalSGD)), None)
    steps = trainer.state.global_step
    summary = {
        "global_batch_size": trainer.global_batch_size,
        "final_batch_size": adaptive.batch_size if adaptive else trainer.global_batch_size,
        "scale": trainer.scale,
        "lr_scaling": getattr(args, "lr_scaling", "none"),
        "base_batch_size": getattr(args, "base_batch_size", None),
        "learning_rate": args.learning_rate,
        "world_size": args.world_size,
        "optimizer_steps": steps,
        "examples_seen": trainer.examples_seen,
        # rounds of communication: a gradient all-reduce per step, or local SGD's parameter averages
        "synchronizations": local.syncs if local else (steps if args.world_size > 1 else 0),
        "batch_size_history": adaptive.history if adaptive else [],
        "epochs": trainer.state.epoch,
        "metrics": metrics,
        "run_summary": trainer.run_summary,  # what was decided at start (run_summary.py)
        # the most this rank's GPU held for the run (None off CUDA): what runs sharing one GPU must fit in
        "peak_gpu_memory_gib": (torch.cuda.max_memory_reserved(args.device) / 2 ** 30
                                if args.device.type == "cuda" else None),
        **extra,
        "log_history": trainer.state.log_history,
    }
    if args.should_save:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
    return summary

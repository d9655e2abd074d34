"""Adaptive batch sizes vs fixed batches on the image task, on 2 ranks (torchrun, gloo on CPU), same sample budget.

Runs (each the image recipe under ``torchrun --nproc_per_node 2``):

* ``fixed small``      the base batch B0 (the task's tuned LR), DDP
* ``fixed large``      ``--max-multiple`` x B0, ``linear`` rule, DDP
* ``adaptive DDP``     starts at B0 (2 micro-batches per rank), norm test (``--eta``), grows up to the large batch;
                       the LR follows the batch through the ``linear`` rule
* ``local SGD small``  B0, ``--local-steps`` H local steps between parameter averages
* ``adaptive local``   local SGD with H, local batches grown by the norm test at each synchronisation

Writes ``results.json``, ``table.md`` (final test accuracy, optimizer steps, samples, synchronisations: gradient
all-reduces for DDP, parameter averages for local SGD) and ``batch_size.png`` (global batch and training loss vs
samples) to ``--out``.

    python benchmarks/adaptive_batch.py                 # the BENCHMARKS.md table
    python benchmarks/adaptive_batch.py --quick         # CI smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling  # noqa: E402  (the benchmark scripts are not a package)

REPO = scaling.REPO
TASK = scaling.TASKS["image"]
RUNS = ("fixed small", "fixed large", "adaptive DDP", "local SGD small", "adaptive local")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(run: str, opts, out_dir: Path) -> list[str]:
    base = TASK["base_batch"]
    large = base * opts.max_multiple
    per_rank = base // 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), TASK["recipe"], *TASK["args"], "--output_dir", str(out_dir),
           "--num_train_epochs", str(opts.epochs), "--learning_rate", str(TASK["learning_rate"]),
           "--base_batch_size", str(base), "--warmup_steps", str(min(TASK["warmup_epochs"] / opts.epochs, 0.5)),
           "--eval_strategy", "no", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
           "--seed", "0", "--disable_tqdm", "true", "--use_cpu"]
    adaptive = ["--adaptive_batch", "norm", "--adaptive_batch_args",
                f"max_batch_size={large},eta={opts.eta},smoothing={opts.smoothing}",
                "--per_device_train_batch_size", str(per_rank // 2), "--gradient_accumulation_steps", "2",
                "--lr_scaling", "linear"]
    cmd += {
        "fixed small": ["--per_device_train_batch_size", str(per_rank), "--lr_scaling", "none"],
        "fixed large": ["--per_device_train_batch_size", str(large // 2), "--lr_scaling", "linear"],
        "adaptive DDP": adaptive,
        "local SGD small": ["--per_device_train_batch_size", str(per_rank), "--lr_scaling", "none",
                            "--local_sgd_steps", str(opts.local_steps)],
        "adaptive local": adaptive + ["--local_sgd_steps", str(opts.local_steps)],
    }[run]
    if opts.quick:
        cmd += TASK["quick"]
    return cmd


def summarise(run: str, summary: dict, wall: float, cmd: list[str]) -> dict:
    batch = summary["global_batch_size"]
    losses = [(h.get("samples", h["step"] * batch), h["loss"]) for h in summary["log_history"] if "loss" in h]
    return {"run": run, "initial_batch": batch, "final_batch": summary["final_batch_size"],
            "metric": summary["metrics"]["eval_accuracy"], "optimizer_steps": summary["optimizer_steps"],
            "samples": summary["examples_seen"], "synchronizations": summary["synchronizations"], "wall_s": wall,
            "batch_size_history": summary["batch_size_history"], "loss_curve": losses, "command": cmd}


def to_markdown(rows: list[dict], machine: str, opts) -> str:
    lines = [f"Image task (Fashion-MNIST, tiny ResNet), 2 ranks (gloo, CPU), {opts.epochs:g} epochs, base batch "
             f"{TASK['base_batch']}, norm test eta={opts.eta}, H={opts.local_steps}. Machine: {machine}.", "",
             "| run | batch (initial → final) | test accuracy | optimizer steps | samples | synchronisations |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['initial_batch']} → {r['final_batch']} | {r['metric']:.4f} | "
                     f"{r['optimizer_steps']} | {r['samples']} | {r['synchronizations']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_batch, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["batch_size_history"]:
            # each test's (samples seen, batch chosen for the following steps)
            samples = [0] + [s for s, _, _ in r["batch_size_history"]] + [r["samples"]]
            sizes = [r["initial_batch"]] + [b for _, b, _ in r["batch_size_history"]] + [r["final_batch"]]
            ax_batch.step(samples, sizes, where="post", label=r["run"])
        else:
            ax_batch.plot([0, r["samples"]], [r["initial_batch"]] * 2, label=r["run"], linestyle="--")
        ax_loss.plot(*zip(*r["loss_curve"]), label=r["run"], alpha=0.8)
    ax_batch.set_xlabel("samples seen")
    ax_batch.set_ylabel("global batch size")
    ax_batch.set_yscale("log", base=2)
    ax_loss.set_xlabel("samples seen")
    ax_loss.set_ylabel("training loss (step mean)")
    ax_loss.set_yscale("log")
    for ax in (ax_batch, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return scaling.save_figure(fig, path, title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--epochs", type=float, default=TASK["epochs"])
    p.add_argument("--max-multiple", type=int, default=16, help="the large batch (and the cap), as a multiple of B0")
    p.add_argument("--eta", type=float, default=0.5, help="the norm test's eta")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA coefficient of the test statistics")
    p.add_argument("--local-steps", type=int, default=4, help="local SGD: H steps between parameter averages")
    p.add_argument("--out", help="output folder (default benchmarks/results/adaptive_batch)")
    p.add_argument("--quick", action="store_true", help="CI smoke test: a data subset, 1 epoch, max multiple 4")
    p.add_argument("--reuse", action="store_true", help="reuse runs already finished in --out (same command)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.epochs, opts.max_multiple = 1, 4
    out = Path(opts.out or REPO / "benchmarks" / "results" / "adaptive_batch")
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, 1 torch thread per rank"
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    for run in opts.runs:
        run_dir = out / "runs" / run.replace(" ", "_")
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = run_command(run, opts, run_dir)
        done = run_dir / "wall.json"
        finished = json.loads(done.read_text()) if done.is_file() and (run_dir / "summary.json").is_file() else {}
        # a reused run must have the same command but for the port
        same = [a for a in finished.get("command", []) if not a.isdigit()] == [a for a in cmd if not a.isdigit()]
        if opts.reuse and same:
            wall = finished["wall_s"]
        else:
            print(f"[{run}] {' '.join(cmd)}", flush=True)
            wall = scaling.run_one(cmd, run_dir / "log.txt")
            done.write_text(json.dumps({"wall_s": wall, "command": cmd}))
        row = summarise(run, json.loads((run_dir / "summary.json").read_text()), wall, cmd)
        print(f"[{run}] accuracy={row['metric']:.4f} steps={row['optimizer_steps']} samples={row['samples']} "
              f"syncs={row['synchronizations']} batch {row['initial_batch']}->{row['final_batch']}", flush=True)
        rows.append(row)
    (out / "results.json").write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv),
                                                  "runs": rows}, indent=1))
    table = to_markdown(rows, machine, opts)
    (out / "table.md").write_text(table + "\n")
    plot(rows, out / "batch_size.png", f"adaptive vs fixed batch, {opts.epochs:g} epochs, 2 ranks")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

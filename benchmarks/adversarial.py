"""Quality of adversarial training at a large batch: the same run without attack, with sequential adversarial
training (attack on the current weights) and with ConAdv (attack on the previous step's weights), each evaluated
clean and under the same one-step attack. The runs are the scaling benchmark's (``scaling.py``: task data, base LR,
warm-up, LR rule), with ``--adversarial`` and ``--eval_adversarial_args`` added.

    python benchmarks/adversarial.py --task image --multiple 16 --method linear --attack pixel_epsilon=0.1
    python benchmarks/adversarial.py --task lstm --multiple 8 --method sqrt --attack epsilon=0.02

Writes ``<out>/results.json`` and ``<out>/table.md`` (default out: benchmarks/results/<task>_adversarial). Every
run checkpoints each epoch: the same command again skips finished runs and continues a killed one (``scaling.py``'s
resume, wall times summed over sittings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling  # noqa: E402  (the benchmark scripts are not a package)

MODES = ("none", "sequential", "conadv")
ADVERSARIAL_METRIC = {"eval_accuracy": "eval_adv_accuracy", "eval_perplexity": "eval_adv_perplexity"}


def run_all(opts, recipe_args: list[str] = ()) -> list[dict]:
    task = scaling.TASKS[opts.task]
    epochs = opts.epochs or task["epochs"]
    out = Path(opts.out or f"benchmarks/results/{opts.task}_adversarial")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = []
    for mode in MODES:
        label = f"{opts.multiple}x {opts.method}" + ("" if mode == "none" else f" + {mode}")
        run_dir = out / "runs" / label.replace(" ", "_").replace("+_", "")
        extra = [*recipe_args, "--eval_adversarial_args", opts.attack]
        if mode != "none":
            extra += ["--adversarial", mode, "--adversarial_args", opts.attack]
        runs.append((mode, label, run_dir, scaling.recipe_command(task, opts.multiple, opts.method, epochs, run_dir,
                                                                 extra, opts.quick, opts.device)))
    if not opts.fresh:
        scaling.refuse_other_commands_runs([(run_dir, cmd) for _, _, run_dir, cmd in runs])
    threads = opts.threads or (1 if opts.jobs > 1 else None)
    machine = scaling.sitting_machine(opts.device, threads, opts.jobs)

    def execute(mode, label, run_dir, cmd) -> dict:  # it resumes where a killed benchmark left it, as scaling.py's
        wall = scaling.run_resumably(run_dir, cmd, label, threads, opts.fresh, machine)
        summary = json.loads((run_dir / "summary.json").read_text())
        metric = task["metric"]
        return {"run": label, "mode": mode, "global_batch": summary["global_batch_size"],
                "metric": summary["metrics"][metric],
                "adversarial_metric": summary["metrics"][ADVERSARIAL_METRIC[metric]],
                "optimizer_steps": summary["optimizer_steps"], "wall_s": wall, "command": cmd,
                "machines": scaling.Sittings(run_dir).machines}

    rows = scaling.run_each(lambda run: execute(*run), runs, opts.jobs)  # --jobs: a GPU machine has room
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = to_markdown(rows, task["metric"], opts.attack)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return rows


def to_markdown(rows: list[dict], metric: str, attack: str) -> str:
    machine = scaling.machines_line(m for r in rows for m in r["machines"])
    lines = [f"Attack `{attack}` (one signed-gradient step, random start); {machine}.", "",
             f"| run | global batch | {metric} (clean) | {ADVERSARIAL_METRIC[metric]} (under attack) | optimizer steps "
             "| wall time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['global_batch']} | {r['metric']:.4g} | {r['adversarial_metric']:.4g} | "
                     f"{r['optimizer_steps']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=[t for t, spec in scaling.TASKS.items() if spec["metric"] in ADVERSARIAL_METRIC],
                   required=True)
    p.add_argument("--multiple", type=int, default=16, help="global batch = multiple x the task's base batch")
    p.add_argument("--method", default="linear", choices=("linear", "sqrt", "legw"), help="LR scaling rule")
    p.add_argument("--attack", required=True, help="adversarial_args of the attack, e.g. pixel_epsilon=0.1")
    p.add_argument("--epochs", type=float, help="epoch budget (default: the task's)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--quick", action="store_true", help="CI smoke test: the task's data subset")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every run trains")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (their wall times then compete)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: 1 with --jobs > 1, else "
                                               "torch's)")
    p.add_argument("--fresh", action="store_true",
                   help="start every run anew (default: a rerun skips finished runs and resumes unfinished ones)")
    opts, recipe_args = p.parse_known_args(argv)  # the rest goes to every run's recipe, as scaling.py's
    if opts.quick:
        opts.epochs = opts.epochs or 1
    run_all(opts, recipe_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

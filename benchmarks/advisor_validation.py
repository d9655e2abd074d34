"""Does the advisor predict the steps a larger batch needs? Its prediction against measured runs on the scaling
benchmark's image task (``scaling.py --task image``: Fashion-MNIST 10k subset, tiny ResNet, SGD momentum 0.9,
lr 0.05 tuned at B0 = 64, cosine over 4 epochs, 0.25 epochs of warm-up).

1. The probe: ``hf_largebatch.advisor.advise`` on the base setup (64 as 2 micro-batches of 32), ``--probe-steps``
   steps of the run's own schedule, gives ``B_noise``.
2. Measured: the base run at 64 and AdaScale at ``--multiples`` x 64 (the rule the advisor recommends: McCandlish's
   trade-off assumes an LR fitted to each batch, and AdaScale's gain is that fit), each evaluated on the 2,000
   eval images every ~1/10 epoch and stopped at ``--target`` accuracy; the step it is reached at is interpolated
   between evaluations.
3. Predicted, from the base run's measured ``T(64)``, by ``Advice.steps_to_target``: from the short probe's one
   noise scale, ``T(B) = T(64) (1 + B_noise/B) / (1 + B_noise/64)``; and from the base run itself with the probe
   left on (``GradientNoiseProbe`` to the target: the noise scale along its trajectory, 25-step windows). Both per
   seed, then the median.

    python benchmarks/advisor_validation.py --out benchmarks/results/advisor_validation

Each run's result is written as it finishes (``runs/<batch>_seed<k>.json``); a rerun skips finished runs. Writes
``results.json``, ``table.md`` and ``steps.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling  # noqa: E402  (the benchmark scripts are not a package)

TASK = scaling.TASKS["image"]


def image_recipe():
    spec = importlib.util.spec_from_file_location("image_recipe", scaling.REPO / TASK["recipe"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def task_data(recipe):
    """The image task's train and eval datasets, exactly as its recipe builds them."""
    from hf_largebatch.data.images import ImageClassificationDataset, load_image_splits

    settings = dict(zip(TASK["args"][::2], TASK["args"][1::2]))
    splits = load_image_splits(settings["--dataset"])
    train = splits.train.subset(int(settings["--max_train_samples"]), seed=0)
    evaluation = splits.eval.subset(int(settings["--max_eval_samples"]), seed=1)
    return (ImageClassificationDataset(train, splits.mean, splits.std, splits.augmentation, 1),
            ImageClassificationDataset(evaluation, splits.mean, splits.std, None, 1), splits.class_names)


def run_args(out: Path, batch: int, eval_steps: int | None, **overrides):
    from hf_largebatch import LargeBatchArguments

    base = TASK["base_batch"]
    settings = dict(output_dir=str(out), per_device_train_batch_size=batch // 2, gradient_accumulation_steps=2,
                    learning_rate=TASK["learning_rate"], base_batch_size=base, num_train_epochs=TASK["epochs"],
                    warmup_steps=TASK["warmup_epochs"] / TASK["epochs"], lr_scheduler_type="cosine", optim="sgd",
                    optim_args="momentum=0.9", weight_decay=5e-4, dataloader_drop_last=True, use_cpu=True,
                    report_to=[], save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True,
                    per_device_eval_batch_size=500, eval_strategy="steps" if eval_steps else "no",
                    eval_steps=eval_steps, lr_scaling="none" if batch == base else "adascale")
    return LargeBatchArguments(**{**settings, **overrides})


def steps_to_target(curve: list[tuple[int, float]], target: float) -> float:
    """The step the accuracy curve first reaches ``target``, linearly between the evaluations around it."""
    previous = (0, 0.0)
    for step, value in curve:
        if value >= target:
            s0, v0 = previous
            return s0 + (step - s0) * (target - v0) / (value - v0) if value > v0 else float(step)
        previous = (step, value)
    return math.nan


def measure(recipe, data, batch: int, target: float, seed: int, out: Path) -> dict:
    """Train at ``batch`` (the base run, or AdaScale) until the eval accuracy reaches ``target``; the base run also
    records every step's gradient statistics (``GradientNoiseProbe`` left running to the target)."""
    from transformers import TrainerCallback, set_seed

    from hf_largebatch import GradientNoiseProbe, LargeBatchTrainer

    class StopAtTarget(TrainerCallback):
        def __init__(self):
            self.curve = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.curve.append((state.global_step, metrics["eval_accuracy"]))
            if metrics["eval_accuracy"] >= target:
                control.should_training_stop = True

    train, evaluation, names = data
    eval_steps = max(1, round(len(train) // batch / 10))
    set_seed(seed)
    model = recipe.build_model(recipe.ModelArguments(preset="tiny"), 1, names)
    stop = StopAtTarget()
    probe = GradientNoiseProbe() if batch == TASK["base_batch"] else None
    trainer = LargeBatchTrainer(model=model, args=run_args(out, batch, eval_steps, seed=seed), train_dataset=train,
                                eval_dataset=evaluation, compute_metrics=recipe.accuracy,
                                preprocess_logits_for_metrics=recipe.argmax_logits,
                                callbacks=[stop] + ([probe] if probe else []))
    start = time.perf_counter()
    trainer.train()
    adascale = trainer.algorithm("adascale")
    return {"batch": batch, "seed": seed, "rule": "adascale" if adascale else "base", "eval_every": eval_steps,
            "curve": stop.curve, "steps_to_target": steps_to_target(stop.curve, target),
            "progress": adascale.progress if adascale else trainer.state.global_step,
            "probe": probe.record() if probe else None, "wall_s": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(scaling.REPO / "benchmarks" / "results" / "advisor_validation"))
    p.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--target", type=float, default=0.80, help="eval accuracy to reach (the base run ends at ~0.82)")
    p.add_argument("--probe-steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    opts = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from hf_largebatch.advisor import Advice, advise, noise_scale

    out = Path(opts.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    recipe = image_recipe()
    data = task_data(recipe)
    base = TASK["base_batch"]

    advice_file = out / "advice.json"
    if not advice_file.is_file():
        torch.manual_seed(0)
        model = recipe.build_model(recipe.ModelArguments(preset="tiny"), 1, data[2])
        advise(model, run_args(out / "probe_run", base, None, lr_scaling="none"), data[0],
               probe_steps=opts.probe_steps, output_dir=str(out))
    advice = json.loads(advice_file.read_text())
    noise = advice["noise_scale"]
    probe = Advice.from_record(json.loads((out / "probe" / "noise_probe.json").read_text()))

    runs: dict[int, list[dict]] = {}
    for seed in opts.seeds:
        for batch in [base] + [base * m for m in opts.multiples]:
            path = out / "runs" / f"{batch}_seed{seed}.json"
            if not path.is_file():
                print(f"[batch {batch} seed {seed}] training to accuracy {opts.target}", flush=True)
                path.write_text(json.dumps(measure(recipe, data, batch, opts.target, seed, out / "run")))
            run = json.loads(path.read_text())
            runs.setdefault(batch, []).append(run)
            print(f"[batch {batch} seed {seed}] steps to target {run['steps_to_target']:.1f}", flush=True)

    # per seed: the base run's steps anchor both predictions; the trajectory one also uses its recorded statistics
    rows = []
    for batch, seeds in runs.items():
        measured, by_probe, trajectory = [], [], []
        for run, anchor in zip(seeds, runs[base]):
            measured.append(run["steps_to_target"])
            by_probe.append(probe.steps_to_target(batch, anchor["steps_to_target"]))
            trajectory.append(Advice.from_record(anchor["probe"]).steps_to_target(batch, anchor["steps_to_target"]))
        row = {"batch": batch, "rule": seeds[0]["rule"], "eval_every": seeds[0]["eval_every"],
               "measured": measured, "predicted_probe": by_probe, "predicted_trajectory": trajectory}
        for key in ("measured", "predicted_probe", "predicted_trajectory"):
            row[key + "_median"] = float(np.median(row[key]))
        for key in ("probe", "trajectory"):
            row[f"error_{key}"] = row[f"predicted_{key}_median"] / row["measured_median"] - 1
        rows.append(row)
    first = runs[base][0]["probe"]  # the noise scale along the first seed's base run, per 100 steps
    growth = [[start + 1, min(start + 100, len(first["grad_sqr"])),
               noise_scale(first["grad_sqr"][start:start + 100], first["trace"][start:start + 100])]
              for start in range(0, len(first["grad_sqr"]), 100)]
    results = {"target": opts.target, "noise_scale": noise, "probe_steps": opts.probe_steps, "seeds": opts.seeds,
               "base_run_noise_scale": growth,
               "recommended": advice["recommended_batch_range"], "command": " ".join(sys.argv), "runs": rows,
               "machine": f"{scaling.machine_name()}, torch threads {torch.get_num_threads()}"}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = to_markdown(results)
    (out / "table.md").write_text(table + "\n")
    plot(results, out / "steps.png")
    print(table)
    return 0


def to_markdown(results: dict) -> str:
    n = results["noise_scale"]
    lines = [f"Probe: {results['probe_steps']} steps at batch 64, B_noise = {n['value']:.0f} examples (68% interval "
             f"{n['low']:.0f} .. {n['high']:.0f}; first half {n['early']:.0f}, second half {n['late']:.0f}); "
             f"recommended batch {results['recommended'][0]} .. {results['recommended'][1]}. Target: eval accuracy "
             f"{results['target']}, medians over seeds {results['seeds']}; {results['machine']}.", "",
             "Noise scale along the base run (seed " + str(results["seeds"][0]) + "): " + ", ".join(
                 f"steps {a}-{b}: {n:.0f}" for a, b, n in results["base_run_noise_scale"]) + ".", "",
             "| batch | rule | steps to target, measured (per seed) | predicted from the probe | error | predicted "
             "along the base run's trajectory | error |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        per_seed = ", ".join(f"{m:.0f}" for m in r["measured"])
        lines.append(f"| {r['batch']} | {r['rule']} | {r['measured_median']:.0f} ({per_seed}) | "
                     f"{r['predicted_probe_median']:.0f} | {100 * r['error_probe']:+.0f}% | "
                     f"{r['predicted_trajectory_median']:.0f} | {100 * r['error_trajectory']:+.0f}% |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [r["batch"] for r in runs]
    for r in runs:
        ax.plot([r["batch"]] * len(r["measured"]), r["measured"], ".", color="C0", alpha=0.5)
    ax.plot(batches, [r["measured_median"] for r in runs], "o-", color="C0", label="measured (median, seeds)")
    ax.plot(batches, [r["predicted_probe_median"] for r in runs], "s--", color="C1",
            label=f"advisor, {results['probe_steps']}-step probe")
    ax.plot(batches, [r["predicted_trajectory_median"] for r in runs], "^--", color="C2",
            label="advisor, base run's trajectory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel(f"optimizer steps to accuracy {results['target']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

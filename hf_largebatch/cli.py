"""The ``hf-largebatch`` console script."""

from __future__ import annotations

import argparse
import os
import sys


RECIPES = {"image": "image_classification.py", "lstm": "language_modeling_lstm.py", "translation": "translation.py"}


def run_advise(args) -> int:
    """The probe in a child process (the script as the user runs it, plus the probe's options, which come last and
    so win), then the advice from what it wrote; or, with ``--from-probe``, the advice from a probe already run."""
    import subprocess

    from .advisor import advice_from_probe

    if args.from_probe:
        try:
            return _print_advice(advice_from_probe(args.from_probe), args)
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
    if args.recipe:
        recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
        script = os.path.join(recipes, RECIPES[args.recipe])
        if not os.path.isfile(script):
            raise SystemExit(f"error: {script} not found: --recipe needs a source checkout of hf_largebatch; give "
                             "the recipe's path with --script instead")
    else:
        script = args.script
    if args.probe_steps < 4:
        raise SystemExit(f"error: --probe-steps {args.probe_steps}: the advisor needs at least 4 steps (200 is a "
                         "good start)")
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    probe_dir = os.path.join(args.output_dir, "probe")
    cmd = [sys.executable, script, *script_args, "--noise_probe_steps", str(args.probe_steps), "--output_dir",
           probe_dir, "--save_strategy", "no", "--eval_strategy", "no", "--do_eval", "False", "--report_to", "none"]
    print("probe: " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SystemExit("error: the probe run failed (its output is above)")
    return _print_advice(advice_from_probe(probe_dir), args)


def _print_advice(advice, args) -> int:
    paths = advice.write(args.output_dir)
    print("\n" + advice.table(args.steps_to_target))
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-largebatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="base batch vs 64x with the linear rule, LEGW and AdaScale on sklearn's digits")
    demo.add_argument("--output-dir", default="hf_largebatch_demo")
    demo.add_argument("--base-batch-size", type=int, default=16)
    demo.add_argument("--scale", type=int, default=64, help="S: the large runs use S x base-batch-size")
    demo.add_argument("--epochs", type=float, default=20.0)
    demo.add_argument("--learning-rate", type=float, default=0.05, help="LR tuned at the base batch size")
    demo.add_argument("--base-warmup-epochs", type=float, default=0.5)
    demo.add_argument("--probe-steps", type=int, default=100, help="the advisor's probe at the end (0: none)")
    demo.add_argument("--seed", type=int, default=0)
    advise = sub.add_parser(
        "advise", help="probe a training script and recommend a batch size and an LR plan",
        description="Run a recipe or a training script (a LargeBatchArguments/HfArgumentParser script) for "
                    "--probe-steps steps with the gradient-statistics probe, then print the noise scale, the "
                    "steps/examples trade-off, the recommended batch range and its LR plan; writes advice.json, "
                    "advice.md and advice.png to --output-dir. The script's own arguments follow '--'. Give it a "
                    "small batch of >= 2 micro-batches (gradient_accumulation_steps >= 2) and the LR tuned there.")
    target = advise.add_mutually_exclusive_group(required=True)
    target.add_argument("--recipe", choices=sorted(RECIPES), help="one of this repository's recipes")
    target.add_argument("--script", help="a training script that parses LargeBatchArguments")
    target.add_argument("--from-probe", help="no new probe: the noise_probe.json in this folder (a run trained with "
                                             "noise_probe_steps, e.g. a whole base run)")
    advise.add_argument("--steps-to-target", type=float,
                        help="steps the probe's batch takes to your target: adds the predicted steps of each batch")
    advise.add_argument("--probe-steps", type=int, default=200)
    advise.add_argument("--output-dir", default="hf_largebatch_advice")
    advise.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the script's arguments")
    report = sub.add_parser("report", help="pictures and a summary of what a run did",
                            description="One PNG per family of logged numbers (LR, loss, AdaScale, noise scale, "
                                        "batch size, AutoWU, ConAdv, ...) against steps, examples and progress, and "
                                        "report.md (what was decided at start, the final metrics), from a run's "
                                        "output_dir: finished, or still going (its newest complete checkpoint).")
    report.add_argument("output_dir")
    report.add_argument("--out", help="where to write (default: <output_dir>/report)")
    args = parser.parse_args(argv)
    if args.command == "advise":
        return run_advise(args)
    if args.command == "report":
        from .run_report import write_report

        try:
            written = write_report(args.output_dir, args.out)
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
        print("\n".join([written["summary"], *written["pictures"].values()]))
        return 0

    if args.command == "demo":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .demo import format_table, run_demo

        result = run_demo(output_dir=args.output_dir, base_batch_size=args.base_batch_size, scale=args.scale,
                          epochs=args.epochs, learning_rate=args.learning_rate,
                          base_warmup_epochs=args.base_warmup_epochs, seed=args.seed, probe_steps=args.probe_steps)
        print("\n" + format_table(result["rows"]) + "\n\n" + result["conclusion"])
        advice = result["advice"]
        if advice is not None:
            noise = advice.noise
            print(f"\nadvisor (a {noise.steps}-step probe at batch {advice.probe_batch}): gradient noise scale "
                  f"{noise.value:.0f} examples ({noise.low:.0f} .. {noise.high:.0f}), {noise.early:.0f} in the "
                  f"probe's first half, {noise.late:.0f} in its second; recommended batch {advice.probe_batch} .. "
                  f"{advice.recommended} with lr_scaling={advice.plans[0].rule} (learning_rate "
                  f"{advice.plans[0].learning_rate:g}); details: "
                  f"{os.path.join(args.output_dir, 'advice', 'advice.md')}")
        print(f"\nplot: {os.path.join(args.output_dir, 'lr_and_loss.png')}"
              f"\nreports: {os.path.join(args.output_dir, 'report_*')}"
              f"\nresults: {os.path.join(args.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``hf-largebatch`` console script."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-largebatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="base batch vs 16x with the linear rule and LEGW on sklearn's digits")
    demo.add_argument("--output-dir", default="hf_largebatch_demo")
    demo.add_argument("--base-batch-size", type=int, default=16)
    demo.add_argument("--scale", type=int, default=16, help="S: the large runs use S x base-batch-size")
    demo.add_argument("--epochs", type=float, default=15.0)
    demo.add_argument("--learning-rate", type=float, default=0.05, help="LR tuned at the base batch size")
    demo.add_argument("--base-warmup-epochs", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .demo import format_table, run_demo

        rows = run_demo(output_dir=args.output_dir, base_batch_size=args.base_batch_size, scale=args.scale,
                        epochs=args.epochs, learning_rate=args.learning_rate,
                        base_warmup_epochs=args.base_warmup_epochs, seed=args.seed)
        print("\n" + format_table(rows))
        print(f"\nplot: {os.path.join(args.output_dir, 'lr_and_loss.png')}"
              f"\nresults: {os.path.join(args.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

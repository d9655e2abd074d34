"""How the demo's default setting was chosen: ``hf-largebatch demo`` (``hf_largebatch.demo.run_demo``) on several
seeds at each candidate (base batch, S, epochs), with the question the demo must answer on every seed: does AdaScale
stay within 1 point of the base run while a fixed rule loses 2 points or more?

    python benchmarks/demo_seeds.py --out benchmarks/results/demo_seeds

Each (setting, seed) result is written as it finishes (``runs/<setting>_seed<k>.json``); a rerun skips finished
ones. Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: (base batch, S, epochs): the first wave's default, then the settings tried; the last is the default now
SETTINGS = [(16, 16, 15), (16, 32, 15), (8, 64, 10), (16, 64, 20)]


def run(setting, seed: int, out: Path) -> dict:
    from hf_largebatch.demo import run_demo

    base_batch, scale, epochs = setting
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = run_demo(output_dir=str(out / "scratch"), base_batch_size=base_batch, scale=scale, epochs=epochs,
                          seed=seed, probe_steps=0)
    rows = result["rows"]
    base, adascale = rows[0], rows[-1]
    fixed = rows[1:-1]
    return {"setting": list(setting), "seed": seed,
            "accuracy": {r["rule"]: r["test_accuracy"] for r in rows},
            "steps": {r["rule"]: r["steps"] for r in rows},
            "adascale_gap_points": 100 * (adascale["test_accuracy"] - base["test_accuracy"]),
            "worst_fixed_gap_points": 100 * (min(r["test_accuracy"] for r in fixed) - base["test_accuracy"]),
            "best_fixed_gap_points": 100 * (max(r["test_accuracy"] for r in fixed) - base["test_accuracy"])}


def holds(r: dict) -> bool:
    return abs(r["adascale_gap_points"]) <= 1.0 and r["worst_fixed_gap_points"] <= -2.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_seeds"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    opts = p.parse_args(argv)
    out = Path(opts.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = []
    for setting in SETTINGS:
        for seed in opts.seeds:
            path = out / "runs" / f"{'_'.join(map(str, setting))}_seed{seed}.json"
            if not path.is_file():
                path.write_text(json.dumps(run(setting, seed, out)))
            r = json.loads(path.read_text())
            results.append(r)
            print(f"{setting} seed {seed}: AdaScale {r['adascale_gap_points']:+.1f} points, fixed rules "
                  f"{r['worst_fixed_gap_points']:+.1f} .. {r['best_fixed_gap_points']:+.1f}", flush=True)
    lines = ["| B0 | S | epochs | seeds where AdaScale is within 1 point and a fixed rule 2+ below | AdaScale vs base "
             "(points, per seed) | worst fixed rule vs base (points, median) | steps base / AdaScale (median) |",
             "|---:|---:|---:|---:|---|---:|---:|"]
    for setting in SETTINGS:
        rs = [r for r in results if r["setting"] == list(setting)]
        gaps = ", ".join(f"{r['adascale_gap_points']:+.1f}" for r in rs)
        lines.append(f"| {setting[0]} | {setting[1]} | {setting[2]:g} | {sum(map(holds, rs))} of {len(rs)} | {gaps} | "
                     f"{statistics.median(r['worst_fixed_gap_points'] for r in rs):+.1f} | "
                     f"{statistics.median(r['steps']['base'] for r in rs):.0f} / "
                     f"{statistics.median(r['steps']['adascale'] for r in rs):.0f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

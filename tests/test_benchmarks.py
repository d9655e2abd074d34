"""Smoke tests of the benchmark harness (`--quick`): they run end to end and write what they promise.
Timings themselves are never asserted here; they live in BENCHMARKS.md."""

import json
import subprocess
import sys

import pytest

from helpers import REPO


def run(args, tmp_path):
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_overhead_quick(tmp_path):
    run(["benchmarks/overhead.py", "--quick", "--variants", "plain", "lr_history"], tmp_path)
    summary = json.loads((tmp_path / "overhead.json").read_text())
    assert summary["baseline"] == "plain" and set(summary["variants"]) == {"plain", "lr_history"}
    assert summary["variants"]["plain"]["step_time_ratio"] == 1.0
    for v in summary["variants"].values():
        assert len(v["runs"]) == 2 and all(r["steps_timed"] == 10 and r["median_step_s"] > 0 for r in v["runs"])
        assert v["peak_rss_mib"] > 50
    assert "| lr_history |" in (tmp_path / "overhead.md").read_text()


def test_overhead_rejects_unknown_variant(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/overhead.py", "--variants", "plain", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variant" in proc.stderr

"""`hf-largebatch demo` end to end through the installed console script (real digits data, real training)."""

import json
import shutil
import subprocess

import pytest


def test_demo_console_script(tmp_path):
    exe = shutil.which("hf-largebatch")
    assert exe, "the console script is not installed: pip install -e ."
    proc = subprocess.run([exe, "demo", "--epochs", "3", "--output-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 5 and "test accuracy" in table[0]

    rows = json.loads((tmp_path / "results.json").read_text())
    base, linear, legw, adascale = rows
    assert [r["global_batch"] for r in rows] == [16, 256, 256, 256]
    assert base["test_accuracy"] > 0.9  # 10 classes: chance is 0.1
    assert linear["peak_lr"] == pytest.approx(16 * 0.05) and legw["peak_lr"] <= 4 * 0.05 + 1e-12
    # Same epoch budget: 16x the batch takes 16x fewer steps (up to the dropped last partial batch).
    assert base["steps"] // 16 - 1 <= linear["steps"] == legw["steps"] <= base["steps"] // 16 + 1
    # LEGW keeps the base run's warm-up step count (w0 * N / B0), up to rounding of partial batches.
    assert abs(legw["warmup_steps"] - base["warmup_steps"]) <= 0.1 * base["warmup_steps"]
    # AdaScale: between S x fewer steps than the base run and the base run's count, and a real gain.
    assert base["steps"] // 16 <= adascale["steps"] < base["steps"] and adascale["mean_gain"] > 1.5
    png = tmp_path / "lr_and_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

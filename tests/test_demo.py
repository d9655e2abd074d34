"""`hf-largebatch demo` end to end through the installed console script (real digits data, real training): the
default setting shows what the library is for, and the table, conclusion, reports and advice say it."""

import json
import shutil
import subprocess

import pytest


def test_demo_console_script(tmp_path):
    exe = shutil.which("hf-largebatch")
    assert exe, "the console script is not installed: pip install -e ."
    proc = subprocess.run([exe, "demo", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 5 and "test accuracy" in table[0] and "examples seen" in table[0]

    result = json.loads((tmp_path / "results.json").read_text())
    base, linear, legw, adascale = rows = result["rows"]
    assert [r["global_batch"] for r in rows] == [16, 1024, 1024, 1024]
    # the regime the library is for (seed 0; seeds 0-5 in BENCHMARKS.md): a fixed rule on the base run's epoch
    # budget loses >= 2 points, AdaScale stays within 1 point of the base run in fewer steps
    assert min(linear["test_accuracy"], legw["test_accuracy"]) <= base["test_accuracy"] - 0.02
    assert adascale["test_accuracy"] >= base["test_accuracy"] - 0.01
    assert adascale["steps"] < base["steps"] / 4 and adascale["mean_gain"] > 4
    assert linear["peak_lr"] == pytest.approx(64 * 0.05) and legw["peak_lr"] <= 8 * 0.05 + 1e-12
    # Same epoch budget: 20 epochs of 1,437 training images; at 1024 an epoch is one step (the partial batch is
    # dropped), at 16 it is 89
    assert linear["steps"] == legw["steps"] == 20 and base["steps"] == 20 * 89
    assert all(r["examples_seen"] == r["steps"] * r["global_batch"] for r in rows)  # the partial batch was dropped
    # the conclusion is the table's numbers
    conclusion = result["conclusion"]
    assert conclusion in proc.stdout and "AdaScale kept the base run's accuracy" in conclusion
    assert f"({100 * adascale['test_accuracy']:.1f}% vs {100 * base['test_accuracy']:.1f}%" in conclusion
    assert f"({adascale['steps']} vs {base['steps']})" in conclusion
    best_fixed = max((linear, legw), key=lambda r: r["test_accuracy"])
    lost = 100 * (base["test_accuracy"] - best_fixed["test_accuracy"])
    assert f"fixed rule, {best_fixed['rule']}, lost {lost:.1f} points" in conclusion
    # the advisor's recommendation ends the demo; the reports sit beside the LR/loss plot
    assert result["advice"]["recommended_batch_range"][0] == 16 and "advisor (a " in proc.stdout
    assert (tmp_path / "advice" / "advice.png").is_file()
    for name, family in (("base", "learning_rate"), ("adascale_x64", "adascale"), ("linear_x64", "loss")):
        assert (tmp_path / f"report_{name}" / f"{family}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "lr_and_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_conclusion_follows_the_numbers():
    from hf_largebatch.demo import conclude

    def row(rule, accuracy, steps, batch=1024):
        return {"rule": rule, "test_accuracy": accuracy, "steps": steps, "scale": batch / 16,
                "examples_seen": steps * batch}

    rows = [row("base", 0.95, 1000, 16), row("linear", 0.945, 20), row("legw", 0.90, 20), row("adascale", 0.92, 100)]
    sentence = conclude(rows)
    assert "AdaScale did not keep the base run's accuracy (92.0% vs 95.0%, -3.0 points)" in sentence
    assert "10.0x fewer steps (100 vs 1000)" in sentence and "6.4x the examples" in sentence
    assert "the best fixed rule, linear, came within 0.5 points" in sentence and "does not need AdaScale" in sentence

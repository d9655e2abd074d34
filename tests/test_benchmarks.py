"""Smoke tests of the benchmark harness (`--quick`): they run end to end and write what they promise.
Timings themselves are never asserted here; they live in BENCHMARKS.md."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO


def run(args, tmp_path):
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_overhead_quick(tmp_path):
    """On the image task's data (the AdaScale overhead target's setting)."""
    run(["benchmarks/overhead.py", "--quick", "--data", "fashion_mnist", "--variants", "plain", "adascale"], tmp_path)
    summary = json.loads((tmp_path / "overhead.json").read_text())
    assert summary["baseline"] == "plain" and set(summary["variants"]) == {"plain", "adascale"}
    assert summary["data"] == "fashion_mnist"
    assert summary["variants"]["plain"]["step_time_ratio"] == 1.0
    for v in summary["variants"].values():
        assert len(v["runs"]) == 2 and all(r["steps_timed"] == 10 and r["median_step_s"] > 0 for r in v["runs"])
        assert v["peak_rss_mib"] > 50
    assert "| adascale |" in (tmp_path / "overhead.md").read_text()


def test_overhead_rejects_unknown_variant(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/overhead.py", "--variants", "plain", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variant" in proc.stderr


def test_scaling_quick(tmp_path):
    run(["benchmarks/scaling.py", "--task", "image", "--quick", "--methods", "linear", "legw"], tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert set(runs) == {"base", "2x linear", "2x legw"}
    assert runs["base"]["global_batch"] == 64 and runs["2x legw"]["global_batch"] == 128
    # same epoch budget: twice the batch, half the optimizer steps
    assert runs["base"]["optimizer_steps"] == 2 * runs["2x linear"]["optimizer_steps"]
    assert all(r["eval_curve"] and r["lr_curve"] for r in runs.values())
    # the curve against examples reads the trainer's count: the last evaluation comes after every example was read
    assert all(r["eval_examples"][-1] == r["examples_seen"] for r in runs.values())
    # the base run learns in its 8 steps: it beats chance (10 classes; 256 eval images: 0.15 is 2.6 sigma above
    # 0.1) and its loss falls
    base = runs["base"]
    assert base["metric"] > 0.15 and base["loss_curve"][-1][1] < base["loss_curve"][0][1]
    # the applied peak LR: linear doubles it, LEGW takes sqrt(2)
    peak = {name: max(lr for _, lr in r["lr_curve"]) for name, r in runs.items()}
    assert peak["2x linear"] == pytest.approx(2 * peak["base"]) and peak["2x legw"] <= 2 ** 0.5 * 0.05 + 1e-12
    table = (tmp_path / "table.md").read_text()
    assert "| 2x legw | 128 |" in table
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_quick_autowu(tmp_path):
    run(["benchmarks/scaling.py", "--task", "image", "--quick", "--methods", "autowu_lamb"], tmp_path)
    runs = {r["run"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    autowu = runs["2x autowu_lamb"]
    assert autowu["autowu_switch_step"] is not None and autowu["autowu_gp_seconds"] > 0
    assert autowu["autowu_curve"][-1][1] == 1  # it reached the decay phase
    assert "AutoWU 2x autowu_lamb: switch at step" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "autowu.png").read_bytes()[:4] == b"\x89PNG"


def test_adversarial_quick(tmp_path):
    command = ["benchmarks/adversarial.py", "--task", "image", "--quick", "--multiple", "2", "--attack",
               "pixel_epsilon=0.1", "--jobs", "3"]
    run(command, tmp_path)
    rows = {r["mode"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == {"none", "sequential", "conadv"}
    # the attack works: every model is less accurate under it than on the clean images
    assert all(r["global_batch"] == 128 and r["adversarial_metric"] < r["metric"] for r in rows.values())
    assert "--adversarial" not in rows["none"]["command"]
    assert rows["conadv"]["command"][rows["conadv"]["command"].index("--adversarial") + 1] == "conadv"
    assert "| 2x linear + conadv | 128 |" in (tmp_path / "table.md").read_text()
    again = run(command, tmp_path)  # finished runs are not run again; their rows come back from their summaries
    assert "recipes/" not in again.stdout
    assert json.loads((tmp_path / "results.json").read_text()) == list(rows.values())


def test_overhead_quick_conadv_same_process(tmp_path):
    """--same-process: both variants in each child, twice each (A B B A), no memory column."""
    run(["benchmarks/overhead.py", "--quick", "--same-process", "--variants", "plain", "conadv"], tmp_path)
    summary = json.loads((tmp_path / "overhead.json").read_text())
    conadv = summary["variants"]["conadv"]
    assert summary["same_process"] and "peak_rss_ratio" not in conadv
    assert len(conadv["runs"]) == 2 and all(run["steps_timed"] == 2 * 10 for run in conadv["runs"])
    assert "| conadv |" in (tmp_path / "overhead.md").read_text()
    assert "(A B B A)" in (tmp_path / "overhead.md").read_text()


def test_adaptive_batch_quick(tmp_path):
    """Five 2-rank image runs on one sample budget: the adaptive ones grow, local SGD synchronises every H steps."""
    run(["benchmarks/adaptive_batch.py", "--quick", "--runs", "fixed small", "adaptive DDP", "adaptive local"],
        tmp_path)
    rows = {r["run"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert all(r["samples"] == 512 for r in rows.values())
    assert rows["fixed small"]["metric"] > 0.15  # 8 steps learn: above chance (0.1) on 256 eval images
    small, ddp, local = rows["fixed small"], rows["adaptive DDP"], rows["adaptive local"]
    assert small["initial_batch"] == small["final_batch"] == 64 and small["synchronizations"] == 8
    assert ddp["final_batch"] > ddp["initial_batch"] == 64 and ddp["optimizer_steps"] < 8
    assert ddp["synchronizations"] == ddp["optimizer_steps"]
    assert ddp["batch_size_history"] and all(b % 32 == 0 for _, b, _ in ddp["batch_size_history"])
    assert local["synchronizations"] == -(-local["optimizer_steps"] // 4)  # every 4 steps, and at the end
    assert "| adaptive local | 64 →" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "batch_size.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_resumes_a_killed_run_from_its_checkpoint_and_skips_finished_ones(tmp_path):
    """A benchmark killed mid-run continues from the run's newest complete checkpoint when the same command runs
    again, and ends where an uninterrupted run ends (the stateful LSTM: its streams' state is in the checkpoint)."""
    command = [sys.executable, "benchmarks/scaling.py", "--task", "ptb", "--quick", "--epochs", "3", "--runs",
               "base"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "runs" / "base_r0" / "checkpoint-20" / "trainer_state.json"  # the end of epoch 1 (20 steps)
    deadline = time.time() + 600
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "runs" / "base_r0" / "summary.json").exists(), "the run ended before it could be killed"

    resumed = run([*command[1:]], out)
    assert "--resume_from_checkpoint" in resumed.stdout and "checkpoint-" in resumed.stdout
    sittings = json.loads((out / "runs" / "base_r0" / "sittings.json").read_text())
    assert [s["finished"] for s in sittings] == [False, True]
    again = run([*command[1:]], out)
    assert "recipes/language_modeling_lstm.py" not in again.stdout  # finished: not run again
    # another command on the same folder is refused before it runs, and the finished run stays
    other = subprocess.run([sys.executable, *command[1:], "--epochs", "2", "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "--num_train_epochs 3 -> 2" in other.stderr and "--fresh" in other.stderr
    assert "recipes/language_modeling_lstm.py" not in other.stdout
    assert (out / "runs" / "base_r0" / "summary.json").is_file()

    straight = tmp_path / "straight"
    run([*command[1:]], straight)
    metric = [json.loads((folder / "results.json").read_text())["runs"][0]["metric"] for folder in (out, straight)]
    assert metric[0] == metric[1]

    # the table of the runs that finished, built where their folders were copied (another interpreter), running
    # nothing; a run that has not finished is named
    started = straight / "runs" / "base_r0" / "command.json"
    started.write_text(json.dumps(["/elsewhere/bin/python3", *json.loads(started.read_text())[1:]]))
    (straight / "results.json").unlink()
    table = run([*command[1:], "--runs", "base", "2x sqrt", "--table_only"], straight)
    assert "recipes/" not in table.stdout and "[2x sqrt] unfinished" in table.stdout
    rows = json.loads((straight / "results.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["base"] and rows[0]["metric"] == metric[1]
    # another sitting's rows join a table that lacks them; those of another epoch budget are refused
    joined = tmp_path / "joined"
    table = run([*command[1:], "--runs", "base", "2x sqrt", "--table_only", "--add_results",
                 str(straight / "results.json")], joined)
    assert [r["run"] for r in json.loads((joined / "results.json").read_text())["runs"]] == ["base"]
    # the log names the row that came from the other sitting as such, and only the missing one as unfinished
    assert "[base] unfinished" not in table.stdout and "[base] from --add_results" in table.stdout
    assert "[2x sqrt] unfinished: not in the table" in table.stdout
    refused = subprocess.run([sys.executable, *command[1:], "--epochs", "2", "--runs", "2x sqrt", "--table_only",
                              "--add_results", str(straight / "results.json"), "--out", str(joined)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "would not be comparable" in refused.stderr


def test_one_failed_run_stops_none_of_the_others():
    """Runs at once (``--jobs``): the runs queued behind a failed one still run, and the failure is raised at the
    end with its message."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    done = []

    def work(i):
        if i == 0:
            raise ValueError("run 0 broke")
        done.append(i)
        return i

    with pytest.raises(RuntimeError, match="1 of 4 runs failed:\nrun 0 broke"):
        scaling.run_each(work, [0, 1, 2, 3], jobs=2)
    assert sorted(done) == [1, 2, 3]
    assert scaling.run_each(work, [3, 1, 2], jobs=2) == [3, 1, 2]


def test_scaling_table_gives_adascales_step_efficiency():
    """Johnson et al.'s measure beside the paper's: the ideal T_base / S steps over the steps AdaScale took."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    def row(run, method, steps, scale):
        return {"run": run, "method": method, "global_batch": 20 * scale, "metric": 1.0, "extra_metrics": {},
                "optimizer_steps": steps, "examples_seen": 0, "wall_s": 0.0, "scale": scale}

    table = scaling.to_markdown([row("base", "base", 1600, 1), row("16x adascale", "adascale", 137, 16)],
                                scaling.TASKS["ptb"], "machine")
    assert "137 steps against the ideal T_base / S = 100: step efficiency 73%" in table


def test_the_tables_machine_line_names_each_machine_once_with_its_setting():
    """A table joining a GPU sitting's rows to this CPU's names each machine once: a run whose older sittings
    recorded the bare CPU name does not repeat the CPU beside the entry that gives its cores and threads."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    cpu = "AMD EPYC, 2 CPU cores, torch threads per run 1"
    gpu = "NVIDIA H200 (host CPU: Intel Xeon), 16 CPU cores, torch threads per run 1, 24 runs at once"
    assert scaling.machines_line(["AMD EPYC", cpu, gpu, cpu]) == f"{cpu}; {gpu}"
    assert scaling.machines_line(["AMD EPYC"]) == "AMD EPYC"


def test_scaling_table_names_autowus_switch_lr_when_the_step_after_the_switch_was_not_logged():
    """The CIFAR-10 task logs every 50 steps: AutoWU's own record of its switch LR, not an LR log at the step after
    the switch, names it (32x AutoWU + LAMB switched at step 155 and had no log at step 156). The GP's share is of
    the run's wall time over all its sittings: HF's train_runtime counts the last sitting alone."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    row = {"run": "32x autowu_lamb", "method": "autowu_lamb", "global_batch": 4096, "metric": 0.79,
           "extra_metrics": {}, "optimizer_steps": 390, "examples_seen": 0, "wall_s": 6617.0, "scale": 32,
           "lr_curve": [(step, 0.1) for step in range(50, 400, 50)], "autowu_curve": [(150, 0, 30, 1.0)],
           "autowu_switch_step": 155.0, "autowu_switch_lr": 0.021847, "autowu_gp_seconds": 1.26}
    table = scaling.to_markdown([row], scaling.TASKS["cifar10"], "machine")
    assert ("AutoWU 32x autowu_lamb: switch at step 155 of 390 (LR 0.02185); GP time 1.26 s = 0.02% of the run's "
            "wall time (6617 s)") in table


def test_an_epoch_budget_given_as_a_float_runs_the_tasks_own_command(tmp_path):
    """``--epochs 30`` (a float) and a task's ``epochs: 30`` are one run: the same command, so one resumes the other
    (a differing command is refused: see the resume test)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    task = scaling.TASKS["cifar10"]
    given, own = (scaling.recipe_command(task, 16, "legw", epochs, tmp_path, [], False) for epochs in (30.0, 30))
    assert given == own and given[given.index("--num_train_epochs") + 1] == "30"
    half = scaling.recipe_command(task, 16, "legw", 2.5, tmp_path, [], False)
    assert half[half.index("--num_train_epochs") + 1] == "2.5"


def test_cifar10_runs_every_scale_in_micro_batches_of_the_base_batch(tmp_path):
    """The CIFAR-10 grid trains S x 128 examples a step as S data-parallel workers of the base batch would: S
    micro-batches of 128, so batch norm normalises over 128 examples at every scale (the base run's statistics) and
    AdaScale's gain sees S gradients; a task without that setting keeps one micro-batch (AdaScale two)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    def split(task, multiple, method):
        cmd = scaling.recipe_command(scaling.TASKS[task], multiple, method, 1, tmp_path, [], False)
        return (int(cmd[cmd.index("--per_device_train_batch_size") + 1]),
                int(cmd[cmd.index("--gradient_accumulation_steps") + 1]))

    assert [split("cifar10", m, method) for m, method in ((1, "base"), (16, "linear"), (32, "adascale"))] == [
        (128, 1), (128, 16), (128, 32)]
    assert [split("ptb", 16, method) for method in ("linear", "adascale")] == [(320, 1), (160, 2)]


def test_micro_batch_option_splits_each_step_to_fit_memory(tmp_path):
    """``--micro_batch`` splits every scale above it into micro-batches of that many examples (Multi30k's 16x step
    in one micro-batch of 2,048 pairs grew to 17.8 GiB and was killed on the 23 GiB CPU machine); a run at or below
    it keeps one micro-batch, and a size that does not divide a run's batch is refused before anything runs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    task = scaling.with_micro_batch(scaling.TASKS["multi30k"], 256)
    assert scaling.TASKS["multi30k"].get("micro_batch") is None  # the task itself is left as it was

    def split(multiple, method):
        cmd = scaling.recipe_command(task, multiple, method, 1, tmp_path, [], False)
        return (int(cmd[cmd.index("--per_device_train_batch_size") + 1]),
                int(cmd[cmd.index("--gradient_accumulation_steps") + 1]))

    assert [split(m, method) for m, method in ((1, "base"), (8, "linear"), (16, "legw"), (16, "adascale"))] == [
        (128, 1), (256, 4), (256, 8), (256, 8)]
    with pytest.raises(SystemExit, match="--micro_batch 300 does not divide the global batch 1024"):
        scaling.recipe_command(scaling.with_micro_batch(scaling.TASKS["multi30k"], 300), 8, "linear", 1, tmp_path,
                               [], False)


def test_lm_perplexity_carries_the_state_as_one_long_forward_would():
    """``benchmarks/lm_perplexity.py``: 20-token segments with the state carried score each stream as one forward
    over the whole stream does (two streams, lengths not a multiple of the segment)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lm_perplexity
    import torch

    from helpers import tiny_lstm_lm

    model = tiny_lstm_lm().eval()
    tokens = torch.randint(0, 64, (2 * 57 + 1,), generator=torch.Generator().manual_seed(0))
    streams, targets = tokens[:114].view(2, 57), tokens[1:115].view(2, 57)
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(model(streams).logits.flatten(0, 1), targets.flatten())
    assert lm_perplexity.stateful_perplexity(model, tokens, 2, 20) == pytest.approx(math.exp(whole.item()),
                                                                                     rel=1e-5)

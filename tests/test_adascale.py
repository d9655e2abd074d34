"""AdaScale: the gain rule, progress, the schedule on progress, stopping, S=1 identity, resume and refusals."""

import math

import numpy as np
import pytest
import torch

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer, LRHistory
from hf_largebatch.algorithms.adascale import MIN_SECOND_MOMENT_SAMPLES, AdaScale, adascale_gain, row_history
from helpers import (TinyLinearClassifier, digits_dataset, flat_params, random_points, tiny_resnet,
                     use_cpu_grad_scaler)


def test_gain_rule():
    assert adascale_gain(5.0, 1.0, 1) == 1.0
    assert adascale_gain(1.0, 0.0, 8) == pytest.approx(8.0)          # pure noise: r = S
    assert adascale_gain(1e-6, 1.0, 8) == pytest.approx(1.0, abs=1e-5)  # no noise: r = 1
    assert adascale_gain(3.0, 1.0, 4) == pytest.approx((3 + 1) / (3 / 4 + 1))


def test_row_history_counts_adams_bias_correction_over_the_steps_that_touched_a_row():
    beta2 = 0.999
    history, v = torch.zeros(2, 2, 1), torch.zeros(2, 3)
    rare = (3, 40, 41, 250)
    for t in range(1, 301):
        g = torch.zeros(2, 3)
        g[0] = 1.0  # a dense row
        if t in rare:  # a rare row (a rare word's embedding)
            g[1] = float(t)
        history = row_history(history, g, beta2)
        v = beta2 * v + (1 - beta2) * g.square()  # Adam's second moment
    coverage, touches = history
    assert touches.flatten().tolist() == [300, 4]
    assert coverage[0].item() == pytest.approx(1 - beta2 ** 300, rel=1e-5)  # dense: Adam's own correction
    weights = torch.tensor([beta2 ** (300 - t) for t in rare])
    own_mean = (weights * torch.tensor(rare, dtype=torch.float32) ** 2).sum() / weights.sum()
    assert (v[1, 0] / coverage[1, 0]).item() == pytest.approx(own_mean.item(), rel=1e-4)
    # Adam's v_hat counts the 296 steps that missed the row as zeros: ~100x below the row's own second moment
    assert (v[1, 0] / (1 - beta2 ** 300)).item() < own_mean.item() / 50


def test_adamscale_preconditioner_leaves_out_rows_with_too_short_a_history(tmp_path):
    """Through a real AdamW: P is the previous step's sqrt(v / coverage) + eps; a row touched fewer than
    MIN_SECOND_MOMENT_SAMPLES times (or never) drops out (inf); nothing is measured before Adam has state."""
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.0, weight_decay=0.0)
    alg = AdaScale()
    alg._optimizer, alg._kind, alg._groups = optimizer, "eps_after", {weight: optimizer.param_groups[0]}
    touches = {0: range(1, 101), 1: range(1, MIN_SECOND_MOMENT_SAMPLES + 1), 2: range(1, MIN_SECOND_MOMENT_SAMPLES)}
    for t in range(1, 101):
        grad = torch.zeros(4, 2)
        for row, steps in touches.items():
            if t in steps:
                grad[row] = row + 1.0
        precond = alg._preconditioner(weight, grad)
        if t == 1:
            assert precond is None  # no Adam state yet
        weight.grad = grad
        optimizer.step()
        alg.on_lr_applied(None, None, None, learning_rate=0.0)  # the update ran: this step's coverage counts
    precond = alg._preconditioner(weight, torch.zeros(4, 2))
    assert precond[0].tolist() == pytest.approx([1.0 + 1e-8] * 2, rel=1e-5)  # dense: Adam's own P
    assert precond[1].tolist() == pytest.approx([2.0 + 1e-8] * 2, rel=1e-4)  # 5 touches, long ago: its own RMS
    assert torch.isinf(precond[2]).all() and torch.isinf(precond[3]).all()  # 4 touches; never


def make(output_dir, per_device=8, ga=4, base=32, epochs=2, callbacks=(), lr_scaling="adascale", eval_dataset=None,
         train_dataset=None, **extra):
    options = dict(output_dir=str(output_dir), per_device_train_batch_size=per_device,
                   gradient_accumulation_steps=ga, num_train_epochs=epochs, learning_rate=0.05, optim="sgd",
                   optim_args="momentum=0.9", lr_scheduler_type="cosine", warmup_steps=4, base_batch_size=base,
                   use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                   data_seed=0, dataloader_drop_last=True, lr_scaling=lr_scaling)
    options.update(extra)
    model = tiny_resnet()
    history = LRHistory(per_device * ga)
    trainer = LargeBatchTrainer(model=model, args=LargeBatchArguments(**options),
                                train_dataset=train_dataset or digits_dataset(256), eval_dataset=eval_dataset,
                                callbacks=[history, *callbacks])
    return trainer, model, history


def test_scale_one_is_bit_identical_to_no_scaling(tmp_path):
    a, model_a, hist_a = make(tmp_path / "a", lr_scaling="adascale")
    b, model_b, hist_b = make(tmp_path / "b", lr_scaling="none")
    a.train()
    b.train()
    assert a.scale == 1 and a.state.global_step == b.state.global_step == 16
    assert hist_a.learning_rates == hist_b.learning_rates
    np.testing.assert_array_equal(flat_params(model_a), flat_params(model_b))
    gains = [h["adascale_gain"] for h in a.state.log_history if "adascale_gain" in h]
    assert gains and set(gains) == {1.0}


def test_fp16_overflowed_steps_make_no_progress(tmp_path):
    """fp16 with its GradScaler (on CPU, see ``use_cpu_grad_scaler``), one example of inf pixels: every step the scaler
    skips (it halves its scale each time) is skipped by the statistics too, and AdaScale's progress (the
    schedule's clock and the budget) stays put there; every other step advances it by its gain."""
    data = digits_dataset(256)
    data.columns["pixel_values"] = data.columns["pixel_values"].clone()
    data.columns["pixel_values"][100] = float("inf")
    trainer, model, _ = make(tmp_path, base=8, epochs=1, train_dataset=data, fp16=True)
    use_cpu_grad_scaler(trainer)
    trainer.train()
    skipped = round(math.log2(2.0 ** 16 / trainer.accelerator.scaler.get_scale()))
    logs = [h for h in trainer.state.log_history if "adascale_gain" in h]
    increments = np.diff([0.0] + [h["progress"] for h in logs])
    # the inf step, and any fp16 overflow
    assert skipped >= 1 and trainer.algorithm("adascale").skipped_steps == skipped
    assert (increments == 0).sum() == skipped
    moved = increments > 0
    np.testing.assert_allclose(increments[moved], np.array([h["adascale_gain"] for h in logs])[moved], rtol=1e-9)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_progress_schedule_and_stopping(tmp_path):
    """S = 4: the run stops once progress reaches T_base, each step's LR is gain x schedule(floor(progress))."""
    trainer, _, history = make(tmp_path, base=8, epochs=2)  # B = 32, S = 4, T_base = 2 epochs x 32 = 64
    trainer.train()
    logs = [h for h in trainer.state.log_history if "adascale_gain" in h]
    gains = np.array([h["adascale_gain"] for h in logs])
    progress = np.array([h["progress"] for h in logs])
    steps = trainer.state.global_step
    assert trainer.state.max_steps == 64
    assert 64 / 4 <= steps < 64 and progress[-1] >= 64 > progress[-2]  # stopped by progress, not by steps
    assert np.all((gains >= 1) & (gains <= 4)) and gains.max() > 1.2
    np.testing.assert_allclose(progress, np.cumsum(gains), rtol=1e-9)

    def schedule(tau):  # HF cosine with 4 warm-up steps over T_base = 64, on progress
        if tau < 4:
            return tau / 4
        return 0.5 * (1 + math.cos(math.pi * (tau - 4) / (64 - 4)))

    before = np.concatenate([[0.0], progress[:-1]])
    expected = [g * 0.05 * schedule(math.floor(t)) for g, t in zip(gains, before)]
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-9)
    assert [h["learning_rate"] for h in logs] == history.learning_rates  # the logged LR is the applied one
    assert logs[-1]["epoch"] == pytest.approx(progress[-1] / 32)  # epochs counted on progress (base epochs)


def test_epoch_step_decay_runs_on_progress(tmp_path):
    """Zaremba's schedule under AdaScale (``lr_decay_epochs`` with a ``num_train_epochs`` budget): x0.5 once progress
    passes epoch 1 of the base run's 2 (tau = 32 of T_base = 64); the user's max_steps is theirs again afterwards."""
    trainer, _, history = make(tmp_path, base=8, epochs=2, lr_scheduler_type="constant", warmup_steps=0,
                               lr_decay_epochs=[1.0], lr_decay_factor=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "adascale_gain" in h]
    before = np.concatenate([[0.0], [h["progress"] for h in logs][:-1]])
    expected = [h["adascale_gain"] * 0.05 * (0.5 if math.floor(t) >= 32 else 1.0) for h, t in zip(logs, before)]
    assert min(before) < 32 <= max(before)  # the decay fell inside the run
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-9)
    assert trainer.state.max_steps == 64 and trainer.args.max_steps == -1


def test_evaluation_follows_progress(tmp_path):
    trainer, _, _ = make(tmp_path, base=8, epochs=2, eval_strategy="steps", eval_steps=16,
                         eval_dataset=digits_dataset(64))
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    # one evaluation per 16 base steps of progress: at 16, 32, 48 and 64
    assert len(evals) == 4
    progress_at_eval = [next(h["progress"] for h in trainer.state.log_history
                             if h.get("step") == e["step"] and "progress" in h) for e in evals]
    assert [math.floor(p / 16) for p in progress_at_eval] == [1, 2, 3, 4]


def test_resume_matches_uninterrupted(tmp_path):
    full, full_model, full_hist = make(tmp_path / "full", base=8, epochs=1, save_strategy="steps", save_steps=3)
    full.train()
    resumed, resumed_model, resumed_hist = make(tmp_path / "resumed", base=8, epochs=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == full.state.global_step
    np.testing.assert_allclose(resumed_hist.learning_rates, full_hist.learning_rates, rtol=1e-9)
    assert resumed.algorithm("adascale").progress == pytest.approx(full.algorithm("adascale").progress, rel=1e-9)
    np.testing.assert_allclose(flat_params(resumed_model), flat_params(full_model), rtol=0, atol=1e-6)


def test_adam_uses_sqrt_gain(tmp_path):
    trainer, _, history = make(tmp_path, base=8, epochs=1, optim="adamw_torch", learning_rate=1e-3,
                               optim_args=None)
    trainer.train()
    alg = trainer.algorithm("adascale")
    assert alg.adam
    assert alg.lr_factor() == pytest.approx(math.sqrt(alg.gain))


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="base_batch_size"):
        LargeBatchArguments(output_dir=str(tmp_path), lr_scaling="adascale")
    trainer, _, _ = make(tmp_path, per_device=32, ga=1, base=8, lr_scaling="adascale")
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        trainer.train()
    trainer, _, _ = make(tmp_path, base=8, lr_scaling="linear", callbacks=[AdaScale()])
    with pytest.raises(ValueError, match="lr_scaling='adascale'"):
        trainer.train()


class _Gains(__import__("transformers").TrainerCallback):
    def __init__(self, alg):
        self.alg, self.gains, self.sqr = alg, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.gains.append(self.alg.gain)
        self.sqr.append(self.alg.grad_sqr.value)


def adamscale_on_text(tmp_path, labels: str):
    """A BERT classifier whose vocabulary is mostly never seen (1000 rows, tokens 1..30 used), AdamW, S = 8."""
    from transformers import BertConfig, BertForSequenceClassification
    from helpers import DictDataset

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 31, (2048, 12), generator=g)
    y = (ids[:, 0] > 15).long() if labels == "learnable" else torch.randint(0, 2, (2048,), generator=g)
    data = DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y)
    alg = AdaScale()
    recorder = _Gains(alg)
    args = LargeBatchArguments(output_dir=str(tmp_path / labels), per_device_train_batch_size=8,
                               gradient_accumulation_steps=8, base_batch_size=8, lr_scaling="adascale",
                               max_steps=160, learning_rate=1e-3, optim="adamw_torch", use_cpu=True, report_to=[],
                               save_strategy="no", disable_tqdm=True, seed=0)
    LargeBatchTrainer(model=model, args=args, train_dataset=data, callbacks=[alg, recorder]).train()
    return recorder


def test_adamscale_statistics_follow_gradient_noise_not_unseen_embedding_rows(tmp_path):
    """Review defect 0: with the v_hat of earlier steps, unseen embedding rows gave g/eps from Adam's 6th step:
    grad_sqr jumped by ~1e10 and the gain sat at S on every text model. Now the rows never touched (970 of 1000
    here) drop out and the statistic is one quantity throughout (no jump once positive), and ||G||^2 in Adam's
    metric is far larger for a learnable task than for random labels (the gains on real text:
    test_adamscale_gain_follows_gradient_noise_on_a_text_classifier)."""
    learnable, noise = adamscale_on_text(tmp_path, "learnable"), adamscale_on_text(tmp_path, "random")
    for run in (learnable, noise):
        sqr = np.array(run.sqr)
        positive = sqr[sqr > 0]  # (floored first estimates are 0; the EMA then rises from them)
        steps = positive[1:] / positive[:-1]
        assert len(positive) > 10 and steps.max() < 1e3  # no jump of orders of magnitude (old code: 5e5 at step 6)
    assert np.mean(learnable.sqr[-10:]) > 5 * np.mean(noise.sqr[-10:])


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_run_ends_with_a_final_checkpoint_and_evaluation(tmp_path, strategy):
    """Review defect 3: AdaScale stops on progress before HF's max_steps, where DefaultFlowCallback would save and
    evaluate: the last checkpoint and evaluation were lost. Both now happen at the final step, as in a fixed run."""
    trainer, _, _ = make(tmp_path, base=8, epochs=2, save_strategy=strategy, save_steps=1000, eval_strategy=strategy,
                         eval_steps=1000, eval_dataset=digits_dataset(64))
    trainer.train()
    final = trainer.state.global_step
    assert final < trainer.state.max_steps  # stopped by progress
    assert (tmp_path / f"checkpoint-{final}").is_dir()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h][-1] == final


def test_adamscale_gain_follows_gradient_noise_on_a_text_classifier(tmp_path):
    """Review defect 0, on real text (Multi30k captions, a 4,000-row word vocabulary, most rows rare): a BERT
    classifier under AdamW at S = 8. Telling English from German captions is a strong signal while it is learned;
    random labels are pure noise. The gain must be clearly lower on the first than on the second. With the v_hat of
    earlier steps (g / eps on rows seen for the first time) and with this step's own P_t (heavy-tailed ratios
    g_i / P) both sat near S (benchmarks/adamscale_text.py; BENCHMARKS.md)."""
    import sys
    from types import SimpleNamespace

    from helpers import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import adamscale_text

    opts = SimpleNamespace(out=str(tmp_path), sentences=4000, length=24, hidden=32, base_batch=8, scale=8, steps=30,
                           lr=1e-3, seed=0, theta=None)
    language, noise = (adamscale_text.run(labels, opts)["per_step"] for labels in ("language", "random"))
    for run in (language, noise):  # no estimate before 5 steps of second-moment history: r stays 1
        assert [r["gain"] for r in run[:MIN_SECOND_MOMENT_SAMPLES]] == [1.0] * MIN_SECOND_MOMENT_SAMPLES
        assert run[MIN_SECOND_MOMENT_SAMPLES]["gain"] > 1.0
    assert language[-1]["loss"] < 0.05 < 0.6 < noise[-1]["loss"]  # one task was learned, the other not
    last = min(len(language), len(noise))
    learning, memorising = (np.mean([r["gain"] for r in run[MIN_SECOND_MOMENT_SAMPLES:last]])
                            for run in (language, noise))
    assert learning < memorising - 1.0  # measured 4.2 vs 6.3


def test_adamscale_resume_is_exact_with_rare_rows(tmp_path):
    """AdamScale's per-row history (coverage and touches) is checkpointed: resumed mid-run, with rare embedding rows
    still below and above the history threshold, the gains and weights equal the uninterrupted run's."""
    from helpers import tiny_bert_classifier, zipf_token_classification

    data = zipf_token_classification(512, 8, 300)  # rows touched from every step to a few times

    def run(out, resume=None):
        model = tiny_bert_classifier(vocab_size=300, num_labels=2)
        args = LargeBatchArguments(output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=4,
                                   base_batch_size=8, lr_scaling="adascale", max_steps=48, learning_rate=1e-3,
                                   optim="adamw_torch", use_cpu=True, report_to=[], save_strategy="steps",
                                   save_steps=40, logging_steps=1, disable_tqdm=True, seed=0, data_seed=0)
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        logs = {h["step"]: h["adascale_gain"] for h in trainer.state.log_history if "adascale_gain" in h}
        return trainer, model, logs

    full, full_model, full_gains = run(tmp_path / "full")
    checkpoint = min((tmp_path / "full").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    saved_step = int(checkpoint.name.split("-")[1])
    assert MIN_SECOND_MOMENT_SAMPLES < saved_step < full.state.global_step
    touches = full.algorithm("adascale")._rows[full_model.get_input_embeddings().weight][1].flatten()
    assert (touches < MIN_SECOND_MOMENT_SAMPLES).any() and (touches >= MIN_SECOND_MOMENT_SAMPLES).any()
    resumed, resumed_model, resumed_gains = run(tmp_path / "resumed", resume=str(checkpoint))
    later = [s for s in full_gains if s > saved_step]
    assert later and [resumed_gains[s] for s in later] == pytest.approx([full_gains[s] for s in later], rel=1e-6)
    np.testing.assert_allclose(flat_params(resumed_model), flat_params(full_model), rtol=0, atol=1e-6)


class _ScaledLossClassifier(TinyLinearClassifier):
    """The tiny classifier with its loss multiplied by ``factor``: Adam's update ignores the factor, raw gradient
    statistics grow with its square."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if "loss" in out:
            out["loss"] = out["loss"] * self.factor
        return out


def test_adamscale_measures_the_gradient_adam_preconditions_not_the_raw_one(tmp_path):
    """AdamScale's statistics are of g / P: a loss 1000x larger leaves Adam's updates, and so ||g/P||^2, the gain
    and the whole run unchanged, where raw-gradient statistics would grow 10^6-fold; and they are measured (the gain
    leaves 1 once rows have MIN_SECOND_MOMENT_SAMPLES steps of history)."""
    runs = []
    for factor in (1.0, 1000.0):
        args = LargeBatchArguments(output_dir=str(tmp_path / str(factor)), per_device_train_batch_size=8,
                                   gradient_accumulation_steps=4, max_steps=64, learning_rate=1e-2,
                                   optim="adamw_torch", weight_decay=0.0, adam_epsilon=1e-12,
                                   lr_scheduler_type="constant", base_batch_size=8, lr_scaling="adascale",
                                   use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                                   disable_tqdm=True, seed=0, max_grad_norm=0.0)
        trainer = LargeBatchTrainer(model=_ScaledLossClassifier(factor), args=args, train_dataset=random_points(512))
        trainer.train()
        runs.append([h for h in trainer.state.log_history if "adascale_gain" in h])
    small, large = runs
    measured = [h for h in small if h["step"] > MIN_SECOND_MOMENT_SAMPLES + 1]
    assert measured and max(h["adascale_gain"] for h in measured) > 1.05
    assert sum("grad_sqr" in h for h in small) >= 8  # logged once measured
    for a, b in zip(small, large):
        assert ("grad_sqr" in a) == ("grad_sqr" in b)
        if "grad_sqr" in a:
            assert b["grad_sqr"] == pytest.approx(a["grad_sqr"], rel=1e-3)
        assert b["adascale_gain"] == pytest.approx(a["adascale_gain"], rel=1e-3)


def test_saves_and_epoch_strategies_follow_progress(tmp_path):
    """README: the save cadence and the 'epoch' strategies run on progress tau (base-batch steps; a base epoch is
    256 / 8 = 32 of them), and the logged epoch is tau over it."""
    trainer, _, _ = make(tmp_path, base=8, epochs=2, save_strategy="steps", save_steps=16, eval_strategy="epoch",
                         eval_dataset=digits_dataset(64))
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "progress" in h}
    before = {step: logs.get(step - 1, {"progress": 0.0})["progress"] for step in logs}
    crossed = [step for step in sorted(logs) if math.floor(logs[step]["progress"] / 16) > before[step] // 16]
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert saved == crossed and len(saved) >= 3  # each 16 base steps of progress (64 in all), the last included
    evals = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    assert [math.floor(logs[s]["progress"] / 32) for s in evals] == [1, 2]  # one per base epoch of progress
    for h in logs.values():
        assert h["epoch"] == pytest.approx(h["progress"] / 32, rel=1e-6)

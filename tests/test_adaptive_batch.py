"""Adaptive batch sizes in one process: the tests' arithmetic, the decisions against hand-computed gradients, the
batch growing only at step boundaries with the data order of a fixed-batch run, the LR schedule and the budget in
samples, exact resume, and refusals."""

import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_largebatch import Algorithm, LargeBatchArguments, LargeBatchTrainer, LRHistory
from hf_largebatch.core.statistics import BiasCorrectedEMA
from hf_largebatch.algorithms.adaptive_batch import (AdaptiveBatch, AdaptiveBatchConfig, example_variances,
                                                    grown_accumulation, inner_product_test_batch, norm_test_batch,
                                                    orthogonality_test_batch)
from helpers import (IndexedClassifier, TinyLinearClassifier, digits_dataset, flat_params, indexed_points,
                     single_thread, tiny_resnet)

_threads = pytest.fixture(autouse=True)(single_thread)
MICRO = 8


class StepSizes(TrainerCallback):
    """Examples per optimizer step (from the model's record) and the applied LR, in order."""

    def __init__(self, model):
        self.model, self.sizes, self.start = model, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        self.sizes.append(len(self.model.seen) - self.start)
        self.start = len(self.model.seen)


def make_args(out, test="norm", extra="", **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=2,
                num_train_epochs=2, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0,
                weight_decay=0.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                seed=0, data_seed=0, dataloader_drop_last=True, adaptive_batch=test,
                adaptive_batch_args=f"max_batch_size=64,smoothing=0{extra}")
    base.update(kw)
    return LargeBatchArguments(**base)


def run(out, test="norm", extra="", callbacks=(), model=None, data=None, resume=None, **kw):
    model = model or IndexedClassifier()
    trainer = LargeBatchTrainer(model=model, args=make_args(out, test, extra, **kw),
                                train_dataset=data or indexed_points(), callbacks=list(callbacks))
    sizes = StepSizes(model) if isinstance(model, IndexedClassifier) else None
    if sizes:
        trainer.add_callback(sizes)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, sizes


# ---------------------------------------------------------------- functional core
def test_test_formulas_and_growth_rule():
    assert norm_test_batch(50.0, 0.5) == pytest.approx(200.0)
    assert inner_product_test_batch(2.0, 0.5, 0.5) == pytest.approx(2.0 / (0.25 * 0.25))
    assert orthogonality_test_batch(3.0, 0.5, 1.0) == pytest.approx(6.0)
    assert inner_product_test_batch(1.0, 0.0, 0.5) == math.inf
    # the smallest accumulation reaching the request; never shrinks; capped
    assert grown_accumulation(100.0, 2, 16, 32) == 7
    assert grown_accumulation(96.0, 2, 16, 32) == 6
    assert grown_accumulation(10.0, 4, 16, 32) == 4
    assert grown_accumulation(1e9, 4, 16, 32) == 32
    assert grown_accumulation(math.inf, 4, 16, 32) == 32


def test_example_variances_match_direct_computation():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 5)) + np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    bar = g.mean(axis=0) + 0.1
    dots, sq = g @ bar, (g * g).sum(axis=1)
    inner, orth = example_variances(dots.sum(), (dots ** 2).sum(), sq.sum(), len(g), float(bar @ bar))
    assert inner == pytest.approx(np.var(dots, ddof=1))
    perp = g - np.outer(dots / (bar @ bar), bar)
    assert orth == pytest.approx((perp * perp).sum() / (len(g) - 1))


# ---------------------------------------------------------------- decisions against hand-computed gradients
def _initial_gradients(examples, index_batches):
    """Gradients of the mean loss of each index batch, at the initial weights."""
    model = TinyLinearClassifier()
    out = []
    for idx in index_batches:
        loss = model(examples["x"][idx], examples["labels"][idx])["loss"]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).double())
    return out


def test_norm_test_decision_equals_hand_computed(tmp_path):
    eta = 0.5
    trainer, model, sizes = run(tmp_path, "norm", f",eta={eta}", max_steps=1)
    data = indexed_points().columns
    g1, g2 = _initial_gradients(data, [model.seen[:MICRO], model.seen[MICRO:2 * MICRO]])
    local = (g1 @ g1 + g2 @ g2) / 2
    reduced = ((g1 + g2) / 2) @ ((g1 + g2) / 2)
    grad_sqr, micro_var = 2 * reduced - local, 2 * (local - reduced)  # section 0 with n = 2
    requested = micro_var * MICRO / grad_sqr / eta ** 2  # tr(Sigma) / (eta^2 ||G||^2)
    alg = trainer.algorithm("adaptive_batch")
    assert alg.history[0][2] == pytest.approx(float(requested), rel=1e-5)
    assert alg.accumulation == grown_accumulation(float(requested), 2, MICRO, 8, alg.config.max_growth)


@pytest.mark.parametrize("test", ["inner_product", "augmented"])
def test_example_test_decision_equals_hand_computed(tmp_path, test):
    theta, nu, m = 0.5, 1.0, 4
    trainer, model, sizes = run(tmp_path, test, f",theta={theta},nu={nu},test_examples={m}", max_steps=1)
    data = indexed_points().columns
    first = model.seen[:MICRO]
    g1, g2 = _initial_gradients(data, [first, model.seen[MICRO:2 * MICRO]])
    bar = (g1 + g2) / 2
    per_example = torch.stack(_initial_gradients(data, [[i] for i in first[:m]]))
    dots = per_example @ bar
    sqr = float(bar @ bar)
    inner = float(dots.var(unbiased=True)) / (theta ** 2 * sqr ** 2)
    perp = per_example - torch.outer(dots / sqr, bar)
    orth = float((perp * perp).sum()) / (m - 1) / (nu ** 2 * sqr)
    expected = inner if test == "inner_product" else max(inner, orth)
    assert trainer.algorithm("adaptive_batch").history[0][2] == pytest.approx(expected, rel=1e-5)


def test_per_example_pass_leaves_training_unchanged(tmp_path):
    """With no room to grow, the augmented test's per-example pass (BatchNorm model) changes nothing."""
    runs = {}
    for test in ("none", "augmented"):
        model = tiny_resnet()
        extra = {} if test == "none" else {"adaptive_batch": test, "adaptive_batch_args": "max_batch_size=16"}
        args = make_args(tmp_path / test, max_steps=4, **extra)
        if test == "none":
            args.adaptive_batch, args.adaptive_batch_args = "none", None
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(256))
        trainer.train()
        runs[test] = (flat_params(model), [b.clone() for b in model.buffers()])
    assert np.array_equal(runs["none"][0], runs["augmented"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["none"][1], runs["augmented"][1]))


# ---------------------------------------------------------------- growth, data order, schedule, budget
def test_batch_grows_at_step_boundaries_with_the_data_order_of_a_fixed_batch_run(tmp_path):
    trainer, model, sizes = run(tmp_path / "adaptive", "norm", ",eta=0.5")
    alg = trainer.algorithm("adaptive_batch")
    assert sizes.sizes[0] == 16 and max(sizes.sizes) == 64, sizes.sizes
    assert all(s % MICRO == 0 for s in sizes.sizes)
    # only grows, except the last step of an epoch, which takes what is left (32 micro-batches per epoch)
    per_epoch, epoch_sizes, total = [], [], 0
    for s in sizes.sizes:
        epoch_sizes.append(s)
        total += s
        if total % 256 == 0:
            per_epoch.append(epoch_sizes)
            epoch_sizes = []
    assert len(per_epoch) == 2
    for steps in per_epoch:
        assert steps[:-1] == sorted(steps[:-1])
    seen = model.seen
    assert sorted(seen[:256]) == list(range(256)) and sorted(seen[256:]) == list(range(256))
    _, fixed_model, _ = run(tmp_path / "fixed", "none", adaptive_batch_args=None)
    assert seen == fixed_model.seen  # the same sampler order: a step just draws more micro-batches
    assert alg.samples_seen == 512 and trainer.state.epoch == pytest.approx(2.0)
    assert trainer.state.global_step == len(sizes.sizes) < 512 // 16

    # each step is the SGD step on the mean loss of exactly its examples
    data = indexed_points().columns
    reference = TinyLinearClassifier()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    start = 0
    for size in sizes.sizes:
        idx = seen[start:start + size]
        start += size
        opt.zero_grad()
        reference(data["x"][idx], data["labels"][idx])["loss"].backward()
        opt.step()
    np.testing.assert_allclose(flat_params(model), flat_params(reference), atol=1e-6)


def test_schedule_and_budget_count_samples(tmp_path):
    """max_steps=20 at the initial batch of 16: 320 samples; the linear decay runs on samples, the LR follows the
    batch through lr_scaling='linear' (base batch 16)."""
    history = LRHistory(16)
    trainer, model, sizes = run(tmp_path, "norm", ",eta=0.5", callbacks=[history], max_steps=20,
                                lr_scheduler_type="linear", lr_scaling="linear", base_batch_size=16)
    alg = trainer.algorithm("adaptive_batch")
    assert alg.samples_seen == 320 == sum(sizes.sizes)
    assert trainer.state.global_step == len(sizes.sizes) < 20
    before = np.cumsum([0] + sizes.sizes[:-1])
    assert sizes.sizes[-2] < max(sizes.sizes)  # the epoch's short last step has its own (linear) LR
    for t, (lr, batch, samples) in enumerate(zip(history.learning_rates, sizes.sizes, before)):
        expected = 0.1 * (batch / 16) * (1 - (samples // 16) / 20)
        assert lr == pytest.approx(expected, rel=1e-6), (t, lr, expected)


def test_epoch_step_decay_counts_samples(tmp_path):
    """lr_decay_epochs on the samples clock: x0.5 once the run has seen epoch 1 of its 2 epochs' samples (256 of
    512), however far the batch has grown by then."""
    history = LRHistory(16)
    trainer, model, sizes = run(tmp_path, "norm", ",eta=0.5", callbacks=[history], lr_decay_epochs=[1.0],
                                lr_decay_factor=0.5, lr_scaling="linear", base_batch_size=16)
    before = np.cumsum([0] + sizes.sizes[:-1])
    assert max(sizes.sizes) > 16 and before.min() < 256 <= before.max()
    expected = [0.1 * (batch / 16) * (0.5 if samples // 16 >= 16 else 1.0)
                for batch, samples in zip(sizes.sizes, before)]
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-6)


def test_resume_is_exact(tmp_path):
    full, full_model, full_sizes = run(tmp_path / "full", "norm", ",eta=0.5", save_strategy="steps", save_steps=3)
    assert full_sizes.sizes[2] > 16  # the checkpoint of step 3 holds a grown batch, mid-epoch
    resumed, resumed_model, resumed_sizes = run(tmp_path / "full", "norm", ",eta=0.5", save_strategy="steps",
                                                save_steps=3, resume=str(tmp_path / "full" / "checkpoint-3"))
    np.testing.assert_array_equal(flat_params(full_model), flat_params(resumed_model))
    assert resumed_sizes.sizes == full_sizes.sizes[3:]
    assert resumed_model.seen == full_model.seen[sum(full_sizes.sizes[:3]):]
    assert resumed.algorithm("adaptive_batch").history == full.algorithm("adaptive_batch").history
    assert resumed.algorithm("adaptive_batch").samples_seen == full.algorithm("adaptive_batch").samples_seen == 512


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw, message", [
    ({"adaptive_batch": "sometimes"}, "unknown adaptive_batch"),
    ({"adaptive_batch_args": "eta=0.1"}, "max_batch_size"),
    ({"adaptive_batch_args": "max_batch_size=64,zeta=1"}, "valid keys"),
    ({"adaptive_batch_args": "max_batch_size=64,test_examples=1"}, "test_examples"),
    ({"adaptive_batch": "none"}, "adaptive_batch_args is set"),
    ({"local_sgd_steps": -1}, "local_sgd_steps"),
])
def test_bad_options_are_refused_at_arguments(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **kw)


def test_refusals_at_train(tmp_path):
    with pytest.raises(ValueError, match="smaller than the initial global batch"):
        run(tmp_path, "norm", adaptive_batch_args="max_batch_size=8")
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        run(tmp_path, "norm", gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="save_steps a multiple of 4"):
        run(tmp_path, "none", adaptive_batch_args=None, local_sgd_steps=4, save_strategy="steps", save_steps=6)


def test_config_parses_all_keys():
    config = AdaptiveBatchConfig.from_string("max_batch_size=512,eta=0.2,theta=0.4,nu=0.9,test_examples=4,"
                                             "smoothing=0.5,test_interval=3")
    assert (config.max_batch_size, config.eta, config.theta, config.nu, config.test_examples, config.smoothing,
            config.test_interval) == (512, 0.2, 0.4, 0.9, 4, 0.5, 3)


def test_first_steps_with_a_floored_squared_norm_do_not_jump_to_the_cap():
    """Review defect: with n = 2 the first step's ||G||^2 estimate is often <= 0, floored to 0; the noise scale was
    inf and the batch (which only grows) went to max_batch_size after one step. Now: no decision without a positive
    smoothed ||G||^2, then at most max_growth (2x) per test."""
    alg = AdaptiveBatch("norm", AdaptiveBatchConfig(max_batch_size=1024))
    alg.start(2, 16, 1, 10_000)
    alg.base_batch_size = 32
    alg.update(local_sq_mean=2.0, reduced_sq=0.5, n=2)  # (2*0.5 - 2) / 1 < 0: floored
    alg._decide()
    assert math.isnan(alg.requested_batch) and alg._pending is None
    alg.update(local_sq_mean=2.0, reduced_sq=1.02, n=2)  # a tiny positive estimate: a huge request
    alg._decide()
    assert alg.requested_batch > 1024 and alg._pending == 4  # 2 -> 4 micro-batches, not 64
    assert grown_accumulation(math.inf, 2, 16, 64, 2.0) == 4 and grown_accumulation(math.nan, 2, 16, 64) == 2


@pytest.mark.parametrize("budget", [{"max_steps": 24}, {"num_train_epochs": 2}])
def test_run_ends_with_a_final_checkpoint_and_evaluation(tmp_path, budget):
    """Review defect 3: a grown batch spends the budget of samples in fewer optimizer steps than HF's ``max_steps``
    (which counts micro-batches), where DefaultFlowCallback would save and evaluate: the last checkpoint and
    evaluation were lost. Both now happen at the final step, as in a fixed-batch run."""
    model = IndexedClassifier()
    args = make_args(tmp_path, save_strategy="steps", save_steps=1000, eval_strategy="steps", eval_steps=1000,
                     **budget)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=indexed_points(),
                                eval_dataset=indexed_points(32))
    trainer.train()
    final = trainer.state.global_step
    grown = trainer.algorithm("adaptive_batch").batch_size > 2 * MICRO
    assert grown and final < trainer.state.max_steps  # grew: fewer steps
    assert (tmp_path / f"checkpoint-{final}").is_dir()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [final]


def test_local_sgd_measures_the_statistics_only_at_synchronisation_rounds(tmp_path, monkeypatch):
    """Local SGD communicates every H steps; the statistics' all-reduce must not add a collective to the steps in
    between (the adaptive test reads them only at the rounds)."""
    from hf_largebatch.core.statistics import GradientStatistics

    measure, steps_measured = GradientStatistics.measure, []

    def counting_measure(self, *args, **kwargs):
        steps_measured.append(trainer_state[0].global_step)
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(GradientStatistics, "measure", counting_measure)
    trainer_state = []

    class StateProbe(Algorithm):
        name = "state_probe"

        def on_train_begin(self, args, state, control, **kwargs):
            trainer_state.append(state)

    trainer, _, _ = run(tmp_path, "norm", callbacks=[StateProbe()], local_sgd_steps=2, max_steps=8)
    rounds = [step for step in range(trainer.state.global_step) if (step + 1) % 2 == 0]  # H = 2, 0-based steps
    assert rounds and steps_measured == rounds


def test_logged_metrics_are_the_decisions_of_each_step(tmp_path):
    """README: every log carries samples so far, the test's requested_batch, the batch_size it decided (the next
    step's) and, for the per-example tests, inner_product_var and orthogonal_var; scale is that batch over the
    initial one."""
    trainer, _, _ = run(tmp_path, "augmented")
    alg = trainer.algorithm("adaptive_batch")
    logs = [h for h in trainer.state.log_history if "batch_size" in h]
    assert len(logs) == len(alg.history) and max(h["batch_size"] for h in logs) > logs[0]["batch_size"]
    samples, in_effect = 0, 16
    for h, (seen, batch, requested) in zip(logs, alg.history):
        samples += min(in_effect, 256 - samples % 256)  # an epoch's last step takes what is left of it
        assert (h["samples"], h["batch_size"], h["requested_batch"]) == (seen, batch, requested)
        assert h["samples"] == samples
        in_effect = h["batch_size"]
        assert h["scale"] == h["batch_size"] / 16
        assert h["inner_product_var"] > 0 and h["orthogonal_var"] > 0


def test_local_sgd_logs_its_synchronisations(tmp_path):
    trainer, _, _ = run(tmp_path, "none", adaptive_batch_args=None, local_sgd_steps=4, max_steps=10)
    logs = [h for h in trainer.state.log_history if "local_sgd_syncs" in h]
    assert [h["local_sgd_syncs"] for h in logs] == [h["step"] // 4 for h in logs[:-1]] + [3]  # + the final one


@pytest.mark.parametrize("rule, warmup", [("sqrt", {}), ("legw", {"legw_base_warmup_epochs": 4 / 16})])
def test_the_lr_rule_follows_the_batch_and_tests_run_every_test_interval_steps(tmp_path, rule, warmup):
    """README: with lr_scaling the LR is the rule's at each step's batch (sqrt and LEGW after its warm-up:
    lr0 x sqrt(B_t / B0)); with test_interval=3 the test runs at every 3rd step only, so the batch can change only
    after those."""
    history = LRHistory(16)
    trainer, _, sizes = run(tmp_path, "norm", extra=",eta=0.5,test_interval=3", callbacks=[history],
                            lr_scaling=rule, base_batch_size=16, **warmup)
    alg = trainer.algorithm("adaptive_batch")
    logs = [h for h in trainer.state.log_history if "batch_size" in h]
    tested = [h["step"] for h in logs if h["step"] % 3 == 0]
    assert len(alg.history) == len(tested) and max(h["batch_size"] for h in logs) > 16
    in_effect, samples = 16, 0
    for h, lr in zip(logs, history.learning_rates):
        batch = min(in_effect, 256 - samples % 256)  # an epoch's last step takes what is left, at its own LR
        samples += batch
        ramp = min(h["step"] - 1, 4) / 4 if warmup else 1.0  # LEGW: 4 / 16 epoch = 4 steps of the initial batch
        assert lr == pytest.approx(0.1 * math.sqrt(batch / 16) * ramp, rel=1e-12)
        if h["step"] % 3:
            assert h["batch_size"] == in_effect  # no test at this step: the batch stays
        in_effect = h["batch_size"]


def test_smoothing_averages_the_tests_statistics_over_steps(tmp_path):
    """README: the test's numerator and denominator are smoothed apart (bias-corrected EMA, ``smoothing``) and the
    norm test asks for B_simple / eta^2 of the smoothed pair. With the batch capped at its start both runs train
    alike, so the smoothed run's statistics are the EMA of the unsmoothed run's per-step ones."""
    def logs(smoothing):
        trainer, _, _ = run(tmp_path / str(smoothing), "norm",
                            adaptive_batch_args=f"max_batch_size=16,eta=0.5,smoothing={smoothing}")
        return [h for h in trainer.state.log_history if "grad_var" in h]

    raw, smoothed = logs(0), logs(0.9)
    assert len(raw) == len(smoothed) > 10
    sqr, var = BiasCorrectedEMA(0.9), BiasCorrectedEMA(0.9)
    for r, s in zip(raw, smoothed):
        sqr.update(r["grad_sqr"])
        var.update(r["grad_var"])
        assert s["grad_sqr"] == pytest.approx(sqr.value, rel=1e-6, abs=1e-9)
        assert s["grad_var"] == pytest.approx(var.value, rel=1e-6)
        if s["grad_sqr"] > 0:
            assert s["requested_batch"] == pytest.approx(s["noise_scale"] / 0.5 ** 2, rel=1e-6)

"""AutoWU (ALGORITHMS.md section 3): the schedule, the GP vote on synthetic loss curves with a known minimum, a real
training run, resume in the middle of warm-up, refusals, and the same decision on 2 ranks."""

import math
import tempfile

import numpy as np
import pytest

from hf_largebatch import AutoWU, AutoWUConfig, LargeBatchArguments, LargeBatchTrainer, LRHistory
from hf_largebatch.algorithms.autowu import AutoWUController
from helpers import digits_dataset, flat_params, tiny_resnet

T, VOTE_EVERY = 1000, 20  # cap = 500 steps of warm-up


def drive(curve, noise=0.0, seed=0, **config):
    """Feed a loss curve of the step index to the controller as training would, until it switches."""
    controller = AutoWUController(AutoWUConfig(vote_every=VOTE_EVERY, **config), max_lr=1.0, total_steps=T)
    rng = np.random.default_rng(seed)
    for t in range(T):
        if not controller.in_warmup:
            break
        if controller.record(curve(t) + noise * rng.standard_normal()):
            controller.apply(controller.vote())
    return controller


# ---------------------------------------------------------------- the schedule
@pytest.mark.parametrize("decay", ["cos", "const-cos"])
def test_schedule_values(decay):
    c = AutoWUController(AutoWUConfig(min_lr=1e-4, decay=decay), max_lr=2.0, total_steps=100)
    assert c.cap == 50
    assert c.lr(0) == pytest.approx(1e-4) and c.lr(50) == pytest.approx(2.0)
    assert c.lr(20) / c.lr(19) == pytest.approx((2.0 / 1e-4) ** (1 / 50))  # exponential: a constant ratio
    c.switch_step, c.switch_lr = 30, 0.5
    assert c.lr(29) == pytest.approx(c.warmup_lr(29))
    assert c.lr(30) == pytest.approx(0.5) and c.lr(100) == pytest.approx(0.0, abs=1e-12)
    if decay == "cos":
        assert c.lr(65) == pytest.approx(0.25)  # half way through the remaining 70 steps
    else:  # constant until 80% of the run, then a cosine over the last 20 steps
        assert c.lr(79) == 0.5 and c.lr(90) == pytest.approx(0.25)


# ---------------------------------------------------------------- votes on synthetic curves
@pytest.mark.parametrize("t_min", [150, 250, 400])
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_switch_follows_a_known_minimum(t_min, noise):
    """Loss 1 + ((t - t_min)/100)^2 (+ noise of std 0.2, as large as the curve's dip over 45 steps): the switch
    comes after the minimum, within patience + 2 vote periods, at about the LR of the minimum."""
    c = drive(lambda t: 1 + ((t - t_min) / 100) ** 2, noise=noise)
    assert t_min < c.switch_step <= t_min + (3 + 2) * VOTE_EVERY
    assert c.switch_lr == pytest.approx(c.warmup_lr(t_min), rel=0.25)
    assert [v[1] for v in c.votes[-3:]] == [True, True, True]  # it switched on 3 consecutive yes-votes


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.2])
def test_never_switches_on_a_falling_curve_before_the_cap(noise):
    c = drive(lambda t: 3 * math.exp(-t / 200), noise=noise)
    assert c.switch_step == c.cap == 500
    assert c.consecutive_yes < 3
    assert c.switch_lr > c.warmup_lr(400)  # the minimum is at the end: the LR near the top of the range


def test_vote_is_deterministic_and_non_finite_losses_count_as_rises():
    curve = [1 + ((t - 100) / 60) ** 2 for t in range(200)]
    curve[150] = float("nan")
    runs = []
    for _ in range(2):
        c = AutoWUController(AutoWUConfig(vote_every=20), max_lr=1.0, total_steps=1000)
        for loss in curve:
            if c.record(loss):
                c.apply(c.vote())
        runs.append(c.votes)
        assert all(math.isfinite(x) for x in c.losses) and c.losses[150] == max(c.losses)
    assert runs[0] == runs[1]


def test_vote_on_the_same_history_does_not_depend_on_the_cap():
    """As in the reference (kakaobrain/autowu, ``Regressor.subsample_and_condition``), time is normalised by the
    number of losses so far: the same loss history gets the same votes and the same predicted minimum (in steps)
    whatever the warm-up cap, i.e. the fixed lengthscale 0.2 smooths over a fifth of the history, not of the cap."""
    rng = np.random.default_rng(0)
    curve = [1 + ((t - 120) / 80) ** 2 + 0.1 * rng.standard_normal() for t in range(200)]
    runs = []
    for total_steps in (600, 4000):  # caps 300 and 2000: both beyond the history, so no switch at the cap
        c = AutoWUController(AutoWUConfig(vote_every=20, patience=100), max_lr=1.0, total_steps=total_steps)
        for loss in curve:
            if c.record(loss):
                c.apply(c.vote())
        # (step, yes, probability, predicted step of the minimum): the LR itself depends on the cap through gamma
        runs.append([(s, y, p, math.log(lr / c.config.min_lr) / c.log_gamma) for s, y, p, lr in c.votes])
    assert len(runs[0]) == 10 and any(0.05 < p < 0.95 for _, _, p, _ in runs[0])  # some votes are undecided
    for a, b in zip(*runs):
        assert a[:2] == b[:2] and a[2] == pytest.approx(b[2], abs=1e-9) and a[3] == pytest.approx(b[3], abs=1e-6)


# ---------------------------------------------------------------- through the Trainer
def autowu_trainer(output_dir, save_steps=None, **extra):
    args = LargeBatchArguments(
        output_dir=str(output_dir), per_device_train_batch_size=32, num_train_epochs=4, learning_rate=5.0,
        optim="sgd", lr_schedule="autowu", autowu_args="vote_every=10", use_cpu=True, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=5,
        disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True, **extra)
    history = LRHistory(32)
    model = tiny_resnet()
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(), callbacks=[history])
    return trainer, model, history


def test_real_training_run_switches_and_applies_its_lr(tmp_path):
    trainer, _, history = autowu_trainer(tmp_path)
    trainer.train()
    c = trainer.algorithm("autowu").controller
    assert c.total_steps == len(history.steps) == 224 and c.cap == 112
    assert c.switch_step is not None and c.switch_step <= c.cap
    # the LR applied at every step is the controller's (0-based step index)
    np.testing.assert_allclose(history.learning_rates, [c.lr(s - 1) for s in history.steps], rtol=1e-12)
    assert history.learning_rates[c.switch_step] == pytest.approx(c.switch_lr)
    assert history.learning_rates[-1] < 0.01 * c.switch_lr  # decayed to (almost) zero
    assert np.mean(history.losses[-20:]) < 0.5 * np.mean(history.losses[:20])  # it trained
    logs = [h for h in trainer.state.log_history if "autowu_phase" in h]
    assert logs[0]["autowu_phase"] == 0 and logs[-1]["autowu_phase"] == 1
    assert logs[-1]["autowu_switch_step"] == c.switch_step
    # the LR it switched to, logged: the step after the switch is rarely a logging step
    assert logs[-1]["autowu_switch_lr"] == c.switch_lr == history.learning_rates[c.switch_step]
    assert logs[-1]["autowu_votes"] == len(c.votes)
    # README: each log carries the last vote's probability and predicted LR and the run of yes-votes so far
    voted = [h for h in logs if h["autowu_votes"] > 0]
    assert voted and "autowu_vote_probability" not in logs[0]
    for h in voted:
        so_far = c.votes[:int(h["autowu_votes"])]
        _, _, probability, predicted_lr = so_far[-1]
        assert (h["autowu_vote_probability"], h["autowu_predicted_lr"]) == (probability, predicted_lr)
        trailing = len(so_far) - max((i + 1 for i, vote in enumerate(so_far) if not vote[1]), default=0)
        assert h["autowu_consecutive_yes"] == trailing


def test_resume_in_the_middle_of_warm_up(tmp_path):
    full, full_model, full_hist = autowu_trainer(tmp_path / "full", save_steps=60)
    full.train()
    c = full.algorithm("autowu").controller
    assert 60 < c.switch_step, "checkpoint-60 must be inside the warm-up for this test to mean anything"
    resumed, resumed_model, resumed_hist = autowu_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-60"))
    r = resumed.algorithm("autowu").controller
    assert r.votes[:6] == c.votes[:6] and len(r.votes) == len(c.votes)  # the votes before the checkpoint came back
    assert (r.switch_step, r.switch_lr) == (c.switch_step, c.switch_lr)
    assert resumed_hist.steps == full_hist.steps  # LRHistory's own record came back with the checkpoint
    np.testing.assert_allclose(resumed_hist.learning_rates, full_hist.learning_rates, rtol=1e-12)
    np.testing.assert_allclose(flat_params(resumed_model), flat_params(full_model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra, message", [
    ({"autowu_args": "patiense=3"}, r"unknown or malformed entry 'patiense=3'; valid keys: min_lr"),
    ({"autowu_args": "patience=three"}, r"patience='three' is not a int"),
    ({"autowu_args": "decay=linear"}, r"decay must be one of cos, const-cos"),
    ({"learning_rate": 1e-6}, r"must be larger than min_lr"),
])
def test_refusals(extra, message):
    kwargs = {"output_dir": tempfile.mkdtemp(), "use_cpu": True, "report_to": [], "lr_schedule": "autowu",
              "learning_rate": 1.0, **extra}
    with pytest.raises(ValueError, match=message):
        LargeBatchArguments(**kwargs)


def test_autowu_callback_without_the_schedule_is_refused(tmp_path):
    args = LargeBatchArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    trainer = LargeBatchTrainer(model=tiny_resnet(), args=args, train_dataset=digits_dataset(64),
                                callbacks=[AutoWU()])
    with pytest.raises(ValueError, match="needs lr_schedule='autowu'"):
        trainer.train()


# ---------------------------------------------------------------- 2 ranks
@pytest.mark.multiprocess
def test_two_ranks_take_rank_zeros_decision(tmp_path):
    from test_multiprocess import assert_two_consistent_ranks, run_workers

    run = {"name": "autowu", "model": "resnet", "per_device": 8, "ga": 1, "steps": 64, "lr": 5.0,
           "args": {"lr_schedule": "autowu", "autowu_args": "vote_every=4"}}
    r0, r1 = (r["autowu"] for r in run_workers(tmp_path, [run]))
    assert_two_consistent_ranks(r0, r1)  # same LR every step, same weights, different data per rank
    logs = [[h for h in r["log_history"] if "autowu_phase" in h] for r in (r0, r1)]
    assert logs[0][-1]["autowu_phase"] == logs[1][-1]["autowu_phase"] == 1
    assert logs[0][-1]["autowu_switch_step"] == logs[1][-1]["autowu_switch_step"]
    # only rank 0 ran the GP: rank 1's decisions came from the broadcast
    assert logs[0][-1]["autowu_gp_seconds"] > 0 and logs[1][-1]["autowu_gp_seconds"] == 0


def test_default_vote_period_is_one_epoch_of_optimizer_steps(tmp_path):
    """README: AutoWU votes every ``vote_every`` steps, by default one epoch (digits: 1797 // 32 = 56 steps)."""
    args = LargeBatchArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=2,
                               learning_rate=1.0, optim="sgd", lr_schedule="autowu", use_cpu=True, report_to=[],
                               save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True)
    trainer = LargeBatchTrainer(model=tiny_resnet(), args=args, train_dataset=digits_dataset())
    trainer.train()
    assert trainer.algorithm("autowu").controller.vote_every == len(digits_dataset()) // 32 == 56

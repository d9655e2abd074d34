"""EXTRAP-SGD: the trainer's step equals a hand-computed extragradient step with Nesterov momentum (fresh, past
and noise directions, with and without gradient accumulation); BatchNorm moves once per micro-batch; algorithms'
gradient hooks do not see the extrapolation pass; resume is exact; bad input is refused."""

import numpy as np
import pytest
import torch
from transformers import PretrainedConfig

from hf_largebatch import Algorithm, LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.algorithms.extrapolation import noise_seed
from helpers import TinyLinearClassifier, digits_dataset, flat_params, random_points, single_thread, tiny_resnet

_threads = pytest.fixture(autouse=True)(single_thread)
LR, MOMENTUM = 0.1, 0.9


def make_args(out, mode, ga=1, steps=3, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=16 // ga, gradient_accumulation_steps=ga,
                max_steps=steps, optim="sgd", optim_args=f"momentum={MOMENTUM},nesterov=True", learning_rate=LR,
                lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, use_cpu=True, report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
                dataloader_drop_last=True, extrapolation=mode)
    base.update(kw)
    return LargeBatchArguments(**base)


def train_recording_batches(out, mode, ga, **kw):
    """Train, and record every forward's inputs and their labels (the extrapolation pass runs the same module
    first). HF pops ``labels`` before the forward under label smoothing: they are looked up by example then."""
    model = TinyLinearClassifier()
    model.config = PretrainedConfig()  # HF's Trainer reads it when label_smoothing_factor is set
    data = random_points(64)
    label_of = {tuple(x.tolist()): y for x, y in zip(data.columns["x"], data.columns["labels"])}
    seen = []

    def record(module, args, kwargs):
        x = kwargs["x"].clone()
        seen.append((x, torch.stack([label_of[tuple(row.tolist())] for row in x])))

    model.register_forward_pre_hook(record, with_kwargs=True)
    trainer = LargeBatchTrainer(model=model, args=make_args(out, mode, ga, **kw), train_dataset=data)
    trainer.train()
    return model, trainer, seen


def reference_run(mode, ga, seen, steps=3, label_smoothing=0.0):
    """EXTRAP-SGD by hand: d, x~ = x - lr d, h = mean of the micro-batch mean-loss gradients at x~, restore x,
    Nesterov SGD from x with h (torch.optim.SGD); the loss is the (label-smoothed) cross-entropy."""
    model = TinyLinearClassifier()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True)
    passes = iter(seen)
    past = None

    def grad_of(x, y):
        loss = torch.nn.functional.cross_entropy(model(x)["logits"], y, label_smoothing=label_smoothing)
        return torch.autograd.grad(loss, params)

    for step in range(steps):
        if mode == "fresh":
            direction = grad_of(*next(passes))
        elif mode == "past":
            direction = past
        else:
            generator = torch.Generator().manual_seed(noise_seed(0, step, 0))
            direction = [torch.randn(p.shape, generator=generator) for p in params]
        saved = [p.detach().clone() for p in params]
        if direction is not None:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p -= LR * d
        micro = [grad_of(*next(passes)) for _ in range(ga)]
        h = [sum(parts) / ga for parts in zip(*micro)]
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for p, g in zip(params, h):
            p.grad = g.clone()
        opt.step()
        past = [g.clone() for g in h]
    return model, opt


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("mode", ["fresh", "past", "noise"])
def test_step_equals_hand_computed_extragradient_step(tmp_path, mode, ga):
    model, trainer, seen = train_recording_batches(tmp_path, mode, ga)
    passes_per_step = ga + (mode == "fresh")
    assert len(seen) == 3 * passes_per_step
    if mode == "fresh":  # the direction comes from the step's own first micro-batch
        assert all(torch.equal(seen[s * passes_per_step][0], seen[s * passes_per_step + 1][0]) for s in range(3))
    reference, opt = reference_run(mode, ga, seen)
    np.testing.assert_allclose(flat_params(model), flat_params(reference), rtol=0, atol=1e-6)
    # the optimizer state moved once per step, with h only
    buffers = [trainer.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    for mine, theirs in zip(buffers, (opt.state[p]["momentum_buffer"] for p in reference.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_direction_uses_the_training_objective_with_label_smoothing(tmp_path):
    """The direction's loss is the training loss itself: with ``label_smoothing_factor`` the smoothed
    cross-entropy, in the extrapolation pass as in the step's own gradient."""
    model, _, seen = train_recording_batches(tmp_path, "fresh", 2, label_smoothing_factor=0.2)
    reference, _ = reference_run("fresh", 2, seen, label_smoothing=0.2)
    np.testing.assert_allclose(flat_params(model), flat_params(reference), rtol=0, atol=1e-6)


def test_direction_is_taken_in_training_mode(tmp_path):
    """A model handed over in eval mode (``from_pretrained`` returns one) and the model after each evaluation run:
    the extrapolation pass, the step's first forward, must already run in training mode (dropout on, BatchNorm on
    batch statistics), like the step's own micro-batches."""
    model = TinyLinearClassifier().eval()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    args = make_args(tmp_path, "fresh", eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=16)
    LargeBatchTrainer(model=model, args=args, train_dataset=random_points(64),
                      eval_dataset=random_points(16, seed=1)).train()
    # each step: the extrapolation pass and the micro-batch (training), then one evaluation batch
    assert modes == [True, True, False] * 3


def test_extrapolation_changes_the_trajectory(tmp_path):
    with_extrapolation, _, _ = train_recording_batches(tmp_path / "a", "fresh", 1)
    model = TinyLinearClassifier()
    LargeBatchTrainer(model=model, args=make_args(tmp_path / "b", "none"), train_dataset=random_points(64)).train()
    assert np.abs(flat_params(model) - flat_params(with_extrapolation)).max() > 1e-4


def test_batchnorm_moves_once_per_micro_batch(tmp_path):
    model = tiny_resnet()
    LargeBatchTrainer(model=model, args=make_args(tmp_path, "fresh", ga=2, steps=2, lr_scheduler_type="linear"),
                      train_dataset=digits_dataset(64)).train()
    tracked = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert tracked == {4}  # 2 steps x 2 micro-batches; the extrapolation passes left no trace


class LocalGradientCounter(Algorithm):
    name = "counter"

    def __init__(self):
        self.calls = 0

    def on_local_gradient(self, args, state, control, **kwargs):
        self.calls += 1


def test_gradient_hooks_do_not_see_the_extrapolation_pass(tmp_path):
    counter = LocalGradientCounter()
    model = TinyLinearClassifier()
    LargeBatchTrainer(model=model, args=make_args(tmp_path, "fresh", ga=2), train_dataset=random_points(64),
                      callbacks=[counter]).train()
    assert counter.calls == 3 * 2 * len(list(model.parameters()))  # steps x micro-batches x parameters


def test_resume_with_past_gradient_is_exact(tmp_path):
    def run(out, resume=None):
        model = TinyLinearClassifier()
        args = make_args(out, "past", steps=6, save_strategy="steps", save_steps=3)
        LargeBatchTrainer(model=model, args=args, train_dataset=random_points(64)).train(resume_from_checkpoint=resume)
        return flat_params(model)

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", str(tmp_path / "full" / "checkpoint-3"))
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-7)
    state = torch.load(tmp_path / "full" / "checkpoint-3" / "hf_largebatch_algorithms_rank0.pt", weights_only=True)
    assert len(state["extrapolation"]["past"]) == 2  # weight and bias of the linear layer


@pytest.mark.parametrize("kwargs, message", [
    ({"extrapolation": "extragradient"}, "unknown extrapolation"),
    ({"extrapolation_ratio": 0.0}, "extrapolation_ratio must be a finite number > 0"),
])
def test_bad_extrapolation_options_are_refused(tmp_path, kwargs, message):
    kwargs = {"extrapolation": "fresh", **kwargs}
    mode = kwargs.pop("extrapolation")
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, mode, **kwargs)


def test_extrapolation_distance_is_the_ratio_times_the_steps_lr_times_the_direction_norm(tmp_path):
    """gamma_t = extrapolation_ratio x eta_t, with eta_t this step's (decaying) LR: under 'past' the direction is
    the previous step's reduced gradient (no clipping), so the logged distance is 0.5 x lr_t x grad_norm_(t-1)."""
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(),
                                args=make_args(tmp_path, "past", steps=6, extrapolation_ratio=0.5,
                                               lr_scheduler_type="linear"),
                                train_dataset=random_points(256))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "extrapolation_distance" in entry]
    lrs = [entry["learning_rate"] for entry in logs]
    assert len(logs) == 6 and len(set(lrs)) == 6 and logs[0]["extrapolation_distance"] == 0.0
    for previous, entry in zip(logs, logs[1:]):
        expected = 0.5 * entry["learning_rate"] * previous["grad_norm"]
        assert entry["extrapolation_distance"] == pytest.approx(expected, rel=1e-5)


def test_past_direction_is_the_previous_steps_clipped_gradient(tmp_path):
    """README: 'past' extrapolates along the previous step's *clipped* gradient: with max_grad_norm below every
    step's norm, the distance is ratio x lr_t x max_grad_norm (HF logs the norm before clipping)."""
    clip = 0.05
    trainer = LargeBatchTrainer(model=TinyLinearClassifier(),
                                args=make_args(tmp_path, "past", steps=4, max_grad_norm=clip,
                                               extrapolation_ratio=0.5),
                                train_dataset=random_points(256))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "extrapolation_distance" in entry]
    assert all(entry["grad_norm"] > 2 * clip for entry in logs)  # clipping acts at every step
    for entry in logs[1:]:
        assert entry["extrapolation_distance"] == pytest.approx(0.5 * entry["learning_rate"] * clip, rel=1e-5)


def test_noise_direction_is_drawn_per_rank_and_step():
    """README: 'noise' draws per rank from (seed, step, rank): each rank extrapolates along its own draw, the same
    draw again on a resume of that step."""
    from types import SimpleNamespace

    from hf_largebatch.algorithms.extrapolation import Extrapolation

    def displacement(rank, step):
        model = TinyLinearClassifier()
        start = [p.detach().clone() for p in model.parameters()]
        alg = Extrapolation("noise", ratio=0.5)
        alg.on_train_step_begin(SimpleNamespace(seed=0, process_index=rank), SimpleNamespace(global_step=step), None,
                                model=model, local_gradient=None, scheduled_lr=0.2)
        return [(s - p.detach()) / (0.5 * 0.2) for s, p in zip(start, model.parameters())]

    for rank in (0, 1):
        generator = torch.Generator().manual_seed(noise_seed(0, 5, rank))
        for d, p in zip(displacement(rank, 5), TinyLinearClassifier().parameters()):
            torch.testing.assert_close(d, torch.randn(p.shape, generator=generator), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(displacement(0, 5)[0], displacement(1, 5)[0])
    assert not torch.allclose(displacement(0, 5)[0], displacement(0, 6)[0])

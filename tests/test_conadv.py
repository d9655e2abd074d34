"""ConAdv and sequential adversarial training: which weights the attack uses, what it may not touch, the attack's
maths and radius, the loss normalisation, resume, and bad input."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from transformers import TrainerCallback

import hf_largebatch.algorithms.conadv as conadv_module
from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.algorithms.conadv import ConAdv, ConAdvConfig, perturbation, signed_gradient_perturbation
from helpers import (ON_CUDA, conadv_batch, digits_dataset, flat_params, freeze_batchnorm_statistics, single_thread,
                     tiny_bert_classifier, tiny_gpt2_lm, tiny_resnet, token_dataset)

_threads = pytest.fixture(autouse=True)(single_thread)


def make_args(tmp_path, adversarial="conadv", adversarial_args="epsilon=0.1", **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=4,
                optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
                dataloader_drop_last=True, adversarial=adversarial, adversarial_args=adversarial_args)
    base.update(kw)
    return LargeBatchArguments(**base)


@pytest.mark.parametrize("mode", ["conadv", "sequential"])
def test_attack_uses_previous_step_weights_or_current_ones(tmp_path, monkeypatch, mode):
    attacked_with = []
    real = conadv_module.perturbation

    def recording(model, *args, **kwargs):
        attacked_with.append(flat_params(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(conadv_module, "perturbation", recording)
    weights = []

    class AtStepBegin(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            weights.append(flat_params(model))

    model = tiny_resnet()
    trainer = LargeBatchTrainer(model=model, args=make_args(tmp_path, mode), train_dataset=digits_dataset(128),
                                callbacks=[AtStepBegin()])
    trainer.train()
    assert len(weights) == 4 and len(attacked_with) == 8  # 4 steps x 2 micro-batches
    for t in range(4):
        for micro in range(2):
            used = attacked_with[2 * t + micro]
            if mode == "sequential" or t == 0:  # step 0 has no older weights than w_0
                np.testing.assert_array_equal(used, weights[t])
            else:
                np.testing.assert_array_equal(used, weights[t - 1])
                assert not np.array_equal(used, weights[t])


def test_attack_touches_no_gradient_bn_statistic_or_global_rng():
    model = tiny_resnet()  # real BatchNorm, training mode
    model.train()
    batch = dict(digits_dataset(16).columns)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    algorithm = ConAdv(ConAdvConfig(epsilon=0.1))
    batch_out, _ = conadv_batch(algorithm, model, batch, step=1)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not p.requires_grad for p in algorithm.attack_model.parameters())
    assert batch_out["pixel_values"].shape[0] == 32
    torch.testing.assert_close(batch_out["pixel_values"][:16], batch["pixel_values"], rtol=0, atol=0)


class Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, pixel_values, labels=None):
        return {"logits": pixel_values.flatten(1) @ self.weight.T}


@pytest.mark.parametrize("targeted", [False, True])
def test_one_signed_step_matches_the_hand_computed_gradient_sign(targeted):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    config = ConAdvConfig(epsilon=0.25, random_start=0.0, targeted=targeted)
    key, delta, _ = perturbation(Linear(weight), {"pixel_values": x, "labels": labels}, config,
                                 torch.Generator().manual_seed(3), shift_labels=False)
    assert key == "pixel_values"
    target = labels
    if targeted:  # the same draw the attack makes for its wrong labels, after its start-point draws
        gen = torch.Generator().manual_seed(3)
        torch.rand(6, generator=gen), torch.rand(x.shape, generator=gen, dtype=x.dtype)
        target = (labels + torch.randint(1, 3, labels.shape, generator=gen)) % 3
        assert (target != labels).all()
    # d CE / d x = W^T (softmax(Wx) - onehot(y)); the untargeted step ascends it, the targeted one descends it
    probs = torch.softmax(x.flatten(1) @ weight.T, dim=-1)
    grad = (probs - torch.nn.functional.one_hot(target, 3).double()) @ weight
    expected = 0.25 * grad.sign() * (-1 if targeted else 1)
    torch.testing.assert_close(delta.flatten(1), expected, rtol=0, atol=1e-15)


def test_pixel_epsilon_is_converted_per_channel_and_respected():
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    config = ConAdvConfig(pixel_epsilon=8 / 255, image_mean=mean, image_std=std)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(32, 3, 4, 4, generator=g)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    weight = torch.randn(5, 48, generator=g)
    _, delta, _ = perturbation(Linear(weight), {"pixel_values": x, "labels": torch.randint(0, 5, (32,))}, config,
                               torch.Generator().manual_seed(1), shift_labels=False)
    for c in range(3):
        eps = 8 / 255 / std[c]
        assert delta[:, c].abs().max() <= eps * (1 + 1e-6)
        assert delta[:, c].abs().max() >= 0.99 * eps  # the attack does move to the edge of the ball
    adv_pixels = (x + delta) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6  # still a valid image
    # 80% of the examples start from a random point of the ball: their perturbation is not just eps*sign
    on_edge = torch.isclose(delta.abs(), torch.tensor(8 / 255) / torch.tensor(std).view(1, 3, 1, 1)).flatten(1)
    assert 0.5 < (~on_edge.all(dim=1)).float().mean() <= 1.0


def test_embedding_perturbation_for_text_respects_epsilon_and_is_applied():
    model = tiny_bert_classifier()
    model.train()
    data = token_dataset(8, 12, 64, 3).columns
    algorithm = ConAdv(ConAdvConfig(epsilon=0.05))
    batch, perturbing = conadv_batch(algorithm, model, data)
    seen = []
    with perturbing as hits:  # a hook registered after ConAdv's sees what the model gets
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))
        model(**batch)
    handle.remove()
    assert hits == [True]
    clean = model.get_input_embeddings()(data["input_ids"])
    # the perturbation is added to the second half (the adversarial copy) only
    delta = seen[0][8:] - clean
    torch.testing.assert_close(seen[0][:8], clean)
    assert 0.04 < delta.abs().max() <= 0.05 + 1e-6


@pytest.mark.parametrize("mode", ["conadv", "sequential"])
@pytest.mark.parametrize("kind", ["resnet", "gpt2"])
def test_vanishing_radius_trains_like_clean_training(tmp_path, kind, mode):
    """The loss of [clean; adversarial] is normalised like the clean loss: with eps -> 0 the run is the clean run
    (per-example mean for the classifier, token-level for the LM; two micro-batches a step)."""
    make_model, data = {"resnet": (lambda: freeze_batchnorm_statistics(tiny_resnet()), digits_dataset(128)),
                        "gpt2": (tiny_gpt2_lm, token_dataset(128, 12, 64, None))}[kind]
    results = []
    for adversarial, extra in ((mode, "epsilon=1e-9"), ("none", None)):
        model = make_model()
        LargeBatchTrainer(model=model, args=make_args(tmp_path / adversarial, adversarial, extra),
                          train_dataset=data).train()
        results.append(flat_params(model))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=2e-6)
    assert not np.array_equal(results[1], flat_params(make_model()))


def test_adversarial_training_differs_from_clean_training(tmp_path):
    params = []
    for adversarial, extra in (("conadv", "epsilon=0.3"), ("none", None)):
        model = tiny_resnet()
        LargeBatchTrainer(model=model, args=make_args(tmp_path / adversarial, adversarial, extra),
                          train_dataset=digits_dataset(128)).train()
        params.append(flat_params(model))
    assert np.abs(params[0] - params[1]).max() > 1e-3


def test_resume_restores_stale_weights(tmp_path):
    def run(out, resume=None):
        model = tiny_resnet()
        args = make_args(out, max_steps=6, save_strategy="steps", save_steps=3, optim_args="momentum=0.9")
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(192))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.algorithm("conadv")

    full_model, full_adv = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    resumed_model, resumed_adv = run(tmp_path / "resumed", str(checkpoint))
    np.testing.assert_allclose(flat_params(resumed_model), flat_params(full_model), rtol=0, atol=1e-6)
    np.testing.assert_allclose(flat_params(resumed_adv.attack_model), flat_params(full_adv.attack_model),
                               rtol=0, atol=1e-6)


def test_resume_without_stale_weights_would_differ(tmp_path):
    """The resume test above can fail: a resumed run whose attack copy restarts from the current weights (what
    losing the stale weights would do) ends elsewhere."""
    model = tiny_resnet()
    args = make_args(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=3)
    LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(192)).train()
    lost = tiny_resnet()
    trainer = LargeBatchTrainer(model=lost, args=make_args(tmp_path / "lost", max_steps=6),
                                train_dataset=digits_dataset(192))
    trainer.algorithm("conadv").load_state_dict = lambda state: None  # drop the saved attack copy
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert np.abs(flat_params(lost) - flat_params(model)).max() > 1e-7


@pytest.mark.parametrize("kwargs, message", [
    ({"adversarial": "fgsm"}, "unknown adversarial"),
    ({"adversarial_args": None}, "exactly one of epsilon"),
    ({"adversarial_args": "epsilon=0.1,pixel_epsilon=0.03"}, "exactly one of epsilon"),
    ({"adversarial_args": "eps=0.1"}, "valid keys: epsilon, pixel_epsilon, relative_epsilon"),
    ({"adversarial_args": "relative_epsilon=0.1,epsilon=0.1"}, "exactly one of epsilon"),
    ({"adversarial_args": "epsilon=0.1,random_start=2"}, "probability"),
    ({"adversarial": "none", "adversarial_args": "epsilon=0.1"}, "adversarial is 'none'"),
])
def test_bad_adversarial_options_fail_at_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **kwargs)


def test_pixel_epsilon_without_normalisation_fails_before_training(tmp_path):
    model = tiny_resnet()
    before = flat_params(model)
    trainer = LargeBatchTrainer(model=model, args=make_args(tmp_path, adversarial_args="pixel_epsilon=0.03"),
                                train_dataset=digits_dataset(32))
    with pytest.raises(ValueError, match="image_std.*processing_class"):
        trainer.train()
    np.testing.assert_array_equal(flat_params(model), before)


def test_pixel_epsilon_reads_the_normalisation_of_the_image_processor(tmp_path):
    """An HF image script passes its image processor as processing_class: pixel_epsilon uses its mean and std."""
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(image_mean=[0.5], image_std=[0.25])
    trainer = LargeBatchTrainer(model=tiny_resnet(), args=make_args(tmp_path, adversarial_args="pixel_epsilon=0.03",
                                                                    max_steps=1),
                                train_dataset=digits_dataset(32), processing_class=processor)
    trainer.train()
    config = trainer.algorithm("conadv").config
    assert config.image_mean == (0.5,) and config.image_std == (0.25,)
    eps, alpha = config.radius_and_step(torch.zeros(2, 1, 4, 4))
    assert float(eps.flatten()[0]) == pytest.approx(0.03 / 0.25) and float(alpha.flatten()[0]) == pytest.approx(0.12)


def test_relative_epsilon_is_a_fraction_of_the_embeddings_rms():
    model = tiny_bert_classifier()
    config = ConAdvConfig(relative_epsilon=0.1).resolved(model)
    rms = float(model.get_input_embeddings().weight.detach().square().mean().sqrt())
    assert config.embedding_rms == pytest.approx(rms)
    data = token_dataset(16, 12, 64, 3).columns
    _, delta, _ = perturbation(model, data, config, torch.Generator().manual_seed(0), shift_labels=False)
    assert 0.99 * 0.1 * rms <= delta.abs().max() <= 0.1 * rms * (1 + 1e-4)  # float32 rounding of x + delta - x


def test_callback_mode_must_match_arguments(tmp_path):
    trainer = LargeBatchTrainer(model=tiny_resnet(), args=make_args(tmp_path, "conadv"),
                                train_dataset=digits_dataset(32),
                                callbacks=[ConAdv(ConAdvConfig(epsilon=0.1), "sequential")])
    with pytest.raises(ValueError, match="adversarial='sequential'"):
        trainer.train()


def test_signed_gradient_perturbation_clips_to_the_ball():
    x = torch.zeros(4, 3)
    eps = torch.tensor(0.1)
    delta = signed_gradient_perturbation(lambda z: (z * torch.arange(1.0, 4.0)).sum(), x, eps, torch.tensor(0.5),
                                         1.0, False, torch.Generator().manual_seed(0))
    torch.testing.assert_close(delta, torch.full((4, 3), 0.1))  # alpha > eps: clipped to the radius


def test_random_start_is_given_to_the_configured_fraction_of_examples():
    """With alpha < eps, an example attacked from x moves by exactly alpha in every coordinate; one started at a
    random point of the ball does not: the share of the latter is random_start (0.8), within 4.7 standard errors."""
    n, eps, alpha = 4000, torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)
    weight = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    delta = signed_gradient_perturbation(lambda z: (z * weight).sum(), torch.zeros(n, 3, dtype=torch.float64), eps,
                                         alpha, 0.8, False, torch.Generator().manual_seed(0))
    started = (~torch.isclose(delta, alpha * weight.sign())).any(dim=1).double().mean().item()
    assert abs(started - 0.8) < 0.03


def test_relative_epsilon_resumes_with_the_radius_of_the_run_start():
    """The RMS is read once, at the run's start: a resumed run keeps it (its embeddings have trained since), so
    the attack's radius, and the run, continue exactly."""
    start, trained = tiny_bert_classifier(seed=0), tiny_bert_classifier(seed=1)
    first = ConAdv(ConAdvConfig(relative_epsilon=0.1))
    first.on_train_begin(None, None, None, model=start)
    first.attack_model = conadv_module.attack_copy(start)  # as after a first step
    resumed = ConAdv(ConAdvConfig(relative_epsilon=0.1))
    resumed.load_state_dict(first.state_dict())
    resumed.on_train_begin(None, None, None, model=trained)
    assert resumed.config.embedding_rms == first.config.embedding_rms
    assert ConAdvConfig(relative_epsilon=0.1).resolved(trained).embedding_rms != first.config.embedding_rms


class _TwoInputs(torch.nn.Module):
    """Logits from two float inputs: only the one ConAdv is told to perturb may move."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, features, extra, labels=None):
        return {"logits": self.a(features) + self.b(extra)}


def test_input_name_chooses_the_perturbed_input():
    """README: ConAdv perturbs pixel_values / input_values / input_features, or input_ids through the embeddings,
    unless ``input_name`` names another float input."""
    g = torch.Generator().manual_seed(0)
    inputs = {"features": torch.randn(8, 4, generator=g), "extra": torch.randn(8, 4, generator=g),
              "labels": torch.randint(0, 3, (8,), generator=g)}
    for name in ("features", "extra"):
        key, delta, _ = perturbation(_TwoInputs(), inputs, ConAdvConfig(epsilon=0.1, input_name=name),
                                     torch.Generator().manual_seed(1), shift_labels=False)
        assert key == name and delta.shape == inputs[name].shape and delta.abs().max() > 0.05
    with pytest.raises(ValueError, match="input_name"):  # neither is a standard input: the user must choose
        perturbation(_TwoInputs(), inputs, ConAdvConfig(epsilon=0.1), torch.Generator(), shift_labels=False)
    with pytest.raises(KeyError, match="'missing' is not in the batch"):
        perturbation(_TwoInputs(), inputs, ConAdvConfig(epsilon=0.1, input_name="missing"), torch.Generator(),
                     shift_labels=False)


@pytest.mark.parametrize("precision, accumulation, cuda", [
    ("fp32", 2, False), ("fp32", 4, False), ("bf16", 2, False),
    pytest.param("fp32", 4, True, marks=ON_CUDA), pytest.param("bf16", 4, True, marks=ON_CUDA)])
def test_concurrent_attacks_equal_the_attacks_in_line(tmp_path, monkeypatch, precision, accumulation, cuda):
    """conadv's attacks run on a worker thread from the second step on (on CUDA: on its side stream), and every
    adversarial example, weight and logged number equals the run that attacks in line (concurrent=False). On
    CUDA both runs use deterministic kernels (``full_determinism``), so only the streams differ."""
    import threading

    real = conadv_module.perturbation

    def run(concurrent):
        deltas, threads, side_stream = [], [], []

        def recording(*args, **kwargs):
            result = real(*args, **kwargs)
            deltas.append(result[1].clone())
            threads.append(threading.current_thread().name)
            if cuda:
                side_stream.append(torch.cuda.current_stream() != torch.cuda.default_stream())
            return result

        monkeypatch.setattr(conadv_module, "perturbation", recording)
        model = tiny_resnet()
        args = make_args(tmp_path / str(concurrent), adversarial_args=f"epsilon=0.1,concurrent={concurrent}",
                         per_device_train_batch_size=16 // accumulation, gradient_accumulation_steps=accumulation,
                         bf16=precision == "bf16", max_steps=5, use_cpu=not cuda, full_determinism=cuda)
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(160))
        trainer.train()
        if cuda:  # the side stream's attacks, read on the training stream, are finished before the assertions
            torch.cuda.synchronize()
            assert side_stream == [name.startswith("conadv-attack") for name in threads]
        return [d.cpu() for d in deltas], threads, flat_params(model), trainer.state.log_history

    if cuda:  # full_determinism switches process-wide state on: the later tests get theirs back
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "0")
        restore = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                   torch.backends.cudnn.benchmark)
    try:
        deltas, threads, weights, logs = run(True)
        in_line_deltas, in_line_threads, in_line_weights, in_line_logs = run(False)
    finally:
        if cuda:
            torch.use_deterministic_algorithms(restore[0])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = restore[1:]
    assert len(deltas) == len(in_line_deltas) == 5 * accumulation
    for got, expected in zip(deltas, in_line_deltas):
        assert torch.equal(got, expected)
    np.testing.assert_array_equal(weights, in_line_weights)
    assert [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in logs] == [
        {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in in_line_logs]
    # the first step attacks in line (it makes the stale copy); every later one on the worker
    assert set(threads[:accumulation]) == {"MainThread"}
    assert all(name.startswith("conadv-attack") for name in threads[accumulation:])
    assert set(in_line_threads) == {"MainThread"}


def test_an_attack_started_on_other_tensors_is_not_used(tmp_path):
    """The trainer hands the loader's tensors on; were a micro-batch replaced between drawing and training, the
    attack started ahead is finished and discarded, and the batch attacked in line."""
    algorithm = ConAdv(ConAdvConfig(epsilon=0.1))
    model = tiny_resnet()
    model.train()
    batch = dict(digits_dataset(16).columns)
    conadv_batch(algorithm, model, batch, step=0)  # the first step: the copy, in line
    assert algorithm._autocast is not None

    args, state = SimpleNamespace(seed=0, process_index=0), SimpleNamespace(global_step=1)
    algorithm.on_micro_batches_drawn(args, state, None, micro_batches=1, examples=16, batches=[batch])
    assert len(algorithm._ahead) == 1
    started = algorithm._ahead[0][1]
    other = {k: v.clone() for k, v in batch.items()}
    assert algorithm._attack_started_ahead(0, other) is None
    assert started.done() and algorithm._ahead == []
    assert algorithm._attack_started_ahead(0, batch) is None  # nothing in flight any more
    algorithm.on_train_end(args, state, None)

"""LARS, LAMB and AdamP (hf_largebatch.optim.lars_lamb_adamp) against hand-written numpy references of ALGORITHMS.md section 7,
on tiny float64 models with 2-D weights, biases and 1-D norm weights; plus optim_args parsing and its errors."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hf_largebatch.optim.lars_lamb_adamp import LARGE_BATCH_OPTIMIZERS, LAMB, optimizer_cls_and_kwargs

pytest.importorskip("pytorch_optimizer")
from hf_largebatch.optim.lars_lamb_adamp import LARS, AdamP  # noqa: E402


class Tiny(nn.Module):
    """Linear (2-D weight + bias) -> LayerNorm (1-D norm weight + bias)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():  # not the identity init, so norm.weight differs from 1 and matters
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(self.lin(x))


class ScaleInvariant(nn.Module):
    """lin1 -> BatchNorm (lin1 scale-invariant per output channel), lin2 -> LayerNorm (lin2 scale-invariant as a
    whole layer), head: an ordinary linear layer (not scale-invariant) with a bias."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(3, 5, bias=False)
        self.bn = nn.BatchNorm1d(5, affine=False)
        self.lin2 = nn.Linear(5, 4, bias=False)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.lin2(torch.tanh(self.bn(self.lin1(x))))))


def _data(n=16, d_in=3, d_out=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randn(n, d_out, generator=g,
                                                                               dtype=torch.float64)


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls().double()


def _numpy(model):
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _step(model, opt, x, y):
    """One optimizer step; returns (params before, gradients, params after) as numpy, gradients read before
    ``step()`` (LARS overwrites ``p.grad``)."""
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    before = _numpy(model)
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
    opt.step()
    return before, grads, _numpy(model)


def _assert_params(actual, expected):
    for n in expected:
        np.testing.assert_allclose(actual[n], expected[n], rtol=1e-10, atol=1e-13, err_msg=n)


# ---------------------------------------------------------------------------------------------------- LARS
def _lars_reference(w, g, buf, lr, wd, momentum, tc):
    if w.ndim > 1:
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = tc * w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm + wd * w_norm > 0 else 1.0
        d = trust * (g + wd * w)
    else:  # bias / norm: no trust ratio, no weight decay
        trust, d = None, g
    buf = momentum * buf + d
    return w - lr * buf, buf, trust


def test_lars_matches_reference_trust_ratio_and_excludes_bias_and_norm():
    model = _model(Tiny)
    x, y = _data()
    lr, wd = 0.5, 0.01
    cls, kwargs = optimizer_cls_and_kwargs("lars", lr, wd, 0.9, 0.999, 1e-8, None)
    assert cls is LARS and kwargs["momentum"] == 0.9 and kwargs["trust_coefficient"] == 0.001
    opt = cls(model.parameters(), **kwargs)
    bufs = {n: 0.0 for n, _ in model.named_parameters()}
    for t in range(3):
        before, grads, after = _step(model, opt, x, y)
        expected = {}
        for n in before:
            expected[n], bufs[n], trust = _lars_reference(before[n], grads[n], bufs[n], lr, wd, 0.9, 0.001)
            if t == 0 and n == "lin.weight":  # first step: w0 - w1 = lr * trust * (g + wd*w0)
                w, g = before[n], grads[n]
                assert trust == pytest.approx(0.001 * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w)))
                assert 0 < trust < 0.01
                np.testing.assert_allclose((w - after[n]) / lr, trust * (g + wd * w), rtol=1e-10)
            if t == 0 and n != "lin.weight":  # bias and norm weights: plain SGD, lr * g, no decay
                np.testing.assert_allclose((before[n] - after[n]) / lr, grads[n], rtol=1e-10)
        _assert_params(after, expected)


def test_lars_zero_weight_gets_trust_one():
    model = _model(Tiny)
    with torch.no_grad():
        model.lin.weight.zero_()
    x, y = _data()
    opt = LARS(model.parameters(), lr=0.1, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    before, grads, after = _step(model, opt, x, y)
    np.testing.assert_allclose(after["lin.weight"], -0.1 * grads["lin.weight"], rtol=1e-12)


def test_lars_foreach_path_equals_per_param_path_and_overwrites_grad():
    x, y = _data()
    models = [_model(Tiny), _model(Tiny)]
    opts = [LARS(m.parameters(), lr=0.5, weight_decay=0.01, foreach=fe) for m, fe in zip(models, (True, False))]
    for _ in range(3):
        for m, o in zip(models, opts):
            _step(m, o, x, y)
    _assert_params(_numpy(models[0]), _numpy(models[1]))
    for m, o in zip(models, opts):  # documented: after step() p.grad holds the momentum buffer
        for p in m.parameters():
            assert torch.equal(p.grad, o.state[p]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------------- LAMB
def test_lamb_matches_reference_bias_correction_and_trust_ratio():
    model = _model(Tiny)
    x, y = _data()
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    cls, kwargs = optimizer_cls_and_kwargs("lamb", lr, wd, b1, b2, eps, None)
    assert cls is LAMB
    # 1-D params inside the decay group too: they must still be excluded; norm.bias in an HF-style no-decay group
    groups = [{"params": [model.lin.weight, model.lin.bias, model.norm.weight]},
              {"params": [model.norm.bias], "weight_decay": 0.0}]
    opt = cls(groups, **kwargs)
    m = {n: 0.0 for n, _ in model.named_parameters()}
    v = dict(m)
    for t in (1, 2, 3):
        before, grads, after = _step(model, opt, x, y)
        expected = {}
        for n, w in before.items():
            g = grads[n]
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            a = (m[n] / (1 - b1 ** t)) / (np.sqrt(v[n] / (1 - b2 ** t)) + eps)
            if w.ndim > 1:
                u = a + wd * w
                trust = np.linalg.norm(w) / np.linalg.norm(u)
                expected[n] = w - lr * trust * u
                # the trust ratio makes every 2-D layer move by exactly lr * ||w||
                assert np.linalg.norm(w - after[n]) == pytest.approx(lr * np.linalg.norm(w), rel=1e-10)
            else:  # plain bias-corrected Adam step, no decay, no trust ratio
                expected[n] = w - lr * a
            if t == 1 and w.ndim == 1:  # bias correction: m_hat = g, v_hat = g^2 -> a step of lr*sign(g)
                np.testing.assert_allclose((w - after[n]) / lr, np.sign(g), rtol=1e-5)
        _assert_params(after, expected)
        assert all(opt.state[p]["step"] == t for p in model.parameters())


def test_lamb_zero_weight_gets_trust_one_and_bad_hyperparameters_raise():
    model = _model(Tiny)
    with torch.no_grad():
        model.lin.weight.zero_()
    x, y = _data()
    opt = LAMB(model.parameters(), lr=0.01, eps=1e-8, weight_decay=0.1)
    before, grads, after = _step(model, opt, x, y)
    g = grads["lin.weight"]
    np.testing.assert_allclose(after["lin.weight"], -0.01 * g / (np.abs(g) + 1e-8), rtol=1e-10)
    for bad in (dict(lr=-1.0), dict(betas=(1.0, 0.999)), dict(eps=-1.0), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            LAMB(model.parameters(), **bad)


# ---------------------------------------------------------------------------------------------------- AdamP
def _adamp_projection(w, g, perturb, delta, wd_ratio, eps):
    """Heo et al. 2021 (official code): channel view first, then layer view; returns (perturb, wd, view)."""
    for view, rows in (("channel", w.shape[0]), ("layer", 1)):
        wv, gv, pv = w.reshape(rows, -1), g.reshape(rows, -1), perturb.reshape(rows, -1)
        cos = np.abs((wv * gv).sum(1)) / (np.linalg.norm(wv, axis=1) * np.linalg.norm(gv, axis=1))
        if cos.max() < delta / np.sqrt(wv.shape[1]):
            p_n = wv / (np.linalg.norm(wv, axis=1, keepdims=True) + eps)
            pv = pv - p_n * (p_n * pv).sum(1, keepdims=True)
            return pv.reshape(w.shape), wd_ratio, view
    return perturb, 1.0, None


def test_adamp_matches_reference_projection_only_for_scale_invariant_weights():
    model = _model(ScaleInvariant)
    x, y = _data(d_out=2)
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    cls, kwargs = optimizer_cls_and_kwargs("adamp", lr, wd, b1, b2, eps, None)
    assert cls is AdamP
    opt = cls(model.parameters(), **kwargs)
    # the 1-D params (norm.weight, norm.bias, head.bias) were moved to a sibling group without weight decay
    assert [(g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(wd, 3), (0.0, 3)]
    delta, wd_ratio = 0.1, 0.1  # AdamP defaults
    m = {n: 0.0 for n, _ in model.named_parameters()}
    v = dict(m)
    for t in (1, 2, 3):
        before, grads, after = _step(model, opt, x, y)
        expected, views = {}, {}
        for n, w in before.items():
            g = grads[n]
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            # eps enters as in pytorch_optimizer (added to sqrt(v) before the sqrt(1 - b2^t) rescaling)
            perturb = m[n] * np.sqrt(1 - b2 ** t) / (np.sqrt(v[n]) + eps)
            wd_factor = 0.0  # 1-D params: no weight decay
            if w.ndim > 1:
                perturb, wd_factor, views[n] = _adamp_projection(w, g, perturb, delta, wd_ratio, eps)
            expected[n] = w * (1 - lr * wd * wd_factor) - lr / (1 - b1 ** t) * perturb
        assert views == {"lin1.weight": "channel", "lin2.weight": "layer", "head.weight": None}
        _assert_params(after, expected)
        assert all(opt.state[p]["step"] == t for p in model.parameters())  # mirrored for AdamScale


def test_adamp_update_has_no_radial_component_for_scale_invariant_weights():
    """For a weight followed by normalisation the gradient is orthogonal to w, AdamP projects the update onto the
    tangent space, so (no weight decay) ||w||^2 grows at second order in lr: halving lr quarters the growth. An
    ordinary weight keeps Adam's radial component: first order, halving lr about halves the change."""
    x, y = _data(d_out=2)
    change = {}
    for lr in (1e-3, 5e-4):
        model = _model(ScaleInvariant)
        opt = AdamP(model.parameters(), lr=lr, weight_decay=0.0)
        before, grads, after = _step(model, opt, x, y)
        for n in ("lin1.weight", "lin2.weight", "head.weight"):
            w, g, d = before[n], grads[n], after[n] - before[n]
            if n != "head.weight":
                assert abs((w * g).sum()) < 1e-3 * np.linalg.norm(w) * np.linalg.norm(g)  # scale invariance
                # no radial part (up to AdamP's eps in w / (||w|| + eps)); ordinary Adam here has |cos| ~ 0.85
                assert abs((w * d).sum()) < 1e-7 * np.linalg.norm(w) * np.linalg.norm(d)
            change[n, lr] = (after[n] ** 2).sum() - (w ** 2).sum()
    for n in ("lin1.weight", "lin2.weight"):
        assert change[n, 1e-3] > 0
        assert change[n, 1e-3] / change[n, 5e-4] == pytest.approx(4.0, rel=1e-5)
    assert change["head.weight", 1e-3] / change["head.weight", 5e-4] == pytest.approx(2.0, rel=0.01)


# ------------------------------------------------------------------------------------- HF-style groups, resume
@pytest.mark.parametrize("name", LARGE_BATCH_OPTIMIZERS)
def test_hf_style_groups_and_state_dict_round_trip(name):
    x, y = _data(d_out=2)

    def build(model):
        decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n]
        no_decay = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n]
        cls, kwargs = optimizer_cls_and_kwargs(name, 0.01, 0.05, 0.9, 0.999, 1e-8, None)
        return cls([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], **kwargs)

    model = _model(ScaleInvariant)
    opt = build(model)
    for _ in range(2):
        _step(model, opt, x, y)
    model2 = copy.deepcopy(model)
    opt2 = build(model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _step(model, opt, x, y)
    _step(model2, opt2, x, y)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
    if name != "lars":  # per-parameter Adam state as AdamScale reads it
        assert all(opt2.state[p]["step"] == 3 and "exp_avg_sq" in opt2.state[p] for p in model2.parameters())


# ------------------------------------------------------------------------------------------------ optim_args
def test_default_kwargs():
    cls, kw = optimizer_cls_and_kwargs("lars", 0.1, 1e-4, 0.9, 0.999, 1e-8, None)
    assert (cls, kw) == (LARS, {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9, "trust_coefficient": 0.001})
    for name, expected_cls in (("lamb", LAMB), ("adamp", AdamP)):
        cls, kw = optimizer_cls_and_kwargs(name, 0.1, 1e-4, 0.8, 0.99, 1e-6, "")
        assert (cls, kw) == (expected_cls, {"lr": 0.1, "weight_decay": 1e-4, "betas": (0.8, 0.99), "eps": 1e-6})
    assert optimizer_cls_and_kwargs("LAMB", 0.1, 0.0, 0.9, 0.999, 1e-8, None)[0] is LAMB


def test_optim_args_parsed_to_typed_values():
    _, kw = optimizer_cls_and_kwargs("lars", 0.1, 0.0, 0.9, 0.999, 1e-8,
                                     "trust_coefficient=0.002,momentum=0.8, nesterov = true,dampening=0")
    assert kw["trust_coefficient"] == 0.002 and kw["momentum"] == 0.8 and kw["dampening"] == 0.0
    assert kw["nesterov"] is True and isinstance(kw["dampening"], float)
    _, kw = optimizer_cls_and_kwargs("adamp", 0.1, 0.0, 0.9, 0.999, 1e-8, "delta=1,wd_ratio=5e-1,nesterov=False")
    assert (kw["delta"], kw["wd_ratio"], kw["nesterov"]) == (1.0, 0.5, False)
    assert isinstance(kw["delta"], float)
    model = _model(Tiny)
    opt = AdamP(model.parameters(), **kw)  # the kwargs construct the optimizer
    assert opt.param_groups[0]["delta"] == 1.0


def test_optim_args_errors():
    args = (0.1, 0.0, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="valid keys: momentum, trust_coefficient, dampening, nesterov"):
        optimizer_cls_and_kwargs("lars", *args, "momentum=0.9,beta=3")
    with pytest.raises(ValueError, match="valid keys: delta, wd_ratio, nesterov"):
        optimizer_cls_and_kwargs("adamp", *args, "trust_coefficient=0.001")
    with pytest.raises(ValueError, match="valid keys: none"):
        optimizer_cls_and_kwargs("lamb", *args, "lr=0.1")
    with pytest.raises(ValueError, match="malformed"):
        optimizer_cls_and_kwargs("lars", *args, "momentum")
    with pytest.raises(ValueError, match="not a float"):
        optimizer_cls_and_kwargs("lars", *args, "momentum=fast")
    with pytest.raises(ValueError, match="not a bool"):
        optimizer_cls_and_kwargs("lars", *args, "nesterov=maybe")
    with pytest.raises(ValueError, match="twice"):
        optimizer_cls_and_kwargs("lars", *args, "momentum=0.9,momentum=0.8")
    with pytest.raises(ValueError, match="lars, lamb, adamp"):
        optimizer_cls_and_kwargs("sgd", *args, None)


# ---------------------------------------------------------------- through LargeBatchArguments and the Trainer
@pytest.mark.parametrize("name, cls_name", [("lars", "LARS"), ("lamb", "LAMB"), ("adamp", "AdamP")])
def test_optim_choice_through_hf_argument_parser_and_trainer(tmp_path, name, cls_name):
    from transformers import HfArgumentParser

    from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
    from helpers import digits_dataset, tiny_resnet

    extra = ["--optim_args", "trust_coefficient=0.002"] if name == "lars" else []
    (args,) = HfArgumentParser(LargeBatchArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", name, *extra, "--max_steps", "3", "--use_cpu", "--report_to",
         "none", "--weight_decay", "1e-4", "--per_device_train_batch_size", "16", "--save_strategy", "no"])
    assert args.optim == name
    model = tiny_resnet()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=digits_dataset(64))
    trainer.train()
    inner = trainer.optimizer.optimizer
    assert type(inner).__name__ == cls_name
    if name == "lars":
        assert all(g["trust_coefficient"] == 0.002 for g in inner.param_groups)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every parameter trained


def test_bad_optim_args_fail_when_the_arguments_are_built(tmp_path):
    from hf_largebatch import LargeBatchArguments

    with pytest.raises(ValueError, match=r"optim_args for optim='lars': unknown or malformed entry 'beta=1'"):
        LargeBatchArguments(output_dir=str(tmp_path), optim="lars", optim_args="beta=1", use_cpu=True, report_to=[])

"""Optimisers paired with the large-batch schedulers: LARS, LAMB and AdamP (ALGORITHMS.md section 7).

``optimizer_cls_and_kwargs(name, ...)`` returns ``(class, kwargs)`` for HF's ``Trainer(optimizer_cls_and_kwargs=...)``;
the Trainer then calls ``cls(param_groups, **kwargs)`` with its own two groups (decay, and no-decay with
``weight_decay=0``). Every class below also takes a plain parameter list.

Which implementation, and why
-----------------------------
* **LARS**: ``pytorch_optimizer.LARS`` (maintained), unchanged. Per layer
  ``trust = eta_tc*||w||/(||g|| + lambda*||w||)``, then momentum SGD on ``trust*(g + lambda*w)``,
  ``w <- w - lr*buf``: the spec. Its batched (foreach, the default) path gives the same result as its per-parameter
  path (tested). Degenerate ratios: ``trust = 1`` when ``||w|| = 0`` or when ``||g|| + lambda*||w|| = 0``; with
  ``||g|| = 0`` but ``lambda*||w|| > 0`` the formula is well defined and it gives ``eta_tc/lambda``, not the 1 a
  literal reading of "1 if a norm is 0" would give (a whole layer with an exactly zero gradient only).
  **It overwrites ``p.grad`` in place** (both paths): after ``step()`` each ``p.grad`` holds the momentum buffer,
  not the gradient. Read gradients (norms, statistics, clipping) before ``optimizer.step()``; HF's Trainer does,
  and zeroes them after.
* **LAMB**: our own ``LAMB`` below. ``pytorch_optimizer.Lamb`` departs from the spec: no bias correction of ``v``,
  ``||w||`` clamped at 10, ``eps`` added to the trust-ratio denominator and decoupled weight decay by default.
* **AdamP** (Heo et al., ICLR 2021): ``pytorch_optimizer.AdamP``, whose update is the official one (clovaai/AdamP):
  for parameters with ``ndim > 1`` the update is projected onto the tangent space of ``w`` (channel-wise first,
  else layer-wise) when ``max |cos(g, w)| < delta/sqrt(dim of the view)``, and then decoupled weight decay is
  multiplied by ``wd_ratio``. One difference of ``eps`` scale only: ``eps`` is added to ``sqrt(v)`` before the
  ``sqrt(1 - beta2^t)`` rescaling (Kingma & Ba's "eps-hat" form), where the official code adds it after. Our thin
  subclass ``AdamP`` pins the per-parameter path (``foreach=False``), keeps only AdamP's own options, applies the
  exclusion rule below, and mirrors the step count into each parameter's state (``state[p]["step"]``, as
  ``torch.optim.Adam`` keeps it) for readers of per-parameter Adam state such as AdamScale's preconditioner.

Exclusion rule (all three)
--------------------------
Parameters with ``p.ndim <= 1`` (biases, BatchNorm/LayerNorm weights and biases) get no trust ratio and no weight
decay, whatever their group's ``weight_decay``; the group's ``weight_decay`` (0 in HF's no-decay group) applies to
the others. LARS excludes them itself; LAMB in its step; AdamP by moving them into a sibling parameter group
with ``weight_decay=0`` (so an AdamP built from ``n`` groups may hold up to ``2n``; AdamP never projects them).

DeepSpeed ZeRO
--------------
Under ZeRO a client optimizer is handed flattened shards of parameters, not layers, so per-layer trust ratios
(LARS, LAMB), the ``ndim`` exclusion and AdamP's channel/layer views would be computed on the wrong tensors. The
caller refuses these optimisers under DeepSpeed; this module does not check.
"""

from __future__ import annotations

from typing import Any

import pytorch_optimizer as _po
import torch

from ..core.option_strings import option_name, parse_key_values

LARGE_BATCH_OPTIMIZERS = ("lars", "lamb", "adamp")

# Options each optimizer accepts through ``optim_args`` ("key=value,key=value"), with their types. lr, weight
# decay, betas and eps come from the training arguments (learning_rate, weight_decay, adam_beta1/2, adam_epsilon).
_OPTIM_ARGS: dict[str, dict[str, type]] = {
    "lars": {"momentum": float, "trust_coefficient": float, "dampening": float, "nesterov": bool},
    "lamb": {},
    "adamp": {"delta": float, "wd_ratio": float, "nesterov": bool},
}


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al., ICLR 2020) exactly as ALGORITHMS.md section 7 states it; ours, not ``pytorch_optimizer.Lamb``
    (which has no bias correction of ``v``, clamps ``||w||`` at 10, adds ``eps`` to the trust-ratio denominator and
    decouples weight decay by default).

    Per parameter ``w`` with gradient ``g`` at step ``t``::

        m = beta1*m + (1 - beta1)*g;  v = beta2*v + (1 - beta2)*g^2
        a = m_hat / (sqrt(v_hat) + eps)          m_hat = m/(1 - beta1^t), v_hat = v/(1 - beta2^t)
        ndim > 1:   u = a + lambda*w;  trust = ||w||/||u|| (1 if either norm is 0);  w <- w - lr*trust*u
        ndim <= 1:  w <- w - lr*a                 (plain Adam: no trust ratio, no weight decay)

    ``lambda`` is the group's ``weight_decay``. State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v),
    the names ``torch.optim.Adam`` uses.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if not lr >= 0.0:
            raise ValueError(f"LAMB: invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: invalid betas {betas}")
        if not eps >= 0.0:
            raise ValueError(f"LAMB: invalid eps {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LAMB: invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (exp_avg_sq / (1.0 - beta2 ** t)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1.0 - beta1 ** t)).div_(denom)
                if p.ndim > 1:
                    if group["weight_decay"] != 0.0:
                        update.add_(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-group["lr"])
        return loss


LARS = _po.LARS


class AdamP(_po.AdamP):
    """``pytorch_optimizer.AdamP`` (faithful to Heo et al. 2021, see the module docstring) restricted to
    AdamP's own options, on its per-parameter path, with ``ndim <= 1`` parameters moved to a sibling group with
    ``weight_decay=0`` and ``state[p]["step"]`` kept for readers of per-parameter Adam state."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False,
                 eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, weight_decouple=True,
                         fixed_decay=False, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov, eps=eps,
                         foreach=False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        tensor = lambda p: p[1] if isinstance(p, tuple) else p  # noqa: E731 - (name, param) pairs allowed
        matrices = [p for p in params if tensor(p).ndim > 1]
        vectors = [p for p in params if tensor(p).ndim <= 1]
        if not vectors or param_group.get("weight_decay", self.defaults["weight_decay"]) == 0.0:
            super().add_param_group({**param_group, "params": params})
            return
        if matrices:
            super().add_param_group({**param_group, "params": matrices})
        super().add_param_group({**param_group, "params": vectors, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["step"] = group["step"]
        return loss


def optimizer_cls_and_kwargs(name: str, learning_rate: float, weight_decay: float, adam_beta1: float,
                             adam_beta2: float, adam_epsilon: float, optim_args: str | None) -> tuple[type, dict]:
    """``(class, constructor kwargs)`` for one of ``LARGE_BATCH_OPTIMIZERS``, the kwargs built from the training
    arguments plus ``optim_args`` (HF's ``"key=value,key=value"``; the valid keys depend on the optimizer)."""
    key = option_name(name).strip().lower()
    if key not in LARGE_BATCH_OPTIMIZERS:
        raise ValueError(f"unknown large-batch optimizer {name!r}; expected one of {', '.join(LARGE_BATCH_OPTIMIZERS)}")
    extra = parse_key_values(optim_args, _OPTIM_ARGS[key], f"optim_args for optim={key!r}",
                             None if _OPTIM_ARGS[key] else
                             "none (lr, weight_decay, betas and eps come from the training arguments)")
    if key == "lars":
        return LARS, {"lr": learning_rate, "weight_decay": weight_decay, "momentum": 0.9,
                      "trust_coefficient": 0.001, **extra}
    kwargs = {"lr": learning_rate, "weight_decay": weight_decay, "betas": (adam_beta1, adam_beta2),
              "eps": adam_epsilon, **extra}
    return (LAMB if key == "lamb" else AdamP), kwargs

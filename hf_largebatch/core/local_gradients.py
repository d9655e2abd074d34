"""Gradients on one rank outside the training backward, by ``torch.autograd.grad``: no ``.grad`` is written and no
DDP/DeepSpeed gradient hook fires, so no collective runs, and the module's buffers (BatchNorm running statistics)
are put back. ``local_gradient``: of a micro-batch's loss (EXTRAP-SGD's direction); ``per_example_gradients``: of
each example's loss (the adaptive batch's inner-product and orthogonality tests)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def local_gradient(model: torch.nn.Module, params: list[torch.Tensor], loss_of) -> list[torch.Tensor]:
    """Gradient of ``loss_of()`` (a forward of ``model``, the *unwrapped* module) with respect to ``params``."""
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        grads = torch.autograd.grad(loss_of(), params, allow_unused=True)
    finally:
        if buffers:
            _restore_(buffers, saved)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def per_example_gradients(model: torch.nn.Module, params: list[torch.Tensor], forward,
                          example_losses) -> Iterator[list[torch.Tensor]]:
    """The gradient of each example's loss, one at a time: one forward of the sub-batch (``forward()`` returns the
    model's outputs; BatchNorm normalises over the sub-batch, as in training, and its buffers are put back), then
    ``example_losses(outputs)`` and one ``torch.autograd.grad`` per loss (no ``.grad`` written, no collective)."""
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:  # the buffers go back after the last backward (BatchNorm's backward still reads them)
        losses = example_losses(forward())
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            yield [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    finally:
        _restore_(buffers, saved)


@torch.no_grad()
def _restore_(tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for tensor, value in zip(tensors, saved):
        tensor.copy_(value)

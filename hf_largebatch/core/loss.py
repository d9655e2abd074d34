"""Loss normalisation that makes the gradient independent of how the global batch is split.

The objective of one optimizer step must be the same function of the global batch whether it arrives as 1 x B,
B/2 x 2 accumulation steps, 2 ranks x B/2 or 2 ranks x 2 x B/4:

* ``mean``: every micro-batch contributes its own mean loss with weight ``1 / (micro-batches per step)``; ranks
  are averaged by DDP/DeepSpeed. Exact for per-example losses (classification) with equal micro-batch sizes.
* ``tokens``: token-level cross-entropy summed over the micro-batch and divided by the number of label tokens in
  the *whole* global batch (all micro-batches, all ranks), times the world size to undo the ranks' averaging.
  Exact for language-model losses whatever the padding.

transformers 5.23 does neither for models whose ``forward`` takes ``**kwargs`` but ignores
``num_items_in_batch`` (ResNet/BERT classifiers, ...): gradients come out x grad_accum x world_size. The trainer
therefore never forwards ``num_items_in_batch`` to the model and applies one of the two rules itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_NORMALIZATIONS = ("auto", "mean", "tokens")
IGNORE_INDEX = -100


def is_token_level(labels) -> bool:
    """Integer labels with a sequence dimension are per-token targets (LM, seq2seq, token classification)."""
    return (
        isinstance(labels, torch.Tensor)
        and labels.dim() >= 2
        and not torch.is_floating_point(labels)
    )


def resolve(mode: str, labels) -> str:
    if mode == "auto":
        return "tokens" if is_token_level(labels) else "mean"
    if mode == "tokens" and not is_token_level(labels):
        got = (f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise ValueError(
            f"loss_normalization='tokens' needs integer per-token labels of shape (batch, seq_len) (got {got}). "
            "For classification or regression labels use loss_normalization='mean' (or 'auto')."
        )
    return mode


def shifts_labels(model) -> bool:
    """Whether the model's own loss predicts ``labels[t+1]`` from position ``t`` (decoder-only causal LMs).

    HF's ``Trainer._loss_shifts_labels`` reads ``model.loss_type``, which is ``None`` for classes such as
    ``GPT2LMHeadModel`` whose names do not end in ``ForCausalLM``; the auto-class mapping names them all.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return (type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            or getattr(model, "loss_type", None) == "ForCausalLM")


def count_label_tokens(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Label tokens that enter the loss (causal LMs predict token t+1 from t, so the first position never does)."""
    if shift:
        labels = labels[..., 1:]
    return labels.ne(IGNORE_INDEX).sum()


def summed_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool,
                               label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum (not mean) of the token cross-entropies, fp32, ignoring ``-100`` labels. ``label_smoothing`` eps gives
    ``(1 - eps) nll + eps mean_k(-log p_k)`` per token, the same objective as HF's ``LabelSmoother``."""
    if shift:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def logits_of(outputs, loss_first: bool = False) -> torch.Tensor:
    """The logits in a model's outputs: ``outputs["logits"]`` of a ``ModelOutput`` or dict; in a tuple the first
    entry, or the second when the model was given labels and so returns its loss first (``loss_first``)."""
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs[1 if loss_first else 0]

"""Sequence-to-sequence large-batch training: ``LargeBatchSeq2SeqTrainer`` and ``LargeBatchSeq2SeqArguments``.

``LargeBatchSeq2SeqTrainer(LargeBatchTrainer, Seq2SeqTrainer)`` trains like ``LargeBatchTrainer`` (LR scaling, the
split-invariant token loss, algorithm events) and evaluates like ``Seq2SeqTrainer`` (``predict_with_generate``,
``generation_max_length``, ``generation_num_beams``, ``generation_config``). The two parents touch disjoint methods:
``Seq2SeqTrainer`` overrides only ``__init__``, ``evaluate``, ``predict`` and ``prediction_step``, which
``LargeBatchTrainer`` leaves alone; ``LargeBatchTrainer.compute_loss`` falls back to ``Trainer.compute_loss`` in
evaluation. For encoder-decoder models labels are not shifted (``loss.shifts_labels`` is False), so the token loss
is the model's own cross-entropy, summed and divided by the label tokens of the global batch.

``LargeBatchSeq2SeqArguments(LargeBatchArguments, Seq2SeqTrainingArguments)`` composes cleanly: every field has a
default, the MRO is ``LargeBatchArguments -> Seq2SeqTrainingArguments -> TrainingArguments`` and
``LargeBatchArguments.__post_init__`` reaches ``TrainingArguments.__post_init__`` through ``super()``
(``Seq2SeqTrainingArguments`` has none); ``to_dict`` is ``Seq2SeqTrainingArguments``'s (serialises a
``GenerationConfig``). It works with ``HfArgumentParser``.

A fix over ``Seq2SeqTrainer`` (transformers 5.23): ``Seq2SeqTrainer``'s ``evaluate``/``predict`` gather predictions with
``accelerator.gather`` rather than ``gather_for_metrics`` (HF PR #27025, for ``num_return_sequences > 1``), so in
multi-process evaluation the samples that Accelerate repeats to even out the last batch reach ``compute_metrics``
(e.g. 50 eval sentences on 2 ranks x 16 give 64 predictions). With one returned sequence per input we gather with
``gather_for_metrics``, which drops them.

Predictions reach ``compute_metrics`` in evaluation order, which is not the dataset's when
``train_sampling_strategy="group_by_length"`` (transformers then also groups evaluation batches by length, in
shuffled order): pair generations with references through the labels that come with them, as
``recipes/translation.py`` does. ``label_smoothing_factor`` applies to the training loss as in ``Trainer``
(the token loss uses the same smoothed objective as HF's ``LabelSmoother``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from ..arguments import LargeBatchArguments
from .trainer import LargeBatchTrainer


@dataclass
class LargeBatchSeq2SeqArguments(LargeBatchArguments, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` (``predict_with_generate``, ``generation_max_length``, ``generation_num_beams``,
    ``generation_config``, ...) plus the large-batch options of ``LargeBatchArguments``."""


class LargeBatchSeq2SeqTrainer(LargeBatchTrainer, Seq2SeqTrainer):
    """``LargeBatchTrainer`` with ``Seq2SeqTrainer``'s generation-based evaluation and prediction."""

    def _returns_one_sequence_per_input(self) -> bool:
        gen_kwargs = getattr(self, "_gen_kwargs", None) or {}
        n = gen_kwargs.get("num_return_sequences")
        if n is None:
            config = getattr(self.model, "generation_config", None)
            n = getattr(config, "num_return_sequences", None) if config is not None else None
        return n in (None, 1)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if self._returns_one_sequence_per_input():
            gather = self.accelerator.gather_for_metrics
            if "use_gather_object" in inspect.signature(gather).parameters:
                gather = functools.partial(gather, use_gather_object=self.args.eval_use_gather_object)
            self.gather_function = gather
        return super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                       ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

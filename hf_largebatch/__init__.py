"""hf_largebatch: large-batch training for Hugging Face Transformers.

Public API::

    LargeBatchTrainer            drop-in transformers.Trainer (core/trainer.py)
    LargeBatchSeq2SeqTrainer     the same with Seq2SeqTrainer's generation-based evaluation
    LargeBatchArguments          TrainingArguments + lr_scaling / base_batch_size / legw_base_warmup_epochs / ...
    LargeBatchSeq2SeqArguments   Seq2SeqTrainingArguments + the same options
    Algorithm, Clock, MicroBatch TrainerCallback with the extra large-batch events (core/events.py), and what two
                                 of its events return
    LRHistory                    callback recording the applied LR, loss and examples seen per step (for plots)
    the algorithms               AdaScale, NoiseScaleMonitor, AutoWU (+ AutoWUConfig), ConAdv (+ ConAdvConfig),
                                 Extrapolation, AdaptiveBatch (+ AdaptiveBatchConfig), LocalSGD, GradientNoiseProbe:
                                 each built from its option, or passed in callbacks=[...]
    advise                       the batch-size advisor's probe and advice on any setup (advisor.py)
    evaluate_under_attack        metrics under ConAdv's attack
    write_summary, plot_lr_and_loss, run_recipe   what the recipes use around a run
"""

from .core import hf_private_api  # noqa: F401  first: refuses a transformers whose private API we override changed
from .algorithms import (AdaptiveBatch, AdaptiveBatchConfig, AdaScale, AutoWU, AutoWUConfig, ConAdv, ConAdvConfig,
                         Extrapolation, GradientNoiseProbe, LocalSGD, NoiseScaleMonitor)
from .advisor import advise
from .algorithms.conadv import evaluate_under_attack
from .arguments import LargeBatchArguments
from .core.backends import run_recipe
from .core.events import Algorithm, Clock, MicroBatch
from .core.seq2seq_trainer import LargeBatchSeq2SeqArguments, LargeBatchSeq2SeqTrainer
from .core.trainer import LargeBatchTrainer
from .reporting import LRHistory, plot_lr_and_loss, write_summary

__all__ = ["AdaScale", "AdaptiveBatch", "AdaptiveBatchConfig", "Algorithm", "AutoWU", "AutoWUConfig", "Clock",
           "ConAdv", "ConAdvConfig", "Extrapolation", "GradientNoiseProbe", "LargeBatchArguments",
           "LargeBatchSeq2SeqArguments", "LargeBatchSeq2SeqTrainer", "LargeBatchTrainer", "LocalSGD", "LRHistory",
           "MicroBatch", "NoiseScaleMonitor", "advise", "evaluate_under_attack", "plot_lr_and_loss", "run_recipe",
           "write_summary"]
__version__ = "0.1.0"

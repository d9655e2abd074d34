"""hf_largebatch: large-batch training for Hugging Face Transformers.

Public API::

    LargeBatchTrainer      drop-in transformers.Trainer
    LargeBatchArguments    TrainingArguments + lr_scaling / base_batch_size / legw_base_warmup_epochs / ...
    Algorithm              TrainerCallback with the extra large-batch events and checkpoint state
    LRHistory              callback recording the applied LR, loss and examples seen per step (for plots)
    AdaScale               the AdaScale / AdamScale algorithm (added for lr_scaling="adascale")
    NoiseScaleMonitor      gradient-noise-scale telemetry for any run (no LR change)
    AutoWU, AutoWUConfig   automated warm-up and decay (added for lr_schedule="autowu")
    ConAdv, ConAdvConfig   adversarial training on stale weights (added for adversarial="conadv"|"sequential")
"""

from .core import hf_private_api  # noqa: F401  first: refuses a transformers whose private API we override changed
from .algorithms.adascale import AdaScale
from .core.events import Algorithm
from .algorithms.autowu import AutoWU, AutoWUConfig
from .algorithms.conadv import ConAdv, ConAdvConfig
from .arguments import LargeBatchArguments
from .reporting import LRHistory
from .core.statistics import NoiseScaleMonitor
from .core.trainer import LargeBatchTrainer

__all__ = ["AdaScale", "Algorithm", "AutoWU", "AutoWUConfig", "ConAdv", "ConAdvConfig", "LargeBatchArguments",
           "LargeBatchTrainer", "LRHistory", "NoiseScaleMonitor"]
__version__ = "0.1.0"

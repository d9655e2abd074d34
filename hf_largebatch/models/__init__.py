"""Models packaged as Hugging Face ``PreTrainedModel`` classes.

Importing this package registers them with the Auto classes, so ``AutoConfig`` / ``AutoModelForCausalLM``
``.from_pretrained(dir)`` load a saved checkpoint (``config.json`` with ``model_type="lstm_lm"`` or
``"cifar_resnet"``) once
``hf_largebatch.models`` has been imported.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification

from .lstm_lm import PRESETS as LSTM_PRESETS
from .lstm_lm import LSTMForCausalLM, LSTMLMConfig, LSTMModel, LSTMPreTrainedModel

AutoConfig.register(LSTMLMConfig.model_type, LSTMLMConfig, exist_ok=True)
AutoModel.register(LSTMLMConfig, LSTMModel, exist_ok=True)
AutoModelForCausalLM.register(LSTMLMConfig, LSTMForCausalLM, exist_ok=True)
AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)

__all__ = ["CifarResNetConfig", "CifarResNetForImageClassification", "LSTM_PRESETS", "LSTMForCausalLM",
           "LSTMLMConfig", "LSTMModel", "LSTMPreTrainedModel"]

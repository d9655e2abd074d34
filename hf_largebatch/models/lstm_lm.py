"""An LSTM language model as a Hugging Face ``PreTrainedModel`` (Zaremba et al. 2014, "Recurrent Neural Network
Regularization").

``LSTMLMConfig`` (``model_type="lstm_lm"``) and ``LSTMForCausalLM`` follow the HF causal-LM conventions, so the
model works with ``Trainer``/``LargeBatchTrainer``, ``save_pretrained``/``from_pretrained`` and the Auto classes
(registered when ``hf_largebatch.models`` is imported):

* ``forward(input_ids, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput(loss, logits)``;
* ``labels == input_ids``: the model shifts them itself, the loss predicts ``labels[:, 1:]`` from
  ``logits[:, :-1]`` (mean over tokens whose label is not ``-100``). The class name ends in ``ForCausalLM``, so
  HF sets ``loss_type="ForCausalLM"`` and ``hf_largebatch.loss.shifts_labels`` treats it as shifting labels.

The state is carried across steps as in Zaremba's set-up when the batch names its streams: with
``stream_ids`` and ``stream_positions`` (``data.text.LMStreams``), each example starts from the final state its
stream reached at the previous position, detached (``core.carried_state``, kept in ``model.carried_state`` and
checkpointed per rank by ``LargeBatchTrainer``). Without them each example starts from a zero state (the stateless
mode). Pass ``state=(h, c)`` and ``return_state=True`` to carry it yourself (generation).

Dropout is Zaremba's: on the non-recurrent connections only, i.e. on the embeddings, between LSTM layers and on
the last layer's output before the softmax layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import ModelOutput

from ..core.carried_state import CarriedState


@strict
class LSTMLMConfig(PreTrainedConfig):
    r"""Configuration of ``LSTMForCausalLM``.

    Args:
        vocab_size: number of tokens (PTB: 10,000).
        embedding_size: width of the input embeddings.
        hidden_size: LSTM units per layer.
        num_layers: stacked LSTM layers.
        dropout: Zaremba-style dropout on the embeddings, between layers and before the output layer
            (small: 0, medium: 0.5, large: 0.65).
        init_range: every weight is drawn from U(-init_range, init_range) (Zaremba: 0.1 small, 0.05 medium,
            0.04 large).
        tie_word_embeddings: share the output layer's weight with the input embeddings (needs
            ``embedding_size == hidden_size``).

    Presets (``LSTMLMConfig.from_preset``): ``zaremba_small`` (2x200, dropout 0), ``zaremba_medium`` (2x650,
    0.5), ``zaremba_large`` (2x1500, 0.65) and ``tiny`` (1x64, a fast model for tests and quick benchmarks).
    """

    model_type = "lstm_lm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 10000
    embedding_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float | int = 0.0
    init_range: float | int = 0.1
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def validate_architecture(self):
        """Part of ``@strict``-powered validation."""
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"LSTMLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LSTMLMConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.tie_word_embeddings and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"tie_word_embeddings=True needs embedding_size == hidden_size (got {self.embedding_size} and "
                f"{self.hidden_size})"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LSTMLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown LSTM preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # Zaremba et al. 2014, table 1 (PTB): small / medium / large.
    "zaremba_small": {"embedding_size": 200, "hidden_size": 200, "num_layers": 2, "dropout": 0.0, "init_range": 0.1},
    "zaremba_medium": {"embedding_size": 650, "hidden_size": 650, "num_layers": 2, "dropout": 0.5,
                       "init_range": 0.05},
    "zaremba_large": {"embedding_size": 1500, "hidden_size": 1500, "num_layers": 2, "dropout": 0.65,
                      "init_range": 0.04},
    # Fast: one narrow layer (with a 10k vocabulary the output layer dominates the cost anyway).
    "tiny": {"embedding_size": 64, "hidden_size": 64, "num_layers": 1, "dropout": 0.0, "init_range": 0.1},
}


@dataclass
class LSTMModelOutput(ModelOutput):
    """The last layer's hidden states (before the output dropout) and the final ``(h, c)`` state."""

    last_hidden_state: torch.Tensor | None = None
    state: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class LSTMCausalLMOutput(CausalLMOutput):
    """``CausalLMOutput`` plus ``state``: the LSTM's final ``(h, c)`` when ``forward(..., return_state=True)``."""

    state: tuple[torch.Tensor, torch.Tensor] | None = None


class LSTMPreTrainedModel(PreTrainedModel):
    config_class = LSTMLMConfig
    config: LSTMLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    @torch.no_grad()
    def _init_weights(self, module):
        # Zaremba: every parameter uniform in [-init_range, init_range] (biases included).
        r = float(self.config.init_range)
        if isinstance(module, (nn.Embedding, nn.Linear, nn.LSTM)):
            for param in module.parameters(recurse=False):
                init.uniform_(param, -r, r)


class LSTMModel(LSTMPreTrainedModel):
    """Embeddings and the LSTM stack (``AutoModel``): ``LSTMModelOutput(last_hidden_state, state)``."""

    def __init__(self, config: LSTMLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_size)
        self.lstm = nn.LSTM(config.embedding_size, config.hidden_size, num_layers=config.num_layers,
                            dropout=config.dropout if config.num_layers > 1 else 0.0, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None, state_after: int | None = None,
                **kwargs) -> LSTMModelOutput:
        """``state_after``: return the state after that many tokens instead of after the last (the input is
        embedded once, so a hook on the embeddings sees ``input_ids`` whole)."""
        _check_right_padding(attention_mask)
        embedded = self.dropout(self.embed_tokens(input_ids))
        if state_after is None:
            hidden, state = self.lstm(embedded, state)
        else:
            head, state = self.lstm(embedded[:, :state_after], state)
            tail, _ = self.lstm(embedded[:, state_after:], state)
            hidden = torch.cat([head, tail], 1)
        return LSTMModelOutput(last_hidden_state=hidden, state=state)


class LSTMForCausalLM(LSTMPreTrainedModel):
    """LSTM language model with a softmax output layer; HF causal-LM conventions (labels shifted inside)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LSTMLMConfig):
        super().__init__(config)
        self.model = LSTMModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.carried_state = CarriedState()  # not a module or buffer: per rank, never broadcast or saved as weights
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_state: bool = False,
        stream_ids: torch.LongTensor | None = None,
        stream_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> LSTMCausalLMOutput:
        """``input_ids`` (batch, seq); ``labels`` as ``input_ids`` with ``-100`` where no loss is wanted (the model
        shifts them). ``attention_mask`` is accepted for right-padded batches: an LSTM reads left to right, so
        padding after the last real token cannot change the outputs at real positions (left padding would, and is
        refused). ``num_items_in_batch`` (plain HF ``Trainer`` with gradient accumulation) makes the loss a sum
        divided by it, as HF's causal-LM loss does. With ``return_state`` the output carries ``state``: the LSTM's
        final ``(h, c)``, to pass back as ``state`` for the next segment of a stream. ``stream_ids`` and
        ``stream_positions`` (batch,): carry the state per stream instead (``core.carried_state``)."""
        if stream_ids is not None:
            base = self._carried_forward(input_ids, stream_ids, stream_positions, state)
        else:
            base = self.model(input_ids, attention_mask=attention_mask, state=state)
        logits = self.lm_head(self.dropout(base.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        return LSTMCausalLMOutput(loss=loss, logits=logits, state=base.state if return_state else None)

    def _carried_forward(self, input_ids, stream_ids, stream_positions, state) -> LSTMModelOutput:
        """A stream example's forward from its stream's carried state. The example's last token is the next
        example's first (it is only a target here, HF's shifted labels): the state carried on is the one before it,
        so the next example reads it once, from there."""
        if state is not None or stream_positions is None:
            raise ValueError("stream_ids needs stream_positions and no explicit state")
        weight = self.model.lstm.weight_hh_l0
        zeros = weight.new_zeros(self.config.num_layers, input_ids.shape[0], self.config.hidden_size)
        state = self.carried_state.read(self.training, stream_ids, stream_positions, (zeros, zeros))
        base = self.model(input_ids, state=state, state_after=input_ids.shape[1] - 1)
        self.carried_state.write(self.training, stream_ids, base.state)
        return base


def _check_right_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.size(1) < 2:
        return
    # Right padding: along each row the mask never goes from 0 back to 1.
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("LSTMForCausalLM supports right padding only (padding after the last real token); "
                         "this attention_mask has padding before real tokens")

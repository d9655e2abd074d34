"""LSTM language model (Zaremba et al. 2014) on PTB / Tiny Shakespeare / your text, with ``LargeBatchTrainer``.

Reports perplexity: ``eval_perplexity = exp(eval_loss)`` in the Trainer's eval logs (every evaluation), in the
returned metrics and in ``<output_dir>/summary.json``. Exact: every example has ``seq_len`` predicted tokens, so
the example-weighted eval loss is the token mean.

Stateful by default, as Zaremba and LEGW train on PTB (truncated BPTT): the corpus is cut into B parallel streams,
B the global batch (``hf_largebatch.data.text.LMStreams``); step t's batch continues step t-1's in every stream and
the LSTM state is carried, detached, between steps and reset at each epoch's start (``core.carried_state``). With
DDP each rank owns its streams; a larger batch means more, shorter streams (S = B / B0 counts streams; the BPTT
length stays ``seq_len``). Evaluation is stateful too, over ``per_device_eval_batch_size x processes`` streams.
``--stateful False``: independent shuffled chunks, each from a zero state (costs perplexity).

Zaremba's hyper-parameters are the ``zaremba_*`` presets' defaults (each applies unless its flag is given):
Zaremba (and TF's PTB tutorial) minimise the cross-entropy *summed* over the ``seq_len`` time steps and averaged
over the batch, with SGD lr 1; the loss here (HF convention) is the *mean* over tokens, 1/seq_len of that, so the
same updates are ``--learning_rate seq_len --max_grad_norm clip/seq_len``. small: batch 20, 20 steps unrolled,
lr 20 (= 1), clip 0.25 (= 5), 13 epochs, LR x0.5 per epoch after epoch 4; medium: 35 steps, lr 35, clip 5/35,
39 epochs, x0.8 after epoch 6, dropout 0.5; large: 35 steps, lr 35, clip 10/35, 55 epochs, x1/1.15 after
epoch 14, dropout 0.65.

Examples (data from ``$HF_LARGEBATCH_DATA``, default ``../shared/data``)::

    # Zaremba small on PTB (target: validation perplexity 120.7)
    python recipes/language_modeling_lstm.py --output_dir out/ptb_small --preset zaremba_small --use_cpu

    # 16x the streams, LEGW from the base batch 20
    python recipes/language_modeling_lstm.py --output_dir out/ptb_legw --preset zaremba_small \
        --per_device_train_batch_size 320 --lr_scaling legw --base_batch_size 20 --legw_base_warmup_epochs 0.05

    # 2 processes: DDP on CPU, or DeepSpeed ZeRO-2 (on CPU without --use_cpu)
    torchrun --nproc_per_node 2 recipes/language_modeling_lstm.py ... --use_cpu
    torchrun --nproc_per_node 2 recipes/language_modeling_lstm.py ... --deepspeed recipes/configs/ds_zero2.json

    # fine-tune a saved model (its vocab.json is reused; the architecture comes from its config)
    python recipes/language_modeling_lstm.py --model_name_or_path out/ptb_small --output_dir out/ft ...

``--do_predict`` also reports ``test_perplexity`` (PTB's test split). On a busy 2-core CPU, ``OMP_NUM_THREADS=1``
is often faster than 2 threads for LSTMs.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, set_seed

from hf_largebatch import (ConAdvConfig, LargeBatchArguments, LargeBatchTrainer, evaluate_under_attack, run_recipe,
                           write_summary)
from hf_largebatch.data.text import LEVELS, Vocabulary, load_lm_corpus
from hf_largebatch.models import LSTM_PRESETS, LSTMForCausalLM, LSTMLMConfig


VOCAB_FILE = "vocab.json"
ARCHITECTURE_FLAGS = ("embedding_size", "hidden_size", "num_layers", "tie_word_embeddings")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Fine-tune this saved LSTM LM (a folder written by this recipe or save_pretrained; its "
                          f"{VOCAB_FILE} is reused). Default: a new model from --preset and the size flags."})
    preset: str = field(default="zaremba_small", metadata={
        "help": "Model size for a new model: " + "; ".join(
            f"{k}: {v['num_layers']}x{v['hidden_size']}, dropout {v['dropout']}" for k, v in LSTM_PRESETS.items()),
        "choices": list(LSTM_PRESETS)})
    embedding_size: int | None = field(default=None, metadata={"help": "Override the preset's embedding size."})
    hidden_size: int | None = field(default=None, metadata={"help": "Override the preset's LSTM units."})
    num_layers: int | None = field(default=None, metadata={"help": "Override the preset's number of layers."})
    dropout: float | None = field(default=None, metadata={
        "help": "Override the dropout (Zaremba-style: embeddings, between layers, before the output); also "
                "applies to --model_name_or_path."})
    init_range: float | None = field(default=None, metadata={"help": "Override the uniform init range."})
    tie_word_embeddings: bool | None = field(default=None, metadata={
        "help": "Tie the output layer to the embeddings (needs embedding_size == hidden_size)."})


@dataclass
class DataArguments:
    dataset: str = field(default="ptb", metadata={
        "help": "ptb | tinyshakespeare (char) | tinyshakespeare-word | a text file (split 90/10) | a folder with "
                "train.txt [valid.txt test.txt] | a datasets save_to_disk folder with a 'text' column."})
    level: str | None = field(default=None, metadata={"help": "word | char, for tinyshakespeare and paths.",
                                                      "choices": list(LEVELS)})
    seq_len: int = field(default=35, metadata={"help": "Tokens predicted per example (BPTT length)."})
    stateful: bool = field(default=True, metadata={
        "help": "Carry the LSTM state across batches in B parallel streams (truncated BPTT, B the global batch); "
                "False: shuffled independent chunks, each from a zero state."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use the first N training examples (stateful: the first N / B positions of every stream)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation examples."})
    max_vocab_size: int = field(default=10000, metadata={
        "help": "Word level: keep the most frequent words (+<unk>) of the training split."})
    lowercase: bool = field(default=False, metadata={"help": "Lower-case a path's text."})
    text_column: str = field(default="text", metadata={"help": "Text column of a datasets folder."})
    eval_adversarial_args: str | None = field(default=None, metadata={
        "help": "Also evaluate under this one-step attack on the input embeddings ('epsilon=0.01', ... as "
                "adversarial_args), on the final weights: eval_adv_perplexity. Default: the training attack when "
                "adversarial is set."})


class LanguageModelingTrainer(LargeBatchTrainer):
    """Adds ``<prefix>_perplexity = exp(<prefix>_loss)`` to every evaluation's logs (and, as the dict is the
    same object, to the metrics ``evaluate`` returns). No ``compute_metrics``: logits are never gathered."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in list(logs):
            prefix = key[: -len("_loss")]
            if key.endswith("_loss") and prefix != "train" and f"{prefix}_runtime" in logs:
                logs[f"{prefix}_perplexity"] = perplexity(logs[key])
        super().log(logs, start_time)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def build_model(model_args: ModelArguments, vocab_size: int):
    overrides = {k: getattr(model_args, k) for k in (*ARCHITECTURE_FLAGS, "dropout", "init_range")
                 if getattr(model_args, k) is not None}
    if model_args.model_name_or_path is None:
        config = LSTMLMConfig.from_preset(model_args.preset, vocab_size=vocab_size, **overrides)
        return LSTMForCausalLM(config)
    saved = AutoConfig.from_pretrained(model_args.model_name_or_path)
    fixed = (*ARCHITECTURE_FLAGS, "init_range")
    clash = [f"--{k} {overrides[k]} (the checkpoint has {getattr(saved, k)})"
             for k in fixed if k in overrides and overrides[k] != getattr(saved, k)]
    if clash:
        raise ValueError(f"--model_name_or_path takes the architecture from its config; drop {', '.join(clash)}")
    overrides = {k: v for k, v in overrides.items() if k not in fixed}  # only the dropout may change
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **overrides)
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's vocabulary has {vocab_size} tokens but {model_args.model_name_or_path} was "
                         f"trained with {model.config.vocab_size}; fine-tune on data encoded with its {VOCAB_FILE}")
    return model


#: Zaremba et al.'s training set-up per preset, in this loss's units (the docstring explains the conversion)
ZAREMBA_TRAINING = {
    "zaremba_small": {"seq_len": 20, "learning_rate": 20, "max_grad_norm": 0.25, "num_train_epochs": 13,
                      "decay_after": 4, "lr_decay_factor": 0.5},
    "zaremba_medium": {"seq_len": 35, "learning_rate": 35, "max_grad_norm": 5 / 35, "num_train_epochs": 39,
                       "decay_after": 6, "lr_decay_factor": 0.8},
    "zaremba_large": {"seq_len": 35, "learning_rate": 35, "max_grad_norm": 10 / 35, "num_train_epochs": 55,
                      "decay_after": 14, "lr_decay_factor": 1 / 1.15},
}


def with_preset_training(argv: list[str]) -> list[str]:
    """``argv`` plus the preset's Zaremba training flags that ``argv`` does not give (a new zaremba_* model)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    preset = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"),
                  next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "zaremba_small"))
    if preset not in ZAREMBA_TRAINING or "--model_name_or_path" in given:
        return argv
    setup = dict(ZAREMBA_TRAINING[preset])
    after, epochs = setup.pop("decay_after"), setup["num_train_epochs"]
    setup |= {"optim": "sgd", "lr_scheduler_type": "constant", "per_device_train_batch_size": 20,
              "per_device_eval_batch_size": 20, "lr_decay_epochs": [str(e) for e in range(after, epochs)]}
    if "--num_train_epochs" in given or "--max_steps" in given:
        setup.pop("lr_decay_epochs")  # Zaremba's milestones are for his epoch count
    extra = []
    for flag, value in setup.items():
        if f"--{flag}" not in given:
            extra += [f"--{flag}", *(value if isinstance(value, list) else [str(value)])]
    return [*argv, *extra]


def lm_datasets(corpus, data_args: DataArguments, args: LargeBatchArguments):
    """(train, validation) as stateful streams for the global batches, or as stateless chunks."""
    if not data_args.stateful:
        return (corpus.chunks("train", data_args.seq_len, data_args.max_train_samples),
                corpus.chunks("validation", data_args.seq_len, data_args.max_eval_samples))
    if args.train_sampling_strategy == "random":  # HF's default; stateful streams are read in order
        args.train_sampling_strategy = "sequential"
    train_streams = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    eval_streams = args.per_device_eval_batch_size * args.world_size

    def positions(limit, streams):
        return None if limit is None else max(limit // streams, 1)

    return (corpus.streams("train", train_streams, data_args.seq_len,
                           positions(data_args.max_train_samples, train_streams)),
            corpus.streams("validation", eval_streams, data_args.seq_len,
                           positions(data_args.max_eval_samples, eval_streams)))


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, LargeBatchArguments))
    argv = with_preset_training(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(args.seed)

    vocab = None
    if model_args.model_name_or_path is not None:
        vocab_path = os.path.join(model_args.model_name_or_path, VOCAB_FILE)
        if os.path.isfile(vocab_path):
            vocab = Vocabulary.load(vocab_path)
    eval_attack = data_args.eval_adversarial_args or args.adversarial_args
    eval_attack = ConAdvConfig.from_string(eval_attack) if eval_attack else None  # a bad option fails here
    corpus = load_lm_corpus(data_args.dataset, level=data_args.level, vocab=vocab,
                            max_vocab_size=data_args.max_vocab_size, lowercase=data_args.lowercase,
                            text_column=data_args.text_column)
    train, valid = lm_datasets(corpus, data_args, args)
    model = build_model(model_args, len(corpus.vocab))

    trainer = LanguageModelingTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        corpus.vocab.save(os.path.join(args.output_dir, VOCAB_FILE))

    metrics = dict(train_result.metrics)
    metrics.update(trainer.evaluate())
    if eval_attack is not None:
        metrics.update(evaluate_under_attack(trainer, valid, eval_attack))
    if args.do_predict and "test" in corpus.splits:
        test = (corpus.streams("test", valid.num_streams, data_args.seq_len) if data_args.stateful
                else corpus.chunks("test", data_args.seq_len))
        metrics.update(trainer.evaluate(test, metric_key_prefix="test"))

    summary = write_summary(
        trainer, metrics, os.path.join(args.output_dir, "summary.json"), task="language_modeling",
        dataset=corpus.name, metric_name="eval_perplexity", seq_len=data_args.seq_len, stateful=data_args.stateful,
        train_examples=len(train), eval_examples=len(valid), vocab_size=len(corpus.vocab),
        model=model.config.to_diff_dict() | {"model_type": model.config.model_type},
        num_parameters=sum(p.numel() for p in model.parameters()),
        model_name_or_path=model_args.model_name_or_path,
    )
    if trainer.is_world_process_zero():
        print(f"eval_perplexity = {metrics['eval_perplexity']:.3f} (eval_loss {metrics['eval_loss']:.4f}, "
              f"{corpus.name}, global batch {trainer.global_batch_size}, {trainer.state.global_step} steps)")
    return summary


if __name__ == "__main__":
    run_recipe(main, sys.argv[1:])

#!/usr/bin/env python
"""Machine translation (Multi30k en->de) with a small Transformer encoder-decoder and ``LargeBatchSeq2SeqTrainer``.

Data: Multi30k Task 1 from ``$HF_LARGEBATCH_DATA/multi30k`` (offline; ``hf_largebatch/data/translation.py``):
29,000 training pairs, validation ``val`` (1,014), test ``test_2016_flickr`` (1,000). Tokenizer: a shared BPE
vocabulary (``--vocab_size``, default 8000) trained here on both sides of the training split and saved to
``--output_dir`` (or ``--tokenizer_name DIR`` to reuse a saved one). Model: a fresh ``MarianMTModel`` from
``--preset`` (``tiny``: d_model 128, 2+2 layers, 4 heads, FFN 256; ``small``: d_model 256, 3+3 layers, 4 heads,
FFN 512; shared, tied embeddings), or ``--model_name_or_path DIR`` to fine-tune a saved seq2seq model with the
tokenizer saved beside it (any ``AutoModelForSeq2SeqLM``, e.g. a folder this recipe wrote).

Metric: BLEU (``sacrebleu.corpus_bleu``, default 13a tokenisation) of the detokenised generations (greedy, or beam
search with ``--generation_num_beams``) against the raw reference sentences: ``eval_bleu`` in the Trainer's eval
logs (every evaluation), in ``<output_dir>/summary.json`` and printed at the end. The final model's evaluation (the
one logged at the last step, else a new one) writes its generations one per line to ``<output_dir>/generations.txt``
(``test_generations.txt`` for ``--do_predict``).

    python recipes/translation.py --output_dir runs/mt --preset small --per_device_train_batch_size 64 \\
        --learning_rate 5e-4 --warmup_steps 0.1 --lr_scheduler_type linear --num_train_epochs 5
    # 4x the batch, LEGW from the base batch 64 (warm-up 0.5 epoch at the base batch)
    python recipes/translation.py --output_dir runs/mt_legw --preset small --per_device_train_batch_size 256 \\
        --learning_rate 5e-4 --lr_scaling legw --base_batch_size 64 --legw_base_warmup_epochs 0.5 --num_train_epochs 5
    torchrun --nproc_per_node 2 recipes/translation.py ... --use_cpu
    torchrun --nproc_per_node 2 recipes/translation.py ... --deepspeed recipes/configs/ds_zero2.json
    python recipes/translation.py --model_name_or_path runs/mt --output_dir runs/mt_ft ...   # fine-tune

Defaults this recipe changes from ``Seq2SeqTrainingArguments`` (all overridable): ``predict_with_generate`` True,
``learning_rate`` 5e-4, ``adam_beta2`` 0.98, ``dataloader_drop_last`` True (every step sees the same global batch,
which LR scaling assumes, but for an epoch's shorter last step under gradient accumulation, as in HF's loop;
evaluation never drops), ``per_device_eval_batch_size`` 128, ``save_strategy`` no (the
final model and tokenizer are still saved), ``logging_steps`` 50; ``generation_max_length`` defaults to
``--max_target_length`` + 1 (the decoder start token counts).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, GenerationConfig,
                          HfArgumentParser, MarianConfig, MarianMTModel, set_seed)

from hf_largebatch import LargeBatchSeq2SeqArguments, LargeBatchSeq2SeqTrainer, run_recipe, write_summary
from hf_largebatch.data.translation import load_pairs, multi30k_dir, multi30k_tokenizer


PRESETS = {
    "tiny": {"d_model": 128, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4, "encoder_ffn_dim": 256, "decoder_ffn_dim": 256},
    "small": {"d_model": 256, "encoder_layers": 3, "decoder_layers": 3, "encoder_attention_heads": 4,
              "decoder_attention_heads": 4, "encoder_ffn_dim": 512, "decoder_ffn_dim": 512},
}

RECIPE_DEFAULTS = {
    "output_dir": "runs/translation",
    "predict_with_generate": True,
    "learning_rate": 5e-4,
    "adam_beta2": 0.98,
    "dataloader_drop_last": True,
    "per_device_eval_batch_size": 128,
    "save_strategy": "no",
    "logging_steps": 50,
}
GENERATIONS_FILE = "generations.txt"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Fine-tune this saved seq2seq model; its tokenizer is loaded from the same folder. Default: a new "
                "Marian Transformer from --preset."})
    preset: str = field(default="small", metadata={
        "help": "Size of a new model: " + "; ".join(
            f"{k}: d_model {v['d_model']}, {v['encoder_layers']}+{v['decoder_layers']} layers, "
            f"{v['encoder_attention_heads']} heads, FFN {v['encoder_ffn_dim']}" for k, v in PRESETS.items()),
        "choices": list(PRESETS)})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Use the tokenizer saved in this folder (default: the one beside --model_name_or_path, or for a new "
                "model one trained on the training split)."})
    vocab_size: int = field(default=8000, metadata={"help": "BPE vocabulary size of a newly trained tokenizer."})
    dropout: float | None = field(default=None, metadata={
        "help": "Dropout of a new model (default 0.1); also overrides a loaded model's."})
    max_position_embeddings: int = field(default=256, metadata={"help": "Longest sequence of a new model."})


@dataclass
class DataArguments:
    source_lang: str = field(default="en", metadata={"help": "Source language.", "choices": ["en", "de"]})
    target_lang: str = field(default="de", metadata={"help": "Target language.", "choices": ["en", "de"]})
    eval_split: str = field(default="val", metadata={"help": "Split evaluated during and after training."})
    test_split: str = field(default="test_2016_flickr", metadata={"help": "Split of --do_predict."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation pairs."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use the first N test pairs."})
    max_source_length: int = field(default=64, metadata={
        "help": "Truncate source sentences to N tokens (Multi30k's longest is 48 with the default tokenizer)."})
    max_target_length: int = field(default=64, metadata={
        "help": "Truncate target sentences to N tokens (longest: 56); generation stops at N + 1 unless "
                "--generation_max_length is given."})


class Split:
    """One evaluation split: raw references, tokenised dataset, where its generations go."""

    def __init__(self, name, sources, references, dataset, generations_path):
        self.name, self.sources, self.references = name, sources, references
        self.dataset, self.generations_path = dataset, generations_path
        self.labels = dataset["labels"]


class Bleu:
    """``compute_metrics``: corpus BLEU of the detokenised generations against the raw references of the split
    being evaluated (``self.split``).

    Each generation is paired with its reference through the labels that come with it, so the pairing holds in
    any evaluation order (``--train_sampling_strategy group_by_length`` also groups evaluation batches by length, in
    shuffled order; several ranks interleave their batches). Generations are written in the split's order. A
    prediction whose labels match no remaining sentence of the split (lost or repeated in gathering) is an error.
    """

    def __init__(self, tokenizer, write: bool):
        self.tokenizer, self.write, self.split = tokenizer, write, None

    def dataset_order(self, label_ids) -> list[int]:
        """For every prediction, the index of its sentence in the split (identical labels are taken in order)."""
        pad, split = self.tokenizer.pad_token_id, self.split
        if len(label_ids) != len(split.labels):
            raise RuntimeError(f"{len(label_ids)} predictions for the {len(split.labels)} sentences of "
                               f"{split.name}: predictions were lost or repeated in gathering")
        queues: dict[tuple, list[int]] = {}
        for index in reversed(range(len(split.labels))):
            queues.setdefault(tuple(t for t in split.labels[index] if t != pad), []).append(index)
        order = []
        for i, row in enumerate(label_ids):
            queue = queues.get(tuple(int(t) for t in row if t != -100 and t != pad))
            if not queue:
                raise RuntimeError(f"{split.name}: the labels of prediction {i} match no remaining sentence of the "
                                   "split: predictions were lost, repeated or mixed up in gathering")
            order.append(queue.pop())
        return order

    def __call__(self, eval_pred) -> dict:
        import sacrebleu

        split = self.split
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        pad = self.tokenizer.pad_token_id
        order = self.dataset_order(eval_pred.label_ids)
        preds = np.where(preds < 0, pad, preds)  # -100 padding between batches
        decoded = self.tokenizer.batch_decode(preds, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hypotheses = [""] * len(order)
        for index, text in zip(order, decoded):
            hypotheses[index] = text.strip()
        bleu = sacrebleu.corpus_bleu(hypotheses, [split.references])
        if self.write:
            with open(split.generations_path, "w", encoding="utf-8") as f:
                f.writelines(h.replace("\n", " ") + "\n" for h in hypotheses)
        # generated tokens other than specials (beam search pads finished hypotheses with </s>, greedy with <pad>)
        lengths = np.isin(preds, self.tokenizer.all_special_ids, invert=True).sum(axis=1)
        return {"bleu": bleu.score, "bleu_brevity_penalty": bleu.bp, "gen_len": float(np.mean(lengths))}


def load_tokenizer(model_args: ModelArguments, args) -> tuple:
    """(tokenizer, where it came from). A new tokenizer is trained on the local main process and saved to
    ``output_dir``; the other processes load it from there."""
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is not None:
        return AutoTokenizer.from_pretrained(source), source
    with args.main_process_first(desc="training the tokenizer"):
        if args.local_process_index == 0:
            tokenizer = multi30k_tokenizer(model_args.vocab_size, model_max_length=model_args.max_position_embeddings)
            os.makedirs(args.output_dir, exist_ok=True)
            tokenizer.save_pretrained(args.output_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    return tokenizer, f"bpe trained on multi30k train, vocab {len(tokenizer)}"


def build_model(model_args: ModelArguments, tokenizer):
    if model_args.model_name_or_path is not None:
        overrides = {} if model_args.dropout is None else {"dropout": model_args.dropout}
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, **overrides)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(f"the tokenizer of {model_args.model_name_or_path} has {len(tokenizer)} tokens, more "
                             "than the model's embeddings")
        return model
    config = MarianConfig(
        vocab_size=len(tokenizer), max_position_embeddings=model_args.max_position_embeddings,
        dropout=0.1 if model_args.dropout is None else model_args.dropout, activation_function="relu",
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id, **PRESETS[model_args.preset])
    model = MarianMTModel(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.bos_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id, num_beams=1, max_length=model_args.max_position_embeddings)
    return model


def encode(tokenizer, sources, targets, data_args):
    import datasets

    enc = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
    labels = tokenizer(text_target=targets, max_length=data_args.max_target_length, truncation=True)["input_ids"]
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": labels})


def make_split(name, tokenizer, data_args, max_samples, path) -> Split:
    sources, references = load_pairs(name, data_args.source_lang, data_args.target_lang, max_samples)
    return Split(name, sources, references, encode(tokenizer, sources, references, data_args), path)


def final_evaluation(trainer) -> dict:
    """The evaluation of the final model: the one logged at the last step if there was one (``--eval_strategy
    epoch`` ends with it; generating the split again would give the same result), else a new ``evaluate()``."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k != "step"}
    return trainer.evaluate()


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, LargeBatchSeq2SeqArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    splits = {"train", data_args.eval_split} | ({data_args.test_split} if args.do_predict else set())
    multi30k_dir(sorted(splits), (data_args.source_lang, data_args.target_lang))  # fail before any work
    if model_args.model_name_or_path is None and (data_args.max_source_length > model_args.max_position_embeddings
                                                  or data_args.max_target_length >= model_args.max_position_embeddings):
        raise ValueError("max_source_length / max_target_length must fit in max_position_embeddings")
    if args.generation_max_length is None:
        args.generation_max_length = data_args.max_target_length + 1
    set_seed(args.seed)

    tokenizer, tokenizer_source = load_tokenizer(model_args, args)
    model = build_model(model_args, tokenizer)
    train = make_split("train", tokenizer, data_args, data_args.max_train_samples, None).dataset
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.dataloader_drop_last and len(train) < global_batch:
        raise ValueError(f"{len(train)} training pairs make no full global batch of {global_batch} and "
                         "dataloader_drop_last is set: use more --max_train_samples or --dataloader_drop_last false")
    out = args.output_dir
    valid = make_split(data_args.eval_split, tokenizer, data_args, data_args.max_eval_samples,
                       os.path.join(out, GENERATIONS_FILE))

    bleu = Bleu(tokenizer, write=args.should_save)
    bleu.split = valid
    trainer = LargeBatchSeq2SeqTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=valid.dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=bleu if args.predict_with_generate else None)
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()

    metrics = dict(train_result.metrics)
    metrics.update(final_evaluation(trainer))
    if args.do_predict:
        test = make_split(data_args.test_split, tokenizer, data_args, data_args.max_predict_samples,
                          os.path.join(out, "test_generations.txt"))
        bleu.split = test
        metrics.update(trainer.predict(test.dataset, metric_key_prefix="test").metrics)
        bleu.split = valid

    gen = model.generation_config
    summary = write_summary(
        trainer, metrics, os.path.join(out, "summary.json"), task="translation", dataset="multi30k",
        metric_name="eval_bleu", source_lang=data_args.source_lang, target_lang=data_args.target_lang,
        eval_split=data_args.eval_split, train_examples=len(train), eval_examples=len(valid.dataset),
        generations_file=GENERATIONS_FILE if args.predict_with_generate else None,
        generation={"num_beams": args.generation_num_beams or gen.num_beams,
                    "max_length": args.generation_max_length},
        model_name_or_path=model_args.model_name_or_path,
        preset=None if model_args.model_name_or_path else model_args.preset,
        model=model.config.to_diff_dict() | {"model_type": model.config.model_type},
        num_parameters=sum(p.numel() for p in model.parameters()),
        tokenizer=tokenizer_source, vocab_size=len(tokenizer),
    )
    if trainer.is_world_process_zero():
        if "eval_bleu" in metrics:
            print(f"eval_bleu = {metrics['eval_bleu']:.2f} (eval_loss {metrics['eval_loss']:.4f}, multi30k "
                  f"{data_args.source_lang}->{data_args.target_lang} {data_args.eval_split}, "
                  f"global batch {trainer.global_batch_size}, {trainer.state.global_step} steps)")
        if "test_bleu" in metrics:
            print(f"test_bleu = {metrics['test_bleu']:.2f} ({data_args.test_split})")
    return summary


if __name__ == "__main__":
    run_recipe(main, sys.argv[1:])

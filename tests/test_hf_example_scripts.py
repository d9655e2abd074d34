"""Scripts written the way Hugging Face's ``examples/pytorch`` scripts are (our own code, not theirs), with the
one-line swap to hf_largebatch, on real data from ``../shared/data``:

* a run_clm-style causal LM: ``HfArgumentParser((ModelArguments, DataArguments, LargeBatchArguments))``, a
  tokenizer as ``processing_class``, ``group_texts`` blocks, ``default_data_collator``, ``compute_metrics`` with
  ``preprocess_logits_for_metrics``;
* a run_image_classification-style classifier: an image processor in a ``set_transform``,
  ``remove_unused_columns=False``, a collate function, ConAdv's ``pixel_epsilon`` taken from the processor.

(The run_translation-style ``predict_with_generate`` run is ``tests/test_recipe_translation.py``.) Each asserts
what the library must do inside such a script, not only that it runs.
"""

from dataclasses import dataclass
from itertools import chain

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import (GPT2Config, GPT2LMHeadModel, HfArgumentParser, PreTrainedTokenizerFast,
                          default_data_collator)

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.data import dataset_dir
from hf_largebatch.data.text import read_text
from helpers import single_thread, tiny_resnet

_threads = pytest.fixture(autouse=True)(single_thread)


@dataclass
class ModelArguments:
    n_embd: int = 32
    n_layer: int = 2


@dataclass
class DataArguments:
    block_size: int = 32
    max_train_blocks: int = 128
    max_eval_blocks: int = 32


def shakespeare_tokenizer(lines):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, min_frequency=2, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def group_texts(examples, block_size):
    """Concatenate the tokenised lines and cut them into blocks, labels = inputs (the model shifts them)."""
    joined = list(chain(*examples["input_ids"]))
    total = len(joined) // block_size * block_size
    blocks = [joined[i:i + block_size] for i in range(0, total, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def clm_script(argv):
    parser = HfArgumentParser((ModelArguments, DataArguments, LargeBatchArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    lines = [line for line in read_text(dataset_dir("tinyshakespeare") / "input.txt.gz").splitlines() if line][:4000]
    tokenizer = shakespeare_tokenizer(lines)
    raw = Dataset.from_dict({"text": lines})
    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    blocks = tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": data_args.block_size},
                           remove_columns=tokenized.column_names)
    train = blocks.select(range(data_args.max_train_blocks))
    start = data_args.max_train_blocks
    evaluation = blocks.select(range(start, start + data_args.max_eval_blocks))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=data_args.block_size,
                                       n_embd=model_args.n_embd, n_layer=model_args.n_layer, n_head=2,
                                       bos_token_id=0, eos_token_id=0,  # no dropout: a split draws its masks
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # in other shapes

    def preprocess_logits_for_metrics(logits, labels):
        return logits.argmax(dim=-1)

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred
        return {"accuracy": float((predictions[:, :-1] == labels[:, 1:]).mean())}

    trainer = LargeBatchTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                processing_class=tokenizer, data_collator=default_data_collator,
                                compute_metrics=compute_metrics,
                                preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    before = trainer.evaluate()
    trainer.train()
    return trainer, before, trainer.evaluate()


def test_clm_script_scales_the_lr_trains_and_is_split_invariant(tmp_path):
    common = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--num_train_epochs", "1",
              "--learning_rate", "0.5", "--optim", "sgd", "--optim_args", "momentum=0.9", "--lr_scaling", "sqrt", "--base_batch_size", "8",
              "--warmup_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0"]
    trainer, before, after = clm_script([*common, "--per_device_train_batch_size", "16"])
    assert trainer.run_summary["scale S"] == 2 and trainer.run_summary["peak_lr"] == pytest.approx(0.5 * 2 ** 0.5)
    assert after["eval_loss"] < before["eval_loss"] - 0.3 and after["eval_accuracy"] > before["eval_accuracy"]
    # the same global batch as 2 accumulated micro-batches of 8: the same training
    split, _, split_after = clm_script([*common, "--per_device_train_batch_size", "8",
                                        "--gradient_accumulation_steps", "2"])
    assert split.run_summary["scale S"] == 2
    assert split_after["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-5)


def test_image_script_with_an_image_processor_and_conadv_in_pixels(tmp_path):
    from transformers import ViTImageProcessor

    from hf_largebatch.data.images import load_fashion_mnist

    data = load_fashion_mnist("train").subset(640, seed=0)
    images = [Image.fromarray(img[..., 0]) for img in data.images]
    split = Dataset.from_dict({"image": images, "label": data.labels.tolist()}).train_test_split(
        test_size=128, seed=0)
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.286], image_std=[0.353])

    def transform(batch):
        batch["pixel_values"] = processor(batch["image"], return_tensors="pt")["pixel_values"]
        return batch

    split["train"].set_transform(transform)
    split["test"].set_transform(transform)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples])}

    def compute_metrics(eval_pred):
        return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}

    args = LargeBatchArguments(output_dir=str(tmp_path), remove_unused_columns=False, use_cpu=True, report_to=[],
                               per_device_train_batch_size=32, num_train_epochs=2, learning_rate=0.05, optim="sgd",
                               optim_args="momentum=0.9", adversarial="conadv", adversarial_args="pixel_epsilon=0.03",
                               save_strategy="no", disable_tqdm=True, seed=0, logging_steps=5)
    trainer = LargeBatchTrainer(model=tiny_resnet(), args=args, train_dataset=split["train"],
                                eval_dataset=split["test"], data_collator=collate_fn, processing_class=processor,
                                compute_metrics=compute_metrics)
    trainer.train()
    config = trainer.algorithm("conadv").config
    assert config.image_mean == (0.286,) and config.image_std == (0.353,)
    attack_losses = [e["adversarial_attack_loss"] for e in trainer.state.log_history if "adversarial_attack_loss" in e]
    assert attack_losses and np.isfinite(attack_losses).all()
    assert trainer.evaluate()["eval_accuracy"] > 0.4  # ten classes: chance is 0.1

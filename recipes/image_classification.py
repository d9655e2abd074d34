#!/usr/bin/env python
"""Image classification with an HF ``ResNetForImageClassification`` and ``LargeBatchTrainer``.

Data: ``--dataset fashion_mnist`` (default) or ``cifar10`` from ``$HF_LARGEBATCH_DATA`` (offline; see
``hf_largebatch/data/images.py``), or any ``datasets`` image dataset by hub name or local path (a
``save_to_disk`` folder, an image folder...). Model: a fresh ResNet from ``--preset`` (HF ResNets
``cifar_small`` default, ``tiny``, ``resnet18``; He et al.'s CIFAR ResNets ``resnet20``, ``resnet56``, and
``cifar_resnet18``) with any of ``--depths/--hidden_sizes/--embedding_size/--layer_type`` overriding the preset, or
``--model_name_or_path DIR`` to fine-tune a checkpoint (a different number of labels re-initialises the classifier;
a 3-channel checkpoint gets grayscale images repeated to RGB).

    python recipes/image_classification.py --dataset cifar10 --output_dir runs/c10 --use_cpu \\
        --per_device_train_batch_size 512 --learning_rate 0.1 --base_batch_size 128 --lr_scaling legw \\
        --legw_base_warmup_epochs 0.5 --num_train_epochs 5
    torchrun --nproc_per_node 2 recipes/image_classification.py ... --use_cpu
    accelerate launch --config_file recipes/configs/ddp.yaml recipes/image_classification.py ... --use_cpu
    torchrun --nproc_per_node 2 recipes/image_classification.py ... --deepspeed recipes/configs/ds_zero2.json

Defaults this recipe changes from ``TrainingArguments`` (all overridable on the command line): SGD with momentum
0.9, ``learning_rate`` 0.1, ``weight_decay`` 5e-4, cosine decay, ``dataloader_drop_last`` True (every step sees
the same global batch, which LR scaling assumes; under gradient accumulation HF's loop still makes an epoch's last
micro-batches, fewer than a step's, a shorter step), ``per_device_eval_batch_size`` 256, ``save_strategy`` no (the
final model is still saved), ``do_train`` and ``do_eval`` True, ``logging_steps`` 20. Evaluation never drops
examples: the eval loader ignores ``dataloader_drop_last`` (``eval_examples`` in the metrics is the count).

Threads: on a 2-core machine that other jobs share, run with ``OMP_NUM_THREADS=1``; two OpenMP threads measured
3-10x slower than one there (they spin waiting for each other), and only help on idle cores.

At the end it evaluates, writes ``<output_dir>/summary.json`` (``hf_largebatch.reporting.write_summary``) and
prints ``eval_accuracy``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import (AutoConfig, AutoModelForImageClassification, HfArgumentParser, ResNetConfig,
                          ResNetForImageClassification, set_seed)

from hf_largebatch import (ConAdv, ConAdvConfig, LargeBatchArguments, LargeBatchTrainer, evaluate_under_attack,
                           run_recipe, write_summary)
from hf_largebatch.data.images import ImageClassificationDataset, check_available, load_image_splits
from hf_largebatch.models import CifarResNetConfig, CifarResNetForImageClassification


# Small ResNets for 28-32 pixel images. HF's ResNet keeps its ImageNet stem (7x7 conv stride 2 + max-pool), so a
# 32x32 image is 8x8 when it reaches the first stage: cheap on CPU, and a checkpoint reloads with plain
# ``ResNetForImageClassification.from_pretrained``. cifar_small has ResNet-20's widths (16-32-64, 2 basic blocks a
# stage, 0.18M parameters); tiny (0.02M) is for tests and quick CPU benchmarks.
#
# resnet20 / resnet56 are He et al.'s CIFAR ResNets (hf_largebatch.models.cifar_resnet: a 3x3 stem at full
# resolution, option-A shortcuts; 0.27M / 0.85M parameters), the preset that reaches CIFAR-10's published accuracy.
# cifar_resnet18 is the ResNet-18 of CIFAR work (AdaScale's CIFAR-10 model): the same 3x3 stem, four stages of two
# basic blocks at 64-128-256-512 channels (11M parameters; option-A shortcuts here too).
CIFAR_RESNETS = {"resnet20": {"depths": [3, 3, 3], "hidden_sizes": [16, 32, 64]},
                 "resnet56": {"depths": [9, 9, 9], "hidden_sizes": [16, 32, 64]},
                 "cifar_resnet18": {"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]}}
PRESETS = {
    "tiny": {"depths": [1, 1], "hidden_sizes": [16, 32], "embedding_size": 16, "layer_type": "basic"},
    "cifar_small": {"depths": [2, 2, 2], "hidden_sizes": [16, 32, 64], "embedding_size": 16,
                    "layer_type": "basic"},
    "resnet18": {"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "embedding_size": 64,
                 "layer_type": "basic"},
}

RECIPE_DEFAULTS = {
    "output_dir": "runs/image_classification",
    "do_train": True,
    "do_eval": True,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "learning_rate": 0.1,
    "weight_decay": 5e-4,
    "lr_scheduler_type": "cosine",
    "dataloader_drop_last": True,
    "per_device_eval_batch_size": 256,
    "save_strategy": "no",
    "logging_steps": 20,
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A checkpoint folder (or hub name) to fine-tune instead of a fresh model."})
    preset: str = field(default="cifar_small", metadata={
        "help": "Fresh model: HF ResNets (tiny, cifar_small, resnet18) or He et al.'s CIFAR ResNets (resnet20, "
                "resnet56, cifar_resnet18).", "choices": [*PRESETS, *CIFAR_RESNETS]})
    depths: list[int] | None = field(default=None, metadata={"help": "Blocks per stage (overrides the preset)."})
    hidden_sizes: list[int] | None = field(default=None, metadata={"help": "Channels per stage (overrides)."})
    embedding_size: int | None = field(default=None, metadata={"help": "Stem channels (overrides the preset)."})
    layer_type: str | None = field(default=None, metadata={"help": "basic | bottleneck (overrides the preset).",
                                                           "choices": ["basic", "bottleneck"]})


@dataclass
class DataArguments:
    dataset: str = field(default="fashion_mnist", metadata={
        "help": "fashion_mnist | cifar10 (offline, from $HF_LARGEBATCH_DATA) | a `datasets` image dataset name or "
                "path (columns image/img + label)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a random subset this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a random subset this size."})
    augment: bool = field(default=True, metadata={
        "help": "Train-time random crop (+ horizontal flip except on Fashion-MNIST); --no_augment turns it off."})
    image_size: int | None = field(default=None, metadata={
        "help": "Resize `datasets` images to this square size (needed when their sizes differ)."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the max_*_samples subsets."})
    eval_adversarial_args: str | None = field(default=None, metadata={
        "help": "Also evaluate under this one-step attack ('pixel_epsilon=0.0314', ... as adversarial_args), on the "
                "final weights: eval_adv_accuracy. Default: the training attack when adversarial is set."})


def accuracy(eval_pred) -> dict:
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    return {"accuracy": float(np.mean(predictions == labels)), "examples": int(len(labels))}


def argmax_logits(logits, labels):
    return logits.argmax(dim=-1)


def build_model(model_args: ModelArguments, num_channels: int, class_names: list[str]):
    id2label = dict(enumerate(class_names))
    label2id = {name: i for i, name in id2label.items()}
    if model_args.model_name_or_path:
        saved = AutoConfig.from_pretrained(model_args.model_name_or_path)
        mismatch = saved.num_labels != len(class_names)
        if mismatch:
            print(f"{model_args.model_name_or_path} has {saved.num_labels} labels, the data {len(class_names)}: "
                  "the classifier is initialised afresh", file=sys.stderr)
        return AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(class_names), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=mismatch)
    cifar = model_args.preset in CIFAR_RESNETS
    dims = dict(CIFAR_RESNETS[model_args.preset] if cifar else PRESETS[model_args.preset])
    for key in ("embedding_size", "layer_type"):
        if cifar and getattr(model_args, key) is not None:
            raise ValueError(f"--{key} is not a setting of the CIFAR ResNets (--preset {model_args.preset}): their "
                             "stem has hidden_sizes[0] channels and their blocks are basic")
    for key in dims:
        if getattr(model_args, key) is not None:
            dims[key] = getattr(model_args, key)
    if len(dims["depths"]) != len(dims["hidden_sizes"]):
        raise ValueError(f"--depths {dims['depths']} and --hidden_sizes {dims['hidden_sizes']} must have the same "
                         "length (one per stage)")
    labels = {"num_labels": len(class_names), "id2label": id2label, "label2id": label2id}
    if cifar:
        return CifarResNetForImageClassification(CifarResNetConfig(num_channels=num_channels, **labels, **dims))
    config = ResNetConfig(num_channels=num_channels, downsample_in_first_stage=False, **labels, **dims)
    return ResNetForImageClassification(config)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, LargeBatchArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    try:
        check_available(data_args.dataset)  # every rank, before any work: path searched + HF_LARGEBATCH_DATA
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None

    # Rank 0 decodes (and caches) first; the other ranks then read the cache.
    with training_args.main_process_first(desc="loading images"):
        splits = load_image_splits(data_args.dataset, image_size=data_args.image_size, seed=data_args.subset_seed)
    train_data = splits.train.subset(data_args.max_train_samples, seed=data_args.subset_seed)
    eval_data = splits.eval.subset(data_args.max_eval_samples, seed=data_args.subset_seed + 1)

    set_seed(training_args.seed)
    model = build_model(model_args, splits.train.num_channels, splits.class_names)
    channels = model.config.num_channels
    augmentation = splits.augmentation if data_args.augment else None
    train_dataset = ImageClassificationDataset(train_data, splits.mean, splits.std, augmentation, channels)
    eval_dataset = ImageClassificationDataset(eval_data, splits.mean, splits.std, None, channels)

    # ConAdv's pixel_epsilon is converted with this data's normalisation, and x_adv kept a valid image
    normalisation = {"image_mean": splits.mean, "image_std": splits.std}
    callbacks = [ConAdv(training_args.conadv_config(**normalisation), training_args.adversarial)] if (
        training_args.adversarial != "none") else []
    eval_attack = data_args.eval_adversarial_args or training_args.adversarial_args
    eval_attack = ConAdvConfig.from_string(eval_attack, **normalisation) if eval_attack else None
    trainer = LargeBatchTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        compute_metrics=accuracy, preprocess_logits_for_metrics=argmax_logits, callbacks=callbacks)
    if training_args.do_train and training_args.dataloader_drop_last and len(train_dataset) < (
            training_args.per_device_train_batch_size * training_args.world_size):
        raise SystemExit(f"error: {len(train_dataset)} training examples cannot fill one batch of "
                         f"{training_args.per_device_train_batch_size} x {training_args.world_size} ranks with "
                         "dataloader_drop_last")

    metrics: dict = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        trainer.save_model()
    if training_args.do_eval:
        metrics.update(trainer.evaluate())
        if eval_attack is not None:
            metrics.update(evaluate_under_attack(trainer, eval_dataset, eval_attack))

    os.makedirs(training_args.output_dir, exist_ok=True)
    model_info = {"name_or_path": model_args.model_name_or_path or f"preset:{model_args.preset}",
                  "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
                  "model_type": model.config.model_type,
                  **{k: getattr(model.config, k, None) for k in ("depths", "hidden_sizes", "embedding_size",
                                                                 "layer_type", "num_channels", "num_labels")}}
    summary = write_summary(
        trainer, metrics, os.path.join(training_args.output_dir, "summary.json"),
        task="image_classification", dataset=splits.name, metric_name="eval_accuracy", model=model_info,
        train_examples=len(train_dataset), eval_examples=len(eval_dataset), augment=augmentation is not None)
    if trainer.is_world_process_zero() and "eval_accuracy" in metrics:
        print(f"eval_accuracy = {metrics['eval_accuracy']:.4f}  ({len(eval_dataset)} {splits.name} eval images, "
              f"global batch {trainer.global_batch_size}, {trainer.state.global_step} steps)")
    return summary


if __name__ == "__main__":
    run_recipe(main)

"""The same global batch gives the same update however it is split (ALGORITHMS.md section 0, DESIGN.md section 2).

Four splits of B=16: 1x16 and 8x2 accumulation here; 2 ranks x 8 and 2 ranks x 2 x 4 in test_multiprocess.py,
which compares against the references computed by ``reference_params`` below.
"""

import tempfile

import numpy as np
import pytest
from transformers import Trainer, TrainingArguments

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from helpers import (digits_dataset, flat_params, freeze_batchnorm_statistics, tiny_bert_classifier, tiny_gpt2_lm,
                     tiny_resnet, token_dataset)

MODELS = {
    "resnet": (lambda: freeze_batchnorm_statistics(tiny_resnet()), lambda: digits_dataset(256)),
    "bert": (tiny_bert_classifier, lambda: token_dataset(256, 12, 64, 3)),
    "gpt2": (tiny_gpt2_lm, lambda: token_dataset(256, 12, 64, None)),
}
STEPS = 2


def train_args(cls, per_device, ga, **extra):
    return cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=per_device,
               gradient_accumulation_steps=ga, max_steps=STEPS, optim="sgd", lr_scheduler_type="constant",
               learning_rate=0.5, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
               disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True, max_grad_norm=0.0, **extra)


def reference_params(kind, per_device, ga, trainer_cls=LargeBatchTrainer, args_cls=LargeBatchArguments, **extra):
    make_model, make_data = MODELS[kind]
    model = make_model()
    trainer = trainer_cls(model=model, args=train_args(args_cls, per_device, ga, **extra), train_dataset=make_data())
    trainer.train()
    return flat_params(model)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_accumulation_split_gives_same_update(kind):
    one = reference_params(kind, 16, 1)
    two = reference_params(kind, 8, 2)
    four = reference_params(kind, 4, 4)
    start = flat_params(MODELS[kind][0]())
    assert np.abs(one - start).max() > 1e-3, "the model did not train: the comparison would be vacuous"
    np.testing.assert_allclose(two, one, rtol=0, atol=2e-6)
    np.testing.assert_allclose(four, one, rtol=0, atol=2e-6)


def test_plain_trainer_gets_classifiers_wrong():
    """The trap we fix is real here: transformers.Trainer scales a **kwargs classifier's gradient by grad_accum."""
    one = reference_params("bert", 16, 1, Trainer, TrainingArguments)
    two = reference_params("bert", 8, 2, Trainer, TrainingArguments)
    assert np.abs(two - one).max() > 1e-3


def test_per_micro_batch_mean_is_not_token_invariant():
    """With padding, equal micro-batch weights differ from the token-level mean: 'tokens' is needed for LMs."""
    one = reference_params("gpt2", 16, 1, loss_normalization="mean")
    two = reference_params("gpt2", 8, 2, loss_normalization="mean")
    assert np.abs(two - one).max() > 1e-4

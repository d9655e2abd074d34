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


def test_label_smoothing_is_hf_label_smoother_objective():
    """The token loss applies label_smoothing_factor with the same objective as HF's LabelSmoother (token mean of
    (1 - eps) nll + eps mean_k(-log p_k)), so smoothing trains as in Trainer."""
    import torch
    from transformers.trainer_pt_utils import LabelSmoother

    data = token_dataset(16, 12, 64, None)
    batch = dict(data.columns)
    model = tiny_gpt2_lm().train()
    with torch.no_grad():  # peaked predictions: at init they are near uniform, where smoothing changes little
        model.transformer.wte.weight.mul_(30)
    count = batch["labels"][:, 1:].ne(-100).sum()
    losses = {}
    for eps in (0.0, 0.1):
        args = train_args(LargeBatchArguments, 16, 1, label_smoothing_factor=eps)
        trainer = LargeBatchTrainer(model=model, args=args, train_dataset=data)
        losses[eps] = trainer.compute_loss(model, batch, num_items_in_batch=count)
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True)
    assert losses[0.1].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(losses[0.1].item() - losses[0.0].item()) > 1e-3  # smoothing changed the objective

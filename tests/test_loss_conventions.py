"""The two loss conventions the README states against plain HF (``Trainer`` of transformers 5.24), each beside a
plain-HF control, so the README is updated when either side changes:

* a causal LM's loss divides by the predicted positions (the model's own loss), HF's by all label positions;
* the logged loss is the same for every split of the global batch; HF's doubles with 2 accumulation steps on a
  model whose forward takes ``**kwargs``.
"""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from helpers import tiny_bert_classifier, tiny_gpt2_lm, token_dataset

COMMON = dict(max_steps=1, learning_rate=0.0, use_cpu=True, report_to=[], logging_steps=1,
              disable_tqdm=True, save_strategy="no", seed=0)


def first_logged_loss(output_dir, trainer_cls, args_cls, model, data, **options):
    trainer = trainer_cls(model=model, args=args_cls(output_dir=str(output_dir), **COMMON, **options),
                          train_dataset=data, eval_dataset=data)
    trainer.train()
    return trainer.state.log_history[0]["loss"], trainer.evaluate()["eval_loss"]


def test_causal_lm_loss_divides_by_the_predicted_positions(tmp_path):
    data = token_dataset(32, 32, 64, None)
    with torch.no_grad():
        own = tiny_gpt2_lm().eval()(**data.columns).loss.item()  # the model's own mean over predicted positions
    labels = data.columns["labels"]
    predicted, all_labels = (labels[:, 1:] != -100).sum().item(), (labels != -100).sum().item()
    ours = first_logged_loss(tmp_path, LargeBatchTrainer, LargeBatchArguments, tiny_gpt2_lm(), data,
                             per_device_train_batch_size=32, per_device_eval_batch_size=32)
    hf = first_logged_loss(tmp_path, Trainer, TrainingArguments, tiny_gpt2_lm(), data,
                           per_device_train_batch_size=32, per_device_eval_batch_size=32)
    assert ours == pytest.approx((own, own), rel=1e-5)
    assert hf == pytest.approx((own * predicted / all_labels,) * 2, rel=1e-5)


def test_logged_loss_does_not_depend_on_the_accumulation(tmp_path):
    data = token_dataset(32, 12, 64, 3)
    ours = [first_logged_loss(tmp_path, LargeBatchTrainer, LargeBatchArguments, tiny_bert_classifier(), data,
                              per_device_train_batch_size=16 // ga, gradient_accumulation_steps=ga)[0]
            for ga in (1, 2)]
    hf = [first_logged_loss(tmp_path, Trainer, TrainingArguments, tiny_bert_classifier(), data,
                            per_device_train_batch_size=16 // ga, gradient_accumulation_steps=ga)[0] for ga in (1, 2)]
    assert ours[1] == pytest.approx(ours[0], rel=1e-6)
    assert hf[1] == pytest.approx(2 * hf[0], rel=1e-6)

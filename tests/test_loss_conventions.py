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


def test_a_compute_loss_func_is_left_to_hf(tmp_path):
    """README: with ``compute_loss_func`` the loss is the user's and its weighting HF's: HF's count of the step's
    label tokens reaches it, once per micro-batch, and the run is plain Trainer's, to the bit."""
    from helpers import flat_params

    def run(trainer_cls, args_cls):
        calls = []

        def summed_over_tokens(outputs, labels, num_items_in_batch=None):
            calls.append(int(num_items_in_batch))
            logits = outputs.logits[:, :-1].flatten(0, 1)
            return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100,
                                                     reduction="sum") / num_items_in_batch

        model = tiny_gpt2_lm()
        args = args_cls(output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, max_steps=3, learning_rate=0.5, optim="sgd",
                        lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
                        disable_tqdm=True, seed=0, data_seed=0)
        trainer_cls(model=model, args=args, train_dataset=token_dataset(64, 12, 64, None),
                    compute_loss_func=summed_over_tokens).train()
        return flat_params(model), calls

    ours, our_calls = run(LargeBatchTrainer, LargeBatchArguments)
    theirs, their_calls = run(Trainer, TrainingArguments)
    assert len(our_calls) == 6 and our_calls == their_calls  # 3 steps x 2 micro-batches, HF's token counts
    assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))

"""The extra events of LargeBatchTrainer: their order, and that each carries the quantity it promises."""

import copy
import tempfile

import pytest
import torch

from hf_largebatch import Algorithm, LargeBatchArguments, LargeBatchTrainer
from helpers import DictDataset, tiny_gpt2_lm, token_dataset

HF_EVENTS = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")


class LinearClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def linear_dataset(n=64):
    g = torch.Generator().manual_seed(1)
    return DictDataset(x=10 * torch.randn(n, 5, generator=g), labels=torch.randint(0, 3, (n,), generator=g))


class Recorder(Algorithm):
    name = "recorder"

    def __init__(self):
        self.events, self.local, self.reduced, self.step_losses, self.clipped_norms = [], [], [], [], []

    def _add(self, event):
        if not self.events or self.events[-1] != event:
            self.events.append(event)

    def on_local_gradient(self, args, state, control, *, name, param, grad, weight, **kw):
        self._add("on_local_gradient")
        if state.global_step == 0:
            self.local.append((name, grad.detach().clone(), weight))

    def on_micro_batch_end(self, args, state, control, *, micro_step, num_micro_batches, loss, **kw):
        self._add(f"on_micro_batch_end[{micro_step}/{num_micro_batches}]")

    def on_reduced_gradients(self, args, state, control, *, model, grad_sq_norm, **kw):
        self._add("on_reduced_gradients")
        self.reduced.append((float(grad_sq_norm), [p.grad.detach().clone() for p in model.parameters()]))

    def on_step_loss(self, args, state, control, *, loss, **kw):
        self._add("on_step_loss")
        self.step_losses.append(loss)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self._add("on_pre_optimizer_step")
        self.clipped_norms.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters()]))))


for _event in HF_EVENTS[:-3] + HF_EVENTS[-2:]:
    setattr(Recorder, _event, lambda self, *a, _e=_event, **k: self._add(_e))


def make_trainer(model, data, recorder, ga=2, per_device=4, steps=2):
    args = LargeBatchArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=per_device,
                               gradient_accumulation_steps=ga, max_steps=steps, optim="sgd", learning_rate=0.1,
                               lr_scheduler_type="constant", max_grad_norm=1.0, use_cpu=True, report_to=[],
                               save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
                               dataloader_drop_last=True)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    inputs = []  # every training micro-batch, labels included
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, batch, *args, **kwargs):
        if model.training:
            inputs.append({k: v.clone() for k, v in batch.items()})
        return compute_loss(model, batch, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    return trainer, inputs


def test_event_order():
    rec = Recorder()
    trainer, _ = make_trainer(LinearClassifier(), linear_dataset(), rec)
    trainer.train()
    one_step = ["on_step_begin",
                "on_local_gradient", "on_micro_batch_end[0/2]", "on_substep_end",
                "on_local_gradient", "on_micro_batch_end[1/2]",
                "on_reduced_gradients", "on_step_loss", "on_pre_optimizer_step", "on_optimizer_step",
                "on_step_end"]
    assert rec.events == one_step * 2


@pytest.mark.parametrize("kind", ["linear", "gpt2"])
def test_events_carry_local_reduced_and_loss(kind):
    """grad / weight is the micro-batch's own mean-loss gradient; the reduced norm is before clipping; the step
    loss is the mean over the step's micro-batches (token-weighted for the LM)."""
    model = LinearClassifier() if kind == "linear" else tiny_gpt2_lm()
    data = linear_dataset() if kind == "linear" else token_dataset(64, 12, 64, None)
    reference_model = copy.deepcopy(model)
    rec = Recorder()
    trainer, inputs = make_trainer(model, data, rec)
    trainer.train()

    names = [n for n, _ in reference_model.named_parameters()]
    micro_grads, micro_losses, micro_tokens = [], [], []
    for batch in inputs[:2]:  # the two micro-batches of step 0, at the initial weights
        reference_model.zero_grad()
        out = reference_model(**batch)
        out["loss"].backward()
        micro_losses.append(out["loss"].item())
        micro_grads.append({n: p.grad.clone() for n, p in reference_model.named_parameters()})
        micro_tokens.append(int((batch["labels"][:, 1:] != -100).sum()) if kind == "gpt2" else 1)

    per_param = len(names)
    assert len(rec.local) == 2 * per_param
    for k in range(2):
        for name, grad, weight in rec.local[k * per_param:(k + 1) * per_param]:
            torch.testing.assert_close(grad / weight, micro_grads[k][name], rtol=1e-4, atol=1e-6)

    weights = [t / sum(micro_tokens) for t in micro_tokens]
    mean_grad = {n: sum(w * g[n] for w, g in zip(weights, micro_grads)) for n in names}
    expected_sq = float(sum((g.double() ** 2).sum() for g in mean_grad.values()))
    grad_sq, grads = rec.reduced[0]
    assert grad_sq == pytest.approx(expected_sq, rel=1e-4)
    for (n, _), g in zip(reference_model.named_parameters(), grads):
        torch.testing.assert_close(g, mean_grad[n], rtol=1e-4, atol=1e-6)
    assert rec.step_losses[0] == pytest.approx(sum(w * l for w, l in zip(weights, micro_losses)), rel=1e-5)
    if kind == "linear":  # inputs of scale 10 make the norm exceed max_grad_norm: the event saw it unclipped
        assert expected_sq ** 0.5 > 1.5 and rec.clipped_norms[0] == pytest.approx(1.0, rel=1e-4)


def test_drop_last_keeps_training_batches_constant_but_evaluation_complete():
    seen = {}

    def count(eval_pred):
        seen["n"] = len(eval_pred.label_ids)
        return {}

    args = LargeBatchArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16,
                               per_device_eval_batch_size=16, max_steps=1, use_cpu=True, report_to=[],
                               save_strategy="no", disable_tqdm=True, dataloader_drop_last=True)
    trainer = LargeBatchTrainer(model=LinearClassifier(), args=args, train_dataset=linear_dataset(40),
                                eval_dataset=linear_dataset(40), compute_metrics=count)
    assert len(trainer.get_train_dataloader()) == 2  # 40 // 16: the partial batch is dropped in training
    trainer.evaluate()
    assert seen["n"] == 40


TRACE_RUN = {"name": "trace", "model": "linear", "per_device": 4, "ga": 2, "steps": 2, "lr": 0.1,
             "callbacks": ["event_trace"], "args": {"lr_scaling": "none"}}
_SETUP = ["on_setup", "on_train_begin", "on_epoch_position"]
_MICRO_0 = ["on_step_begin", "gradient_sync_context", "on_train_step_begin", "on_local_gradient",
            "on_micro_batch_end[0/2]", "on_substep_end", "gradient_sync_context", "on_local_gradient"]
_UPDATE = ["on_pre_optimizer_step", "on_before_update", "lr_factor", "on_lr_applied", "on_optimizer_step",
           "on_step_end"]
EXPECTED_TRACES = {
    # single process and DDP: the reduced gradients are read after the last backward, the update runs after clipping
    "single": _SETUP + (_MICRO_0 + ["on_micro_batch_end[1/2]", "on_reduced_gradients", "on_step_loss"] + _UPDATE) * 2,
    "ddp": _SETUP + (_MICRO_0 + ["on_micro_batch_end[1/2]", "on_reduced_gradients", "on_step_loss"] + _UPDATE) * 2,
    # ZeRO-2: the engine steps the client optimizer inside the last backward, once per parameter group (here 2:
    # with and without weight decay, so on_before_update and lr_factor come twice, on_lr_applied once); HF's
    # on_pre_optimizer_step comes after it all
    "zero2": _SETUP + (_MICRO_0 + ["on_before_update", "on_reduced_gradients", "lr_factor", "on_lr_applied",
                                   "on_before_update", "lr_factor", "on_micro_batch_end[1/2]", "on_step_loss",
                                   "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]) * 2,
}


@pytest.mark.multiprocess
def test_event_order_in_every_backend(tmp_path):
    """The order in which an algorithm sees the events of a run, pinned per backend (set-up, then the first two
    steps of a 2-micro-batch run), including on_before_update, lr_factor and on_lr_applied around the update."""
    from test_multiprocess import run_workers
    from workers.train_worker import run_one

    traces = {"single": run_one(TRACE_RUN, None)["events"]}
    for backend, config in (("ddp", None), ("zero2", "ds_zero2.json")):
        (tmp_path / backend).mkdir()
        ranks = run_workers(tmp_path / backend, [TRACE_RUN], deepspeed=config)
        assert ranks[0]["trace"]["events"] == ranks[1]["trace"]["events"]
        traces[backend] = ranks[0]["trace"]["events"]
    assert traces == EXPECTED_TRACES

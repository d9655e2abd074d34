"""Multi-process worker: trains tiny models with LargeBatchTrainer and writes what each rank saw and did.

Usage (under torchrun): train_worker.py SPEC_JSON OUT_DIR. SPEC is a JSON object with a list of "runs"; each run
has a name, a model (a key of MODELS), per_device, ga, steps, and optionally lr, optim, lr_scheduler_type, callbacks
(keys of CALLBACKS), args (more LargeBatchArguments), output_dir, save_steps and resume (a checkpoint to resume
from). ``run_one`` runs one in this process too.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer, LRHistory, NoiseScaleMonitor
from hf_largebatch.algorithms.adascale import AdaScale
from hf_largebatch.core.backends import load_deepspeed_config, run_recipe, zero_stage
from helpers import (BatchNormClassifier, DictDataset, IndexedClassifier, digits_dataset, event_trace_class,
                     flat_params, freeze_batchnorm_statistics, indexed_points, poisoned_points, tiny_bert_classifier,
                     tiny_gpt2_lm, tiny_lstm_lm, tiny_resnet, token_dataset, token_streams,
                     zipf_token_classification)


class MeanEstimator(torch.nn.Module):
    """loss = mean_j 0.5 ||w - x_j||^2 with w = 0: each example's gradient is -x_j, chosen by the data."""

    def __init__(self, dim=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x, labels=None):
        return {"loss": 0.5 * ((self.w - x) ** 2).sum(-1).mean()}


def points(x):
    return DictDataset(x=x, labels=torch.zeros(len(x), dtype=torch.long))

MODELS = {
    "resnet": (lambda: freeze_batchnorm_statistics(tiny_resnet()), lambda: digits_dataset(256)),
    "bert": (tiny_bert_classifier, lambda: token_dataset(256, 12, 64, 3)),
    # AdamScale: a vocabulary whose rows are touched from every step to never (its per-row history)
    "bert_zipf": (lambda: tiny_bert_classifier(vocab_size=300, num_labels=2),
                  lambda: zipf_token_classification(512, 8, 300)),
    "gpt2": (tiny_gpt2_lm, lambda: token_dataset(256, 12, 64, None)),
    # per-rank, per-micro-batch gradients that are mutually orthogonal / all identical (AdaScale golden gains)
    "orthogonal": (MeanEstimator, lambda: points(torch.eye(4))),
    "identical": (MeanEstimator, lambda: points(torch.ones(4, 4) / 2)),
    "gaussian": (lambda: MeanEstimator(10),
                 lambda: points(0.5 + 2 * torch.randn(256, 10, generator=torch.Generator().manual_seed(0)))),
    "linear": (IndexedClassifier, lambda: indexed_points(256)),  # learnable labels, plain float inputs
    "poisoned": (BatchNormClassifier, poisoned_points),  # one NaN example: its step must be skipped
    # stateful LM: 8 streams (the global batch) whose LSTM state is carried from step to step
    "lstm_streams": (tiny_lstm_lm, token_streams),
}
CALLBACKS = {"adascale_raw": lambda: AdaScale(theta=0.0), "noise_monitor": NoiseScaleMonitor,
             "event_trace": event_trace_class()}


def run_one(run: dict, deepspeed: str | None) -> dict:
    if deepspeed:  # Accelerate takes one DeepSpeed plugin per process: a fresh state for each run (the process
        from accelerate.state import AcceleratorState  # group, in PartialState, stays)

        AcceleratorState._reset_state()
    make_model, make_data = MODELS[run["model"]]
    model = make_model()
    fingerprints = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: fingerprints.append(float(sum(v.float().sum() for v in kwargs.values()
                                                                if torch.is_tensor(v)))),
        with_kwargs=True)
    saving = {"save_strategy": "steps", "save_steps": run["save_steps"]} if run.get("save_steps") else \
        {"save_strategy": "no"}
    args = LargeBatchArguments(
        output_dir=run.get("output_dir") or tempfile.mkdtemp(), per_device_train_batch_size=run["per_device"],
        gradient_accumulation_steps=run["ga"], max_steps=run["steps"], optim=run.get("optim", "sgd"),
        lr_scheduler_type=run.get("lr_scheduler_type", "constant"), learning_rate=run.get("lr", 0.5),
        use_cpu=deepspeed is None, deepspeed=deepspeed, report_to=[], logging_steps=1,
        disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True, max_grad_norm=0.0,
        **saving, **run.get("args", {}))
    history = LRHistory(0)
    extra = [CALLBACKS[name]() for name in run.get("callbacks", [])]
    callbacks = [history, *extra]
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=make_data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=run.get("resume"))
    return {
        "args_world_size": args.world_size,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "scale": trainer.scale,
        "learning_rates": history.learning_rates,
        "losses": history.losses,
        "fingerprints": fingerprints,
        "log_history": trainer.state.log_history,
        "buffers_finite": all(bool(torch.isfinite(b).all()) for b in model.buffers() if b.is_floating_point()),
        "events": next((cb.events for cb in extra if hasattr(cb, "events")), None),
        "params": _gathered_params(trainer) if zero_stage(load_deepspeed_config(deepspeed)) == 3
        else flat_params(model).tolist(),
    }


def _gathered_params(trainer) -> list:
    import deepspeed

    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().reshape(-1).double() for p in params]).tolist()


def allow_deepspeed_fp16_on_cpu() -> None:
    """The one patched part of the DeepSpeed fp16 runs: DeepSpeed's CPU accelerator reports fp16 as unsupported
    when the CPU lacks mkldnn's fast fp16 kernels (this one does), and the engine then refuses ``fp16``; the loss
    scaler, the fp16 module and the ZeRO optimizer that the run goes through are DeepSpeed's own, unpatched, and
    torch computes fp16 on any CPU (slowly). On a GPU this patch is not needed (a CUDA test would run unpatched)."""
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    deepspeed = spec.get("deepspeed")
    if spec.get("deepspeed_fp16_on_cpu"):
        allow_deepspeed_fp16_on_cpu()
    results = {run["name"]: run_one(run, deepspeed) for run in spec["runs"]}
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    run_recipe(main)

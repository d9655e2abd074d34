"""Mistakes are refused with a clear error before any work starts, and the error says what to do instead."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from transformers import HfArgumentParser

from hf_largebatch import LargeBatchArguments, LargeBatchTrainer
from hf_largebatch.core import backends
from helpers import TinyLinearClassifier, random_points, single_thread


one_cpu_thread = pytest.fixture(autouse=True)(single_thread)


def make_args(tmp_path, **overrides) -> LargeBatchArguments:
    options = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                   dataloader_drop_last=True, optim="sgd", max_grad_norm=0, learning_rate=0.1,
                   per_device_train_batch_size=16, logging_strategy="no")
    options.update(overrides)
    return LargeBatchArguments(**options)


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_untouched(model, before) -> None:
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q), "the model was updated before the error"


# ---------------------------------------------------------------- LargeBatchArguments
def test_unknown_lr_scaling(tmp_path):
    with pytest.raises(ValueError, match=r"unknown lr_scaling='cubic'; choose one of none, linear, sqrt, legw"):
        make_args(tmp_path, lr_scaling="cubic", base_batch_size=32)


def test_unknown_lr_scaling_on_the_command_line(tmp_path, capsys):
    """HfArgumentParser turns the field's ``choices`` into argparse choices: argparse exits (status 2) naming the
    valid rules, before the dataclass is even built."""
    parser = HfArgumentParser(LargeBatchArguments)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--lr_scaling", "cubic",
                                            "--base_batch_size", "32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--lr_scaling" in err
    assert "invalid choice: 'cubic'" in err
    assert "'none', 'linear', 'sqrt', 'legw'" in err


def test_command_line_accepts_the_valid_rules(tmp_path):
    (args,) = HfArgumentParser(LargeBatchArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--lr_scaling", "legw",
         "--base_batch_size", "256", "--legw_base_warmup_epochs", "0.5"])
    assert (args.lr_scaling, args.base_batch_size, args.legw_base_warmup_epochs) == ("legw", 256, 0.5)


def test_unknown_loss_normalization(tmp_path):
    with pytest.raises(ValueError, match=r"unknown loss_normalization='sum'; choose one of auto, mean, tokens"):
        make_args(tmp_path, loss_normalization="sum")


@pytest.mark.parametrize("base", [0, -4])
def test_non_positive_base_batch_size(tmp_path, base):
    with pytest.raises(ValueError, match=re.escape(f"base_batch_size must be a positive integer, got {base}")):
        make_args(tmp_path, lr_scaling="linear", base_batch_size=base)


@pytest.mark.parametrize("rule", ["linear", "sqrt"])
def test_scaling_without_base_batch_size(tmp_path, rule):
    with pytest.raises(ValueError, match=rf"lr_scaling='{rule}' needs base_batch_size \(the global batch size "
                                         r"your learning_rate was tuned for\)"):
        make_args(tmp_path, lr_scaling=rule)


def test_legw_without_base_batch_size(tmp_path):
    with pytest.raises(ValueError, match=r"lr_scaling='legw' needs base_batch_size"):
        make_args(tmp_path, lr_scaling="legw", legw_base_warmup_epochs=0.5)


@pytest.mark.parametrize("warmup", [10, 0.1])
def test_legw_with_warmup_steps(tmp_path, warmup):
    with pytest.raises(ValueError, match=r"give the base run's warm-up as legw_base_warmup_epochs and leave "
                                         r"warmup_steps at 0"):
        make_args(tmp_path, lr_scaling="legw", base_batch_size=32, legw_base_warmup_epochs=0.5, warmup_steps=warmup)


@pytest.mark.parametrize("w0", [0.0, -1.0])
def test_legw_without_base_warmup_epochs(tmp_path, w0):
    with pytest.raises(ValueError, match=r"lr_scaling='legw' needs legw_base_warmup_epochs > 0"):
        make_args(tmp_path, lr_scaling="legw", base_batch_size=32, legw_base_warmup_epochs=w0)


# ---------------------------------------------------------------- batch sizes that match no base run
@pytest.mark.parametrize("per_device, ga, base", [(16, 3, 32), (48, 1, 32), (16, 2, 48)])
def test_global_batch_unrelated_to_base_batch(tmp_path, per_device, ga, base):
    args = make_args(tmp_path, lr_scaling="linear", base_batch_size=base, per_device_train_batch_size=per_device,
                     gradient_accumulation_steps=ga)
    with pytest.raises(ValueError, match=rf"global batch {per_device * ga} .*not a multiple or a divisor of "
                                         rf"base_batch_size={base}.*Choose sizes where one divides the other"):
        LargeBatchTrainer(model=TinyLinearClassifier(), args=args, train_dataset=random_points())


# ---------------------------------------------------------------- DeepSpeed configs that would take over the LR
ZERO2 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 2}}
OPTIMIZER_BLOCK = {"type": "AdamW", "params": {"lr": 1e-3}}
SCHEDULER_BLOCK = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}


def test_deepspeed_optimizer_block_is_refused():
    with pytest.raises(ValueError, match=r"has a 'optimizer' block: DeepSpeed would build its own optimizer.*"
                                         r"Remove the 'optimizer' block"):
        backends.check_deepspeed_config({**ZERO2, "optimizer": OPTIMIZER_BLOCK})


def test_deepspeed_scheduler_block_is_refused():
    with pytest.raises(ValueError, match=r"has a 'scheduler' block: a DeepSpeed scheduler would own the learning "
                                         r"rate.*Remove the 'scheduler' block.*lr_scheduler_type"):
        backends.check_deepspeed_config({**ZERO2, "scheduler": SCHEDULER_BLOCK})


@pytest.mark.parametrize("config", [None, {}, ZERO2])
def test_deepspeed_config_without_lr_blocks_passes(config):
    backends.check_deepspeed_config(config)


@pytest.mark.parametrize("block, content", [("optimizer", OPTIMIZER_BLOCK), ("scheduler", SCHEDULER_BLOCK)])
def test_deepspeed_json_with_lr_block_is_refused_before_any_deepspeed_work(tmp_path, monkeypatch, block, content):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({**ZERO2, block: content}))

    def reached(*args, **kwargs):
        raise AssertionError("DeepSpeed / TrainingArguments set-up started before the config was checked")

    monkeypatch.setattr(backends, "prepare_cpu_deepspeed", reached)
    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", reached)
    with pytest.raises(ValueError, match=rf"Remove the '{block}' block"):
        LargeBatchArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], deepspeed=str(path))


class SetUpReached(Exception):
    """Raised in place of DeepSpeed's set-up: the argument checks before it all passed."""


def reach_set_up(*args, **kwargs):
    raise SetUpReached


@pytest.mark.parametrize("optim", ["lars", "lamb", "adamp"])
def test_trust_ratio_optimizers_under_deepspeed_are_refused(tmp_path, monkeypatch, optim):
    """ZeRO hands a client optimizer flattened shards: per-layer trust ratios would be wrong, so refused up front."""
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ZERO2))
    monkeypatch.setattr(backends, "prepare_cpu_deepspeed", reach_set_up)
    with pytest.raises(ValueError, match=rf"optim='{optim}' is not supported under DeepSpeed.*per-layer trust"):
        LargeBatchArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], deepspeed=str(path),
                            optim=optim)


def test_missing_deepspeed_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DeepSpeed config .*does not exist"):
        LargeBatchArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                            deepspeed=str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- launches that silently run fewer processes
ACCELERATE_CPU_2 = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                    "ACCELERATE_MIXED_PRECISION": "no"}


@pytest.mark.parametrize("use_cpu", ["True", "true", "1"])
def test_accelerate_launch_cpu_num_processes_is_refused(use_cpu):
    with pytest.raises(RuntimeError) as exc:
        backends.check_launch({**ACCELERATE_CPU_2, "ACCELERATE_USE_CPU": use_cpu})
    message = str(exc.value)
    # What went wrong, and the two launches that do start N CPU processes.
    assert "`accelerate launch --cpu --num_processes N`" in message and "starts a single process" in message
    assert "accelerate launch --multi_gpu --num_processes N" in message
    assert "torchrun --nproc_per_node N" in message and "--use_cpu" in message


@pytest.mark.parametrize("environ", [
    {**ACCELERATE_CPU_2, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},  # --multi_gpu on CPU: real workers
    {k: v for k, v in ACCELERATE_CPU_2.items() if k != "MASTER_ADDR"},       # plain single-process CPU run
    {**ACCELERATE_CPU_2, "ACCELERATE_USE_CPU": "False"},
    {},
])
def test_launches_that_are_fine(environ):
    backends.check_launch(environ)


def test_accelerate_launch_cpu_is_refused_by_the_arguments(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in ACCELERATE_CPU_2.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=r"--multi_gpu"):
        LargeBatchArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])


def test_world_size_mismatch():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with pytest.raises(RuntimeError, match=r"the launcher started 2 processes \(torch.distributed sees 2\) but the "
                                           r"Trainer counts 1: every rank would train on the same data.*--use_cpu"):
        backends.check_world_size(1, environ={"WORLD_SIZE": "2"})


@pytest.mark.parametrize("world, environ", [(1, {}), (1, {"WORLD_SIZE": "1"}), (2, {"WORLD_SIZE": "2"})])
def test_world_size_consistent(world, environ):
    backends.check_world_size(world, environ=environ)


# ---------------------------------------------------------------- errors when train() starts / at the first step
def test_user_scheduler_with_lr_scaling_is_refused(tmp_path):
    model = TinyLinearClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = make_args(tmp_path, lr_scaling="linear", base_batch_size=8, max_steps=4)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=random_points(),
                                optimizers=(optimizer, scheduler))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"do not pass a scheduler in `optimizers=\(optimizer, scheduler\)`; use "
                                         r"lr_scheduler_type instead"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert_untouched(model, before)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_user_scheduler_without_lr_scaling_is_used(tmp_path):
    """The refusal is specific to lr_scaling: with 'none' the user's scheduler owns the LR as in Trainer."""
    model = TinyLinearClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    args = make_args(tmp_path, max_steps=3)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=random_points(),
                                optimizers=(optimizer, scheduler))
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.lr_scheduler is scheduler
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_tokens_normalization_with_classification_labels(tmp_path):
    model = TinyLinearClassifier()
    args = make_args(tmp_path, loss_normalization="tokens", gradient_accumulation_steps=2, max_steps=4)
    trainer = LargeBatchTrainer(model=model, args=args, train_dataset=random_points())
    before = snapshot(model)
    raised = None
    try:
        trainer.train()
    except ValueError as exc:
        raised = exc
    assert raised is not None, "loss_normalization='tokens' with 1-D class labels trained without an error"
    assert re.search(r"loss_normalization='tokens' needs integer per-token", str(raised)), str(raised)
    assert trainer.state.global_step == 0
    assert_untouched(model, before)


# ---------------------------------------------------------------- settings that used to pass or fail deep in a step
@pytest.mark.parametrize("overrides, message", [
    ({"adversarial": "conadv", "adversarial_args": "epsilon=nan"}, r"adversarial_args: epsilon must be a finite"),
    ({"adversarial": "conadv", "adversarial_args": "epsilon=inf"}, r"adversarial_args: epsilon must be a finite"),
    ({"extrapolation": "fresh", "extrapolation_ratio": float("nan")}, r"extrapolation_ratio must be a finite"),
    ({"adaptive_batch": "norm", "adaptive_batch_args": "max_batch_size=64,eta=nan"},
     r"adaptive_batch_args: eta must be a finite"),
    ({"optim_args": "momentun=0.9"}, r"optim_args key 'momentun' is not read by optim='sgd'"),
    ({"optim_args": "momentum=abc"}, r"optim_args='momentum=abc' for optim='sgd': .*'abc'"),
    ({"optim_args": "momentum"}, r"optim_args='momentum': expected 'key=value"),
    ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be >= 1, got 0"),
    ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size must be >= 1, got 0"),
    ({"learning_rate": -0.1}, r"learning_rate must be a finite number >= 0, got -0.1"),
    ({"learning_rate": float("nan")}, r"learning_rate must be a finite number >= 0, got nan"),
])
def test_bad_numbers_and_keys_are_refused_at_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_optim_args_that_sgd_reads_pass(tmp_path):
    make_args(tmp_path, optim_args="momentum=0.9,nesterov=True")


@pytest.mark.parametrize("examples", [0, 20])
def test_a_dataset_smaller_than_one_global_batch_is_refused_before_any_step(tmp_path, examples):
    model = TinyLinearClassifier()
    before = snapshot(model)
    data = random_points(max(examples, 1))
    data.columns, data.n = {k: v[:examples] for k, v in data.columns.items()}, examples
    trainer = LargeBatchTrainer(model=model, args=make_args(tmp_path, gradient_accumulation_steps=2, max_steps=2),
                                train_dataset=data)
    with pytest.raises(ValueError, match=rf"the training set has {examples} examples, fewer than one global batch "
                                         r"\(32 = per_device_train_batch_size 16 x gradient_accumulation_steps 2 x "
                                         r"world_size 1\)"):
        trainer.train()
    assert_untouched(model, before)


def test_malformed_deepspeed_json_names_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not valid JSON \(line 1, column 35"):
        backends.load_deepspeed_config(str(path))

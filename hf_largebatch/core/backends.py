"""What differs between single process, DDP and DeepSpeed ZeRO, and the launch mistakes we refuse.

Facts this module acts on (measured here, DESIGN.md section 2-3):

* ``accelerate launch --cpu --num_processes 2`` starts *one* process (it sets ``MASTER_ADDR`` but no
  ``WORLD_SIZE``); nothing fails, the run is silently single-process.
* DeepSpeed through the Trainer on CPU: Accelerate's state has no backend without CUDA and reports one process
  while ``torch.distributed`` has two, so every rank trains on the same data. Creating
  ``PartialState(backend="gloo")`` first (with ``ACCELERATE_USE_DEEPSPEED=true`` and a configured state) fixes it.
* A DeepSpeed config with an ``optimizer`` block bypasses ``create_optimizer``; a ``scheduler`` block hands the LR
  to a DeepSpeed scheduler. Our scheduler must own the LR, so both are refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

from ..optim.lars_lamb_adamp import LARGE_BATCH_OPTIMIZERS


def check_launch(environ: dict | None = None) -> None:
    """Refuse launches that would silently run one process where several were asked for."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise RuntimeError(
            "`accelerate launch --cpu --num_processes N` (or an accelerate config with distributed_type MULTI_CPU) "
            "starts a single process. For N CPU processes use `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu --num_processes N script.py ... --use_cpu` (or --config_file recipes/configs/ddp.yaml) "
            "or `torchrun --nproc_per_node N script.py ... --use_cpu`."
        )


def init_cpu_process_group(args) -> None:
    """Start a launched CPU run's process group with ``ddp_timeout``: transformers' CPU branch builds it without
    one (torch's default, 30 minutes: a frozen rank holds every other that long). Accelerate then finds the group
    started and keeps it. Only under a launcher that set ``WORLD_SIZE`` (torchrun, accelerate launch); DeepSpeed
    and GPU runs get the timeout from transformers already."""
    from datetime import timedelta

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not on_cpu(args) or args.deepspeed or not launched or not dist.is_available() or dist.is_initialized():
        return
    dist.init_process_group(backend=args.ddp_backend or "gloo", timeout=timedelta(seconds=args.ddp_timeout))


def on_cpu(args) -> bool:
    from transformers.utils import strtobool

    return bool(args.use_cpu or strtobool(os.environ.get("ACCELERATE_USE_CPU", "False")))


def check_fsdp_device(args) -> None:
    """FSDP on CPU is refused: accelerate builds FSDP only on accelerators (GPU, XPU, NPU, ...), and transformers
    then trains the CPU run with DDP, silently."""
    if args.fsdp and on_cpu(args):
        raise ValueError("fsdp with use_cpu: accelerate runs FSDP only on accelerators (GPU, XPU, NPU, ...), and "
                         "on CPU transformers would train with DDP instead, silently. Drop --fsdp for a CPU run, or "
                         "run on GPUs")


def check_world_size(args_world_size: int, environ: dict | None = None) -> None:
    """The Trainer must see the same world as the launcher and ``torch.distributed``."""
    env = os.environ if environ is None else environ
    launched = int(env.get("WORLD_SIZE", "1"))
    actual = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launched
    if args_world_size != launched or args_world_size != actual:
        raise RuntimeError(
            f"the launcher started {launched} processes (torch.distributed sees {actual}) but the Trainer counts "
            f"{args_world_size}: every rank would train on the same data. On CPU pass `--use_cpu` (DDP), or for "
            "DeepSpeed build LargeBatchArguments before anything touches accelerate's state."
        )


def load_deepspeed_config(deepspeed: str | dict | None) -> dict[str, Any] | None:
    if deepspeed is None:
        return None
    if isinstance(deepspeed, dict):
        return deepspeed
    if not os.path.isfile(deepspeed):
        raise FileNotFoundError(f"DeepSpeed config {deepspeed!r} does not exist")
    with open(deepspeed) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"DeepSpeed config {deepspeed} is not valid JSON (line {error.lineno}, column "
                             f"{error.colno}: {error.msg})") from None


def check_deepspeed_config(config: dict[str, Any] | None) -> None:
    """Our scheduler owns the LR: a DeepSpeed optimizer or scheduler block would take it over silently."""
    if not config:
        return
    for block, why in (
        ("optimizer", "DeepSpeed would build its own optimizer and never call the Trainer's create_optimizer"),
        ("scheduler", "a DeepSpeed scheduler would own the learning rate instead of hf_largebatch's scheduler"),
    ):
        if block in config:
            raise ValueError(
                f"the DeepSpeed config has a {block!r} block: {why}. Remove the {block!r} block; set the optimizer "
                "and schedule through LargeBatchArguments (optim, learning_rate, lr_scheduler_type, warmup_steps)."
            )


def check_optimizer_on_deepspeed(optim: str, config: dict[str, Any] | None) -> None:
    """Refuse the layer-wise optimisers under DeepSpeed ZeRO: a client optimizer holds flattened shards, so they
    would run, silently computing something else. (What the algorithms refuse under DeepSpeed, each says in its
    ``check``: ``composition.py``.)"""
    if config and optim in LARGE_BATCH_OPTIMIZERS:
        raise ValueError(
            f"optim={optim!r} is not supported under DeepSpeed: ZeRO hands a client optimizer flattened shards of "
            "parameters, so its per-layer trust ratios (and the exclusion of biases and norm weights) would be "
            "computed on the wrong tensors, silently. Use DDP (accelerate launch / torchrun) for LARS, LAMB and AdamP.")


def zero_stage(config: dict[str, Any] | None) -> int:
    if not config:
        return 0
    return int(config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_loss_scale(engine) -> float:
    """The loss scale DeepSpeed's fp16 applied in this step's backward (1 without fp16).

    DeepSpeed scales the loss itself (Accelerate's GradScaler is not used), so the per-micro-batch hook gradients
    carry this scale while the engine's global norm ``_global_grad_norm`` is already unscaled. The ZeRO-1/2/3 and
    fp16 optimizers expose the dynamic scaler's current value as ``loss_scale``; it changes only inside the
    optimizer's ``step`` (after an overflow or a window of good steps), so the value read during a backward is the
    one that backward used."""
    if not engine.fp16_enabled():
        return 1.0
    scale = getattr(engine.optimizer, "loss_scale", None)
    if scale is None:
        raise RuntimeError(f"DeepSpeed fp16 is on but its optimizer {type(engine.optimizer).__name__} has no "
                           "'loss_scale': the gradient statistics cannot remove the loss scale. Use bf16, or a "
                           "deepspeed version in the tested range (pyproject.toml)")
    return float(scale)


def prepare_cpu_deepspeed(accelerator_config: Any) -> Any:
    """Make Accelerate count the real world when DeepSpeed runs on CPU under torchrun/accelerate.

    Returns the ``accelerator_config`` to use (with ``use_configured_state`` set). A no-op with CUDA or when the
    process was not launched as part of a multi-process job.
    """
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return accelerator_config
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    if accelerator_config is None:
        accelerator_config = {}
    if isinstance(accelerator_config, dict):
        accelerator_config = {**accelerator_config, "use_configured_state": True}
    else:
        accelerator_config.use_configured_state = True
    return accelerator_config


def is_distributed() -> bool:
    """More than one rank in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device | None:
    """Where a small tensor must live for a collective: the current CUDA device under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks_max(value: int) -> int:
    """The largest ``value`` over ranks: one decision for all even if float sums differ in the last bit."""
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def average_across_ranks_(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over ranks (one all-reduce of a flat buffer; identity alone)."""
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_floats(values: list[float], src: int = 0) -> list[float]:
    """Rank ``src``'s values on every rank (a decision taken on one rank); identity in a single process."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.broadcast(tensor, src=src)
    return tensor.tolist()


def innermost_optimizer(optimizer):
    """The user's optimizer inside Accelerate's / DeepSpeed's wrappers."""
    inner = optimizer  # DeepSpeed's ZeRO optimizer is no torch Optimizer, but holds the client one too
    while hasattr(getattr(inner, "optimizer", None), "param_groups"):
        inner = inner.optimizer
    return inner



def run_recipe(main, *args) -> None:
    """Run a script's ``main`` and leave the process group on the way out, error or not (DeepSpeed ZeRO-3 can
    abort at interpreter exit otherwise); after a success, all ranks leave together (a rank tearing gloo down while
    another still finishes its last collective aborts with "terminate called without an active exception").

    A successful distributed run then ends with ``os._exit(0)`` once the exit handlers have run and the streams are
    flushed: torch 2.13's DDP constructor keeps the gloo process group alive past ``destroy_process_group`` (its two
    run-loop threads and the TCP loop stay up; a bare DDP-wrapped ``Linear`` shows it), and destroying it among the
    interpreter's static destructors aborted, after all work was done, 4 of 140 two-rank test runs under CPU contention.
    """
    distributed = False
    try:
        main(*args)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if distributed:
        _exit_without_static_destructors()


def _exit_without_static_destructors() -> None:
    import atexit
    import logging
    import sys

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

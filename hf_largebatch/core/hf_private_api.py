"""The private Hugging Face / Accelerate / DeepSpeed names that hf_largebatch relies on, checked at import.

"Private" here also covers the ``Trainer`` attributes we set for HF to read (``loss_is_scaled_for_ga``,
``model_accepts_loss_kwargs``, ...): if HF stops reading one, setting it silently does nothing.

``LargeBatchTrainer`` overrides private ``Trainer`` methods. If a new transformers renames one, Python does not
complain: the override is simply never called, and resume or adaptive batch sizes go silently wrong. If it reorders
parameters that we pass on by position, the values land in the wrong parameters. So ``import hf_largebatch`` checks
every name below and refuses to import (``PrivateAPIError``) with the name, the installed version and the tested
range, rather than train wrongly.

How each kind is checked:

* a **method**: it exists on the owner class, the parameters we pass by position are its first ones in that order,
  and the ones we pass or read by name exist (``inspect.signature``);
* an **attribute** set inside methods (no class attribute to look at): the owner methods that set or read it mention
  ``self.<name>`` in their source. We check source, not an instance at trainer start, because (a) it needs no model
  and fails at import, before any training, (b) it also checks that HF still *reads* the flag where we need it read
  (``_prepare_for_training`` rebuilds the scheduler on a second ``train()`` only if ``_created_lr_scheduler``), which
  an instance cannot show, and (c) it can read DeepSpeed's source without importing DeepSpeed.

DeepSpeed is optional: its names are checked at import whenever it is installed, from its source files found with
``importlib.util.find_spec`` without importing it (``import deepspeed`` takes seconds and logs accelerator warnings).

To check another transformers version: ``.ci/check_transformers_range`` (README, "Supported versions").
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import warnings
from dataclasses import dataclass

# The versions the test suite has passed with; equal to pyproject.toml's requirements (tests/test_hf_private_api.py).
TESTED_RANGES = {"transformers": ">=5.19,<5.25", "accelerate": ">=1.10", "deepspeed": ">=0.16"}


class PrivateAPIError(ImportError):
    """An installed transformers / accelerate / DeepSpeed lacks a private name that hf_largebatch relies on."""


@dataclass(frozen=True)
class PrivateName:
    """One private name: ``owner`` is ``"module:Class"``; ``why`` says what goes wrong without it.

    A method when ``used_in`` is empty: ``positional`` are the parameters (after ``self``) that we pass by position,
    in order; ``keywords`` the ones we pass or read by name. An attribute otherwise: ``used_in`` are the owner's
    methods whose source must mention ``self.<name>``.
    """

    owner: str
    name: str
    why: str
    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    used_in: tuple[str, ...] = ()

    @property
    def package(self) -> str:
        return self.owner.split(".", 1)[0]


_TRAINER = "transformers.trainer:Trainer"

PRIVATE_API: tuple[PrivateName, ...] = (
    PrivateName(_TRAINER, "_run_epoch", "adaptive batch: where the sampler stands in each epoch (and on resume)",
                keywords=("epoch", "epochs_trained", "resume_from_checkpoint", "steps_in_epoch",
                          "steps_trained_in_current_epoch")),
    PrivateName(_TRAINER, "_init_training_state", "adaptive batch resume: the epoch and position to skip to",
                positional=("max_steps", "num_update_steps_per_epoch", "num_train_epochs", "resume_from_checkpoint",
                            "trial")),
    PrivateName(_TRAINER, "_track_num_input_tokens", "adaptive batch: num_input_tokens_seen counts all micro-batches",
                positional=("inputs",)),
    PrivateName(_TRAINER, "_get_dataloader", "dataloader_drop_last applies to training only, not to evaluation",
                positional=("dataset", "description", "batch_size"),
                keywords=("sampler_fn", "is_training", "dataloader_key")),
    PrivateName(_TRAINER, "_save_optimizer_and_scheduler", "checkpoints hold the algorithms' state",
                positional=("output_dir",)),
    PrivateName(_TRAINER, "_save_rng_state", "crash-safe checkpoints: every rank's files are whole before "
                "trainer_state.json, the last file written", positional=("output_dir",)),
    PrivateName(_TRAINER, "_load_optimizer_and_scheduler", "resume restores the algorithms' state",
                positional=("checkpoint",)),
    PrivateName(_TRAINER, "_get_grad_norm", "non-finite steps: the step's gradient norm, before the update, is "
                "where a NaN/inf gradient is detected and its update dropped", positional=("model", "grad_norm")),
    PrivateName("transformers.trainer_callback:ProgressCallback", "training_bar", "the progress bar on the "
                "schedule's clock (progress.py) moves and sizes HF's bar", used_in=("on_train_begin", "on_step_end")),
    PrivateName("transformers.trainer_callback:ProgressCallback", "current_step", "the progress bar on the "
                "schedule's clock (progress.py) counts from HF's position", used_in=("on_train_begin", "on_step_end")),
    PrivateName(_TRAINER, "_get_learning_rate", "the logged learning_rate is the LR the optimizer applied"),
    PrivateName(_TRAINER, "_prepare_inputs", "EXTRAP-SGD's local gradient pass moves its inputs to the device",
                positional=("inputs",)),
    PrivateName(_TRAINER, "_created_lr_scheduler",
                "tells our scheduler from a user's, and lets a second train() rebuild it",
                used_in=("__init__", "create_scheduler", "_prepare_for_training")),
    PrivateName(_TRAINER, "loss_is_scaled_for_ga", "split-invariant gradients: HF divides a per-micro-batch mean "
                "by the step's micro-batches and leaves our token-normalised loss alone", used_in=("training_step",)),
    PrivateName(_TRAINER, "model_accepts_loss_kwargs", "split-invariant gradients: the model never normalises by "
                "num_items_in_batch (loss.py does)", used_in=("compute_loss", "training_step")),
    PrivateName(_TRAINER, "current_gradient_accumulation_steps", "adaptive batch: HF divides the step's losses by "
                "our accumulation", used_in=("training_step",)),
    PrivateName(_TRAINER, "gather_function", "seq2seq evaluation gathers generated sequences of any length",
                used_in=("evaluation_loop",)),
    PrivateName("transformers.trainer_seq2seq:Seq2SeqTrainer", "_gen_kwargs",
                "seq2seq evaluation: generate()'s num_return_sequences decides how predictions are gathered",
                used_in=("evaluate", "predict")),
    PrivateName("accelerate.state:GradientState", "_set_sync_gradients",
                "adaptive batch: gradients sync on the last micro-batch of a step of our choosing",
                positional=("sync_gradients",)),
    PrivateName("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "_global_grad_norm",
                "ZeRO-1/2: the reduced gradient norm of on_reduced_gradients", used_in=("step",)),
    PrivateName("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "_global_grad_norm",
                "ZeRO-3: the reduced gradient norm of on_reduced_gradients", used_in=("step",)),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "_global_grad_norm",
                "ZeRO-1 with bf16: the reduced gradient norm of on_reduced_gradients", used_in=("step",)),
)

OPTIONAL_PACKAGES = ("deepspeed",)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _method_problem(entry: PrivateName) -> str | None:
    module, cls_name = entry.owner.split(":")
    try:
        owner = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError):
        return "is missing (its class is not found)"
    method = getattr(owner, entry.name, None)
    if not callable(method):
        return "is missing"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    leading = params[:len(entry.positional)]
    if leading != list(entry.positional):
        return f"takes {params}, we pass {list(entry.positional)} by position"
    missing = [k for k in entry.keywords if k not in params]
    return f"has no parameter {missing}" if missing else None


def _class_source(owner: str) -> tuple[list[str], ast.ClassDef] | None:
    """The source lines of ``owner``'s module and its class node, read without importing its package."""
    module, cls_name = owner.split(":")
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    base = os.path.join(spec.submodule_search_locations[0], *rest)
    path = next((p for p in (base + ".py", os.path.join(base, "__init__.py")) if os.path.isfile(p)), None)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        source = f.read()
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls_name), None)
    return None if node is None else (source.splitlines(), node)


def _attribute_problem(entry: PrivateName) -> str | None:
    found = _class_source(entry.owner)
    if found is None:
        return "is missing (its class is not found)"
    lines, cls = found
    methods = {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno])
               for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    mention = re.compile(rf"\bself\.{re.escape(entry.name)}\b")
    absent = [m for m in entry.used_in if not mention.search(methods.get(m, ""))]
    cls_name = entry.owner.split(":")[1]
    return f"is not used in {', '.join(f'{cls_name}.{m}' for m in absent)}" if absent else None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_private_api(table: tuple[PrivateName, ...] = PRIVATE_API) -> None:
    """Raise ``PrivateAPIError`` listing every entry of ``table`` that the installed packages do not match.

    Entries of an optional package that is not installed are skipped.
    """
    problems, packages = [], set()
    for entry in table:
        package = entry.package
        if package in OPTIONAL_PACKAGES and not _installed(package):
            continue
        try:
            problem = _attribute_problem(entry) if entry.used_in else _method_problem(entry)
        except (OSError, SyntaxError, ValueError, TypeError) as e:  # no readable source or signature
            warnings.warn(f"hf_largebatch could not verify {entry.owner}.{entry.name}: {e}", stacklevel=2)
            continue
        if problem:
            packages.add(package)
            problems.append(f"  {entry.owner.replace(':', '.')}.{entry.name} {problem} ({package} "
                            f"{_version(package)} installed, tested {package}{TESTED_RANGES[package]}); "
                            f"needed for: {entry.why}")
    if problems:
        wanted = " ".join(f"'{p}{TESTED_RANGES[p]}'" for p in sorted(packages))
        raise PrivateAPIError("hf_largebatch relies on private names that the installed versions changed, so its "
                              "training would go silently wrong:\n" + "\n".join(problems) +
                              f"\nInstall a tested version: pip install {wanted}")



check_private_api()  # at import: hf_largebatch/__init__.py imports this module first

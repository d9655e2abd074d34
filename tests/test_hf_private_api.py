"""The import-time check of the private HF names we override (hf_largebatch/hf_private_api.py).

A renamed or re-signed private ``Trainer`` method fails nothing by itself (the override is just never called), so
these tests break the installed API on purpose and require the check to name what broke; they also keep the table,
pyproject.toml's tested range and the installed versions in step.
"""

import dataclasses
import importlib.metadata
import inspect
import re
import subprocess
import sys

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from transformers import Seq2SeqTrainer, Trainer

import hf_largebatch.core.seq2seq_trainer
import hf_largebatch.core.trainer
from hf_largebatch import hf_private_api
from hf_largebatch.core.hf_private_api import PRIVATE_API, TESTED_RANGES, PrivateAPIError, check_private_api
from helpers import REPO

TRANSFORMERS_RANGE = f"transformers{TESTED_RANGES['transformers']}"


def _entry(name, owner_prefix="transformers"):
    return next(e for e in PRIVATE_API if e.name == name and e.owner.startswith(owner_prefix))


def _raises_naming(*fragments, table=PRIVATE_API):
    with pytest.raises(PrivateAPIError) as info:
        check_private_api(table)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_installed_versions_pass():
    check_private_api()


def test_every_hf_internal_we_use_is_in_the_table():
    """A new override of a private ``Trainer`` method, use of a private attribute, or attribute set for HF to read
    must be added to the table (``lr_scheduler`` is public constructor API)."""
    hf_source = inspect.getsource(transformers.trainer) + inspect.getsource(transformers.trainer_seq2seq)
    hf_names = set(dir(Seq2SeqTrainer)) | set(re.findall(r"self\.(_[a-z]\w*)\s*=", hf_source))
    hf_reads = set(re.findall(r"\bself\.(\w+)", hf_source))
    used, assigned = set(), set()
    for module in (hf_largebatch.core.trainer, hf_largebatch.core.seq2seq_trainer):
        source = inspect.getsource(module)
        used |= set(re.findall(r"\b(?:self|super\(\))\.(_[a-z]\w*)", source))
        used |= set(re.findall(r"getattr\(self, \"(_\w+)\"", source))
        assigned |= set(re.findall(r"\bself\.(\w+)\s*=(?!=)", source))
    relied_on = ((used & hf_names) | (assigned & hf_reads)) - {"lr_scheduler"}
    assert {"_run_epoch", "_gen_kwargs", "loss_is_scaled_for_ga"} <= relied_on  # the scan sees each kind
    assert relied_on <= {e.name for e in PRIVATE_API}


def test_missing_method_is_named_with_versions_and_remedy(monkeypatch):
    monkeypatch.delattr(Trainer, "_run_epoch")
    _raises_naming("Trainer._run_epoch is missing", f"transformers {transformers.__version__} installed",
                   f"tested {TRANSFORMERS_RANGE}", f"pip install '{TRANSFORMERS_RANGE}'")


def test_reordered_positional_parameters_are_named(monkeypatch):
    """We pass these on by position: a reorder would put values in the wrong parameters."""
    def reordered(self, num_update_steps_per_epoch, max_steps, num_train_epochs, resume_from_checkpoint, trial):
        pass

    monkeypatch.setattr(Trainer, "_init_training_state", reordered)
    _raises_naming("Trainer._init_training_state takes ['num_update_steps_per_epoch', 'max_steps'")


def test_renamed_keyword_parameter_is_named(monkeypatch):
    """We read ``kwargs["steps_trained_in_current_epoch"]``: a rename would raise KeyError only mid-training."""
    def renamed(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial,
                ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained, steps_skipped):
        pass

    monkeypatch.setattr(Trainer, "_run_epoch", renamed)
    _raises_naming("Trainer._run_epoch has no parameter ['steps_trained_in_current_epoch']")


def test_accelerate_method_is_checked(monkeypatch):
    from accelerate.state import GradientState
    monkeypatch.delattr(GradientState, "_set_sync_gradients")
    _raises_naming("GradientState._set_sync_gradients is missing", "accelerate", "pip install 'accelerate")


@pytest.mark.parametrize("owner", ["transformers", "deepspeed"])
def test_attribute_no_longer_in_the_source_is_named(owner):
    """Attributes are read from source: the same check on a name the methods never mention must fail."""
    if owner == "deepspeed" and not hf_private_api._installed("deepspeed"):
        pytest.skip("deepspeed is not installed")
    entry = _entry("_created_lr_scheduler" if owner == "transformers" else "_global_grad_norm", owner)
    gone = dataclasses.replace(entry, name=entry.name + "_renamed")
    cls = entry.owner.split(":")[1]
    _raises_naming(f"{cls}.{gone.name} is not used in {cls}.{entry.used_in[0]}", table=(entry, gone))


def test_deepspeed_names_are_skipped_when_deepspeed_is_not_installed(monkeypatch):
    broken = dataclasses.replace(_entry("_global_grad_norm", "deepspeed"), name="_renamed_norm")
    monkeypatch.setattr(hf_private_api, "_installed", lambda package: package != "deepspeed")
    check_private_api((broken,))
    broken_hf = dataclasses.replace(_entry("_created_lr_scheduler"), name="_renamed_flag")
    _raises_naming("_renamed_flag", table=(broken, broken_hf))  # transformers, required, is still checked


def test_import_of_hf_largebatch_runs_the_check():
    code = "import transformers; del transformers.Trainer._get_learning_rate; import hf_largebatch"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "PrivateAPIError" in run.stderr and "Trainer._get_learning_rate is missing" in run.stderr, run.stderr


def _pyproject_requirements():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["deepspeed"]
    return {r.name: r.specifier for r in map(Requirement, requirements)}


def test_tested_ranges_are_pyprojects():
    """The error message states pyproject.toml's range, not a stale copy."""
    declared = _pyproject_requirements()
    for package, tested in TESTED_RANGES.items():
        assert declared[package] == SpecifierSet(tested), package
    assert "99.0" not in declared["transformers"], "the transformers range needs a tested upper bound"


def test_installed_versions_lie_in_the_tested_ranges():
    for package, tested in TESTED_RANGES.items():
        if package in hf_private_api.OPTIONAL_PACKAGES and not hf_private_api._installed(package):
            continue
        version = importlib.metadata.version(package)
        assert version in SpecifierSet(tested), f"{package} {version} is untested: check it, then widen {tested}"

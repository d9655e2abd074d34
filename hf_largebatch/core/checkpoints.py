"""Which checkpoints are complete, so that a run killed at any moment resumes from a whole one.

HF writes a checkpoint's files one after another into ``checkpoint-N`` and ``trainer_state.json`` last (then it
deletes older checkpoints); ``LargeBatchTrainer`` adds a barrier after every rank's own files (its algorithm state
and RNG state), so a readable ``trainer_state.json`` means every file of the checkpoint is whole. A kill before or
while it is written leaves a folder without it, or with it cut short: that checkpoint is incomplete, and
``resume_from_checkpoint=True`` takes the newest complete one instead of HF's newest folder, saying which it
skipped.
"""

from __future__ import annotations

import json
import os
import re

from transformers.trainer import TRAINER_STATE_NAME as TRAINER_STATE

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None if it is."""
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(path):
        return f"{TRAINER_STATE} is missing (its save was interrupted)"
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is cut short or unreadable (its save was interrupted)"
    return None


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete ``checkpoint-N`` in ``output_dir`` or None, the newer ones skipped with the reason)."""
    if not os.path.isdir(output_dir):
        return None, []
    numbered = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                       if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                      reverse=True)
    skipped = []
    for _, name in numbered:
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped

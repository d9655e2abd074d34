"""Real datasets that work offline, found under ``$HF_LARGEBATCH_DATA`` (default: ``../shared/data`` beside the
checkout, i.e. the folder ``shared/data`` next to the repository).

Loaders live in one module per modality (``images.py``, ``text.py``, ``translation.py``); all of them locate their
files through ``dataset_dir`` so a missing dataset fails before any work with the path searched and the variable
to set.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "HF_LARGEBATCH_DATA"


def data_root() -> Path:
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    return (Path(__file__).resolve().parents[3] / "shared" / "data").resolve()


def dataset_dir(name: str, required: tuple[str, ...] = ()) -> Path:
    """``<data root>/<name>``, checked to hold ``required`` files; a clear error otherwise."""
    folder = data_root() / name
    missing = [f for f in required if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        what = f"{folder} does not exist" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"dataset {name!r} not found: {what}. Set {DATA_ENV} to the folder that holds {name}/ "
            f"(searched {data_root()})."
        )
    return folder

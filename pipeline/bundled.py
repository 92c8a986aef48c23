"""The one place that knows what the default "bundled" model is and where it lives.

Until a trained reference model exists, the bundled model is the tiny random-weight LLaVA-1.5 of
`reducers.tiny`, built deterministically on first use into a cache folder. Every node builds the same weights
(fixed seed), so actors on other machines of a cluster need no shared disk.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUNDLED_MODEL = "bundled"


def cache_dir() -> Path:
    """$TRIMLENS_CACHE, else ~/.cache/trimlens."""
    return Path(os.environ.get("TRIMLENS_CACHE", Path.home() / ".cache" / "trimlens"))


def bundled_model_path() -> Path:
    """Path of the bundled model, built if missing. Safe when several actors race: built aside, then renamed."""
    path = cache_dir() / "tiny-llava-1.5"
    if not (path / "config.json").exists():
        from transformers.utils import logging

        from reducers.tiny import save_tiny  # torch + transformers: imported only when a build is needed

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=path.parent, prefix=".building-")
        logging.disable_progress_bar()  # a job's stderr is for the job, not for a 5 MB save
        save_tiny(staging)
        logging.enable_progress_bar()
        try:
            os.rename(staging, path)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return path


def resolve_model(model: str) -> str:
    """The path or hub id to give `from_pretrained` for the --model setting."""
    return str(bundled_model_path()) if model == BUNDLED_MODEL else model

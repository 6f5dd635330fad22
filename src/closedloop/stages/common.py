"""Helpers every stage module uses: opening a model for generation, copying a checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from closedloop.io import atomic_dir


def open_backend(params: Any, root: Path, model_dir: str | Path, batch_size: int, show_progress: bool = False):
    """The default generation backend over the checkpoint at model_dir, in model.dtype."""
    from closedloop.generate import DEFAULT_BACKEND, make_backend
    from closedloop.models import load_model

    model, tok = load_model(root / model_dir, dtype=params.model.dtype,
                            trust_remote_code=params.model.trust_remote_code)
    return make_backend(DEFAULT_BACKEND, model, tok, batch_size=batch_size, show_progress=show_progress)


def copy_model(src: Path, dst: Path) -> None:
    """Place a checkpoint copy at dst (hard links where possible: same bytes, no extra disk)."""
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]

"""Helpers every stage module uses: opening a model for generation, copying a checkpoint, logging
a training run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from closedloop.io import atomic_dir, write_json


def open_backend(params: Any, root: Path, model_dir: str | Path, batch_size: int, show_progress: bool = False):
    """The default generation backend over the checkpoint at model_dir, in model.dtype."""
    from closedloop.backends import DEFAULT_BACKEND, make_backend
    from closedloop.models import load_model

    model, tok = load_model(root / model_dir, dtype=params.model.dtype,
                            trust_remote_code=params.model.trust_remote_code)
    return make_backend(DEFAULT_BACKEND, model, tok, batch_size=batch_size, show_progress=show_progress)


def log_training(metrics: dict, out: Path) -> None:
    """A trainer's metrics (feedback/*.py): its loss curve as MLflow steps, the rest to `out` (the
    stage's DVC metrics file) and to MLflow (the numbers)."""
    import mlflow

    for step, loss in metrics.pop("loss_history", []):
        mlflow.log_metric("train_loss", loss, step=step)
    write_json(out, metrics)
    mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def copy_model(src: Path, dst: Path) -> None:
    """Place a checkpoint copy at dst (hard links where possible: same bytes, no extra disk)."""
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)


def scored_samples(path: Path, where: str) -> list[dict]:
    """Sampled responses with a verifier's score (e.g. RFT's data/rft/scored.jsonl), checked line by line."""
    from closedloop.errors import UserError
    from closedloop.io import iter_jsonl

    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [k for k in ("key", "prompt", "response", "score") if not isinstance(row, dict) or k not in row]
        if missing or not isinstance(row["score"], (int, float)) or isinstance(row["score"], bool):
            raise UserError(f"{where}: {path.name}:{lineno}: expected key, prompt, response and a numeric "
                            f"score (a verifier's output, e.g. data/rft/scored.jsonl); missing or bad: "
                            f"{missing or ['score']}")
        rows.append(row)
    return rows


def eval_records(root: Path, name: str, suite: str, where: str) -> dict[str, dict]:
    """{example key: record} of eval@<name>'s records in one suite (data/eval/<name>/records.jsonl)."""
    from closedloop.errors import UserError
    from closedloop.io import read_jsonl

    path = root / "data/eval" / name / "records.jsonl"
    if not path.is_file():
        raise UserError(f"{where}: no evaluation records at {path} (is {name!r} in evaluate.models?)")
    return {str(r["key"]): r for r in read_jsonl(path) if r["suite"] == suite}


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]

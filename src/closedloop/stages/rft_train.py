"""Stage `rft_train` (feedback): LoRA SFT through TRL on the verified samples -> models/rft."""

from pathlib import Path

import mlflow

from closedloop.errors import UserError
from closedloop.feedback.sft import train_sft
from closedloop.io import atomic_dir, read_jsonl, write_json

SECTIONS = ("seed", "sft")
BASE = Path("models/base")
KEPT = Path("data/rft/sft.jsonl")
OUT = Path("models/rft")
METRICS = Path("data/rft/train_metrics.json")


def run(params, root: Path, stage: str) -> None:
    rows = read_jsonl(root / KEPT)
    if not rows:
        raise UserError(f"{KEPT}: no verified samples to train on; lower rft.threshold or raise rft.num_samples")
    examples = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows]
    with atomic_dir(root / OUT) as tmp:
        metrics = train_sft(root / BASE, examples, tmp, params.sft, seed=params.seed, dtype=params.model.dtype)
        for step, loss in metrics.pop("loss_history"):
            mlflow.log_metric("train_loss", loss, step=step)
        mlflow.log_artifacts(str(tmp), artifact_path="adapter")
    write_json(root / METRICS, metrics)
    mlflow.log_metrics(metrics)

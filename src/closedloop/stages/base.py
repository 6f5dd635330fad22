"""Stage `base`: materialise model.base into models/base as safetensors + tokenizer."""

from pathlib import Path

import mlflow

from closedloop.io import atomic_dir
from closedloop.models import materialise_base

SECTIONS = ("model",)
OUT = Path("models/base")


def run(params, root: Path, stage: str) -> None:
    with atomic_dir(root / OUT) as tmp:
        info = materialise_base(params.model.base, tmp, trust_remote_code=params.model.trust_remote_code)
    mlflow.log_params({"base.source": info["source"], "base.architecture": info["architecture"]})
    mlflow.log_metric("num_parameters", info["num_parameters"])

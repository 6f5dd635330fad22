"""One module per DVC stage. Each defines SECTIONS (the params it reads, logged to MLflow) and
`run(params, root)`, which reads its inputs, calls the library and writes its outputs atomically."""

from __future__ import annotations

import importlib
from types import ModuleType

from closedloop.errors import UserError

STAGES = ("base", "prepare", "rft_sample", "rft_verify", "rft_train", "eval_base", "eval_rft", "report")


def get_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise UserError(f"stage {name!r}: unknown (expected one of: {', '.join(STAGES)})")
    module = "evaluate" if name.startswith("eval_") else name
    return importlib.import_module(f"closedloop.stages.{module}")

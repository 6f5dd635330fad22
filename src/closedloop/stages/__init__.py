"""One module per DVC stage. Each defines SECTIONS (the params it reads, logged to MLflow) and
`run(params, root)`, which reads its inputs, calls the library and writes its outputs atomically."""

from __future__ import annotations

import importlib
from types import ModuleType

from closedloop.errors import UserError

STAGES = ("base", "prepare", "rft_sample", "rft_verify", "rft_train", "eval_base", "eval_rft", "report")
# Per-iteration stages are named `<step>@<iteration>` (dvc.yaml foreach over spar.iterations).
SPAR_STAGES = ("spar_init", "spar_sample", "spar_judge", "spar_refine", "spar_pairs", "spar_actor", "spar_refiner",
               "spar_eval")


def get_stage(name: str) -> ModuleType:
    step = name.partition("@")[0]
    if step in SPAR_STAGES:
        return importlib.import_module("closedloop.stages.spar")
    if name not in STAGES:
        raise UserError(f"stage {name!r}: unknown (expected one of: {', '.join(STAGES + SPAR_STAGES)})")
    module = "evaluate" if name.startswith("eval_") else name
    return importlib.import_module(f"closedloop.stages.{module}")

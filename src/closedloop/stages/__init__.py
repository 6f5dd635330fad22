"""DVC stage commands, one module per method (plus `shared`), discovered by name.

Each module defines `STAGES = {"<step>": function}`. A dvc.yaml stage named `<step>` (or
`<step>@<key>` when it is a `foreach` expansion) runs `function(params, root, key)`, where
`params` is a view holding only the params that stage declares in dvc.yaml (see
`closedloop.stage_params`) and `key` is the foreach key (None for a plain stage). The function
reads its inputs, calls its method's recipe, writes its outputs atomically and logs to MLflow.

Adding a method adds a module here; nothing in this file or in flows/ and tasks/ changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from closedloop.errors import UserError

StageFn = Callable[[Any, Path, "str | None"], None]


@cache
def registry() -> dict[str, StageFn]:
    """{step name: function} over every stage module; a step defined twice is a bug."""
    steps: dict[str, StageFn] = {}
    owner: dict[str, str] = {}
    for mod in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        for step, fn in getattr(module, "STAGES", {}).items():
            if step in steps:
                raise RuntimeError(f"stage {step!r} is defined by both {owner[step]} and {mod.name}")
            steps[step], owner[step] = fn, mod.name
    return steps


def get_stage(name: str) -> tuple[StageFn, str | None]:
    """(function, foreach key) for a dvc.yaml stage name such as `rft_sample` or `eval@base`."""
    step, at, key = name.partition("@")
    fn = registry().get(step)
    if fn is None:
        raise UserError(f"stage {name!r}: unknown (expected one of: {', '.join(sorted(registry()))}, "
                        "optionally with @<key>)")
    return fn, (key if at else None)

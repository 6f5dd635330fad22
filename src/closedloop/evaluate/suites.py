"""Evaluation suites, looked up by name (lm-evaluation-harness style).

A suite turns one model (a generation backend) into per-example records:
`{"suite", "key", "scores": {metric: [numerator, denominator]}, "breakdown": {group: [num, den]}, ...}`.
Every metric is a ratio of sums over examples, so one bootstrap (evaluate.bootstrap) gives each
model's interval and the paired difference between models. The `eval@<model>` stages run every
suite in `evaluate.suites`; the `compare` stage makes one table per suite with the models as rows.
A new suite is a module in closedloop/evaluate/ that calls `register_suite`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Protocol

from closedloop.errors import UserError


class Suite(Protocol):
    name: str
    metrics: tuple[str, ...]  # the headline metrics, in table order
    breakdown_label: str  # what a breakdown group is, for the report ("instruction id")

    def load(self, params: Any, root: Path) -> list[dict]:
        """Read and validate the suite's examples, before the model loads: bad input fails in one
        line, naming the param and file, without paying for a model load first."""
        ...

    def run(self, params: Any, examples: list[dict], backend: Any) -> list[dict]:
        """Score the model behind `backend` on `examples` (from `load`); one record per example."""
        ...

    def summary(self, records: list[dict]) -> dict[str, float]:
        """Figures of the whole set that are not ratios of sums (an AUC), logged beside the
        metrics; {} for none."""
        ...


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def suite_names() -> list[str]:
    import closedloop.evaluate as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):  # suites register on import
        importlib.import_module(f"closedloop.evaluate.{mod.name}")
    return sorted(_SUITES)


def get_suite(name: str) -> Suite:
    if name not in suite_names():
        raise UserError(f"evaluate.suites: unknown suite {name!r} (known: {', '.join(sorted(_SUITES))})")
    return _SUITES[name]

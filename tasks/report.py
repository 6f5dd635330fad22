"""Publish the results (the `report` stage's RFT table, the last SPAR iteration's curve) as a
Prefect artifact, and return them for the flow's printed summary."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from closedloop.evaluate.instruction_following import METRICS as CURVE_KEYS

RESULTS = Path("data/report/results.md")


def spar_table(root: Path, iterations: list[str]) -> str | None:
    """Markdown: one row per SPAR iteration (init = the base model), IFEval metrics in %."""
    for name in reversed(iterations):
        path = root / "data/spar" / name / "curve.json"
        if path.is_file():
            curve = json.loads(path.read_text())
            lines = ["| SPAR iteration | " + " | ".join(CURVE_KEYS) + " | refiner judge F1 |",
                     "|---|" + "---|" * (len(CURVE_KEYS) + 1)]
            for point in curve:
                f1 = point.get("refiner_judge_f1")
                lines.append(f"| {point['iteration']} | " + " | ".join(f"{100 * point[k]:.1f}" for k in CURVE_KEYS)
                             + f" | {'-' if f1 is None else f'{f1:.2f}'} |")
            return "\n".join(lines) + "\n"
    return None


@task(name="publish-results", cache_policy=NO_CACHE)
def publish_results(root: str, mlflow_ui: str, spar_iterations: list[str]) -> str | None:
    parts = []
    if (Path(root) / RESULTS).is_file():
        parts.append("RFT, base vs after RFT (IFEval %, 95% bootstrap CI):\n\n" + (Path(root) / RESULTS).read_text())
    if table := spar_table(Path(root), spar_iterations):
        parts.append("SPAR, per iteration (IFEval %):\n\n" + table)
    if not parts:
        return None
    text = "\n".join(parts)
    create_markdown_artifact(key="closedloop-results", markdown=text + f"\n\nMLflow UI: `{mlflow_ui}`\n",
                             description="IFEval metrics: base vs RFT, and the SPAR iteration curve")
    return text

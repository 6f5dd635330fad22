"""Publish the results table (written by the `report` stage) as a Prefect artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

RESULTS = Path("data/report/results.md")


@task(name="publish-results", cache_policy=NO_CACHE)
def publish_results(root: str, mlflow_ui: str) -> str | None:
    path = Path(root) / RESULTS
    if not path.is_file():
        return None
    table = path.read_text()
    create_markdown_artifact(key="closedloop-results", markdown=table + f"\n\nMLflow UI: `{mlflow_ui}`\n",
                             description="IFEval metrics: base vs after RFT (95% bootstrap intervals)")
    return table

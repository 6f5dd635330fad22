"""Publish the comparison report (the `compare` stage's data/compare/report.md, which `dvc repro`
produces on its own) as a Prefect artifact, and return it for the flow's printed summary."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

REPORT = Path("data/compare/report.md")


@task(name="publish-results", cache_policy=NO_CACHE)
def publish_results(root: str, mlflow_ui: str) -> str | None:
    path = Path(root) / REPORT
    if not path.is_file():
        return None
    text = path.read_text()
    create_markdown_artifact(key="closedloop-results", markdown=text + f"\n\nMLflow UI: `{mlflow_ui}`\n",
                             description="Every evaluated model against the reference, paired bootstrap intervals")
    return text

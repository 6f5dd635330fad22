"""The pipeline's parent MLflow run and the lineage tags added once DVC has locked a stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from closedloop import tracking
from closedloop.models import model_id


@contextlib.contextmanager
def parent_run(root: Path, params, flow_run_id: str, targets: list[str]) -> Iterator[Any]:
    tracking.setup(root, params.tracking.tracking_uri, params.tracking.experiment)
    tags = tracking.lineage_tags(root, None, model_id(root / params.model.base))
    tags |= {tracking.TAG_FLOW_RUN: flow_run_id, tracking.TAG_KIND: "pipeline"}
    run = mlflow.start_run(run_name="pipeline", tags=tags)
    status, store = "FAILED", None
    try:
        store = tracking.store_identity(root, params.tracking.tracking_uri)
        mlflow.log_params({"targets": ",".join(targets) or "all"} |
                          {k: ("null" if v is None else v) for k, v in tracking.flatten(params.as_dict()).items()})
        yield run.info  # run_id, experiment_id
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except MlflowException:
            # a store deleted or replaced under the flow (the flow stops on it) has no run to end
            if tracking.store_identity(root, params.tracking.tracking_uri) == store:
                raise


@task(name="tag-lineage", cache_policy=NO_CACHE)
def tag_lineage(root: str, params, parent_run_id: str, stage: str, span: tuple[float, float]) -> str | None:
    """The stage's dvc.lock hash, and when the flow started and saw the end of its `dvc repro`
    (epoch seconds: with concurrent stages, which ran beside which)."""
    return tracking.tag_lock_hash(Path(root), params.tracking.tracking_uri, params.tracking.experiment,
                                  parent_run_id, stage, {tracking.TAG_FLOW_STARTED: f"{span[0]:.3f}",
                                                         tracking.TAG_FLOW_ENDED: f"{span[1]:.3f}"})

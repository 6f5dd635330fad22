"""The pipeline flow: one Prefect task per DVC stage, in the order dvc.yaml's graph gives.

    python flows/pipeline.py                      # the whole graph
    python flows/pipeline.py --target rft         # one method: its stages, its evaluation, and what they need

The graph is read from dvc.yaml through DVC's own API, never copied by hand. params.yaml is
validated before any compute. One parent MLflow run per flow run; each stage opens a nested run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import _bootstrap  # sets PREFECT_HOME and offline variables before prefect loads

if __name__ == "__main__":
    _bootstrap.check_params_or_exit(sys.argv[1:])

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from closedloop import tracking
from closedloop.config import load_params
from closedloop.errors import UserError
from tasks.dvc_stage import run_stage
from tasks.report import publish_results
from tasks.tracking import parent_run, tag_lineage

ROOT = _bootstrap.ROOT


def stage_graph(root: Path) -> tuple[dict[str, list[str]], dict[str, str], set[str]]:
    """({stage: [upstream stages]} in dvc.yaml order, {stage: its meta.method}, stages DVC reports
    as changed now), all from DVC's own API in one pass over the index."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        upstream = {s.name: sorted(u.name for u in graph.successors(s) if isinstance(u, PipelineStage))
                    for s in stages}
        methods = {s.name: (s.meta or {}).get("method", "shared") for s in stages}
        stale = {name.split(":")[-1] for name in repo.status()}
    return upstream, methods, stale


def _ancestry(graph: dict[str, list[str]], stages: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(stages)
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(graph[s])
    return seen


def resolve_targets(graph: dict[str, list[str]], methods: dict[str, str], targets: list[str],
                    stale: set[str] = frozenset()) -> set[str]:
    """The stages the targets stand for (before adding their ancestry).

    A target is a stage name (`eval@rft`), a foreach group (`eval` = every eval@*), or a method
    name from dvc.yaml's `meta.method`: its own stages plus the shared stages downstream of them
    (its evaluation, the comparison) whose other inputs are up to date, so `--target rft` never
    runs another method's stages."""
    selected: set[str] = set()
    for t in targets:
        named = {s for s in graph if s == t or s.partition("@")[0] == t}
        own = {s for s in graph if methods[s] == t}
        if not named and not own:
            raise UserError(f"dvc.yaml: no stage or method named {t!r} (methods: "
                            f"{', '.join(sorted(set(methods.values())))}; stages: {', '.join(graph)})")
        selected |= named | own
        if own:
            for s in graph:
                if methods[s] != "shared" or s in selected:
                    continue
                ancestry = _ancestry(graph, {s}) - {s}
                if ancestry & own and all(methods[a] in ("shared", t) or a not in stale for a in ancestry):
                    selected.add(s)
    return selected


def execution_order(graph: dict[str, list[str]], methods: dict[str, str] | None = None,
                    targets: list[str] | None = None, stale: set[str] = frozenset()) -> list[str]:
    """Topological order (dvc.yaml order among ready stages), restricted to the targets' ancestry."""
    methods = methods or {s: "shared" for s in graph}
    wanted = _ancestry(graph, resolve_targets(graph, methods, targets, stale)) if targets else set(graph)
    order: list[str] = []
    while len(order) < len(wanted):
        ready = [s for s in graph if s in wanted and s not in order and all(u in order for u in graph[s])]
        if not ready:
            raise UserError("dvc.yaml: the stage graph has a cycle")
        order.append(ready[0])
    return order


def mlflow_ui_command(params) -> str:
    uri = params.tracking.tracking_uri or tracking.default_tracking_uri(ROOT)
    return f"{shlex.quote(str(Path(sys.executable).parent / 'mlflow'))} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


@flow(name="closedloop-pipeline", log_prints=True)
def pipeline(targets: list[str] | None = None) -> dict:
    logger = get_run_logger()
    params = load_params(ROOT / "params.yaml")  # before any compute
    graph, methods, stale = stage_graph(ROOT)
    order = execution_order(graph, methods, targets, stale)
    logger.info("stages: %s", " -> ".join(order))
    flow_run_id = str(flow_run.get_id() or "")
    executed: list[str] = []
    with parent_run(ROOT, params, flow_run_id, targets or []) as parent_id:
        env = {tracking.PARENT_RUN_ENV: parent_id, tracking.FLOW_RUN_ENV: flow_run_id}
        for stage in order:
            # DVC decides: a stage it reported clean, none of whose upstream stages ran now, is
            # still clean, so its task need not start `dvc repro` to hear that again.
            known_clean = stage not in stale and not any(u in executed for u in graph[stage])
            result = run_stage(stage, str(ROOT), env, known_clean)
            if result["ran"]:
                executed.append(stage)
                tag_lineage(str(ROOT), params, parent_id, stage)
        ui = mlflow_ui_command(params)
        table = publish_results(str(ROOT), ui)
    logger.info("stages run: %s", ", ".join(executed) or "none")
    return {"executed": executed, "parent_run_id": parent_id, "order": order, "table": table, "mlflow_ui": ui}


def print_summary(result: dict) -> None:
    if result["table"]:
        print("\n" + result["table"])
    print(f"stages run: {', '.join(result['executed']) or 'none (everything up to date)'}")
    print(f"Open the MLflow UI on these runs:\n  {result['mlflow_ui']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", default=None,
                    help="a stage, a foreach group (eval) or a method (rft, spar, ...) to bring up to date (repeatable)")
    args = ap.parse_args(argv)
    try:
        print_summary(pipeline(targets=args.target))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import _bootstrap  # sets PREFECT_HOME and offline variables before prefect loads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", default=None,
                    help="a stage, a foreach group (eval) or a method (rft, spar, ...) to bring up to date (repeatable)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    _bootstrap.check_inputs_or_exit(parse_args().target or [])

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from closedloop import tracking
from closedloop.cache import state_dir
from closedloop.config import MAX_PARALLEL_STAGES, load_params
from closedloop.errors import UserError
from closedloop.stage_server import serving
from stage_graph import execution_order, stage_graph
from tasks.dvc_stage import run_stage
from tasks.report import publish_results
from tasks.tracking import parent_run, tag_lineage

ROOT = _bootstrap.ROOT


@dataclass(frozen=True)
class FlowInputs:
    """What the flow's parent MLflow run stands for, as the flow found it at its start: the bytes of
    params.yaml (its stages re-read the file) and the SQLite file that holds the parent run (each
    stage opens that path afresh)."""

    params: bytes
    store: tuple[int, int] | None  # the store file's (device, inode); None for a server or a missing file


def flow_inputs(params) -> FlowInputs:
    try:
        text = (ROOT / "params.yaml").read_bytes()
    except OSError:  # gone, or being replaced: changed either way
        text = b""
    return FlowInputs(text, tracking.store_identity(ROOT, params.tracking.tracking_uri))


def stop_if_changed(at_start: FlowInputs, params, executed: list[str]) -> None:
    """Stop the flow, with one clear error, if params.yaml or the MLflow store is not what it started with.

    A changed params.yaml (`dvc exp run -S seed=1` beside the flow changes it even when it fails on
    DVC's lock; an editor's save) would make later stages compute with params the parent run does
    not record; a deleted or replaced store file would send later stages' runs to a store without
    the parent run. Holding them fixed is not ours to do: they are the user's."""
    done = f"Stages this flow ran: {', '.join(executed)}. " if executed else ""
    again = "Run the flow again to bring every stage up to date."
    now = flow_inputs(params)
    if now.params != at_start.params:
        import yaml

        try:
            before, after = (tracking.flatten(yaml.safe_load(b) or {}) for b in (at_start.params, now.params))
            keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        except (yaml.YAMLError, AttributeError):  # not a mapping any more: say so without the keys
            keys = []
        what = f" ({', '.join(keys)})" if keys else ""
        raise UserError(f"{ROOT / 'params.yaml'}: changed while this flow ran{what} (`dvc exp run -S`, which "
                        "changes it even when it fails on DVC's lock, or an edit); the flow stops so that no "
                        f"stage computes with params its MLflow run does not record. {done}{again}")
    if now.store != at_start.store and at_start.store is not None:
        store = tracking.sqlite_path(params.tracking.tracking_uri or tracking.default_tracking_uri(ROOT))
        raise UserError(f"{store}: deleted or replaced while this flow ran, with the flow's parent MLflow run in "
                        f"it; the flow stops so that its stages' runs do not go to a store without it. {done}{again}")


def run_stages(order: list[str], graph: dict[str, list[str]], stale: set[str], slots: list[dict[str, str]],
               env: dict[str, str], check: Callable[[], None]) -> Iterator[tuple[str, dict, tuple[float, float]]]:
    """Run the stages, each once its upstream stages are done, as many at once as there are slots
    (`launch.parallel_stages`; each slot's environment adds its devices); yields (stage, result,
    (start, end) in epoch seconds) as each ends. With one slot the stages run one after another in
    `order`.

    Concurrent `dvc repro -s` processes keep DVC's records exact: DVC holds its repository lock
    while it checks a stage and writes dvc.lock, and releases it while the stage's command runs
    (`dvc.stage.decorators.unlocked_repo`), with the stage's dependencies and outputs locked for
    reading and writing. `check` (that the flow's inputs are unchanged) runs before each start and
    after the last end. A failed stage starts nothing more; the ones running finish, then its error
    is raised."""
    pending, done, ran = list(order), set(), set()
    free, running = list(slots), {}
    failure: BaseException | None = None
    while pending or running:
        while failure is None and free:
            ready = next((s for s in pending if all(u in done for u in graph[s])), None)
            if ready is None:
                break
            try:
                check()
            except UserError as e:  # the ones running finish first: their outputs are good
                failure = e
                break
            pending.remove(ready)
            # DVC decides: a stage it reported clean, none of whose upstream stages ran now, is
            # still clean, so its task need not start `dvc repro` to hear that again.
            known_clean = ready not in stale and not any(u in ran for u in graph[ready])
            slot = free.pop(0)
            running[run_stage.submit(ready, str(ROOT), {**env, **slot}, known_clean)] = (ready, slot, time.time())
        if not running:
            break
        future = next(as_completed(list(running)))
        stage, slot, started = running.pop(future)
        free.append(slot)
        try:
            result = future.result()
        except Exception as e:
            failure = failure or e
            continue
        done.add(stage)
        if result["ran"]:
            ran.add(stage)
        yield stage, result, (started, time.time())
    if failure is not None:
        check()  # such a change explains the failure best
        raise failure
    check()  # the last stage read them too


def mlflow_ui_command(params, experiment_id: str) -> str:
    """The command that serves the MLflow UI on this project's store, and the page to open."""
    uri = params.tracking.tracking_uri or tracking.default_tracking_uri(ROOT)
    mlflow_bin = shlex.quote(str(Path(sys.executable).parent / "mlflow"))
    return (f"{mlflow_bin} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
            f"  then open {tracking.experiment_url('http://127.0.0.1:5000', experiment_id)}")


# a thread per running stage task (each waits on its `dvc repro`); run_stages bounds how many run
@flow(name="closedloop-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_STAGES))
def pipeline(targets: list[str] | None = None) -> dict:
    logger = get_run_logger()
    params_text = (ROOT / "params.yaml").read_bytes()
    params = load_params(ROOT / "params.yaml")  # before any compute
    stages = stage_graph(ROOT)
    graph, methods, stale = stages.upstream, stages.methods, stages.stale
    order = execution_order(graph, methods, targets, stale)
    logger.info("stages: %s", " -> ".join(order))
    flow_run_id = str(flow_run.get_id() or "")
    executed: list[str] = []
    # its stages fork from a stage server, which saves each 6-8 s of imports (docs/usage.md)
    with (parent_run(ROOT, params, flow_run_id, targets or []) as parent,
          serving(state_dir(ROOT) / "stage-server.log") as server_env):
        parent_id = parent.run_id
        # the store exists now: parent_run made it
        at_start = FlowInputs(params_text, tracking.store_identity(ROOT, params.tracking.tracking_uri))
        env = {tracking.PARENT_RUN_ENV: parent_id, tracking.FLOW_RUN_ENV: flow_run_id, **server_env}
        for stage, result, span in run_stages(order, graph, stale, params.launch.slots(), env,
                                              lambda: stop_if_changed(at_start, params, executed)):
            if result["ran"]:
                executed.append(stage)
                tag_lineage(str(ROOT), params, parent_id, stage, span)
        ui = mlflow_ui_command(params, parent.experiment_id)
        table = publish_results(str(ROOT), ui)
    logger.info("stages run: %s", ", ".join(executed) or "none")
    return {"executed": executed, "parent_run_id": parent_id, "order": order, "table": table, "mlflow_ui": ui}


def print_summary(result: dict) -> None:
    if result["table"]:
        print("\n" + result["table"])
    print(f"stages run: {', '.join(result['executed']) or 'none (everything up to date)'}")
    print(f"Open the MLflow UI on these runs:\n  {result['mlflow_ui']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from closedloop.cache import ensure_cache_dir

    ensure_cache_dir(ROOT)  # finished stages outlive this checkout (closedloop.cache)
    _bootstrap.prepare_temporary_server()
    try:
        print_summary(pipeline(targets=args.target))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MLflow helpers: one run per stage (nested under the pipeline's parent run when there is one),
lineage tags that lead from a run back to the exact `dvc repro` that made it.

Tags set here: closedloop.git_commit, closedloop.dvc_stage, closedloop.prefect_flow_run_id,
closedloop.base_model, closedloop.process, closedloop.num_processes, closedloop.dvc_exp (under
`dvc exp run`). The DVC lock hash (closedloop.dvc_lock_md5) is known only once DVC has written
dvc.lock after the stage, so the orchestrator adds it (see `tag_lock_hash`), with when it started
and saw the end of the stage's `dvc repro` (closedloop.flow_started, closedloop.flow_ended).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PARENT_RUN_ENV = "CLOSEDLOOP_PARENT_RUN_ID"
FLOW_RUN_ENV = "CLOSEDLOOP_PREFECT_FLOW_RUN_ID"

TAG_COMMIT = "closedloop.git_commit"
TAG_STAGE = "closedloop.dvc_stage"
TAG_LOCK = "closedloop.dvc_lock_md5"
# when the flow started a stage's `dvc repro` and saw it end (epoch seconds)
TAG_FLOW_STARTED, TAG_FLOW_ENDED = "closedloop.flow_started", "closedloop.flow_ended"
TAG_FLOW_RUN = "closedloop.prefect_flow_run_id"
TAG_BASE_MODEL = "closedloop.base_model"
TAG_KIND = "closedloop.run_kind"  # "pipeline" or "stage"
TAG_PARAMS_READ = "closedloop.params_read"  # the param keys the stage's code read (tests compare with dvc.yaml)
TAG_PROCESS = "closedloop.process"  # host:pid:start time of the process that opened the run
TAG_PROCESSES = "closedloop.num_processes"  # the processes a stage ran in (WORLD_SIZE under a launcher)
TAG_DVC_EXP = "closedloop.dvc_exp"  # the `dvc exp run` experiment a stage ran in: filter a sweep in the UI
# The experiment's kind, for MLflow UIs that honour it. 3.17's GenAI/Model-training switch
# overrides it, so the link the flow prints also carries ?workflowType= (see experiment_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# Never logged, whatever section they appear in.
_SECRET_HINTS = ("token", "password", "secret", "api_key", "apikey", "credential")


def store_root(root: Path) -> Path:
    """Where the project's MLflow store lives. `dvc exp run --queue` runs stages in a temporary
    copy of the workspace and sets DVC_ROOT to the project it came from: a sweep's runs belong in
    the project's store, not in a copy that is deleted afterwards."""
    return Path(os.environ.get("DVC_ROOT") or root)


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(store_root(root) / 'mlflow.db').resolve()}"


# How long a SQLite store another process holds locked is waited for. MLflow's sessions set their
# own busy timeout, 20 s (mlflow.store.db.utils); opening the store (its schema check) had sqlite3's
# 5 s and failed stages beside a long write, so the URI gives the connection the same 20 s.
SQLITE_BUSY_SECONDS = 20


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///...` store URI; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]).resolve()


def store_identity(root: Path, tracking_uri: str | None) -> tuple[int, int] | None:
    """The (device, inode) of the project's SQLite store file: it changes when the file is deleted
    or replaced. None for a store that is not a SQLite file, or a file not yet made."""
    path = sqlite_path(tracking_uri or default_tracking_uri(root))
    try:
        st = path.stat() if path is not None else None
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if st is not None else None


def waiting_for_locks(uri: str) -> str:
    """A SQLite store's URI with a busy timeout (SQLAlchemy passes `timeout` on to sqlite3), unless it
    names one; other stores as they are."""
    if not uri.startswith("sqlite:") or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_SECONDS}"


def setup(root: Path, tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at the project's store and experiment (created as a model-training
    experiment); returns the experiment id. Serialised by a file lock: two processes creating a
    fresh SQLite store at once race on its schema ("table ... already exists")."""
    import mlflow
    from filelock import FileLock

    home = store_root(root)
    uri = waiting_for_locks(tracking_uri or default_tracking_uri(root))
    mlflow.set_tracking_uri(uri)
    with FileLock(str(home / ".mlflow.lock")):
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            # Artifacts live beside the database, inside the project, with an absolute location; a
            # tracking server keeps them where it was told (`--artifacts-destination`), so runs logged
            # from several machines are all in one place.
            server = uri.split("://", 1)[0] in ("http", "https", "databricks")
            artifacts = None if server else (home / "mlartifacts").resolve().as_uri()
            exp_id = mlflow.create_experiment(experiment, artifact_location=artifacts,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # an older store; a kind the user chose is kept
                mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    end_runs_of_dead_processes(exp_id)
    return exp_id


def this_process() -> str:
    import socket

    import psutil

    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.3f}"


def is_alive(process: str) -> bool:
    """Whether the process a TAG_PROCESS value names still runs (a reused pid has another start
    time; a killed process nobody has reaped yet is a zombie, not running). A run opened on
    another host is assumed alive: there is no way to tell from here."""
    import socket

    import psutil

    host, _, rest = process.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        proc = psutil.Process(int(pid))
        return f"{proc.create_time():.3f}" == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_runs_of_dead_processes(exp_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process that no longer exists (a flow or stage
    killed with SIGKILL cannot end its own run). Runs on every setup, so the next flow or stage
    to start cleans up. Returns the run ids it ended."""
    import mlflow

    client = mlflow.MlflowClient()
    ended = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        process = run.data.tags.get(TAG_PROCESS)
        if process and not is_alive(process):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def experiment_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI. `workflowType=machine_learning` is what makes
    MLflow 3.17 open it (its GenAI/Model training switch otherwise starts on GenAI's Overview)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def git_head(root: Path) -> str:
    """The checked-out commit's sha; raises CalledProcessError outside a git repository."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def dirty_files(root: Path) -> list[str]:
    """Tracked files with uncommitted changes."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                         text=True).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def git_commit(root: Path) -> str:
    """The commit's sha, with -dirty when tracked files have uncommitted changes."""
    try:
        return git_head(root) + ("-dirty" if dirty_files(root) else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def is_secret(name: str) -> bool:
    """A key named like a credential: `token`, `hf_token`, `api_key`, ... but not `max_new_tokens`."""
    name = name.lower()
    return any(name == h or name.endswith("_" + h) or name.startswith(h + "_") for h in _SECRET_HINTS)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif not is_secret(k):
            out[key] = v
    return out


def lineage_tags(root: Path, stage: str | None, base_model: str) -> dict[str, str]:
    tags = {TAG_COMMIT: git_commit(root), TAG_BASE_MODEL: base_model, TAG_PROCESS: this_process()}
    if stage:
        tags[TAG_STAGE] = stage
    if os.environ.get(FLOW_RUN_ENV):
        tags[TAG_FLOW_RUN] = os.environ[FLOW_RUN_ENV]
    if os.environ.get("DVC_EXP_NAME"):  # set by DVC for each `dvc exp run` experiment
        tags[TAG_DVC_EXP] = os.environ["DVC_EXP_NAME"]
    return tags


@contextlib.contextmanager
def stage_run(root: Path, params, stage: str, declared: set[str], reads: set[str]) -> Iterator[Any]:
    """Open the MLflow run for one stage: nested under $CLOSEDLOOP_PARENT_RUN_ID when set. Logs the
    declared params; on success tags the params the stage read (`reads`, filled while it runs)."""
    import mlflow

    from closedloop.models import model_id
    from closedloop.stage_params import leaf_keys, leaf_values

    setup(root, params.tracking.tracking_uri, params.tracking.experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    if parent is not None and not run_exists(parent):
        from closedloop.errors import UserError

        raise UserError(f"{mlflow.get_tracking_uri()}: has no run {parent}, the parent run ${PARENT_RUN_ENV} "
                        "names (the store was deleted or replaced while the flow ran?); the stage did not run")
    tags = lineage_tags(root, stage, model_id(root / params.model.base)) | {
        TAG_KIND: "stage", TAG_PROCESSES: os.environ.get("WORLD_SIZE", "1")}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as run:
        flat = {k: v for k, v in leaf_values(params, declared).items() if not is_secret(k.rsplit(".", 1)[-1])}
        if flat:
            mlflow.log_params({k: ("null" if v is None else v) for k, v in flat.items()})
        yield run
        mlflow.set_tag(TAG_PARAMS_READ, ",".join(sorted(leaf_keys(params, reads))))


def run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


class _EntryMissing(LookupError):
    pass


def lock_entry_md5(root: Path, stage: str) -> str | None:
    """md5 of the stage's entry in dvc.lock (deps, params and outs hashes), None if absent. Called
    once the stage has run, so a file without its entry, like one that does not parse, is taken for
    a read of a dvc.lock that a `dvc repro` beside us (the flow's concurrent stages) was rewriting
    in place, and read again."""
    import yaml

    from closedloop.io import rereading

    lock = root / "dvc.lock"

    def entry() -> dict:
        found = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage)
        if found is None:
            raise _EntryMissing(stage)
        return found

    try:
        found = rereading(entry, lambda e: isinstance(e, (yaml.YAMLError, _EntryMissing)), tries=6)
    except (_EntryMissing, FileNotFoundError):
        return None
    return hashlib.md5(json.dumps(found, sort_keys=True).encode()).hexdigest()


def tag_lock_hash(root: Path, tracking_uri: str | None, experiment: str, parent_run_id: str, stage: str,
                  more: dict[str, str] | None = None) -> str | None:
    """Tag the stage's newest run under `parent_run_id` with its dvc.lock hash (and `more` tags);
    returns the run id."""
    import mlflow

    exp_id = setup(root, tracking_uri, experiment)
    runs = mlflow.search_runs(
        experiment_ids=[exp_id], output_format="list", max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TAG_STAGE}` = '{stage}'",
    )
    if not runs:
        return None
    # `more` is tagged even without the hash: a dvc.lock read while a concurrent stage's DVC rewrites
    # it can lack this stage's entry, and the flow's spans must not be lost with it.
    md5 = lock_entry_md5(root, stage)
    tags = {**({TAG_LOCK: md5} if md5 is not None else {}), **(more or {})}
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(runs[0].info.run_id, key, value)
    return runs[0].info.run_id

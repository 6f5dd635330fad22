"""Environment for every flow entry point; imported before prefect so its settings take effect.

Prefect's home (its SQLite database), like MLflow's store, lives inside the project unless the
user points PREFECT_HOME elsewhere. Offline and no-telemetry variables are set here too.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # flows/ and tasks/ are plain folders beside src/
    sys.path.insert(0, str(ROOT))

from closedloop.env import set_offline_defaults  # noqa: E402

set_offline_defaults()
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
# The temporary server migrates an empty database in ~75 s on 2 cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
# Stage commands (`closedloop`, `dvc`) come from the interpreter running the flow.
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")


def check_inputs_or_exit(targets: list[str]) -> None:
    """Validate params.yaml, dvc.yaml and the `--target`s before prefect is imported (importing it
    creates PREFECT_HOME, and its start-up takes seconds): bad input stops the run with one line and
    exit code 2, having written nothing."""
    from closedloop.config import check_model_names, load_params
    from closedloop.errors import UserError
    from closedloop.stage_params import covered

    try:
        params = load_params(ROOT / "params.yaml")
        from stage_graph import stage_graph, stages_to_run

        graph = stage_graph(ROOT, with_status=False)
        keys = set().union(*(graph.params[s] for s in stages_to_run(graph.upstream, graph.methods, targets)))
        check_model_names(params, "params.yaml", lambda key: covered(key, keys))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_temporary_server() -> None:
    """Before a flow starts Prefect's temporary server (no PREFECT_API_URL): stop the servers that
    killed flows left running on this PREFECT_HOME, and migrate a new database under a lock. Two
    flows started at once on a fresh home would otherwise both migrate it, and one would fail."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import subprocess

    import psutil
    from filelock import FileLock

    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        try:
            if "prefect.server.api.server:create_app" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
            orphaned = proc.info["ppid"] == 1 or not psutil.pid_exists(proc.info["ppid"])
            if orphaned and env.get("PREFECT__SERVER_EPHEMERAL") == "1" and env.get("PREFECT_HOME") == str(home):
                proc.terminate()
        except psutil.Error:
            continue
    import prefect

    marker = home / f".closedloop-migrated-{prefect.__version__}"
    with FileLock(str(home / ".closedloop-migrate.lock")):
        if not (marker.exists() and (home / "prefect.db").exists()):
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                           check=True, stdout=subprocess.DEVNULL)
            marker.touch()

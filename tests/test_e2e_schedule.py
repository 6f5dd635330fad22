"""Schedules and work pools, the way a user runs them: a real `prefect server start` on a free
127.0.0.1 port, the pipeline served with a one-minute cron (flows/serve.py), then deployed to a
process work pool (flows/deploy.py) and run by `prefect worker start`. Tiny model, bounded waits."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import TINY_PARAMS, VENV_BIN, copy_project, project_env, set_params
from servers import free_port, log_tail, start, stop, wait_for

pytestmark = pytest.mark.e2e
PREFECT = str(Path(VENV_BIN) / "prefect")


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def deployment_runs(url: str, flow: str, name: str) -> list[dict]:
    dep = api(url, f"/deployments/name/{flow}/{name}")
    return api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})


def run_deployment(root: Path, env: dict, name: str) -> None:
    run = subprocess.run([PREFECT, "deployment", "run", f"closedloop-pipeline/{name}"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def completed_runs(url: str, name: str) -> list[dict]:
    """The deployment's completed runs; fails the test at once if one failed or crashed."""
    runs = deployment_runs(url, "closedloop-pipeline", name)
    assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], runs
    return [r for r in runs if r["state_type"] == "COMPLETED"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, prefect_home):
    root = copy_project(tmp_path_factory.mktemp("sched") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = project_env(root, prefect_home) | {"PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                             "COLUMNS": "250",  # the CLI's tables, wide enough for whole names
                                             # the scheduler looks for due schedules every 5 s, not 60
                                             "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    proc = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], root, env)
    try:
        wait_for("the server's health check", lambda: api(url, "/health"), 300, [proc])
        yield root, env, url
    finally:
        stop(proc)


def test_a_served_cron_schedule_creates_and_completes_a_run(server):
    root, env, url = server
    serve = start([sys.executable, "flows/serve.py", "--cron", "* * * * *", "--name", "every-minute",
                   "--target", "eval@base"], root, env)
    try:
        def completed():
            runs = deployment_runs(url, "closedloop-pipeline", "every-minute")
            bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not bad, bad[0]["state"]
            return [r for r in runs if r["state_type"] == "COMPLETED"]
        done = wait_for("a scheduled run to complete", completed, 420, [serve], poll=5)
    finally:
        stop(serve)
    assert done[0]["auto_scheduled"]  # created by the server's scheduler from the cron, not by hand
    assert (root / "data/eval/base/metrics.json").is_file()  # the run really executed the stages

    deployments = subprocess.run([PREFECT, "deployment", "ls"], cwd=root, env=env, capture_output=True, text=True)
    assert deployments.returncode == 0, deployments.stdout + deployments.stderr
    assert "closedloop-pipeline/every-minute" in deployments.stdout
    flow_runs = subprocess.run([PREFECT, "flow-run", "ls", "--state", "COMPLETED"], cwd=root, env=env,
                               capture_output=True, text=True)
    assert flow_runs.returncode == 0, flow_runs.stdout + flow_runs.stderr
    assert done[0]["name"] in flow_runs.stdout


def test_a_process_work_pool_runs_a_deployment(server):
    root, env, url = server
    create = subprocess.run([PREFECT, "work-pool", "create", "test-pool", "--type", "process"], cwd=root, env=env,
                            capture_output=True, text=True)
    assert create.returncode == 0, create.stdout + create.stderr
    deploy = subprocess.run([sys.executable, "flows/deploy.py", "--pool", "test-pool", "--name", "pooled",
                             "--target", "rft_sample"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    worker = start([PREFECT, "worker", "start", "--pool", "test-pool"], root, env)
    try:
        run_deployment(root, env, "pooled")
        wait_for("the work pool's run to complete", lambda: completed_runs(url, "pooled"), 420, [worker], poll=5)
    finally:
        stop(worker)
    assert (root / "data/rft/samples.jsonl").is_file()
    status = subprocess.run(["dvc", "status", "rft_sample"], cwd=root, env=env, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout


def test_two_workers_in_two_checkouts_share_a_deployment_and_an_mlflow_server(server, tmp_path, tiny_model_dir):
    """The multi-machine setup on one machine: an `mlflow server` on 127.0.0.1 that both checkouts
    log to, one deployment (`--checkout '$CLOSEDLOOP_CHECKOUT'`: the checkouts are at different
    paths here) and two process workers, one per checkout, each taking one of its two runs."""
    import mlflow

    _, env, url = server
    store = tmp_path / "mlflow-server"
    store.mkdir()
    port = free_port()
    tracking = f"http://127.0.0.1:{port}"
    mlflow_server = start([str(Path(VENV_BIN) / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                           "--artifacts-destination", str(store / "artifacts")], store, env)
    checkouts, workers = [tmp_path / "a" / "project", tmp_path / "b" / "project"], []
    try:
        wait_for("the MLflow server", lambda: urllib.request.urlopen(tracking + "/health", timeout=5).status == 200,
                 300, [mlflow_server])
        for root in checkouts:
            copy_project(root)
            set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}, tracking={"tracking_uri": tracking}))
        a = checkouts[0]
        env_of = {root: env | {"PYTHONPATH": str(root / "src")} for root in checkouts}  # each runs its own code
        create = subprocess.run([PREFECT, "work-pool", "create", "shared-pool", "--type", "process"], cwd=a, env=env,
                                capture_output=True, text=True)
        assert create.returncode == 0, create.stdout + create.stderr
        deploy = subprocess.run([sys.executable, "flows/deploy.py", "--pool", "shared-pool", "--name", "shared",
                                 "--target", "prepare", "--checkout", "$CLOSEDLOOP_CHECKOUT"], cwd=a, env=env_of[a],
                                capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        for root in checkouts:  # one run at a time each, so the second run goes to the other worker
            workers.append(start([PREFECT, "worker", "start", "--pool", "shared-pool", "--limit", "1"], root,
                                 env_of[root] | {"CLOSEDLOOP_CHECKOUT": str(root), "PREFECT_WORKER_QUERY_SECONDS": "2"}))
        for w in workers:
            wait_for("the worker to start", lambda: "started" in log_tail(w), 120, [w], poll=1)
        for _ in range(2):
            run_deployment(a, env, "shared")
        flow_runs = wait_for("both runs to complete", lambda: len(done := completed_runs(url, "shared")) == 2 and done,
                             600, [*workers, mlflow_server], poll=5)
        # each worker ran one, in its own checkout
        for root in checkouts:
            assert (root / "data/suite/eval.jsonl").is_file(), root
            assert "changed" not in subprocess.run(["dvc", "status", "prepare"], cwd=root, env=env,
                                                   capture_output=True, text=True).stdout
        # and both logged to the one server: a pipeline run per flow run, its stages' runs under it
        mlflow.set_tracking_uri(tracking)
        exp = mlflow.get_experiment_by_name("closedloop")
        runs = mlflow.search_runs([exp.experiment_id], output_format="list")
        parents = [r for r in runs if r.data.tags.get("closedloop.run_kind") == "pipeline"]
        assert sorted(p.data.tags["closedloop.prefect_flow_run_id"] for p in parents) == sorted(r["id"] for r in flow_runs)
        for p in parents:
            stages = {r.data.tags["closedloop.dvc_stage"] for r in runs
                      if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
            assert stages == {"prepare"}
        assert exp.artifact_location.startswith("mlflow-artifacts:")  # kept by the server, not on one machine
    finally:
        for proc in [*workers, mlflow_server]:
            stop(proc)

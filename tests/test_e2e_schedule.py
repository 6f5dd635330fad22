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
from servers import free_port, start, stop, wait_for

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
        run = subprocess.run([PREFECT, "deployment", "run", "closedloop-pipeline/pooled"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr

        def completed():
            runs = deployment_runs(url, "closedloop-pipeline", "pooled")
            assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], runs
            return [r for r in runs if r["state_type"] == "COMPLETED"]
        wait_for("the work pool's run to complete", completed, 420, [worker], poll=5)
    finally:
        stop(worker)
    assert (root / "data/rft/samples.jsonl").is_file()
    status = subprocess.run(["dvc", "status", "rft_sample"], cwd=root, env=env, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout

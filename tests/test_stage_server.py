"""The stage server (closedloop.stage_server), the way DVC meets it: `closedloop stage NAME` with
CLOSEDLOOP_STAGE_SERVER set, on a tiny project. A stage forked from the server writes the bytes a
stage of its own process writes, exits as it would, and dies with its caller."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time

import mlflow
import psutil
import pytest

from closedloop.stage_server import ENV, env_difference
from conftest import TINY_PARAMS, copy_project, project_env, set_params

pytestmark = pytest.mark.e2e
RECORDS = "data/eval/base/records.jsonl"


def test_only_variables_read_at_call_time_may_differ():
    server = {"HF_HUB_OFFLINE": "1", "PATH": "/a", "OMP_NUM_THREADS": "1"}
    caller = {"HF_HUB_OFFLINE": "1", "PATH": "/b", "DVC_ROOT": "/p", "PREFECT_HOME": "/h", "PYTEST_CURRENT_TEST": "t"}
    assert env_difference(server, caller) == ["OMP_NUM_THREADS"]  # missing on one side counts
    assert env_difference(server, dict(caller, OMP_NUM_THREADS="1")) == []
    assert env_difference(server, dict(server, HF_HOME="/x")) == ["HF_HOME"]
    # what the server's imports set (torch: TORCHINDUCTOR_CACHE_DIR) may be absent or equal, not other
    by_imports = {"TORCHINDUCTOR_CACHE_DIR": "/tmp/i"}
    assert env_difference(server, server, by_imports) == []
    assert env_difference(server, dict(server, TORCHINDUCTOR_CACHE_DIR="/tmp/i"), by_imports) == []
    assert env_difference(server, dict(server, TORCHINDUCTOR_CACHE_DIR="/x"), by_imports) == ["TORCHINDUCTOR_CACHE_DIR"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir, stage_server):
    root = copy_project(tmp_path_factory.mktemp("served") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    env = project_env(root, tmp_path_factory.mktemp("prefect_unused"))
    plain = {k: v for k, v in env.items() if k != ENV}
    subprocess.run(["dvc", "repro", "eval@base"], cwd=root, env=plain, check=True, capture_output=True)
    deadline = time.time() + 120
    while not stage_server.socket.exists() and time.time() < deadline:  # the server is preloading
        time.sleep(0.2)
    assert stage_server.socket.exists(), stage_server.log.read_text()
    return root, plain, dict(plain, **{ENV: str(stage_server.socket)})


def stage(root, env, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["closedloop", "stage", name], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_served_stage_writes_the_same_bytes_in_a_forked_process(tiny, stage_server):
    root, plain, served = tiny
    reference = md5(root / RECORDS)
    proc = stage(root, served, "eval@base")
    assert proc.returncode == 0, proc.stderr
    assert "stage eval@base: done in" in proc.stderr  # its output reaches the caller's streams
    assert md5(root / RECORDS) == reference
    forked = re.findall(r"\['stage', 'eval@base'\] in pid (\d+)", stage_server.log.read_text())
    assert forked, stage_server.log.read_text()
    # the stage's MLflow run was opened by the forked process (its tag names the pid)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`closedloop.dvc_stage` = 'eval@base'",
                              output_format="list", order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["closedloop.process"].split(":")[1] == forked[-1]


def test_a_served_stage_fails_as_its_own_process_would(tiny):
    root, plain, served = tiny
    alone, forked = stage(root, plain, "eval@nonexistent"), stage(root, served, "eval@nonexistent")
    assert alone.returncode == forked.returncode == 2
    assert forked.stderr == alone.stderr and forked.stderr.startswith("error: ")


def test_an_environment_an_import_may_have_read_runs_the_stage_alone(tiny, stage_server):
    root, plain, served = tiny
    proc = stage(root, dict(served, TRANSFORMERS_VERBOSITY="error"), "compare")
    assert "TRANSFORMERS_VERBOSITY" in stage_server.log.read_text()  # the server refused it, saying why
    assert proc.returncode == stage(root, plain, "compare").returncode


def _forked_stage(server_pid: int, caller: subprocess.Popen, timeout: float = 60) -> psutil.Process:
    """The stage process the server forked for `caller` (a child of a watcher, a child of the
    server, started after the caller: not an earlier test's, which may linger a moment), stopped."""
    since = psutil.Process(caller.pid).create_time()
    deadline = time.time() + timeout
    while time.time() < deadline:
        for watcher in psutil.Process(server_pid).children():
            try:
                for p in watcher.children():
                    if p.create_time() >= since and p.status() != psutil.STATUS_ZOMBIE:
                        p.suspend()  # SIGSTOP: it stays until the test decides
                        return p
            except psutil.NoSuchProcess:  # a watcher or stage that has just ended
                continue
        time.sleep(0.002)
    raise AssertionError("no stage was forked")


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: the SigCgt mask in /proc)."""
    mask = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_killing_the_caller_kills_the_stage(tiny, stage_server):
    root, _, served = tiny
    caller = subprocess.Popen(["closedloop", "stage", "eval@base"], cwd=root, env=served,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    forked = _forked_stage(stage_server.proc.pid, caller)
    caller.kill()
    caller.wait()
    forked.wait(timeout=10)  # SIGKILLed by the watcher when the caller's end of the socket closed
    assert not forked.is_running()
    assert f"pid {forked.pid} killed: its caller went away" in stage_server.log.read_text()


def test_a_signal_to_the_caller_ends_the_stage_and_the_caller_dies_of_it(tiny, stage_server):
    root, _, served = tiny
    caller = subprocess.Popen(["closedloop", "stage", "eval@base"], cwd=root, env=served,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    forked = _forked_stage(stage_server.proc.pid, caller)
    deadline = time.time() + 60
    while not _catches(caller.pid, signal.SIGTERM) and time.time() < deadline:  # it has its handlers
        time.sleep(0.01)
    caller.send_signal(signal.SIGTERM)  # passed on to the stage: fatal, it ends it even stopped (Linux)
    try:
        forked.resume()
    except psutil.NoSuchProcess:
        pass
    assert caller.wait(timeout=30) == -signal.SIGTERM  # as DVC would see a stage of its own process end
    assert not forked.is_running()
    # the stage itself got the SIGTERM (the caller passed it on, then died of the same signal)
    assert f"pid {forked.pid} ended: {{'signal': {int(signal.SIGTERM)}}}" in stage_server.log.read_text()


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    """A killed test run (or a closed shell) leaves no server behind."""
    tmp_path.chmod(0o700)
    sock = tmp_path / "socket"
    shell = subprocess.run(["sh", "-c", f"closedloop stage-server {sock} >/dev/null 2>&1 & echo $!; sleep 3"],
                           capture_output=True, text=True, check=True)  # the shell, its parent, exits now
    server = psutil.Process(int(shell.stdout))
    server.wait(timeout=120)  # after its imports, within a second of seeing its parent gone
    assert not sock.exists()

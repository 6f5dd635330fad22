"""Faults, on a tiny model: a stage killed under a running flow, a flow killed mid-stage, two flows
started at once on a fresh clone, a flow started beside `dvc repro`, `dvc exp run` started beside a
flow. After each: the outputs equal
an uninterrupted run's, DVC is clean, no temporary files remain, the MLflow store reads, and no
run is left RUNNING; a killed flow's temporary Prefect server does not outlive the next start."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from conftest import TINY_PARAMS, copy_project, project_env, set_params

pytestmark = pytest.mark.e2e
SAMPLES = "data/rft/samples.jsonl"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run(args, root, env, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def flow(root, env, *targets: str) -> subprocess.Popen:
    args = [sys.executable, "flows/pipeline.py", *(a for t in targets for a in ("--target", t))]
    return subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_partial_output(proc: subprocess.Popen, root: Path, timeout: float = 600) -> psutil.Process:
    """The `closedloop stage rft_sample` process, once it has kept part of its work (a finished chunk,
    closedloop.chunks; the project's DVC cache and state are inside it, conftest)."""
    chunks = root / ".dvc/tmp/closedloop-state/chunks"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if [p for p in chunks.glob("rft_sample-*/*.jsonl") if p.stat().st_size > 0]:
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "stage" in child.cmdline() and "rft_sample" in child.cmdline():
                    return child
        time.sleep(0.01)
    pytest.fail(f"rft_sample never wrote partial output (flow exit {proc.poll()}):\n{proc.stdout.read()[-3000:]}")


def computing(stage: psutil.Process, server) -> list[psutil.Process]:
    """The processes that compute the flow's stage: `stage` (the `closedloop stage` process DVC
    started) and the forks of the tests' stage server that run its work (conftest.stage_server)."""
    return [stage, *(psutil.Process(server.proc.pid).children(recursive=True) if server else [])]


def assert_clean(root: Path, env: dict, target: str) -> None:
    status = run(["dvc", "status", target], root, env).stdout  # the target and everything upstream
    assert "changed" not in status and "deleted" not in status, status
    assert not [p for p in root.rglob("*.tmp") if ".git" not in p.parts and ".dvc" not in p.parts]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs, "the MLflow store reads, and holds the runs"
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model_dir, prefect_home):
    """A project whose rft_sample writes over many batches, and the md5 of its uninterrupted output."""
    root = copy_project(tmp_path_factory.mktemp("faults") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)},
                          prepare=dict(TINY_PARAMS["prepare"], num_train=40),
                          rft=dict(TINY_PARAMS["rft"], batch_size=2, max_new_tokens=24)))
    env = project_env(root, prefect_home)
    run(["dvc", "repro", "rft_sample"], root, env)
    return root, env, md5(root / SAMPLES)


def forget(root: Path) -> None:
    """Make rft_sample stale again, with nothing DVC could restore instead of running it: the
    output, its object in the cache and the run cache go."""
    if (root / SAMPLES).is_file():  # (a failed test before may have left it missing)
        digest = md5(root / SAMPLES)
        (root / SAMPLES).unlink()
        (root / ".dvc/cache/files/md5" / digest[:2] / digest[2:]).unlink(missing_ok=True)
    shutil.rmtree(root / ".dvc/cache/runs", ignore_errors=True)


def test_a_stage_killed_under_the_flow_is_retried_and_matches(sampled):
    root, env, reference = sampled
    forget(root)
    proc = flow(root, env, "rft_sample")
    wait_for_partial_output(proc, root).kill()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]  # the killed attempt is transient: retried, then done
    assert md5(root / SAMPLES) == reference
    assert_clean(root, env, "rft_sample")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    sample_runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                     filter_string="attributes.run_name = 'rft_sample'")
    # the fixture's run, the killed attempt (ended by the retry's start) and the retry
    assert sorted(r.info.status for r in sample_runs) == ["FINISHED", "FINISHED", "KILLED"]


def test_a_killed_flow_is_cleaned_up_by_the_next_and_matches(sampled):
    root, env, reference = sampled
    forget(root)
    proc = flow(root, env, "rft_sample")
    stage = wait_for_partial_output(proc, root)
    servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "prefect.server.api.server:create_app" in " ".join(p.cmdline())]
    assert servers, "the flow runs a temporary Prefect server"
    os.kill(proc.pid, signal.SIGKILL)  # the flow alone: its stage and its server live on
    proc.wait()
    stage.kill()  # and now the stage, half-way through its output
    again = run([sys.executable, "flows/pipeline.py", "--target", "rft_sample"], root, env)
    assert "rft_sample" in again.stdout.split("stages run:")[-1]
    assert md5(root / SAMPLES) == reference
    assert_clean(root, env, "rft_sample")
    assert not [s for s in servers if s.is_running() and s.status() != psutil.STATUS_ZOMBIE]


def test_two_flows_at_once_on_a_fresh_clone_both_finish(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("two")
    root = copy_project(tmp / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    env = project_env(root, tmp / "prefect")  # fresh: both flows find no Prefect database, no MLflow store
    first, second = flow(root, env, "eval@base"), flow(root, env, "eval@base")
    for proc in (first, second):
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
    assert (root / "data/eval/base/metrics.json").is_file()
    assert_clean(root, env, "eval@base")


def test_a_flow_started_beside_dvc_repro_waits_for_it(sampled):
    root, env, _ = sampled
    set_params(root, {"seed": 7})  # prepare and rft_sample are stale
    log = root.parent / "repro.log"
    with open(log, "w") as out:
        repro = subprocess.Popen(["dvc", "repro", "rft_sample"], cwd=root, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    # the flow starts once `dvc repro` holds DVC's locks and runs a stage (plain `dvc repro` does
    # not wait for locks itself, so starting the flow first would fail the user's command, not ours)
    deadline = time.time() + 300
    while "Running stage" not in log.read_text() and repro.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    after = run([sys.executable, "flows/pipeline.py", "--target", "rft_sample"], root, env)
    repro.wait(timeout=900)
    assert repro.returncode == 0, log.read_text()[-3000:]
    assert "stages run:" in after.stdout
    assert_clean(root, env, "rft_sample")


def test_dvc_exp_run_beside_a_flow_stops_the_flow_with_one_clear_error(sampled, stage_server):
    """`dvc exp run -S` beside a flow's stage fails on DVC's lock and leaves params.yaml changed
    (DVC 3.67), which the flow's later stages would read; the flow stops with one error instead."""
    root, env, _ = sampled
    original = (root / "params.yaml").read_bytes()
    forget(root)
    proc = flow(root, env, "rft_sample")
    stage = wait_for_partial_output(proc, root)  # the flow's stage holds DVC's lock
    # Paused while `dvc exp run` runs, so that it is mid-stage whatever the load: exp run checks out
    # its target's outputs without DVC's read-write lock, and a failed checkout removes the output,
    # so an output written at that moment would be deleted under the flow's DVC (DVC 3.67).
    paused = computing(stage, stage_server)
    for p in paused:
        p.suspend()
    try:
        exp = subprocess.run(["dvc", "exp", "run", "-S", "seed=123", "rft_sample"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        for p in paused:
            p.resume()
    try:
        assert exp.returncode != 0 and "lock" in exp.stderr + exp.stdout, exp.stdout + exp.stderr
        assert b"seed: 123" in (root / "params.yaml").read_bytes()  # DVC's behaviour the flow guards against
        out, _ = proc.communicate(timeout=900)
    finally:
        (root / "params.yaml").write_bytes(original)
    assert proc.returncode == 2, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "params.yaml: changed while this flow ran (seed)" in errors[0], out[-3000:]
    assert "Stages this flow ran: rft_sample" in errors[0], out[-6000:]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"


def test_the_mlflow_store_deleted_mid_flow_stops_the_flow_with_one_clear_error(sampled):
    """mlflow.db deleted while a stage runs: the stage cannot end its run (SQLite makes an unlinked
    file read-only) and the flow stops with one line naming the store, rather than going on to send
    later stages' runs to a new store without the flow's parent run."""
    root, env, _ = sampled
    forget(root)
    proc = flow(root, env, "rft_verify")  # rft_sample reruns, then rft_verify would be next
    wait_for_partial_output(proc, root)
    (root / "mlflow.db").unlink()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 2, out[-4000:]
    # the flow's own error comes last (Prefect's log of the failed stage quotes the stage's error)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors[-1].startswith(f"error: {root / 'mlflow.db'}: deleted or replaced while this flow ran"), out[-3000:]
    assert not [p for p in root.rglob("*.tmp") if ".git" not in p.parts and ".dvc" not in p.parts]

"""A stage killed mid-write leaves no output that DVC accepts; re-running gives the same result as a
run that never died (atomic outputs + per-batch seeds)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import TINY_PARAMS, copy_project, project_env, set_params

pytestmark = pytest.mark.e2e
SAMPLES = "data/rft/samples.jsonl"


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc(root, env, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_killed_stage_leaves_nothing_and_rerun_matches(tmp_path_factory, tiny_model_dir):
    root = copy_project(tmp_path_factory.mktemp("kill") / "project")
    # one prompt per generation batch, so the output is written over many batches
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)},
                          prepare=dict(TINY_PARAMS["prepare"], num_train=40),
                          rft=dict(TINY_PARAMS["rft"], num_samples=2, batch_size=2, max_new_tokens=24)))
    env = project_env(root, tmp_path_factory.mktemp("prefect_unused"))
    dvc(root, env, "repro", "rft_sample")
    reference = md5(root / SAMPLES)
    lines = (root / SAMPLES).read_text().splitlines()
    assert len(lines) == 80

    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", "rft_sample"], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    partial = None
    while time.time() < deadline and proc.poll() is None:
        tmps = [p for p in (root / "data/rft").glob(".samples.jsonl.*.tmp") if p.stat().st_size > 0]
        if tmps:
            partial = tmps[0]
            # SIGKILL the stage command and dvc itself (DVC runs the command in its own session)
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert partial is not None, "the stage finished before it could be killed mid-write"
    assert not (root / SAMPLES).exists()  # only the temporary file held partial rows
    status = subprocess.run(["dvc", "status", "rft_sample"], cwd=root, env=env, capture_output=True, text=True)
    assert "rft_sample" in status.stdout and "up to date" not in status.stdout

    # -f: really run the command again (DVC would otherwise restore the result from its run cache)
    rerun = dvc(root, env, "repro", "-f", "-s", "rft_sample")
    assert "Running stage 'rft_sample'" in rerun.stdout
    assert md5(root / SAMPLES) == reference
    assert not list((root / "data/rft").glob(".samples.jsonl.*.tmp"))  # the stale temporary is gone
    assert "up to date" in dvc(root, env, "status", "rft_sample").stdout

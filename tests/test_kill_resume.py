"""A stage killed half-way leaves no output that DVC accepts; rerun, it resumes from the chunks it
had finished and gives the same bytes as a run that never died (closedloop.chunks: fixed chunks,
per-batch seeds; atomic outputs)."""

from __future__ import annotations

import hashlib
import os
import re
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


def test_killed_stage_leaves_nothing_and_resumes_to_the_same_bytes(tmp_path_factory, tiny_model_dir):
    root = copy_project(tmp_path_factory.mktemp("kill") / "project")
    # one prompt per generation batch: 40 batches, in chunks of closedloop.chunks.CHUNK_BATCHES
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)},
                          prepare=dict(TINY_PARAMS["prepare"], num_train=40),
                          rft=dict(TINY_PARAMS["rft"], num_samples=2, batch_size=2, max_new_tokens=24)))
    env = project_env(root, tmp_path_factory.mktemp("prefect_unused"))
    env.pop("CLOSEDLOOP_STAGE_SERVER")  # a user's plain `dvc repro`: each stage a process of its own
    dvc(root, env, "repro", "rft_sample")
    reference = md5(root / SAMPLES)
    assert len((root / SAMPLES).read_text().splitlines()) == 80
    chunks = root / ".dvc/tmp/closedloop-state/chunks"  # the cache is inside the checkout (conftest)
    assert not list(chunks.glob("rft_sample-*/*"))  # a finished stage leaves no chunks behind

    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", "rft_sample"], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    kept: list = []
    while time.time() < deadline and proc.poll() is None:
        kept = [p for p in chunks.glob("rft_sample-*/*.jsonl") if p.stat().st_size > 0]
        if len(kept) >= 2:
            # SIGKILL the stage command and dvc itself (DVC runs the command in its own session)
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert len(kept) >= 2, "the stage finished before two of its chunks were done"
    assert not (root / SAMPLES).exists()  # DVC removed the old output; the killed run wrote none
    status = subprocess.run(["dvc", "status", "rft_sample"], cwd=root, env=env, capture_output=True, text=True)
    assert "rft_sample" in status.stdout and "up to date" not in status.stdout

    # -f: really run the command again (DVC would otherwise restore the result from its run cache);
    # the chunks the killed run finished are read back, not generated again
    rerun = dvc(root, env, "repro", "-f", "-s", "rft_sample")
    assert "Running stage 'rft_sample'" in rerun.stdout
    resumed = re.search(r"resumed: (\d+) of 10 chunks", rerun.stdout + rerun.stderr)
    assert resumed and int(resumed.group(1)) >= 2, rerun.stdout + rerun.stderr
    assert md5(root / SAMPLES) == reference
    assert not list(chunks.glob("rft_sample-*/*"))
    assert not list((root / "data/rft").glob(".samples.jsonl.*.tmp"))
    assert "up to date" in dvc(root, env, "status", "rft_sample").stdout

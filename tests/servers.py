"""Long-lived processes for end-to-end tests (a Prefect server, a worker, the MLflow UI):
started in their own session with output in a log file, waited on with a bound, stopped whole."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, procs: list[subprocess.Popen], poll: float = 2.0):
    """Poll `check` until it returns something truthy; fail with `what` (and any dead process's
    output) after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args[:3]} exited ({p.returncode}) while waiting for {what}:\n{log_tail(p)}")
        try:
            found = check()
        except OSError:  # the server is not listening yet
            found = None
        if found:
            return found
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n" + "\n".join(log_tail(p) for p in procs))


def start(args: list[str], root: Path, env: dict) -> subprocess.Popen:
    """A long-lived process, its output in a log file (a pipe nobody reads would fill and block it)."""
    log = root.parent / f"{Path(args[0]).name}-{'-'.join(args[1:3])}.log".replace("/", "_")
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def log_tail(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")[-4000:]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""One DVC stage as one Prefect task: `dvc --wait-for-lock repro -s STAGE`.

Prefect caching is off: DVC decides what is up to date. Transient failures (the process was
killed, a lock could not be had) are retried; a stage that failed deterministically (a
traceback, or bad input: closedloop exits 2 with one clear error) is not, because running it
again cannot help.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stage_graph import LOCK_BUSY, LOCK_POLL_SECONDS, LOCK_WAIT_SECONDS


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, output: str, transient: bool):
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"stage {stage!r} failed (dvc exit {returncode}):\n{tail}")
        self.transient = transient


def _is_transient(output: str) -> bool:
    """Retried: the command was killed by a signal (DVC reports a negative exit, or 128+N from
    a shell), or DVC's lock was busy. A traceback (exit 1) or bad input (exit 2) fails the same
    way every time, so it is not retried."""
    m = re.search(r"exited with (-?\d+)", output)
    if m:
        code = int(m.group(1))
        return code < 0 or code in (128 + 9, 128 + 15)
    return LOCK_BUSY in output or "LockError" in output


def retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception:
        return True
    return False


def stage_ran(stage: str, output: str) -> bool:
    """Whether DVC executed the stage command (vs. found it up to date)."""
    return f"Running stage '{stage}'" in output


@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def run_stage(stage: str, root: str, env: dict[str, str], known_clean: bool = False) -> dict:
    logger = get_run_logger()
    if known_clean:
        logger.info("stage %s: up to date (dvc status), skipped", stage)
        return {"stage": stage, "ran": False}
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        proc = subprocess.run(["dvc", "--wait-for-lock", "repro", "-s", stage], cwd=root,
                              env={**os.environ, **env}, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or LOCK_BUSY not in output or time.monotonic() > deadline:
            break
        logger.info("stage %s: its files are in use by another DVC process; waiting", stage)
        time.sleep(LOCK_POLL_SECONDS)
    if proc.returncode != 0:
        raise StageFailed(stage, proc.returncode, output, _is_transient(output))
    ran = stage_ran(stage, output)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date, skipped")
    return {"stage": stage, "ran": ran}

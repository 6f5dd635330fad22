"""Which stage failures the flow retries: only those that can pass on a second try."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "flows")]  # tasks/ and the flows' modules, as the flow has them
from tasks.dvc_stage import _is_transient  # noqa: E402

FAILED = "ERROR: failed to reproduce 'rft_sample': failed to run: closedloop stage rft_sample, exited with {}"


@pytest.mark.parametrize("output, transient", [
    (FAILED.format(-9), True),    # SIGKILL (the OOM killer, a user's kill -9)
    (FAILED.format(-15), True),   # SIGTERM
    (FAILED.format(137), True),   # SIGKILL seen through a shell
    (FAILED.format(1), False),    # a traceback: the same input fails the same way
    (FAILED.format(2), False),    # bad input: closedloop's one-line error
    ("ERROR: Unable to acquire lock. Most likely another DVC process is running: '.dvc/tmp/lock' is busy", True),
    ("ERROR: unexpected error - KeyError: 'stages'", False),
])
def test_only_signals_and_busy_locks_are_retried(output, transient):
    assert _is_transient(output) is transient

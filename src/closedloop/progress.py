"""What a running stage tells the world while it runs: when it started and ended (with its
seconds), and how far it has got (batches generated, optimizer steps taken).

Every stage prints its duration when it ends and throttled progress lines to stderr (which DVC
passes through to the run's log). Under `closedloop effect` two files carry the same facts for
`closedloop status` (their paths come by environment, set by the effect runner):

- $CLOSEDLOOP_STAGE_LOG, JSONL: {"event": "start"|"end", "stage", "time", "pid", "commit",
  "attempt", and at the end "seconds", "ok"}; appended, one short line per event (atomic under O_APPEND);
- $CLOSEDLOOP_PROGRESS, JSON: the running stage's latest {"stage", "done", "total", "unit",
  "time"}, replaced atomically. A stage that loops over calls of something that reports too (a
  search over batches, each a generation) reports its loop; the inner call's figures then go to
  "detail" ({"done", "total", "unit"}), so the stage's own count is not overwritten.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from closedloop.io import write_json

STAGE_LOG_ENV = "CLOSEDLOOP_STAGE_LOG"
PROGRESS_ENV = "CLOSEDLOOP_PROGRESS"
STAGE_ENV = "CLOSEDLOOP_STAGE"  # the stage this process runs, for progress lines
ATTEMPT_ENV = "CLOSEDLOOP_ATTEMPT"  # the effect run's attempt number
PRINT_EVERY_SECONDS = 10.0

_last_print = 0.0
_outer: dict | None = None  # this process's stage-level count, once a loop has reported one


def _append(event: dict) -> None:
    path = os.environ.get(STAGE_LOG_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    event["attempt"] = os.environ.get(ATTEMPT_ENV, "")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, sort_keys=True) + "\n")


def stage_started(stage: str) -> float:
    """Record that `stage` started in this process; returns its start time (time.time())."""
    os.environ[STAGE_ENV] = stage
    now = time.time()
    _append({"event": "start", "stage": stage, "time": now, "pid": os.getpid(),
             "commit": os.environ.get("DVC_EXP_BASELINE_REV", "")})
    return now


def stage_ended(stage: str, started: float, ok: bool) -> float:
    """Record the stage's duration, and print it when the stage succeeded (a failed stage's one
    line is its error); returns its seconds."""
    seconds = time.time() - started
    if ok:
        print(f"stage {stage}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
    _append({"event": "end", "stage": stage, "time": time.time(), "pid": os.getpid(), "seconds": round(seconds, 3),
             "ok": ok, "commit": os.environ.get("DVC_EXP_BASELINE_REV", "")})
    return seconds


def report(done: int, total: int | None, unit: str, *, detail: bool = False) -> None:
    """The running stage has done `done` of `total` `unit`s (batches, steps). Cheap enough to call
    every batch: the file is rewritten each call, a line printed at most every 10 s and at the end.
    `detail`: an inner count (a generation call's sequences), the stage-level one when no loop
    around it has reported."""
    global _last_print, _outer
    stage = os.environ.get(STAGE_ENV, "")
    now = time.time()
    count = {"done": done, "total": total, "unit": unit}
    if not detail:
        _outer = count
        state = {**count}
    elif _outer is not None:
        state = {**_outer, "detail": count}
    else:
        state = {**count}
    path = os.environ.get(PROGRESS_ENV)
    if path:
        write_json(path, {"stage": stage, **state, "time": now})
    if now - _last_print >= PRINT_EVERY_SECONDS or (total is not None and done >= total and not detail):
        _last_print = now
        print(f"[{stage or 'progress'}] {describe(state)}", file=sys.stderr, flush=True)


def describe(state: dict) -> str:
    """"3/24 search batches (11/60 sequences generated)": a progress state in words."""
    def one(c: dict) -> str:
        return f"{c['done']}/{c['total'] if c['total'] is not None else '?'} {c['unit']}"

    return one(state) + (f" ({one(state['detail'])})" if state.get("detail") else "")


def read_events(path: Path) -> list[dict]:
    """The stage log's events; a line cut by a kill mid-write is skipped."""
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events

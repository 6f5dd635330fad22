"""An effect run's record of itself, kept beside DVC's cache (closedloop.cache.state_dir) so that
every attempt, from any clone on the machine, adds to the same record:

    <state>/effects/<run>-<key>/       key: the hash of the run's targets and overrides
        plan.json                      the stages the run needs, in the order DVC runs them
        attempts.jsonl                 {"attempt", "event": "start"|"end", "time", "process", "status"}
        attempt-<n>.log                DVC's output and the stages' (progress lines, durations)
        stages.jsonl                   the stages' start and end events (closedloop.progress)
        progress.json                  the running stage's progress
    <state>/effects/<run>.current      the name of the run's newest directory (for `status`)
    <state>/stage-seconds.json         {md5 of a stage's dvc.lock entry: {"stage", "seconds"}}: what
                                       a stage cost when it ran, for runs that restore it from cache

What a stage cost is measured once, when it runs; an attempt that restores it from DVC's
run-cache counts those seconds again from this record, so `wall_seconds` is the compute the
result cost, however many attempts (and clones) it took.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from closedloop.errors import UserError
from closedloop.progress import ATTEMPT_ENV, PROGRESS_ENV, STAGE_LOG_ENV, describe, read_events
from closedloop.io import write_json, write_text
from closedloop.tracking import git_head, is_alive, this_process


def plan_stages(root: Path, params: dict, targets: list[str]) -> list[str]:
    """The stages `dvc repro targets` visits with `params` as params.yaml, in dvc.yaml's
    topological order: DVC's own graph of a copy of dvc.yaml beside the overridden params (a
    `foreach` over a param expands as the run will expand it)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(root / "dvc.yaml", work / "dvc.yaml")
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (work / ".dvc").mkdir()
        (work / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
        try:
            with Repo(str(work)) as repo:
                stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
                graph = repo.index.graph
                upstream = {s.name: {u.name for u in graph.successors(s) if isinstance(u, PipelineStage)}
                            for s in stages}
        except DvcException as e:
            raise UserError(f"dvc.yaml: {e}") from None
    names = [s.name for s in stages]
    wanted: set[str] = set()
    todo = [s for t in targets for s in names if s == t or s.partition("@")[0] == t]
    missing = [t for t in targets if not any(s == t or s.partition("@")[0] == t for s in names)]
    if missing:
        raise UserError(f"targets: no stage named {missing[0]!r} in dvc.yaml")
    while todo:
        s = todo.pop()
        if s not in wanted:
            wanted.add(s)
            todo.extend(upstream[s])
    order: list[str] = []
    while len(order) < len(wanted):
        order.append(next(s for s in names if s in wanted and s not in order and upstream[s] <= set(order)))
    return order


def _lock_entries(root: Path, ref: str) -> dict[str, Any]:
    text = subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=root, capture_output=True, text=True).stdout
    return (yaml.safe_load(text) or {}).get("stages", {}) if text else {}


def _entry_md5(entry: Any) -> str:
    return hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()


@dataclass
class RunState:
    name: str
    dir: Path
    ledger: Path
    attempt: int = 0

    @classmethod
    def of(cls, root: Path, spec: Any) -> RunState:
        from closedloop.cache import state_dir

        key = hashlib.md5(json.dumps({"targets": spec.targets, "params": spec.params}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:10]
        base = state_dir(root)
        return cls(spec.name, base / "effects" / f"{spec.name}-{key}", base / "stage-seconds.json")

    @classmethod
    def latest(cls, root: Path, name: str) -> RunState:
        """The newest record of effect run `name` (what `closedloop status` shows)."""
        from closedloop.cache import state_dir

        base = state_dir(root)
        pointer = base / "effects" / f"{name}.current"
        if not pointer.is_file():
            raise UserError(f"effect run {name!r}: no attempt recorded in {base / 'effects'} "
                            f"(start one: closedloop effect {name})")
        state = cls(name, base / "effects" / pointer.read_text().strip(), base / "stage-seconds.json")
        state.attempt = max((a["attempt"] for a in state.attempts()), default=0)
        return state

    # ---- files ----
    @property
    def attempt_log(self) -> Path:
        return self.dir / f"attempt-{self.attempt}.log"

    def attempts(self) -> list[dict]:
        return read_events(self.dir / "attempts.jsonl")

    def _attempt_event(self, kind: str) -> dict | None:
        """The current attempt's "start" or "end" record."""
        return next((a for a in self.attempts() if a["attempt"] == self.attempt and a["event"] == kind), None)

    def plan(self) -> list[str]:
        path = self.dir / "plan.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def events(self) -> list[dict]:
        return read_events(self.dir / "stages.jsonl")

    def progress(self) -> dict | None:
        try:
            return json.loads((self.dir / "progress.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def recorded_seconds(self) -> dict[str, dict]:
        try:
            return json.loads(self.ledger.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def stage_env(self) -> dict[str, str]:
        return {STAGE_LOG_ENV: str(self.dir / "stages.jsonl"), PROGRESS_ENV: str(self.dir / "progress.json"),
                ATTEMPT_ENV: str(self.attempt)}

    # ---- an attempt ----
    def start_attempt(self, root: Path, spec: Any) -> list[str]:
        """A new attempt: the plan written, the attempt recorded; returns the plan."""
        from closedloop.config import apply_overrides, read_yaml

        plan = plan_stages(root, apply_overrides(read_yaml(root / "params.yaml") or {}, spec.params), spec.targets)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "plan.json", plan)
        self.attempt = max((a["attempt"] for a in self.attempts()), default=0) + 1
        self._append_attempt({"event": "start", "process": this_process(), "commit": git_head(root),
                              "log": str(self.attempt_log)})
        (self.dir / "progress.json").unlink(missing_ok=True)
        write_text(self.dir.parent / f"{self.name}.current", self.dir.name + "\n")
        return plan

    def end_attempt(self, status: str) -> None:
        self._append_attempt({"event": "end", "status": status})

    def _append_attempt(self, event: dict) -> None:
        with open(self.dir / "attempts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"attempt": self.attempt, "time": time.time(), **event}, sort_keys=True) + "\n")

    # ---- what it cost ----
    def cost(self, root: Path, ref: str, plan: list[str]) -> dict[str, Any]:
        """Each planned stage's seconds and where they come from ("ran": in this attempt, "earlier
        attempt", "cache": measured when another run made it, "unknown"), their sum as
        `wall_seconds`, and each attempt's elapsed time. Records what this run measured in the
        ledger, keyed by the stage's dvc.lock entry, for later runs that restore it.

        An attempt of another commit (the code changed between attempts, not the stage: DVC
        restored it) counts last, after the ledger's exact match, and says so: "earlier attempt
        (commit abc1234)"."""
        from filelock import FileLock

        lock = _lock_entries(root, ref)
        commit = self._attempt_event("start")["commit"]  # HEAD may have moved while the run went on
        ended, elsewhere = {}, {}  # stage -> its newest successful end event of this commit / of another
        for e in self.events():
            if e.get("event") == "end" and e.get("ok"):
                (ended if e.get("commit") in (commit, "") else elsewhere)[e["stage"]] = e
        with FileLock(str(self.ledger) + ".lock"):
            ledger = self.recorded_seconds()
            stages = {}
            for stage in plan:
                md5 = _entry_md5(lock[stage]) if stage in lock else None
                e = ended.get(stage)
                if e is not None:
                    source = "ran" if str(e.get("attempt")) == str(self.attempt) else "earlier attempt"
                    seconds = e["seconds"]
                    if md5:
                        ledger[md5] = {"stage": stage, "seconds": seconds}
                elif md5 in ledger:
                    source, seconds = "cache", ledger[md5]["seconds"]
                elif stage in elsewhere:
                    e = elsewhere[stage]
                    source, seconds = f"earlier attempt (commit {str(e.get('commit'))[:7]})", e["seconds"]
                    if md5:
                        ledger[md5] = {"stage": stage, "seconds": seconds}
                else:
                    source, seconds = "unknown", None
                stages[stage] = {"seconds": seconds, "source": source}
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.ledger, ledger)
        return {"wall_seconds": round(sum(s["seconds"] or 0.0 for s in stages.values()), 1), "stages": stages,
                "attempts": self.attempt_times(),
                # each stage's dvc.lock entry: a stage two experiments share (a seeded run's base) counts once
                "entries": {stage: _entry_md5(lock[stage]) for stage in plan if stage in lock}}

    def attempt_times(self) -> list[dict]:
        starts, ends = {}, {}
        for a in self.attempts():
            (starts if a["event"] == "start" else ends)[a["attempt"]] = a
        out = []
        for n, start in sorted(starts.items()):
            end = ends.get(n)
            out.append({"attempt": n, "status": end["status"] if end else "killed",
                        "seconds": round(end["time"] - start["time"], 1) if end else None})
        return out

    # ---- where it stands ----
    def status(self) -> dict[str, Any]:
        """The current attempt, stage by stage: "done" (seconds; "cached" when DVC restored it),
        "running" (elapsed, progress), "failed", "killed" or "pending" (its last recorded
        duration as the estimate), with the estimated time left."""
        import re

        start, end = self._attempt_event("start"), self._attempt_event("end")
        alive = start is not None and end is None and is_alive(start["process"])
        log = self.attempt_log.read_text(encoding="utf-8", errors="replace") if self.attempt_log.is_file() else ""
        restored = set(re.findall(r"Stage '([^']+)' (?:is cached|didn't change)", log))
        last: dict[str, float] = {v["stage"]: v["seconds"] for v in self.recorded_seconds().values()}
        this_run: dict[str, float] = {}  # measured under this run's params, which an earlier run's may not share
        now_events: dict[str, dict] = {}
        for e in self.events():
            if e.get("event") == "end" and e.get("ok"):
                this_run[e["stage"]] = e["seconds"]
            if str(e.get("attempt")) == str(self.attempt):
                now_events[e["stage"]] = e  # its newest event this attempt
        progress, now = self.progress(), time.time()
        rows, left = [], 0.0
        for stage in self.plan():
            e = now_events.get(stage)
            # the stage's own time in this run; else a foreach sibling's in this run (eval@rft for
            # eval@base: the same work on another model); else the stage's time in an earlier run
            siblings = [t for s, t in this_run.items() if "@" in stage and s.split("@")[0] == stage.split("@")[0]]
            estimate, source = ((this_run[stage], "this run") if stage in this_run
                                else (max(siblings), "a sibling in this run") if siblings
                                else (last[stage], "last time") if stage in last else (None, None))
            row: dict[str, Any] = {"stage": stage, "estimate": estimate, "estimate_from": source}
            if e and e["event"] == "end":
                row.update(state="done" if e["ok"] else "failed", seconds=e["seconds"])
            elif stage in restored:
                row.update(state="cached", seconds=estimate)
            elif e and e["event"] == "start":
                row.update(state="running" if alive else "killed", seconds=now - e["time"])
                if progress and progress.get("stage") == stage:
                    row["progress"] = progress
                if alive and estimate is not None:
                    left += max(0.0, estimate - row["seconds"])
            else:
                row.update(state="pending", seconds=None)
                left += estimate or 0.0
            rows.append(row)
        state = end["status"] if end else ("running" if alive else "killed")
        unknown = [r["stage"] for r in rows if r["state"] == "pending" and r["estimate"] is None]
        return {"run": self.name, "attempt": self.attempt, "state": state, "rows": rows, "left_seconds": left,
                "unestimated": unknown, "log": str(self.attempt_log)}


def format_status(st: dict[str, Any]) -> str:
    """`closedloop status`'s table."""
    def secs(x: float | None) -> str:
        return "" if x is None else f"{x / 60:.1f} min" if x >= 90 else f"{x:.0f} s"

    width = max([28, *(len(r["stage"]) + 1 for r in st["rows"])])
    lines = [f"effect run {st['run']}: attempt {st['attempt']}, {st['state']}   (log: {st['log']})",
             f"{'stage':<{width}} {'state':<8} {'time':>9}  progress / estimate"]
    for r in st["rows"]:
        extra = ""
        if r.get("progress"):
            extra = describe(r["progress"])
        elif r["state"] in ("pending", "running") and r["estimate"] is not None:
            extra = f"~{secs(r['estimate'])} ({r['estimate_from']})"
        lines.append(f"{r['stage']:<{width}} {r['state']:<8} {secs(r['seconds']):>9}  {extra}".rstrip())
    if st["state"] == "running":
        pending = [r for r in st["rows"] if r["state"] == "pending"]
        if pending and len(st["unestimated"]) == len(pending):
            lines.append(f"time left: unknown ({len(pending)} pending stage(s), none timed on this machine yet)")
        else:
            unknown = f" (+ {len(st['unestimated'])} stage(s) never timed)" if st["unestimated"] else ""
            lines.append(f"time left: ~{secs(st['left_seconds']) or '0 s'}{unknown}")
    return "\n".join(lines)


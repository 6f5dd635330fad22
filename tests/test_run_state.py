"""An effect run's record of itself (closedloop.run_state) and where DVC's cache lives
(closedloop.cache): the plan of stages, what each stage cost across attempts, `status`'s view of
a run in progress, and the cache directory chosen for a clone."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT
from closedloop.cache import configured_cache_dir, ensure_cache_dir, state_dir
from closedloop.errors import UserError
from closedloop.run_state import RunState, format_status, plan_stages
from closedloop.tracking import this_process


def test_the_plan_is_the_targets_ancestry_in_dvc_order():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    plan = plan_stages(PROJECT, params, ["eval@base", "eval@rft"])
    assert {"base", "prepare", "rft_sample", "rft_verify", "rft_train"} <= set(plan)
    assert not any(s.startswith(("spar", "dct", "spct", "rlhf", "proxy")) for s in plan)
    assert plan.index("rft_sample") < plan.index("rft_verify") < plan.index("rft_train") < plan.index("eval@rft")
    # a foreach over a param expands as the overridden params say
    params["evaluate"]["models"] = {"base": "models/base", "other": "models/rft"}
    assert "eval@other" in plan_stages(PROJECT, params, ["eval"])
    with pytest.raises(UserError, match="nosuch"):
        plan_stages(PROJECT, params, ["nosuch"])


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()


def _state(tmp_path: Path) -> tuple[Path, RunState, str]:
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    lock = {"schema": "2.0", "stages": {s: {"cmd": f"closedloop stage {s}", "outs": [{"md5": s * 3}]}
                                        for s in "abcd"}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "lock")
    state = RunState("x", tmp_path / "state" / "effects" / "x-1", tmp_path / "state" / "stage-seconds.json")
    state.dir.mkdir(parents=True)
    return root, state, _git(root, "rev-parse", "HEAD")


def _events(state: RunState, *events: dict) -> None:
    with open(state.dir / "stages.jsonl", "a") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


def test_cost_counts_each_stage_once_from_where_it_ran(tmp_path):
    import hashlib

    root, state, head = _state(tmp_path)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    md5 = {s: hashlib.md5(json.dumps(e, sort_keys=True).encode()).hexdigest() for s, e in lock.items()}
    state.ledger.write_text(json.dumps({md5["c"]: {"stage": "c", "seconds": 7.0}}))
    _events(state,
            {"event": "end", "stage": "a", "ok": True, "seconds": 2.0, "attempt": "1", "commit": head},
            {"event": "end", "stage": "b", "ok": False, "seconds": 1.0, "attempt": "1", "commit": head},
            {"event": "end", "stage": "b", "ok": True, "seconds": 3.0, "attempt": "2", "commit": head},
            {"event": "end", "stage": "d", "ok": True, "seconds": 99.0, "attempt": "1", "commit": "other1234567"},
            {"event": "end", "stage": "c", "ok": True, "seconds": 50.0, "attempt": "1", "commit": "other1234567"})
    state.attempt = 2
    with open(state.dir / "attempts.jsonl", "w") as f:
        f.write(json.dumps({"attempt": 2, "event": "start", "time": 0, "commit": head}) + "\n")
    (root / "later").write_text("a commit made while the run went on")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "later")
    cost = state.cost(root, "HEAD", ["a", "b", "c", "d", "e"])
    assert cost["stages"] == {"a": {"seconds": 2.0, "source": "earlier attempt"},
                              "b": {"seconds": 3.0, "source": "ran"},
                              "c": {"seconds": 7.0, "source": "cache"},  # the ledger's exact entry first
                              # an attempt at another commit (code changed, the stage restored), named
                              "d": {"seconds": 99.0, "source": "earlier attempt (commit other12)"},
                              "e": {"seconds": None, "source": "unknown"}}
    assert cost["wall_seconds"] == 111.0
    ledger = json.loads(state.ledger.read_text())
    assert ledger[md5["a"]] == {"stage": "a", "seconds": 2.0} and ledger[md5["b"]]["seconds"] == 3.0


def test_status_shows_done_cached_running_and_pending(tmp_path):
    root, state, head = _state(tmp_path)
    (state.dir / "plan.json").write_text(json.dumps(["a", "b", "c", "d"]))
    now = time.time()
    with open(state.dir / "attempts.jsonl", "w") as f:
        f.write(json.dumps({"attempt": 1, "event": "start", "time": now - 60, "process": this_process()}) + "\n")
    state.attempt = 1
    state.attempt_log.write_text("Stage 'b' is cached - skipping run, checking out outputs\n")
    state.ledger.write_text(json.dumps({"m1": {"stage": "c", "seconds": 50.0}, "m2": {"stage": "d", "seconds": 30.0}}))
    _events(state, {"event": "start", "stage": "a", "time": now - 50, "attempt": "1"},
            {"event": "end", "stage": "a", "ok": True, "seconds": 10.0, "time": now - 40, "attempt": "1"},
            {"event": "start", "stage": "c", "time": now - 20, "attempt": "1"})
    (state.dir / "progress.json").write_text(json.dumps({"stage": "c", "done": 3, "total": 8, "unit": "batches",
                                                         "time": now}))
    st = state.status()
    rows = {r["stage"]: r for r in st["rows"]}
    assert [rows[s]["state"] for s in "abcd"] == ["done", "cached", "running", "pending"]
    assert rows["c"]["progress"]["done"] == 3 and 19 <= rows["c"]["seconds"] <= 30
    assert st["state"] == "running"
    assert 30 + 20 <= st["left_seconds"] + 1 and st["left_seconds"] <= 30 + 31  # d's 30 s + c's remaining ~30 s
    text = format_status(st)
    assert "3/8 batches" in text and "time left" in text and "pending" in text
    assert "~30 s (last time)" in text  # d: from an earlier run's ledger
    # an evaluation pending beside its finished sibling: estimated from the sibling's time in this
    # run, not from its own last time under other params (eval@base at 12 tokens vs 1280)
    (state.dir / "plan.json").write_text(json.dumps(["eval@rft", "eval@base", "d"]))
    state.ledger.write_text(json.dumps({"m1": {"stage": "eval@base", "seconds": 170.0}}))
    _events(state, {"event": "end", "stage": "eval@rft", "ok": True, "seconds": 2784.0, "time": now - 5, "attempt": "1"})
    rows = {r["stage"]: r for r in state.status()["rows"]}
    assert (rows["eval@base"]["estimate"], rows["eval@base"]["estimate_from"]) == (2784.0, "a sibling in this run")
    assert rows["d"]["estimate"] is None  # nothing recorded for it any more
    assert "~46.4 min (a sibling in this run)" in format_status(state.status())
    (state.dir / "plan.json").write_text(json.dumps(["a", "b", "c", "d"]))
    # the runner gone without an end record: the attempt was killed
    with open(state.dir / "attempts.jsonl", "w") as f:
        f.write(json.dumps({"attempt": 1, "event": "start", "time": now - 60,
                            "process": this_process().rsplit(":", 1)[0] + ":1.000"}) + "\n")  # pid reused
    st = state.status()
    assert st["state"] == "killed" and {r["stage"]: r["state"] for r in st["rows"]}["c"] == "killed"


def test_status_of_a_run_never_started_is_one_error(tmp_path, monkeypatch):
    root = tmp_path / "p"
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("")
    monkeypatch.setenv("CLOSEDLOOP_DVC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="closedloop effect nope"):
        RunState.latest(root, "nope")


def test_the_cache_goes_outside_the_checkout_unless_chosen(tmp_path, monkeypatch):
    root = tmp_path / "p"
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("")
    monkeypatch.delenv("CLOSEDLOOP_DVC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ensure_cache_dir(root) == tmp_path / "xdg" / "closedloop" / "dvc"  # the default
    assert configured_cache_dir(root) == tmp_path / "xdg" / "closedloop" / "dvc"  # written to config.local
    assert "xdg" in (root / ".dvc" / "config.local").read_text()
    assert state_dir(root) == tmp_path / "xdg" / "closedloop" / "closedloop-state"
    # inside, by the one setting: nothing written, the state under .dvc/tmp (git ignores it)
    inside = tmp_path / "q"
    (inside / ".dvc").mkdir(parents=True)
    (inside / ".dvc" / "config").write_text("")
    monkeypatch.setenv("CLOSEDLOOP_DVC_CACHE", ".dvc/cache")
    assert ensure_cache_dir(inside) == (inside / ".dvc" / "cache").resolve()
    assert not (inside / ".dvc" / "config.local").exists()
    assert state_dir(inside) == inside / ".dvc" / "tmp" / "closedloop-state"
    # a cache.dir the user set is kept, whatever the variable says
    (inside / ".dvc" / "config").write_text("[cache]\n    dir = ../mine\n")
    monkeypatch.setenv("CLOSEDLOOP_DVC_CACHE", str(tmp_path / "elsewhere"))
    assert ensure_cache_dir(inside) == (inside / "mine").resolve()


def test_a_loops_count_is_kept_while_its_inner_calls_report(tmp_path, monkeypatch):
    from closedloop import progress

    monkeypatch.setattr(progress, "_outer", None)
    monkeypatch.setenv(progress.PROGRESS_ENV, str(tmp_path / "progress.json"))
    monkeypatch.setenv(progress.STAGE_ENV, "rft_sample")
    read = lambda: json.loads((tmp_path / "progress.json").read_text())  # noqa: E731
    progress.report(5, 60, "sequences generated", detail=True)  # no loop around it: the stage's count
    assert (read()["done"], read()["total"], read().get("detail")) == (5, 60, None)
    progress.report(3, 24, "search batches")
    progress.report(11, 60, "sequences generated", detail=True)
    state = read()
    assert (state["stage"], state["done"], state["total"], state["detail"]["done"]) == ("rft_sample", 3, 24, 11)
    assert progress.describe(state) == "3/24 search batches (11/60 sequences generated)"


def test_a_killed_attempts_copy_is_removed_and_a_live_one_kept(tmp_path):
    """DVC leaves a SIGKILLed `dvc exp run --temp`'s copy of the commit (and its record, RUNNING)
    under .dvc/tmp/exps; the next attempt of the same effect run removes it, unless a process
    still works in it. Other runs' copies, and finished records, are left alone."""
    from closedloop.effects import DVC_TEMP_RUNS, remove_abandoned_copies

    exps = tmp_path / ".dvc/tmp/exps/standalone"

    def record(rev: str, name: str, status: int) -> Path:
        copy = exps / f"tmp{rev}"
        (copy / "models").mkdir(parents=True)
        (tmp_path / DVC_TEMP_RUNS / rev).mkdir(parents=True)
        (tmp_path / DVC_TEMP_RUNS / rev / f"{rev}.run").write_text(
            json.dumps({"root_dir": str(copy), "name": name, "status": status}))
        return copy

    killed, live, other, done = (record("a", "spar", 2), record("b", "spar", 2), record("c", "rft", 2),
                                 record("d", "spar", 6))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / DVC_TEMP_RUNS / "e").mkdir()  # a record naming a directory outside .dvc/tmp/exps
    (tmp_path / DVC_TEMP_RUNS / "e" / "e.run").write_text(json.dumps({"root_dir": str(outside), "name": "spar",
                                                                       "status": 2}))
    worker = subprocess.Popen(["sleep", "60"], cwd=live / "models")
    try:
        assert remove_abandoned_copies(tmp_path, "spar") == [killed.resolve()]
    finally:
        worker.kill()
        worker.wait()
    assert not killed.exists() and not (tmp_path / DVC_TEMP_RUNS / "a").exists()
    assert live.is_dir() and other.is_dir() and done.is_dir() and outside.is_dir()

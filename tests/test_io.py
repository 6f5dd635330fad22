"""Atomic outputs: complete or absent, never partial; extra ranks of a multi-process launch write
nothing; files another process rewrites in place are read again."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from closedloop.errors import UserError
from closedloop.io import atomic_dir, read_jsonl, write_jsonl, write_text


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "rows.jsonl"
    write_jsonl(out, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        write_jsonl(out, rows())
    assert read_jsonl(out) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_atomic_dir_swaps_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "w").write_text("v2")
        raise RuntimeError
    assert (out / "w").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temporaries_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".rows.jsonl.abc123.tmp"
    stale.write_text("partial")
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    assert not stale.exists()


def test_a_swap_killed_between_its_renames_is_cleaned_up_by_the_next(tmp_path):
    """atomic_dir moves the old directory aside, then the new one in: a kill between the two renames
    leaves `.model.old` (and no `model`); the next write of `model` removes it."""
    out = tmp_path / "model"
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "w").write_text("v0")
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "w").read_text() == "v1"


def test_jsonl_from_other_tools_a_bom_is_read_a_duplicate_key_is_refused(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\r\n{"a": 2}\r\n')  # as Excel and some editors save UTF-8
    assert read_jsonl(bom) == [{"a": 1}, {"a": 2}]
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"a": 1}\n{"key": 1, "prompt": "x", "key": 2}\n')
    with pytest.raises(UserError, match=r"twice.jsonl:2: duplicate key 'key'"):
        read_jsonl(twice)
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"kwargs": [{"n": 1, "n": 2}]}\n')
    with pytest.raises(UserError, match=r"nested.jsonl:1: duplicate key 'n'"):
        read_jsonl(nested)


def test_non_main_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("x")
    assert list(tmp_path.iterdir()) == []


RANK_WRITER = """
import sys, time
from pathlib import Path
from closedloop.io import atomic_dir
out, started, go = map(Path, sys.argv[1:])
with atomic_dir(out) as tmp:
    (tmp / "first").write_text("written")
    started.touch()
    while not go.exists():
        time.sleep(0.01)
    (tmp / "second").write_text("written")
"""


def test_an_extra_rank_starting_while_rank_0_writes_leaves_its_output_alone(tmp_path):
    """`accelerate launch`: rank 1 opens the same output while rank 0 is half-way through it (it
    used to remove rank 0's temporary as a stale one, and rank 0 failed)."""
    import subprocess
    import sys
    import time

    out, scratch = tmp_path / "out" / "model", tmp_path / "signals"
    scratch.mkdir()

    def rank(n: str, started: str, go: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", RANK_WRITER, str(out), str(scratch / started), str(scratch / go)],
                                env=os.environ | {"RANK": n}, stderr=subprocess.PIPE, text=True)

    rank0 = rank("0", "started0", "go0")
    while not (scratch / "started0").exists() and rank0.poll() is None:
        time.sleep(0.01)
    (scratch / "go1").touch()
    rank1 = rank("1", "started1", "go1")
    assert rank1.wait(timeout=60) == 0, rank1.stderr.read()
    (scratch / "go0").touch()
    assert rank0.wait(timeout=60) == 0, rank0.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == ["first", "second"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temporary left, rank 1's never here


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(UserError, match=r"in.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_get_the_permissions_a_plain_write_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "out.txt", "x")
        with atomic_dir(tmp_path / "model") as d:
            (d / "w").write_text("y")
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "model") == mode(tmp_path / "plain_dir") == 0o777 & ~umask


def test_nan_and_infinity_are_refused_on_input_and_never_written(tmp_path):
    """Python's json reads and writes bare NaN/Infinity; other JSON readers reject them."""
    import json

    from closedloop.io import write_json

    bad = tmp_path / "in.jsonl"
    bad.write_text('{"a": 1.0}\n{"a": NaN}\n')
    with pytest.raises(UserError, match=r"in\.jsonl:2: expected a JSON number or null, got NaN"):
        read_jsonl(bad)
    bad.write_text('{"a": [1, -Infinity]}\n')
    with pytest.raises(UserError, match=r"in\.jsonl:1: .* got -Infinity"):
        read_jsonl(bad)
    write_jsonl(tmp_path / "out.jsonl", [{"loss": float("nan"), "xs": [1.5, float("inf")], "k": "NaN"}])
    text = (tmp_path / "out.jsonl").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written")) == {
        "loss": None, "xs": [1.5, None], "k": "NaN"}
    write_json(tmp_path / "m.json", {"ratio": float("-inf"), "ok": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"ok": 0.5, "ratio": None}
    assert read_jsonl(tmp_path / "out.jsonl") == [{"loss": None, "xs": [1.5, None], "k": "NaN"}]


def test_a_dvc_lock_caught_mid_rewrite_is_read_again_for_the_stage_that_ran(tmp_path):
    """DVC rewrites dvc.lock in place: a read beside it can see a file that parses but ends before
    the stage's entry (the flow tags each stage's run with its entry's hash right after it ran)."""
    import threading

    import yaml

    from closedloop.tracking import lock_entry_md5

    whole = {"schema": "2.0", "stages": {"prepare": {"cmd": "a"}, "rft_sample": {"cmd": "b"}}}
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {"cmd": "a"}}}))
    finish = threading.Timer(0.7, lambda: lock.write_text(yaml.safe_dump(whole)))
    finish.start()
    try:
        md5 = lock_entry_md5(tmp_path, "rft_sample")
    finally:
        finish.join()
    assert md5 == hashlib.md5(json.dumps({"cmd": "b"}, sort_keys=True).encode()).hexdigest()
    assert lock_entry_md5(tmp_path, "never_ran") is None  # absent for good: None, after the rereads
    assert lock_entry_md5(tmp_path / "elsewhere", "rft_sample") is None  # no dvc.lock

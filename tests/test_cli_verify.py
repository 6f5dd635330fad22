"""`closedloop verify`: IFEval-shaped output for strict and loose mode; errors name the line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IFEVAL


def run(args, cwd):
    closedloop = str(Path(sys.executable).parent / "closedloop")
    return subprocess.run([closedloop, "verify", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_verify_writes_strict_and_loose_and_keeps_fields(tmp_path):
    rows = [
        {"id": 1, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}], "response": "hi there friend"},
        {"id": 2, "prompt": "All lowercase, end with 'bye'.",
         "instruction_id_list": ["change_case:english_lowercase", "startend:end_checker"],
         "kwargs": [{}, {"end_phrase": "bye"}], "response": "**HELLO**\nall lowercase here bye"},
    ]
    src = tmp_path / "in.jsonl"
    write_rows(src, rows)
    proc = run([str(src), "-o", str(tmp_path / "out.jsonl")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [1, 2]
    assert out[0]["strict"] == {"follow_all_instructions": True, "follow_instruction_list": [True]}
    # the first line breaks lowercase in strict mode; loose mode drops it
    assert out[1]["strict"]["follow_instruction_list"] == [False, True]
    assert out[1]["loose"]["follow_all_instructions"] is True


def test_verify_refuses_to_overwrite(tmp_path):
    src = tmp_path / "in.jsonl"
    write_rows(src, [{"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
                      "response": "a"}])
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    proc = run([str(src), "-o", str(out)], tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert out.read_text() == "mine\n"


def test_malformed_line_names_line_and_writes_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    good = json.dumps({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
                       "response": "a"})
    src.write_text(good + "\n" + good + "\n{not json\n")
    proc = run([str(src), "-o", str(tmp_path / "out.jsonl")], tmp_path)
    assert proc.returncode == 2
    assert f"{src}:3:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()
    assert not list(tmp_path.glob(".out.jsonl*"))


@pytest.mark.skipif(not IFEVAL.is_file(), reason="../shared/data/ifeval/input_data.jsonl not present")
def test_every_ifeval_row_is_accepted(tmp_path):
    rows = [json.loads(line) for line in IFEVAL.read_text().splitlines()]
    for r in rows:
        r["response"] = "A placeholder response. It has two sentences."
    src = tmp_path / "ifeval.jsonl"
    write_rows(src, rows)
    proc = run([str(src), "-o", str(tmp_path / "out.jsonl")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 541
    for r, o in zip(rows, out):
        assert o["key"] == r["key"]
        for mode in ("strict", "loose"):
            assert len(o[mode]["follow_instruction_list"]) == len(r["instruction_id_list"])

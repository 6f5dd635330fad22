"""closedloop.chunks: work in fixed chunks that a rerun picks up after a kill, keyed by what the
stage's output is a function of."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from closedloop.chunks import ChunkStore, in_chunks, resumable, stage_fingerprint


class Interrupted(Exception):
    pass


def squares(calls: list, fail_at: int | None = None):
    def work(chunk: list[int], index: int) -> list[dict]:
        if index == fail_at:
            raise Interrupted
        calls.append(index)
        return [{"x": x, "sq": x * x, "chunk": index} for x in chunk]
    return work


class Store(ChunkStore):
    """A store at a given directory (no DVC project to fingerprint)."""

    def __init__(self, where: Path):
        self.__dict__["dir"] = where


def test_a_resumed_run_computes_only_the_missing_chunks_and_equals_a_whole_one(tmp_path):
    items = list(range(10))
    whole = in_chunks(items, 3, squares([]), Store(tmp_path / "whole"))
    assert [r["x"] for r in whole] == items and [r["chunk"] for r in whole] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]

    calls: list = []
    with pytest.raises(Interrupted):
        in_chunks(items, 3, squares(calls, fail_at=2), Store(tmp_path / "run"), "part")
    assert calls == [0, 1]
    assert sorted(p.name for p in (tmp_path / "run" / "part").iterdir()) == ["00000.jsonl", "00001.jsonl"]
    calls.clear()
    assert in_chunks(items, 3, squares(calls), Store(tmp_path / "run"), "part") == whole
    assert calls == [2, 3]  # chunks 0 and 1 were read back


def test_one_chunk_keeps_nothing_and_needs_no_fingerprint(tmp_path):
    store = ChunkStore(tmp_path / "not-a-dvc-project", "s")  # its dir would fail to resolve
    assert len(in_chunks([1, 2], 5, squares([]), store)) == 2
    assert in_chunks([], 5, squares([]), store) == []
    assert "dir" not in store.__dict__
    with pytest.raises(ValueError):
        in_chunks([1], 0, squares([]), store)


def _dvc_project(root: Path) -> Path:
    root.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True, env=env)
    (root / "in.txt").write_text("a\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"work": {"size": 1, "other": 1}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": "true", "deps": ["in.txt"], "params": ["work.size"], "outs": ["out.txt"]}}}))
    return root


def test_the_fingerprint_follows_the_stages_deps_and_params(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOSEDLOOP_DVC_CACHE", ".dvc/cache")
    root = _dvc_project(tmp_path / "p")
    first = stage_fingerprint(root, "s")
    assert stage_fingerprint(root, "s") == first
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({"work": {**params["work"], "other": 2}}))
    assert stage_fingerprint(root, "s") == first  # a param the stage does not declare
    (root / "params.yaml").write_text(yaml.safe_dump({"work": {**params["work"], "size": 2}}))
    second = stage_fingerprint(root, "s")
    assert second != first
    (root / "in.txt").write_text("b\n")
    assert stage_fingerprint(root, "s") not in (first, second)

    # a finished block removes its chunks; one that raised keeps them for the rerun
    with pytest.raises(Interrupted), resumable(root, "s") as store:
        in_chunks([1, 2, 3], 1, squares([], fail_at=2), store)
    where = store.dir
    assert len(list(where.iterdir())) == 2 and where.is_relative_to(root / ".dvc" / "tmp")
    with resumable(root, "s") as again:
        assert in_chunks([1, 2, 3], 1, squares([]), again)[0]["x"] == 1
        assert again.dir == where
    assert not where.exists()

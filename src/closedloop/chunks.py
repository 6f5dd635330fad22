"""Long work inside a stage, in fixed chunks that outlive a kill.

A stage that generates for many prompts (an evaluation of 541 IFEval prompts at 1280 tokens, best-of-N
sampling of the train prompts) cuts its items into fixed chunks and keeps each chunk's rows as soon
as they are done. Rerun after a kill, the same stage on the same inputs (its `fingerprint`: DVC's
hashes of its deps, its params and its command) reads the finished chunks back and computes only
the rest, so a kill loses at most one chunk. Each chunk is the same call whether the stage was
interrupted or not (fixed boundaries, a seed per chunk), so the output is byte-identical to an
uninterrupted run's. When the stage ends, its chunks are deleted: the result is in DVC's cache.

Why chunks inside a stage rather than a DVC `foreach` stage per shard: an evaluation is
`eval@<name>` over `evaluate.models` (name -> model path), and DVC's `matrix` over a mapping yields
its keys only, so a per-model-and-shard stage could not declare the model it reads as a dependency;
a stage per shard would also pay each stage's start-up (imports, MLflow, DVC: 5-8 s) per shard.

Chunks live beside DVC's cache (`closedloop.cache.state_dir`), so the temporary workspaces of
`closedloop effect` (`dvc exp run --temp`, a new one per attempt) share them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from closedloop.io import read_jsonl, write_jsonl
from closedloop.stage_params import collected

CHUNK_BATCHES = 4  # a chunk is this many generation batches: a kill loses at most that much work


def stage_fingerprint(root: Path, stage: str) -> str:
    """What the stage's output is a function of: its command, its params' values and DVC's hash of
    each dep (DVC's own state cache makes that cheap for files it has hashed before)."""
    def read(found: list) -> tuple[Any, list]:
        (resolved,) = found
        return resolved.cmd, sorted((str(d.def_path), str(d.get_hash())) for d in resolved.deps)
    cmd, deps = collected(root, stage, read)
    blob = json.dumps({"stage": stage, "cmd": cmd, "deps": deps}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ChunkStore:
    """Where one stage keeps its finished chunks for its current inputs; the directory (and the
    fingerprint, a DVC index load and dep hashes) is worked out only once a stage has two chunks."""

    def __init__(self, root: Path, stage: str):
        self.root, self.stage = root, stage

    @functools.cached_property
    def dir(self) -> Path:
        from closedloop.cache import state_dir

        name = self.stage.replace("@", "-").replace("/", "_")
        return state_dir(self.root, configure=False) / "chunks" / f"{name}-{stage_fingerprint(self.root, self.stage)}"


@contextmanager
def resumable(root: Path, stage: str) -> Iterator[ChunkStore]:
    """The store of `stage`'s finished chunks for these inputs; emptied when the block ends without
    an error (write the stage's outputs inside it: then nothing is left to resume)."""
    store = ChunkStore(root, stage)
    yield store
    if "dir" in store.__dict__:  # only if some work was kept
        shutil.rmtree(store.dir, ignore_errors=True)


def in_chunks(items: Sequence[Any], size: int, work: Callable[[list[Any], int], list[dict]],
              store: ChunkStore, part: str = "") -> list[dict]:
    """`work(chunk, index)` over `items` cut into chunks of `size`, the rows of all chunks in order.
    Each chunk's rows are kept in `store` (under `part`, for a stage with several loops) as it
    finishes, and a chunk found there is read instead of computed. `work` must depend only on its
    chunk and index (seed by the index), so a resumed run equals a whole one."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
    if len(chunks) <= 1:  # one chunk is the stage itself: nothing to resume
        return [row for index, chunk in enumerate(chunks) for row in work(chunk, index)]
    where = store.dir / part if part else store.dir
    rows: list[dict] = []
    reused = 0
    for index, chunk in enumerate(chunks):
        path = where / f"{index:05d}.jsonl"
        if path.is_file():
            rows += read_jsonl(path)
            reused += 1
            continue
        out = work(chunk, index)
        write_jsonl(path, out)
        rows += out
    if reused:
        print(f"resumed: {reused} of {len(chunks)} chunks from an interrupted run ({where})", file=sys.stderr,
              flush=True)
    return rows

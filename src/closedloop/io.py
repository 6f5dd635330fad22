"""Atomic file output and line-checked JSONL input.

Every output goes to a temporary path in the same directory first and is renamed into place
only when complete, so a killed stage never leaves a file that looks finished.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from closedloop.errors import UserError

T = TypeVar("T")


def is_main_process() -> bool:
    """False in the extra processes of a multi-process launch (`accelerate launch`, torchrun set
    RANK): those train alongside rank 0 but must not write outputs, or they would race it."""
    return os.environ.get("RANK", "0") == "0"


def rereading(read: Callable[[], T], partial: Callable[[Exception], bool], tries: int = 10, wait: float = 0.5) -> T:
    """`read()`, again after `wait` seconds while it fails as a read of a file that another process
    rewrites in place fails (`partial(error)`), at most `tries` times. DVC rewrites dvc.lock in
    place, so a `dvc repro` beside us (the flow's concurrent stages, a user's) can be caught mid-write."""
    for _ in range(tries - 1):
        try:
            return read()
        except Exception as e:
            if not partial(e):
                raise
            time.sleep(wait)
    return read()  # the last try: its error, whatever it is, is the caller's


def dvc_lock_mid_write(e: Exception) -> bool:
    """A DVC error from reading a dvc.lock that another DVC process was writing."""
    return "dvc.lock" in str(e)


def remove_stale_tmp(path: Path) -> None:
    """Remove temporaries that a killed earlier run left beside `path`: its temporary files and
    directories, and the previous version `atomic_dir` moves aside while it swaps (`.name.old`,
    left behind by a kill between its two renames)."""
    for stale in [*path.parent.glob(f".{path.name}.*.tmp"), path.with_name(f".{path.name}.old")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def check_outputs_inside(root: Path, outputs: Iterable[str]) -> None:
    """Each output path, symlinks followed, stays inside the project: DVC caches, checks out and
    removes outputs there, and a directory symlinked elsewhere (data/eval -> /mnt/x) would have
    a stage write, and DVC later delete, files outside it."""
    top = root.resolve()
    for out in outputs:
        real = (root / out).resolve()
        if not real.is_relative_to(top):
            raise UserError(f"{out}: resolves to {real}, outside the project (a symlink on its path?); "
                            "outputs stay inside it, where DVC caches them: remove the link, or link the "
                            "whole project instead")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_path(path: Path, suffix: str = "") -> Path:
    remove_stale_tmp(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; the output gets what a plain write would
    return Path(name)


# what a write into the output can fail with, reported without a file name by write()
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _name_output(e: OSError, path: Path) -> None:
    """A write's OSError (a full disk, a file-size limit) names no file: name the output it was for."""
    if e.filename is None and e.errno in _WRITE_ERRORS:
        e.filename = str(path)


@contextlib.contextmanager
def _rank_scratch(path: Path, directory: bool) -> Iterator[Path]:
    """An extra rank's stand-in for `path`, in the system's temporary directory: never beside the
    output, where rank 0 cleans up stale temporaries and swaps its own into place (an extra rank
    starting while rank 0 writes would otherwise delete rank 0's temporary)."""
    with tempfile.TemporaryDirectory(prefix=f"closedloop-rank{os.environ.get('RANK')}-") as scratch:
        tmp = Path(scratch) / path.name
        if directory:
            tmp.mkdir()
        yield tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` only if the block succeeds.
    In an extra rank of a multi-process launch: a scratch path that is discarded."""
    path = Path(path)
    if not is_main_process():
        with _rank_scratch(path, directory=False) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _name_output(e, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it into place only if the block succeeds.
    In an extra rank of a multi-process launch: a scratch directory that is discarded."""
    path = Path(path)
    if not is_main_process():
        with _rank_scratch(path, directory=True) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the directory gets what a plain mkdir would
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _name_output(e, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _finite(obj: Any) -> Any:
    """`obj` with NaN and +-Infinity as None: JSON has no such numbers (Python's json writes them as
    bare `NaN`, which other tools reject); null is how pandas and JavaScript write them too."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps that writes valid JSON only: a non-finite float becomes null (`_finite`)."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kwargs)
    except ValueError:  # "Out of range float values are not JSON compliant": rare, so checked lazily
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, to_json(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Stream rows into a temporary file (flushed per row), then rename. Returns the row count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(to_json(row) + "\n")
            f.flush()
            n += 1
    return n


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object hook: a key twice in one object is an error (json keeps the last silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise NonFinite(name)


class NonFinite(ValueError):
    pass


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; a malformed line raises UserError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("expected a JSONL file, got a directory" if path.is_dir() else "file not found"))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # as some editors and Excel write UTF-8
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: expected UTF-8 text, got a byte 0x{raw[e.start]:02x} "
                                "(binary, or another encoding such as UTF-16?)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg})") from None
            except DuplicateKey as e:
                raise UserError(f"{path}:{lineno}: duplicate key {e.args[0]!r} in one JSON object "
                                "(JSON readers disagree on which value wins)") from None
            except NonFinite as e:
                raise UserError(f"{path}:{lineno}: expected a JSON number or null, got {e.args[0]} "
                                "(not JSON: most JSON readers reject it)") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def iter_param_jsonl(path: str | Path, param: str) -> Iterator[tuple[int, dict]]:
    """`iter_jsonl` of a file a param names: every error names the param first."""
    try:
        yield from iter_jsonl(path)
    except UserError as e:
        raise UserError(f"{param}: {e}") from None


def read_prompt_rows(path: str | Path, param: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a prompts file a param names, each with a non-empty string
    `prompt`; one error naming the param, file:line and what was found otherwise."""
    rows = []
    for lineno, row in iter_param_jsonl(path, param):
        if limit is not None and len(rows) >= limit:
            break
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{param}: {path}:{lineno}: prompt: expected a non-empty string, got {prompt!r}")
        rows.append(row)
    if not rows:
        raise UserError(f"{param}: {path}: no rows; expected one {{\"prompt\": ...}} object per line")
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a malformed line raises UserError naming the file and line number."""
    return [row for _, row in iter_jsonl(path)]

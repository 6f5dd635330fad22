"""closedloop.errors.environment_error: what the machine refused becomes one line naming the path."""

from __future__ import annotations

import errno

from closedloop.errors import environment_error


def test_refusals_are_named_wherever_they_sit_in_the_chain():
    e = environment_error(OSError(errno.ENOSPC, "No space left on device", "/data/out.jsonl"))
    assert str(e) == "/data/out.jsonl: no space left on the device"
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/models")
        except OSError as inner:
            raise RuntimeError("saving the checkpoint failed") from inner
    except RuntimeError as outer:
        assert str(environment_error(outer)) == "/ro/models: the file system is read-only"
    assert "file-size limit" in str(environment_error(OSError(errno.EFBIG, "File too large", "x")))


def test_refusals_that_libraries_rewrap_as_text_are_found_by_their_text():
    safetensors = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                            'message: "No space left on device" })')
    assert str(environment_error(safetensors)).startswith("no space left on the device: Error while serializing")
    locked = Exception("(sqlite3.OperationalError) database is locked\n[SQL: INSERT INTO runs ...]")
    assert "locked by another process" in str(environment_error(locked))


def test_anything_else_keeps_its_traceback():
    assert environment_error(ValueError("shapes do not match")) is None
    assert environment_error(OSError(errno.ENOENT, "No such file or directory", "x")) is None
    try:  # a refusal handled on the way (a hard link refused, then a copy) is not the error
        try:
            raise OSError(errno.EPERM, "Operation not permitted", "models/rft")
        except OSError:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "models/base") from None
    except FileNotFoundError as later:
        later.__suppress_context__ = False
        assert environment_error(later) is None
    looped = RuntimeError("a")
    looped.__cause__ = looped  # a cycle ends the walk
    assert environment_error(looped) is None

"""The one error type users see: a message that names the file, key or line and what was expected."""

from __future__ import annotations

import errno
import os
import sys


class UserError(Exception):
    """Bad input from the user. The CLI prints its message on one line and exits 2."""


def dvc_error(e: BaseException) -> UserError:
    """One line from a DVC exception about dvc.yaml: its message, plus the YAML line when DVC
    failed to parse the file (the parser's mark is on the exception's cause)."""
    message = " ".join(str(e).split())
    mark = getattr(e.__cause__, "problem_mark", None)
    where = f"dvc.yaml:{mark.line + 1}" if mark is not None else "dvc.yaml"
    problem = getattr(e.__cause__, "problem", None)
    return UserError(f"{where}: {message}" + (f" ({problem})" if problem else ""))


# What the machine refused, rather than the input: each is one line and exit 2, as bad input is.
_REFUSED = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file would pass this process's file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (an immutable file or directory?)",
}
# Libraries that re-raise an OSError as their own error (safetensors, SQLite) keep only its text.
_REFUSED_TEXT = {os.strerror(n): why for n, why in _REFUSED.items()} | {
    "database or disk is full": "no space left on the device (or the file-size limit)",
    # SQLite says so too when the file was deleted or moved while it was open
    "attempt to write a readonly database": "the MLflow store cannot be written (read-only, or deleted or moved "
                                            "while the stage ran)",
}


def environment_error(e: BaseException) -> UserError | None:
    """One line for what the machine refused (a full disk, a file-size limit, a read-only or
    forbidden path, the MLflow store locked by another process), found in the chain of explicit
    causes (`raise ... from e`, as libraries wrap OSError); None for anything else, whose traceback
    is the useful report (a bug). Not the implicit context: an error handled on the way (a hard
    link refused, then a copy) must not be reported instead of the one that ended the stage."""
    seen: set[int] = set()
    exc: BaseException | None = e
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _REFUSED:
            return UserError(f"{exc.filename or 'an output'}: {_REFUSED[exc.errno]}")
        text = " ".join(str(exc).split())
        if "database is locked" in text:
            store = sys.modules["mlflow"].get_tracking_uri() if "mlflow" in sys.modules else "the MLflow store"
            return UserError(f"{store}: locked by another process for longer than its busy timeout "
                             "(closedloop.tracking.SQLITE_BUSY_SECONDS); run the stage again once it is free")
        for known, why in _REFUSED_TEXT.items():
            if known in text:
                return UserError(f"{why}: {text[:300]}")
        exc = exc.__cause__
    return None

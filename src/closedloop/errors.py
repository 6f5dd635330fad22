"""The one error type users see: a message that names the file, key or line and what was expected."""


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

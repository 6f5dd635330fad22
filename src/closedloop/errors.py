"""The one error type users see: a message that names the file, key or line and what was expected."""


class UserError(Exception):
    """Bad input from the user. The CLI prints its message on one line and exits 2."""

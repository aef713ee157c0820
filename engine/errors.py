"""Errors the CLI reports as one line (the message says how to fix the input) instead of a traceback."""


class UserError(RuntimeError):
    """Bad input: a path, a name, a value or a file that cannot be used as given."""

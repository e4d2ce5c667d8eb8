"""One exception type for every user-facing failure; the CLI prints its message on one line, no traceback."""


class DinoprobeError(Exception):
    """A problem the user can fix (bad path, mismatched cache, offline hub...). The message says what to do."""

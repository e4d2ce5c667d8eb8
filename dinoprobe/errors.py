"""One exception type for every user-facing failure; the CLI prints its message on one line, no traceback."""


class DinoprobeError(ValueError):
    """A problem the user can fix (bad path, mismatched cache, offline hub, bad input array...); the message says
    what to do. A ValueError, so the estimators raise what scikit-learn's conventions expect at the boundary."""

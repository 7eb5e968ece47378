"""Errors a user can act on: printed as one ``ERROR:`` line, never with a traceback.

Every problem caused by the input (a config key, a dataset, a checkpoint file) raises a
:class:`UserError` subclass whose message names the file / key / value and the fix. The entry
points run under :func:`run_main`, which prints such an error in one line and exits 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem with the user's input; the message is what they need to fix it."""


def run_main(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status; a :class:`UserError` or a missing file becomes one ``ERROR:`` line, exit 2."""
    try:
        return main() or 0
    except (UserError, FileNotFoundError) as exc:
        text = " ".join(str(exc).split("\n")) if not isinstance(exc, FileNotFoundError) or not exc.filename else \
            f"{exc.filename}: {exc.strerror or 'not found'}"
        print(f"ERROR: {text}", file=sys.stderr, flush=True)
        return 2

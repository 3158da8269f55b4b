"""User errors and the one place the command lines turn them into a message.

A *user error* is bad input the user can fix (a bad recipe, a corrupted store, a missing hub, a shape
mismatch): the command prints one line and exits 2. By project convention input checks raise
`ValueError` / `FileNotFoundError` or a subclass of `UserError`; anything else is a bug and keeps its
traceback. `--debug` (or `FEATURE_EVOLUTION_DEBUG=1`) shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input with a message that says what to fix; the CLI shows the message, not the traceback."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError)
DEBUG_ENV = "FEATURE_EVOLUTION_DEBUG"


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str], prog: str) -> int:
    """Call `main(argv)` (without `--debug`); a user error becomes `prog: error: ...` and exit code 2."""
    argv = list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        rc = main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {e}\n(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0

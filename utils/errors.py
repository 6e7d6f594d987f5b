"""The one exception type for mistakes a user can fix (bad paths, keys, values, checkpoints).

``main.py`` catches it and prints its message as a single line, without a traceback, then exits
with status 2. Raise it with a message that names the culprit (the path, key or value at fault).
"""
from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the culprit."""


def exit_status(action: Callable[[], Any]) -> int:
    """Run a tool's ``action``: 0 when it returns, 2 with its message as one line on stderr for a UserError."""
    try:
        action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

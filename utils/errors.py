"""The one exception type for mistakes a user can fix (bad paths, keys, values, checkpoints).

``main.py`` catches it and prints its message as a single line, without a traceback, then exits
with status 2. Raise it with a message that names the culprit (the path, key or value at fault).
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the culprit."""

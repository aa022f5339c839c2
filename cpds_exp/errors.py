"""The one exception type users see: its message is a single line naming the problem and the fix."""


class CpdsError(Exception):
    """A user-facing error; the entry point prints it as one line, without a stack trace."""

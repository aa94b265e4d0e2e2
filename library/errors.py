"""The one exception type the library raises for bad user input.

Scripts catch it and print its message as a single line (no traceback); everything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user: a missing or corrupt file, an unknown key, an impossible setting.

    The message names the file or key and says how to fix it, in one line.
    """


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), for a one-line error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]

"""The one exception type the library raises for bad user input.

Scripts catch it and print its message as a single line (no traceback); everything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user: a missing or corrupt file, an unknown key, an impossible setting.

    The message names the file or key and says how to fix it, in one line.
    """

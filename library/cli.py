"""What every script does at its edge: bad input becomes one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from library.errors import UserError


def run_script(body: Callable[[], object]) -> int:
    """Run a script's body; a `UserError` is printed as `error: <message>` and gives exit code 2."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

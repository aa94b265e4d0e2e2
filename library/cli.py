"""What every script does at its edges: reading the command line, and turning failures into one line.

- `table.key=value` overrides may stand anywhere on the command line (after a positional or an option
  too); anything else argparse does not know is an error.
- Bad input (`UserError`), a disk or folder problem (`OSError`: full, read-only, a file where a folder
  should be), running out of memory and Ctrl-C each end as one `error: ...` line on stderr and an exit
  code (2 for bad input, 130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from library.errors import UserError

OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+=")  # table.key=value
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are `UserError`s (one line, exit code 2) instead of usage dumps."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, collecting `table.key=value` overrides wherever they stand into `args.overrides`."""
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if not OVERRIDE.match(item)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    return args


def run_script(body: Callable[[], object]) -> int:
    """Run a script's body and return its exit code; failures print one `error: ...` line on stderr."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing half-written was left behind", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"error: {where}{exc.strerror or exc}; check the path, its permissions and free space",
            file=sys.stderr,
        )
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and type(exc).__name__ != "OutOfMemoryError":
            raise  # a bug: its traceback is what a report needs
        print(
            "error: out of memory: lower the batch size (train.batch_size, generate.batch_size, "
            "sweep.images_per_batch) or the resolution, or set train.cuda_graphs=false or train.low_memory=true",
            file=sys.stderr,
        )
        return 2
    return 0

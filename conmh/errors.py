"""Errors the CLI turns into a one-line message and an exit code (no traceback).

Exit codes scripts can rely on:

* 0 -- success
* 1 -- an unexpected bug (a traceback is printed)
* 2 -- bad command-line usage (argparse's own convention)
* 3 -- bad input: a data file, checkpoint, codes file or config that is wrong
* 4 -- a dataset file is missing (the message says what to get and where)
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConMHError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 3


class DataError(ConMHError):
    """A dataset file is malformed (wrong key, shape, dtype, count, values)."""


class MissingDataError(DataError):
    """A dataset file that should exist does not."""

    exit_code = 4


class CheckpointError(ConMHError):
    """A checkpoint cannot be loaded into the chosen architecture."""


class CodesError(ConMHError):
    """A codes file is malformed."""


class ConfigError(ConMHError):
    """A configuration value makes no sense."""


class LaunchError(ConfigError):
    """A pipeline job cannot start as configured (too few GPUs, no SLURM allocation for several nodes)."""


def exit_status(prog: str, run: Callable[[], int | None]) -> int:
    """Run a command's body; its exit status. The one place where errors become exit codes: a
    ConMHError or OSError (unwritable output, disk full) prints one line; any other error is a bug and
    keeps its traceback."""
    try:
        return run() or 0
    except ConMHError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return ConMHError.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130

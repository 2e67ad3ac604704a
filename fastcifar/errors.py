"""User-facing errors: one line, exit code 2, a traceback only with --debug.

Library code raises `UserError` for anything the user can fix (a wrong path, a bad flag value, a corrupt
file). Command-line entry points wrap their `main` in `run_cli`, which turns it into
`fastcifar: error: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix. The message is one line: what, where (file or flag), what to do."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters; its type name if empty
    (a truncated file can raise `EOFError('')`)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """`import module`, or, when it is not installed, a UserError naming the pyproject.toml extra that brings it
    (`purpose`: what the module is needed for, said in the message)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UserError(f"{(e.name or module).split('.')[0]} is not installed{f' ({purpose})' if purpose else ''}: "
                        f"pip install 'fastcifar[{extra}]'") from None
    except ImportError as e:  # installed but broken, e.g. a shared library missing on this machine
        raise UserError(f"{module} is installed but fails to import ({first_line(e)}): reinstall it with "
                        f"pip install --force-reinstall 'fastcifar[{extra}]'") from None


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str = "fastcifar") -> int:
    """Run `main(argv)` as the module docstring says; with `--debug` anywhere in argv a UserError is re-raised."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return int(main(args) or 0)
    except (UserError, KeyboardInterrupt) as e:
        if debug:
            raise
        interrupted = isinstance(e, KeyboardInterrupt)
        print(f"{prog}: interrupted" if interrupted else f"{prog}: error: {e}", file=sys.stderr)
        return 130 if interrupted else 2  # 128 + SIGINT, or argparse's code for a usage error

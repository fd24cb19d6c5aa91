"""The one error type users see, and the wrapper that turns it into a one-line message."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class NextwordError(Exception):
    """A problem with the user's input or params: printed as one line, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to 200 characters."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def damaged(path, err: BaseException) -> NextwordError:
    """The one-line error for a file that exists but cannot be read back."""
    return NextwordError(f"{path}: damaged, cannot be loaded ({first_line(err)})")


def exit_on_error(main: Callable[..., None]) -> Callable[..., None]:
    """Run ``main``; on a NextwordError print ``error: <message>`` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except NextwordError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper

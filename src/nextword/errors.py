"""The one error type users see, and the wrapper that turns it into a one-line message."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class NextwordError(Exception):
    """A problem with the user's input or params: printed as one line, no traceback."""


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

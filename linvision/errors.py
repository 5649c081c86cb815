"""User errors of the jobs (``linvision classify | distill | linearize | sample``): one line on stderr, exit code 2.

A job validates its whole config and its inputs (files, the pipeline's latent stride, class counts) before it
creates anything, and raises :class:`UserError` (or a subclass, e.g. the configs' ``ConfigError``) naming the
key at fault and what is valid. :func:`reports_user_errors` turns that into ``<prog>: error: <message>`` and
exit code 2, as argparse does for a bad command line. Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Input a job cannot use: a config value, a missing or unreadable file, a size the model cannot take."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (the lines of a multi-line report joined with ``; ``, or with a
    space after a line that ends in a colon)."""
    text = ""
    for line in (line.strip() for line in str(err).splitlines()):
        if line:
            text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text or type(err).__name__


def reports_user_errors(prog: str) -> Callable:
    """Decorator for a job's ``main(args) -> int``: a :class:`UserError` becomes one stderr line and exit code 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except UserError as err:
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
                return EXIT_USER_ERROR

        return run

    return wrap


__all__ = ["EXIT_USER_ERROR", "UserError", "one_line", "reports_user_errors"]

"""Docstrings as plain text for ``--help``: the jobs' module docstrings are reST, a terminal wants none of it."""
from __future__ import annotations

import argparse
import re

# :func:`~a.b.c` -> c, :class:`a.B` -> a.B (any Sphinx role)
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]+?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")


def _role(match: re.Match) -> str:
    name = match.group(2).strip()
    return name.rsplit(".", 1)[-1] if match.group(1) else name


def plain_text(text: str) -> str:
    """``text`` with Sphinx roles, ````literals```` and ``**strong**`` markup removed; layout unchanged."""
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(r"\1", text)
    return _STRONG.sub(r"\1", text)


class PlainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's raw-description formatter (the docstrings' layout is kept) that renders reST to plain text
    in the description, the epilog and every argument's help."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


__all__ = ["PlainHelpFormatter", "plain_text"]

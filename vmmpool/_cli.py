"""What every ``python -m vmmpool`` command shares: one error style (issue 21).

Every usage or setting error is one line on stderr, exit status 2, in
argparse's own style: ``python -m vmmpool CMD: error: MESSAGE``.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ._errors import DeviceUnavailableError

__all__ = ["PROG", "UsageError", "Parser", "fail", "short", "device_advice"]

#: The program name every message starts with.
PROG = "python -m vmmpool"

#: Most characters of an argparse message shown (argparse quotes a bad value whole).
MESSAGE_CHARS = 200


class UsageError(Exception):
    """Bad arguments; the command prints ``PROG CMD: error: <message>`` and returns 2."""


def short(message: str, limit: int = MESSAGE_CHARS) -> str:
    """`message` cut to `limit` characters: argparse quotes a bad value whole
    (``invalid int value: '999...'``), and a value can be megabytes long (issue 17)."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (one short line) instead of
    printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(short(message))


def fail(prog: str, message: object) -> int:
    """Write ``prog: error: message`` (one line) to stderr; return 2."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"{prog}: error: {text}\n")
    return 2


def device_advice(exc: DeviceUnavailableError) -> str:
    """:class:`DeviceUnavailableError`'s message for a command line: the fallback is an option
    (``--device host``), not Python code."""
    return (
        f"device {exc.device!r} is unavailable: {exc.reason}; pass --device host for the host "
        "emulator, which runs the same code on Linux virtual memory without a GPU"
    )

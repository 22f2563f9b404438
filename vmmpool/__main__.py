"""Command line: ``python -m vmmpool info`` and ``python -m vmmpool demo``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, TextIO

__all__ = ["main", "info"]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def info(out: TextIO | None = None) -> int:
    """Print every device: backend, name, granularity, memory and capabilities."""
    from . import __version__
    from ._backends import cuda as _cuda
    from ._device import devices

    stream = sys.stdout if out is None else out
    w = stream.write
    w(f"vmmpool {__version__}\n")
    reason = _cuda.probe(0)
    if reason is not None:
        w(f"CUDA: unavailable ({reason}); the host emulator stands in for a GPU\n")
    for dev in devices():
        free, total = dev.free_memory, dev.total_memory
        w(f"\n{dev}\n")
        w(f"  backend:      {'CUDA driver' if not dev.is_host else 'host emulator'}\n")
        w(f"  name:         {dev.name}\n")
        w(
            f"  granularity:  {_mib(dev.granularity)} minimum, "
            f"{_mib(dev.recommended_granularity)} recommended\n"
        )
        w(f"  memory:       {_mib(total)} total, {_mib(free)} free\n")
        w(f"  VMM:          {'yes' if dev.supports_vmm else 'no'}\n")
        w(f"  POSIX fd:     {'yes' if dev.supports_posix_fd else 'no'}\n")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmmpool`` and the ``vmmpool`` script.

    Returns 2, after one line on stderr, for bad arguments or settings (such
    as a malformed ``VMMPOOL_HOST_CAPACITY``).
    """
    parser = _Parser(
        prog="python -m vmmpool", description="CUDA virtual memory management from Python."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list devices and their VMM capabilities")
    sub.add_parser(
        "demo",
        help="fragmentation demo: vmmpool vs a contiguous allocator",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            return info()
        except ValueError as exc:  # a malformed setting, e.g. VMMPOOL_HOST_CAPACITY
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from ._demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())

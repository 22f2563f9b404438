"""The peer subprocess: ``python -m vmmpool.replay --peer NAME TRACE [--limit BYTES]
[--snapshot-device N] [--max-trace-bytes BYTES]`` (see :func:`vmmpool.replay.peer_replays`)."""

from __future__ import annotations

import argparse
import sys

from ._peers import PEERS, _peer_main


def main(argv: list[str] | None = None) -> int:
    """Parse the peer's arguments and run it (exit status 0 after its one result line)."""
    ap = argparse.ArgumentParser(prog="python -m vmmpool.replay")
    ap.add_argument("--peer", required=True, choices=PEERS)
    ap.add_argument("trace")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--snapshot-device", type=int, default=None)
    ap.add_argument("--max-trace-bytes", type=int, default=None)
    a = ap.parse_args(argv)
    return _peer_main(a.peer, a.trace, a.limit, a.snapshot_device, a.max_trace_bytes)


if __name__ == "__main__":  # pragma: no cover - the peer subprocess
    sys.exit(main())

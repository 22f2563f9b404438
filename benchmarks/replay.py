"""Trace replay benchmark: real allocation traces through PagePool (and, on a GPU, the peers).

Usage::

    python benchmarks/replay.py TRACE... [--device D] [--json PATH]

For each trace (a PyTorch memory snapshot pickle or an RMM CSV log): one
replay with default settings and a search of the smallest limit, in whole
pages, at which the replay completes (``vmmpool.replay.min_limit``), printed
beside the recorded PyTorch run's peak reserved and peak allocated. On a GPU
the same trace is replayed through PyTorch's caching allocator (default,
``expandable_segments:True``, and in a ``vmmpool.torch.MemPool``: "torch on
vmmpool") and ``cupy.cuda.MemoryPool``, each in its own
subprocess; without one they are listed as skipped, with the reason.

Writes ``benchmarks/results/replay-<device kind>.json`` (``replay-host.json``
on the host emulator) with the date, the machine and every figure. A trace
whose replay fails for a reason other than out of memory (an OS limit of the
emulator, say) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import vmmpool
from vmmpool import replay as R


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p.add_argument(
        "--device", default=None,
        help="host, cuda or cuda:N (default: a fresh host-emulated device sized to each trace)",
    )
    p.add_argument("--json", default=None, metavar="PATH",
                   help="JSON file (default: benchmarks/results/replay-<device kind>.json)")
    p.add_argument("--no-peers", action="store_true", help="skip the GPU peer allocators")
    p.add_argument("--scale", type=float, action="append", default=None, metavar="F",
                   help="also replay each trace with every size times F (repeatable; e.g. 0.1 turns "
                        "10-160 MiB tensors into 1-16 MiB); the recorded figures do not apply there")
    args = p.parse_args(argv)
    device = None if args.device is None else vmmpool.Device(args.device)
    shown = device if device is not None else vmmpool.Device.emulated(2 << 20)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    jobs = []
    for path in args.traces:
        base = R.load(path)
        jobs.append((path, base, False))
        for f in args.scale or ():
            jobs.append((path, R.scaled(base, f), True))
    for path, tr, is_scaled in jobs:
        t0 = time.perf_counter()
        try:
            res = R.replay(tr, device)
            mn = R.min_limit(tr, device, default=res) if res.completed else None
        except (OSError, vmmpool.VmmError) as e:
            failures.append({
                "trace": tr.name, "events": len(tr.events), "peak_live": tr.peak_live,
                "recorded_peak_reserved": tr.recorded_peak_reserved,
                "recorded_peak_allocated": tr.recorded_peak_allocated,
                "error": f"{type(e).__name__}: {e}",
            })
            print(f"{tr.name}: replay failed: {type(e).__name__}: {e}", flush=True)
            continue
        peers = [] if args.no_peers or is_scaled or (device is not None and device.is_host) else (
            R.peer_replays(path)
        )
        rec = R.record(tr, res, mn, peers)
        rec["total_wall_s"] = time.perf_counter() - t0
        records.append(rec)
        print(f"{tr.name}: done in {rec['total_wall_s']:.1f} s", flush=True)
    print(R.format_table(records))
    for f in failures:
        print(f"{f['trace']}: not replayed: {f['error']}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    payload = {
        "columns": dict(R.COLUMNS),
        "open_files_limit": [soft, hard],
        "traces": records,
        "failed": failures,
    }
    out = _common.write_json("replay", shown, R.json_safe(payload), args.json)
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

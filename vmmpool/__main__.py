"""Command line: ``python -m vmmpool info``, ``demo`` and ``replay``."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TextIO

from ._cli import PROG, Parser, UsageError, device_advice, fail, short

__all__ = ["main", "info", "replay_main"]


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


def replay_main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m vmmpool replay TRACE... [--device D] [--limit N | --min-limit] [--snapshot-device N]
    [--json PATH] [--keep-cached] [--max-trace-bytes SIZE]``.

    Replays each trace through a fresh :class:`~vmmpool.PagePool` and prints
    a table (see :data:`vmmpool.replay.COLUMNS`); on a GPU the peer allocators
    too. A PyTorch snapshot with events on several devices gives one row per
    device (``--snapshot-device N`` replays only device N); allocations the
    recorded run failed (``oom`` events) are counted in the row. Returns 0,
    1 when a replay ran out of memory, or 2 (one line on stderr) for bad
    arguments or unreadable traces (a line each). Of several traces, those
    that cannot be read are named and the others replayed, table and JSON
    included; the status is 2 then.
    """
    import dataclasses
    import json

    from . import replay as R
    from ._errors import DeviceUnavailableError, VmmError
    from ._sizes import positive_size_arg
    from .replay._load import _load_devices

    stream = sys.stdout if out is None else out
    prog = f"{PROG} replay"
    p = Parser(prog=prog, description="Replay allocation traces through a PagePool.")
    p.add_argument("traces", nargs="+", metavar="TRACE",
                   help="PyTorch memory snapshot pickles or RMM CSV logs")
    p.add_argument("--device", default=None,
                   help="host, cuda or cuda:N (default: a host-emulated device sized to the trace)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--limit", type=positive_size_arg, default=None,
                   help="pool limit, e.g. 20GiB, 1.5 GiB or 16GB (GB is decimal, GiB binary)")
    g.add_argument("--min-limit", action="store_true",
                   help="also search the smallest limit (whole pages) that completes")
    p.add_argument("--snapshot-device", type=int, default=None, metavar="N",
                   help="replay device N of a PyTorch snapshot (default: each device with events, "
                        "one row each)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument("--keep-cached", action="store_true",
                   help="replay through PagePool(keep_cached=True): cached pages stay mapped until the "
                        "limit needs them (no driver call in a loop once warm, more memory held)")
    p.add_argument("--max-trace-bytes", type=positive_size_arg, default=None, metavar="SIZE",
                   help="the largest trace file read, e.g. 4GiB (default 1GiB: memory grows with "
                        "a file's size; raise it for a larger trace you trust)")
    try:
        args = p.parse_args(argv)
        if args.json:
            # Refuse a path that cannot be written before the replays, not after them: a
            # --min-limit search of a large trace runs for minutes.
            where = os.path.dirname(os.path.abspath(args.json))
            if os.path.isdir(args.json):
                raise UsageError(short(f"argument --json: {args.json!r} is a directory: give a file name"))
            if not os.path.isdir(where):
                raise UsageError(
                    short(f"argument --json: cannot write {args.json!r}: no directory {where!r}")
                )
        device = None
        if args.device is not None:
            from ._device import Device

            device = Device(args.device)
    except UsageError as e:
        return fail(prog, f"{e} (see --help)")
    except DeviceUnavailableError as e:
        return fail(prog, device_advice(e))
    except (ValueError, TypeError, VmmError) as e:
        return fail(prog, e)
    traces = []
    unreadable: list[BaseException] = []
    for path in args.traces:
        try:
            rows = _load_devices(path, args.snapshot_device, args.max_trace_bytes)
            named = []
            for t in rows:
                if args.snapshot_device is not None or len(rows) > 1:
                    t = dataclasses.replace(t, name=f"{t.name} [device {t.device}]")
                if device is None:
                    R.emulated_capacity(t)  # too large for the emulator: say so before any replay
                named.append((path, t))
        except (R.TraceError, ValueError, TypeError, VmmError) as e:
            unreadable.append(e)
            continue
        traces.extend(named)
    if unreadable and not traces:  # nothing to replay: a line for each, as for bad arguments
        for bad in unreadable:
            fail(prog, bad)
        return 2
    skipped = [" ".join(str(e).split()) for e in unreadable]  # one line each
    for text in skipped:  # several traces, some readable: say which were not, replay the rest
        sys.stderr.write(f"{prog}: error: {text} (skipped; the other traces are replayed)\n")
    records = []
    status = 2 if unreadable else 0
    for path, tr in traces:
        try:
            res = R.replay(tr, device, args.limit, keep_cached=args.keep_cached)
            mn = None
            if res.completed and args.min_limit:
                mn = R.min_limit(tr, device, default=res, keep_cached=args.keep_cached)
        except (R.TraceError, ValueError, TypeError) as e:
            # Not a replay failure: the trace or the arguments cannot be replayed as given
            # (a trace larger than the emulator replays, a limit no device can address).
            return fail(prog, e)
        except (OSError, VmmError) as e:
            # Not out of memory: the device itself failed (an OS limit of the
            # host emulator, a driver error). Say so and go on.
            sys.stderr.write(f"{prog}: {tr.name}: replay failed: {type(e).__name__}: {e}\n")
            status = max(status, 1)
            continue
        if not res.completed:
            status = max(status, 1)
        peers = (
            R.peer_replays(path, search=args.min_limit, device=tr.device,
                           max_bytes=args.max_trace_bytes)
            if device is None or not device.is_host else []
        )
        records.append(R.record(tr, res, mn, peers))
    stream.write(R.format_table(records) + "\n")
    for r in records:
        if not r["vmmpool"]["completed"]:
            stream.write(f"{r['trace']}: {r['vmmpool']['error']}\n")
    if args.json:
        try:
            with open(args.json, "w") as fh:
                payload: dict[str, object] = {"traces": records}
                if skipped:
                    payload["unreadable"] = skipped
                json.dump(R.json_safe(payload), fh, indent=1, allow_nan=False)
        except OSError as e:
            return fail(prog, f"cannot write {args.json}: {e.strerror or e}")
    return status


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m vmmpool`` and the ``vmmpool`` script run it through ``_run``).

    Returns 2, after one line on stderr, for bad arguments or settings (such
    as a malformed ``VMMPOOL_HOST_CAPACITY``).
    """
    parser = Parser(prog=PROG, description="CUDA virtual memory management from Python.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list devices and their VMM capabilities")
    sub.add_parser(
        "demo",
        help="fragmentation demo: vmmpool vs a contiguous allocator",
        add_help=False,
    )
    sub.add_parser("replay", help="replay allocation traces through a PagePool", add_help=False)
    try:
        args, rest = parser.parse_known_args(argv)
    except UsageError as exc:
        return fail(PROG, f"{exc} (see --help)")
    if args.command == "replay":
        return replay_main(rest)
    if args.command == "info":
        if rest:
            return fail(f"{PROG} info", f"unrecognized arguments: {short(' '.join(rest))}")
        try:
            return info()
        except ValueError as exc:  # a malformed setting, e.g. VMMPOOL_HOST_CAPACITY
            return fail(f"{PROG} info", exc)
    from ._demo import main as demo_main

    return demo_main(rest)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: TextIO | None = None, line: str | None = None,
) -> None:
    """vmmpool's own warnings as one line in the command's style, not a source excerpt."""
    from ._errors import VmmWarning

    if issubclass(category, VmmWarning):
        text = " ".join(str(message).split())
        (file or sys.stderr).write(f"{PROG}: warning: {text}\n")
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def _run() -> int:
    """`main`, quiet when the reader of stdout goes away (``python -m vmmpool info | head -1``)."""
    warnings.showwarning = _show_warning
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that says nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped


if __name__ == "__main__":
    sys.exit(_run())

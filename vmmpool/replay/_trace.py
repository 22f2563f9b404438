"""The trace a replay runs: :class:`Trace`, :class:`TraceError`, and what the readers share."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._options import brief

__all__ = ["MAX_TRACE_BYTES", "Trace", "TraceError", "scaled"]

#: The largest trace file read by default (1 GiB). Memory grows with a file's size, by
#: about 4x for a real snapshot and by up to 120x for a hostile one made only of empty
#: containers (each within the pickle scan's other bounds): a file is bounded before it is
#: parsed. The readers' `max_bytes` (the CLI's ``--max-trace-bytes``) raises it for a
#: larger trace you trust.
MAX_TRACE_BYTES = 1 << 30
#: A file without a size (a pipe, a device file) is read in chunks of this many bytes.
_CHUNK = 1 << 20

class TraceError(ValueError):
    """A trace file that cannot be read: the message names file and position."""


@dataclass(frozen=True)
class Trace:
    """A trace, ready to replay.

    Attributes
    ----------
    name : str
        The file name (or a given name).
    events : tuple of (bool, int, int, int)
        ``(is_free, slot, nbytes, stream)`` in replay order, prelude first.
        ``slot`` numbers the allocation (``0 .. n_slots - 1``); a free names
        the slot of the allocation it frees (its ``nbytes`` is that size).
    n_slots : int
        Allocations in the trace (prelude included).
    n_prelude : int
        Allocations of blocks live before recording started.
    streams : tuple of int
        The distinct stream handles, in order of first use.
    recorded_peak_reserved : int or None
        The recorded run's peak reserved bytes (segment events), when known.
    recorded_peak_allocated : int or None
        The recorded run's peak allocated bytes (512-byte rounded), when known.
    source : str
        ``"pytorch-snapshot"`` or ``"rmm-csv"``.
    n_failed : int
        Allocations the recorded run reported as failed (skipped): RMM failures, PyTorch
        ``oom`` events.
    device : int or None
        The CUDA device whose events these are (PyTorch snapshots).
    devices : tuple of int
        Every device of the snapshot with events (PyTorch snapshots).
    """

    name: str
    events: tuple[tuple[bool, int, int, int], ...]
    n_slots: int
    n_prelude: int
    streams: tuple[int, ...]
    recorded_peak_reserved: int | None = None
    recorded_peak_allocated: int | None = None
    source: str = "pytorch-snapshot"
    n_failed: int = 0
    #: The recorded run's reserved bytes over the replay: ``(event index, bytes)`` at the start
    #: and after each segment event (PyTorch snapshots only; empty otherwise).
    recorded_reserved: tuple[tuple[int, int], ...] = ()
    device: int | None = None
    devices: tuple[int, ...] = ()

    @property
    def peak_live(self) -> int:
        """Largest sum of live requested bytes over the trace."""
        live = peak = 0
        for is_free, _slot, n, _s in self.events:
            if is_free:
                live -= n
            else:
                live += n
                if live > peak:
                    peak = live
        return peak

    @property
    def final_live(self) -> int:
        """Requested bytes still live after the last event."""
        return sum(-n if f else n for f, _sl, n, _s in self.events)


class _Builder:
    """Turns alloc/free by address into slot events (shared by both readers)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[bool, int, int, int]] = []
        self.live: dict[int, tuple[int, int, int]] = {}  # addr -> (slot, size, stream)
        self.n_slots = 0
        self.streams: dict[int, None] = {}

    def alloc(self, addr: int, size: int, stream: int, where: str) -> None:
        if addr in self.live:
            raise TraceError(f"{self.name}: {where}: allocation at {addr:#x}, which is already live")
        slot = self.n_slots
        self.n_slots += 1
        self.live[addr] = (slot, size, stream)
        self.streams.setdefault(stream, None)
        self.events.append((False, slot, size, stream))

    def free(self, addr: int, where: str) -> None:
        got = self.live.pop(addr, None)
        if got is None:
            raise TraceError(f"{self.name}: {where}: free of unknown address {addr:#x}")
        slot, size, stream = got
        self.events.append((True, slot, size, stream))


def _int(value: object, name: str, what: str, where: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        got = brief(value) if type(value) is int else f"{type(value).__name__} {brief(value)}"
        raise TraceError(f"{name}: {where}: {what} must be an int in [0, 2**64), got {got}")
    return value


def _cut(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (an error message quoting something untrusted), with
    every character that is not printable escaped (``\\x1b``: a file's terminal escape
    sequences must not reach the terminal that shows the message)."""
    cut = text if len(text) <= limit else text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut if len(text) <= limit else cut + f"... ({len(text)} characters)"


def scaled(trace: Trace, factor: float) -> Trace:
    """`trace` with every size multiplied by `factor` (at least 1 byte): the same program
    with smaller (or larger) tensors, e.g. ``0.1`` turns 10-160 MiB activations into 1-16 MiB.

    The recorded run's figures do not apply to the scaled trace and are dropped.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1e6:
        raise ValueError(f"factor must be a number in (0, 1e6), got {brief(factor)}")
    sizes: dict[int, int] = {}
    events = []
    for is_free, slot, nbytes, stream in trace.events:
        if not is_free:
            sizes[slot] = max(1, int(nbytes * factor))
        events.append((is_free, slot, sizes[slot], stream))
    return dataclasses.replace(
        trace, name=f"{trace.name} x{factor:g}", events=tuple(events),
        recorded_peak_reserved=None, recorded_peak_allocated=None, recorded_reserved=(),
    )


def repeated(trace: Trace, times: int) -> Trace | None:
    """`trace` with everything after its prelude run `times` times: a loop's steady state.

    The part after the prelude must free every block it allocates (an inference pass);
    each run gets slots of its own. Returns None when it does not (a training run keeps
    the optimizer's state it makes in its first step): repeating it would only grow.
    """
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be an int >= 1, got {brief(times)}")
    first = trace.n_prelude  # the prelude's allocations come first
    body = trace.events[first:]
    made = {slot for is_free, slot, _n, _s in body if not is_free}
    freed = {slot for is_free, slot, _n, _s in body if is_free}
    if made != freed:
        return None
    span = trace.n_slots - min(made, default=trace.n_slots)  # slots are numbered in order
    events = list(trace.events[:first])
    for i in range(times):
        off = i * span
        events.extend((is_free, slot + off, n, st) for is_free, slot, n, st in body)
    return dataclasses.replace(
        trace, name=f"{trace.name} x{times} passes", events=tuple(events),
        n_slots=trace.n_slots + (times - 1) * span,
        recorded_peak_reserved=None, recorded_peak_allocated=None, recorded_reserved=(),
    )


def _read_bounded(
    p: Path, max_bytes: int | None, sniff: Callable[[bytes], object] | None = None
) -> bytes:
    """The bytes of file `p`, at most `max_bytes` (default :data:`MAX_TRACE_BYTES`).

    The file is opened once: `sniff`, when given, sees its first 64 bytes before the rest is
    read (and may raise), so a pipe or FIFO is read whole by one reader. A regular file
    longer than the bound is refused by its size, unread; another file (a pipe, a device
    file: no size to ask) is read in chunks up to one byte past the bound. A longer file is
    a :class:`TraceError`, read no further.
    """
    limit = MAX_TRACE_BYTES if max_bytes is None else max_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_bytes must be an int >= 1, got {limit!r}")
    name = p.name

    def too_long(size: str) -> TraceError:
        return TraceError(
            f"{name}: {size}more than {limit} bytes, the most a trace file may have "
            f"(max_bytes; the CLI's --max-trace-bytes): raise it for a larger trace you trust"
        )

    try:
        with open(p, "rb") as fh:
            info = os.fstat(fh.fileno())
            regular = stat.S_ISREG(info.st_mode)
            parts: list[bytes] = []
            if sniff is not None:
                head = fh.read(64)
                sniff(head)
                if not regular:
                    parts.append(head)
            if regular:
                if info.st_size > limit:
                    raise too_long(f"{info.st_size} bytes, ")
                fh.seek(0)
                # One read of the size the file has (a buffer of `limit` bytes would be
                # allocated up front: MemoryError for a bound larger than the memory).
                parts.append(fh.read(info.st_size + 1))
            total = sum(map(len, parts))
            while total <= limit:
                chunk = fh.read(min(_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
    except OSError as e:
        raise TraceError(f"{name}: cannot read: {e.strerror or e}") from None
    if total > limit:
        raise too_long("")
    return parts[0] if len(parts) == 1 else b"".join(parts)

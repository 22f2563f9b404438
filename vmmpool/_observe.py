"""Observability in PyTorch's terms: summaries, allocation history, memory-viewer snapshots.

Nothing here touches the driver or the pool's locks: the pool hands over plain records
(:class:`~vmmpool.PoolStats`, :class:`~vmmpool.PageInfo`) and this module turns them into text
and into the plain-dict snapshot format that ``torch.cuda.memory._dump_snapshot`` writes, so a
vmmpool pool opens in PyTorch's memory viewer (https://pytorch.org/memory_viz) beside torch's own.

Snapshot format (as PyTorch writes it; only plain dicts, lists, ints and strings)::

    {"segments": [{"device": 0, "address": int, "total_size": int, "stream": int,
                   "segment_type": "large" | "small", "segment_pool_id": (0, 0),
                   "is_expandable": True, "allocated_size": int, "active_size": int,
                   "requested_size": int, "frames": [],
                   "blocks": [{"address": int, "size": int, "requested_size": int,
                               "state": "active_allocated" | "inactive", "frames": []}]}],
     "device_traces": [[{"action": "alloc" | "free_requested" | "free_completed"
                                   | "segment_map" | "segment_unmap",
                         "addr": int, "size": int, "stream": int, "time_us": int,
                         "frames": [{"filename": str, "line": int, "name": str}]}]],
     "allocator_settings": {...}}

vmmpool's segments are the runs of consecutively mapped pages of its address space: each page
is mapped on its own, like the pages of PyTorch's expandable segments. A page mapped again
at the limit (an alias) lies in two segments, or three when it lends its head and its tail (as
in the history's ``segment_map`` events), so the segments' total is address space mapped, which
exceeds the physical bytes held (``reserved_bytes``) while aliases exist.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._pool import PageInfo, PoolStats

from ._options import brief, check_int, shown

__all__ = [
    "AllocationInfo", "History", "MAX_HISTORY_ENTRIES", "check_max_entries", "format_summary",
    "torch_snapshot",
]

#: Most events :meth:`PagePool.record_history` keeps (``sys.maxsize``, PyTorch's default).
MAX_HISTORY_ENTRIES = sys.maxsize


@dataclass(frozen=True)
class AllocationInfo:
    """A live allocation, as a :meth:`~vmmpool.PagePool.snapshot` page lists it.

    Attributes
    ----------
    address : int
        Its pointer.
    size : int
        Bytes the pool holds for it (the request with its rounding).
    requested_size : int
        Bytes asked for.
    stream : int
        Stream key it was allocated on.
    """

    address: int
    size: int
    requested_size: int
    stream: int


def check_max_entries(value: object) -> int:
    """Validate :meth:`PagePool.record_history`'s `max_entries` and return it as ``int``.

    Raises
    ------
    TypeError
        Not an integer.
    ValueError
        Below 1 or above :data:`MAX_HISTORY_ENTRIES`.
    """
    # A deque holds at most sys.maxsize entries: a larger bound would fail inside
    # collections with an OverflowError that names nothing (issue 17).
    n = check_int("max_entries", value, minimum=1, maximum=None)
    if n > MAX_HISTORY_ENTRIES:
        raise ValueError(
            f"max_entries must be <= {MAX_HISTORY_ENTRIES} (sys.maxsize, the most a history can "
            f"hold; PyTorch's default), got {brief(n)}"
        )
    return n


class History:
    """A bounded record of allocation and segment events (``PagePool.record_history``).

    Appending is one ``deque.append`` of a tuple (plus a stack walk for the events `context`
    names); the oldest events are dropped past `max_entries`, as in PyTorch.
    """

    def __init__(self, max_entries: int, context: str | None) -> None:
        n = check_max_entries(max_entries)
        # Frames are kept as tuples (filename, line, name): immutable, so a snapshot's
        # dicts, built afresh by trace(), never share a list with the history.
        self.events: collections.deque[tuple[str, int, int, int, int, tuple[tuple[str, int, str], ...]]] = (
            collections.deque(maxlen=n)
        )
        #: Which events carry a stack: "all", "alloc" or None (as PyTorch's ``context``).
        self.context = context

    def record(self, action: str, addr: int, size: int, stream: int) -> None:
        frames: list[tuple[str, int, str]] = []
        context = self.context
        if context == "all" or (context == "alloc" and action == "alloc"):
            f = sys._getframe(2)
            while f is not None and len(frames) < 32:
                code = f.f_code
                frames.append((code.co_filename, f.f_lineno, code.co_name))
                f = f.f_back  # type: ignore[assignment]
        self.events.append((action, addr, size, shown(stream), time.time_ns() // 1000, tuple(frames)))

    def copy(self) -> History:
        """The events so far, in a history of their own.

        Take it under the pool's lock (where events are recorded): iterating the
        live history while another thread records raises ``RuntimeError``.
        """
        h = History(self.events.maxlen or MAX_HISTORY_ENTRIES, self.context)
        h.events.extend(self.events)
        return h

    def trace(self) -> list[dict[str, Any]]:
        # An "oom" entry holds the device's free bytes where others hold an address, under
        # PyTorch's key for it ("device_free").
        return [
            {"action": a, "device_free" if a == "oom" else "addr": addr, "size": size,
             "stream": stream, "time_us": t,
             "frames": [{"filename": fn, "line": line, "name": name} for fn, line, name in frames]}
            for a, addr, size, stream, t, frames in self.events
        ]


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_summary(stats: PoolStats, where: str, abbreviated: bool = False) -> str:
    """A text table like ``torch.cuda.memory_summary()`` for a pool's statistics.

    With `abbreviated`, only the memory rows (allocated, requested, reserved), as PyTorch's
    abbreviated summary.
    """
    s = stats
    w = 79
    rows: list[tuple[str, str, str]] = [
        ("Allocated memory (with rounding)", _size(s.allocated_bytes), _size(s.peak_allocated_bytes)),
        ("Requested memory", _size(s.requested_bytes), _size(s.peak_requested_bytes)),
        ("Reserved memory (pages held)", _size(s.reserved_bytes), _size(s.peak_reserved_bytes)),
    ]
    if not abbreviated:
        rows += [
            ("  cached (mapped, free)", _size(s.cached_bytes), ""),
            ("  free pages (unmapped)", _size(s.free_pages * s.page_size), ""),
            ("Address space", _size(s.address_space_bytes), ""),
            ("Live allocations", f"{s.live_allocations}", ""),
            ("Cached blocks", f"{s.cached_blocks}", ""),
        ]
    counts = [
        ("mallocs", s.n_malloc), ("frees", s.n_free), ("out of memory", s.n_ooms),
        ("pages created", s.n_page_creations), ("pages released", s.n_page_releases),
        ("remaps", s.n_remaps), ("pages reclaimed", s.n_reclaimed_pages),
        ("synchronizes", s.n_syncs),
    ]
    lines = [
        "=" * w,
        f"|{'vmmpool PagePool memory summary':^{w - 2}}|",
        f"|{where:^{w - 2}}|",
        "|" + "-" * (w - 2) + "|",
        f"| {'Metric':<36}| {'Current':>17} | {'Peak':>17} |",
        "|" + "-" * (w - 2) + "|",
    ]
    lines += [f"| {name:<36}| {cur:>17} | {peak:>17} |" for name, cur, peak in rows]
    if abbreviated:
        lines.append("=" * w)
        return "\n".join(lines)
    lines.append("|" + "-" * (w - 2) + "|")
    ratio = s.peak_reserved_bytes / s.peak_allocated_bytes if s.peak_allocated_bytes else 0.0
    pages = f"{s.total_pages} x {_size(s.page_size)}"
    limit = f"limit {_size(s.limit)}"
    lines.append(f"| {'Pages held, limit':<36}| {pages:>17} | {limit:>17} |")
    lines.append(f"| {'Peak reserved / peak allocated':<36}| {ratio:>17.3f} | {'':>17} |")
    lines.append("|" + "-" * (w - 2) + "|")
    for i in range(0, len(counts), 2):
        cells = [f"{name:<16}{value:>10}" for name, value in counts[i : i + 2]]
        lines.append("| " + " | ".join(cells).ljust(w - 4) + " |")
    lines.append("=" * w)
    return "\n".join(lines)


def _segments(pages: Sequence[PageInfo], page_size: int, device: int) -> list[dict[str, Any]]:
    # Address space, as the history's segment_map events: a page mapped again (an
    # alias) is in two or three segments, and the blocks placed through an alias
    # lie in that alias's segment. A sleeping pool's pages keep their addresses but
    # hold no device memory (the history unmapped them): no segment.
    mapped = sorted(
        (addr, p)
        for p in pages
        if p.state != "asleep"
        for addr in (p.address, *p.alias_addresses)
        if addr is not None
    )
    runs: list[list[tuple[int, PageInfo]]] = []
    for addr, p in mapped:
        prev = runs[-1][-1] if runs else None
        # Adjacent pages of two streams are two segments (PyTorch never merges across
        # streams; two arenas' reservations may abut on a driver).
        if prev is not None and prev[0] + page_size == addr and (
            prev[1].stream is None or p.stream is None or prev[1].stream == p.stream
        ):
            runs[-1].append((addr, p))
        else:
            runs.append([(addr, p)])
    segments = []
    for pairs in runs:
        start = pairs[0][0]
        end = start + len(pairs) * page_size
        run = [p for _, p in pairs]
        allocs: dict[int, AllocationInfo] = {}
        for p in run:
            for a in p.allocations:
                allocs[a.address] = a
        blocks: list[dict[str, Any]] = []
        at = start
        for a in sorted(allocs.values(), key=lambda a: a.address):
            lo, hi = max(a.address, start), min(a.address + a.size, end)
            if hi <= lo:
                continue
            if lo > at:
                blocks.append({"address": at, "size": lo - at, "requested_size": 0, "state": "inactive",
                               "frames": []})
            blocks.append({"address": lo, "size": hi - lo, "requested_size": min(a.requested_size, hi - lo),
                           "state": "active_allocated", "frames": []})
            at = hi
        if at < end:
            blocks.append({"address": at, "size": end - at, "requested_size": 0, "state": "inactive",
                           "frames": []})
        active = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
        streams = {p.stream for p in run if p.stream is not None}
        small = all(p.kind == "small" for p in run)
        segments.append({
            "device": device,
            "address": start,
            "total_size": end - start,
            "stream": min(streams) if streams else 0,
            "segment_type": "small" if small else "large",
            "segment_pool_id": (0, 0),
            "is_expandable": True,
            "allocated_size": active,
            "active_size": active,
            "requested_size": sum(b["requested_size"] for b in blocks),
            "frames": [],
            "blocks": blocks,
        })
    return segments


def torch_snapshot(
    pages: Iterable[PageInfo],
    page_size: int,
    history: History | None,
    device: int = 0,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a PyTorch memory snapshot (plain dicts) from a pool's page records and history."""
    pages = list(pages)
    return {
        "segments": _segments(pages, page_size, device),
        "device_traces": [[] for _ in range(device)] + [history.trace() if history is not None else []],
        "allocator_settings": dict(settings or {}),
    }

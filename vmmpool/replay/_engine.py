"""The replay engine: one event loop (:func:`run_events`) that :func:`replay` and
:func:`~vmmpool.replay.timeline` share."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .._device import Device
from .._errors import OutOfMemoryError
from ._load import _as_trace
from ._trace import Trace, TraceError

logger = logging.getLogger("vmmpool.replay")

__all__ = ["ReplayResult", "emulated_capacity", "replay", "run_replay", "run_events"]

_GIB = 1 << 30
#: Largest emulated device replay makes (1 TiB: far beyond any GPU, far below what the
#: emulator's bookkeeping can map in seconds).
_EMULATOR_MAX = 1 << 40
#: Pages of the default emulated device for each stream of a trace: a stream's blocks never
#: share a page with another stream's, and each keeps a few cached pages of its own.
_PAGES_PER_STREAM = 8


@dataclass
class ReplayResult:
    """What one replay through a :class:`PagePool` measured.

    Attributes
    ----------
    trace : str
        The trace's name.
    completed : bool
        Every event ran; False when the pool raised out-of-memory.
    failed_event : int or None
        Index of the event that failed (into :attr:`Trace.events`).
    error : str or None
        The out-of-memory message.
    events : int
        Events run (allocations and frees, prelude included).
    n_prelude : int
        Prelude allocations.
    streams : int
        Distinct streams (each its own pool stream key).
    limit : int
        The pool's limit in bytes.
    page_size : int
        Bytes per page.
    peak_live : int
        Largest sum of live requested bytes.
    peak_in_use : int
        Largest bytes in use with the pool's rounding (``PoolStats.peak_allocated_bytes``).
    peak_held : int
        Largest bytes of pages the pool held (``peak_reserved_bytes``).
    page_creations, remaps, syncs, backend_calls : int
        Pages created, cached pages unmapped for reuse, device-wide
        synchronizes, and backend calls of every kind during the replay.
    wall_s : float
        Seconds the replay loop took.
    recorded_peak_reserved, recorded_peak_allocated : int or None
        The recorded run's figures (see :func:`load_snapshot`).
    calls : dict of str to int
        Backend calls by kind.
    keep_cached : bool
        The pool kept its cached pages mapped until the limit needed them
        (``PagePool(keep_cached=True)``): figures of the two modes differ.
    """

    trace: str
    completed: bool
    failed_event: int | None
    error: str | None
    events: int
    n_prelude: int
    streams: int
    limit: int
    page_size: int
    peak_live: int
    peak_in_use: int
    peak_held: int
    page_creations: int
    remaps: int
    syncs: int
    backend_calls: int
    wall_s: float
    recorded_peak_reserved: int | None = None
    recorded_peak_allocated: int | None = None
    calls: dict[str, int] = field(default_factory=dict)
    keep_cached: bool = False

    @property
    def in_use_ratio(self) -> float:
        """``peak_in_use / peak_live``."""
        return self.peak_in_use / self.peak_live if self.peak_live else float("nan")

    @property
    def held_ratio(self) -> float:
        """``peak_held / peak_live``."""
        return self.peak_held / self.peak_live if self.peak_live else float("nan")

    @property
    def us_per_event(self) -> float:
        """Microseconds of wall time per event run."""
        return 1e6 * self.wall_s / self.events if self.events else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (ratios and time per event included)."""
        d = asdict(self)
        d["in_use_ratio"] = self.in_use_ratio
        d["held_ratio"] = self.held_ratio
        d["us_per_event"] = self.us_per_event
        return d


def emulated_capacity(trace: Trace, page_size: int = 2 << 20) -> int:
    """Capacity of the host-emulated device :func:`replay` makes for `trace`.

    Twice the trace's peak live bytes plus 1 GiB (or, when more, 8 pages for
    each of its streams: every stream holds pages of its own), in whole GiB:
    room for any reasonable pool overhead (memfd pages are committed only when
    touched).
    """
    want = 2 * trace.peak_live + max(_GIB, _PAGES_PER_STREAM * page_size * len(trace.streams))
    gib = -(-want // _GIB) * _GIB
    cap = -(-gib // page_size) * page_size
    if cap > _EMULATOR_MAX:
        raise TraceError(
            f"{trace.name}: peak live {trace.peak_live} bytes needs an emulated device of {cap} bytes, "
            f"more than the host emulator replays ({_EMULATOR_MAX} bytes, 1 TiB); replay it on a GPU "
            f"(--device cuda) or check the trace"
        )
    return cap


#: Called at sampled events with ``(event index, live requested bytes, pool)``.
Sampler = Callable[[int, int, Any], None]


def replay(
    trace: Trace | str | os.PathLike[str],
    device: Device | str | int | None = None,
    limit: int | None = None,
    *,
    page_size: int | None = None,
    small_threshold: int | None = None,
    capacity: int | None = None,
    keep_cached: bool = False,
) -> ReplayResult:
    """Replay `trace` through a fresh :class:`PagePool`.

    Parameters
    ----------
    trace : Trace or path-like
        A trace, or a file for :func:`load`.
    device : Device-like, optional
        Where the pool lives. Default: a fresh host-emulated device of
        `capacity` bytes (:func:`emulated_capacity` when omitted).
    limit : int, optional
        The pool's limit in bytes (default: the device's memory).
    page_size, small_threshold : int, optional
        Passed to :class:`PagePool`.
    capacity : int, optional
        Capacity of the emulated device (only when `device` is None).
    keep_cached : bool
        Passed to :class:`PagePool`: cached pages stay mapped until the limit needs them.

    Returns
    -------
    ReplayResult
        ``completed`` is False when the pool ran out of memory; everything
        allocated is freed and the pool closed either way, and the default
        emulated device is closed (its memory files with it). The memory is
        never read or written.
    """
    options = {"page_size": page_size, "small_threshold": small_threshold, "keep_cached": keep_cached}
    return run_replay(_as_trace(trace), device, limit, options, capacity=capacity)


def run_replay(
    tr: Trace,
    device: Device | str | int | None,
    limit: int | None,
    pool_options: dict[str, Any],
    *,
    capacity: int | None = None,
    sampler: Sampler | None = None,
    every: int = 1,
    own_streams: bool | None = None,
) -> ReplayResult:
    """:func:`replay` of a loaded trace, on `device` or a fresh emulated device, with
    `pool_options` for :class:`PagePool`; `sampler` (see :func:`run_events`) watches.

    With `own_streams` (default: on a GPU), each recorded stream other than the special
    handles 0, 1 and 2 is replayed on a stream created for it (destroyed after the pool closes):
    a recorded handle is a pointer of the process that recorded it, and an event recorded
    on it would be undefined behaviour. On the host emulator a handle is only a key.
    """
    if device is not None:
        if capacity is not None:
            raise ValueError("capacity applies only to the default emulated device (device=None)")
        dev = Device(device)
        own = not dev.is_host if own_streams is None else own_streams
        return _replay_own(tr, dev, own, limit, pool_options, sampler, every)
    with Device.emulated(emulated_capacity(tr) if capacity is None else capacity) as dev:
        return _replay_own(tr, dev, bool(own_streams), limit, pool_options, sampler, every)


#: Stream handles every process shares: the default (0), legacy (1) and per-thread (2) streams.
SPECIAL_STREAMS = (0, 1, 2)


def _replay_own(
    tr: Trace,
    dev: Device,
    own: bool,
    limit: int | None,
    pool_options: dict[str, Any],
    sampler: Sampler | None,
    every: int,
) -> ReplayResult:
    if not own or all(s in SPECIAL_STREAMS for s in tr.streams):
        return _replay_on(tr, dev, limit, pool_options, sampler, every)
    backend = dev._backend
    made: dict[int, int] = {}
    try:
        for s in tr.streams:
            if s not in SPECIAL_STREAMS:
                made[s] = backend.stream_create()
        get = made.get
        events = tuple((f, slot, n, get(st, st)) for f, slot, n, st in tr.events)
        mapped = dataclasses.replace(tr, events=events, streams=tuple(get(s, s) for s in tr.streams))
        res = _replay_on(mapped, dev, limit, pool_options, sampler, every)
    except BaseException:
        # The replay's own error (an interrupt, a driver error) is the one raised: a
        # stream that cannot be destroyed now is only logged.
        _destroy_streams(backend, made, raising=False)
        raise
    # After the pool closed (it recorded its last events then); events stay valid.
    _destroy_streams(backend, made, raising=True)
    return res


def _destroy_streams(backend: Any, made: dict[int, int], *, raising: bool) -> None:
    """Destroy every stream in `made`; the first failure is raised after (with `raising`)
    or logged."""
    failed: BaseException | None = None
    for h in made.values():
        try:
            backend.stream_destroy(h)
        except BaseException as e:  # re-raised or logged below
            if not raising:
                logger.warning("destroying replay stream %#x failed", h, exc_info=True)
            failed = failed or e
    if failed is not None and raising:
        raise failed


def run_events(
    tr: Trace, pool: Any, handles: list[Any], sampler: Sampler | None = None, every: int = 1
) -> tuple[int, str | None]:
    """The one event loop: run `tr`'s events through `pool`, keeping each live allocation in
    ``handles[slot]``.

    With `sampler`, it is called after event 0, every `every` events after that and after the
    last event, with the event's index, the live requested bytes and the pool.

    Returns
    -------
    (int, str or None)
        Events run, and the out-of-memory message when the pool ran out (the events stop at
        the one that failed, which is not sampled). Any other exception goes through.
    """
    malloc = pool.malloc
    events = tr.events
    last = len(events) - 1
    at = 0 if sampler is not None else -1  # the next event sampled; -1: none
    live = 0
    i = 0
    try:
        for i, (is_free, slot, nbytes, stream) in enumerate(events):
            h = handles[slot] if 0 <= slot < len(handles) else _NO_SLOT
            if is_free:
                if h is None or h is _NO_SLOT:
                    raise _bad_event(tr, i, slot, "a free of", h)
                h.free()
                handles[slot] = None
                live -= nbytes
            else:
                if h is not None:
                    raise _bad_event(tr, i, slot, "an allocation in", h)
                handles[slot] = malloc(nbytes, stream)
                live += nbytes
            if i == at:
                sampler(i, live, pool)  # type: ignore[misc]
                at = min(i + every, last)
    except OutOfMemoryError as e:
        return i, str(e)
    return len(events), None


#: What :func:`run_events` sees for a slot outside ``0 .. n_slots - 1``.
_NO_SLOT: Any = object()


def _bad_event(tr: Trace, i: int, slot: int, what: str, h: Any) -> TraceError:
    """The error for event `i` of a trace built by hand whose slots do not add up."""
    if h is _NO_SLOT:
        why = f"not in 0..{tr.n_slots - 1}" if tr.n_slots > 0 else "but the trace has no slots"
    else:
        why = "which is not live" if h is None else "which is still live"
    return TraceError(f"{tr.name}: event {i}: {what} slot {slot!r}, {why}")


def _replay_on(
    tr: Trace,
    dev: Device,
    limit: int | None,
    pool_options: dict[str, Any],
    sampler: Sampler | None,
    every: int,
) -> ReplayResult:
    from .._pool import PagePool

    before = dev.counters()
    pool = PagePool(dev, limit=limit, **pool_options)
    handles: list[Any] = [None] * tr.n_slots
    t0 = time.perf_counter()
    try:
        n, error = run_events(tr, pool, handles, sampler, every)
    except BaseException:
        # Anything else (an OS resource of the emulator, an interrupt): give
        # everything back, then let it through.
        _close_quietly(pool, handles)
        raise
    wall = time.perf_counter() - t0
    try:
        for h in handles:
            if h is not None:
                h.free()
        handles.clear()
        st = pool.stats()
    finally:
        pool.close()
    calls = dev.counters() - before
    return ReplayResult(
        trace=tr.name,
        completed=error is None,
        failed_event=None if error is None else n,
        error=error,
        events=n,
        n_prelude=tr.n_prelude,
        streams=len(tr.streams),
        limit=st.limit,
        page_size=st.page_size,
        peak_live=st.peak_requested_bytes,
        peak_in_use=st.peak_allocated_bytes,
        peak_held=st.peak_reserved_bytes,
        page_creations=st.n_page_creations,
        remaps=st.n_remaps,
        syncs=st.n_syncs,
        backend_calls=sum(calls.values()),
        wall_s=wall,
        recorded_peak_reserved=tr.recorded_peak_reserved,
        recorded_peak_allocated=tr.recorded_peak_allocated,
        calls=calls,
        keep_cached=pool.keep_cached,
    )


def _close_quietly(pool: Any, handles: list[Any]) -> None:
    try:
        for h in handles:
            if h is not None:
                h.free()
    except Exception:  # noqa: BLE001 - close() below releases everything anyway
        pass
    handles.clear()
    pool.close()

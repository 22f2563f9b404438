"""Stream caches and the events that order reuse across streams.

Each stream the pool has served has a :class:`StreamState`: two heaps and its
events. A :class:`Heap` is a set of arenas and their free ranges (a
:class:`~._blocks.FreeBlocks`); blocks of at most one page come from the
stream's *small* heap, larger ones from its *large* heap (PyTorch keeps small
blocks apart in the same way). Kept apart, small blocks pack densely into their
own pages instead of leaving sub-page holes between large blocks, and the holes
large blocks leave hold whole pages, which are reclaimable. When a request
finds no room in its own heap at the limit, the other heap's free ranges are
tried before the request fails. Memory freed on
a stream is reused by that stream at once, with no driver call (stream order
makes it safe). Before pages of a stream's free ranges leave it (unmapped for
another range or stream, lent out, or given back), the work that used them
must be done: ``cuMemUnmap`` does not wait for kernels (driver rule 8).

Every free bumps the stream's ``seq``; a free range remembers the ``seq`` of
the last free merged into it. Events are recorded lazily, only when cached
memory must leave the stream, at most one per stream per reclaim: an event
recorded at ``seq = n`` covers every free up to ``n``. The pool queries them
(never blocking) and waits on one only when it must. ``done_seq`` remembers the
newest event known complete, so older free ranges need no further call.

Destroyed streams: an event stays valid after its stream is destroyed, but an
event cannot be *recorded* on a destroyed stream. So (a) a stream object passed
to ``malloc`` (CuPy, PyTorch, ``__cuda_stream__``) is kept referenced by its
state while the stream has memory in the pool, so it outlives its cached
memory; (b) a stream given as a raw handle must be retired with
:meth:`~vmmpool.PagePool.retire_stream` before it is destroyed: that records
its last event at once, and the pool never records on it again.

Forgotten streams (issue 17 item 8): a stream that holds nothing (no mapped
slot: no live block, no cached page) costs nothing. A retired stream, or one
the pool knew by its stream object, is forgotten when its last cached page
leaves it (its events destroyed, its arenas' address space freed); a retired
stream that holds nothing when it is retired is forgotten at once, and
``trim()`` forgets every stream left with nothing. A raw handle that was not
retired keeps its state (it may be used again). Forgetting happens only where
pages are unmapped anyway (never on the malloc/free fast path), is best
effort, and a stream used again starts afresh.

The per-thread default stream (handle 2, ``CU_STREAM_PER_THREAD``) names a
different stream in each calling thread: memory freed on one thread's must not
be reused in stream order by another thread. The pool files it under one key
per thread (:func:`~vmmpool._options.pool_key`, above every 64-bit handle) and records its events
on the legacy default stream (:func:`~vmmpool._options.event_handle`), which waits for the work of
every blocking stream in the context (per-thread default streams are blocking),
since a thread cannot record on another thread's per-thread stream. Snapshots,
histories and ``Allocation.stream`` show such keys as 2 (:func:`~vmmpool._options.shown`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._logq import pool_logger as logger
from .._options import event_handle
from ._blocks import Block, FreeBlocks

if TYPE_CHECKING:
    from .._backends.base import Backend
    from ._arena import Arena




#: Most events kept per stream; older ones are destroyed (legal while pending).
MAX_EVENTS = 8


class EventCounts:
    """Event calls a pool made (kept in its core)."""

    __slots__ = ("n_events", "n_event_queries", "n_event_waits")

    def __init__(self) -> None:
        self.n_events = 0
        self.n_event_queries = 0
        self.n_event_waits = 0


class Heap(FreeBlocks):
    """The arenas of one stream for one size class, and their free ranges."""

    __slots__ = ("stream", "arenas", "small")

    def __init__(self, stream: StreamState, small: bool) -> None:
        super().__init__()
        self.stream = stream
        self.arenas: list[Arena] = []
        self.small = small


class StreamState:
    """The heaps (small and large blocks) and events of one stream."""

    __slots__ = (
        "key", "obj", "small", "large", "heaps", "seq", "events", "done_seq", "retired", "stale",
        "ended",
    )

    def __init__(self, key: int) -> None:
        self.key = key
        self.obj: object = None  # the stream object, kept alive while memory is here
        self.small = Heap(self, True)  # blocks of at most one page
        self.large = Heap(self, False)
        self.heaps = (self.small, self.large)
        self.seq = 0  # frees so far
        self.events: list[tuple[int, int]] = []  # (seq, event handle), oldest first
        self.done_seq = 0  # every free up to this is known complete
        self.retired = False
        self.stale: list[int] = []  # events whose destroy failed: retried by drop_events
        #: The per-thread stream of a thread that ended: forgotten once it holds nothing
        #: (its events still go on the legacy stream: unlike a retired one it needs no sync).
        self.ended = False

    @property
    def arenas(self) -> list[Arena]:
        """Both heaps' arenas."""
        return self.small.arenas + self.large.arenas

    def cached_pages(self, page_size: int) -> int:
        """Pages lying wholly inside free ranges of either heap."""
        return self.small.cached_pages(page_size) + self.large.cached_pages(page_size)

    def prune(self) -> None:
        """Drop empty size bins of both heaps."""
        self.small.prune()
        self.large.prune()

    def free_ranges(self) -> Iterator[Block]:
        """Every free range of both heaps."""
        yield from self.small.by_start.values()
        yield from self.large.by_start.values()

    # ------------------------------------------------------------ events
    def is_done(self, seq: int, backend: Backend, counts: EventCounts, record: bool = True) -> bool:
        """True when the work before free number `seq` is known complete.

        Queries the oldest event covering `seq`, recording one first when none
        does (unless `record` is False or the stream is retired). Never blocks.
        """
        if seq <= self.done_seq:
            return True
        ev = self._covering(seq, backend, counts, record)
        if ev is None:
            return False
        i, (_eseq, h) = ev
        counts.n_event_queries += 1
        if backend.event_query(h):
            self._completed(i, backend)
            return True
        return False

    def wait(self, seq: int, backend: Backend, counts: EventCounts) -> bool:
        """Block until the work before free number `seq` is done; False if it cannot be known."""
        if seq <= self.done_seq:
            return True
        ev = self._covering(seq, backend, counts, True)
        if ev is None:
            return False
        i, (_eseq, h) = ev
        counts.n_event_waits += 1
        backend.event_wait(h)
        self._completed(i, backend)
        return True

    def record(self, backend: Backend, counts: EventCounts) -> None:
        """Record an event covering every free so far (if none does yet)."""
        if self.seq > self.done_seq and (not self.events or self.events[-1][0] < self.seq):
            counts.n_events += 1
            h = backend.event_record(event_handle(self.key))
            self.events.append((self.seq, h))
            while len(self.events) > MAX_EVENTS:
                _s, old = self.events.pop(0)
                try:
                    backend.event_destroy(old)
                except Exception:  # retried at close
                    logger.warning("destroying an old event failed", exc_info=True)
                    self.stale.append(old)

    def _covering(
        self, seq: int, backend: Backend, counts: EventCounts, record: bool
    ) -> tuple[int, tuple[int, int]] | None:
        for i, ev in enumerate(self.events):
            if ev[0] >= seq:
                return i, ev
        if not record or self.retired:
            return None
        self.record(backend, counts)
        ev = self.events[-1]
        return len(self.events) - 1, ev

    def _completed(self, i: int, backend: Backend) -> None:
        """Event `i` is complete: so are all older ones (stream order); destroy them."""
        done = self.events[: i + 1]
        del self.events[: i + 1]
        self.done_seq = max(self.done_seq, done[-1][0])
        for _s, h in done:
            try:
                backend.event_destroy(h)
            except Exception:  # the work is known done: retried at close
                logger.warning("destroying a completed event failed", exc_info=True)
                self.stale.append(h)

    def release_events(self, backend: Backend) -> bool:
        """Destroy every event (before the stream is forgotten); True when all are gone.

        Those whose destroy fails are kept in ``stale`` (retried by the next
        call, destroyed by ``drop_events`` at close).
        """
        evs, self.events = self.events, []
        failed: list[int] = []
        for h in [h for _s, h in evs] + self.stale:
            try:
                backend.event_destroy(h)
            except Exception:  # noqa: BLE001 - kept for close
                failed.append(h)
        self.stale = failed
        return not failed

    def drop_events(self, backend: Backend) -> None:
        """Destroy every event (at close); errors propagate after all are tried."""
        evs, self.events = self.events, []
        evs += [(0, h) for h in self.stale]
        self.stale = []
        err: BaseException | None = None
        for _s, h in evs:
            try:
                backend.event_destroy(h)
            except Exception as e:  # noqa: BLE001 - keep destroying
                err = err or e
        if err is not None:
            raise err

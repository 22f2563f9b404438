"""The pool's state and algorithms (everything a GC callback may hold).

See the package docstring for the design. All methods run with ``lock`` held
(``malloc``/``free``/``close`` take it themselves).
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NoReturn, TypeVar

from .. import _process
from .._device import Device
from .._dlpack import ArrayView
from .._errors import AsleepError, ClosedError, DriverError, ForkedError, OutOfMemoryError
from .._logq import LOG, flush
from .._logq import pool_logger as logger
from .._logq import register as register_log
from .._observe import History
from .._options import PER_THREAD_KEYS, Access, shown, watch_thread
from .._resources import PhysicalAllocation, create, reserve
from .._staging import SleepCounts, Staging
from ._arena import Arena
from ._blocks import ALIGNMENT, Block, n_whole, whole_slots
from ._pages import ACQUIRED, ASLEEP, FREE, MAPPED, QUARANTINED, Alias, Page
from ._sleep import KEPT, STALE, PoolSleep
from ._streams import EventCounts, Heap, StreamState

#: Each arena reserves this many times the limit of virtual address space ...
ARENA_FACTOR = 2
#: ... and at least this many pages.
ARENA_MIN_PAGES = 64
#: The growth budget: the pool creates pages freely while it holds at most
#: GROWTH x its peak in-use bytes + its slack (+ GROWTH_PAGES pages in a pool
#: with a limit); beyond, it reuses cached pages (other streams' and then the
#: stream's own) first. The slack starts at 0 and grows by a page with each
#: remap made below the limit, up to GROWTH_MAX_PAGES pages per stream but no
#: more than GROWTH_MAX_SHARE of the peak in-use bytes (at least GROWTH_MIN_PAGES = 2; at
#: least 2 x GROWTH_MAX_PAGES in a pool with a limit): a workload whose
#: recurring requests do not fit the cache settles instead of remapping
#: forever, and one that does not need the slack holds no more.
#:
#: Why the limit matters (issue 20, measured on the replay traces): without a
#: limit, the fixed pages and the 8-page slack floor are pure overhead on a
#: pool of 100-300 pages (default held 1.056-1.066 x peak live on the stress
#: traces, 1.042-1.048 without them). Under a limit set near the peak, the
#: same headroom decides which cached pages get remapped while the pool ramps
#: up, and without it the smallest completing limit rose by a page on 3 of
#: the 4 stress traces; with it, every trace's smallest limit is unchanged.
#: Without a limit, GROWTH's headroom is also rounded down to whole pages (but
#: never below the peak's pages): on 40 generated ResNet-50-shaped traces
#: (`benchmarks/replay.py --sweep`), the rows held above 1.05 x peak live went
#: from 18 to 8, with no row of the shared traces worse. (To 4 with the slack's
#: floor at 1 page, measured on single passes: part of that was remapping on every
#: pass, forever; ResNet-50 batch 4 repeated held 1.044 x with 108 backend calls a
#: pass. With GROWTH_MIN_PAGES = 2 it settles at 1.073 x, 0 calls a pass, as when the
#: headroom rounded up.)
GROWTH = 1.02
GROWTH_PAGES = 2
GROWTH_MAX_PAGES = 4
GROWTH_MAX_SHARE = 0.02
#: The least the slack may grow to in a pool without a limit (pages).
GROWTH_MIN_PAGES = 2
#: The open-side split (see :meth:`Core.split_at_end`) applies to blocks of at
#: most SPLIT_OPEN_MAX_PAGES pages, in a pool with a limit that holds at least
#: its limit's pages minus SPLIT_OPEN_MARGIN.
SPLIT_OPEN_MAX_PAGES = 8
SPLIT_OPEN_MARGIN = 2
#: The growth-side split (see :meth:`Core.split_beside_growing`): a live block is
#: taken for one that grows by concatenation when it is at most SLIDE_GROWTH
#: smaller than the request and at least SLIDE_PEERS live blocks (itself included)
#: have its size, among the SLIDE_SCAN newest live blocks. The same test decides
#: whether a block of more than a page goes after the newest of its kind
#: (:meth:`Core.fit_after_growing`).
SLIDE_GROWTH = 0.05
SLIDE_PEERS = 4
SLIDE_SCAN = 128
#: For a block of at most a page, :meth:`Core.fit_after_growing` also wants at
#: least SLIDE_SMALL_SET live blocks among the SLIDE_SCAN newest with sizes in the
#: set's range (the key and value caches of 4 layers, either side of their growth
#: step; every live block with a size from 5% below
#: the request to the request counts). Without it, in ResNet-50-shaped training a
#: 0.574-page request beside six activations of 0.5625 page was taken for one.
SLIDE_SMALL_SET = 8
#: After the device refuses to create a page below the pool's limit (other pools
#: or processes hold the rest), the pool does not ask it for pages beyond those
#: it held then for 1, 2, 4, ... up to REFUSED_MAX_WAIT requests that need new
#: pages (see :meth:`Core.create_pages`): on a GPU a failing ``cuMemCreate`` is a
#: slow driver call, and a pool serving from its cached pages made one on every
#: slow-path request.
REFUSED_MAX_WAIT = 64

_SHIFT = ALIGNMENT.bit_length() - 1

_ident = threading.get_ident

_T = TypeVar("_T")


class _Marker:
    """Work a finalizer queued in ``Core.pending`` besides a collected allocation."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


#: After close: unmap the arenas views kept, if no view is left (a view's finalizer).
RELEASE_HELD = _Marker("release held arenas")
#: The pool's finalizer found the lock busy: close at the next drain.
CLOSE = _Marker("close")


class ReentryError(RuntimeError):
    """A pool call from code that interrupted this very thread inside the pool's lock."""


class Section:
    """``with core.section:`` holds the pool's lock, notes its owner, settles on the way out.

    The lock is not re-entrant: a finalizer (or signal handler) that runs while
    this thread holds it and calls the pool would wait for itself. ``free()``
    is queued in that case (``Core.free``); every other call raises
    :class:`ReentryError` instead of hanging.
    """

    __slots__ = ("core",)

    def __init__(self, core: Core) -> None:
        self.core = core

    def __enter__(self) -> Core:
        core = self.core
        lock = core.lock
        if not lock.acquire(False):
            core.check_reentry()
            core.check_backend_reentry()
            lock.acquire()
            core.owner = _ident()
            return core
        # The owner first, before anything that allocates: the garbage collector may
        # run a finalizer right here (backend.in_call() makes a bound method), and a
        # free() there must see this thread as the holder and queue itself, not wait
        # for the lock this thread holds (a deadlock of the thread, then of the pool).
        core.owner = _ident()
        if core.backend.in_call():
            core.owner = 0
            lock.release()
            if core.pending:
                core.settle()
            core.check_backend_reentry(held=True)
        return core

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        core = self.core
        release = core.lock.release
        # No owner while the lock is free: a stale one is taken for a re-entry (check_reentry)
        # by its thread when it calls while another thread has just taken the lock.
        core.owner = 0
        release()
        if core.pending:
            core.settle()


#: A free tail or head of a partly used page: (bytes, the free range, the page).
Src = tuple[int, Block, Page]



def fenced_free(arena: Arena, lo: int, hi: int, at_start: bool) -> Block | None:
    """The free range of `arena` holding bytes ``[lo, hi)``, else None.

    A fence (an alias's bytes seen from the page's other mapping) bounds those
    bytes on one side, so such a range starts at `lo` (`at_start`: a fence
    ends there) or ends at `hi`: one lookup in the heap's address index.
    """
    h = arena.heap
    g = h.by_start.get(lo) if at_start else h.by_end.get(hi)
    if g is None or g.arena is not arena or g.addr > lo or g.addr + g.size < hi:
        return None
    return g

class Core:
    """All state of a pool."""

    def __init__(
        self,
        device: Device,
        page_size: int,
        max_pages: int,
        round_above: int | None,
        access_devices: tuple[int, ...],
    ) -> None:
        self.lock = threading.Lock()
        #: Thread that last took the lock (set right after every acquire): a call that
        #: finds the lock busy and its own thread here was re-entered (see Section).
        self.owner = 0
        self.section = Section(self)
        self.device = device
        self.backend = device._backend
        self.P = page_size
        self.max_pages = max_pages
        #: True when the user set a limit (PagePool(limit=...), set_limit): the growth
        #: budget keeps a fixed headroom under it (see GROWTH).
        self.limited = False
        #: Keep cached pages mapped until the limit needs them: the growth budget is the
        #: limit (PagePool's keep_cached).
        self.keep_cached = False
        #: Pages preallocated (mapped in stream 0's large heap) when the pool was made.
        self.prealloc = 0
        self.round_above = round_above
        # Requests above this are rounded up to whole pages.
        self.page_round = -1 if round_above is None else round_above
        self.peers = access_devices[1:]
        #: Pages are created exportable (PagePool(shareable=True)).
        self.shareable = False
        self.closed = False
        # True in a child forked from the owner (then `closed` is True too, so
        # that malloc / free refuse at no cost on their hot paths; see _forked).
        self.forked = False
        # In a forked child: the pool was open in the parent (its close() is refused
        # there even when the pool held nothing, e.g. after a retired stream was forgotten).
        self.open_at_fork = False
        # Collected allocations (their _Ref), frees made re-entrantly, RELEASE_HELD and
        # CLOSE markers: appended by finalizers without the lock, drained under it by the
        # next call, or at once by whoever holds the lock when it lets go (settle()).
        self.pending: collections.deque[Any] = collections.deque()
        # Work that finalizers queued and that needs the backend or the lock
        # (a garbage-collected GrowableBuffer's release): run by the next
        # public call, before it takes the lock, never from a finalizer.
        self.tasks: collections.deque[Callable[[], object]] = collections.deque()
        # After close: arenas kept mapped for views that still use them.
        self.held: dict[Arena, None] = {}
        self.held_views: weakref.WeakSet[Any] = weakref.WeakSet()
        self.synced = False
        self.held_refs: list[Any] = []
        self.index = itertools.count()
        # pages
        self.pages: dict[PhysicalAllocation, Page] = {}
        self.free_pages: list[Page] = []
        self.acquired: dict[Page, None] = {}
        self.quarantine: dict[Page, None] = {}
        # pages' other mappings (see _pages.Alias)
        self.aliases: dict[Alias, None] = {}  # (ordered set)
        self.n_aliases = 0  # aliases made so far
        # address space, streams, blocks
        self.arenas: list[Arena] = []
        self.streams: dict[int, StreamState] = {}
        # Streams whose last page a reclaim unmapped, to forget (see drop_stream).
        self.emptied: list[StreamState] = []
        self.live: dict[Block, None] = {}
        # In a pool with a limit: sizes (at most a page) that malloc gave on its slow path,
        # sorted (see note_slow_size): split_beside_growing's cheap first test.
        self.slow_sizes: list[int] = []
        self.mapped = 0
        # accounting
        self.n_live = 0
        self.requested = 0
        self.in_use = 0
        self.peak_requested = 0
        self.peak_in_use = 0
        self.peak_total = 0
        # The highest in-use bytes ever, for the growth budget: reset_peak_memory_stats()
        # lowers the reported peaks, never the budget (only budget() reads it).
        self.budget_peak = 0
        self.n_malloc = 0
        self.n_free = 0
        self.n_created = 0
        self.n_released = 0
        self.n_remaps = 0
        self.slack = 0  # extra growth budget, pages (see GROWTH_MAX_PAGES)
        # The device refused to create a page (see create_pages): the pages the pool held
        # then (-1: no refusal in force), the reason (for the out-of-memory message), the
        # requests needing pages to serve without asking it again (doubling up to
        # REFUSED_MAX_WAIT) and those served so far.
        self.refused_at = -1
        self.refused_why = ""
        self.refused_wait = 0
        self.refused_skips = 0
        # create_pages calls that did not ask the device for pages past the mark, ever
        # (never reset: asking() compares it before and after a request to tell whether
        # the request skipped asking, as refused_skips is reset by a new refusal).
        self.n_unasked = 0
        # During one request (asking()): the device refused a page (it is not asked again
        # before the request ends), and the request counted a skip (it counts one at most).
        self.refused_now = False
        self.skipped_now = False
        #: The flags above, kept from a failed attempt of this request (fit_after_growing's
        #: mapping) for its next step (place): one refusal and one skip a request.
        self.carry: tuple[bool, bool] | None = None
        self.n_ooms = 0
        self.n_reclaimed = 0
        self.n_syncs = 0
        self.ev = EventCounts()
        # Allocations and buffers that garbage collection gave back (see _collect_garbage).
        self.n_garbage = 0
        # PagePool.record_history: None when off (one attribute test per malloc / free).
        self.history: History | None = None
        # Sleep / wake (issue 18, see _sleep.py): the backup while asleep, the
        # pages in state ASLEEP, the reusable pinned staging buffer, the numbers.
        self.asleep: PoolSleep | None = None
        self.n_asleep = 0
        self.staging: Staging | None = None
        self.sleeps = SleepCounts()
        _process.track(self)
        register_log(self)  # (_logq.flush looks for a pool whose lock this thread holds)

    # ----------------------------------------------------------------- fork
    def _forked(self) -> None:
        """In a forked child (the fork hook, one thread): refuse everything, release nothing.

        ``closed`` turns True, which malloc and free already test (their hot
        paths stay as they were); ``forked`` makes every refusal a
        :class:`~vmmpool.ForkedError` and keeps close() and the finalizers from
        releasing the parent's memory. The lock is replaced: a parent thread may
        have held it at the fork. Queued work belongs to the parent.
        """
        self.forked = True
        self.open_at_fork = not self.closed
        self.closed = True
        self.lock = threading.Lock()
        self.tasks.clear()
        self.pending.clear()  # (LOG markers too: _logq drops the parent's records in the child)

    def closed_error(self) -> ClosedError:
        """The error for a use of a closed pool: ForkedError in a forked child."""
        if self.forked:
            return ForkedError("PagePool", self.backend.owner_pid, os.getpid())
        return ClosedError("PagePool")

    # ----------------------------------------------------------- accounting
    def cached(self) -> int:
        P = self.P
        return sum(st.cached_pages(P) for st in self.streams.values())

    def pinned(self) -> int:
        """Pages no reclaim can free: touched by a live block, acquired or quarantined."""
        return self.held_pinned() - self.idle_aliased()

    def reclaimable(self) -> int:
        """Mapped pages no live block touches: cached, or aliased with every byte free."""
        return self.cached() + self.idle_aliased()

    def held_pinned(self) -> int:
        """:meth:`pinned`, counting every aliased page as pinned (placement's figure).

        Placement counts an aliased page whose bytes are all free as taken: a
        request that would map a page beyond the limit then fails in
        :meth:`place_in`, and :meth:`_place` dissolves the free aliases and
        places it again, beside their freed bytes. Counting such pages as
        free instead (the request then maps a page that a reclaim takes from
        the alias) left 8 GPT-2 shapes of the 120 of three sweeps a page
        higher and 1 lower. Cheap: no walk.
        """
        return self.mapped - self.cached() + len(self.acquired) + len(self.quarantine)

    def idle_aliased(self) -> int:
        """Aliased pages that no live block touches through any of their mappings.

        An aliased page is never cached: fences split its slots, so no free
        range covers one whole. Once every byte of it is free, though, a
        reclaim dissolves its aliases (waiting for their work if it must) and
        unmaps it, as it does a cached page: such a page is reclaimable, not
        pinned. Aliases exist only near the limit; this walks them (slow paths
        and ``stats()`` only).
        """
        return len(self.idle_aliased_pages())

    def idle_aliased_pages(self, asleep_too: bool = False) -> list[Page]:
        """The pages :meth:`idle_aliased` counts (with `asleep_too`, sleeping ones too)."""
        if not self.aliases:
            return []
        P = self.P
        n: list[Page] = []
        for p in {al.page: None for al in self.aliases}:
            if (p.state is not MAPPED and not (asleep_too and p.state is ASLEEP)) or p.addr is None:
                continue
            lent: list[tuple[int, int]] = []
            idle = True
            for al in p.aliases:
                sa = al.arena.base + al.slot * P
                if fenced_free(al.arena, sa + al.lo, sa + al.hi, al.lo > 0) is None:
                    idle = False
                    break
                lent.append((al.lo, al.hi))
            if not idle or not p.aliases:
                continue
            pf = p.aliases[0].pfence
            if pf is None:
                continue
            home = pf.arena
            pa = p.addr
            # the page's own bytes that no alias holds, each bounded by a fence
            x = 0
            for lo, hi in [*sorted(lent), (P, P)]:
                if x < lo and fenced_free(home, pa + x, pa + lo, x > 0) is None:
                    idle = False
                    break
                x = max(x, hi)
            if idle:
                n.append(p)
        return n

    def cached_bytes(self) -> int:
        """Mapped but free bytes, as :meth:`PagePool.stats` reports them."""
        return sum(
            sz * len(b) for st in self.streams.values() for h in st.heaps for sz, b in h.bins.items()
        )

    def oom(
        self, nbytes: int, n: int, why: str = "", *, pin: int | None = None, found: int | None = None,
        pinned: int | None = None, head: str | None = None,
    ) -> OutOfMemoryError:
        """The error for a request the pool refuses, stating the figures the refusal used.

        `n` is the pages the request would map. With `pin` (the pages it would newly pin:
        those it maps plus cached ones it covers), the refusal was ``pinned + pin > limit``
        and the message shows that sum (`pinned`: the figure the refusal used, when not
        :meth:`pinned`); with `found`, the pool gathered only `found` of the `n` unmapped
        pages it needed (free, creatable, reclaimable). `head` replaces the sentence on the
        request (``wake()``'s refusal is not a block's). Asleep, no byte is cached.
        """
        # Built from the state the caller leaves behind (after any undo), so
        # that it agrees with a stats() taken right after.
        self.n_ooms += 1
        P = self.P
        if pinned is None:
            pinned = self.pinned()
        reclaimable = self.reclaimable()
        cached = self.cached_bytes() if self.asleep is None else 0  # (asleep: no memory held)
        if head is None and pin is not None:
            head = (
                f"the block would pin {pin} more page(s) of {P} bytes ({n} to map"
                + (f", {pin - n} cached it covers" if pin > n else "")
                + f") and {pinned} of the limit's {self.max_pages} pages hold live data: "
                f"{pinned} + {pin} > {self.max_pages}"
            )
        elif head is None:
            head = f"the block needs {n} unmapped page(s) of {P} bytes"
            if found is not None:
                head += f", only {found} could be gathered (free, creatable under the limit or reclaimable)"
        # The bytes (requested, in use = allocated_bytes, cached, limit) head the error's text.
        msg = (
            f"page pool on {self.device}: {head}; {reclaimable} cached page(s) reclaimable, "
            f"{len(self.free_pages)} free, {len(self.pages)} held"
        )
        if why:
            msg = f"{msg}; {why}"
        logger.info("out of memory: %s", msg)
        return OutOfMemoryError(nbytes, self.in_use, self.max_pages * P, cached=cached, message=msg)

    def enforce_limit(self) -> None:
        """Give pages above the limit back (after the limit was lowered); lock held.

        Free pages first, then cached ones whose work is done (never a wait).
        Best effort: a failure is logged and retried by the next operation.
        """
        try:
            excess = len(self.pages) - self.max_pages
            if excess > 0:
                excess -= self.release_free(excess)
            if excess > 0 and self.reclaim(excess, None, wait=False):
                self.release_free(excess)
        except Exception:
            logger.warning("giving pages above the limit back failed; retried later", exc_info=True)

    def run_tasks(self) -> None:
        """Run the work finalizers deferred (lock NOT held: a task may call the pool).

        Not from code that interrupted this thread inside the lock (a finalizer
        calling the pool): a task would wait for the lock; the next call runs it.
        Nor inside a backend call of this thread (a finalizer's free there): a
        task takes the pool's lock, whose holder may be waiting for the backend's.
        """
        if self.held_here() or self.backend.in_call():
            return
        tasks = self.tasks
        while tasks:
            try:
                fn = tasks.popleft()
            except IndexError:  # pragma: no cover - emptied by another thread
                break
            try:
                fn()
                self.n_garbage += 1
            except Exception:
                logger.error("deferred release failed", exc_info=True)

    def note_peaks(self) -> None:
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested
        if self.in_use > self.peak_in_use:
            self.peak_in_use = self.in_use

    def reset_peaks(self) -> None:
        """Peaks start again from the current values (PyTorch's ``reset_peak_memory_stats``)."""
        self.budget_peak = max(self.budget_peak, self.peak_in_use)
        self.peak_requested = self.requested
        self.peak_in_use = self.in_use
        self.peak_total = len(self.pages) * self.P

    def sync(self) -> None:
        """Wait for all work on the device that owns the memory (close only)."""
        self.n_syncs += 1
        self.device.synchronize(None)

    def stream(self, key: int) -> StreamState:
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = StreamState(key)
            if key >= PER_THREAD_KEYS:
                watch_thread(key, self)  # retired when its thread ends (see thread_exited)
        return st

    def thread_exited(self, key: int) -> None:
        """The thread of per-thread key `key` ended (a finalizer: queue, never block).

        Its stream will never be used again, and no one else can retire it: the
        next pool call forgets it, at once if it holds nothing, else once its
        last page leaves it (:meth:`forget_thread`). Otherwise a pool used by
        short-lived threads kept a stream and its arenas' address space per
        thread that ever called it, until ``trim()``.
        """
        if not (self.closed or self.forked):
            self.tasks.append(functools.partial(self.forget_thread, key))

    def forget_thread(self, key: int) -> None:
        """Mark the per-thread stream of an ended thread (a task: lock not held).

        Not retired: blocks it still holds may be freed by other threads later,
        and the legacy stream takes the events that cover them (a retired
        stream's frees would cost a device synchronize when their pages leave).
        """
        if self.closed or self.forked:
            return
        with self.section:
            st = self.streams.get(key)
            if self.closed or st is None:
                return
            st.ended = True
            st.obj = None
            self.drop_stream(st)  # nothing left of it: forgotten now (else by note_emptied)

    def drain(self, settling: bool = False) -> None:
        """Do what finalizers queued in ``pending`` (lock held).

        Collected allocations and re-entrant frees are freed (bookkeeping only);
        after close, ``RELEASE_HELD`` unmaps the arenas no view uses any more;
        ``CLOSE`` closes. A failure is logged: the next ``close()`` resumes it.
        ``LOG`` (log records queued under the lock, see ``_logq``) stays queued
        for the ``settle()`` after the lock is let go, unless `settling` (that
        settle itself, which emits them after it lets go).
        """
        pending = self.pending
        later: list[object] = []
        logged = False
        while pending:
            try:
                ref = pending.popleft()
            except IndexError:  # pragma: no cover - emptied by another drain
                break
            if ref is LOG:
                logged = True
                continue
            if (ref is RELEASE_HELD or ref is CLOSE) and self.backend.in_call():
                # A finalizer inside a backend call of this thread: these call the
                # driver, never inside that call; the backend runs settle() after it.
                later.append(ref)
                continue
            if ref is RELEASE_HELD:
                if self.held:
                    try:
                        self.release_held()
                    except Exception:
                        logger.error("releasing an arena after close failed", exc_info=True)
                continue
            if ref is CLOSE:
                try:
                    self.close_locked()
                except Exception:
                    logger.error("closing a collected pool failed", exc_info=True)
                continue
            rec = ref.rec
            if rec.live and rec.ref is ref and not self.closed:
                self.free_rec(rec)
                self.n_garbage += 1
        if later:
            pending.extend(later)
            self.backend.run_or_defer(self.settle)
        if logged and not settling:
            pending.append(LOG)

    def settle(self) -> None:
        """Drain ``pending`` if the lock is free; never blocks, never raises.

        Called by finalizers after they queue work, and by every holder of the
        lock right after it lets go: work queued while the lock was busy is
        done by its holder on the way out, so it never waits for a later call.
        (A finalizer appends before it tries the lock, and a holder looks after
        it releases: one of the two always sees the work.)
        """
        lock = self.lock
        try:
            while self.pending:
                if not lock.acquire(False):
                    # Its holder settles when it lets go; the records this thread queued are
                    # emitted now (they need no pool lock), not when that holder lets go.
                    flush()
                    return
                self.owner = _ident()
                try:
                    self.drain(True)
                finally:
                    self.owner = 0  # as in Section.__exit__
                    lock.release()
                flush()  # the records logged under the lock (never raises)
                if self.pending and self.backend.in_call():
                    # Left for after this thread's backend call (a close, a release: see drain).
                    self.backend.run_or_defer(self.settle)
                    return
        except Exception:  # runs from finalizers: never raise
            logger.error("deferred pool work failed", exc_info=True)

    def held_here(self) -> bool:
        """True when this thread holds the lock: only code that interrupted it there (a
        finalizer, a signal handler) can call anything then."""
        return self.owner == _ident() and self.lock.locked()

    def check_reentry(self) -> None:
        """The lock is busy: raise if this thread holds it (a finalizer re-entered the pool)."""
        if self.held_here():
            raise ReentryError(
                "PagePool called from a finalizer or signal handler that interrupted this "
                "thread inside the same pool (the garbage collector runs wherever Python "
                "allocates); only free() may be called there (it is deferred)"
            )

    def check_backend_reentry(self, held: bool = False) -> None:
        """Raise if this thread is inside a backend call.

        Only a finalizer (or signal handler) gets here that way: the pool takes
        the backend's lock inside its own, never the other way round. With the
        pool's lock busy (`held` False), its holder may be waiting for the
        backend's lock this thread holds; with it free (`held` True: the
        caller was about to take it, or took it and may call the driver), the
        pool would call the backend in the middle of the interrupted call.
        """
        if held or self.backend.in_call():
            why = (
                "the pool would call the driver inside that call" if held else
                "another thread holds the pool and may be waiting for that call"
            )
            raise ReentryError(
                "PagePool called from a finalizer or signal handler that interrupted a driver "
                f"call of this thread ({why}): only free() may be called there (it is deferred)"
            )

    def round(self, nbytes: int) -> int:
        if nbytes > self.page_round >= 0:
            return -(-nbytes // self.P) * self.P
        return ((nbytes + ALIGNMENT - 1) >> _SHIFT) << _SHIFT or ALIGNMENT

    # --------------------------------------------------------------- malloc
    def malloc(self, nbytes: int, key: int, obj: object) -> Block:
        if self.tasks:
            self.run_tasks()
        lock = self.lock
        if not lock.acquire(False):
            self.check_reentry()
            self.check_backend_reentry()
            lock.acquire()
        self.owner = _ident()
        try:
            if self.pending:
                self.drain()
            if self.closed:
                raise self.closed_error()
            if self.asleep is not None:
                raise AsleepError("PagePool", f"malloc({nbytes})")
            if len(self.pages) > self.max_pages and not self.backend.in_call():
                self.enforce_limit()  # (as in free)
            st = self.streams.get(key)
            if st is None:
                st = self.stream(key)
            if nbytes > self.page_round >= 0:
                r = -(-nbytes // self.P) * self.P
            else:
                r = ((nbytes + ALIGNMENT - 1) >> _SHIFT) << _SHIFT or ALIGNMENT
            h = st.small if r <= self.P else st.large
            bin_ = h.bins.get(r)
            if bin_:  # the steady state: an exact fit
                b = bin_.popitem()[0]
                del h.by_start[b.addr]
                del h.by_end[b.addr + r]
            else:
                after = False
                # Near the limit, a block like a set of growing ones (KV caches) goes after
                # the newest of them, not in the best-fitting hole (fit_after_growing); a
                # small one only when a size just below it was given here (no walk else).
                if (
                    self.limited and len(self.pages) >= self.max_pages - SPLIT_OPEN_MARGIN
                    and (r > self.P or self.slow_size_below(r))
                ):
                    fit = self.fit_after_growing(h, r, nbytes)
                    if fit is not None:
                        after = True
                    else:
                        fit = h.best_fit(r, False)
                        if fit is not None:  # a failed mapping attempt's flags: the request is done
                            self.carry = None
                else:
                    fit = h.best_fit(r, False)
                if fit is None:
                    if self.backend.in_call():  # placing may call the driver: never from inside it
                        self.carry = None
                        self.check_backend_reentry(held=True)
                    b = self.place(h, r, nbytes)
                    h = b.arena.heap  # the other heap when only its free ranges had room
                else:
                    b = fit
                if b.size > r:
                    # Split: a large block goes at the end of `b` that leaves
                    # the most whole pages in the rest (those stay
                    # reclaimable); a small one (at most a page) at its start,
                    # so that the rest stays next to what the block's
                    # neighbours free (a KV cache grown by concatenation then
                    # fits there: GPT-2-shaped inference completes at 1.009 x
                    # peak live instead of 1.017); near the limit at its end
                    # when the block before it is the one it grows from
                    # (split_beside_growing).
                    rest_size = b.size - r
                    P = self.P
                    at_end = False
                    if after:
                        # right after the block it follows (fit_after_growing); a small one
                        # at the end when the block before it is one it grows from
                        if r <= P and rest_size < P:
                            at_end = self.split_beside_growing(b, r)
                    elif rest_size >= P and r > P:
                        lo = b.addr - b.arena.base
                        hi = lo + b.size
                        # whole pages of the rest with the block at the end vs at the start
                        w_end = (hi - r) // P - (lo + P - 1) // P
                        w_start = hi // P - (lo + r + P - 1) // P
                        at_end = w_end > w_start
                        if w_end == w_start and self.limited:
                            at_end = self.split_at_end(b, lo, hi, r)
                    elif self.limited and r <= P and rest_size < P:
                        at_end = self.split_beside_growing(b, r)
                    spare = h.spare
                    if spare:
                        rest = spare.pop()
                        rest.arena = b.arena
                        rest.size = rest_size
                        rest.seq = b.seq
                    else:
                        rest = Block(b.arena, 0, rest_size, b.seq)
                    if at_end:
                        rest.addr = b.addr
                        b.addr += rest_size
                    else:
                        rest.addr = b.addr + r
                    b.size = r
                    h.by_start[rest.addr] = rest
                    h.by_end[rest.addr + rest_size] = rest
                    bins = h.bins
                    rbin = bins.get(rest_size)
                    if rbin is None:
                        bins[rest_size] = rbin = {}
                        bisect.insort(h.sizes, rest_size)
                    rbin[rest] = None
                if r <= self.P and self.limited:
                    self.note_slow_size(r)
            b.live = True
            b.nbytes = nbytes
            self.live[b] = None
            if obj is not None and st.obj is None:
                st.obj = obj
            if st.retired:
                st.retired = False
            self.n_live += 1
            self.n_malloc += 1
            self.requested += nbytes
            self.in_use += r
            if self.requested > self.peak_requested:
                self.peak_requested = self.requested
            if self.in_use > self.peak_in_use:
                self.peak_in_use = self.in_use
            if self.history is not None:
                self.history.record("alloc", b.addr, nbytes, key)
            return b
        finally:
            self.owner = 0  # as in Section.__exit__
            lock.release()
            if self.pending:
                self.settle()

    def split_beside_growing(self, b: Block, r: int) -> bool:
        """Whether malloc splits a small `r`-byte block off the end of free range `b`.

        Called for a block of at most a page whose rest is under a page, in a
        pool with a limit; true only when the pool holds at least its limit's
        pages minus ``SPLIT_OPEN_MARGIN`` and the live block just before `b`
        looks like the one the request replaces, one that grows by
        concatenation (a KV cache: ``torch.cat`` allocates the longer tensor,
        then the old one is freed), while the block just after it does not.
        The rest then lies beside that block and merges with the hole it
        leaves when it is freed (a hole one growth step longer than the block,
        so the next, longer one fits there); at the start of `b` (the rule
        otherwise) it would stay between the new block and the live data
        after it, a piece a few KiB short of the next request. "Looks like":
        at most ``SLIDE_GROWTH`` smaller than the request, with at least
        ``SLIDE_PEERS`` live blocks of its size (identical layers: every
        layer's key and value caches have the same size), searched among the
        ``SLIDE_SCAN`` newest live blocks (a bounded walk: the caches of a
        model of up to about 60 layers; the weights allocated first are never
        taken). The walk costs 5-9 us, so it runs only when the request is
        at most ``SLIDE_GROWTH`` above a size malloc gave on its slow path
        (:meth:`note_slow_size`; without that test every small split near the
        limit walked: 4 -> 13 us a malloc/free pair that splits, measured on
        the host emulator). The exact fits of the steady state never get here;
        pools without a limit never do.

        Measured on ``benchmarks/replay.py --sweep 40`` (host emulator,
        smallest completing limit, 2026-12-07): GPT-2 shapes 7 rows better,
        none worse (mean 1.0097 -> 1.0089 x peak live, 26 -> 27 rows within
        1%); ResNet-50 shapes, the stress rows and the shared traces
        unchanged; on two more sweeps (seeds 12, 13) 8 and 7 GPT-2 rows
        better, 0 and 1 worse (by a page). Without the ``SLIDE_PEERS``
        condition the stress rows (caches of a different size in every layer)
        moved by whole pages either way (6-12 better, 9-13 worse a sweep), as
        they do under any change to these splits (see
        ``benchmarks/results/replay-before-after.md``, seventh pass).
        """
        if len(self.pages) < self.max_pages - SPLIT_OPEN_MARGIN:
            return False
        lo = b.addr
        hi = lo + b.size
        a = b.arena
        low = r - r * SLIDE_GROWTH
        # The cheap test first, so that most splits near the limit do not walk (about 9 us):
        # a block of the predecessor's size was given on the slow path (where every cache
        # of a step but a few is placed; an exact fit, on the fast path, notes nothing).
        if not self.slow_size_below(r):
            return False
        before: Block | None = None
        after: Block | None = None
        counts: dict[int, int] = {}
        for x in itertools.islice(reversed(self.live), SLIDE_SCAN):
            n = x.size
            if low <= n < r:
                counts[n] = counts.get(n, 0) + 1
                if x.arena is a:
                    if x.addr + n == lo:
                        before = x
                    elif x.addr == hi:
                        after = x
        return before is not None and after is None and counts[before.size] >= SLIDE_PEERS

    def fit_after_growing(self, h: Heap, r: int, nbytes: int) -> Block | None:
        """Near the limit: where a block like a set of growing ones goes.

        Called for an `r`-byte request that has no exact fit, in a pool with
        a limit holding at least its limit's pages minus ``SPLIT_OPEN_MARGIN``;
        for a block of at most a page only when a size at most
        ``SLIDE_GROWTH`` below `r` was given on the slow path
        (:meth:`slow_size_below`, as :meth:`split_beside_growing`'s walk).
        The request looks like one of a set of blocks that grow by
        concatenation (KV caches: every layer's key and value cache is
        replaced, in turn, by one a token longer) when, among the
        ``SLIDE_SCAN`` newest live blocks, at least ``SLIDE_PEERS`` have one
        size at most ``SLIDE_GROWTH`` below `r` (or `r`) and one is smaller
        than `r` (one it replaces); for a block of at most a page, also when
        at least ``SLIDE_SMALL_SET`` of them have sizes in that range (a
        bigger set: small blocks of nearly one size are common). Then the
        block goes, in heap `h`, first
        at the start of the free range right after the newest of them (the
        ring's head); else at the start of the free range right before the
        oldest smaller one (the ring wraps round, into bytes that are still
        mapped); else across the free range after the newest (if any) and
        the unmapped slots after it, mapping pages within the limit
        (:meth:`place_in` restricted to that start). A free range is returned
        out of the index (malloc splits the block off its start, or for a
        small block its end where :meth:`split_beside_growing` says so), a
        mapped placement placed. None when none fits (nothing changed: malloc
        goes on with the best fit).

        Such blocks are freed in the order they were made (first in, first
        out: each cache lives one decode step), so placed one after the other
        they form a ring: the oldest, freed next, lie just after the free
        bytes ahead of the newest, and their holes merge with those bytes.
        With the best fit, each cache took the smallest hole that held it and
        left a piece a fraction of a page long beside live caches: GPT-2-shaped
        inference, 24 layers, d 768, fp32, batch 8 (caches of up to 1.5 pages)
        failed at 481 pages on a 1.48-page cache with 9.2 pages of free bytes
        in 35 pieces, none holding it, every page holding live data.

        Measured on ``benchmarks/replay.py --sweep 40`` (host emulator,
        smallest completing limit, 2026-12-07): GPT-2 shapes 6, 8 and 6 rows
        better on seeds 11, 12 and 13, none worse (that row 482 -> 476 pages,
        its floor 475; means 1.0089 -> 1.0078, 1.0077 -> 1.0065, 1.0092 ->
        1.0084); ResNet-50 shapes unchanged; the stress rows unchanged but two
        whose figure is not monotonic in the limit (each completed at one
        limit below a failing one; both now complete from the first limit
        that completes). The shared traces and every default held figure:
        unchanged (pools without a limit never get here). Remaps at the limit:
        that row replayed at 484 pages 162 -> 90; a loop of passes (3-4) at
        486 pages 647 -> 865 backend calls a pass, 12 layers, d 1280, batch 8
        at 382 pages 573 -> 75 (the steady state of exact fits never gets
        here: a KV cache grows at every step). Without the wrap round the
        gains were the same but the ring moved through the address space,
        remapping the pages behind it (632 remaps there; a loop of passes
        at 480 pages: 3988 backend calls a pass, 728 with it); without
        mapping at the head (the free range after the newest only, or mapping
        only when no free range held the block), most of the gain went.

        The same for blocks of at most a page (second step, same day; figures
        against the rule for large blocks alone): GPT-2 shapes 10, 7 and 9
        rows better on seeds 11, 12 and 13, none worse (means 1.0078 ->
        1.0065, 1.0065 -> 1.0058, 1.0084 -> 1.0072; rows within 1% 32 -> 36
        on seed 11); ResNet-50 one row a page worse (seed 12, training, batch
        4, 224 px: 176 -> 177; a 0.574-page request beside six of 0.5625),
        the stress rows and the shared traces unchanged. Without keeping
        :meth:`split_beside_growing`'s end for a small block, 2 rows fewer
        better on seed 12. Since ``SLIDE_SMALL_SET`` (a small block wants 8
        live blocks of the two sizes, 2026-12-07, later): that ResNet-50 row
        back at 176, every other row of the three sweeps of GPT-2, ResNet-50
        and stress shapes and of ``replay-scaled-host.json`` unchanged.
        Asking for 8 of one size instead lost a GPT-2 row a page (6 layers,
        87 -> 88: mid-step its 12 caches are split between the two sizes);
        asking for one of the request's size already live lost 3-4 rows a
        sweep (the first cache of each step has none).
        """
        low = r - r * SLIDE_GROWTH
        need = SLIDE_SMALL_SET if r <= self.P else 0  # (a small block: a bigger set)
        newest: Block | None = None
        oldest: Block | None = None  # the oldest smaller one in `h`: the next one freed
        counts: dict[int, int] = {}
        top = total = 0
        smaller = False
        # The walk stops once the test passes (it stays passed: the newest of `h` comes
        # first, the counts only grow); the rest of it is walked only for the wrap round.
        walk = itertools.islice(reversed(self.live), SLIDE_SCAN)
        for x in walk:
            n = x.size
            if low <= n <= r:
                c = counts[n] = counts.get(n, 0) + 1
                if c > top:
                    top = c
                total += 1
                if n < r:
                    smaller = True
                if x.arena.heap is h:
                    if newest is None:
                        newest = x
                    if n < r:
                        oldest = x
                if newest is not None and smaller and top >= SLIDE_PEERS and total >= need:
                    break
        else:
            return None
        assert newest is not None
        a = newest.arena
        head = newest.addr + newest.size
        f = h.by_start.get(head)
        if f is not None and f.arena is not a:
            f = None
        if f is not None and f.size >= r:
            h.remove(f)
            return f
        for x in walk:  # the rest of the walk: the oldest smaller one in `h`
            if x.arena.heap is h and low <= x.size < r:
                oldest = x
        if oldest is not None:  # wrap round: the free range just before the oldest
            f0 = h.by_end.get(oldest.addr)
            if f0 is not None and f0.arena is oldest.arena and f0.size >= r:
                h.remove(f0)
                return f0
        # Else across the unmapped run after it (whose first slot follows a mapped one), when
        # the pages that takes fit the limit (place_in checks again, counting cached pages).
        P = self.P
        l1 = f.size if f is not None else 0
        off = head + l1 - a.base
        s = off // P
        k = a.flen.get(s, 0) if off % P == 0 else 0
        need = -(-(r - l1) // P)
        if need > k:
            f2 = h.by_start.get(a.base + (s + k) * P)
            if (
                k == 0 or f is None or f2 is None or f2.arena is not a
                or r > l1 + k * P + f2.size or -(-(r - f2.size) // P) <= k
            ):
                return None
            need = k  # joining the free ranges on both sides of the run
        if self.held_pinned() + need > self.max_pages or self.backend.in_call():
            return None  # (mapping calls the driver: never from inside a call, see malloc)
        st = h.stream
        other = st.large if h is st.small else st.small
        ooms = self.n_ooms
        try:
            # one request with malloc's place() after it, should this fail (carry)
            return self.asking(lambda: self.place_in(h, r, nbytes, other, (a, s, head)), carry=True)
        except OutOfMemoryError:
            self.n_ooms = ooms  # not the request's failure: malloc goes on with the best fit
            return None

    def slow_size_below(self, r: int) -> bool:
        """Whether a size at most ``SLIDE_GROWTH`` below `r` (not `r`) was given on the slow path.

        The cheap test before a walk over the newest live blocks for a block of at most a
        page (see :meth:`note_slow_size`).
        """
        sizes = self.slow_sizes
        i = bisect.bisect_left(sizes, r - r * SLIDE_GROWTH)
        return i < len(sizes) and sizes[i] < r

    def note_slow_size(self, r: int) -> None:
        """Note size `r` (at most a page) given on malloc's slow path in a pool with a limit.

        For :meth:`split_beside_growing`'s first test. The sorted list keeps
        at most ``SLIDE_SCAN`` sizes: past that it is emptied and starts again
        (a size noted before that is then missed until it is given again).
        """
        sizes = self.slow_sizes
        i = bisect.bisect_left(sizes, r)
        if i < len(sizes) and sizes[i] == r:
            return
        if len(sizes) >= SLIDE_SCAN:
            sizes.clear()
            i = 0
        sizes.insert(i, r)

    def split_at_end(self, b: Block, lo: int, hi: int, r: int) -> bool:
        """Whether malloc splits an `r`-byte block off the end of free range `b`, on a tie.

        ``[lo, hi)`` is `b` in arena offsets. Called when the block leaves as
        many whole pages free at either end of `b`, in a pool with a limit.
        When the pool holds (nearly) every page its limit allows and the block
        is at most ``SPLIT_OPEN_MAX_PAGES`` pages, the rest goes to the *open*
        side: the end of `b` that borders unmapped slots, when only one does.
        The rest there can grow by mapping (the slow path's "before a free
        range that starts after unmapped slots") and merges with what is
        freed beside it; on the other side it would be stranded between the
        block and live data (a free head or tail that only an alias can
        reach). Otherwise the block goes at the start (the rule before).

        Measured on the replay rows (host emulator, 2026-12-06, smallest
        completing limit in pages): ResNet-50-shaped inference batch 8 47 ->
        46 (1.0578 -> 1.0353 x peak live), the stress test seed 0 313 -> 312
        (1.0390 -> 1.0356), every other row unchanged (default held included:
        pools without a limit never get here). In every pool with a limit, it
        moved the stress test seed 1 308 -> 309; for blocks of any size, the
        llama offload trace (buffers of 51-512 pages) 998 -> 999, 2482 ->
        2484, 9921 -> 9926 at 0.1x, 0.25x, 1x; with no limit either, default
        held on the stress rows 1.042-1.047 -> 1.049-1.058. With a margin of
        0 pages (at the limit only) seed 0 stays at 313; 1-4 pages give the
        same figures as 2, but 1 also lets seed 1 complete at 306 while 307
        fails (the bisection's figure is not monotonic there).
        """
        if r > SPLIT_OPEN_MAX_PAGES * self.P or len(self.pages) < self.max_pages - SPLIT_OPEN_MARGIN:
            return False
        P = self.P
        a = b.arena
        open_lo = lo % P == 0 and lo >= P and a.is_unmapped(lo // P - 1)
        open_hi = hi % P == 0 and hi // P < a.nslots and a.is_unmapped(hi // P)
        return open_lo and not open_hi

    def place(self, h: Heap, r: int, nbytes: int) -> Block:
        """Slow path: put an `r`-byte block in heap `h`, mapping pages as needed (see :meth:`_place`).

        A request that fails after the pool skipped asking the device for pages
        (it refused one earlier: see :meth:`create_pages`) is tried once more,
        asking the device this time: memory may have come back since.
        """
        return self.asking(lambda: self._place(h, r, nbytes))

    def asking(self, fn: Callable[[], _T], carry: bool = False) -> _T:
        """Run `fn` (a request); if it runs out of memory without asking the device, once more asking it.

        ``fn`` leaves the pool as it was when it raises (every request does), so
        it can run again. The retry makes the device's refusal due (the next
        creation asks it): a refusal again restarts the wait, doubled.

        One request counts as one: once the device refused a page during it,
        it is not asked again before the request ends (no retry, and no later
        gather of the same attempt asks: at most one failing create and one
        doubling of the wait per request; before, a request whose placement
        gathered pages twice and then retried made three failing creates and
        quadrupled the wait), and it counts as one skipped request at most.

        ``n_ooms`` counts the request once when it raises ``OutOfMemoryError``
        and not at all otherwise, whatever its attempts counted: an
        out-of-memory error from the driver (a failed map) is not made by
        :meth:`oom`, and the steps that recover from one used to take back a
        count it never added (``n_ooms`` went below zero), or counted nothing
        when the request raised it.

        With `carry`, `fn` is a first attempt of a request whose next step runs
        through another call (:meth:`fit_after_growing`, then :meth:`place`):
        when it runs out of memory, whether the device refused a page or was
        skipped is kept (``carry``) for that call, which starts from it (before,
        such a request made two failing creates and doubled the wait twice).
        """
        ooms = self.n_ooms
        unasked = self.n_unasked
        carried, self.carry = self.carry, None
        self.refused_now, self.skipped_now = carried if carried is not None else (False, False)
        try:
            try:
                out = fn()
                retry = False
            except OutOfMemoryError:
                if self.n_unasked == unasked or self.refused_at < 0 or self.refused_now:
                    raise
                retry = True
            if retry:  # (not inside the handler: the retry's error would chain to the first)
                self.refused_skips = self.refused_wait
                self.skipped_now = False
                logger.debug("out of memory without asking the device: asking it")
                out = fn()
        except OutOfMemoryError:
            self.n_ooms = ooms + 1
            if carry:
                self.carry = (self.refused_now, self.skipped_now)
            raise
        except BaseException:
            self.n_ooms = ooms  # not an out-of-memory
            raise
        finally:
            self.refused_now = self.skipped_now = False
        self.n_ooms = ooms
        return out

    def _place(self, h: Heap, r: int, nbytes: int) -> Block:
        """Put an `r`-byte block in heap `h`, mapping pages as needed.

        When `h` has no room within the limit (or the device), the best fit
        among the free ranges of the stream's other heap is returned instead
        (out of the index, to be split by the caller), else a placement across
        free tails and heads of partly used pages (:meth:`place_alias`). When
        none fits, the stream's aliases whose bytes are all free are dissolved
        (their bytes merge with the free ranges of their pages' own slots, and
        those pages can be aliased again) and the request tries again: at the
        limit only, so steady-state malloc makes no driver call. Last, a page
        that lends one end to an alias may lend its other end
        (``place_alias(again=True)``). A request fails only when nothing can
        hold it. Run through :meth:`asking` only, which counts ``n_ooms``
        (the attempts that failed on the way are not counted here).
        """
        st = h.stream
        other = st.large if h is st.small else st.small
        try:
            return self.place_in(h, r, nbytes, other)
        except OutOfMemoryError:
            b = other.best_fit(r)
            if b is None:
                b = self.place_alias(h, r, nbytes)
                if b is None:
                    # Free aliases keep their pages' free bytes apart: dissolve
                    # them and try again (each round dissolves at least one and
                    # makes none).
                    if self.aliases and self.dissolve(st, True):
                        return h.best_fit(r) or self._place(h, r, nbytes)
                    # Last: the free head or tail of a page that lends its
                    # other end to an alias already (a third mapping). Only
                    # here, where the request would fail otherwise: every
                    # placement the pool made before stays as it was.
                    b = self.place_alias(h, r, nbytes, again=True)
                    if b is None:
                        # Last of all: other streams' aliases whose bytes are all
                        # free (stats() counts their pages reclaimable). A reclaim
                        # then takes those pages, after their streams' events.
                        others = [o for o in self.streams.values() if o is not st]
                        if self.aliases and sum(self.dissolve(o, True) for o in others):
                            return h.best_fit(r) or self._place(h, r, nbytes)
                        raise
            return b

    def ready_pages(self) -> int:
        """Pages a mapping can take without unmapping cached ones: free, or creatable in the budget.

        The default growth budget, even with ``keep_cached``: a pool holding only its
        preallocated pages serves from them rather than call the driver at all (creating
        a page is a driver call too), as ``preallocate`` promises. Not past a device's
        refusal while the pool does not ask it (:meth:`creatable`).
        """
        budget = self.growth_budget()
        return len(self.free_pages) + max(0, min(budget, self.creatable()) - len(self.pages))

    def place_in(
        self, h: Heap, r: int, nbytes: int, other: Heap, only: tuple[Arena, int, int] | None = None
    ) -> Block:
        """Put an `r`-byte block in heap `h` where it pins the fewest pages.

        In a pool holding only its preallocated pages, when that needs more
        pages than are free or creatable within the growth budget, a free range
        of `other` that fits is taken instead (out of the index).

        Candidates, for every unmapped run of the stream's arenas: after the
        free range ending at the run (its bytes are used first), before the
        free range starting after it, across the whole run joining both, and
        at the run's start. Ranked by the pages the block newly pins (mapped
        new ones plus cached ones it covers: the scarce resource at the
        limit), then by pages to map (driver calls), then by the free bytes
        left over. With `only` ``(arena, slot, start)``: only the unmapped
        run of `arena` starting at `slot`, only a block starting at address
        `start` (:meth:`fit_after_growing`), and no new arena.
        """
        P = self.P
        best: tuple[int, int, int] | None = None
        choice: tuple[Arena, int, int, int, Block | None, Block | None] | None = None
        by_end = h.by_end
        by_start = h.by_start
        st = h.stream

        def pins(
            arena: Arena, start: int, m0: int, need: int, L1: Block | None, L2: Block | None
        ) -> int:
            base = arena.base
            lo = L1.addr if L1 is not None else base + m0 * P
            hi = L2.addr + L2.size if L2 is not None else base + (m0 + need) * P
            # whole slots of [lo, hi) minus those of the pieces left free
            n = need + (n_whole(L1) if L1 is not None else 0) + (n_whole(L2) if L2 is not None else 0)
            end = start + r
            for a, e in ((lo, start), (end, hi)):
                if e - a >= P:
                    w = (e - base) // P - (a - base + P - 1) // P
                    if w > 0:
                        n -= w
            return n

        for arena in h.arenas:
            if only is not None and arena is not only[0]:
                continue
            base = arena.base
            for s, k in arena.runs():
                if only is not None and s != only[1]:
                    continue
                a0 = base + s * P
                a1 = a0 + k * P
                L1 = by_end.get(a0)
                if L1 is not None and L1.arena is not arena:
                    L1 = None
                L2 = by_start.get(a1)
                if L2 is not None and L2.arena is not arena:
                    L2 = None
                l1 = L1.size if L1 is not None else 0
                l2 = L2.size if L2 is not None else 0
                opts: list[tuple[int, int, int, Block | None, Block | None, int]] = []
                need = -(-(r - l1) // P)
                if need <= k:  # at the run's start, after L1 (if any)
                    opts.append((a0 - l1, s, need, L1, None, need * P + l1 - r))
                if L1 is not None:
                    fresh = -(-r // P)
                    if fresh <= k:  # at the run's start, L1 left alone
                        opts.append((a0, s, fresh, None, None, fresh * P - r + l1))
                need2 = -(-(r - l2) // P)
                if L2 is not None and need2 <= k:  # ending at L2's end
                    opts.append((a1 + l2 - r, s + k - need2, need2, None, L2, need2 * P + l2 - r))
                if L1 is not None and L2 is not None and need > k and need2 > k and r <= l1 + k * P + l2:
                    opts.append((a0 - l1, s, k, L1, L2, l1 + k * P + l2 - r))  # joining L1 and L2
                for start, m0, nd, u1, u2, waste in opts:
                    if only is not None and start != only[2]:
                        continue
                    cost = (pins(arena, start, m0, nd, u1, u2), nd, waste)
                    if best is None or cost < best:
                        best, choice = cost, (arena, start, m0, nd, u1, u2)
        fresh = -(-r // P)
        if only is not None and choice is None:
            raise self.oom(nbytes, fresh, "no room after the block it follows", pin=fresh)
        fresh_arena = only is None and (
            choice is None
            or (
                best is not None
                and best[0] > fresh
                and not any(k >= fresh for a in h.arenas for _s, k in a.runs())
            )
        )
        pin, to_map = (fresh, fresh) if fresh_arena or best is None else best[:2]
        held = self.held_pinned()
        if held + pin > self.max_pages:
            raise self.oom(nbytes, to_map, "the limit is reached", pin=pin, pinned=held)
        if only is None and len(self.pages) <= self.prealloc and to_map > self.ready_pages():
            # A pool that holds only its preallocated pages (all in the large
            # heap) serves from them rather than remap one: no driver call.
            # (Elsewhere the heaps stay apart until the limit: mixing small
            # blocks into large holes costs more memory than a remap.)
            b = other.best_fit(r)
            if b is not None:
                return b
        if fresh_arena:
            arena = self.new_arena(h, fresh)
            choice = (arena, arena.base, 0, fresh, None, None)
        assert choice is not None
        arena, start, m0, need, L1, L2 = choice
        end = start + r
        lo = L1.addr if L1 is not None else arena.base + m0 * P
        hi = L2.addr + L2.size if L2 is not None else arena.base + (m0 + need) * P
        seq = max(L1.seq if L1 is not None else 0, L2.seq if L2 is not None else 0)
        rest = [Block(arena, a, e - a, seq) for a, e in ((lo, start), (end, hi)) if e > a]
        if L1 is not None:
            h.remove(L1)
        if L2 is not None:
            h.remove(L2)
        carved = False
        arena.take_at(m0, need)
        try:
            try:
                try:
                    pages = self.gather(need, nbytes, st)
                except OutOfMemoryError:
                    if L1 is None or L2 is None:
                        raise
                    # Joining L1 and L2: the block covers L1 and the start of L2, and
                    # the cached pages of what it leaves of L2 were out of the index.
                    # When no other page is left (at the limit), they are gathered
                    # too: that piece goes back to the index (on failure it merges
                    # back). Only then: taken at every join, they made a loop that
                    # settled remap every pass (ResNet-50-shaped inference at batch
                    # 32: 228 backend calls a pass instead of 0).
                    h.add(L2)
                    L2 = self.carve(L2, L2.addr, end - L2.addr)
                    carved = True
                    rest = []
                    pages = self.gather(need, nbytes, st)
            except BaseException:
                arena.give(m0, need)
                raise
            try:
                try:
                    self.map_pages(arena, m0, pages, st.key)
                except OutOfMemoryError:
                    # The driver (or the OS under the emulator) ran out of what a
                    # mapping needs: give the cached mappings back, try once more.
                    # `st` first: reclaim() keeps the stream being served (its arena
                    # is empty until this map succeeds) rather than forget it and free
                    # the arena the retry maps into.
                    if any(p.state is not FREE for p in pages) or not self.reclaim(
                        None, st, wait=True
                    ):
                        raise
                    logger.info("map ran out of memory: reclaimed cached pages, retrying")
                    arena.take_at(m0, need)  # the failed map gave the slots back
                    self.map_pages(arena, m0, pages, st.key)
            except BaseException:
                self.unfree(pages)
                raise
        except BaseException:
            if L1 is not None:
                h.add(L1)
            if L2 is not None:
                if carved:
                    h.insert(L2)  # the carved piece: merges with what is left of L2
                else:
                    h.add(L2)
            if fresh_arena:
                self.discard_arena(arena)  # made for this request: not kept after its failure
            raise
        for b in rest:
            h.insert(b)
        return Block(arena, start, r)

    def alias_sources(self, st: StreamState, again: bool = False) -> tuple[list[Src], list[Src]]:
        """Free tails and free heads of the stream's partly used pages, by size.

        A tail is the part of a free range in its first page slot, when the
        range reaches that slot's end but does not start at its start; a head
        the part in its last slot, when the range starts at or before that
        slot's start but ends inside it. Each is ``(bytes, free range,
        page)``. Only a page's own slot qualifies, and only a page with no
        alias unless `again`. A page whose tail (head) an alias holds has none
        in its own slot (the alias's fence covers it): a page lends at most
        its head and its tail, to one alias each.
        """
        P = self.P
        tails: list[Src] = []
        heads: list[Src] = []
        for f in st.free_ranges():
            a = f.arena
            off = f.addr - a.base
            end = off + f.size
            s = off // P
            if off > s * P and end >= (s + 1) * P:
                p = a.slots[s]
                if p is not None and p.state is MAPPED and p.addr == a.base + s * P and (
                    again or not p.aliases
                ):
                    tails.append(((s + 1) * P - off, f, p))
            s = end // P
            if end > s * P and off <= s * P:
                p = a.slots[s]
                if p is not None and p.state is MAPPED and p.addr == a.base + s * P and (
                    again or not p.aliases
                ):
                    heads.append((end - s * P, f, p))
        tails.sort(key=_first)
        heads.sort(key=_first)
        return tails, heads

    def place_alias(self, h: Heap, r: int, nbytes: int, again: bool = False) -> Block | None:
        """At the limit: put an `r`-byte block across free tails and heads of partly used pages.

        The block's range is new slots of heap `h`: a partly used page of the
        stream whose tail is free is mapped again (an alias) as the range's
        first page (the block starts at its free tail), one whose head is free
        as its last page (the block ends in that head), and the new pages
        between them pin as few pages as possible (none when a tail and a head
        hold the block). Every byte stays used by at most one live block: the
        bytes the block takes are fenced off in the pages' own slots (see
        :class:`~._pages.Alias`). Only pages with no alias lend bytes, unless
        `again`: then a page that lends its head (tail) to an alias may lend
        its tail (head) to this one too. Returns None when no such placement
        fits the limit (or the driver is out of memory); the pool is then
        unchanged.
        """
        P = self.P
        st = h.stream
        avail = self.max_pages - self.held_pinned()
        fresh = -(-r // P)
        if avail < 0:
            return None
        tails, heads = self.alias_sources(st, again)
        if not tails and not heads:
            return None
        tsizes = [t[0] for t in tails]
        hsizes = [t[0] for t in heads]
        pick: tuple[int, Src | None, Src | None] | None = None
        for k in range(min(avail, fresh - 1) + 1):
            need = r - k * P
            # one page aliased (k >= 1): the smallest tail or head that completes the block
            one: list[tuple[int, Src | None, Src | None]] = []
            if k:
                i = bisect.bisect_left(tsizes, need)
                if i < len(tails):
                    one.append((tails[i][0], tails[i], None))
                i = bisect.bisect_left(hsizes, need)
                if i < len(heads):
                    one.append((heads[i][0], None, heads[i]))
            if one:
                _n, T, H = min(one, key=_first)
                pick = (k, T, H)
                break
            # a tail and a head of two pages: the smallest pair that completes it
            two: tuple[int, Src, Src] | None = None
            for T in tails:
                if T[0] >= need:
                    break  # the tail alone holds it (a free range does)
                j = bisect.bisect_left(hsizes, need - T[0])
                while j < len(heads) and (heads[j][2] is T[2] or heads[j][1] is T[1]):
                    j += 1
                if j < len(heads) and (two is None or T[0] + heads[j][0] < two[0]):
                    two = (T[0] + heads[j][0], T, heads[j])
            if two is not None:
                pick = (k, two[1], two[2])
                break
        if pick is None:
            return None
        k, T, H = pick
        m = k + (T is not None) + (H is not None)
        arena = next((a for a in h.arenas for s, n in a.runs() if n >= m), None)
        made = arena is None
        if arena is None:
            arena = self.new_arena(h, m)
        s0 = next(s for s, n in arena.runs() if n >= m)
        # The tail and head pieces leave the free index (nothing may merge
        # into them or take them meanwhile); the rest of their free ranges
        # (cached pages included, which gather may reclaim) stays.
        srcs = []
        if T is not None:  # a tail starts its free range
            srcs.append(self.carve(T[1], T[1].addr, T[0]))
        if H is not None:  # a head ends its free range
            srcs.append(self.carve(H[1], H[1].addr + H[1].size - H[0], H[0]))
        arena.take_at(s0, m)
        try:
            try:
                pages = self.gather(k, nbytes, st) if k else []
            except OutOfMemoryError:
                arena.give(s0, m)
                for f in srcs:
                    f.arena.heap.insert(f)
                if made:
                    self.discard_arena(arena)
                return None
            except BaseException:
                arena.give(s0, m)
                raise
            run = ([T[2]] if T is not None else []) + pages
            keep = {0} if T is not None else set()
            if H is not None:
                keep.add(len(run))
                run.append(H[2])
            try:
                self.map_pages(arena, s0, run, st.key, keep)
            except BaseException:
                self.unfree(pages)
                raise
        except BaseException:
            for f in srcs:
                f.arena.heap.insert(f)
            if made:
                self.discard_arena(arena)
            raise
        base = arena.base + s0 * P
        start = base + (P - T[0] if T is not None else 0)
        end = start + r
        if T is not None:
            self.add_alias(T[2], arena, s0, P - T[0], P, srcs[0])
        if H is not None:
            self.add_alias(H[2], arena, s0 + m - 1, 0, end - (base + (m - 1) * P), srcs[-1])
        elif end < base + m * P:
            h.insert(Block(arena, end, base + m * P - end))
        self.n_aliases += len(srcs)
        logger.info(
            "alias: %d byte(s) across %d partly used page(s) and %d new one(s)", r, len(srcs), k
        )
        return Block(arena, start, r)

    def carve(self, f: Block, addr: int, size: int) -> Block:
        """Take bytes ``[addr, addr + size)`` of free range `f` out of its heap's index.

        The rest of `f` stays free (as one or two ranges); returns the piece.
        """
        h = f.arena.heap
        h.remove(f)
        end = f.addr + f.size
        piece = Block(f.arena, addr, size, f.seq)
        if addr + size < end:
            h.add(Block(f.arena, addr + size, end - addr - size, f.seq))
        if f.addr < addr:
            f.size = addr - f.addr
            h.add(f)
        return piece

    def add_alias(self, p: Page, arena: Arena, slot: int, lo: int, hi: int, src: Block) -> None:
        """Record that page `p`, now also mapped at `slot` of `arena`, lends bytes ``[lo, hi)``.

        `src` is the free range (out of its index) in the page's own slot
        that held those bytes; what the alias does not take of it is free again.
        """
        P = self.P
        pa = p.addr
        assert pa is not None and src.addr <= pa + lo and pa + hi <= src.addr + src.size
        home = src.arena
        if src.addr < pa + lo:
            home.heap.insert(Block(home, src.addr, pa + lo - src.addr, src.seq))
        if pa + hi < src.addr + src.size:
            home.heap.insert(Block(home, pa + hi, src.addr + src.size - pa - hi, src.seq))
        pfence = Block(home, pa + lo, hi - lo) if hi > lo else None
        sa = arena.base + slot * P
        afence: Block | None
        if hi - lo == P:
            afence = None
        elif lo == 0 and hi > 0:
            afence = Block(arena, sa + hi, P - hi)
        else:
            afence = Block(arena, sa, lo if hi > lo else P)
        al = Alias(p, arena, slot, lo, hi, pfence, afence)
        p.aliases += (al,)
        self.aliases[al] = None

    def dissolve(self, st: StreamState, wait: bool) -> int:
        """Unmap the stream's aliases whose bytes are all free and whose work is done.

        Their bytes are free again in the pages' own slots (merged with the
        free ranges there). With `wait` the pool waits on the events; without,
        only aliases whose work is known or queried complete go. Returns how
        many were dissolved.
        """
        P = self.P
        done = 0
        for al in [al for al in self.aliases if al.arena.heap.stream is st]:
            a = al.arena
            sa = a.base + al.slot * P
            g: Block | None = None
            seq = 0
            if al.hi > al.lo:
                g = fenced_free(a, sa + al.lo, sa + al.hi, al.lo > 0)
                if g is None:
                    continue  # a live block still uses the alias
                seq = g.seq
            if seq > st.done_seq:
                if wait:
                    if not (st.is_done(seq, self.backend, self.ev) or st.wait(seq, self.backend, self.ev)):
                        self.sync()
                        st.done_seq = st.seq
                elif not st.is_done(seq, self.backend, self.ev):
                    continue
            a.res.unmap(al.slot * P, P)
            if self.history is not None:
                self.history.record("segment_unmap", sa, P, st.key)
            self.drop_alias(al, g, seq)
            done += 1
        return done

    def forget_idle_aliases(self, busy: set[Page | None]) -> None:
        """Asleep: forget every alias of a sleeping page (not in `busy`) whose bytes are all free.

        No driver call: a sleep unmapped the alias's slot. See :func:`._sleep.forget_freed`.
        """
        P = self.P
        for al in list(self.aliases):
            a = al.arena
            p = al.page
            if p.state is not ASLEEP or p in busy or a.slots[al.slot] is not p:
                continue
            g = None
            if al.hi > al.lo:
                sa = a.base + al.slot * P
                g = fenced_free(a, sa + al.lo, sa + al.hi, al.lo > 0)
                if g is None:
                    continue  # a live block still uses the alias
            self.drop_alias(al, g, g.seq if g is not None else 0)

    def drop_alias(self, al: Alias, g: Block | None, seq: int) -> None:
        """Forget alias `al`, whose slot is unmapped (by :meth:`dissolve`, or by a sleep).

        `g` is the free range holding the alias's bytes in its slot (None when
        it lends none); those bytes are free again in the page's own slot, as
        of stream position `seq`.
        """
        P = self.P
        a = al.arena
        h = a.heap
        sa = a.base + al.slot * P
        if g is not None:
            h.remove(g)
            gend = g.addr + g.size
            if g.addr < sa + al.lo:
                h.add(Block(a, g.addr, sa + al.lo - g.addr, g.seq))
            if sa + al.hi < gend:
                h.add(Block(a, sa + al.hi, gend - sa - al.hi, g.seq))
        a.slots[al.slot] = None
        a.give(al.slot, 1)
        a.mapped -= 1
        pf = al.pfence
        if pf is not None:
            pf.seq = seq
            pf.arena.heap.insert(pf)
        p = al.page
        p.aliases = tuple(x for x in p.aliases if x is not al)
        del self.aliases[al]
        if not a.mapped:
            self.note_emptied(h.stream)

    # ----------------------------------------------------------------- free
    def free_rec(self, b: Block) -> None:
        """Return a live block to its stream's free ranges (lock held).

        :meth:`free` holds an inlined copy (its hot path): change both.
        """
        if not b.live:
            raise ValueError(f"allocation at {b.addr:#x} was already freed")
        b.live = False
        b.ref = None
        del self.live[b]
        self.n_live -= 1
        self.n_free += 1
        self.requested -= b.nbytes
        self.in_use -= b.size
        h = b.arena.heap
        st = h.stream
        st.seq += 1
        b.seq = st.seq
        if self.history is not None and self.asleep is None:
            # Freed memory is reused in stream order at once: requested and completed together.
            # (Asleep: the sleep recorded the frees of every live block; wake() their allocs.)
            self.history.record("free_requested", b.addr, b.nbytes, st.key)
            self.history.record("free_completed", b.addr, b.nbytes, st.key)
        h.insert(b)

    def free(self, ref: Any, owner: object) -> None:
        """Free the block of `owner` (an Allocation) whose weak reference is `ref`.

        `ref` is the allocation's ``_Ref``: the block is ``ref.rec`` while
        ``rec.ref is ref``. If it is not (any more), the block was released
        already: by the safety net when `owner` is being finalized by the
        garbage collector (its weak reference is then cleared: a user's
        ``__del__`` freeing an allocation in a reference cycle), which is not
        an error, or else by a racing ``free()``, which is. Called re-entrantly
        (a finalizer interrupted this thread inside the pool's lock) the free
        is queued; the interrupted call does it when it lets go of the lock.
        """
        lock = self.lock
        if self.tasks or not lock.acquire(False):
            if not self.free_contended(ref, owner):
                return
        self.owner = _ident()
        try:
            if self.pending:
                self.drain()
            if self.closed:
                if self.forked:
                    raise self.closed_error()
                return
            b = ref.rec
            if b.ref is not ref:
                # Freed already (by the safety net or a racing thread; the block
                # may even be reused or merged into a free range): never touch it.
                if ref() is None:
                    return  # finalization: the safety net freed it, nothing to do
                raise ValueError(f"allocation at {b.addr:#x} was already freed")
            # free_rec, inlined (the hot path). Measured (issue 21, host emulator, same-run A/B
            # of benchmarks/alloc_latency.py's patterns, 14 alternating rounds): a call of
            # free_rec costs 2-3% of a malloc+free pair (~0.06 us of 2.5). Keep the two
            # copies the same: tests/test_pool_lifetime.py compares free with the drain path.
            b.live = False
            b.ref = None
            del self.live[b]
            self.n_live -= 1
            self.n_free += 1
            self.requested -= b.nbytes
            self.in_use -= b.size
            h = b.arena.heap
            st = h.stream
            st.seq += 1
            b.seq = st.seq
            if self.history is not None and self.asleep is None:  # (asleep: see above)
                self.history.record("free_requested", b.addr, b.nbytes, st.key)
                self.history.record("free_completed", b.addr, b.nbytes, st.key)
            h.insert(b)
            if len(self.pages) > self.max_pages and not self.backend.in_call():
                # (Not from a finalizer inside a backend call of this thread: it would call the
                # driver inside that call. The next operation gives them back.)
                self.enforce_limit()
        finally:
            self.owner = 0  # as in Section.__exit__
            lock.release()
            if self.pending:
                self.settle()

    def free_contended(self, ref: Any, owner: object) -> bool:
        """free() found tasks queued or the lock busy: True once the lock is held.

        False when this thread holds the lock already (a finalizer re-entered
        the pool), or holds the backend's lock while another thread holds the
        pool's (a finalizer that interrupted a backend call: the holder may be
        waiting for the backend, so waiting for it would deadlock): the free is
        validated and queued, never waited for; the holder does it when it
        lets go.
        """
        if self.held_here():
            self.queue_free(ref)  # done by the interrupted call when it lets go
            return False
        if self.tasks:
            self.run_tasks()
        lock = self.lock
        if not lock.acquire(False):
            self.check_reentry()
            if self.backend.in_call():
                self.queue_free(ref)
                self.settle()  # the holder may have let go meanwhile
                return False
            if not self.owner:
                # No owner noted while the lock is busy: its holder is between taking the
                # lock and noting itself (or between clearing it and letting go), and that
                # may be this very thread, interrupted there by a signal handler (or, from
                # Python 3.12, a collection at the eval breaker) that frees: waiting would
                # never end. Queued, the holder does it as it lets go (Section.__exit__ and
                # free() settle), or settle() does it now if the lock was let go meanwhile.
                self.queue_free(ref)
                self.settle()
                return False
            lock.acquire()
        return True

    def queue_free(self, ref: Any) -> None:
        """Validate a free that cannot take the lock now and queue it in ``pending``."""
        if self.forked:
            raise self.closed_error()
        b = ref.rec
        if not self.closed and b.ref is not ref and ref() is not None:
            raise ValueError(f"allocation at {b.addr:#x} was already freed")
        self.pending.append(ref)

    # ------------------------------------------------------------ slow path
    def unfree(self, pages: list[Page]) -> None:
        for p in pages:
            if p.state is FREE:  # quarantined ones stay out
                self.free_pages.append(p)

    def take_free(self, got: list[Page], n: int) -> None:
        free = self.free_pages
        k = min(n - len(got), len(free))
        if k > 0:
            got.extend(free[len(free) - k :])
            del free[len(free) - k :]

    def gather(self, n: int, nbytes: int, st: StreamState | None) -> list[Page]:
        """Take `n` unmapped pages (all or nothing).

        In order: free pages; cached pages whose work is done (`st`'s first,
        then other streams'); new pages while under the limit; cached pages
        after waiting for their work; else OutOfMemoryError.

        New pages are created while the pool stays within its growth budget,
        and when the device refused one (the pool's limit is above what the
        device has left: another pool or process holds the rest), only on the
        schedule of :meth:`create_pages`: a gather makes at most one failing
        create call, and most make none.
        """
        got: list[Page] = []
        why = ""
        reclaimed = self.n_reclaimed
        try:
            self.take_free(got, n)
            if len(got) < n:
                # Grow while the pool stays within its growth budget: streams
                # that remapped cached pages each time a recurring request did
                # not fit would never reach a steady state.
                budget = min(self.budget(), self.max_pages) - len(self.pages)
                why = self.create_pages(got, min(n - len(got), budget))
            if len(got) < n:  # other streams' cached pages whose work is done
                self.reclaim(n - len(got), st, wait=False, which="others")
                self.take_free(got, n)
            if len(got) < n and st is not None:  # the stream's own cached pages whose work is done
                self.reclaim(n - len(got), st, wait=False, which="own")
                self.take_free(got, n)
            if self.n_reclaimed != reclaimed and len(self.pages) < self.max_pages:
                # A remap the limit did not force: recurring requests that do
                # not fit would remap like this every time. Widen the budget
                # (one page per such remap, up to GROWTH_MAX_PAGES per stream)
                # until they settle.
                if self.slack < self.max_slack():
                    self.slack += 1
            missing = min(n - len(got), self.max_pages - len(self.pages))
            if missing > 0 and not why:
                why = self.create_pages(got, missing)
            if len(got) < n:  # every cached page, after waiting for its work (queried above)
                self.reclaim(n - len(got), st, wait=True, query_first=False)
                self.take_free(got, n)
        except BaseException:
            self.free_pages.extend(got)
            raise
        if len(got) < n:
            found = len(got)
            self.free_pages.extend(got)
            raise self.oom(nbytes, n, why or "no free, creatable or cached page left", found=found)
        if self.n_reclaimed != reclaimed:
            self.n_remaps += 1
            logger.info(
                "remap: unmapped %d cached page(s) for %d page(s)", self.n_reclaimed - reclaimed, n
            )
        return got

    def budget(self) -> int:
        """Pages the pool may hold before it reuses its streams' own cached pages."""
        if self.keep_cached:
            return self.max_pages
        return self.growth_budget()

    def growth_budget(self) -> int:
        """The default growth budget (pages), ``keep_cached`` or not: see ``GROWTH``."""
        P = self.P
        peak = max(self.peak_in_use, self.budget_peak)
        if self.limited:
            return -(-int(peak * GROWTH) // P) + GROWTH_PAGES + self.slack
        # Without a limit the headroom counts only the whole pages it holds:
        # rounded up, GROWTH adds a page to every pool under 50 pages.
        return max(-(-peak // P), int(peak * GROWTH) // P) + self.slack

    def max_slack(self) -> int:
        """The most the budget's slack grows to (pages): see ``GROWTH_MAX_PAGES``."""
        share = -(-int(max(self.peak_in_use, self.budget_peak) * GROWTH_MAX_SHARE) // self.P)
        # Without a limit at least 2 pages: budget() rounds GROWTH's headroom down, and with
        # 1 a recurring workload that settled when it rounded up remapped on every pass,
        # forever (ResNet-50-shaped inference at batch 4: 108 backend calls a pass; three
        # streams of a page each).
        floor = 2 * GROWTH_MAX_PAGES if self.limited else GROWTH_MIN_PAGES
        return min(GROWTH_MAX_PAGES * len(self.streams), max(floor, share))

    def creatable(self) -> int:
        """The most pages the pool may hold by creating pages now (see :meth:`create_pages`)."""
        if self.refused_at < 0 or (self.refused_skips >= self.refused_wait and not self.skipped_now):
            return self.max_pages
        return min(self.max_pages, self.refused_at)

    def create_pages(self, got: list[Page], k: int) -> str:
        """Create up to `k` pages into `got`; a driver out-of-memory stops it (returns why).

        When the device refuses a page (it is out of memory below the pool's
        limit: another pool or process holds the rest), the pool remembers how
        many pages it held then (the mark) and stops asking the device for
        pages beyond the mark: the requests that need pages are served from
        cached pages (remapped) instead, and no failing create call is made.
        On a GPU a failing ``cuMemCreate`` is a slow driver call; before, a
        pool in that state made one (or two) on every slow-path request.

        The device is asked again, deterministically (no clock):

        - after 1, 2, 4, ... up to ``REFUSED_MAX_WAIT`` requests that wanted pages
          beyond the mark (each refusal doubles the wait; a creation past the
          mark ends the refusal, and growth beyond it resumes at once). A
          request (:meth:`asking`) counts once however many times it gathers
          pages, and is not asked for beyond the mark after it skipped once
          (but by its retry) or after the device refused it a page;
        - below the mark at any time: pages the pool gave back since (a trim,
          a lowered limit, sleep) are created again without waiting (the device
          held them for it); a refusal there sets a lower mark;
        - by a request that would otherwise fail (:meth:`asking`): no request
          fails for pages the pool did not ask for, and a genuine out-of-memory
          error still carries the device's own answer ("the device is out of
          memory (...)"), as before.
        """
        if k <= 0:
            return ""
        if self.refused_now:  # the device refused a page during this request: not asked again
            return self.refused_why
        why = ""
        held = len(self.pages)
        mark = self.refused_at
        past = mark >= 0 and held + k > mark
        if past and (self.skipped_now or self.refused_skips < self.refused_wait):
            if not self.skipped_now:  # a request counts once, and skips to its end (see asking())
                self.refused_skips += 1
                self.skipped_now = True
            self.n_unasked += 1
            left = self.refused_wait - self.refused_skips
            why = (
                f"{self.refused_why}; it refused a page when the pool held {mark}: asked for more "
                f"after {left} more request(s) needing pages, or before one fails"
            )
            past = False
            k = mark - held
        made = 0
        try:
            for _ in range(k):
                got.append(self.create_page())
                made += 1
        except OutOfMemoryError as err:  # the driver, not the pool, is out
            why = f"the device is out of memory ({err})"
            self.note_refusal(why)
            self.refused_now = True
        else:
            if past:  # the device gave pages past its refusal: memory came back
                logger.info("the device has memory again: %d page(s) held", len(self.pages))
                self.refused_at = -1
                self.refused_why = ""
                self.refused_wait = self.refused_skips = 0
        if made:
            logger.debug(
                "created %d page(s) of %d bytes (%d of %d pages)",
                made, self.P, len(self.pages), self.max_pages,
            )
        return why

    def note_refusal(self, why: str) -> None:
        """The device refused to create a page: set the mark and the wait (see :meth:`create_pages`)."""
        held = len(self.pages)
        mark = self.refused_at
        if mark < 0 or held > mark:  # a first refusal, or the device gave pages past the last one
            self.refused_wait = 1
        else:
            self.refused_wait = min(2 * self.refused_wait, REFUSED_MAX_WAIT)
        self.refused_at = held
        self.refused_why = why
        self.refused_skips = 0
        logger.info(
            "the device refused a page at %d page(s) held (limit %d): not asked for more for %d request(s)",
            held, self.max_pages, self.refused_wait,
        )

    def create_page(self) -> Page:
        phys = create(self.P, self.device, handle_type="posix_fd" if self.shareable else "none")
        page = Page(phys, next(self.index))
        self.pages[phys] = page
        self.n_created += 1
        total = len(self.pages) * self.P
        if total > self.peak_total:
            self.peak_total = total
        return page

    def map_pages(
        self, arena: Arena, slot: int, pages: list[Page], key: int, keep: set[int] | None = None
    ) -> None:
        """Map `pages` at slots ``slot...`` (taken from the extents) and grant access.

        The pages at the indexes in `keep` are mapped elsewhere already (they
        become aliases: their state and address do not change).
        """
        n = len(pages)
        P = self.P
        res = arena.res
        off = slot * P
        done = 0
        try:
            for p in pages:
                res.map(p.phys, off + done * P)
                done += 1
            res.set_access(off, n * P, "rw", self.peers)
        except BaseException:
            undone = True
            if done:
                try:
                    res.unmap(off, done * P)
                except Exception:  # the original error wins (re-raised below)
                    # One unmap per page then (each page is its own mapping):
                    # quarantine only the pages that really stay mapped.
                    undone = False
                    stuck = 0
                    for i, p in enumerate(pages[:done]):
                        try:
                            res.unmap(off + i * P, P)
                        except Exception:  # noqa: BLE001 - quarantined below
                            if keep and i in keep:
                                # Mapped elsewhere too: an alias that lends no
                                # byte (fenced whole), dissolved later.
                                arena.slots[slot + i] = p
                                arena.mapped += 1
                                al = Alias(p, arena, slot + i, 0, 0, None, None)
                                al.afence = Block(arena, arena.base + off + i * P, P)
                                p.aliases += (al,)
                                self.aliases[al] = None
                                stuck += 1
                                continue
                            p.state = QUARANTINED
                            p.addr = arena.base + off + i * P
                            arena.slots[slot + i] = p
                            self.quarantine[p] = None
                            stuck += 1
                        else:
                            arena.give(slot + i, 1)
                    logger.error(
                        "undo of a failed map: %d of %d page(s) quarantined", stuck, done, exc_info=True
                    )
                    if done < n:
                        arena.give(slot + done, n - done)
            if undone:
                arena.give(slot, n)
            raise
        base = arena.base + off
        for i, p in enumerate(pages):
            arena.slots[slot + i] = p
            if keep and i in keep:
                continue
            p.state = MAPPED
            p.addr = base + i * P
            p.stream = key
        arena.mapped += n
        self.mapped += n - (len(keep) if keep else 0)
        if self.history is not None:
            self.history.record("segment_map", base, n * P, key)

    def new_arena(self, h: Heap, n: int) -> Arena:
        want = max(ARENA_FACTOR * self.max_pages, ARENA_MIN_PAGES, n)
        P = self.P
        align = P if P & (P - 1) == 0 else 0  # pages aligned to their size when possible
        try:
            res = reserve(want * P, self.device, align)
        except (DriverError, OutOfMemoryError):
            if want == n:
                raise
            res = reserve(n * P, self.device, align)  # VA is finite: take what is needed
        arena = Arena(res, P, h)
        self.arenas.append(arena)
        h.arenas.append(arena)
        logger.debug(
            "stream %d: reserved a %s-block arena of %d bytes at %#x",
            shown(h.stream.key), "small" if h.small else "large", res.size, res.address,
        )
        return arena

    def discard_arena(self, arena: Arena) -> None:
        """Free the address space of an arena a failed request reserved (best effort).

        Only when nothing is mapped in it (a failed map may have quarantined a page
        there); a failure to free it keeps it (``trim()`` and ``close()`` retry).
        """
        if not arena.empty or arena not in self.arenas:
            return
        try:
            arena.res.close()
        except Exception:  # the request's own error wins
            logger.warning("freeing the arena of a failed request failed; kept", exc_info=True)
            return
        self.arenas.remove(arena)
        arena.heap.arenas.remove(arena)

    def _order(self, first: StreamState | None) -> Iterator[StreamState]:
        if first is not None and first.key in self.streams:
            yield first
        for s in list(self.streams.values()):
            if s is not first:
                yield s

    def reclaim(
        self,
        need: int | None,
        first: StreamState | None,
        wait: bool,
        which: str = "all",
        query_first: bool = True,
    ) -> int:
        """Unmap cached pages (touched by no live block) into the free pages.

        At least `need` pages (every one with ``None``), `first`'s stream
        first, oldest free ranges first. Pages leave a stream only once the
        events covering their last use are complete: without `wait` only those
        known or queried complete; with `wait` the pool waits on the events.
        `which` is ``"all"``, ``"others"`` (not `first`) or ``"own"`` (only
        `first`). With `query_first` a wait is made only after a query says
        the work is still running. Returns the pages reclaimed.
        """
        try:
            return self._reclaim(need, first, wait, which, query_first)
        finally:
            if self.emptied:  # even after a failure: what was emptied holds nothing
                self.drop_emptied(first)

    def _reclaim(
        self, need: int | None, first: StreamState | None, wait: bool, which: str, query_first: bool
    ) -> int:
        got = 0
        for st in self._order(first):
            if need is not None and got >= need:
                break
            if (which == "others" and st is first) or (which == "own" and st is not first):
                continue
            if self.aliases:
                self.dissolve(st, wait)
            cands = sorted((b for b in st.free_ranges() if n_whole(b)), key=_seq)
            chosen: list[tuple[Block, int]] = []
            total = 0
            for b in cands:
                if need is not None and got + total >= need:
                    break
                k = n_whole(b)
                if need is not None:
                    k = min(k, need - got - total)
                chosen.append((b, k))
                total += k
            if not chosen:
                continue
            top = chosen[-1][0].seq
            if wait:
                done = query_first and st.is_done(top, self.backend, self.ev)
                if not done and not st.wait(top, self.backend, self.ev):
                    # A retired stream freed memory after its last event: only
                    # a device synchronize can tell its work is done.
                    self.sync()
                    st.done_seq = st.seq
            elif not st.is_done(top, self.backend, self.ev):
                # Still running (one query, never a wait): only ranges freed
                # before work known complete may go.
                chosen = [(b, k) for b, k in chosen if b.seq <= st.done_seq]
            for b, k in chosen:
                self.unmap_cached(st, b, k)
                got += k
        return got

    def unmap_cached(self, st: StreamState, b: Block, k: int) -> None:
        """Unmap the last `k` whole slots of free range `b` (one driver call)."""
        a = b.arena
        P = self.P
        s0, s1 = whole_slots(b)
        u0 = s1 - k
        assert s0 <= u0 < s1
        a.res.unmap(u0 * P, k * P)
        if self.history is not None:
            self.history.record("segment_unmap", a.base + u0 * P, k * P, st.key)
        h = a.heap
        h.remove(b)
        cut = a.base + u0 * P
        tail = a.base + s1 * P
        end = b.addr + b.size
        if end > tail:
            h.add(Block(a, tail, end - tail, b.seq))
        if cut > b.addr:
            b.size = cut - b.addr
            h.add(b)
        free = self.free_pages
        slots = a.slots
        for i in range(u0, s1):
            p = slots[i]
            assert p is not None
            slots[i] = None
            p.state = FREE
            p.addr = None
            p.stream = None
            free.append(p)
        a.give(u0, k)
        a.mapped -= k
        self.mapped -= k
        self.n_reclaimed += k
        if not a.mapped:
            self.note_emptied(st)

    def note_emptied(self, st: StreamState) -> None:
        """An arena of `st` maps nothing any more: note the stream if nothing of it is left."""
        if st in self.emptied:
            return  # noted already (an earlier arena of it)
        if (st.obj is not None or st.retired or st.ended) and not any(x.mapped for x in st.arenas):
            # Nothing of the stream left here (live blocks lie on mapped pages): let
            # its object go; a retired stream, or one the pool only knew by its
            # object, will not be back under this key: forget it (drop_emptied).
            st.obj = None
            self.emptied.append(st)

    def drop_emptied(self, keep: StreamState | None) -> None:
        """Forget the streams :meth:`unmap_cached` emptied; `keep` (being served) stays listed."""
        emptied, self.emptied = self.emptied, []
        for st in emptied:
            if st is keep:
                self.emptied.append(st)  # next time, unless the request put a block there
            else:
                self.drop_stream(st)

    def drop_stream(self, st: StreamState) -> bool:
        """Forget a stream that holds nothing: destroy its events, free its arenas (lock held).

        Only when no slot of its arenas is mapped or being mapped (so no live
        block, no cached page, no placement in flight). Best effort, never
        raises: on a driver error the stream (or what is left of its arenas)
        is kept and the error logged; ``trim()``, ``retire_stream()`` and
        ``close()`` try again. Returns True when the stream is gone. Issue 17
        item 8: a pool serving thousands of one-shot streams otherwise keeps
        two arenas of twice the limit of address space per stream, and its
        slow path walks them all.
        """
        if self.streams.get(st.key) is not st:
            return False
        heaps = st.heaps
        if not all(a.empty for h in heaps for a in h.arenas):
            return False
        try:
            if not st.release_events(self.backend):
                return False
            for h in heaps:
                arenas = h.arenas
                while arenas:
                    a = arenas[-1]
                    a.res.close()  # nothing mapped: frees the address range
                    arenas.pop()
                    self.arenas.remove(a)
        except Exception:  # kept; retried by trim, retire_stream, close
            logger.warning("forgetting stream %d failed; kept", shown(st.key), exc_info=True)
            return False
        del self.streams[st.key]
        st.obj = None
        logger.debug("stream %d holds nothing: forgotten", shown(st.key))
        return True

    def release_free(self, k: int) -> int:
        """Give `k` free pages back to the driver; returns how many."""
        done = 0
        while done < k and self.free_pages:
            p = self.free_pages.pop()
            try:
                p.phys.close()
            except BaseException:
                self.free_pages.append(p)
                raise
            del self.pages[p.phys]
            self.n_released += 1
            done += 1
        return done

    def release_empty_arenas(self) -> None:
        keep: list[Arena] = []
        for i, arena in enumerate(self.arenas):
            if arena.empty:
                try:
                    arena.res.close()
                except BaseException:
                    self.arenas = keep + self.arenas[i:]
                    raise
                arena.heap.arenas.remove(arena)
            else:
                keep.append(arena)
        self.arenas = keep

    # ------------------------------------------------------------- queries
    def largest_block(self) -> int:
        """The largest single request that can succeed now (lock held; walks the free ranges).

        With F = limit pages - pinned pages: a block on F fresh pages, one that
        starts in a free range ending at unmapped slots (or ends in one
        starting after them) and maps at most F pages counting the whole pages
        it takes from those ranges, one joining two such ranges across a run
        (large heaps only: requests of a page or less go to the small heaps,
        and a fresh page holds them), one across a stream's free tail and free
        head of two partly used pages with at most F new pages between them
        (:meth:`place_alias`), or the largest free range of either heap as it
        is.
        """
        P = self.P
        # An idle aliased page counts as reclaimable in F (pinned() leaves it out), but a
        # block on its free bytes (a tail, a head, a free range's partial slot) pins it.
        idle = set(self.idle_aliased_pages())
        F = self.max_pages - self.held_pinned() + len(idle)
        best = 0
        for st in self.streams.values():
            for h in st.heaps:
                if h.sizes:
                    best = max(best, max((sz for sz, b in h.bins.items() if b), default=0))
        if F >= 0:
            # across a free tail and a free head of partly used pages (place_alias)
            for st in self.streams.values():
                tails, heads = self.alias_sources(st, True)
                for T in tails[-2:]:
                    ft = F - (T[2] in idle)
                    if ft >= 0:
                        best = max(best, T[0] + ft * P)
                    for H in heads[-2:]:
                        fth = ft - (H[2] in idle)
                        if H[2] is not T[2] and H[1] is not T[1] and fth >= 0:
                            best = max(best, T[0] + fth * P + H[0])
                for H in heads[-1:]:
                    fh = F - (H[2] in idle)
                    if fh >= 0:
                        best = max(best, H[0] + fh * P)
        if F <= 0:
            return best
        best = max(best, F * P)

        def aliased(arena: Arena, addr: int) -> int:
            # 1 when `addr` lies inside a slot whose page is mapped elsewhere too: a free
            # range's partial slot is on a pinned page, except such a page when it is
            # idle (idle_aliased: counted in F), which a block there pins again.
            off = addr - arena.base
            if not off % P or not idle:
                return 0
            return 1 if arena.slots[off // P] in idle else 0

        for st in self.streams.values():
            large = st.large
            for arena in large.arenas:
                base = arena.base
                for s, k in arena.runs():
                    a0 = base + s * P
                    a1 = a0 + k * P
                    L1 = large.by_end.get(a0)
                    L2 = large.by_start.get(a1)
                    w1 = (
                        n_whole(L1) + aliased(arena, L1.addr)
                        if L1 is not None and L1.arena is arena else -1
                    )
                    w2 = (
                        n_whole(L2) + aliased(arena, L2.addr + L2.size)
                        if L2 is not None and L2.arena is arena else -1
                    )
                    if w1 >= 0 and L1 is not None and F > w1:
                        best = max(best, L1.size + min(k, F - w1) * P)
                    if w2 >= 0 and L2 is not None and F > w2:
                        best = max(best, L2.size + min(k, F - w2) * P)
                    if w1 >= 0 and w2 >= 0 and L1 is not None and L2 is not None and w1 + k + w2 <= F:
                        best = max(best, L1.size + k * P + L2.size)
        return best

    def touching(self) -> dict[tuple[Arena, int], list[Block]]:
        """Live blocks per ``(arena, slot)`` they touch (walks every live block)."""
        P = self.P
        out: dict[tuple[Arena, int], list[Block]] = {}
        for b in self.live:
            a = b.arena
            off = b.addr - a.base
            for s in range(off // P, (off + b.size - 1) // P + 1):
                out.setdefault((a, s), []).append(b)
        return out

    def shared_pages(self) -> int:
        P = self.P
        edges: collections.Counter[tuple[int, int]] = collections.Counter()
        for b in self.live:
            a = b.arena
            off = b.addr - a.base
            s0 = off // P
            s1 = (off + b.size - 1) // P
            edges[(id(a), s0)] += 1
            if s1 != s0:
                edges[(id(a), s1)] += 1
        return sum(1 for c in edges.values() if c > 1)

    # ---------------------------------------------------------------- check
    def check(self) -> None:
        """Verify every internal invariant (tests and debugging; lock held)."""

        def fail(msg: str) -> NoReturn:
            raise AssertionError(f"PagePool invariant broken: {msg}")

        P = self.P
        seen: dict[Page, str] = {}
        asleep_seen: list[Page] = []

        def claim(p: Page, where: str) -> None:
            if p in seen:
                fail(f"page {p.index} is both {seen[p]} and {where}")
            seen[p] = where

        for p in self.free_pages:
            if p.state is not FREE or p.addr is not None:
                fail(f"free page {p.index} has state {p.state}, address {p.addr}")
            claim(p, "free")
        for p in self.acquired:
            if p.state is not ACQUIRED:
                fail(f"acquired page {p.index} has state {p.state}")
            claim(p, "acquired")
        for p in self.quarantine:
            if p.state is not QUARANTINED:
                fail(f"quarantined page {p.index} has state {p.state}")
            claim(p, "quarantined")
        if sorted(map(id, self.arenas)) != sorted(id(a) for st in self.streams.values() for a in st.arenas):
            fail("the arenas of the streams are not the pool's arenas")
        touching = self.touching()
        mapped_at = self.backend.mapped_at
        mapped = 0
        cached = 0
        in_use = requested = n_live = 0
        for b in self.live:
            if not b.live or b.size <= 0 or b.size % ALIGNMENT or b.nbytes > b.size:
                fail(f"live block {b.addr:#x} ({b.size} bytes for {b.nbytes}) is malformed")
            in_use += b.size
            requested += b.nbytes
            n_live += 1
        def check_arena(arena: Arena, key: int, binned: dict[Block, None]) -> int:
            """Check one arena's slots and blocks; returns its mapped pages."""
            # every byte of a mapped slot: exactly one live block or free range
            items = sorted(
                [(b.addr, b.size, True, b) for b in self.live if b.arena is arena]
                + [(b.addr, b.size, False, b) for b in binned if b.arena is arena]
                + [(b.addr, b.size, True, b) for b in fences if b.arena is arena],
                key=lambda t: t[0],
            )
            fenced = {(b.addr - arena.base) // P for b in fences if b.arena is arena}
            cur = None
            prev_free = False
            cover: dict[int, int] = {}
            for addr, size, live, _b in items:
                if cur is not None and addr < cur:
                    fail(f"arena {arena.base:#x}: blocks overlap at {addr:#x}")
                if not live and prev_free and cur == addr:
                    fail(f"arena {arena.base:#x}: free ranges at {addr:#x} not coalesced")
                if addr < arena.base or addr + size > arena.base + arena.nslots * P:
                    fail(f"block {addr:#x} lies outside its arena")
                off = addr - arena.base
                for s in range(off // P, (off + size - 1) // P + 1):
                    lo = max(off, s * P)
                    hi = min(off + size, (s + 1) * P)
                    cover[s] = cover.get(s, 0) + hi - lo
                prev_free = not live
                cur = addr + size
            n_mapped = n_alias = 0
            # what the reservation really maps: a slot is mapped exactly when its page is
            # awake (or quarantined), or asleep where the sleep record says so
            at = arena.res.access_at
            for s in range(arena.nslots):
                q = arena.slots[s]
                unm = arena.is_unmapped(s)
                mapped_here = at(s * P) is not None
                # and what the backend maps there: one page's mapping of its handle
                got = mapped_at(arena.base + s * P)
                if (got is not None) != mapped_here:
                    fail(
                        f"arena {arena.base:#x} slot {s}: the backend "
                        f"{'maps' if got is not None else 'does not map'} it, the reservation "
                        f"{'does' if mapped_here else 'does not'}"
                    )
                if q is None:
                    if not unm:
                        fail(f"arena {arena.base:#x} slot {s}: no page, yet not unmapped")
                    if s in cover:
                        fail(f"arena {arena.base:#x} slot {s}: a block lies on an unmapped slot")
                    if mapped_here:
                        fail(f"arena {arena.base:#x} slot {s}: no page, yet mapped")
                    continue
                p = q
                if unm:
                    fail(f"arena {arena.base:#x} slot {s}: page {p.index} in an unmapped extent")
                if p.state is ASLEEP:
                    if self.asleep is not None and mapped_here != ((arena, s) in self.asleep.mapped):
                        fail(
                            f"arena {arena.base:#x} slot {s}: page {p.index} sleeps, its slot is "
                            f"{'mapped' if mapped_here else 'unmapped'}, the sleep record says "
                            f"{self.asleep.mapped.get((arena, s), 'unmapped')}"
                        )
                elif not mapped_here:
                    fail(f"arena {arena.base:#x} slot {s}: page {p.index} is {p.state}, its slot unmapped")
                stale = (
                    p.state is ASLEEP and self.asleep is not None
                    and self.asleep.mapped.get((arena, s)) is STALE
                )  # (a failed undo's mapping: what backs it is not the page's, see PoolSleep)
                if got is not None and not stale:
                    start, size, handle, acc = got
                    if start != arena.base + s * P or size != P or handle != p.phys.handle:
                        fail(
                            f"arena {arena.base:#x} slot {s}: page {p.index} (handle "
                            f"{p.phys.handle:#x}), the backend maps [{start:#x}, {start + size:#x}) "
                            f"of handle {handle:#x}"
                        )
                    if (
                        p.state is MAPPED and acc is not None and acc is not Access.READWRITE
                        # (an alias a failed undo left mapped lends no byte: no access needed)
                        and not any(x.arena is arena and x.slot == s and x.lo == x.hi for x in p.aliases)
                    ):
                        fail(f"arena {arena.base:#x} slot {s}: page {p.index} is mapped with access {acc}")
                if p.state is QUARANTINED:
                    claim_q = seen.get(p)
                    if claim_q != "quarantined":
                        fail(f"page {p.index} in slot {s} is quarantined but not listed")
                    if s in cover:
                        fail(f"arena {arena.base:#x} slot {s}: a block lies on a quarantined page")
                    continue
                al = next((x for x in p.aliases if x.arena is arena and x.slot == s), None)
                # while the pool sleeps its mapped pages are ASLEEP (same slots, no memory)
                state_ok = p.state is MAPPED or (p.state is ASLEEP and self.asleep is not None)
                if al is not None:
                    # one of the page's other mappings (its own slot is checked where it is)
                    n_alias += 1
                    if not state_ok or p.stream != key or al not in self.aliases:
                        fail(f"alias of page {p.index} in slot {s}: state {p.state}, stream {p.stream}")
                else:
                    claim(p, f"arena {arena.base:#x} slot {s}")
                    n_mapped += 1
                    if p.state is ASLEEP:
                        if self.asleep is None:
                            fail(f"page {p.index} in slot {s} is asleep in a pool that is awake")
                        asleep_seen.append(p)
                    if not state_ok or p.addr != arena.base + s * P or p.stream != key:
                        fail(f"page {p.index} in slot {s} has state {p.state}, address {p.addr}")
                if cover.get(s, 0) != P:
                    fail(
                        f"arena {arena.base:#x} slot {s}: blocks cover {cover.get(s, 0)} of {P} bytes"
                    )
                # a page is cached exactly when no live block touches it (nor a fence)
                is_cached = (arena, s) not in touching and s not in fenced
                in_free = any(
                    b.addr <= arena.base + s * P and arena.base + (s + 1) * P <= b.addr + b.size
                    for b in binned if b.arena is arena
                ) if is_cached else False
                if is_cached != in_free:
                    fail(
                        f"arena {arena.base:#x} slot {s}: cached {is_cached}, "
                        f"in a free range {in_free}"
                    )
            if n_mapped + n_alias != arena.mapped:
                fail(f"arena {arena.base:#x}: {arena.mapped} mapped slots counted, {n_mapped} found")
            if sum(arena.flen.values()) != len(
                {s for s0, ln in arena.flen.items() for s in range(s0, s0 + ln)}
            ) or arena.fstarts != sorted(arena.flen) or len(arena.fend) != len(arena.flen):
                fail(f"arena {arena.base:#x}: extent index broken")
            return n_mapped

        fences: list[Block] = []
        for al in self.aliases:
            # a page mapped more than once: each byte used through one mapping, fenced in the others
            p = al.page
            pa = p.addr
            a = al.arena
            awake_or_asleep = p.state is MAPPED or (p.state is ASLEEP and self.asleep is not None)
            if al not in p.aliases or not awake_or_asleep or pa is None or a.slots[al.slot] is not p:
                fail(f"alias of page {p.index} is misfiled")
            for other in p.aliases:
                if other is not al and other.lo < al.hi and al.lo < other.hi:
                    fail(
                        f"aliases of page {p.index} lend overlapping bytes [{al.lo}, {al.hi}) "
                        f"and [{other.lo}, {other.hi})"
                    )
            if a.heap.stream.key != p.stream or not 0 <= al.lo <= al.hi <= P:
                fail(f"alias of page {p.index}: stream {a.heap.stream.key}, bytes [{al.lo}, {al.hi})")
            sa = a.base + al.slot * P
            want_p = (pa + al.lo, al.hi - al.lo) if al.hi > al.lo else None
            got_p = (al.pfence.addr, al.pfence.size) if al.pfence is not None else None
            if al.hi == al.lo:
                want_a: tuple[int, int] | None = (sa, P)
            elif al.hi - al.lo == P:
                want_a = None
            elif al.lo == 0:
                want_a = (sa + al.hi, P - al.hi)
            elif al.hi == P:
                want_a = (sa, al.lo)
            else:
                fail(f"alias of page {p.index} lends bytes [{al.lo}, {al.hi}): not a head or tail")
            got_a = (al.afence.addr, al.afence.size) if al.afence is not None else None
            if want_p != got_p or want_a != got_a:
                fail(f"alias of page {p.index}: fences {got_p}, {got_a}, expected {want_p}, {want_a}")
            if al.pfence is not None:
                if al.pfence.arena.slots[(al.pfence.addr - al.pfence.arena.base) // P] is not p:
                    fail(f"alias of page {p.index}: its fence is not on the page's own slot")
                fences.append(al.pfence)
            if al.afence is not None:
                if al.afence.arena is not a:
                    fail(f"alias of page {p.index}: its fence is not in the alias arena")
                fences.append(al.afence)
        for key, st in self.streams.items():
            if st.key != key:
                fail(f"stream {key} is filed as {st.key}")
            if [s for s, _h in st.events] != sorted(s for s, _h in st.events):
                fail(f"stream {key}: events out of order")
            for h in st.heaps:
                if set(h.sizes) != set(h.bins) or h.sizes != sorted(h.sizes):
                    fail(f"stream {key}: size index out of date")
                binned = {b: None for sz, bn in h.bins.items() for b in bn if b.size == sz}
                if len(binned) != sum(len(bn) for bn in h.bins.values()):
                    fail(f"stream {key}: a free range is filed under the wrong size")
                if set(binned) != set(h.by_start.values()) or set(binned) != set(h.by_end.values()):
                    fail(f"stream {key}: size bins disagree with the address indexes")
                for addr, b in h.by_start.items():
                    if b.addr != addr or h.by_end.get(b.addr + b.size) is not b or b.live:
                        fail(f"stream {key}: free range {addr:#x} misfiled")
                    if b.arena.heap is not h or b.size <= 0 or b.size % ALIGNMENT or b.addr % ALIGNMENT:
                        fail(f"stream {key}: free range {addr:#x} malformed or in another heap's arena")
                    if b.seq > st.seq:
                        fail(f"stream {key}: free range {addr:#x} from the future")
                cached += sum(n_whole(b) for b in binned)
                if h.cached_pages(P) != sum(n_whole(b) for b in binned):
                    fail(f"stream {key}: cached page count is wrong")
                for arena in h.arenas:
                    if arena.heap is not h:
                        fail(f"stream {key}: arena {arena.base:#x} names another heap")
                    mapped += check_arena(arena, key, binned)
        if self.asleep is not None:
            for (arena, s), how in self.asleep.mapped.items():
                q = arena.slots[s] if arena in self.arenas and 0 <= s < arena.nslots else None
                if q is None or q.state is not ASLEEP or how not in (KEPT, STALE):
                    fail(f"sleep record: slot {s} of arena {arena.base:#x} is {how}; no page sleeps in it")
                if how is KEPT and q.phys.closed:
                    fail(f"slot {s} of arena {arena.base:#x} is kept mapped, its page's handle released")
        released = {p for p in asleep_seen if p.phys.closed}
        if released & set(self.pages.values()):
            fail("a page whose handle was released by sleep is still listed as owned")
        if len(asleep_seen) != self.n_asleep:
            fail(f"{self.n_asleep} pages counted asleep, {len(asleep_seen)} found")
        if set(seen) != set(self.pages.values()) | released:
            fail(f"{len(self.pages)} pages owned but {len(seen)} accounted for")
        if mapped != self.mapped:
            fail(f"{self.mapped} mapped pages counted, {mapped} found")
        # pinned: touched by a live block through any mapping (an aliased page none
        # touches is reclaimable: a reclaim dissolves its aliases and unmaps it)
        pinned_touch = len({a.slots[s] for a, s in touching})
        # (asleep: an aliased page freed while asleep is idle too, until wake() forgets it)
        idle = len(self.idle_aliased_pages(asleep_too=self.asleep is not None))
        if self.mapped - cached - idle != pinned_touch:
            fail(
                f"{self.mapped - cached - idle} pinned mapped pages counted ({idle} aliased ones "
                f"idle), {pinned_touch} touched by live blocks"
            )
        in_use += len(self.acquired) * P
        if (in_use, requested, n_live) != (self.in_use, self.requested, self.n_live):
            fail(
                f"counters (in use, requested, live) are {(self.in_use, self.requested, self.n_live)}, "
                f"recount gives {(in_use, requested, n_live)}"
            )
        if len(self.pages) * P > self.peak_total:
            fail("the peak of pages held is below what is held")
        if self.refused_at < 0:
            if self.refused_wait or self.refused_skips or self.refused_why:
                fail("no refusal of the device in force, but a wait is set")
        elif not 0 <= self.refused_skips <= self.refused_wait <= REFUSED_MAX_WAIT or not self.refused_wait:
            fail(f"refusal wait {self.refused_skips} of {self.refused_wait} is out of range")

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        """Release every driver resource; resumable after a failure.

        Live allocations are invalidated at once. An arena holding an
        allocation that a view (an array, a DLPack capsule) still uses stays
        mapped until the last such view is gone; its pages' handles are
        released now (the memory lives while mapped, rule 7). If a release
        fails, the error propagates and calling ``close()`` again resumes.
        """
        try:
            with self.section:
                self.close_locked()
        finally:
            flush()  # what the close logged (close_locked clears ``pending``)

    def close_locked(self) -> None:
        """:meth:`close` with the lock held."""
        if self.forked:
            # The arenas and pages are the parent's: releasing them here
            # would punch holes in the parent's memory (issue 17). Refused
            # as any other use, also when the pool holds nothing right now.
            if self.open_at_fork or self.arenas or self.pages or self.held:
                raise self.closed_error()
            return
        if self.closed and not self.arenas and not self.pages:
            return
        errors: list[BaseException] = []
        if not self.closed:
            self.record_close()
            self.closed = True
            logged = LOG in self.pending
            self.pending.clear()
            if logged:  # records queued under the lock: emitted by the settle() after it
                self.pending.append(LOG)
            for st in self.streams.values():
                try:
                    st.drop_events(self.backend)
                except Exception as err:  # noqa: BLE001 - keep releasing
                    errors.append(err)
            self._invalidate()
        if self.held:
            try:
                self.release_held()
            except Exception as err:  # noqa: BLE001 - keep releasing
                errors.append(err)
        if not self.synced and self.arenas:
            try:  # rule 8: nothing is unmapped under running kernels
                self.sync()
                self.synced = True
            except Exception as err:  # noqa: BLE001 - keep releasing
                errors.append(err)
        self.asleep = None  # the backup goes; released pages stay out of self.pages
        if self.staging is not None:
            try:
                self.staging.close()
            except Exception as err:  # noqa: BLE001 - keep releasing
                errors.append(err)
        keep: list[Arena] = []
        for arena in self.arenas:
            if arena in self.held:
                keep.append(arena)
                continue
            try:
                arena.res.close()
            except Exception as err:  # noqa: BLE001
                errors.append(err)
                keep.append(arena)
        self.arenas = keep
        for phys in list(self.pages):
            try:
                phys.close()
            except Exception as err:  # noqa: BLE001
                errors.append(err)
            else:
                del self.pages[phys]
                self.n_released += 1  # memory_stats: segment.all.freed (current = allocated - freed)
        # Releases of buffers collected before the pool, queued for the pool's next
        # call, which will not come when a finalizer closes it: done now (a closed
        # pool takes pages back without its lock), or by the backend after the call
        # a finalizer interrupted.
        tasks = self.tasks
        while tasks:
            fn = tasks.popleft()
            try:
                self.backend.run_or_defer(fn)
            except Exception:  # as run_tasks: logged
                logger.error("deferred release failed", exc_info=True)
        if errors:
            raise errors[0]

    def record_frees(self) -> None:
        """History: every live block freed (``close()``, and ``sleep()``: PyTorch's viewer
        draws no block without a segment, and sleep unmaps the pages of live blocks)."""
        hist = self.history
        if hist is None:
            return
        for b in self.live:
            key = b.arena.heap.stream.key
            hist.record("free_requested", b.addr, b.nbytes, key)
            hist.record("free_completed", b.addr, b.nbytes, key)

    def record_allocs(self) -> None:
        """History: every live block allocated again (``wake()``, after its pages are mapped)."""
        hist = self.history
        if hist is None:
            return
        for b in self.live:
            hist.record("alloc", b.addr, b.nbytes, b.arena.heap.stream.key)

    def record_close(self) -> None:
        """History: close() frees every live block and unmaps every page.

        Recorded so that a snapshot taken after ``close()`` (a ``with`` block's
        end) is consistent: its segments are empty, and the events that mapped
        them are matched by unmaps (the replay's recorded reserved bytes would
        otherwise start below zero).
        """
        hist = self.history
        if hist is None:
            return
        P = self.P
        sl = self.asleep
        if sl is None:  # asleep: the sleep recorded the frees of the live blocks
            self.record_frees()

        def mapped(a: Arena, s: int) -> bool:
            # A sleeping page's slot: the history holds the sleep's segment_unmap, not to be
            # repeated, unless a failed sleep kept it mapped (KEPT). A STALE slot is
            # unusable, and the history never mapped it back.
            p = a.slots[s]
            if p is None:
                return False
            return not (sl is not None and p.state is ASLEEP and sl.mapped.get((a, s)) is not KEPT)

        for a in self.arenas:
            key = a.heap.stream.key
            s, n = 0, len(a.slots)
            while s < n:
                if not mapped(a, s):
                    s += 1
                    continue
                e = s + 1
                while e < n and mapped(a, e):
                    e += 1
                hist.record("segment_unmap", a.base + s * P, (e - s) * P, key)
                s = e

    def _invalidate(self) -> None:
        """First close: mark every live block dead, note the arenas views still use."""
        views: list[ArrayView] = []
        for b in self.live:
            ref = b.ref
            a = ref() if ref is not None else None
            if a is not None and a._hold:
                self.held[b.arena] = None
                self.held_views.add(a)
                assert ref is not None
                self.held_refs.append(ref)  # keep it: its callback releases the arena
            elif a is not None and a._views:
                vs = list(a._views)
                if vs:
                    self.held[b.arena] = None
                    views.extend(vs)
            b.live = False
            b.ref = None
        self.live.clear()
        self.slow_sizes.clear()
        self.free_pages.clear()
        self.acquired.clear()
        self.quarantine.clear()
        for al in self.aliases:
            al.page.aliases = ()
        self.aliases.clear()
        for st in self.streams.values():
            st.obj = None
        self.streams.clear()
        self.emptied.clear()
        self.n_free += self.n_live  # freed by the close (as the history records)
        self.mapped = self.n_live = self.requested = self.in_use = 0
        self.n_asleep = 0
        if views:
            logger.info(
                "close: %d arena(s) stay mapped until %d view(s) are gone", len(self.held), len(views)
            )
            for v in views:
                self.held_views.add(v)
                fin = weakref.finalize(v, release_held_quietly, self)
                fin.atexit = False

    def release_held(self) -> None:
        """After close: unmap and free the arenas views kept, once no view is left."""
        if not self.held or any(True for _ in self.held_views):
            return
        self.sync()  # rule 8: the views' last kernels may still run
        for arena in list(self.held):
            arena.res.close()  # unmaps and frees; pages' handles were released
            del self.held[arena]
            if arena in self.arenas:
                self.arenas.remove(arena)
        self.held_refs.clear()


def release_held_quietly(core: Core) -> None:
    """A view's (or held allocation's) finalizer after close: any thread, possibly inside the GC.

    Never blocks: the release is queued and done now if the lock is free, else
    by whichever thread holds the lock when it lets go (``Core.settle``), so it
    is never lost (issue 17 item 7: it used to be dropped when the lock was busy).
    Nothing in a forked child: the arenas are the parent's.
    """
    if core.forked:
        return
    core.pending.append(RELEASE_HELD)
    core.settle()


def _seq(b: Block) -> int:
    return b.seq


def _first(t: Any) -> int:
    return int(t[0])




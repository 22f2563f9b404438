"""A page pool that defragments by remapping.

Design note
===========

Physical memory is a set of *pages* of ``page_size`` bytes (default: the
device's minimum granularity, 2 MiB on current GPUs). Each page is its own
``cuMemCreate`` handle (driver rule 2: a handle is only ever mapped whole, at
offset 0), so any page can be unmapped and mapped anywhere else on its own.
Pages are created on demand up to ``limit`` (or up front with
``preallocate``) and reused; only :meth:`PagePool.trim` and
:meth:`PagePool.set_limit` give them back to the driver.

Virtual address space is reserved in *arenas* of twice the limit (VA is cheap
but finite: rule 10; a further arena is reserved only when no arena has a free
run long enough) and carved by the pool, first fit, page by page.

Two size classes
----------------
* **Large** requests (more than ``small_threshold`` = ``page_size // 2``
  bytes, 1 MiB for 2 MiB pages, PyTorch's small/large boundary too) get whole
  pages, mapped at consecutive addresses. Waste: the rounding up to a whole
  page, less than one page per allocation and less than half of what is
  mapped for it (the request is larger than half a page).
* **Small** requests (up to ``small_threshold``) are rounded up to 256 bytes
  (the alignment of every small pointer) and carved from *small pages*: one
  page at a time, owned by one stream, managed by best fit with splitting and
  coalescing, blocks never crossing a page. Waste: under 256 bytes per block
  for the rounding; a free remainder of a page too small for the request that
  opened the next page, under half a page (under a third when the blocks are
  all of one size), still usable by smaller requests; and, as with every
  allocator that cannot move live data, one live block pins its whole page
  (the "page rounding" the benchmarks report). A zero-byte request gets a
  256-byte block: a valid, unique, non-null pointer (like ``malloc(0)``), so
  CuPy's ``alloc(0)`` works.

Per-stream caches (the fast path)
---------------------------------
A freed large allocation stays mapped as a *cached range* in the cache of its
stream; a freed small block goes back to its page's free list. Both are reused
by best fit (exact-size bins, then ``bisect`` over the sorted sizes), split,
and coalesced with their neighbours (same stream, same arena / same page) on
free, all without a driver call. A small page whose blocks are all free stays
mapped (it is cached and *reclaimable*) until the pool needs its page for
something else. In a steady state of recurring sizes malloc and free make no
backend call at all.

Defragmentation by remapping
----------------------------
A large request the stream's cache cannot serve, or a new small page, needs
fresh pages mapped at a fresh virtual range. They come from, in this order:
the free pages; new pages, while the limit allows (a driver out-of-memory
stops creation); and then cached memory of any stream: cached ranges (largest
first, only as many pages as needed) and empty small pages are unmapped and
their scattered pages mapped, side by side, into one fresh range. A request
therefore fails only when the pages holding live data plus the request exceed
the limit (or the driver has no memory left). It then raises
:class:`~vmmpool.OutOfMemoryError` and the pool stays usable.

Page-level API
--------------
:meth:`PagePool.acquire_pages` lends whole unmapped pages (the same sources,
all or nothing) to a caller that maps them in its own reservations (a
growable buffer); they count as in use until :meth:`PagePool.release_pages`.

Stream rule
-----------
An allocation belongs to the stream it was made on, as in CuPy: memory freed
on a stream is reused at once by that stream (stream order makes it safe), and
never handed to another stream directly. Before the pool unmaps cached pages
(to remap them, in :meth:`~PagePool.defragment`, :meth:`~PagePool.trim`,
:meth:`~PagePool.set_limit`), it waits for the work of the streams that used
them with one synchronize of the device that owns the memory (rule 8, pytorch
#196258), once per reclaim. A device synchronize rather than one per stream:
it covers every stream, and stays safe when a stream was destroyed while its
freed memory sat in the cache (synchronizing a destroyed handle is undefined;
CuPy destroys a ``Stream`` in ``__del__``). Pages reach another stream only
unmapped and so only after that wait. ``close()`` synchronizes the device once.

Remapping changes what backs an address (rule 12): a freed range is the only
thing ever remapped, so live pointers never move, but anything that
registered a *freed* range by address (CUDA graphs, NCCL registration, IPC
peers) must not keep using it.

Invariants (checked by ``tests/test_pool_stateful.py``)
-------------------------------------------------------
1. Every page is in exactly one state: free (unmapped), mapped (in a live
   allocation, a small page or a cached range), acquired (lent to a caller of
   :meth:`~PagePool.acquire_pages`) or quarantined; ``free + mapped + acquired
   + quarantined == total``.
2. ``total_pages * page_size`` never exceeds the limit, except after the limit
   was lowered below what is in use (pages freed above it are given back at
   the next free, malloc or stats).
3. Live allocations never overlap; a live allocation's pages stay mapped at
   the same addresses, with the same bytes, until it is freed.
4. Every mapped page has read-write access for the owning device and the
   peers; a range is never left half mapped.
5. A multi-step operation that fails (driver error, out of memory) changes no
   allocation. Pages it created stay as free pages; cached ranges it already
   unmapped stay free pages. Nothing leaks, no range is half mapped, and the
   statistics stay consistent. (If even the undo fails, the pages concerned
   are *quarantined*: never reused, released by ``close()``.)
6. ``in_use_bytes + cached_bytes == mapped_pages * page_size`` (acquired pages
   are counted in ``in_use_bytes`` besides).
7. Cached memory is never unmapped or handed to another stream before the
   device that owns it was synchronized.
8. A request fails only if ``pinned_pages + pages needed > limit // page_size``
   (or the driver itself is out of memory).

Lifetime
--------
An :class:`Allocation` keeps its pool object alive; the pool's driver
resources are released by :meth:`PagePool.close` (or when the pool and every
allocation are garbage). ``close()`` invalidates live allocations: their
pointers dangle, ``free()`` becomes a no-op and ``freed`` is True. An
allocation that is garbage collected without ``free()`` is freed as a safety
net (from a weak-reference callback that holds only the pool's internal state;
nothing happens at interpreter shutdown or after close). The callback may run
in any thread at any time, so it only queues the block; the queue is drained
under the pool's lock at the next pool call. A garbage-collected
:class:`~vmmpool.GrowableBuffer` that took pages from the pool queues its
release with ``PagePool._defer``; the next public call runs it before taking
the lock. Nothing a finalizer runs ever blocks on the pool's lock.

``close()`` keeps mapped the arenas of allocations that views (arrays, DLPack
capsules) or CuPy arrays still use, until the last of them dies; it is
resumable after a failed release.

Thread safety: one ``threading.Lock`` per pool guards all state; driver calls
on the slow path are made under it.
"""

from __future__ import annotations

import bisect
import collections
import gc
import itertools
import logging
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Union

from numpy.typing import DTypeLike

from ._device import Device, DeviceLike
from ._dlpack import ArrayView
from ._errors import ClosedError, DriverError, OutOfMemoryError
from ._observe import AllocationInfo, History, format_summary, torch_snapshot
from ._options import check_int, stream_key
from ._resources import AddressReservation, ClosesOnExit, PhysicalAllocation, check_peers, create, reserve

__all__ = ["ALIGNMENT", "Allocation", "AllocationInfo", "PageInfo", "PagePool", "PoolStats"]

logger = logging.getLogger("vmmpool.pool")

#: Alignment (and rounding) of small allocations, in bytes.
ALIGNMENT = 256

#: Arenas reserve this many times the limit of virtual address space.
_ARENA_FACTOR = 2
#: ... and at least this many pages.
_ARENA_MIN_PAGES = 64

# Page states.
_FREE = "free"
_MAPPED = "mapped"
_ACQUIRED = "acquired"
_QUARANTINED = "quarantined"


# ------------------------------------------------------------- public records
@dataclass(frozen=True, repr=False)
class PoolStats:
    """A snapshot of a :class:`PagePool`'s accounting (all sizes in bytes), in PyTorch's terms.

    PyTorch equivalents (``torch.cuda.*``):

    - ``memory_allocated()``: ``in_use_bytes`` (with rounding); its
      ``memory_stats()["requested_bytes.all.current"]``: ``allocated_bytes``.
    - ``memory_reserved()``: ``reserved_bytes``; ``max_memory_reserved()``:
      ``peak_reserved_bytes``; ``max_memory_allocated()``: ``peak_in_use_bytes``.
    - ``memory_reserved() - memory_allocated()``: ``cached_bytes +
      free_pages * page_size``.

    Attributes
    ----------
    allocated_bytes : int
        Sum of the sizes asked for by live allocations (what the program allocated).
    in_use_bytes : int
        Live allocations with their rounding (256 bytes for small, whole pages
        for large), plus pages lent by :meth:`PagePool.acquire_pages`.
    reserved_bytes : int
        Physical memory the pool holds: ``total_pages * page_size`` (PyTorch's
        "reserved"; the driver allocations the pool owns, mapped or not).
    cached_bytes : int
        Reserved, mapped and free: cached ranges and free blocks of small pages.
    cached_blocks : int
        Number of cached ranges plus free small blocks.
    free_pages : int
        Pages owned by the pool, unmapped and unused.
    total_pages : int
        Pages owned by the pool (each one driver allocation).
    page_size : int
        Bytes per page.
    limit : int
        The pool's limit on reserved memory.
    peak_allocated_bytes, peak_in_use_bytes, peak_reserved_bytes : int
        Highest values of allocated, in-use and reserved bytes.
    n_malloc, n_free : int
        Successful mallocs and frees (a garbage-collected allocation counts).
    n_page_creations : int
        Pages created (driver allocations).
    n_remaps : int
        Requests served by unmapping cached pages and mapping them into a new
        range (the defragmentation slow path).
    n_ooms : int
        Requests that raised :class:`~vmmpool.OutOfMemoryError`.
    largest_allocatable : int
        The largest single ``malloc`` that can succeed now without exceeding
        the limit: ``(limit // page_size - pinned_pages) * page_size`` (free,
        reclaimable and still creatable pages), or the largest free small block
        when no page is left. The driver may have less (other processes).
    live_allocations : int
        Allocations not yet freed.
    mapped_pages : int
        Pages mapped in the pool's address space (live, small and cached).
    pinned_pages : int
        Pages that cannot be reclaimed: in live large allocations, small pages
        with a live block, acquired and quarantined pages.
    reclaimable_pages : int
        Cached ranges' pages plus empty small pages.
    acquired_pages : int
        Pages lent by :meth:`PagePool.acquire_pages`.
    small_pages : int
        Pages carved into small blocks (with or without live blocks).
    quarantined_pages : int
        Pages whose undo failed after a driver error; never reused.
    address_space_bytes : int
        Virtual address space reserved (``cuMemAddressReserve``) for the pool's
        arenas. Addresses, not memory.
    n_page_releases : int
        Pages given back to the driver.
    n_reclaimed_pages : int
        Cached pages unmapped (remap, defragment, trim, set_limit).
    n_syncs : int
        Stream / device synchronizations made by the pool.
    """

    allocated_bytes: int
    in_use_bytes: int
    cached_bytes: int
    cached_blocks: int
    free_pages: int
    total_pages: int
    page_size: int
    limit: int
    peak_allocated_bytes: int
    peak_in_use_bytes: int
    peak_reserved_bytes: int
    n_malloc: int
    n_free: int
    n_page_creations: int
    n_remaps: int
    n_ooms: int
    largest_allocatable: int
    live_allocations: int = 0
    mapped_pages: int = 0
    pinned_pages: int = 0
    reclaimable_pages: int = 0
    acquired_pages: int = 0
    small_pages: int = 0
    quarantined_pages: int = 0
    address_space_bytes: int = 0
    n_page_releases: int = 0
    n_reclaimed_pages: int = 0
    n_syncs: int = 0

    @property
    def reserved_bytes(self) -> int:
        """``total_pages * page_size``: physical memory the pool holds (PyTorch's "reserved")."""
        return self.total_pages * self.page_size

    def __repr__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / (1 << 20):.1f} MiB"

        return (
            f"PoolStats(allocated {mib(self.allocated_bytes)}, in use {mib(self.in_use_bytes)}, "
            f"reserved {mib(self.reserved_bytes)} ({self.total_pages} pages: {self.mapped_pages} mapped, "
            f"{self.free_pages} free), cached {mib(self.cached_bytes)} in {self.cached_blocks} blocks, "
            f"limit {mib(self.limit)}; peaks: allocated {mib(self.peak_allocated_bytes)}, "
            f"in use {mib(self.peak_in_use_bytes)}, reserved {mib(self.peak_reserved_bytes)}; "
            f"{self.live_allocations} live, {self.n_malloc} mallocs, {self.n_free} frees, "
            f"{self.n_page_creations} pages created, {self.n_remaps} remaps, {self.n_syncs} syncs, "
            f"{self.n_ooms} OOMs)"
        )


@dataclass(frozen=True)
class PageInfo:
    """One physical page of a :meth:`PagePool.snapshot`.

    Attributes
    ----------
    index : int
        The physical page: its creation number (stable for its life).
    state : str
        ``"free"`` (unmapped), ``"in_use"`` (holds live data), ``"cached"``
        (mapped, free, reusable at once), ``"acquired"`` (lent out by
        :meth:`PagePool.acquire_pages`) or ``"quarantined"``.
    address : int or None
        The virtual address where it is mapped in the pool's address space;
        ``None`` when unmapped (free, acquired).
    stream : int or None
        Stream key of the allocation(s) or cache that have the page.
    kind : str or None
        ``"large"`` (part of one large allocation or cached range),
        ``"small"`` (carved into small blocks) or ``None``.
    allocations : tuple of AllocationInfo
        The live allocations on this page: address, size (with rounding),
        requested size and stream. A large allocation is listed on each of
        its pages.
    used_bytes : int
        Bytes of this page that live allocations asked for.
    """

    index: int
    state: str
    address: int | None
    stream: int | None = None
    kind: str | None = None
    allocations: tuple[AllocationInfo, ...] = ()
    used_bytes: int = 0


# ------------------------------------------------------------ internal records
class _Page:
    __slots__ = ("phys", "index", "state", "addr", "stream")

    def __init__(self, phys: PhysicalAllocation, index: int) -> None:
        self.phys = phys
        self.index = index
        self.state = _FREE
        self.addr: int | None = None
        self.stream: int | None = None


class _Arena:
    """One address reservation, carved page by page (first fit, coalescing)."""

    __slots__ = ("res", "base", "npages", "slots", "fstarts", "flen", "fend")

    def __init__(self, res: AddressReservation, page_size: int) -> None:
        self.res = res
        self.base = res.address
        self.npages = res.size // page_size
        self.slots: list[_Page | None] = [None] * self.npages
        self.fstarts = [0]  # sorted starts of free extents
        self.flen = {0: self.npages}  # start -> length
        self.fend = {self.npages: 0}  # end -> start

    def take(self, n: int) -> int | None:
        for i, s in enumerate(self.fstarts):
            ln = self.flen[s]
            if ln >= n:
                del self.flen[s]
                if ln > n:
                    self.fstarts[i] = s + n
                    self.flen[s + n] = ln - n
                    self.fend[s + ln] = s + n
                else:
                    del self.fstarts[i]
                    del self.fend[s + ln]
                return s
        return None

    def give(self, s: int, n: int) -> None:
        e = s + n
        ps = self.fend.pop(s, None)
        if ps is not None:
            del self.flen[ps]
            del self.fstarts[bisect.bisect_left(self.fstarts, ps)]
            s = ps
        nl = self.flen.pop(e, None)
        if nl is not None:
            del self.fend[e + nl]
            del self.fstarts[bisect.bisect_left(self.fstarts, e)]
            e += nl
        bisect.insort(self.fstarts, s)
        self.flen[s] = e - s
        self.fend[e] = s

    @property
    def empty(self) -> bool:
        return self.flen.get(0) == self.npages

    def largest_free(self) -> int:
        return max(self.flen.values(), default=0)


class _Stream:
    """The caches of one stream: small free blocks and cached ranges."""

    __slots__ = ("key", "sbins", "ssizes", "lbins", "lsizes", "by_start", "by_end")

    def __init__(self, key: int) -> None:
        self.key = key
        self.sbins: dict[int, dict[_Block, None]] = {}  # block size -> free blocks
        self.ssizes: list[int] = []  # sorted keys of sbins (bins may be empty)
        self.lbins: dict[int, dict[_Range, None]] = {}  # page count -> cached ranges
        self.lsizes: list[int] = []  # sorted keys of lbins (bins may be empty)
        self.by_start: dict[int, _Range] = {}  # address -> cached range
        self.by_end: dict[int, _Range] = {}  # end address -> cached range

    def add_block(self, b: _Block) -> None:
        bin_ = self.sbins.get(b.size)
        if bin_ is None:
            self.sbins[b.size] = bin_ = {}
            bisect.insort(self.ssizes, b.size)
        bin_[b] = None

    def add_range(self, r: _Range, end: int) -> None:
        bin_ = self.lbins.get(r.n)
        if bin_ is None:
            self.lbins[r.n] = bin_ = {}
            bisect.insort(self.lsizes, r.n)
        bin_[r] = None
        self.by_start[r.addr] = r
        self.by_end[end] = r

    def remove_range(self, r: _Range, end: int) -> None:
        del self.lbins[r.n][r]
        del self.by_start[r.addr]
        del self.by_end[end]

    def prune(self) -> None:
        """Drop empty bins (they are otherwise dropped lazily by best-fit scans)."""
        for sz in [s for s, b in self.sbins.items() if not b]:
            del self.sbins[sz]
        self.ssizes = sorted(self.sbins)
        for n in [s for s, b in self.lbins.items() if not b]:
            del self.lbins[n]
        self.lsizes = sorted(self.lbins)


class _SmallPage:
    __slots__ = ("arena", "slot", "addr", "stream", "n_live", "first")

    def __init__(self, arena: _Arena, slot: int, addr: int, stream: _Stream) -> None:
        self.arena = arena
        self.slot = slot
        self.addr = addr
        self.stream = stream
        self.n_live = 0
        self.first: _Block | None = None


class _Block:
    """A small block: live (an allocation) or free (in its stream's bins)."""

    __slots__ = ("spage", "addr", "size", "prev", "next", "live", "nbytes", "ref")

    def __init__(
        self, spage: _SmallPage, addr: int, size: int, prev: _Block | None, nxt: _Block | None
    ) -> None:
        self.spage = spage
        self.addr = addr
        self.size = size
        self.prev = prev
        self.next = nxt
        self.live = False
        self.nbytes = 0
        self.ref: _Ref | None = None


class _Range:
    """Consecutive pages of one arena: a live large allocation or a cached range."""

    __slots__ = ("arena", "slot", "n", "addr", "stream", "live", "nbytes", "ref")

    def __init__(self, arena: _Arena, slot: int, n: int, addr: int, stream: _Stream) -> None:
        self.arena = arena
        self.slot = slot
        self.n = n
        self.addr = addr
        self.stream = stream
        self.live = False
        self.nbytes = 0
        self.ref: _Ref | None = None


_Rec = Union[_Block, _Range]  # noqa: UP007 - a runtime alias on Python 3.10


def _range_len(r: _Range) -> int:
    return r.n


class _Ref(weakref.ref):
    """Weak reference to an Allocation; its callback frees the block (safety net).

    Cheaper than ``weakref.finalize`` (about 0.15 versus 0.9 microseconds per
    allocation) with the same guarantees: it holds the pool's internal state
    and the block, never the Allocation, and does nothing at shutdown.
    """

    __slots__ = ("rec", "core")

    rec: _Rec
    core: _Core


def _collected(ref: _Ref) -> None:
    # Runs in whatever thread dropped the last reference, possibly while that
    # thread holds the pool's lock: queue, and drain only if the lock is free.
    try:
        if sys.is_finalizing():
            return
        core = ref.core
        if core.closed:
            if core.held:
                _release_held(core)
            return
        core.pending.append(ref)
        if core.lock.acquire(False):
            try:
                core.drain()
            finally:
                core.lock.release()
            if core.want_close:
                _close_quietly(core)
    except Exception:  # noqa: BLE001 - a safety net must never raise
        pass


# ------------------------------------------------------------------- the core
class _Core:
    """All state of a pool: what finalizers and GC callbacks may hold."""

    def __init__(
        self,
        device: Device,
        page_size: int,
        max_pages: int,
        small_threshold: int,
        access_devices: tuple[int, ...],
    ) -> None:
        self.lock = threading.Lock()
        self.device = device
        self.P = page_size
        self.max_pages = max_pages
        self.T = small_threshold
        # Requests up to this are small; -1 when there is no small class.
        self.small_max = small_threshold if small_threshold else -1
        self.peers = access_devices[1:]
        self.closed = False
        self.pending: collections.deque[_Ref] = collections.deque()
        # Work that finalizers queued and that needs the backend or the lock
        # (a garbage-collected GrowableBuffer's release): run by the next
        # public call, before it takes the lock, never from a finalizer.
        self.tasks: collections.deque[Callable[[], object]] = collections.deque()
        # Set by the pool's finalizer when the lock was busy; the next drain closes.
        self.want_close = False
        # After close: arenas kept mapped for views that still use them.
        self.held: dict[_Arena, None] = {}
        self.held_views: weakref.WeakSet[ArrayView | Allocation] = weakref.WeakSet()
        self.synced = False
        self.held_refs: list[_Ref] = []
        self.index = itertools.count()
        # pages
        self.pages: dict[PhysicalAllocation, _Page] = {}
        self.free_pages: list[_Page] = []
        self.acquired: dict[_Page, None] = {}
        self.quarantine: dict[_Page, None] = {}
        # address space and what is mapped there
        self.arenas: list[_Arena] = []
        self.streams: dict[int, _Stream] = {}
        self.live_ranges: dict[_Range, None] = {}
        self.small_pages: dict[_SmallPage, None] = {}
        self.empty_small: dict[_SmallPage, None] = {}
        # accounting
        self.live_large_pages = 0
        self.n_live = 0
        self.requested = 0
        self.in_use = 0
        self.peak_requested = 0
        self.peak_in_use = 0
        self.peak_total = 0
        self.n_malloc = 0
        self.n_free = 0
        self.n_created = 0
        self.n_released = 0
        self.n_remaps = 0
        self.n_ooms = 0
        self.n_reclaimed = 0
        self.n_syncs = 0
        # Allocations and buffers that garbage collection gave back (see _collect_garbage).
        self.n_garbage = 0
        # PagePool.record_history: None when off (one attribute test per malloc / free).
        self.history: History | None = None

    # ----------------------------------------------------------- accounting
    def pinned(self) -> int:
        return (
            self.live_large_pages
            + len(self.small_pages)
            - len(self.empty_small)
            + len(self.acquired)
            + len(self.quarantine)
        )

    def cached_range_pages(self) -> int:
        return sum(r.n for st in self.streams.values() for r in st.by_start.values())

    def cached_bytes(self) -> int:
        """Mapped but free bytes, as :meth:`PagePool.stats` reports them."""
        small = sum(sz * len(b) for st in self.streams.values() for sz, b in st.sbins.items())
        return self.cached_range_pages() * self.P + small

    def _oom(self, nbytes: int, n: int, why: str = "") -> OutOfMemoryError:
        # Built from the state the caller leaves behind (after any undo), so
        # that it agrees with a stats() taken right after.
        self.n_ooms += 1
        P = self.P
        pinned = self.pinned()
        reclaimable = self.cached_range_pages() + len(self.empty_small)
        cached = self.cached_bytes()
        msg = (
            f"page pool on {self.device}: {nbytes} bytes requested ({n} page(s) of {P} bytes); "
            f"in use {self.in_use} bytes, cached {cached} bytes, {pinned} of "
            f"{self.max_pages} pages hold live data, {reclaimable} cached page(s) reclaimable, "
            f"{len(self.free_pages)} free"
        )
        if why:
            msg = f"{msg}; {why}"
        logger.info("out of memory: %s", msg)
        return OutOfMemoryError(nbytes, self.in_use, self.max_pages * P, cached=cached, message=msg)

    def over_limit(self) -> bool:
        return len(self.pages) > self.max_pages

    def enforce_limit(self) -> None:
        """Give pages above the limit back (after the limit was lowered); lock held.

        Free pages first, then cached ones (device synchronized, unmapped).
        Best effort: a failure is logged and retried by the next operation.
        """
        try:
            excess = len(self.pages) - self.max_pages
            if excess > 0:
                excess -= self.release_free(excess)
            if excess > 0 and self.reclaim(excess):
                self.release_free(excess)
        except Exception:
            logger.warning("giving pages above the limit back failed; retried later", exc_info=True)

    def _note_peaks(self) -> None:
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested
        if self.in_use > self.peak_in_use:
            self.peak_in_use = self.in_use

    def _sync(self) -> None:
        """Wait for all work on the device that owns the memory (rule 8)."""
        self.n_syncs += 1
        self.device.synchronize(None)

    def _stream(self, key: int) -> _Stream:
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = _Stream(key)
        return st

    def drain(self) -> None:
        """Free the allocations the garbage collector queued (lock held)."""
        pending = self.pending
        while pending:
            try:
                ref = pending.popleft()
            except IndexError:  # pragma: no cover - emptied by another drain
                break
            rec = ref.rec
            if rec.live and rec.ref is ref and not self.closed:
                self.free_rec(rec)
                self.n_garbage += 1

    def run_tasks(self) -> None:
        """Run the work finalizers deferred (lock NOT held: a task may call the pool)."""
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

    # --------------------------------------------------------------- malloc
    def malloc(self, nbytes: int, key: int) -> _Rec:
        if self.tasks:
            self.run_tasks()
        with self.lock:
            if self.pending:
                self.drain()
            if self.closed:
                raise ClosedError("PagePool")
            if len(self.pages) > self.max_pages:
                self.enforce_limit()
            st = self.streams.get(key)
            if st is None:
                st = self._stream(key)
            rec: _Rec
            if nbytes <= self.small_max:
                rec = self._malloc_small(st, ((nbytes + 255) >> 8) << 8 or ALIGNMENT, nbytes)
            else:
                rec = self._malloc_large(st, nbytes)
            rec.live = True
            rec.nbytes = nbytes
            self.n_live += 1
            self.n_malloc += 1
            self.requested += nbytes
            self._note_peaks()
            if self.history is not None:
                self.history.record("alloc", rec.addr, nbytes, key)
            return rec

    def _malloc_small(self, st: _Stream, r: int, nbytes: int) -> _Block:
        bin_ = st.sbins.get(r)
        if bin_:
            b = bin_.popitem()[0]
        else:
            fit = self._small_fit(st, r)
            b = self._new_small_page(st, nbytes) if fit is None else fit
            if b.size > r:  # split: the tail stays free
                rest = _Block(b.spage, b.addr + r, b.size - r, b, b.next)
                if b.next is not None:
                    b.next.prev = rest
                b.next = rest
                b.size = r
                st.add_block(rest)
        sp = b.spage
        if not sp.n_live:
            del self.empty_small[sp]
        sp.n_live += 1
        self.in_use += r
        return b

    @staticmethod
    def _small_fit(st: _Stream, r: int) -> _Block | None:
        sizes = st.ssizes
        bins = st.sbins
        i = bisect.bisect_left(sizes, r)
        while i < len(sizes):
            sz = sizes[i]
            bin_ = bins[sz]
            if bin_:
                return bin_.popitem()[0]
            del bins[sz]
            del sizes[i]
        return None

    def _new_small_page(self, st: _Stream, nbytes: int) -> _Block:
        """A fresh small page for `st`; returns its whole-page free block (not in bins)."""
        rng = self._large_fit(st, 1)
        if rng is not None:
            arena, slot, addr = rng.arena, rng.slot, rng.addr
        else:
            arena, slot = self._fresh(st, 1, nbytes)
            addr = arena.base + slot * self.P
        sp = _SmallPage(arena, slot, addr, st)
        b = _Block(sp, addr, self.P, None, None)
        sp.first = b
        self.small_pages[sp] = None
        self.empty_small[sp] = None
        return b

    def _malloc_large(self, st: _Stream, nbytes: int) -> _Range:
        P = self.P
        n = -(-nbytes // P) or 1
        bin_ = st.lbins.get(n)
        if bin_:
            rng = bin_.popitem()[0]
            del st.by_start[rng.addr]
            del st.by_end[rng.addr + n * P]
        else:
            found = self._large_fit(st, n)
            if found is None:
                arena, slot = self._fresh(st, n, nbytes)
                found = _Range(arena, slot, n, arena.base + slot * P, st)
            rng = found
        self.live_ranges[rng] = None
        self.live_large_pages += n
        self.in_use += n * P
        return rng

    def _large_fit(self, st: _Stream, n: int) -> _Range | None:
        """Best fit among `st`'s cached ranges; split off the front `n` pages."""
        sizes = st.lsizes
        bins = st.lbins
        i = bisect.bisect_left(sizes, n)
        while i < len(sizes):
            sz = sizes[i]
            bin_ = bins[sz]
            if bin_:
                big = bin_.popitem()[0]
                del st.by_start[big.addr]
                if sz == n:
                    del st.by_end[big.addr + n * self.P]
                    return big
                rng = _Range(big.arena, big.slot, n, big.addr, st)
                big.slot += n
                big.n -= n
                big.addr += n * self.P
                # by_end still maps big's (unchanged) end to big.
                nbin = bins.get(big.n)
                if nbin is None:
                    bins[big.n] = nbin = {}
                    bisect.insort(sizes, big.n)
                nbin[big] = None
                st.by_start[big.addr] = big
                return rng
            del bins[sz]
            del sizes[i]
        return None

    # ----------------------------------------------------------------- free
    def free_rec(self, rec: _Rec) -> None:
        """Return a live block or range to its stream's cache (lock held)."""
        if not rec.live:
            raise ValueError(f"allocation at {rec.addr:#x} was already freed")
        rec.live = False
        rec.ref = None
        self.n_live -= 1
        self.n_free += 1
        self.requested -= rec.nbytes
        if self.history is not None:
            # Freed memory is reused in stream order at once: requested and completed together.
            key = rec.spage.stream.key if isinstance(rec, _Block) else rec.stream.key
            self.history.record("free_requested", rec.addr, rec.nbytes, key)
            self.history.record("free_completed", rec.addr, rec.nbytes, key)
        if isinstance(rec, _Block):
            self._free_small(rec)
        else:
            self._free_large(rec)

    def free(self, rec: _Rec, owner: Allocation) -> None:
        if self.tasks:
            self.run_tasks()
        with self.lock:
            if self.pending:
                self.drain()
            if self.closed:
                return
            ref = rec.ref
            if ref is None or ref() is not owner:
                # Freed already (by a racing thread; the block may even serve
                # another allocation by now): never touch it.
                raise ValueError(f"allocation at {rec.addr:#x} was already freed")
            self.free_rec(rec)
            if len(self.pages) > self.max_pages:
                self.enforce_limit()

    def _free_small(self, b: _Block) -> None:
        self.in_use -= b.size
        sp = b.spage
        st = sp.stream
        nxt = b.next
        if nxt is not None and not nxt.live:
            del st.sbins[nxt.size][nxt]
            b.size += nxt.size
            b.next = nxt = nxt.next
            if nxt is not None:
                nxt.prev = b
        prv = b.prev
        if prv is not None and not prv.live:
            del st.sbins[prv.size][prv]
            prv.size += b.size
            prv.next = nxt = b.next
            if nxt is not None:
                nxt.prev = prv
            b = prv
        st.add_block(b)
        sp.n_live -= 1
        if not sp.n_live:
            self.empty_small[sp] = None

    def _free_large(self, rng: _Range) -> None:
        P = self.P
        del self.live_ranges[rng]
        self.live_large_pages -= rng.n
        self.in_use -= rng.n * P
        st = rng.stream
        prev = st.by_end.get(rng.addr)
        if prev is not None and prev.arena is rng.arena:
            st.remove_range(prev, rng.addr)
            rng.addr = prev.addr
            rng.slot = prev.slot
            rng.n += prev.n
        end = rng.addr + rng.n * P
        nxt = st.by_start.get(end)
        if nxt is not None and nxt.arena is rng.arena:
            nend = end + nxt.n * P
            st.remove_range(nxt, nend)
            rng.n += nxt.n
            end = nend
        st.add_range(rng, end)

    # ------------------------------------------------------------ slow path
    def _fresh(self, st: _Stream, n: int, nbytes: int) -> tuple[_Arena, int]:
        """Map `n` pages at a fresh range for `st`; all-or-nothing."""
        if self.pinned() + n > self.max_pages:
            raise self._oom(nbytes, n, "the limit is reached")
        pages = self.gather(n, nbytes)
        try:
            return self._place(pages, st.key)
        except OutOfMemoryError:
            # The driver (or the OS under the emulator) ran out of what a
            # mapping needs: give the cached mappings back and try once more.
            if any(p.state is not _FREE for p in pages) or not (
                self.empty_small or any(st0.by_start for st0 in self.streams.values())
            ):
                self._unfree(pages)
                raise
            try:
                if not self.reclaim(None):
                    raise
                logger.info("map ran out of memory: reclaimed cached pages, retrying")
                return self._place(pages, st.key)
            except BaseException:
                self._unfree(pages)
                raise
        except BaseException:
            self._unfree(pages)
            raise

    def _unfree(self, pages: list[_Page]) -> None:
        for p in pages:
            if p.state is _FREE:  # quarantined ones stay out
                self.free_pages.append(p)

    def gather(self, n: int, nbytes: int) -> list[_Page]:
        """Take `n` pages out of the free set: free, created, or reclaimed (all-or-nothing)."""
        free = self.free_pages
        got = free[len(free) - min(n, len(free)) :]
        del free[len(free) - len(got) :]
        why = ""
        try:
            missing = min(n - len(got), self.max_pages - len(self.pages))
            if missing > 0:
                made = 0
                try:
                    for _ in range(missing):
                        got.append(self._create_page())
                        made += 1
                except OutOfMemoryError as err:  # the driver, not the pool, is out
                    why = f"the device is out of memory ({err})"
                finally:
                    if made:
                        logger.debug(
                            "created %d page(s) of %d bytes (%d of %d pages)",
                            made, self.P, len(self.pages), self.max_pages,
                        )
            if len(got) < n:
                reclaimed = self.reclaim(n - len(got))
                take = min(n - len(got), len(free))
                got.extend(free[len(free) - take :])
                del free[len(free) - take :]
                if reclaimed:
                    self.n_remaps += 1
                    logger.info(
                        "remap: unmapped %d cached page(s) to map a range of %d page(s)",
                        reclaimed, n,
                    )
        except BaseException:
            free.extend(got)
            raise
        if len(got) < n:
            free.extend(got)
            raise self._oom(nbytes, n, why or "no free, creatable or cached page left")
        return got

    def _create_page(self) -> _Page:
        phys = create(self.P, self.device)
        page = _Page(phys, next(self.index))
        self.pages[phys] = page
        self.n_created += 1
        total = len(self.pages) * self.P
        if total > self.peak_total:
            self.peak_total = total
        return page

    def _place(self, pages: list[_Page], key: int) -> tuple[_Arena, int]:
        """Map `pages` side by side at a fresh virtual range and grant access."""
        n = len(pages)
        P = self.P
        arena, slot = self._take_va(n)
        res = arena.res
        off = slot * P
        done = 0
        try:
            for p in pages:
                res.map(p.phys, off + done * P)
                done += 1
            res.set_access(off, n * P, "rw", self.peers)
        except BaseException:
            # Undo in reverse: one unmap for what was mapped, then the VA.
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
                            p.state = _QUARANTINED
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
            p.state = _MAPPED
            p.addr = base + i * P
            p.stream = key
            arena.slots[slot + i] = p
        return arena, slot

    def _take_va(self, n: int) -> tuple[_Arena, int]:
        for arena in self.arenas:
            s = arena.take(n)
            if s is not None:
                return arena, s
        want = max(_ARENA_FACTOR * self.max_pages, _ARENA_MIN_PAGES, n)
        P = self.P
        align = P if P & (P - 1) == 0 else 0  # pages aligned to their size when possible
        try:
            res = reserve(want * P, self.device, align)
        except (DriverError, OutOfMemoryError):
            if want == n:
                raise
            res = reserve(n * P, self.device, align)  # VA is finite: take what is needed
        arena = _Arena(res, self.P)
        self.arenas.append(arena)
        logger.debug("reserved an arena of %d bytes at %#x", res.size, res.address)
        s = arena.take(n)
        assert s is not None
        return arena, s

    def reclaim(self, need: int | None) -> int:
        """Unmap cached ranges / empty small pages into the free set.

        At least `need` pages (all with ``None``), largest ranges first and
        only as much of the last one as needed. The device is synchronized
        once, before the first unmap. Returns the pages reclaimed.
        """
        ranges = sorted(
            (r for st in self.streams.values() for r in st.by_start.values()),
            key=_range_len,
            reverse=True,
        )
        cands: list[_Range | _SmallPage] = [*ranges, *self.empty_small]
        chosen: list[tuple[_Range | _SmallPage, int]] = []
        total = 0
        for c in cands:
            if need is not None and total >= need:
                break
            k = c.n if isinstance(c, _Range) else 1
            if need is not None:
                k = min(k, need - total)
            chosen.append((c, k))
            total += k
        if not chosen:
            return 0
        # One device synchronize, not one per stream: a stream may have been
        # destroyed while its freed memory sat in the cache (CuPy destroys a
        # Stream in __del__), and synchronizing a destroyed handle is undefined.
        self._sync()
        got = 0
        for c, k in chosen:
            if isinstance(c, _Range):
                self._unmap_range(c, k)
            else:
                self._unmap_small(c)
            got += k
        return got

    def _unmap_slots(self, arena: _Arena, slot: int, k: int) -> None:
        arena.res.unmap(slot * self.P, k * self.P)
        for i in range(slot, slot + k):
            p = arena.slots[i]
            assert p is not None
            arena.slots[i] = None
            p.state = _FREE
            p.addr = None
            p.stream = None
            self.free_pages.append(p)
        arena.give(slot, k)
        self.n_reclaimed += k

    def _unmap_range(self, rng: _Range, k: int) -> None:
        """Unmap the last `k` pages of a cached range (the whole range if k == n)."""
        st = rng.stream
        P = self.P
        end = rng.addr + rng.n * P
        self._unmap_slots(rng.arena, rng.slot + rng.n - k, k)
        st.remove_range(rng, end)
        if k < rng.n:
            rng.n -= k
            st.add_range(rng, end - k * P)

    def _unmap_small(self, sp: _SmallPage) -> None:
        b = sp.first
        assert b is not None and not b.live and b.size == self.P
        self._unmap_slots(sp.arena, sp.slot, 1)
        del sp.stream.sbins[b.size][b]
        del self.small_pages[sp]
        del self.empty_small[sp]

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
        keep: list[_Arena] = []
        for i, arena in enumerate(self.arenas):
            if arena.empty:
                try:
                    arena.res.close()
                except BaseException:
                    self.arenas = keep + self.arenas[i:]
                    raise
            else:
                keep.append(arena)
        self.arenas = keep

    # ---------------------------------------------------------------- check
    def check(self) -> None:
        """Verify every internal invariant (tests and debugging; lock held)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"PagePool invariant broken: {msg}")

        P = self.P
        seen: dict[_Page, str] = {}

        def claim(p: _Page | None, where: str) -> None:
            if p is None:
                fail(f"{where}: an unmapped slot is in use")
                return
            if p in seen:
                fail(f"page {p.index} is both {seen[p]} and {where}")
            seen[p] = where

        for p in self.free_pages:
            if p.state is not _FREE or p.addr is not None:
                fail(f"free page {p.index} has state {p.state}, address {p.addr}")
            claim(p, "free")
        for p in self.acquired:
            if p.state is not _ACQUIRED:
                fail(f"acquired page {p.index} has state {p.state}")
            claim(p, "acquired")
        for p in self.quarantine:
            claim(p, "quarantined")
        occupied: dict[tuple[int, int], None] = {}

        def cover(arena: _Arena, slot: int, n: int, addr: int, where: str) -> None:
            if arena not in self.arenas:
                fail(f"{where} lies in an unknown arena")
            if addr != arena.base + slot * P or not 0 <= slot <= slot + n <= arena.npages:
                fail(f"{where}: address {addr:#x} / slot {slot}+{n} disagree")
            for s in range(slot, slot + n):
                p = arena.slots[s]
                claim(p, where)
                assert p is not None
                if p.state is not _MAPPED or p.addr != arena.base + s * P:
                    fail(f"page {p.index} in {where} has state {p.state}, address {p.addr}")
                occupied[(id(arena), s)] = None

        live_large = 0
        in_use = 0
        requested = 0
        n_live = 0
        for r in self.live_ranges:
            if not r.live or r.n < 1:
                fail(f"live range {r.addr:#x} is not live")
            cover(r.arena, r.slot, r.n, r.addr, f"live range {r.addr:#x}")
            live_large += r.n
            in_use += r.n * P
            requested += r.nbytes
            n_live += 1
        for key, st in self.streams.items():
            if st.key != key:
                fail(f"stream {key} is filed as {st.key}")
            if set(st.lsizes) != set(st.lbins) or st.lsizes != sorted(st.lsizes):
                fail(f"stream {key}: large size index out of date")
            if set(st.ssizes) != set(st.sbins) or st.ssizes != sorted(st.ssizes):
                fail(f"stream {key}: small size index out of date")
            binned = {r: None for n, b in st.lbins.items() for r in b if r.n == n}
            if set(binned) != set(st.by_start.values()) or len(binned) != sum(
                len(b) for b in st.lbins.values()
            ):
                fail(f"stream {key}: cached range bins disagree with the address index")
            for addr, r in st.by_start.items():
                end = r.addr + r.n * P
                if r.live or r.addr != addr or st.by_end.get(end) is not r or r.stream is not st:
                    fail(f"stream {key}: cached range {addr:#x} misfiled")
                nxt = st.by_start.get(end)
                if nxt is not None and nxt.arena is r.arena:
                    fail(f"stream {key}: cached ranges at {addr:#x} and {end:#x} not coalesced")
                cover(r.arena, r.slot, r.n, r.addr, f"cached range {addr:#x}")
            if len(st.by_end) != len(st.by_start):
                fail(f"stream {key}: end index has stale entries")
        small_live = 0
        binned_blocks = {
            b: st for st in self.streams.values() for sz, bn in st.sbins.items() for b in bn
            if b.size == sz
        }
        if len(binned_blocks) != sum(len(bn) for st in self.streams.values() for bn in st.sbins.values()):
            fail("a free small block is filed under the wrong size")
        free_blocks = 0
        for sp in self.small_pages:
            cover(sp.arena, sp.slot, 1, sp.addr, f"small page {sp.addr:#x}")
            b = sp.first
            if b is None or b.prev is not None:
                fail(f"small page {sp.addr:#x} has no first block")
            cur = sp.addr
            live = 0
            prev_free = False
            while b is not None:
                if b.spage is not sp or b.addr != cur or b.size <= 0 or b.size % ALIGNMENT:
                    fail(f"small page {sp.addr:#x}: block at {b.addr:#x} misplaced")
                if b.next is not None and b.next.prev is not b:
                    fail(f"small page {sp.addr:#x}: broken links at {b.addr:#x}")
                if b.live:
                    live += 1
                    in_use += b.size
                    small_live += b.size
                    requested += b.nbytes
                    n_live += 1
                    if b.nbytes > b.size:
                        fail(f"block {b.addr:#x} smaller than its request")
                    prev_free = False
                else:
                    if binned_blocks.get(b) is not sp.stream:
                        fail(f"free block {b.addr:#x} is not in its stream's bins")
                    if prev_free:
                        fail(f"small page {sp.addr:#x}: adjacent free blocks at {b.addr:#x}")
                    prev_free = True
                    free_blocks += 1
                cur += b.size
                b = b.next
            if cur != sp.addr + P:
                fail(f"small page {sp.addr:#x}: blocks cover {cur - sp.addr} of {P} bytes")
            if live != sp.n_live or (live == 0) != (sp in self.empty_small):
                fail(f"small page {sp.addr:#x}: live count {sp.n_live} != {live}")
        if free_blocks != len(binned_blocks):
            fail("the bins hold blocks of no small page")
        for sp in self.empty_small:
            if sp not in self.small_pages:
                fail("an empty small page is not a small page")
        for p in self.quarantine:
            if p.state is not _QUARANTINED:
                fail(f"quarantined page {p.index} has state {p.state}")
        for arena in self.arenas:
            free_slots = {s for st0, ln in arena.flen.items() for s in range(st0, st0 + ln)}
            if sum(arena.flen.values()) != len(free_slots):
                fail("arena free extents overlap")
            if arena.fstarts != sorted(arena.flen) or len(arena.fend) != len(arena.flen):
                fail("arena free extent index out of date")
            for s in range(arena.npages):
                used = (id(arena), s) in occupied or (
                    arena.slots[s] is not None and arena.slots[s] in self.quarantine
                )
                if used == (s in free_slots):
                    fail(f"arena slot {s}: in use {used} but free extent {s in free_slots}")
                if not used and arena.slots[s] is not None:
                    fail(f"arena slot {s} is free but names a page")
        if set(seen) != set(self.pages.values()):
            fail(f"{len(self.pages)} pages owned but {len(seen)} accounted for")
        in_use += len(self.acquired) * P
        if (live_large, in_use, requested, n_live) != (
            self.live_large_pages, self.in_use, self.requested, self.n_live
        ):
            fail(
                f"counters (large pages, in use, requested, live) are "
                f"{(self.live_large_pages, self.in_use, self.requested, self.n_live)}, "
                f"recount gives {(live_large, in_use, requested, n_live)}"
            )
        del small_live

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        """Release every driver resource; resumable after a failure.

        Live allocations are invalidated at once. An arena holding an
        allocation that a view (an array, a DLPack capsule) still uses stays
        mapped until the last such view is gone; its pages' handles are
        released now (the memory lives while mapped, rule 7). If a release
        fails, the error propagates and calling ``close()`` again resumes.
        """
        with self.lock:
            if self.closed and not self.arenas and not self.pages:
                return
            if not self.closed:
                self.closed = True
                self.pending.clear()
                self._invalidate()
            errors: list[BaseException] = []
            if self.held:
                try:
                    self.release_held()
                except Exception as err:  # noqa: BLE001 - keep releasing
                    errors.append(err)
            if not self.synced and self.arenas:
                try:  # rule 8: nothing is unmapped under running kernels
                    self._sync()
                    self.synced = True
                except Exception as err:  # noqa: BLE001 - keep releasing
                    errors.append(err)
            keep: list[_Arena] = []
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
        if errors:
            raise errors[0]

    def _invalidate(self) -> None:
        """First close: mark every live block dead, note the arenas views still use."""
        views: list[ArrayView] = []

        def note(rec: _Rec, arena: _Arena) -> None:
            ref = rec.ref
            a = ref() if ref is not None else None
            if a is not None and a._hold:
                self.held[arena] = None
                self.held_views.add(a)
                assert ref is not None
                self.held_refs.append(ref)  # keep it: its callback releases the arena
            elif a is not None and a._views:
                vs = list(a._views)
                if vs:
                    self.held[arena] = None
                    views.extend(vs)
            rec.live = False
            rec.ref = None

        for rng in self.live_ranges:
            note(rng, rng.arena)
        for sp in self.small_pages:
            b = sp.first
            while b is not None:
                if b.live:
                    note(b, sp.arena)
                b = b.next
        self.free_pages.clear()
        self.acquired.clear()
        self.quarantine.clear()
        self.streams.clear()
        self.live_ranges.clear()
        self.small_pages.clear()
        self.empty_small.clear()
        self.live_large_pages = self.n_live = self.requested = self.in_use = 0
        if views:
            logger.info(
                "close: %d arena(s) stay mapped until %d view(s) are gone", len(self.held), len(views)
            )
            for v in views:
                self.held_views.add(v)
                fin = weakref.finalize(v, _release_held, self)
                fin.atexit = False

    def release_held(self) -> None:
        """After close: unmap and free the arenas views kept, once no view is left."""
        if not self.held or any(True for _ in self.held_views):
            return
        self._sync()  # rule 8: the views' last kernels may still run
        for arena in list(self.held):
            arena.res.close()  # unmaps and frees; pages' handles were released
            del self.held[arena]
            if arena in self.arenas:
                self.arenas.remove(arena)
        self.held_refs.clear()


def _release_held(core: _Core) -> None:
    # A view's finalizer after close (any thread, possibly inside the GC):
    # never block; a concurrent close() retry releases what is left.
    try:
        if core.lock.acquire(False):
            try:
                core.release_held()
            finally:
                core.lock.release()
    except Exception:
        logger.error("releasing an arena after close failed", exc_info=True)


def _collect_garbage(core: _Core) -> bool:
    """After an out-of-memory: collect reference cycles that may hold this pool's memory.

    Runs the cyclic garbage collector (never under the pool's lock), then the releases its
    finalizers deferred. Returns True when garbage gave memory back to this pool since the
    failure (an allocation or a buffer's pages in a cycle, released by this thread or by
    another), so the caller retries once; the failed attempt is then not counted in
    ``n_ooms``. Garbage that held none of this pool's memory changes nothing.
    """
    before = core.n_garbage
    gc.collect()
    if core.tasks:
        core.run_tasks()
    with core.lock:
        if core.pending and not core.closed:
            core.drain()
        if core.n_garbage == before:
            return False
        core.n_ooms -= 1
    return True


def _close_quietly(core: _Core) -> None:
    # The pool's finalizer: may run from the garbage collector inside a locked
    # section of this very pool (a drain): never block on the lock.
    try:
        if core.lock.acquire(False):
            core.lock.release()
            core.close()
        else:
            core.want_close = True
    except Exception:  # noqa: BLE001 - finalizer: never raise
        pass


# ------------------------------------------------------------------ Allocation
class Allocation:
    """Memory from :meth:`PagePool.malloc`.

    Attributes
    ----------
    ptr : int
        Device address of the first byte (256-byte aligned; page-aligned for
        large allocations).
    size : int
        Bytes requested (the pool may have rounded up; see :class:`PoolStats`).
    device : Device
        Where the memory lives.
    stream : int
        Stream key it belongs to (see :func:`stream_key`).
    pool : PagePool
        The pool (kept alive by the allocation).

    Notes
    -----
    Free it with :meth:`free`, ``pool.free(a)`` or a ``with`` block. If it is
    garbage collected first, the pool frees it then, exactly as :meth:`free`
    would (stream-ordered: the memory goes back to its stream's cache); the
    CuPy integration relies on this. After ``pool.close()`` the pointer
    dangles and :meth:`free` does nothing.
    """

    __slots__ = ("ptr", "size", "device", "stream", "pool", "_rec", "_views", "_hold", "__weakref__")

    ptr: int
    size: int
    device: Device
    stream: int
    pool: PagePool
    _rec: _Rec | None
    _views: weakref.WeakSet[ArrayView] | None
    #: True when something outside the pool uses the memory for as long as the
    #: object lives (CuPy's ``UnownedMemory``): ``close()`` then keeps it mapped.
    _hold: bool

    @property
    def address(self) -> int:
        """Device address of the first byte: the same as :attr:`ptr` (CuPy's spelling)."""
        return self.ptr

    def free(self) -> None:
        """Give the memory back to the pool (its stream's cache).

        Raises
        ------
        ValueError
            If it was already freed.
        BufferError
            If a view (or an array or DLPack capsule made from one) still uses
            the memory: drop it first. The allocation stays valid.
        """
        rec = self._rec
        if rec is None:
            raise ValueError(
                f"allocation of {self.size} bytes at {self.ptr:#x} was already freed"
            )
        if self._views:
            raise BufferError(
                f"allocation at {self.ptr:#x} has {len(self._views)} live view(s) "
                "(arrays or DLPack capsules made from them use the memory); drop them first"
            )
        self._rec = None
        self.pool._core.free(rec, self)

    def view(
        self, dtype: DTypeLike = "uint8", shape: int | Sequence[int] | None = None, offset: int = 0
    ) -> ArrayView:
        """A typed view of the allocation that exports DLPack and the array interfaces.

        Parameters
        ----------
        dtype : dtype-like
            Element type (bool, int8..int64, uint8..uint64, float16/32/64, complex64/128).
        shape : int or sequence of int, optional
            Default: 1-D over every whole element from `offset` to :attr:`size`.
        offset : int
            Byte offset of the first element; a multiple of the item size.

        Returns
        -------
        ArrayView
            Keeps the allocation alive. While it (or an array or capsule made
            from it) exists, :meth:`free` raises ``BufferError``; the memory
            returns to the pool when the last of them and the allocation are gone.
        """
        if self.pool._core.closed:
            raise ClosedError("PagePool")
        if self.freed:
            raise ValueError(f"allocation at {self.ptr:#x} was freed; it has no views")
        v = ArrayView(self, self.device, self.ptr, self.size, dtype, shape, offset)
        if self._views is None:
            self._views = weakref.WeakSet()
        self._views.add(v)
        return v

    @property
    def freed(self) -> bool:
        """True once freed (explicitly, or implicitly by the pool's ``close()``)."""
        rec = self._rec
        return rec is None or not rec.live or self.pool._core.closed

    def __int__(self) -> int:
        return self.ptr

    def __enter__(self) -> Allocation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rec is not None:
            self.free()

    def __repr__(self) -> str:
        state = " freed" if self.freed else ""
        return (
            f"<Allocation {self.size} bytes at {self.ptr:#x} on {self.device} "
            f"stream {self.stream}{state}>"
        )


# -------------------------------------------------------------------- PagePool
class PagePool(ClosesOnExit):
    """A memory pool of physical pages that defragments by remapping.

    Parameters
    ----------
    device : Device-like, optional
        Where the memory lives; :func:`~vmmpool.default_device` when omitted.
    limit : int, optional
        Most physical bytes the pool may hold, rounded down to `page_size`.
        Default, and most: the device's total memory (a larger limit is
        clamped to it).
    page_size : int, optional
        Bytes per page; a multiple of the device's granularity (the default).
    preallocate : int
        Bytes (rounded up to pages, at most `limit`) created and mapped at
        construction as one cached range of the default stream, so a process
        that allocates on the default stream never calls the driver again.
    peers : iterable of int
        Other CUDA devices granted read-write access to every mapping.
    small_threshold : int, optional
        Requests up to this many bytes are carved from shared small pages; a
        multiple of 256, at most ``page_size // 2`` (the default). 0 gives
        every request whole pages.

    Raises
    ------
    TypeError, ValueError
        Bad arguments (before any driver call).
    OutOfMemoryError
        `preallocate` could not be satisfied (nothing is kept).

    Notes
    -----
    See the module docstring (``vmmpool._pool``) for the design, the waste
    bounds, the stream rule and the invariants.
    """

    device: Device
    page_size: int
    peers: tuple[int, ...]

    def __init__(
        self,
        device: DeviceLike = None,
        limit: int | None = None,
        page_size: int | None = None,
        preallocate: int = 0,
        peers: Iterable[int] = (),
        *,
        small_threshold: int | None = None,
    ) -> None:
        dev = Device(device)
        gran = dev.granularity
        P = gran if page_size is None else check_int(
            "page_size", page_size, minimum=gran, multiple=gran
        )
        devs = check_peers(dev, peers)
        if small_threshold is None:
            T = (P // 2) // ALIGNMENT * ALIGNMENT
        else:
            T = check_int("small_threshold", small_threshold, multiple=ALIGNMENT)
            if T > P // 2:
                raise ValueError(
                    f"small_threshold must be <= page_size // 2 = {P // 2}, got {T}"
                )
        max_pages = self._max_pages(dev, P, limit)
        pre = check_int("preallocate", preallocate)
        pre_pages = -(-pre // P)
        if pre_pages > max_pages:
            raise ValueError(
                f"preallocate ({pre} bytes = {pre_pages} pages) must not exceed the limit "
                f"({max_pages * P} bytes = {max_pages} pages)"
            )
        self.device = dev
        self.page_size = P
        self.peers = devs[1:]
        self._core = core = _Core(dev, P, max_pages, T, devs)
        self._fin = weakref.finalize(self, _close_quietly, core)
        self._fin.atexit = False
        if pre_pages:
            try:
                with core.lock:
                    pages = core.gather(pre_pages, pre)
                    arena, slot = core._place(pages, 0)
                    st = core._stream(0)
                    rng = _Range(arena, slot, pre_pages, arena.base + slot * P, st)
                    st.add_range(rng, rng.addr + pre_pages * P)
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _max_pages(dev: Device, P: int, limit: object) -> int:
        # Validated before the device is asked anything.
        n = None if limit is None else check_int("limit", limit, maximum=dev.address_limit)
        total = dev.total_memory
        if n is None:
            return total // P
        # Clamped: above what the device has, largest_allocatable would promise
        # memory the device cannot give.
        return min(n, total) // P

    # ------------------------------------------------------------ properties
    @property
    def limit(self) -> int:
        """Most physical bytes the pool may hold (a multiple of `page_size`)."""
        return self._core.max_pages * self.page_size

    @property
    def small_threshold(self) -> int:
        """Requests up to this many bytes share small pages."""
        return self._core.T

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._core.closed

    def set_limit(self, limit: int | None) -> None:
        """Change the limit (``None``: the device's total memory).

        Parameters
        ----------
        limit : int or None
            Bytes, rounded down to `page_size`. It may be below what is in
            use: later requests fail until usage drops.

        Notes
        -----
        Pages above the new limit are given back to the driver: free pages
        first, then cached pages (the device is synchronized and the pages
        unmapped). Pages holding live data stay; when they are freed later,
        those above the limit are given back at once (the cache never keeps
        the pool above its limit once usage drops).

        If a driver call fails, the error propagates and the old limit stays
        in force: no allocation changed, pages already given back (free ones)
        or unmapped (cached ones, now free pages) stay so, and calling
        ``set_limit`` again resumes. A limit above the device's total memory
        is clamped to it.
        """
        core = self._core
        max_pages = self._max_pages(self.device, self.page_size, limit)
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending:
                core.drain()
            if core.closed:
                raise ClosedError("PagePool")
            old = core.max_pages
            core.max_pages = max_pages
            try:
                excess = len(core.pages) - max_pages
                if excess > 0:
                    excess -= core.release_free(excess)
                if excess > 0:
                    core.reclaim(excess)
                    core.release_free(excess)
            except BaseException:
                core.max_pages = old  # the old limit stays; a retry resumes
                raise
            logger.info(
                "limit set to %d bytes (%d pages); the pool holds %d pages",
                max_pages * self.page_size, max_pages, len(core.pages),
            )

    # ----------------------------------------------------------- allocation
    def malloc(self, nbytes: int, stream: object = None) -> Allocation:
        """Allocate `nbytes` of device memory on `stream`.

        Parameters
        ----------
        nbytes : int
            Bytes, ``>= 0``. Up to ``small_threshold`` the request is rounded
            up to 256 bytes and shares a page; above, it gets whole pages. 0
            gives a valid, unique, non-null 256-byte block.
        stream : None, int or stream object
            The stream that will use the memory (see :func:`stream_key`).

        Returns
        -------
        Allocation

        Raises
        ------
        TypeError, ValueError
            `nbytes` is not an integer or is negative; bad `stream`.
        OutOfMemoryError
            The pages holding live data plus this request exceed the limit,
            or the driver is out of memory. The pool stays usable.
        ClosedError
            The pool was closed.
        """
        if type(nbytes) is not int:
            nbytes = check_int("nbytes", nbytes)
        elif nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        key = 0 if stream is None else stream_key(stream)
        core = self._core
        try:
            rec = core.malloc(nbytes, key)
        except OutOfMemoryError:
            if not _collect_garbage(core):
                raise
            rec = core.malloc(nbytes, key)  # garbage held memory: once more
        a = Allocation.__new__(Allocation)
        a.ptr = rec.addr
        a.size = nbytes
        a.device = self.device
        a.stream = key
        a.pool = self
        a._rec = rec
        a._views = None
        a._hold = False
        ref = _Ref(a, _collected)
        ref.rec = rec
        ref.core = core
        rec.ref = ref
        return a

    def free(self, allocation: Allocation) -> None:
        """Free `allocation` (same as ``allocation.free()``).

        Raises
        ------
        TypeError
            Not an :class:`Allocation`.
        ValueError
            It belongs to another pool, or was already freed.
        """
        if not isinstance(allocation, Allocation):
            raise TypeError(f"allocation must be an Allocation, got {type(allocation).__name__}")
        if allocation.pool is not self:
            raise ValueError(
                f"allocation at {allocation.ptr:#x} belongs to another PagePool "
                f"({allocation.pool!r}), not this one ({self!r})"
            )
        allocation.free()

    def _defer(self, fn: Callable[[], object]) -> None:
        """Queue `fn` for the next pool call (safe from finalizers: never blocks).

        A garbage-collected :class:`~vmmpool.GrowableBuffer` gives its pages
        back this way: its finalizer may run inside a locked section of this
        pool (the garbage collector runs wherever an object is allocated), so
        it must not take the lock or call the backend there. The next public
        call of this pool runs `fn` before taking its lock. After close no
        call will come: `fn` runs at once (it no longer needs the pool's lock).
        """
        core = self._core
        if core.closed:
            fn()
        else:
            core.tasks.append(fn)

    # ------------------------------------------------------------ page level
    def acquire_pages(self, count: int, stream: object = None) -> list[PhysicalAllocation]:
        """Take `count` whole pages out of the pool for the caller to map.

        Parameters
        ----------
        count : int
            Pages wanted, ``>= 0``.
        stream : None, int or stream object
            The stream the caller will use them on (recorded for snapshots).

        Returns
        -------
        list of PhysicalAllocation
            Unmapped pages of `page_size` bytes, counted as in use until
            :meth:`release_pages`. The pool keeps ownership: do not close them.

        Raises
        ------
        OutOfMemoryError
            Not enough pages under the limit; nothing changed.

        Notes
        -----
        All or nothing: free pages are used first, then new pages are created
        up to the limit, then cached ranges are reclaimed (their streams
        synchronized, the pages unmapped).
        """
        n = check_int("count", count)
        key = 0 if stream is None else stream_key(stream)
        try:
            return self._acquire(n, key)
        except OutOfMemoryError:
            if not _collect_garbage(self._core):
                raise
            return self._acquire(n, key)

    def _acquire(self, n: int, key: int) -> list[PhysicalAllocation]:
        core = self._core
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending:
                core.drain()
            if core.closed:
                raise ClosedError("PagePool")
            if not n:
                return []
            P = self.page_size
            if core.pinned() + n > core.max_pages:
                raise core._oom(n * P, n, "the limit is reached")
            pages = core.gather(n, n * P)
            for p in pages:
                p.state = _ACQUIRED
                p.stream = key
                core.acquired[p] = None
            core.in_use += n * P
            core._note_peaks()
            return [p.phys for p in pages]

    def release_pages(self, pages: Sequence[PhysicalAllocation]) -> None:
        """Give pages from :meth:`acquire_pages` back to the free set.

        The caller must have unmapped them and synchronized its work on them.
        Validated first, all or nothing. A no-op after :meth:`close`.

        Raises
        ------
        TypeError
            An item is not a :class:`~vmmpool.PhysicalAllocation`.
        ValueError
            An item is not a page of this pool, is not acquired, or is listed twice.
        """
        items = list(pages)
        core = self._core
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending:
                core.drain()
            if core.closed:
                return
            recs: dict[_Page, None] = {}
            for ph in items:
                if not isinstance(ph, PhysicalAllocation):
                    raise TypeError(
                        f"pages must be PhysicalAllocation objects from acquire_pages(), "
                        f"got {type(ph).__name__}"
                    )
                p = core.pages.get(ph)
                if p is None:
                    raise ValueError(f"{ph!r} is not a page of this pool")
                if p.state is not _ACQUIRED:
                    raise ValueError(
                        f"page {p.index} is not acquired (it is {p.state}); "
                        "release only pages from acquire_pages(), once"
                    )
                if p in recs:
                    raise ValueError(f"page {p.index} is listed twice")
                recs[p] = None
            for p in recs:
                del core.acquired[p]
                p.state = _FREE
                p.stream = None
                core.free_pages.append(p)
            core.in_use -= len(recs) * self.page_size

    # ---------------------------------------------------------- maintenance
    def defragment(self) -> None:
        """Unmap every cached range and empty small page into the free pages.

        Their streams are synchronized first (one call per stream). Small
        pages with live blocks and live allocations stay where they are.
        """
        core = self._core
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending:
                core.drain()
            if core.closed:
                raise ClosedError("PagePool")
            got = core.reclaim(None)
            for st in core.streams.values():
                st.prune()
            if got:
                logger.info("defragment: %d cached page(s) unmapped to free pages", got)

    def trim(self) -> int:
        """Give every page not holding live data back to the driver.

        Does :meth:`defragment`, then releases the free pages and the arenas
        that no longer map anything.

        Returns
        -------
        int
            Bytes of physical memory given back.
        """
        core = self._core
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending:
                core.drain()
            if core.closed:
                raise ClosedError("PagePool")
            core.reclaim(None)
            for st in core.streams.values():
                st.prune()
            n = core.release_free(len(core.free_pages))
            core.release_empty_arenas()
            if n:
                logger.info("trim: gave %d page(s) back to the driver", n)
            return n * self.page_size

    # --------------------------------------------------------- observability
    def stats(self) -> PoolStats:
        """Return the pool's accounting (see :class:`PoolStats`)."""
        core = self._core
        P = self.page_size
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending and not core.closed:
                core.drain()
            if not core.closed and len(core.pages) > core.max_pages:
                core.enforce_limit()
            cached_range_pages = 0
            n_ranges = 0
            small_free_bytes = 0
            n_small_free = 0
            biggest_small = 0
            for st in core.streams.values():
                for r in st.by_start.values():
                    cached_range_pages += r.n
                    n_ranges += 1
                for sz, bin_ in st.sbins.items():
                    if bin_:
                        n_small_free += len(bin_)
                        small_free_bytes += sz * len(bin_)
                        biggest_small = max(biggest_small, sz)
            pinned = core.pinned()
            mapped = core.live_large_pages + len(core.small_pages) + cached_range_pages
            largest = 0 if core.closed else max(0, core.max_pages - pinned) * P
            if not largest:
                largest = biggest_small
            return PoolStats(
                allocated_bytes=core.requested,
                in_use_bytes=core.in_use,
                cached_bytes=cached_range_pages * P + small_free_bytes,
                cached_blocks=n_ranges + n_small_free,
                free_pages=len(core.free_pages),
                total_pages=len(core.pages),
                page_size=P,
                limit=core.max_pages * P,
                peak_allocated_bytes=core.peak_requested,
                peak_in_use_bytes=core.peak_in_use,
                peak_reserved_bytes=core.peak_total,
                n_malloc=core.n_malloc,
                n_free=core.n_free,
                n_page_creations=core.n_created,
                n_remaps=core.n_remaps,
                n_ooms=core.n_ooms,
                largest_allocatable=largest,
                live_allocations=core.n_live,
                mapped_pages=mapped,
                pinned_pages=pinned,
                reclaimable_pages=cached_range_pages + len(core.empty_small),
                acquired_pages=len(core.acquired),
                small_pages=len(core.small_pages),
                quarantined_pages=len(core.quarantine),
                address_space_bytes=sum(a.res.size for a in core.arenas),
                n_page_releases=core.n_released,
                n_reclaimed_pages=core.n_reclaimed,
                n_syncs=core.n_syncs,
            )

    def snapshot(self) -> list[PageInfo]:
        """Return the page map, one :class:`PageInfo` per page, by page index.

        Meant for plots and debugging (it walks every page: not for hot paths).
        """
        core = self._core
        P = self.page_size
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending and not core.closed:
                core.drain()
            info: dict[_Page, PageInfo] = {}

            def pages_of(arena: _Arena, slot: int, n: int) -> list[_Page]:
                out = []
                for p in arena.slots[slot : slot + n]:
                    assert p is not None
                    out.append(p)
                return out

            for rng in core.live_ranges:
                alloc = (AllocationInfo(rng.addr, rng.n * P, rng.nbytes, rng.stream.key),)
                for i, p in enumerate(pages_of(rng.arena, rng.slot, rng.n)):
                    info[p] = PageInfo(
                        p.index, "in_use", p.addr, rng.stream.key, "large",
                        alloc, max(0, min(P, rng.nbytes - i * P)),
                    )
            for st in core.streams.values():
                for rng in st.by_start.values():
                    for p in pages_of(rng.arena, rng.slot, rng.n):
                        info[p] = PageInfo(p.index, "cached", p.addr, st.key, "large")
            for sp in core.small_pages:
                (p,) = pages_of(sp.arena, sp.slot, 1)
                allocs = []
                used = 0
                b = sp.first
                while b is not None:
                    if b.live:
                        allocs.append(AllocationInfo(b.addr, b.size, b.nbytes, sp.stream.key))
                        used += b.nbytes
                    b = b.next
                state = "in_use" if allocs else "cached"
                info[p] = PageInfo(p.index, state, p.addr, sp.stream.key, "small", tuple(allocs), used)
            for p in core.pages.values():
                if p not in info:
                    if p.state is _ACQUIRED:
                        info[p] = PageInfo(p.index, "acquired", None, p.stream)
                    elif p.state is _QUARANTINED:
                        info[p] = PageInfo(p.index, "quarantined", p.addr)
                    else:
                        info[p] = PageInfo(p.index, "free", None)
            return sorted(info.values(), key=lambda i: i.index)

    def record_history(
        self, enabled: bool = True, *, max_entries: int = 100_000, stacks: bool = False
    ) -> None:
        """Start (or stop) recording allocation events, like ``torch.cuda.memory._record_memory_history``.

        Parameters
        ----------
        enabled : bool
            True starts a new history (dropping the old one); False stops and drops it.
        max_entries : int
            Events kept; the oldest are dropped beyond this many.
        stacks : bool
            Record the Python stack of each event (for the memory viewer's "frames"); costs a
            stack walk per malloc and free.

        Notes
        -----
        Events are ``alloc``, ``free_requested`` and ``free_completed`` with address, size,
        stream and time; :meth:`memory_snapshot` and :meth:`dump_snapshot` export them as
        ``device_traces``. Recording costs one tuple append per event.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        n = check_int("max_entries", max_entries, minimum=1)
        core = self._core
        with core.lock:
            core.history = History(n, bool(stacks)) if enabled else None

    def memory_summary(self) -> str:
        """A text table of :meth:`stats`, like ``torch.cuda.memory_summary()``."""
        return format_summary(self.stats(), f"{self.device}, page size {self.page_size >> 10} KiB")

    def memory_snapshot(self) -> dict[str, Any]:
        """The pool's memory in PyTorch's snapshot format (plain dicts), as ``torch.cuda.memory._snapshot()``.

        ``segments`` are the runs of consecutively mapped pages, each with its blocks (live
        allocations ``active_allocated``, the rest ``inactive``); ``device_traces`` holds the
        events recorded since :meth:`record_history` (empty when recording is off). See
        :mod:`vmmpool._observe` for the exact keys.
        """
        pages = self.snapshot()
        core = self._core
        with core.lock:
            hist = core.history
        ordinal = self.device.ordinal if self.device.kind == "cuda" else 0
        settings = {"allocator": "vmmpool.PagePool", "page_size": self.page_size, "limit": self.limit}
        return torch_snapshot(pages, self.page_size, hist, ordinal, settings)

    def dump_snapshot(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`memory_snapshot` as a pickle, like ``torch.cuda.memory._dump_snapshot``.

        The file holds only plain dicts, lists, tuples, ints and strings: it opens in PyTorch's
        memory viewer (https://pytorch.org/memory_viz) and in ``python -m vmmpool replay``.
        """
        snap = self.memory_snapshot()
        with open(path, "wb") as f:
            pickle.dump(snap, f, protocol=4)

    def _check(self) -> None:
        """Verify the pool's internal invariants; raise AssertionError if one is broken.

        Walks every page and block (slow): for tests and debugging.
        """
        core = self._core
        if core.tasks:
            core.run_tasks()
        with core.lock:
            if core.pending and not core.closed:
                core.drain()
            core.check()

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release every driver resource (idempotent, resumable).

        The device is synchronized once, every arena unmapped and freed, every
        page released. Live allocations are invalidated: their pointers
        dangle, ``free()`` does nothing, ``view()`` raises
        :class:`~vmmpool.ClosedError`. An arena holding an allocation that a
        view (or an array or DLPack capsule made from one) still uses stays
        mapped until the last such view is gone, so those arrays stay valid.
        Pages lent by :meth:`acquire_pages` lose the pool's reference; their
        memory lives until the caller unmaps them (driver rule 7) and
        ``release_pages`` becomes a no-op. If a driver call fails, the error
        propagates and calling ``close()`` again releases what is left.
        """
        core = self._core
        if core.tasks:
            core.run_tasks()
        core.close()  # raises on failure: the finalizer stays armed, close() resumes
        if not core.arenas and not core.pages:
            self._fin.detach()

    def __enter__(self) -> PagePool:
        if self._core.closed:
            raise ClosedError("PagePool")
        return self

    def __repr__(self) -> str:
        core = self._core
        if core.closed:
            return f"<PagePool on {self.device} closed>"
        return (
            f"<PagePool on {self.device}: {len(core.pages)} page(s) of {self.page_size} bytes, "
            f"{core.n_live} live allocation(s), limit {core.max_pages * self.page_size}>"
        )

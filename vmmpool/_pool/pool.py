"""The public objects: :class:`PagePool` and :class:`Allocation`.

The pool's state lives in a :class:`~._core.Core`; an :class:`Allocation`
keeps its pool alive, and a weak reference per allocation frees it as a safety
net when it is garbage collected (see the package docstring, "Lifetime").
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import pickle
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

from numpy.typing import DTypeLike

from .._device import Device, DeviceLike
from .._device import _parse as _parse_device
from .._dlpack import ArrayView
from .._errors import AsleepError, ForkedError, OutOfMemoryError, VmmWarning
from .._logq import pool_logger as logger
from .._observe import AllocationInfo, History, check_max_entries, format_summary, torch_snapshot
from .._options import PER_THREAD, brief, check_int, check_iterable, pool_key, shown, stream_key
from .._process import NoCopy
from .._resources import ClosesOnExit, PhysicalAllocation, check_peers
from .._share import SharedMemoryHandle, check_shareable, not_shareable
from . import _sleep
from ._arena import Arena
from ._blocks import ALIGNMENT, Block
from ._core import CLOSE, Core, release_held_quietly
from ._pages import ACQUIRED, ASLEEP, FREE, QUARANTINED, Page
from ._shares import Shares
from ._stats import PageInfo, PoolStats

__all__ = ["Allocation", "PagePool"]

#: After an out-of-memory, retries while garbage collection keeps giving memory back.
_GC_RETRIES = 3

#: Guards the first store of an allocation's view set (Allocation.view).
_VIEWS_LOCK = threading.Lock()


def _addr(b: Block) -> int:
    return b.addr


class _Ref(weakref.ref):
    """Weak reference to an Allocation; its callback frees the block (safety net).

    Cheaper than ``weakref.finalize`` (about 0.15 versus 0.9 microseconds per
    allocation) with the same guarantees: it holds the pool's internal state
    and the block, never the Allocation, and does nothing at shutdown.
    """

    __slots__ = ("rec", "core")

    rec: Block
    core: Core


def _after_deferred_close(ref: weakref.ReferenceType[PagePool]) -> None:
    """The end of a close() a finalizer queued (see PagePool.close), once the pool is closed."""
    pool = ref()
    if pool is None:
        return
    core = pool._core
    if not core.closed:
        if CLOSE in core.pending:  # a call ran the tasks before the close: after it, again
            core.tasks.append(functools.partial(_after_deferred_close, ref))
        return
    pool._shares.clear()  # receivers keep the pages they map (rule 7)
    if not core.arenas and not core.pages:
        pool._fin.detach()


def _collected(ref: _Ref) -> None:
    # Runs in whatever thread dropped the last reference, possibly while that
    # thread holds the pool's lock: queue; settle() frees it now if the lock is
    # free, else the lock's holder does when it lets go.
    try:
        if sys.is_finalizing():
            return
        core = ref.core
        if core.closed:
            if core.held and not core.forked:
                release_held_quietly(core)
            return
        core.pending.append(ref)
        core.settle()
    except Exception:  # noqa: BLE001 - a safety net must never raise
        pass


def _free_shared(ref: _Ref) -> None:
    """A free of a shareable pool's allocation deferred by :meth:`Allocation.free` (lock not held).

    Holds the allocation weakly (through `ref`), so the queue keeps no pool alive: an
    allocation collected meanwhile was not leased (the leases hold theirs), and its
    safety net frees it.
    """
    a = ref()
    if a is None or ref.core.closed:
        return  # collected (its safety net frees it), or freed by close()
    pool = a.pool
    core = pool._core
    rec = ref.rec
    with core.section:
        leased = rec.ref is ref and pool._shares.mark_freed(rec)
    if leased:
        pool._reap_shares()
        return
    core.free(ref, a)


@contextlib.contextmanager
def _locked(core: Core, *, open_only: bool = True) -> Iterator[Core]:
    """The prologue of every public pool method that takes the pool's lock, as one context.

    Runs the deferred tasks (:meth:`PagePool._defer`), takes the lock, does what finalizers
    queued (``core.drain()``) and yields `core`, lock held. With `open_only` a closed pool (a
    forked child's too: it is closed) raises :class:`~vmmpool.ClosedError` (or
    :class:`~vmmpool.ForkedError`); otherwise a closed pool is the caller's to handle. Whether
    an asleep pool refuses, returns or goes on is each method's own.
    """
    if core.tasks:
        core.run_tasks()
    with core.section:
        if core.pending:
            core.drain()
        if open_only and core.closed:
            raise core.closed_error()
        yield core


def _collect_garbage(core: Core, mark: int) -> bool:
    """After an out-of-memory: collect reference cycles that may hold this pool's memory.

    Runs the cyclic garbage collector (never under the pool's lock), then the releases its
    finalizers deferred. Returns True when garbage gave memory back to this pool since the
    failure (an allocation or a buffer's pages in a cycle, released by this thread or by
    another), so the caller retries once; the failed attempt is then not counted in
    ``n_ooms``. Garbage that held none of this pool's memory changes nothing. `mark` is
    ``core.n_garbage`` read before the failed attempt: garbage another thread collected
    between that attempt and this call counts too.
    """
    before = mark
    for pause in (0.0, 0.002):
        # gc.collect() returns at once while another thread is collecting: if
        # nothing came back, give that collection a moment and look again.
        if pause:
            time.sleep(pause)
        gc.collect()
        with _locked(core, open_only=False):
            if core.n_garbage != before:
                core.n_ooms -= 1
                return True
    return False


def _acquired(core: Core, items: Sequence[object]) -> dict[Page, None]:
    """The records of `items`, pages from ``acquire_pages()`` each listed once (else raise)."""
    recs: dict[Page, None] = {}
    for ph in items:
        if not isinstance(ph, PhysicalAllocation):
            raise TypeError(
                f"pages must be PhysicalAllocation objects from acquire_pages(), "
                f"got {type(ph).__name__}"
            )
        p = core.pages.get(ph)
        if p is None:
            raise ValueError(f"{ph!r} is not a page of this pool")
        if p.state is not ACQUIRED:
            raise ValueError(
                f"page {p.index} is not acquired (it is {p.state}); "
                "release only pages from acquire_pages(), once"
            )
        if p in recs:
            raise ValueError(f"page {p.index} is listed twice")
        recs[p] = None
    return recs


def _close_quietly(core: Core) -> None:
    # The pool's finalizer: may run from the garbage collector inside a locked
    # section of this very pool (a drain): never block on the lock. Queued, the
    # close is done now if the lock is free, else by its holder on the way out.
    # Nothing in a forked child: the pool's memory is the parent's.
    if core.forked:
        return
    try:
        core.pending.append(CLOSE)
        core.settle()
    except Exception:  # noqa: BLE001 - finalizer: never raise
        pass


# ------------------------------------------------------------------ Allocation
class Allocation(NoCopy):
    """Memory from :meth:`PagePool.malloc`.

    Attributes
    ----------
    ptr : int
        Device address of the first byte (512-byte aligned; blocks may share
        pages with their neighbours).
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

    __slots__ = ("ptr", "size", "device", "stream", "pool", "_ref", "_views", "_hold", "__weakref__")

    ptr: int
    size: int
    device: Device
    stream: int
    pool: PagePool
    #: The weak reference the pool's safety net holds (its ``rec`` is the block);
    #: None once freed. The block is still this allocation's while ``rec.ref is _ref``.
    _ref: _Ref | None
    _views: weakref.WeakSet[ArrayView] | None
    #: True when something outside the pool uses the memory for as long as the
    #: object lives (CuPy's ``UnownedMemory``): ``close()`` then keeps it mapped.
    _hold: bool

    @property
    def address(self) -> int:
        """Device address of the first byte: the same as :attr:`ptr` (CuPy's spelling)."""
        return self.ptr

    def _host_copy_stream(self) -> int:
        """The stream a host copy of a view waits for (``ArrayView.__dlpack__``)."""
        return self.stream

    def free(self) -> None:
        """Give the memory back to the pool (its stream's cache).

        Raises
        ------
        ValueError
            If it was already freed.
        BufferError
            If a view (or an array or DLPack capsule made from one) still uses
            the memory: drop it first. The allocation stays valid.

        Notes
        -----
        Safe from a finalizer: a ``__del__`` of an object in a reference cycle
        may free its allocation even when the cycle is collected while this
        thread is inside the pool (the free is then queued and done when the
        pool's lock is let go), and even after the pool's own safety net
        already freed the allocation (collected in the same cycle): nothing
        happens then. On a ``shareable`` pool, a free from a finalizer that
        interrupted a driver call is done by the pool's next call.
        """
        ref = self._ref
        if ref is None:
            raise ValueError(
                f"allocation of {self.size} bytes at {self.ptr:#x} was already freed"
            )
        if self._views:
            core = self.pool._core
            if core.forked:
                raise core.closed_error()
            raise BufferError(
                f"allocation at {self.ptr:#x} has {len(self._views)} live view(s) "
                "(arrays or DLPack capsules made from them use the memory); drop them first"
            )
        self._ref = None
        core = self.pool._core
        if core.shareable:  # an attribute test: the hot path stays cheap
            if core.forked:
                self._ref = ref  # refused in a forked child: nothing changed
                raise core.closed_error()
            rec = ref.rec
            shares = self.pool._shares
            if core.held_here():
                # A finalizer re-entered this thread inside the pool: no other
                # thread can be in share()'s locked section now.
                leased = rec.ref is ref and shares.mark_freed(rec)
            elif (
                core.backend.in_call() or shares.held_here()
                or (not core.owner and core.lock.locked())
            ):
                # A finalizer inside a backend call of this thread: the pool's lock
                # may be held by a thread waiting for the backend's; waiting for it
                # here would deadlock. Likewise inside the leases' lock (a collection in
                # Shares.done()): a free() in another thread holds the pool's lock and
                # waits for that one. And when the lock is busy with no owner noted (its holder
                # may be this very thread, interrupted by a signal handler between taking it and
                # noting itself: Core.free_contended). The pool's next call frees it (as below).
                self.pool._defer(functools.partial(_free_shared, ref))
                return
            else:
                # Under the pool's lock, where share() checks the allocation and
                # registers its lease: a share() racing this free() either
                # registered first (the block is leased: kept) or sees it freed.
                with core.section:
                    leased = rec.ref is ref and shares.mark_freed(rec)
            if leased:
                # Shared: receivers may still map these bytes; the pool frees the
                # block once every receiver is done (see _shares.py).
                self.pool._reap_shares()
                return
        try:
            core.free(ref, self)
        except ForkedError:
            self._ref = ref  # refused in a forked child: nothing changed
            raise

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
        core = self.pool._core
        if core.closed:
            raise core.closed_error()
        if self.freed:
            raise ValueError(f"allocation at {self.ptr:#x} was freed; it has no views")
        ref = self._ref
        assert ref is not None
        rec = ref.rec
        # The block's own address and size, not the attributes (a caller may assign them:
        # a view past the block would export, and let free() release, another's bytes).
        v = ArrayView(self, self.device, rec.addr, rec.nbytes, dtype, shape, offset)
        views = self._views
        if views is None:
            # Made lazily (a set per malloc would cost the hot path), but never
            # lost (issue 17 item 3): two threads taking first views both saw None
            # and each stored its own set, so one view went untracked and free()
            # was then accepted under a live array. Built outside the lock (it
            # allocates, so the garbage collector may run there); the check and
            # the store under it allocate nothing.
            new: weakref.WeakSet[ArrayView] = weakref.WeakSet()
            with _VIEWS_LOCK:
                views = self._views
                if views is None:
                    self._views = views = new
        views.add(v)
        return v

    def share(self) -> SharedMemoryHandle:
        """A picklable handle that maps this allocation in another process.

        Send it through :mod:`multiprocessing` (spawn or forkserver context,
        ``Queue``, ``Pipe`` or process arguments); ``handle.open()`` there maps
        the allocation's pages read-write and shows the :attr:`size` bytes at
        the allocation's offset in its first page (:class:`~vmmpool.SharedMapping`).
        Writes are visible both ways.

        Returns
        -------
        SharedMemoryHandle
            Holds one POSIX file descriptor per page the allocation touches.

        Raises
        ------
        ValueError
            The pool was not created with ``shareable=True``, or the allocation
            was freed.
        AsleepError
            The pool is asleep (:meth:`PagePool.sleep`): wake it first.
        ClosedError
            The pool was closed.

        Notes
        -----
        The receiver maps whole pages, which may also hold neighbouring
        allocations; ``read``, ``write`` and ``view`` of the mapping reach only
        this allocation's bytes. Until every copy of the handle and every
        mapping made from it is closed, in every process (a process that exits
        closes its own), the allocation's bytes are not reused:

        * if the owner frees the allocation (or drops it), it is freed for the
          owner at once (``freed`` is True; its pointer must not be used) but
          the pool keeps its bytes in use, so the receiver never sees another
          allocation's data; they are given back at the first ``stats()``,
          ``trim()``, ``defragment()`` or out-of-memory retry after the last
          receiver is done;
        * if the pool closes, or the owner's process exits, the receiver keeps
          the pages it maps (they are freed with its last mapping, driver rule 7).

        Like CUDA IPC, nothing orders the two processes' work: synchronize
        (events, queues) before reading what the other side wrote.
        """
        pool = self.pool
        core = pool._core
        if not core.shareable:
            raise not_shareable(f"the PagePool of this allocation ({pool!r})")
        pool._reap_shares()
        with _locked(core):
            ref = self._ref
            rec = None if ref is None else ref.rec
            if rec is None or rec.ref is not ref:
                raise ValueError(f"allocation at {self.ptr:#x} was freed; it cannot be shared")
            if core.asleep is not None:
                raise AsleepError("PagePool", "share()")  # its pages were given back
            arena = rec.arena
            P = core.P
            first = (rec.addr - arena.base) // P
            size = rec.nbytes  # the block's, not the attribute (a caller may assign it)
            last = (rec.addr + max(size, 1) - 1 - arena.base) // P
            pages = []
            for s in range(first, last + 1):
                page = arena.slots[s]
                assert page is not None, "a live block lies on an unmapped slot"
                pages.append(page.phys)
            handle, lease = SharedMemoryHandle._make(
                self.device, "Allocation", pages, size, rec.addr - arena.base - first * P, P
            )
            pool._shares.add(rec, self, lease)
        return handle

    @property
    def freed(self) -> bool:
        """True once freed (explicitly, or implicitly by the pool's ``close()``).

        Also True in a forked child, where the allocation is unusable (the
        parent's allocation stays live).
        """
        ref = self._ref
        return ref is None or ref.rec.ref is not ref or self.pool._core.closed

    @property
    def asleep(self) -> bool:
        """True while the pool is asleep (:meth:`PagePool.sleep`): nothing is mapped at :attr:`ptr`.

        Views of the allocation export nothing then (:class:`~vmmpool.AsleepError`,
        also a ``BufferError``); arrays exported before the sleep must not be
        touched until :meth:`PagePool.wake`.

        It turns true when ``sleep()`` is done (or fails leaving the pool asleep)
        and false when ``wake()`` is done, and it is read without the pool's lock:
        an export racing ``sleep()`` in another thread (begun before ``sleep()``
        returned) may succeed, and is an export made just before the sleep (the
        same address; an export touches no memory). Its array, like any made
        before the sleep, must not be touched until ``wake()``; order the
        export and ``sleep()`` yourself where you need one refused.
        """
        return self.pool._core.asleep is not None

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
        if self._ref is not None:
            self.free()

    def __repr__(self) -> str:
        state = " freed" if self.freed else ""
        return (
            f"<Allocation {self.size} bytes at {self.ptr:#x} on {self.device} "
            f"stream {self.stream}{state}>"
        )


# -------------------------------------------------------------------- PagePool
class PagePool(ClosesOnExit, NoCopy):
    """A memory pool of physical pages that defragments by remapping.

    Parameters
    ----------
    device : Device-like, optional
        Where the memory lives; :func:`~vmmpool.default_device` when omitted.
    limit : int, optional
        Most physical bytes the pool may hold, rounded down to `page_size`.
        Default: the device's total memory.
    page_size : int, optional
        Bytes per page; a multiple of the device's granularity (the default).
    preallocate : int
        Bytes (rounded up to pages, at most `limit`) created and mapped at
        construction as one free range of the default stream, so a process
        that allocates on the default stream never calls the driver again.
    peers : iterable of int
        Other CUDA devices granted read-write access to every mapping. Work of
        a peer device is ordered by its stream: pass that stream (a handle of
        the peer device's context) to ``malloc``/``free``. The handles 0, 1 and
        2 name the pool's own device's default streams, not the peer's.
    small_threshold : int or None, optional
        Requests larger than this many bytes are rounded up to whole pages
        (their size; they are placed like any block). ``None`` (the default):
        never; every request is rounded up to 512 bytes only. A multiple of
        512; 0 rounds every request to whole pages.
    shareable : bool
        Create every page exportable as a POSIX file descriptor (on CUDA,
        ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``; on the host emulator, a
        memfd per page) so that :meth:`Allocation.share` and the
        :meth:`~vmmpool.GrowableBuffer.share` of buffers on this pool work.
        Checked up front: a device without POSIX fd handles raises
        ``ValueError``.
    keep_cached : bool
        Keep every cached page (mapped, touched by no live block) until the
        limit needs it, as a caching allocator does: a loop makes no driver
        call once warm, and the pool holds the most it has mapped. By default
        (False) the pool keeps to a growth budget (about 1.02 x its peak in-use
        bytes) and, past it, unmaps cached pages to map them where a request
        needs them: less memory, but a loop whose requests do not fit what it
        freed remaps in every pass (stream-ordered; measured by
        ``benchmarks/replay.py --sweep``: held 1.02-1.06 x peak live with 0-200
        backend calls a pass, against 1.04-1.13 x with none).

    Raises
    ------
    TypeError, ValueError
        Bad arguments (before any driver call).
    OutOfMemoryError
        `preallocate` could not be satisfied (nothing is kept).

    Notes
    -----
    See the package docstring (``vmmpool._pool``) for the design, the waste
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
        shareable: bool = False,
        keep_cached: bool = False,
    ) -> None:
        if not isinstance(shareable, bool):
            raise TypeError(f"shareable must be a bool, got {type(shareable).__name__}")
        if not isinstance(keep_cached, bool):
            raise TypeError(f"keep_cached must be a bool, got {type(keep_cached).__name__}")
        dev = Device(device)
        gran = dev.granularity
        P = gran if page_size is None else check_int(
            "page_size", page_size, minimum=gran, multiple=gran
        )
        devs = check_peers(dev, peers)
        T = None if small_threshold is None else check_int(
            "small_threshold", small_threshold, multiple=ALIGNMENT
        )
        max_pages = self._max_pages(dev, P, limit)
        pre = check_int("preallocate", preallocate)
        pre_pages = -(-pre // P)
        if pre_pages > max_pages:
            raise ValueError(
                f"preallocate ({pre} bytes = {pre_pages} pages) must not exceed the limit "
                f"({max_pages * P} bytes = {max_pages} pages)"
            )
        if shareable:
            check_shareable(dev)
        self.device = dev
        self.page_size = P
        self.peers = devs[1:]
        self._core = core = Core(dev, P, max_pages, T, devs)
        core.limited = limit is not None
        core.shareable = shareable
        core.keep_cached = keep_cached
        self._shares = Shares()
        self._fin = weakref.finalize(self, _close_quietly, core)
        self._fin.atexit = False
        if pre_pages:
            try:
                with core.section:
                    st = core.stream(0)
                    pages = core.gather(pre_pages, pre, st)
                    # In the large heap; small requests take from it instead of remapping.
                    arena = core.new_arena(st.large, pre_pages)
                    arena.take_at(0, pre_pages)
                    core.map_pages(arena, 0, pages, 0)
                    st.large.add(Block(arena, arena.base, pre_pages * P))
                    core.prealloc = pre_pages
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _max_pages(dev: Device, P: int, limit: object) -> int:
        # Validated before the device is asked anything.
        n = None if limit is None else check_int("limit", limit, maximum=dev.address_limit)
        if n is not None and n < P:
            raise ValueError(
                f"limit must be at least one page ({P} bytes), got {n}: a pool below one page "
                "could serve nothing"
            )
        total = dev.total_memory
        if total < P:
            raise ValueError(f"page_size {P} is larger than the device's memory ({total} bytes)")
        if n is None:
            return total // P
        if n > total:
            # Clamped: above what the device has, largest_allocatable would promise
            # memory the device cannot give. Said once, where the limit was given.
            warnings.warn(
                f"PagePool limit {n} bytes is more than {dev}'s memory ({total} bytes): "
                f"clamped to {total // P * P} bytes ({total // P} pages of {P} bytes)",
                VmmWarning,
                stacklevel=3,
            )
        return min(n, total) // P

    # ------------------------------------------------------------ properties
    @property
    def limit(self) -> int:
        """Most physical bytes the pool may hold (a multiple of `page_size`)."""
        return self._core.max_pages * self.page_size

    @property
    def keep_cached(self) -> bool:
        """Whether cached pages stay mapped until the limit needs them (see the constructor)."""
        return self._core.keep_cached

    @property
    def small_threshold(self) -> int | None:
        """Requests above this many bytes are rounded to whole pages (``None``: never)."""
        return self._core.round_above

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (and in a forked child, where the pool is unusable)."""
        return self._core.closed

    @property
    def shareable(self) -> bool:
        """Whether pages are exportable (``shareable=True``): see :meth:`Allocation.share`."""
        return self._core.shareable

    def _reaped_for_retry(self) -> bool:
        """After an out-of-memory: free the shared allocations whose receivers are all done
        and say whether any was (lock NOT held). When one was, the failed attempt is taken
        out of ``n_ooms``: the retry counts for the request, if it fails (as after GC)."""
        if not self._shares:
            return False
        core = self._core
        before = core.n_live
        self._reap_shares()
        if core.n_live == before:
            return False
        with _locked(core, open_only=False):
            core.n_ooms -= 1
        return True

    def _reap_shares(self) -> None:
        """Free the shared allocations whose receivers are all done (lock NOT held)."""
        shares = self._shares
        if not shares.entries:
            return
        for rec, alloc in shares.done():
            ref = rec.ref
            if ref is None or ref() is not alloc:  # pragma: no cover - the pool closed meanwhile
                continue
            try:
                self._core.free(ref, alloc)
            except ValueError:  # pragma: no cover - the pool closed meanwhile
                pass

    def _check_process(self) -> None:
        """Raise ForkedError in a forked child (for calls that work on a closed pool)."""
        core = self._core
        if core.forked:
            raise core.closed_error()

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
        first, then cached pages (once the events of their streams' work are
        complete; the pool waits on them if it must). Pages touched by live
        blocks stay; when they are freed later, those above the limit are
        given back at once (the cache never keeps the pool above its limit
        once usage drops), or, while the work of their streams is pending, as
        soon as it is done. Until then, a request of a stream may reuse the
        blocks it freed there (no wait, and no page beyond those held): a
        request never makes the pool hold more pages than its limit or than
        it held already.

        If a driver call fails, the error propagates and the old limit stays
        in force: no allocation changed, pages already given back (free ones)
        or unmapped (cached ones, now free pages) stay so, and calling
        ``set_limit`` again resumes. A limit above the device's total memory
        is clamped to it.
        """
        core = self._core
        max_pages = self._max_pages(self.device, self.page_size, limit)
        with _locked(core):
            old, was_limited, slack = core.max_pages, core.limited, core.slack
            core.max_pages = max_pages
            core.limited = limit is not None
            core.slack = min(core.slack, core.max_slack())  # no more than the new rule allows
            if core.asleep is not None:
                return  # nothing is held; wake() checks the live pages against it
            try:
                excess = len(core.pages) - max_pages
                if excess > 0:
                    excess -= core.release_free(excess)
                if excess > 0:
                    core.reclaim(excess, None, wait=False)
                    excess -= core.release_free(excess)
                if excess > 0:
                    core.reclaim(excess, None, wait=True)
                    core.release_free(excess)
            except BaseException:
                core.max_pages = old  # the old limit stays; a retry resumes
                core.limited = was_limited
                core.slack = slack
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
            Bytes, ``>= 0``, rounded up to 512 (see `small_threshold`). The
            block shares pages with its neighbours. 0 gives a valid, unique,
            non-null 512-byte block.
        stream : None, int or stream object
            The stream that will use the memory (see :func:`stream_key`). A
            stream object is kept referenced while the stream has memory in
            the pool; see :meth:`retire_stream` for raw handles. Handle 2
            (``CU_STREAM_PER_THREAD``) is the calling thread's own stream:
            memory freed on it is reused in stream order by that thread only.

        Returns
        -------
        Allocation

        Raises
        ------
        TypeError, ValueError
            `nbytes` is not an integer or is negative; bad `stream`.
        OutOfMemoryError
            The pages touched by live blocks plus this request exceed the
            limit, or the driver is out of memory. The pool stays usable.
        ClosedError
            The pool was closed.
        """
        if type(nbytes) is not int:
            nbytes = check_int("nbytes", nbytes)
        elif nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if stream is None:
            key = 0
        elif type(stream) is int:
            key = stream_key(stream)
            stream = None
        else:
            key = stream_key(stream)
        core = self._core
        mark = core.n_garbage
        pk = pool_key(key) if key == PER_THREAD else key  # one stream per thread for handle 2
        try:
            rec = core.malloc(nbytes, pk, stream)
        except OutOfMemoryError as err:
            rec = self._malloc_after_gc(nbytes, pk, stream, mark, err)
        a = Allocation.__new__(Allocation)
        a.ptr = rec.addr
        a.size = nbytes
        a.device = self.device
        a.stream = key
        a.pool = self
        a._views = None
        a._hold = False
        a._ref = rec.ref = ref = _Ref(a, _collected)
        ref.rec = rec
        ref.core = core
        return a

    def _malloc_after_gc(
        self, nbytes: int, key: int, stream: object, mark: int, err: OutOfMemoryError
    ) -> Block:
        """After an out-of-memory: retry while garbage collection gives memory back."""
        core = self._core
        if self._reaped_for_retry():
            try:
                return core.malloc(nbytes, key, stream)
            except OutOfMemoryError as e:
                err = e
        for _ in range(_GC_RETRIES):
            if not _collect_garbage(core, mark):
                break
            mark = core.n_garbage
            try:
                return core.malloc(nbytes, key, stream)
            except OutOfMemoryError as e:  # other threads may have taken it first: again
                err = e
        if core.history is not None:
            self._record_oom(nbytes, key)
        raise err

    def _record_oom(self, nbytes: int, key: int) -> None:
        """History: a request that failed (PyTorch's ``oom`` trace entry, whose ``addr`` is
        the device's free bytes), once per request the caller sees fail."""
        try:
            free = self.device.free_memory
        except Exception:  # noqa: BLE001 - the record says 0; the out-of-memory error stands
            free = 0
        core = self._core
        with _locked(core, open_only=False):
            if core.history is not None:
                core.history.record("oom", free, nbytes, key)

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

    def _held_here(self) -> bool:
        """True when this thread holds the pool's lock: only code that interrupted it there
        (a finalizer, a signal handler) can call anything then."""
        return self._core.held_here()

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
        if core.forked:
            return  # the buffer's memory is the parent's: a child releases nothing
        if core.closed:
            fn()
        else:
            core.tasks.append(fn)

    def retire_stream(self, stream: object) -> None:
        """Call before destroying a stream given to :meth:`malloc` as a raw handle.

        Records one event on `stream` now, covering every free made on it so
        far; the pool never records on it again (until it is used again), so
        its cached memory can later leave it safely. Frees on a retired stream
        after this call are covered by one device synchronize if their pages
        must leave it. A stream *object* passed to ``malloc`` needs no call:
        the pool keeps it alive while the stream has memory here.

        A retired stream costs nothing once it holds nothing: the pool forgets
        it (its events and its address space) at once if it holds no block
        and no cached page, else when its last cached page leaves it (or at
        :meth:`trim`). Using the stream again later is allowed.

        Parameters
        ----------
        stream : None, int or stream object
            As for :meth:`malloc`.
        """
        key = 0 if stream is None else pool_key(stream_key(stream))
        core = self._core
        with _locked(core):
            st = core.streams.get(key)
            if st is None or core.drop_stream(st):
                return  # nothing of it here (any more): forgotten, its address space freed
            st.record(core.backend, core.ev)
            st.retired = True
            st.obj = None

    # ------------------------------------------------------------ page level
    def acquire_pages(self, count: int, stream: object = None) -> list[PhysicalAllocation]:
        """Take `count` whole pages out of the pool for the caller to map.

        Parameters
        ----------
        count : int
            Pages wanted, ``>= 0``.
        stream : None, int or stream object
            The stream the caller will use them on (its cached pages are
            taken first; recorded for snapshots).

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
        All or nothing: free pages are used first, then cached pages whose
        work is done, then new pages up to the limit, then cached pages after
        waiting on their streams' events.
        """
        n = check_int("count", count)
        key = 0 if stream is None else pool_key(stream_key(stream))
        core = self._core
        for attempt in range(_GC_RETRIES + 1):
            mark = core.n_garbage
            try:
                return self._acquire(n, key)
            except OutOfMemoryError:
                if attempt == 0 and self._reaped_for_retry():  # tried again, as malloc does
                    try:
                        return self._acquire(n, key)
                    except OutOfMemoryError:
                        pass
                if attempt == _GC_RETRIES or not _collect_garbage(core, mark):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _acquire(self, n: int, key: int) -> list[PhysicalAllocation]:
        core = self._core
        with _locked(core):
            if not n:
                return []  # needs no memory: asleep too (a buffer of capacity 0 wakes)
            if core.asleep is not None:
                raise AsleepError("PagePool", f"acquire_pages({n})")
            P = self.page_size
            if core.pinned() + n > core.max_pages:
                raise core.oom(n * P, n, "the limit is reached", pin=n)
            st = core.streams.get(key)
            pages = core.asking(lambda: core.gather(n, n * P, st))
            if core.emptied:  # the stream itself may have given its last page
                core.drop_emptied(None)
            for p in pages:
                p.state = ACQUIRED
                p.stream = key
                core.acquired[p] = None
            core.in_use += n * P
            core.note_peaks()
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
        self._check_process()
        items = check_iterable("pages", pages, "PhysicalAllocations from acquire_pages()")
        core = self._core
        if core.closed:
            return  # closed is final: no lock needed (a closing pool runs its buffers' releases)
        with _locked(core, open_only=False):
            if core.closed:
                return
            recs = _acquired(core, items)
            for p in recs:
                del core.acquired[p]
                p.state = FREE
                p.stream = None
                core.free_pages.append(p)
            core.in_use -= len(recs) * self.page_size

    def _discard_pages(self, pages: Sequence[PhysicalAllocation]) -> None:
        """Take back acquired pages that were shared: release them, never reuse them.

        A growable buffer on this pool gives back pages it exported this way:
        a receiver may still map them, and a reused page would show it another
        buffer's data. The pool drops its handle (the receiver's import keeps
        the memory, driver rule 7) and creates new pages when it needs them.
        The caller must have unmapped them. Validated first; a page whose
        release fails is quarantined (never reused, released by ``close()``).
        A no-op after :meth:`close`.
        """
        items = list(pages)
        core = self._core
        if core.closed:
            return  # as release_pages
        with _locked(core, open_only=False):
            if core.closed:
                return
            recs = _acquired(core, items)
            for p in recs:
                del core.acquired[p]
                core.in_use -= self.page_size
                try:
                    p.phys.close()
                except Exception:  # kept out of reuse; close() retries
                    logger.error("releasing a shared page failed; quarantined", exc_info=True)
                    p.state = QUARANTINED
                    core.quarantine[p] = None
                    continue
                p.state = FREE
                p.stream = None
                del core.pages[p.phys]
                core.n_released += 1

    # ---------------------------------------------------------- maintenance
    def defragment(self) -> None:
        """Unmap every cached page (touched by no live block) into the free pages.

        The pool waits on the events of the streams that used them first (no
        device synchronize). Pages touched by live blocks stay where they are.
        """
        core = self._core
        self._reap_shares()
        with _locked(core):
            if core.asleep is not None:
                return  # nothing is mapped
            got = core.reclaim(None, None, wait=True)
            for st in core.streams.values():
                st.prune()
            if got:
                logger.info("defragment: %d cached page(s) unmapped to free pages", got)

    def trim(self) -> int:
        """Give every page not touched by live data back to the driver.

        Does :meth:`defragment`, then releases the free pages and the arenas
        that no longer map anything, and forgets the streams left with nothing
        (their events too).

        Returns
        -------
        int
            Bytes of physical memory given back.
        """
        core = self._core
        self._reap_shares()
        with _locked(core):
            if core.asleep is not None:
                return 0  # every page was given back already
            core.reclaim(None, None, wait=True)
            for st in core.streams.values():
                st.prune()
            n = core.release_free(len(core.free_pages))
            core.release_empty_arenas()
            for st in list(core.streams.values()):
                core.drop_stream(st)  # streams left with nothing: forgotten
            if n:
                logger.info("trim: gave %d page(s) back to the driver", n)
            return n * self.page_size

    # ----------------------------------------------------------- sleep / wake
    @property
    def asleep(self) -> bool:
        """True between :meth:`sleep` and :meth:`wake`."""
        return self._core.asleep is not None

    def sleep(self, backup: bool = True) -> None:
        """Give every physical page back to the driver, keeping every address.

        Parameters
        ----------
        backup : bool
            Copy the live bytes to host memory first, so that :meth:`wake`
            restores them. ``False`` drops the contents (for caches such as KV
            blocks): after ``wake`` the live allocations hold undefined bytes.

        Raises
        ------
        ValueError
            Pages are lent by :meth:`acquire_pages` (to growable buffers):
            sleep those buffers first; or allocations are shared with other
            processes (:meth:`Allocation.share`) and still mapped there.
            Nothing changed.
        OutOfMemoryError, DriverError
            A driver call failed. The pool is awake, its allocations keep their
            addresses and bytes (pages that hold no live data may have been
            given back, as :meth:`trim` does). Only if mapping back failed too
            is it left asleep with its backup; :meth:`wake` then retries.
            With ``backup=False`` there is nothing to restore from: pages the
            sleep had already given back (a release failed late) come back
            new, and the allocations on them hold undefined bytes, as after a
            :meth:`wake`.
        ClosedError
            The pool was closed.

        Notes
        -----
        First the work of every stream with memory here is waited for (an
        event per stream, no device synchronize), then the pages no live block
        touches are given back, and the pages live blocks touch are copied to
        one host array in runs of adjacent pages (through a reusable pinned
        staging buffer on CUDA), unmapped (one call per run) and released. The
        address space, the allocations and the free ranges stay: every
        :attr:`Allocation.address` and every view's pointer is valid again
        after :meth:`wake`. Touching the memory while asleep is an error (an
        illegal address on a GPU; a segmentation fault on the host emulator):
        views export nothing while asleep (DLPack and the array interfaces raise
        :class:`~vmmpool.AsleepError`, also a ``BufferError``), but arrays
        exported before the sleep cannot be stopped; leave them alone until
        :meth:`wake`. Exports take no lock: one that races ``sleep()`` in
        another thread is such an export made before the sleep (it may
        succeed; only exports begun after ``sleep()`` returned are sure to be
        refused). Locking them would not help: the export touches no memory,
        and the array's use that follows would race the sleep all the same.

        While asleep, :meth:`Allocation.free` works and needs no memory;
        :meth:`malloc` and :meth:`acquire_pages` raise
        :class:`~vmmpool.AsleepError`; :meth:`defragment` and :meth:`trim` do
        nothing; :meth:`set_limit` only sets the limit. Sleeping again is a
        no-op. :meth:`stats` reports ``asleep``, ``backup_bytes`` and the
        bytes and time of every sleep and wake.
        """
        if not isinstance(backup, bool):
            raise TypeError(f"backup must be a bool, got {type(backup).__name__}")
        core = self._core
        self._reap_shares()
        with _locked(core):
            if core.asleep is not None:
                return
            if self._shares:
                raise ValueError(
                    f"cannot sleep: {len(self._shares.entries)} allocation(s) are shared with other "
                    "processes (Allocation.share()) and may still be mapped there; their pages cannot "
                    "be given back (the receivers hold them) and the sharing would end: close the "
                    "receivers' mappings first"
                )
            _sleep.sleep(core, backup)

    def wake(self) -> None:
        """Map new pages at the sleeping pages' addresses and copy their bytes back.

        Pages that allocations freed while asleep are not brought back. A
        no-op when awake.

        Raises
        ------
        OutOfMemoryError
            The device (or the pool's limit, if lowered while asleep) has no
            room for the live pages. The pool stays asleep with its backup.
        DriverError
            A driver call failed; what wake did is undone, the pool stays
            asleep with its backup and ``wake()`` can be called again.
        ClosedError
            The pool was closed.
        """
        core = self._core
        with _locked(core):
            _sleep.wake(core)

    # --------------------------------------------------------- observability
    def stats(self) -> PoolStats:
        """Return the pool's accounting (see :class:`PoolStats`).

        Walks the free ranges and the live blocks (for ``small_pages``).
        """
        self._check_process()
        core = self._core
        P = self.page_size
        self._reap_shares()
        with _locked(core, open_only=False):
            if not core.closed and len(core.pages) > core.max_pages:
                core.enforce_limit()
            free_bytes = 0
            n_free_ranges = 0
            biggest = 0
            for st in core.streams.values():
                for h in st.heaps:
                    for sz, bin_ in h.bins.items():
                        if bin_:
                            n_free_ranges += len(bin_)
                            free_bytes += sz * len(bin_)
                            biggest = max(biggest, sz)
            pinned = core.pinned()
            largest = biggest if core.closed else core.largest_block()
            T = core.round_above
            if T is not None and largest > T:
                # Requests above small_threshold are rounded up to whole pages: past T, only
                # a request of whole pages that fit is served as asked.
                whole = largest // P * P
                largest = whole if whole > T else T
            mapped = core.mapped
            reclaimable = core.reclaimable()
            sl = core.asleep
            if sl is not None:  # only what is still held counts (see PoolStats.asleep)
                mapped -= core.n_asleep
                pinned = len(core.acquired) + len(core.quarantine)
                reclaimable = free_bytes = n_free_ranges = largest = 0
            ev = core.ev
            sc = core.sleeps
            return PoolStats(
                allocated_bytes=core.in_use,
                requested_bytes=core.requested,
                cached_bytes=free_bytes,
                cached_blocks=n_free_ranges,
                free_pages=len(core.free_pages),
                total_pages=len(core.pages),
                page_size=P,
                limit=core.max_pages * P,
                peak_allocated_bytes=core.peak_in_use,
                peak_requested_bytes=core.peak_requested,
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
                reclaimable_pages=reclaimable,
                acquired_pages=len(core.acquired),
                small_pages=core.shared_pages(),
                quarantined_pages=len(core.quarantine),
                address_space_bytes=sum(a.res.size for a in core.arenas),
                n_page_releases=core.n_released,
                n_reclaimed_pages=core.n_reclaimed,
                n_syncs=core.n_syncs,
                n_events=ev.n_events,
                n_event_queries=ev.n_event_queries,
                n_event_waits=ev.n_event_waits,
                asleep=sl is not None,
                backup_bytes=sl.backup.nbytes if sl is not None and sl.backup is not None else 0,
                n_sleeps=sc.n_sleeps,
                n_wakes=sc.n_wakes,
                sleep_bytes=sc.sleep_bytes,
                wake_bytes=sc.wake_bytes,
                sleep_seconds=sc.sleep_seconds,
                wake_seconds=sc.wake_seconds,
            )

    def snapshot(self) -> list[PageInfo]:
        """Return the page map, one :class:`PageInfo` per page, by page index.

        Meant for plots and debugging (it walks every page and block: not for
        hot paths).
        """
        self._check_process()
        core = self._core
        with _locked(core, open_only=False):
            return self._page_infos(core)

    def _page_infos(self, core: Core) -> list[PageInfo]:
        """:meth:`snapshot`'s page map (the pool's lock held)."""
        P = self.page_size
        if core.closed:
            # Every page is given up (stats() counts none): arenas that
            # PyTorch or CuPy still use stay mapped for them, not for the pool.
            return []
        info: dict[Page, PageInfo] = {}
        touching = core.touching()
        arena: Arena
        for arena in core.arenas:
            for s, p in enumerate(arena.slots):
                if p is None or p.state is QUARANTINED:
                    continue
                if any(x.arena is arena and x.slot == s for x in p.aliases):
                    continue  # a page's other mapping: listed with the page
                if p.state is ASLEEP:
                    info[p] = PageInfo(p.index, "asleep", p.addr, shown(arena.stream.key))
                    continue
                blocks = touching.get((arena, s), [])
                lo = arena.base + s * P
                spans = [lo]
                for al in p.aliases:  # mapped more than once: in use through any mapping
                    blocks = blocks + touching.get((al.arena, al.slot), [])
                    spans.append(al.arena.base + al.slot * P)
                if not blocks:  # an aliased page too, once its bytes are all free (reclaimable)
                    info[p] = PageInfo(
                        p.index, "cached", p.addr, shown(arena.stream.key),
                        alias_address=spans[1] if len(spans) > 1 else None,
                        alias_addresses=tuple(spans[1:]),
                    )
                    continue
                hi = lo + P
                used = sum(
                    max(0, min(x + P, b.addr + b.nbytes) - max(x, b.addr))
                    for b in blocks for x in spans
                )
                b0 = blocks[0] if blocks else None
                whole = (
                    len(blocks) == 1 and b0 is not None and b0.addr <= lo and hi <= b0.addr + b0.size
                )
                key = shown(arena.stream.key)
                allocs = tuple(
                    AllocationInfo(b.addr, b.size, b.nbytes, key)
                    for b in sorted(blocks, key=_addr)
                )
                info[p] = PageInfo(
                    p.index, "in_use", p.addr, key, "large" if whole else "small", allocs, used,
                    spans[1] if len(spans) > 1 else None, tuple(spans[1:]),
                )
        for p in core.pages.values():
            if p not in info:
                if p.state is ACQUIRED:
                    by = None if p.stream is None else shown(p.stream)
                    info[p] = PageInfo(p.index, "acquired", None, by)
                elif p.state is QUARANTINED:
                    info[p] = PageInfo(p.index, "quarantined", p.addr)
                else:
                    info[p] = PageInfo(p.index, "free", None)
        return sorted(info.values(), key=lambda i: i.index)

    def memory_stats(self) -> dict[str, int]:
        """The pool's statistics as PyTorch's flat dictionary (``torch.cuda.memory_stats()``).

        Returns
        -------
        dict of str to int
            Keys as PyTorch spells them, for the pool type ``all`` (vmmpool's small- and
            large-block heaps are not counted apart):

            - ``"allocated_bytes.all.{current,peak}"``: live allocations with their rounding
              (``memory_allocated()``); ``"requested_bytes.all.{current,peak}"``: the sizes
              asked for; ``"active_bytes.all.{current,peak}"``: as allocated (freed memory is
              reusable in stream order at once).
            - ``"reserved_bytes.all.{current,peak,allocated,freed}"``: physical pages held
              (``memory_reserved()``), and the bytes of pages created and released so far.
            - ``"segment.all.{current,allocated,freed}"``: physical pages (each one
              ``cuMemCreate``) held, created, released.
            - ``"allocation.all.{current,allocated,freed}"`` and ``"active.all.current"``:
              live allocations, mallocs, frees.
            - ``"num_alloc_retries"``: requests served by unmapping cached pages and
              remapping them (PyTorch: a failed ``cudaMalloc`` retried after freeing its
              cache); ``"num_ooms"``; ``"num_sync_all_streams"``: device synchronizes.

        Notes
        -----
        Peaks count since the pool was made or since :meth:`reset_peak_memory_stats`.
        :meth:`stats` gives the same figures, and more, as a :class:`PoolStats`. Keys whose
        PyTorch meaning has no vmmpool counterpart are left out rather than approximated
        (``inactive_split*``: vmmpool's cached ranges can be reclaimed page by page;
        ``num_device_alloc``/``num_device_free``: see ``Device.counters()`` for driver calls).
        """
        s = self.stats()
        P = s.page_size
        return {
            "active.all.current": s.live_allocations,
            "active_bytes.all.current": s.allocated_bytes,
            "active_bytes.all.peak": s.peak_allocated_bytes,
            "allocated_bytes.all.current": s.allocated_bytes,
            "allocated_bytes.all.peak": s.peak_allocated_bytes,
            "allocation.all.allocated": s.n_malloc,
            "allocation.all.current": s.live_allocations,
            "allocation.all.freed": s.n_free,
            "num_alloc_retries": s.n_remaps,
            "num_ooms": s.n_ooms,
            "num_sync_all_streams": s.n_syncs,
            "requested_bytes.all.current": s.requested_bytes,
            "requested_bytes.all.peak": s.peak_requested_bytes,
            "reserved_bytes.all.allocated": s.n_page_creations * P,
            "reserved_bytes.all.current": s.reserved_bytes,
            "reserved_bytes.all.freed": s.n_page_releases * P,
            "reserved_bytes.all.peak": s.peak_reserved_bytes,
            "segment.all.allocated": s.n_page_creations,
            "segment.all.current": s.total_pages,
            "segment.all.freed": s.n_page_releases,
        }

    def reset_peak_memory_stats(self) -> None:
        """Start every peak again from its current value (``torch.cuda.reset_peak_memory_stats()``).

        Affects ``peak_allocated_bytes``, ``peak_requested_bytes`` and
        ``peak_reserved_bytes`` (and the ``.peak`` keys of :meth:`memory_stats`), not the
        pool's behaviour: its growth budget still remembers the highest use it has seen.
        """
        self._check_process()
        core = self._core
        with _locked(core, open_only=False):
            core.reset_peaks()

    def empty_cache(self) -> int:
        """PyTorch's name for :meth:`trim` (``torch.cuda.empty_cache()``).

        Returns
        -------
        int
            Bytes of physical memory given back to the driver.
        """
        return self.trim()

    def record_history(
        self,
        enabled: str | bool | None = "all",
        context: str | None = "all",
        stacks: str | bool = "python",
        max_entries: int = 100_000,
        device: object = None,
        clear_history: bool = False,
    ) -> None:
        """Start or stop recording events, as ``torch.cuda.memory._record_memory_history``.

        Parameters
        ----------
        enabled : {"all", None}
            ``"all"`` records events: a pool already recording keeps the events so far (as
            PyTorch does) unless `clear_history`, under the new `context` and `max_entries`
            (the oldest dropped beyond it); ``None`` stops and drops the history. ``True``
            and ``False`` (the older form) mean the same. PyTorch's ``"state"``
            (stacks of live blocks, no history) is not supported: vmmpool keeps no per-block
            stacks.
        context : {"all", "alloc", None}
            Which events carry the Python stack (the memory viewer's "frames"): ``"all"``,
            only allocations (``"alloc"``), or none (``None``: no stack walk, cheapest).
        stacks : {"python", "all"} or bool
            Which frames: Python frames in both cases (vmmpool runs no C++ between you and
            the driver worth showing). A bool (the older form) overrides `context`:
            ``True`` is ``"all"``, ``False`` is ``None``.
        max_entries : int
            Events kept; the oldest are dropped beyond this many.
        device : int, str, Device or None
            PyTorch's argument, accepted for the same calls: ``None`` or this pool's device
            (a pool records its own events); another device is refused (``ValueError``).
        clear_history : bool
            Drop the events recorded so far when recording starts again (PyTorch's keyword).

        Notes
        -----
        Events are ``alloc``, ``free_requested`` and ``free_completed`` (address, size
        asked for, stream, time) and, for the pool's pages, ``segment_map`` (pages mapped
        into the pool's address space: new pages and remapped ones) and ``segment_unmap``
        (cached pages unmapped: for a remap, a limit, :meth:`defragment` or :meth:`trim`),
        the actions PyTorch's memory viewer draws as segments growing and shrinking, and
        ``oom`` for a request that failed (``device_free``: the device's free bytes).
        :meth:`sleep` records the frees of the live blocks and its unmaps, :meth:`wake` its
        maps and the allocs again. :meth:`memory_snapshot` and :meth:`dump_snapshot` export
        them as ``device_traces``.
        Recording costs one tuple append per event, plus a stack walk where `context` asks.
        """
        if enabled is True or enabled == "all":
            on = True
        elif enabled is None or enabled is False:
            on = False
        elif isinstance(enabled, str):
            raise ValueError(
                f"enabled must be 'all' (record events) or None (stop), got {brief(enabled)}"
                + (": vmmpool keeps no per-block stacks, so 'state' has nothing to record"
                   if enabled == "state" else "")
            )
        else:
            raise TypeError(f"enabled must be 'all', None or a bool, got {type(enabled).__name__}")
        if isinstance(stacks, bool):
            context = "all" if stacks else None
        elif stacks not in ("python", "all"):
            raise ValueError(f"stacks must be 'python', 'all' or a bool, got {brief(stacks)}")
        if context not in ("all", "alloc", None):
            raise ValueError(
                f"context must be 'all', 'alloc' or None, got {brief(context)}"
                + (" (vmmpool keeps no per-block stacks)" if context == "state" else "")
            )
        n = check_max_entries(max_entries)
        if not isinstance(clear_history, bool):
            raise TypeError(f"clear_history must be a bool, got {type(clear_history).__name__}")
        if device is not None:
            dev = self.device
            same = device is dev if isinstance(device, Device) else (
                _parse_device(device) == (dev.kind, dev.ordinal)
            )
            if not same:
                raise ValueError(
                    f"device must be None or this pool's device ({self.device}), got {brief(device)}"
                )
        self._check_process()
        core = self._core
        with core.section:
            old = core.history
            if not on:
                core.history = None
            elif old is None or clear_history:
                core.history = History(n, context)
            else:
                kept = History(n, context)
                kept.events.extend(old.events)  # the newest n of them
                core.history = kept

    def memory_summary(self, abbreviated: bool = False) -> str:
        """A text table of :meth:`stats`, like ``torch.cuda.memory_summary()``.

        Parameters
        ----------
        abbreviated : bool
            Only the memory rows (allocated, requested, reserved, in their current and peak
            values), as PyTorch's abbreviated summary; without the breakdown and the counts.
        """
        return format_summary(
            self.stats(), f"{self.device}, page size {self.page_size >> 10} KiB", abbreviated
        )

    def memory_snapshot(self) -> dict[str, Any]:
        """The pool's memory in PyTorch's snapshot format (plain dicts), as ``torch.cuda.memory._snapshot()``.

        ``segments`` are the runs of consecutively mapped pages, each with its blocks (live
        allocations ``active_allocated``, the rest ``inactive``); ``device_traces`` holds the
        events recorded since :meth:`record_history` (empty when recording is off). See
        :mod:`vmmpool._observe` for the exact keys.
        """
        self._check_process()
        core = self._core
        with _locked(core, open_only=False):
            # One hold of the lock for both: the pages and the history agree. The history is
            # copied: other threads record events (under this lock) while the trace is built.
            pages = self._page_infos(core)
            hist = None if core.history is None else core.history.copy()
        ordinal = self.device.ordinal if self.device.kind == "cuda" else 0
        settings = {
            "allocator": "vmmpool.PagePool", "page_size": self.page_size, "limit": self.limit,
            "keep_cached": core.keep_cached,  # what it holds (its segments) depends on it
        }
        return torch_snapshot(pages, self.page_size, hist, ordinal, settings)

    def dump_snapshot(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`memory_snapshot` as a pickle, like ``torch.cuda.memory._dump_snapshot``.

        The file holds only plain dicts, lists, tuples, ints and strings: it opens in PyTorch's
        memory viewer (https://pytorch.org/memory_viz) and in ``python -m vmmpool replay``.
        """
        if not isinstance(path, (str, bytes, os.PathLike)):
            # open() would take an int as a file descriptor: write into and close a file
            # the caller never meant to hand over.
            raise TypeError(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}")
        snap = self.memory_snapshot()
        with open(path, "wb") as f:
            pickle.dump(snap, f, protocol=4)

    def _check(self) -> None:
        """Verify the pool's internal invariants; raise AssertionError if one is broken.

        Walks every page and block (slow): for tests and debugging.
        """
        self._check_process()
        core = self._core
        with _locked(core, open_only=False):
            core.check()

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release every driver resource (idempotent, resumable).

        The device is synchronized once (live allocations may still be in
        use), every event destroyed, every arena unmapped and freed, every
        page released. Live allocations are invalidated: their pointers
        dangle, ``free()`` does nothing, ``view()`` raises
        :class:`~vmmpool.ClosedError`. An arena holding an allocation that a
        view (or an array or DLPack capsule made from one) still uses stays
        mapped until the last such view is gone, so those arrays stay valid
        (not when the pool is asleep: its memory was given back and the
        backup is dropped, so such arrays stay unusable, as while asleep;
        their addresses stay reserved, so touching them faults rather than
        reaching other memory). Pages lent by :meth:`acquire_pages` lose the pool's reference; their
        memory lives until the caller unmaps them (driver rule 7) and
        ``release_pages`` becomes a no-op. If a driver call fails, the error
        propagates and calling ``close()`` again releases what is left.

        In a child forked from the pool's process it raises
        :class:`~vmmpool.ForkedError` and releases nothing (the memory is the
        parent's), unless the pool holds nothing.

        Called from a finalizer (a ``__del__``) that interrupted a driver call
        of this thread, it returns at once and the pool closes after that call
        (at the backend's next call): closing calls the driver, which must not
        run inside the interrupted call. :attr:`closed` is False until then.
        """
        core = self._core
        if core.backend.in_call() and not core.forked:
            core.backend.run_or_defer(self.close)
            return
        if self._held_here() and not core.forked:
            # A finalizer that interrupted this thread inside this pool's locked section:
            # closing there raised ReentryError (lost in __del__; the pool stayed open).
            # Queued as the pool's own finalizer queues it: done as the holder lets go.
            # The rest of close() (the leases' read ends, the safety net) follows as a
            # task, which the close runs last.
            core.pending.append(CLOSE)
            core.tasks.append(functools.partial(_after_deferred_close, weakref.ref(self)))
            return
        if core.tasks:
            core.run_tasks()
        core.close()  # raises on failure: the finalizer stays armed, close() resumes
        self._shares.clear()  # receivers keep the pages they map (rule 7)
        if not core.arenas and not core.pages:
            self._fin.detach()

    def __enter__(self) -> PagePool:
        if self._core.closed:
            raise self._core.closed_error()
        return self

    def __repr__(self) -> str:
        core = self._core
        if core.closed:
            return f"<PagePool on {self.device} closed>"
        asleep = ", asleep" if core.asleep is not None else ""
        return (
            f"<PagePool on {self.device}: {len(core.pages)} page(s) of {self.page_size} bytes, "
            f"{core.n_live} live allocation(s), limit {core.max_pages * self.page_size}{asleep}>"
        )

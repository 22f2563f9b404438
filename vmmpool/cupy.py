"""vmmpool as CuPy's memory pool: one line switches CuPy to VMM pages.

>>> import cupy, vmmpool.cupy                                    # doctest: +SKIP
>>> cupy.cuda.set_allocator(vmmpool.cupy.MemoryPool().malloc)    # doctest: +SKIP

After that, existing CuPy code runs unchanged, and large allocations no
longer fail because a few long-lived small arrays pin whole segments: the
page pool stitches scattered free pages into a fresh contiguous range.

CuPy is optional: ``import vmmpool`` never imports it, and importing this
module without CuPy raises an ``ImportError`` that says what to install.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import os
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Any

try:
    import cupy as _cupy
except ImportError as _err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "vmmpool.cupy needs CuPy. Install the wheel matching your CUDA driver: "
        "pip install 'vmmpool[cupy]' (cupy-cuda13x) for CUDA 13, or "
        "pip install cupy-cuda12x for CUDA 12."
    ) from _err

from ._device import Device, DeviceLike
from ._errors import ClosedError, ForkedError, OutOfMemoryError
from ._options import brief, check_int
from ._pool import PagePool, PoolStats
from ._process import NoCopy, track
from ._resources import OpLock
from ._sizes import EXAMPLES, parse_fraction, parse_size

__all__ = ["MemoryPool", "set_allocator", "using_pool", "parse_limit"]


def _pool_limit(limit: int, page_size: int) -> int | None:
    """The page pool's limit for a CuPy-style limit (0: none; below a page: one page, and
    :meth:`MemoryPool.malloc` refuses every request)."""
    return None if limit == 0 else max(limit, page_size)


def parse_limit(text: str, total: int) -> int:
    """Parse a CuPy-style limit: a size (``"1073741824"``, ``"4GiB"``, ``"1.5 GB"``) or a
    percentage of the device's memory (``"50%"``).

    Sizes follow vmmpool's one grammar (binary ``K``/``KiB`` ..., decimal ``KB`` ...;
    see ``vmmpool._sizes``); CuPy itself takes bytes or a percentage, both accepted here.

    Parameters
    ----------
    text : str
        The value, as in ``CUPY_GPU_MEMORY_LIMIT``.
    total : int
        The device's total memory, for percentages.

    Returns
    -------
    int
        The limit in bytes (0 means no limit).

    Raises
    ------
    ValueError
        If `text` is neither; the message quotes at most the start of `text`.
    """
    s = text.rstrip()
    try:
        if s.endswith("%"):
            frac = parse_fraction(s[:-1]) / 100
            if frac > 1:
                raise ValueError
            return int(total * frac)
        return parse_size(s)
    except ValueError:
        raise ValueError(
            f"memory limit must be a size such as {EXAMPLES} or a percentage like '50%', "
            f"got {brief(text)}"
        ) from None


class MemoryPool(NoCopy):
    """A drop-in replacement for ``cupy.cuda.MemoryPool`` backed by :class:`~vmmpool.PagePool`.

    Parameters
    ----------
    device : Device-like, optional
        ``None`` (default) follows CuPy's current device at each ``malloc``,
        keeping one page pool per device; where CuPy has no GPU it means
        ``"host"`` and a ``UserWarning`` says that CuPy kernels will fail on
        that memory (pass ``"host"`` to say it is intended: no warning). A GPU without VMM support raises
        :class:`~vmmpool.DeviceUnavailableError` here. ``"host"`` (or an emulated
        :class:`~vmmpool.Device`) pins the pool to the host emulator, for
        tests and teaching on machines without a GPU: arrays can be created,
        sliced and dropped there, though no kernel can touch them.
    page_size : int, optional
        Page size of each page pool (default: the device's granularity).
    preallocate : int
        Bytes each page pool takes up front.
    keep_cached : bool
        Each page pool keeps its cached pages mapped until its limit needs them
        (see :class:`~vmmpool.PagePool`): no driver call in a loop once warm, as
        ``cupy.cuda.MemoryPool`` does, for more memory held.

    Notes
    -----
    ``malloc`` returns ``MemoryPointer(UnownedMemory(ptr, size, owner,
    device_id), 0)`` whose owner is the page pool's
    :class:`~vmmpool._pool.Allocation`: when CuPy drops the last array using
    the memory, the owner dies and the memory returns to the page pool. The
    allocation's stream is CuPy's current stream at ``malloc``, so the page
    pool's stream rule (same-stream reuse is immediate; other streams wait)
    matches CuPy's own.

    Not copyable or picklable (``TypeError``): it owns its page pools, and a
    copy sharing them would close them under the original.

    The limit honours ``CUPY_GPU_MEMORY_LIMIT`` (bytes or ``"N%"``) as CuPy
    does (and sizes such as ``"4GiB"``, see :func:`parse_limit`), per device,
    when a device's page pool is created.
    """

    def __init__(
        self,
        device: DeviceLike = None,
        *,
        page_size: int | None = None,
        preallocate: int = 0,
        keep_cached: bool = False,
    ) -> None:
        if not isinstance(keep_cached, bool):
            raise TypeError(f"keep_cached must be a bool, got {type(keep_cached).__name__}")
        self._keep_cached = keep_cached
        probe: Device | None = None  # a device to check page_size against now
        if device is None:
            if not _cupy.cuda.is_available():
                device = "host"  # no GPU for CuPy: there is no current device to follow
                warnings.warn(
                    "vmmpool.cupy.MemoryPool(): CuPy sees no GPU, so this pool uses the host "
                    "emulator; arrays can be created, sliced and dropped, but every CuPy kernel "
                    "on this memory (arithmetic, fill, repr, copies to NumPy) will fail. "
                    "Pass device='host' to say the host emulator is intended.",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                # Fail now, not at the first malloc, if the device lacks VMM support
                # (DeviceUnavailableError): never fall back to host memory that
                # CuPy's kernels would then be handed.
                probe = Device(_cupy.cuda.runtime.getDevice())
        self._pinned: Device | None = None if device is None else Device(device)
        if page_size is not None:
            # Checked here, not at the first malloc (inside CuPy's call): against the pinned
            # device or the current one (every device of one kind has the same granularity).
            dev = self._pinned if self._pinned is not None else probe
            assert dev is not None  # no GPU for CuPy: pinned to the host above
            g = dev.granularity
            page_size = check_int("page_size", page_size, minimum=g, multiple=g)
        self._page_size = page_size
        self._preallocate = check_int("preallocate", preallocate)
        dev = self._pinned if self._pinned is not None else probe
        if dev is not None and self._preallocate > dev.total_memory:
            # Here, not at the first malloc (inside CuPy's call, every one of which failed).
            raise ValueError(
                f"preallocate must not exceed the device's memory ({dev.total_memory} bytes), "
                f"got {self._preallocate}"
            )
        self._pools: dict[int, PagePool] = {}
        self._limits: dict[int, int] = {}  # device key -> explicit limit (0 = none)
        # Device key -> its limit, for pools whose limit is below one page: no allocation
        # can succeed there (the page pool itself holds at least one page).
        self._below_a_page: dict[int, int] = {}
        self._lock = OpLock()
        #: Page pools whose close() failed: the next close() resumes them.
        self._closing: list[PagePool] = []
        track(self)  # a forked child gets a lock of its own

    def _forked(self) -> None:
        """In a forked child: a new lock (a parent thread may have held this one at the fork).

        The page pools stay: they are the parent's and refuse use (``ForkedError``).
        """
        self._lock = OpLock()

    # ------------------------------------------------------------ devices
    def _current(self) -> tuple[int, Device]:
        """``(key, device)``: key -1 for a pinned device, else CuPy's current ordinal."""
        if self._pinned is not None:
            return (-1, self._pinned)
        ordinal = _cupy.cuda.runtime.getDevice()
        pool = self._pools.get(ordinal)
        return (ordinal, pool.device if pool is not None else Device(ordinal))

    def _limit_for(self, key: int, dev: Device) -> int:
        """The explicit limit of a device, else ``CUPY_GPU_MEMORY_LIMIT``'s, else 0."""
        limit = self._limits.get(key)
        if limit is None:
            env = os.environ.get("CUPY_GPU_MEMORY_LIMIT")
            limit = parse_limit(env, dev.total_memory) if env else 0
        return limit

    def _pool_for(self, key: int, dev: Device) -> PagePool:
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(key)
                if pool is None:
                    limit = self._limit_for(key, dev)
                    P = self._page_size or dev.granularity
                    pool_limit = _pool_limit(limit, P)
                    pre = self._preallocate
                    if pool_limit is not None:
                        # A limit below `preallocate` (set_limit before the first malloc, or
                        # CUPY_GPU_MEMORY_LIMIT) takes what it allows, as set_limit after the
                        # first malloc gives the pages above it back; it used to make every
                        # malloc raise ValueError.
                        pre = min(pre, pool_limit // P * P)
                    pool = PagePool(
                        dev,
                        limit=pool_limit,
                        page_size=self._page_size,
                        preallocate=pre,
                        keep_cached=self._keep_cached,
                    )
                    self._limits[key] = limit
                    self._note_limit(key, limit, pool.page_size)
                    # Copy on write: readers (used_bytes(), page_pools()) iterate the dict
                    # without the lock; inserting into it under them raised RuntimeError.
                    self._pools = {**self._pools, key: pool}
        return pool

    def _note_limit(self, key: int, limit: int, page_size: int) -> None:
        """Record whether `limit` is below one page (then every malloc fails); under the lock."""
        if 0 < limit < page_size:
            self._below_a_page[key] = limit
        else:
            self._below_a_page.pop(key, None)

    def _pool(self) -> PagePool:
        key, dev = self._current()
        return self._pool_for(key, dev)

    # ------------------------------------------------------------ allocator
    def malloc(self, nbytes: int) -> Any:
        """Allocate `nbytes` on the current device and stream; CuPy's allocator signature.

        Returns
        -------
        cupy.cuda.MemoryPointer

        Raises
        ------
        cupy.cuda.memory.OutOfMemoryError
            When the page pool cannot serve the request even after
            defragmenting and a garbage collection.
        """
        pinned = self._pinned
        # A CuPy stream other than the null stream is passed as the object, not its handle:
        # the page pool keeps it referenced while memory freed on it is cached there. CuPy
        # destroys a Stream it no longer references, and the pool records an event on the
        # stream of cached memory that leaves it (a raw handle must be retired first; see
        # PagePool.retire_stream): on a destroyed stream that is undefined behaviour.
        stream: Any
        if pinned is None:  # the hot path: two dict lookups, no Device() construction
            key = _cupy.cuda.runtime.getDevice()
            pool = self._pools.get(key) or self._pool_for(key, Device(key))
            stream = _cupy.cuda.get_current_stream()
            if not stream.ptr:
                stream = 0
        else:
            key = -1
            pool = self._pools.get(-1) or self._pool_for(-1, pinned)
            if pinned.is_host:
                stream = 0
            else:
                stream = _cupy.cuda.get_current_stream(pinned.ordinal)
                if not stream.ptr:
                    stream = 0
        device_id = pool.device.ordinal
        if type(nbytes) is not int:
            nbytes = check_int("nbytes", nbytes)  # a clear error, not a refusal that quotes it
        elif nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes == 0:
            return _cupy.cuda.MemoryPointer(_cupy.cuda.UnownedMemory(0, 0, None, device_id), 0)
        if self._below_a_page:
            tiny = self._below_a_page.get(key)
            if tiny is not None:
                # As CuPy: a limit no allocation fits refuses every allocation.
                raise _cupy.cuda.memory.OutOfMemoryError(
                    nbytes, pool.stats().allocated_bytes, tiny
                )
        try:
            alloc = pool.malloc(nbytes, stream)
        except ForkedError:
            raise
        except ClosedError:
            # The page pool was closed directly (``page_pools()[dev].close()``): a fresh one
            # serves this malloc and the next, as after this pool's own close(). Checked
            # here, not before the malloc, to keep the hot path free of it.
            if not pool.closed:
                raise
            with self._lock:
                if self._pools.get(key) is pool:
                    pools = dict(self._pools)
                    del pools[key]
                    self._pools = pools
            return self.malloc(nbytes)
        except OutOfMemoryError:
            # Arrays awaiting collection may hold memory, as CuPy's own pool assumes.
            gc.collect()
            try:
                alloc = pool.malloc(nbytes, stream)
            except OutOfMemoryError as err:
                # The limit as set (0: none, as CuPy reports it), not the page pool's
                # (the device's memory when no limit is set, or the limit rounded down).
                raise _cupy.cuda.memory.OutOfMemoryError(
                    nbytes, err.in_use, self._limits.get(key, 0)
                ) from err
        alloc._hold = True  # CuPy arrays use it while it lives: close() keeps it mapped
        if pool.closed:
            # close() ran in another thread after the malloc: it may have seen an
            # ordinary block (before the line above) and unmapped it. It marks the
            # pool closed before it looks at the blocks, so this test catches it.
            raise pool._core.closed_error()
        mem = _cupy.cuda.UnownedMemory(alloc.ptr, alloc.size, alloc, device_id)
        return _cupy.cuda.MemoryPointer(mem, 0)

    __call__ = malloc

    # ------------------------------------------------------ cupy's methods
    def _current_pool(self) -> PagePool | None:
        """The current device's page pool, if made yet (none is made here)."""
        if self._pinned is not None:
            return self._pools.get(-1)
        return self._pools.get(_cupy.cuda.runtime.getDevice())

    def free_all_blocks(self, stream: object = None) -> None:
        """Give the current device's cached free memory back to the driver.

        As ``cupy.cuda.MemoryPool.free_all_blocks``, only the current device's
        pool; unlike it, the free memory of every stream is released (the
        `stream` argument is accepted for compatibility): cached ranges are
        unmapped and their pages released (``PagePool.trim``).
        """
        pool = self._current_pool()
        if pool is not None:
            pool.trim()

    def used_bytes(self) -> int:
        """Bytes held by live allocations (with rounding) on the current device, as CuPy."""
        pool = self._current_pool()
        return 0 if pool is None else pool.stats().allocated_bytes

    def free_bytes(self) -> int:
        """Bytes the current device's pool holds but no allocation uses (cached ranges and
        free pages)."""
        pool = self._current_pool()
        if pool is None:
            return 0
        s = pool.stats()
        return s.cached_bytes + s.free_pages * s.page_size

    def total_bytes(self) -> int:
        """Bytes of physical pages the current device's pool holds
        (``used_bytes() + free_bytes()``)."""
        pool = self._current_pool()
        return 0 if pool is None else pool.stats().total_pages * pool.page_size

    def n_free_blocks(self) -> int:
        """Number of cached free blocks on the current device, as CuPy."""
        pool = self._current_pool()
        return 0 if pool is None else pool.stats().cached_blocks

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        """Limit the current device's pool, as ``cupy.cuda.MemoryPool.set_limit``.

        Parameters
        ----------
        size : int, optional
            Limit in bytes.
        fraction : float, optional
            Limit as a fraction (0 to 1) of the device's total memory.
            With neither, the limit is removed.

        Notes
        -----
        The page pool holds whole pages: the limit in force is rounded down
        to the page size, and a limit below one page (but above 0) makes every
        allocation fail with CuPy's ``OutOfMemoryError`` (CuPy's pool, of
        512-byte blocks, still serves requests that fit). All or nothing: when this raises (a bad value,
        or a driver error while pages above the new limit are given back),
        the old limit stays in force and :meth:`get_limit` reports it.
        """
        if size is not None and fraction is not None:
            raise ValueError(
                f"give size or fraction, not both (got size={brief(size)}, "
                f"fraction={brief(fraction)})"
            )
        key, dev = self._current()
        if fraction is not None:
            # Any real number (numpy.float32 too, as CuPy takes it); not a bool, not NaN.
            if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
                0 <= float(fraction) <= 1
            ):
                raise ValueError(
                    f"fraction must be between 0 and 1 (a real number), got "
                    f"{type(fraction).__name__} ({brief(fraction)})"
                )
            limit = int(dev.total_memory * float(fraction))
        elif size is not None:
            limit = check_int("size", size, maximum=dev.address_limit)
        else:
            limit = 0
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                # First the pool (it may raise: then nothing here changes), then the record.
                pool.set_limit(_pool_limit(limit, pool.page_size))
                self._note_limit(key, limit, pool.page_size)
            self._limits[key] = limit

    def get_limit(self) -> int:
        """The current device's limit in bytes, as set (the one in force); 0 means no limit."""
        key, dev = self._current()
        return self._limit_for(key, dev)

    # ----------------------------------------------------------- vmmpool
    def stats(self) -> PoolStats:
        """Statistics of the current device's page pool (see :class:`~vmmpool.PoolStats`).

        The page pool is made if this device has none yet (with its
        ``preallocate`` pages), as a first ``malloc`` would make it;
        :meth:`used_bytes` and the other CuPy methods make none.
        """
        return self._pool().stats()

    def page_pools(self) -> dict[Device, PagePool]:
        """The page pools created so far, by device.

        Closing one of them directly is allowed: the next ``malloc`` on its
        device makes a fresh page pool (as after :meth:`close`).
        """
        return {p.device: p for p in self._pools.values()}

    def close(self) -> None:
        """Close every page pool.

        Memory that live CuPy arrays still use stays mapped until the last of
        them is gone; everything else is released now. If a page pool's close
        fails, the error propagates after the others are closed, and calling
        ``close()`` again resumes it. A later ``malloc`` makes fresh page pools.
        """
        if self._lock.owned():
            # A finalizer (a user's __del__) that interrupted this pool's first malloc on a
            # device or its set_limit, in this thread: waiting for the lock hung forever.
            # Done when that operation ends.
            self._lock.defer(self.close)
            return
        with self._lock:
            pools = self._closing + list(self._pools.values())
            self._pools, self._closing = {}, []
        errors: list[BaseException] = []
        left: list[PagePool] = []
        for p in pools:
            try:
                p.close()
            except BaseException as err:  # noqa: BLE001 - close the others, then raise
                errors.append(err)
                left.append(p)  # kept for a retry (dropping it left its pages live)
        if left:
            with self._lock:
                self._closing.extend(left)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        where = "current CuPy device" if self._pinned is None else str(self._pinned)
        return f"<vmmpool.cupy.MemoryPool on {where}, {len(self._pools)} page pool(s)>"


class _Installed:
    """What :func:`set_allocator` returns: the pool, and a way to restore the previous allocator."""

    def __init__(self, pool: MemoryPool, previous: Any) -> None:
        self.pool = pool
        self.previous = previous

    def restore(self) -> None:
        """Put back the allocator that was installed before."""
        _cupy.cuda.set_allocator(self.previous)

    def __enter__(self) -> MemoryPool:
        return self.pool

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


def set_allocator(pool: MemoryPool | None = None) -> _Installed:
    """Make `pool` (a new :class:`MemoryPool` by default) CuPy's allocator, process-wide.

    Returns
    -------
    object
        ``.pool`` is the pool installed; ``.restore()`` puts back the previous
        allocator; used as a context manager it yields the pool and restores
        on exit.
    """
    pool = MemoryPool() if pool is None else pool
    if not isinstance(pool, MemoryPool):
        raise TypeError(f"pool must be a vmmpool.cupy.MemoryPool, got {type(pool).__name__}")
    previous = _cupy.cuda.get_allocator()
    _cupy.cuda.set_allocator(pool.malloc)
    return _Installed(pool, previous)


@contextlib.contextmanager
def using_pool(pool: MemoryPool | None = None) -> Iterator[MemoryPool]:
    """Use `pool` as CuPy's allocator in this thread, inside a ``with`` block.

    Built on ``cupy.cuda.using_allocator`` (thread-local); the previous
    allocator is restored on exit.
    """
    pool = MemoryPool() if pool is None else pool
    if not isinstance(pool, MemoryPool):
        raise TypeError(f"pool must be a vmmpool.cupy.MemoryPool, got {type(pool).__name__}")
    with _cupy.cuda.using_allocator(pool.malloc):
        yield pool


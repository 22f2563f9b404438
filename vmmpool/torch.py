"""vmmpool under PyTorch tensors: a pluggable allocator written in Python.

>>> import torch, vmmpool, vmmpool.torch                          # doctest: +SKIP
>>> pool = vmmpool.PagePool("cuda:0")                             # doctest: +SKIP
>>> with vmmpool.torch.use_pool(pool) as mem_pool:                # doctest: +SKIP
...     x = torch.empty(1 << 20, device="cuda")    # its segment comes from `pool`

PyTorch's CUDA caching allocator asks a ``torch.cuda.MemPool`` built on a
custom allocator for whole *segments* (2 MiB for small blocks, 20 MiB or more
for larger ones) through two C function pointers, and carves its tensors out of
them as usual. :func:`callbacks` makes those two pointers with ``ctypes``, so
nothing needs compiling:

* ``void* alloc(size_t size, int device, cudaStream_t stream)``: a block of the
  page pool on `stream` (``PagePool.malloc(size, stream)``), or NULL when the
  pool cannot serve it (PyTorch then frees the cached segments of its default
  pool and of MemPools no longer in use, retries, and raises
  ``torch.cuda.OutOfMemoryError``; the cached segments of a MemPool still alive
  are *not* given back: delete the MemPool for that). ``size == 0`` returns NULL without
  allocating (PyTorch's own allocator returns a null pointer for zero bytes; the
  caching allocator never asks a pool for 0), and ``free(NULL, ...)`` does nothing.
* ``void free(void* ptr, size_t size, int device, cudaStream_t stream)``: gives
  the block back, stream-ordered (reused at once by `stream`, by other streams
  once the pool's events say the work is done).

No Python exception ever crosses into C: failures are logged on the
``vmmpool.torch`` logger (out-of-memory at INFO, misuse at WARNING, bugs at
ERROR) and the callback returns NULL or does nothing.

Lifetime
--------
PyTorch keeps the raw addresses and may call them long after the
:class:`~vmmpool.PagePool` object, the ``MemPool`` and every Python name for
them are gone (cached segments are freed by a later ``empty_cache()``). So:

* the ``ctypes`` function objects of a pool's pair live for the rest of the
  process (a module-level registry; one pair per pool: two small ctypes thunks).
  A C function pointer cannot be revoked, and Python cannot observe when
  PyTorch drops its copy, so freeing one is never provably safe;
* the memory handed out is held by the pair (``ptr -> Allocation``, each
  allocation holding its pool): the pool lives while any of it is out, and the
  pair holds the pool only weakly otherwise, so a pool that nothing uses is
  collected (and closed) as usual; later calls of a pair whose pool is gone
  return NULL (alloc) or do nothing (free);
* allocations are marked as *held* (as the CuPy integration does):
  ``pool.close()`` keeps the arenas under them mapped, so tensors PyTorch still
  uses stay valid; a free after ``close()`` releases such an arena once the last
  held block in it is freed. Nothing else happens after close.

Free may run in any thread, inside a garbage collection, or while PyTorch
holds its allocator mutex: it never blocks on the pool's lock. It hands the
block to the pool's finalizer path (the same one a garbage-collected
:class:`~vmmpool.Allocation` takes): freed at once when the lock is free,
otherwise queued and freed by the thread holding the lock as it lets go.

The callbacks are Python: each call takes the GIL, and PyTorch makes them while it
holds its device allocator's mutex. PyTorch's own rule is the opposite order (GIL,
then allocator mutex: a thread that holds the GIL and frees a CUDA tensor, or calls
into the allocator without releasing the GIL, waits for the mutex). So while one
thread allocates a new segment in a vmmpool MemPool, another thread that holds the
GIL and touches the CUDA allocator deadlocks both. Use the MemPool where a single
Python thread does CUDA work, or where the other threads' CUDA frees cannot overlap
a segment allocation; a free-threaded build or a compiled shim would be needed
otherwise.

In a forked child, the pair refuses to allocate (NULL) and never frees: the
memory belongs to the parent.

On CUDA, each callback makes the device's primary context current on a thread
that has none (once per thread; the backend's own rule), so frees from threads
that never touched CUDA work too. A call for another device than the pool's
returns NULL.

``torch`` is optional: ``import vmmpool.torch`` and :func:`callbacks` need only
``ctypes``; :func:`MemPool` and :func:`use_pool` raise an ``ImportError`` naming
the extra (``pip install 'vmmpool[torch]'``) when PyTorch is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ._errors import AsleepError, ClosedError, OutOfMemoryError
from ._pool import Allocation, PagePool

__all__ = ["MemPool", "callbacks", "outstanding", "use_pool"]

logger = logging.getLogger("vmmpool.torch")

#: ``void* alloc(size_t size, int device, cudaStream_t stream)``
ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
#: ``void free(void* ptr, size_t size, int device, cudaStream_t stream)``
FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)

_INSTALL_HINT = "pip install 'vmmpool[torch]' (or a torch wheel matching your CUDA driver)"


def _quiet(level: int, msg: str, *args: object, exc_info: bool = False) -> None:
    """Log from inside a callback; never raise (not even while logging is torn down)."""
    try:
        logger.log(level, msg, *args, exc_info=exc_info)
    except BaseException:  # noqa: BLE001 - nothing may cross into C
        pass


def _enter(pool: PagePool) -> None:
    """On CUDA: make the device's primary context current on a thread that has none.

    The backend's own rule (once per thread, a thread-local check afterwards): a
    callback may run on a thread that never touched CUDA (a free from a finalizer).
    """
    ctx = getattr(pool.device._backend, "_ctx", None)
    if ctx is not None:
        ctx()


class _Pair:
    """The two C callbacks of one pool, and the memory they handed out.

    Holds the pool weakly, each live :class:`~vmmpool.Allocation` strongly (so
    the pool lives while PyTorch holds any of its memory).
    """

    def __init__(self, pool: PagePool) -> None:
        self._pool: Callable[[], PagePool | None] = weakref.ref(pool)
        dev = pool.device
        self.device = str(dev)
        #: The CUDA ordinal PyTorch must name; None on the host emulator (any).
        self.ordinal: int | None = None if dev.is_host else dev.ordinal
        self.pid = os.getpid()
        self.live: dict[int, Allocation] = {}
        #: The torch allocator object made from this pair (MemPool), once made.
        self.torch_allocator: Any = None
        self.mem_pool: Any = None  # weakref to the last MemPool use_pool made
        #: id() -> how many use_pool blocks (any thread) are inside that MemPool now.
        self.entered: dict[int, int] = {}
        self.alloc_fn = ALLOC_FN(self._alloc)
        self.free_fn = FREE_FN(self._free)
        self.alloc_address = int(ctypes.cast(self.alloc_fn, ctypes.c_void_p).value or 0)
        self.free_address = int(ctypes.cast(self.free_fn, ctypes.c_void_p).value or 0)

    # --------------------------------------------------------- the callbacks
    def _alloc(self, size: int, device: int, stream: int | None) -> int | None:
        try:
            if sys.is_finalizing():
                return None
            if size == 0:
                return None  # documented: no memory for zero bytes, nothing to free
            if os.getpid() != self.pid:
                _quiet(logging.WARNING, "vmmpool.torch alloc in a forked child: NULL (the pool "
                       "belongs to the parent process)")
                return None
            pool = self._pool()
            if pool is None:
                _quiet(logging.WARNING, "vmmpool.torch alloc of %d bytes: the pool on %s is gone "
                       "(garbage collected); returning NULL", size, self.device)
                return None
            if self.ordinal is not None and device != self.ordinal:
                _quiet(logging.WARNING, "vmmpool.torch alloc of %d bytes for cuda:%d, but the pool "
                       "is on %s; returning NULL", size, device, self.device)
                return None
            if self.ordinal is not None:
                _enter(pool)
            try:
                a = pool.malloc(size, stream or 0)
            except OutOfMemoryError as err:
                _quiet(logging.INFO, "vmmpool.torch alloc of %d bytes on stream %#x: %s; returning "
                       "NULL (PyTorch frees the cached segments of its default pool and of "
                       "MemPools no longer in use and retries, or raises its OutOfMemoryError)",
                       size, stream or 0, err)
                return None
            except ClosedError:
                _quiet(logging.WARNING, "vmmpool.torch alloc of %d bytes: the pool on %s is "
                       "closed; returning NULL", size, self.device)
                return None
            except AsleepError:
                _quiet(logging.WARNING, "vmmpool.torch alloc of %d bytes: the pool on %s is "
                       "asleep (wake() it first); returning NULL", size, self.device)
                return None
            a._hold = True  # PyTorch uses it until it calls free: close() keeps it mapped
            if pool.closed:
                # close() ran in another thread after the malloc: it may have seen an
                # ordinary block (before the line above) and unmapped it. It marks the
                # pool closed before it looks at the blocks, so this test catches it.
                _quiet(logging.WARNING, "vmmpool.torch alloc of %d bytes: the pool on %s was "
                       "closed meanwhile; returning NULL", size, self.device)
                return None
            ptr = a.ptr
            self.live[ptr] = a
            return ptr
        except BaseException:  # noqa: BLE001 - nothing may cross into C
            _quiet(logging.ERROR, "vmmpool.torch alloc of %s bytes failed; returning NULL",
                   size, exc_info=True)
            return None

    def _free(self, ptr: int | None, size: int, device: int, stream: int | None) -> None:
        try:
            if not ptr or sys.is_finalizing():
                return
            if os.getpid() != self.pid:
                return  # the parent's memory: a child never releases it
            a = self.live.pop(ptr, None)
            if a is None:
                _quiet(logging.WARNING, "vmmpool.torch free of %#x (%d bytes): not allocated by this "
                       "allocator, or freed twice; ignored", ptr, size)
                return
            if size != a.size or (self.ordinal is not None and device != self.ordinal):
                _quiet(logging.WARNING, "vmmpool.torch free of %#x: %d bytes on device %d, but it was "
                       "allocated as %d bytes on %s; freed anyway", ptr, size, device, a.size,
                       self.device)
            if self.ordinal is not None and not a.pool.closed:
                _enter(a.pool)
            # Dropping the last reference hands the block to the pool's finalizer
            # path, which never blocks: freed now if the pool's lock is free, else
            # queued for the thread holding the lock, done as it lets go (this may run inside a garbage
            # collection, or in a thread while another holds the lock and waits
            # on PyTorch's allocator mutex). After close() it releases the arena
            # the block kept mapped, once no held block remains in it.
            del a
        except BaseException:  # noqa: BLE001 - nothing may cross into C
            _quiet(logging.ERROR, "vmmpool.torch free of %s failed", ptr, exc_info=True)


#: Every pair ever made, for the life of the process (see "Lifetime").
_PAIRS: list[_Pair] = []
#: The pair of each pool (weakly keyed: a pool that is gone has no entry).
_BY_POOL: weakref.WeakKeyDictionary[PagePool, _Pair] = weakref.WeakKeyDictionary()
#: Re-entrant: making a pair (ctypes thunks) allocates, so the garbage collector may run a
#: finalizer there that asks for callbacks; the nested call's pair is then the one kept.
_LOCK = threading.RLock()


def _new_lock_in_child() -> None:
    # After os.fork(), in the child: a parent thread may have held the lock at the fork,
    # and the child's own pools must still get their callbacks (issue 17).
    global _LOCK
    _LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _pair(pool: PagePool) -> _Pair:
    if not isinstance(pool, PagePool):
        raise TypeError(f"pool must be a vmmpool.PagePool, got {type(pool).__name__}")
    if pool.closed:
        raise pool._core.closed_error()  # ForkedError in a forked child
    with _LOCK:
        pair = _BY_POOL.get(pool)
        if pair is None:
            made = _Pair(pool)
            pair = _BY_POOL.get(pool)  # a finalizer inside _Pair() may have made one
            if pair is None:
                pair = made
                _PAIRS.append(pair)
                _BY_POOL[pool] = pair
        return pair


def callbacks(pool: PagePool) -> tuple[int, int]:
    """The C function pointers of PyTorch's pluggable-allocator ABI for `pool`.

    Parameters
    ----------
    pool : PagePool
        The pool to allocate from (open).

    Returns
    -------
    (alloc_address, free_address) : tuple of int
        Addresses of ``void* alloc(size_t, int, cudaStream_t)`` and
        ``void free(void*, size_t, int, cudaStream_t)``, for
        ``torch._C._cuda_customAllocator(alloc_address, free_address)``. The same
        pair for every call with the same pool; it stays callable for the rest
        of the process (see the module docstring, "Lifetime").

    Raises
    ------
    TypeError
        `pool` is not a :class:`~vmmpool.PagePool`.
    ClosedError
        The pool is closed.
    """
    pair = _pair(pool)
    return pair.alloc_address, pair.free_address


def outstanding(pool: PagePool) -> int:
    """How many blocks the callbacks of `pool` handed out and PyTorch has not freed yet.

    Returns 0 for a pool whose callbacks were never made.
    """
    if not isinstance(pool, PagePool):
        raise TypeError(f"pool must be a vmmpool.PagePool, got {type(pool).__name__}")
    pair = _BY_POOL.get(pool)
    return 0 if pair is None else len(pair.live)


# ------------------------------------------------------------------ torch
def _torch() -> Any:
    """Import torch, or raise an ImportError that names the extra to install."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"vmmpool.torch.MemPool and use_pool need PyTorch: {_INSTALL_HINT}. "
            "callbacks() works without it."
        ) from err
    return torch


def _torch_version(torch: Any) -> tuple[int, int] | None:
    """(major, minor) of ``torch.__version__``, or None when it does not parse."""
    parts = str(getattr(torch, "__version__", "")).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        return None


def _mem_pool_class(torch: Any) -> Any:
    version = getattr(torch, "__version__", "?")
    known = _torch_version(torch)
    if known is not None and known < (2, 8):
        # Before 2.8 (MemPoolContext, removed by pytorch/pytorch#154746) PyTorch frees a
        # custom-allocator MemPool's segment with the custom free only while that MemPool
        # is the thread's active one (2.6, 2.7) or never (2.5); otherwise it calls
        # cudaFree on the pool's memory (pytorch/pytorch#146431).
        raise ImportError(
            f"vmmpool.torch.MemPool needs PyTorch 2.8 or later, got {version}: older versions "
            "free a custom MemPool's segments with cudaFree outside its use_mem_pool block"
        )
    cls = getattr(torch.cuda, "MemPool", None) or getattr(torch.cuda.memory, "MemPool", None)
    if cls is None:
        raise ImportError(
            f"torch {version} has no torch.cuda.MemPool "
            "(added in PyTorch 2.5): upgrade PyTorch"
        )
    return cls


def MemPool(pool: PagePool) -> Any:
    """A ``torch.cuda.MemPool`` whose segments come from `pool`.

    Parameters
    ----------
    pool : PagePool
        An open pool on a CUDA device.

    Returns
    -------
    torch.cuda.MemPool
        Built with ``torch.cuda.MemPool(torch._C._cuda_customAllocator(*callbacks(pool)))``
        (one PyTorch allocator object per pool, shared by its MemPools). Route
        allocations to it with ``torch.cuda.use_mem_pool`` or :func:`use_pool`.

    Raises
    ------
    ImportError
        PyTorch is not installed (the message names ``vmmpool[torch]``), or is
        older than 2.8 (before 2.8 PyTorch frees a custom MemPool's segments with
        ``cudaFree`` outside its ``use_mem_pool`` block).
    TypeError
        `pool` is not a :class:`~vmmpool.PagePool`.
    ValueError
        `pool` is on the host emulator (PyTorch's CUDA kernels cannot use it).
    ClosedError
        `pool` is closed.
    """
    torch = _torch()
    cls = _mem_pool_class(torch)
    if isinstance(pool, PagePool) and pool.device.is_host:
        # Before _pair(): a refused pool must not get a pair (its thunks live for the process).
        raise ValueError(
            f"vmmpool.torch.MemPool needs a pool on a CUDA device, got one on {pool.device} "
            "(the host emulator): CUDA tensors cannot live there. callbacks() works on any pool."
        )
    pair = _pair(pool)
    with _LOCK:
        if pair.torch_allocator is None:
            made = torch._C._cuda_customAllocator(pair.alloc_address, pair.free_address)
            if pair.torch_allocator is None:  # (a finalizer in the call may have made one)
                pair.torch_allocator = made
        allocator = pair.torch_allocator
    # PyTorch registers a MemPool's allocator on the device current at construction
    # (MemPool::MemPool: device_ = current_device(); createOrIncrefPool(device_, ...)):
    # built while another device is current, the pool's own device would get a plain
    # cudaMalloc private pool for the same id, and nothing would come from `pool`.
    with torch.cuda.device(pool.device.ordinal):
        return cls(allocator)


@contextlib.contextmanager
def use_pool(pool: PagePool, device: object = None) -> Iterator[Any]:
    """Route this thread's CUDA allocations on `device` to `pool` inside a ``with`` block.

    Parameters
    ----------
    pool : PagePool
        An open pool on a CUDA device.
    device : torch.device, str, int or None
        ``None`` (default) means the pool's device; anything that names another
        device (``"cuda"`` and ``torch.device("cuda")`` name the current one) is
        refused (``ValueError``). ``torch.cuda.use_mem_pool`` gets the pool's ordinal.

    Yields
    ------
    torch.cuda.MemPool
        The MemPool in use: the one the previous ``use_pool`` of this pool
        yielded if it is still referenced and no ``use_pool`` block (of any
        thread) is inside it now, else a new :func:`MemPool` (PyTorch refuses to
        enter one MemPool twice at once). Keep it to reuse its cached segments in
        a later block.

    Notes
    -----
    ``torch.cuda.use_mem_pool`` routes only the current thread (autograd's
    backward threads allocate outside the pool; see the README).
    """
    torch = _torch()
    if not isinstance(pool, PagePool):
        raise TypeError(f"pool must be a vmmpool.PagePool, got {type(pool).__name__}")
    if pool.device.is_host:
        MemPool(pool)  # raises its ValueError before a pair is made
    ordinal = pool.device.ordinal
    if device is not None:
        dev = torch.device(device) if isinstance(device, str) else device
        index = getattr(dev, "index", dev)  # a torch.device or an int
        kind = getattr(dev, "type", "cuda")  # torch.device("cpu") names no CUDA device
        if index is None and kind == "cuda":  # torch.device("cuda"): the current device
            index = torch.cuda.current_device()
        if kind != "cuda" or isinstance(index, bool) or not isinstance(index, int) or index != ordinal:
            raise ValueError(
                f"device must be the pool's device (cuda:{ordinal}), got {device!r}: the pool's "
                "callbacks answer NULL for any other device"
            )
    pair = _pair(pool)
    with _LOCK:
        # PyTorch refuses to enter a MemPool that is already entered on the device, by any
        # thread ("beginAllocateToPool: already recording to mempool_id", after counting a
        # use it never gives back): reuse the last MemPool only while no block is inside it.
        ref = pair.mem_pool
        mp = ref() if ref is not None else None
        if mp is not None and pair.entered.get(id(mp)):
            mp = None
    if mp is None:
        mp = MemPool(pool)
        try:
            ref = weakref.ref(mp)
        except TypeError:  # a MemPool type without weak references: no reuse
            ref = None
        with _LOCK:
            pair.mem_pool = ref
    key = id(mp)
    with _LOCK:
        pair.entered[key] = pair.entered.get(key, 0) + 1
    try:
        use = getattr(torch.cuda, "use_mem_pool", None) or torch.cuda.memory.use_mem_pool
        with use(mp, ordinal):
            yield mp
    finally:
        with _LOCK:
            left = pair.entered[key] - 1
            if left:
                pair.entered[key] = left
            else:
                del pair.entered[key]

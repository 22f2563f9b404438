"""Sharing device memory with another process.

:meth:`GrowableBuffer.share() <vmmpool.GrowableBuffer.share>` and
:meth:`Allocation.share() <vmmpool.Allocation.share>` return a
:class:`SharedMemoryHandle`: a small picklable object that holds one POSIX file
descriptor per physical page (``cuMemExportToShareableHandle``; on the host
emulator, the page's own memfd) and the write end of a *lease* pipe. Sent
through :mod:`multiprocessing` (spawn or forkserver context, ``Queue``,
``Pipe`` or process arguments), its descriptors travel as SCM_RIGHTS messages
(``multiprocessing.reduction.DupFd``): no ptrace and no pidfd, so it works in
containers that deny both. :meth:`SharedMemoryHandle.open` imports the pages
(``cuMemImportFromShareableHandle``), reserves an address range of its own,
maps them and grants read-write access: a :class:`SharedMapping`.

Lifetimes (driver rule 7 in ``VMM_DESIGN.md``). Physical memory lives while any
handle or mapping of it exists, in any process: the receiver keeps what it
maps when the owner frees, shrinks, closes or exits, and the owner keeps its
memory when the receiver closes or exits. Shareable memory is therefore
created with a handle of its own per page: with ``shareable=True`` every host
emulator page is its own memfd (not a slot of a shared chunk whose holes are
punched on release), and every CUDA page requests
``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``.

The lease. The owner keeps the read end of one pipe per :meth:`share` call;
every copy of the handle and every mapping opened from one holds a copy of the
write end. When the last of them is closed, in every process (a process that
exits closes its copies), the read end reports end-of-file: the operating
system counts the receivers, so no message has to come back. A pool uses this
to keep a shared allocation's bytes out of reuse until every receiver is done
(see :meth:`vmmpool.Allocation.share`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

from numpy.typing import DTypeLike

from ._device import Device, DeviceLike
from ._dlpack import ArrayView
from ._errors import ClosedError, ForkedError
from ._logq import QueuedLogger
from ._options import check_int, host_bytes
from ._process import track
from ._resources import ClosesOnExit, OpLock, PhysicalAllocation, reserve, safety_finalizer

# Queued while this thread holds a pool's lock (see _logq): never a logging lock there.
_log = QueuedLogger("vmmpool")

__all__ = ["SharedMemoryHandle", "SharedMapping", "Lease", "check_shareable", "not_shareable"]


def _close_fds(fds: list[int]) -> None:
    """Close every descriptor in `fds` and empty the list (safe from finalizers)."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


def _fd_ids(fds: list[int]) -> list[tuple[int, int] | None]:
    """What each descriptor of `fds` refers to now (device and inode; None when closed)."""
    out: list[tuple[int, int] | None] = []
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino))
    return out


def _close_same_fds(fds: list[int], ids: list[tuple[int, int] | None]) -> None:
    """In a forked child: close the descriptors of `fds` that still refer to what they did at
    the fork, and empty the list.

    The child may have closed its inherited descriptors and reused their numbers for files
    of its own (a daemon, a worker that sanitises its descriptors): closing by number from
    a finalizer would close those.
    """
    want = dict(zip(fds, ids, strict=False))
    while fds:
        fd = fds.pop()
        ident = want.get(fd)
        if ident is not None and _fd_ids([fd])[0] == ident:
            try:
                os.close(fd)
            except OSError:
                pass


def _guard_fds_in_child(obj: Any, fds: list[int]) -> None:
    """In a forked child (the fork hook): make `obj`'s safety net close `fds` only while each
    still refers to what it did at the fork (see :func:`_close_same_fds`)."""
    if obj._fin.detach() is not None:
        obj._fin = safety_finalizer(obj, _close_same_fds, fds, _fd_ids(fds))


def not_shareable(what: str) -> ValueError:
    """The error of ``share()`` on memory that was not created shareable."""
    return ValueError(
        f"{what} was not created shareable; create it with shareable=True "
        f"(for example PagePool(..., shareable=True) or GrowableBuffer(..., shareable=True)) "
        "to share it with another process"
    )


def check_shareable(device: Device) -> None:
    """Raise ``ValueError`` unless `device` can export physical memory as POSIX fds.

    The device attribute (``CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED``)
    is checked first. On CUDA one exportable page is then created and released (once per
    device): some drivers report the attribute but refuse the handle type at ``cuMemCreate``
    (in some containers), and only a real ``cuMemCreate`` tells.
    """
    if not device.supports_posix_fd:
        raise ValueError(
            f"{device} does not support POSIX file descriptor handles "
            "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED is 0, or cuMemCreate "
            "refused the handle type): shareable=True needs them"
        )
    backend = device._backend
    if device.is_host or getattr(backend, "_posix_fd_probed", False):
        return
    from ._resources import create

    probe = create(device.granularity, device, handle_type="posix_fd")
    probe.close()
    if not device.supports_posix_fd:  # the driver fell back to no handle type
        raise ValueError(
            f"{device} reports POSIX file descriptor support, but cuMemCreate refused the "
            "handle type (CUDA_ERROR_NOT_PERMITTED or NOT_SUPPORTED, as in some containers): "
            "shareable=True cannot work here"
        )
    backend._posix_fd_probed = True  # type: ignore[attr-defined]


class Lease:
    """The owner's end of a share: reports when every receiver is done.

    Holds the read end of a pipe whose write end travels with the handle. Nobody
    writes to it: :meth:`done` is true once every copy of the write end, in every
    process, is closed.
    """

    __slots__ = ("_fds", "_fin", "writer", "__weakref__")

    def __init__(self) -> None:
        r, w = os.pipe()  # both non-inheritable (PEP 446)
        os.set_blocking(r, False)
        self._fds = [r]
        self._fin = safety_finalizer(self, _close_fds, self._fds)
        #: The write end: owned by the handle made with this lease.
        self.writer = w
        track(self)

    def _forked(self) -> None:
        """In a forked child: never close a descriptor number the child may have reused."""
        _guard_fds_in_child(self, self._fds)

    def done(self) -> bool:
        """True once every handle and mapping of this share is closed, everywhere."""
        if not self._fds:
            return True
        # Nobody should write, but a receiver holds a writable end: bytes written there are
        # drained (a pipe holds 64 KiB by default), not read one per call, which kept the
        # lease alive for as many calls as bytes were written after every receiver was done.
        for _ in range(4):
            try:
                data = os.read(self._fds[0], 1 << 16)
            except BlockingIOError:
                return False
            if not data:
                return True
        return False

    def close(self) -> None:
        """Close the read end (idempotent)."""
        self._fin()  # its safety net's work (in a forked child, the guarded one)

    def ended(self) -> bool:
        """:meth:`done`, and then the read end closed (the owner needs it no more)."""
        if self.done():
            self.close()
            return True
        return False


_SOURCES = ("GrowableBuffer", "Allocation")


def _check_meta(meta: object, n_pages: int) -> tuple[Any, ...]:
    """Raise ``ValueError`` unless `meta` describes `n_pages` pages consistently (a received handle).

    A handle arrives from another process: its sizes decide what ``open()`` maps and what
    ``read``/``write``/``view`` reach, so bytes claimed beyond the pages it carries would
    reach memory outside the mapping (a view of them crashes the process).
    """
    if not isinstance(meta, tuple) or len(meta) != 6:
        raise ValueError(
            f"malformed SharedMemoryHandle: metadata must be a 6-tuple, got {meta!r:.80}"
        )
    nbytes, offset, page_size, kind, ordinal, source = meta

    def _int(name: str, v: object) -> int:
        if type(v) is not int:
            raise ValueError(
                f"malformed SharedMemoryHandle: {name} must be an int, got {type(v).__name__}"
            )
        return v

    nbytes = _int("nbytes", nbytes)
    offset = _int("offset", offset)
    page_size = _int("page_size", page_size)
    ordinal = _int("device_ordinal", ordinal)
    if n_pages < 1:
        raise ValueError("malformed SharedMemoryHandle: it carries no page descriptor")
    if page_size <= 0:
        raise ValueError(f"malformed SharedMemoryHandle: page_size must be > 0, got {page_size}")
    if not 0 <= offset < page_size:
        raise ValueError(
            f"malformed SharedMemoryHandle: offset must be in [0, page_size={page_size}), got {offset}"
        )
    if nbytes < 0 or offset + nbytes > n_pages * page_size:
        raise ValueError(
            f"malformed SharedMemoryHandle: {nbytes} bytes at offset {offset} must fit in its "
            f"{n_pages} page(s) of {page_size} bytes ({n_pages * page_size} bytes)"
        )
    if kind not in ("host", "cuda"):
        raise ValueError(
            f"malformed SharedMemoryHandle: device kind must be 'host' or 'cuda', got {kind!r:.40}"
        )
    if ordinal < 0:
        raise ValueError(f"malformed SharedMemoryHandle: device_ordinal must be >= 0, got {ordinal}")
    if source not in _SOURCES:
        raise ValueError(
            f"malformed SharedMemoryHandle: source must be one of {_SOURCES}, got {source!r:.40}"
        )
    return (nbytes, offset, page_size, kind, ordinal, source)


def _rebuild_handle(meta: tuple[Any, ...], dup_fds: Sequence[Any], dup_lease: Any) -> SharedMemoryHandle:
    """Unpickle a handle: receive its descriptors (SCM_RIGHTS), check it and own them.

    Received descriptors are made non-inheritable (SCM_RIGHTS and a spawned child's
    inherited ones are inheritable): a program the receiver runs (``os.system``,
    ``subprocess`` with ``close_fds=False``) would otherwise hold the lease and the pages
    for as long as it runs.
    """
    got: list[int] = []
    try:
        n = len(dup_fds)
        try:
            for d in dup_fds:
                got.append(d.detach())
            got.append(dup_lease.detach())
        except EOFError as err:  # multiprocessing's own words are empty here
            raise EOFError(
                "SharedMemoryHandle: the sending process has no descriptors for these bytes: "
                "a pickled handle can be received once (send it again for another receiver)"
            ) from err
        except ConnectionError as err:
            raise type(err)(
                err.errno,
                "SharedMemoryHandle: cannot receive the descriptors: the sending process "
                f"has exited (a handle is received while its sender lives): {err.strerror}",
            ) from err
        for fd in got:
            os.set_inheritable(fd, False)
        meta = _check_meta(meta, n)
    except BaseException:
        _close_fds(got)
        raise
    lease = got.pop()
    return SharedMemoryHandle._from_fds(meta, got, lease)


class SharedMemoryHandle(ClosesOnExit):
    """A picklable handle to device memory shared with other processes.

    Made by :meth:`vmmpool.GrowableBuffer.share` or
    :meth:`vmmpool.Allocation.share`; send it to another process through
    :mod:`multiprocessing` (a ``Queue``, a ``Pipe`` or process arguments, in the
    spawn or forkserver context) and call :meth:`open` there.

    Attributes
    ----------
    nbytes : int
        Bytes shared: the buffer's size, or the allocation's size, when
        :meth:`share` was called. A buffer that grows later is not seen beyond
        this by receivers of this handle (share it again for the new size).
    offset : int
        Where the shared bytes start in the first page (0 for a buffer; an
        allocation's offset in its first page).
    page_size : int
        Bytes per physical page (one descriptor each).
    n_pages : int
        Pages shared (descriptors held).
    device_kind : str
        ``"host"`` or ``"cuda"``.
    device_ordinal : int
        The owner's device ordinal.
    source : str
        ``"GrowableBuffer"`` or ``"Allocation"``.

    Notes
    -----
    Pickling duplicates the descriptors through ``multiprocessing.reduction``:
    it works only inside :mod:`multiprocessing` (the receiving process must share
    the sender's authentication key, as multiprocessing's children do). Plain
    copies are refused. The handle owns its descriptors: :meth:`close` (or
    garbage collection) closes them; mappings already opened stay valid.

    A process forked (not spawned) while a handle or mapping exists inherits its
    descriptors and counts as a receiver until it exits.
    """

    nbytes: int
    offset: int
    page_size: int
    n_pages: int
    device_kind: str
    device_ordinal: int
    source: str
    _fds: list[int]
    _lock: OpLock
    _fin: weakref.finalize

    def __init__(self) -> None:  # pragma: no cover - made by share() and unpickling only
        raise TypeError("SharedMemoryHandle objects are made by share(); they are not constructed")

    @classmethod
    def _from_fds(cls, meta: tuple[Any, ...], fds: list[int], lease: int) -> SharedMemoryHandle:
        self = object.__new__(cls)
        (
            self.nbytes,
            self.offset,
            self.page_size,
            self.device_kind,
            self.device_ordinal,
            self.source,
        ) = meta
        self.n_pages = len(fds)
        self._fds = list(fds)
        self._fds.append(lease)  # the lease's write end, last
        self._lock = OpLock()
        self._fin = safety_finalizer(self, _close_fds, self._fds)
        track(self)  # a forked child may open its copy: it gets a lock of its own
        return self

    def _forked(self) -> None:
        """In a forked child: a new lock (a parent thread may have held this one at the fork),
        and a safety net that never closes a descriptor number the child reused."""
        self._lock = OpLock()
        _guard_fds_in_child(self, self._fds)

    @classmethod
    def _make(
        cls,
        device: Device,
        source: str,
        pages: Sequence[PhysicalAllocation],
        nbytes: int,
        offset: int,
        page_size: int,
    ) -> tuple[SharedMemoryHandle, Lease]:
        """Export `pages` (all or nothing) and start a lease; the caller keeps the lease."""
        fds: list[int] = []
        try:
            for p in pages:
                fds.append(p.export())
                os.set_inheritable(fds[-1], False)  # a driver's export may be inheritable
            lease = Lease()
        except BaseException:
            _close_fds(fds)
            raise
        meta = (nbytes, offset, page_size, device.kind, device.ordinal, source)
        return cls._from_fds(meta, fds, lease.writer), lease

    def _meta(self) -> tuple[Any, ...]:
        return (
            self.nbytes,
            self.offset,
            self.page_size,
            self.device_kind,
            self.device_ordinal,
            self.source,
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return not self._fin.alive

    def _check_open(self) -> None:
        if not self._fin.alive:
            raise ClosedError("SharedMemoryHandle")

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        from multiprocessing import reduction

        with self._lock:
            self._check_open()
            fds = self._fds
            dups = [reduction.DupFd(fd) for fd in fds[:-1]]
            lease = reduction.DupFd(fds[-1])
        return (_rebuild_handle, (self._meta(), dups, lease))

    def __copy__(self) -> SharedMemoryHandle:
        raise TypeError(
            "SharedMemoryHandle cannot be copied: send it through multiprocessing (a Queue, a Pipe "
            "or process arguments), or open() it again in this process"
        )

    def __deepcopy__(self, memo: object) -> SharedMemoryHandle:
        return self.__copy__()

    def _device(self, device: DeviceLike) -> Device:
        if device is None:
            dev = Device("host") if self.device_kind == "host" else Device(self.device_ordinal)
        else:
            dev = Device(device)
        if dev.kind != self.device_kind:
            raise ValueError(
                f"the shared memory lives on a {self.device_kind} device, got device {dev}"
            )
        if self.page_size % dev.granularity:
            raise ValueError(
                f"page_size {self.page_size} of the shared memory is not a multiple of {dev}'s "
                f"granularity {dev.granularity}"
            )
        return dev

    def open(self, device: DeviceLike = None) -> SharedMapping:
        """Map the shared memory read-write in this process, at an address of its own.

        Parameters
        ----------
        device : Device-like, optional
            Where the memory lives, seen from this process. Default: the host
            emulator (``Device("host")``) for host memory, ``Device(ordinal)``
            with the owner's ordinal for CUDA memory (pass the device when the
            ordinals differ between the processes, as with different
            ``CUDA_VISIBLE_DEVICES``).

        Returns
        -------
        SharedMapping
            :attr:`~SharedMapping.nbytes` bytes (:attr:`nbytes`) at its own
            address. The handle may be opened again (each mapping is
            independent) and closed at once: mappings stay valid.

        Raises
        ------
        ClosedError
            The handle was closed.
        ValueError
            `device` is of another kind, or its granularity does not divide
            :attr:`page_size`.
        OutOfMemoryError, DriverError
            Import, reservation or mapping failed; nothing is left behind.
        """
        with self._lock:
            self._check_open()
            dev = self._device(device)
            P = self.page_size
            n = self.n_pages
            allocs: list[PhysicalAllocation] = []
            res = None
            lease = -1
            try:
                for fd in self._fds[:-1]:
                    allocs.append(PhysicalAllocation.from_fd(fd, P, dev))
                res = reserve(n * P, dev)
                for i, a in enumerate(allocs):
                    res.map(a, i * P)
                res.set_access(0, n * P, "rw")
                lease = os.dup(self._fds[-1])
            except BaseException:
                if res is not None:
                    res.close()
                for a in allocs:
                    a.close()
                raise
            # The mappings keep the memory alive (rule 7): the import handles may go now.
            for a in allocs:
                a.close()
            return SharedMapping(self, dev, res, lease)

    def close(self) -> None:
        """Close the handle's descriptors (idempotent). Mappings opened from it stay valid."""
        if self._lock.owned():
            # A finalizer (a user's __del__) that interrupted open() or pickling of this
            # handle in this thread: waiting for the lock hung forever, and closing the
            # descriptors under them would break them. Done when that operation ends.
            if self._fin.alive:
                self._lock.defer(self.close)
            return
        with self._lock:
            self._fin()  # closes the descriptors once (in a forked child, the guarded way)

    def __enter__(self) -> SharedMemoryHandle:
        self._check_open()
        return self

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<SharedMemoryHandle of a {self.source}: {self.nbytes} bytes at offset {self.offset} "
            f"of {self.n_pages} page(s) of {self.page_size} bytes on {self.device_kind}"
            f"{'' if self.device_kind == 'host' else ':' + str(self.device_ordinal)}{state}>"
        )


def _unmap(res: Any, lease: list[int], pid: int) -> None:
    """A mapping's finalizer: unmap and free its range, close its lease copy."""
    if os.getpid() != pid:  # a forked child never releases its parent's memory
        _close_fds(lease)  # its own copy of the descriptor
        return
    try:
        res.close()
    finally:
        _close_fds(lease)


class SharedMapping(ClosesOnExit):
    """Shared memory mapped in this process (from :meth:`SharedMemoryHandle.open`).

    Attributes
    ----------
    address : int
        First shared byte in this process (differs from the owner's address).
    nbytes : int
        Bytes shared (the handle's :attr:`~SharedMemoryHandle.nbytes`).
    device : Device
        Where the memory lives.

    Notes
    -----
    Writes through either side are visible to the other (device memory is the
    same). :meth:`close` unmaps and frees the address range; the physical memory
    lives on while the owner or another receiver maps or holds it. A mapping
    is a context manager; it cannot be pickled or copied (send the handle).
    In a forked child an inherited mapping raises :class:`~vmmpool.ForkedError`
    (its ``close()`` does nothing there); the child may open its copy of the
    handle instead.
    """

    def __init__(self, handle: SharedMemoryHandle, device: Device, res: Any, lease: int) -> None:
        self.device = device
        self.nbytes = handle.nbytes
        self.source = handle.source
        self._res = res
        self._address = res.address + handle.offset
        self._lease = [lease]
        self._views: weakref.WeakSet[ArrayView] = weakref.WeakSet()
        self._lock = OpLock()
        self._pid = os.getpid()
        self._fin = safety_finalizer(
            self, _unmap, res, self._lease, self._pid, backend=device._backend
        )
        track(self)

    def _forked(self) -> None:
        """In a forked child: the safety net only closes the lease copy, and only while its
        number still refers to it (the child may have reused the number)."""
        _guard_fds_in_child(self, self._lease)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return not self._fin.alive

    def _owned(self) -> None:
        """Raise ForkedError in a forked child (before any lock: a parent thread may hold it).

        A forked child must open the handle itself (its copy, or one sent
        through multiprocessing).
        """
        if os.getpid() != self._pid:
            raise ForkedError("SharedMapping", self._pid, os.getpid())

    def _live(self) -> None:
        self._owned()
        if not self._fin.alive:
            raise ClosedError("SharedMapping")

    @property
    def address(self) -> int:
        """First shared byte in this process."""
        self._live()
        return self._address

    @property
    def ptr(self) -> int:
        """The same as :attr:`address`."""
        return self.address

    def _range(self, offset: object, nbytes: int) -> int:
        off = check_int("offset", offset)
        if off + nbytes > self.nbytes:
            raise ValueError(
                f"bytes [{off}, {off + nbytes}) must lie inside the shared {self.nbytes} bytes"
            )
        return off

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy host bytes (anything with the buffer protocol; strided input in C order) into
        the shared memory at `offset`."""
        self._owned()
        mv = host_bytes(data)
        with self._lock:
            self._live()
            off = self._range(offset, mv.nbytes)
            self.device.write(self._address + off, mv)

    def read(self, nbytes: int | None = None, offset: int = 0) -> bytearray:
        """Copy `nbytes` bytes at `offset` (default: to the end) to a new ``bytearray``."""
        self._owned()
        with self._lock:
            self._live()
            off = self._range(offset, 0)
            n = self.nbytes - off if nbytes is None else check_int("nbytes", nbytes)
            self._range(off, n)
            return self.device.read(self._address + off, n)

    def view(
        self, dtype: DTypeLike = "uint8", shape: int | Sequence[int] | None = None, offset: int = 0
    ) -> ArrayView:
        """A typed view of the shared bytes (DLPack and the array interfaces), as ``GrowableBuffer.view``.

        While the view (or an array or DLPack capsule made from it) lives,
        :meth:`close` raises ``BufferError``.
        """
        self._owned()
        with self._lock:
            self._live()
            v = ArrayView(self, self.device, self._address, self.nbytes, dtype, shape, offset)
            self._views.add(v)
            return v

    def close(self) -> None:
        """Unmap and free the address range (idempotent).

        Raises
        ------
        BufferError
            A view (or an array or DLPack capsule made from one) still uses the
            memory: drop it first.
        """
        if os.getpid() != self._pid:  # a forked child never unmaps its parent's memory
            return
        if self._lock.owned():
            # A finalizer (a user's __del__) that interrupted an operation of this mapping in
            # this thread: waiting for the lock hung forever, and closing under the operation
            # would unmap what it uses. Done when the operation ends.
            if self._fin.alive:
                self._lock.defer(self._close_later)
            return
        if self.device._backend.in_call():
            # A finalizer inside a backend call of this thread: unmapping there would call the
            # driver inside the interrupted call. Done after it (the backend's next call).
            if self._fin.alive:
                self.device._backend.run_or_defer(self._close_later)
            return
        with self._lock:
            if not self._fin.alive:
                return
            views = list(self._views)
            if views:
                raise BufferError(
                    f"cannot close the SharedMapping: {len(views)} view(s) or DLPack export(s) of "
                    "it are alive; drop them first"
                )
            if self._fin.detach() is None:
                return
            try:
                self._res.close()  # resumable: a failed close can be retried
            except BaseException:
                self._fin = safety_finalizer(
                    self, _unmap, self._res, self._lease, self._pid, backend=self.device._backend
                )
                raise
            _close_fds(self._lease)

    def _close_later(self) -> None:
        """A close() a finalizer asked for inside an operation or a backend call; its errors
        (a view still alive: BufferError) are logged, as the finalizer cannot see them."""
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - reported on the logger
            _log.warning("SharedMapping.close() requested by a finalizer failed: %r", err)

    def __reduce__(self) -> Any:
        raise TypeError(
            "a SharedMapping cannot be pickled: send its SharedMemoryHandle and open() it there"
        )

    def __copy__(self) -> SharedMapping:
        raise TypeError("a SharedMapping cannot be copied: open() its handle again")

    def __deepcopy__(self, memo: object) -> SharedMapping:
        return self.__copy__()

    def __enter__(self) -> SharedMapping:
        self._live()
        return self

    def __repr__(self) -> str:
        if self.closed:
            return f"<SharedMapping of a {self.source} on {self.device} closed>"
        return (
            f"<SharedMapping of a {self.source}: {self.nbytes} bytes at {self._address:#x} "
            f"on {self.device}>"
        )

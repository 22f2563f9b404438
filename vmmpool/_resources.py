"""One Python object per driver resource.

* :class:`AddressReservation` owns one ``cuMemAddressFree``.
* :class:`PhysicalAllocation` owns one ``cuMemRelease``.
* :class:`Mapping` owns one ``cuMemUnmap``.

Dependents hold strong references to what they need (a mapping holds its
reservation and its allocation), so teardown order is structural. Every
object has an idempotent ``close()``, is a context manager and raises
:class:`~vmmpool.ClosedError` when used after close. Finalizers are only a
safety net: they hold the handles (never ``self``), never raise, and do
nothing at interpreter shutdown.

Arguments are validated here, before any driver call, with ``TypeError`` /
``ValueError`` naming expected versus actual; the backends enforce the
driver's own contract as a second line.
"""

from __future__ import annotations

import bisect
import functools
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

from ._backends.base import Backend
from ._device import Device, DeviceLike
from ._errors import ClosedError
from ._options import Access, HandleType, address_limit, brief, check_int, check_iterable
from ._process import NoCopy

__all__ = [
    "AddressReservation",
    "PhysicalAllocation",
    "Mapping",
    "reserve",
    "create",
    "check_peers",
    "safety_finalizer",
    "ClosesOnExit",
    "OpLock",
]


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Run a finalizer step; a finalizer must never raise."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - safety net only; explicit close() raises
        pass


def _quietly_on(backend: Backend, fn: Callable[..., Any], *args: Any) -> None:
    """A finalizer step that calls `backend`: deferred if it interrupted a call of `backend`.

    Nothing at all in a forked child: the memory is the parent's (issue 17).
    """
    if backend.forked:
        return
    try:
        backend.run_or_defer(_quietly, fn, *args)
    except Exception:  # noqa: BLE001 - safety net only
        pass


def safety_finalizer(
    obj: object, fn: Callable[..., Any], *args: Any, backend: Backend | None = None
) -> weakref.finalize:
    """Call ``fn(*args)`` when `obj` dies: never raising, and not at interpreter shutdown.

    `fn` and `args` must not reference `obj`, or it would never die. With `backend`, a
    finalizer that the garbage collector runs in the middle of a call of that backend (the
    same thread) is queued and run by the backend's next call instead
    (:meth:`Backend.run_or_defer`): the backend's lock is re-entrant, so running it there
    would change the backend's state under the interrupted call.
    """
    fin: weakref.finalize
    if backend is not None:
        fin = weakref.finalize(obj, _quietly_on, backend, fn, *args)
    else:
        fin = weakref.finalize(obj, _quietly, fn, *args)
    fin.atexit = False  # do nothing at interpreter shutdown
    return fin


def peer_list(peers: object) -> list[Any]:
    """`peers` as a list, or a ``TypeError`` that names the argument (a str is refused)."""
    return check_iterable("peers", peers, "device ordinals (ints)")


def check_peers(device: Device, peers: Iterable[int]) -> tuple[int, ...]:
    """Validate peer ordinals; return ``(owner, *peers)`` for ``set_access``."""
    out = [device.ordinal]
    for p in peer_list(peers):
        p = check_int("peer", p)
        if device.is_host:
            raise ValueError(f"the host device has no peers, got peer {p}")
        if p not in out:
            out.append(p)
    return tuple(out)


class OpLock:
    """An object's re-entrant operation lock, and what must wait until its outermost holder lets go.

    A finalizer (a user's ``__del__``) that the garbage collector runs in the
    middle of an operation of an object (``GrowableBuffer``, ``SharedMapping``),
    in the same thread, re-enters the lock: a ``close()`` there would free the
    memory under the half-done operation (a buffer's resize then failed on the
    freed range, a sleep copied from unmapped pages), and with a plain lock it
    waited for itself forever. Such a ``close()`` queues itself here and runs as
    the operation ends.
    """

    __slots__ = ("_lock", "_is_owned", "_pending")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._is_owned: Callable[[], bool] = self._lock._is_owned  # type: ignore[attr-defined]
        #: Thread ident -> what runs when that thread's outermost holding ends. Only the
        #: holder adds to its own list, and it takes the list back in one dict operation.
        self._pending: dict[int, list[Callable[[], None]]] = {}

    def owned(self) -> bool:
        """True when the current thread holds the lock (is inside an operation)."""
        return self._is_owned()

    def defer(self, fn: Callable[[], None]) -> None:
        """Run `fn` when the current thread's outermost holding ends (it holds the lock)."""
        self._pending.setdefault(threading.get_ident(), []).append(fn)

    def __enter__(self) -> OpLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self._pending and not self._is_owned():
            for fn in self._pending.pop(threading.get_ident(), ()):
                fn()


class ClosesOnExit:
    """Mixin: ``with obj:`` calls ``obj.close()`` on exit.

    It never hides the caller's exception: if ``close()`` fails while one is
    propagating, the caller's exception wins.
    """

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - the caller's exception is the one to see
                pass


class _Closable(ClosesOnExit, NoCopy):
    """Shared close / context-manager behaviour of the resource objects.

    Not copyable or picklable (``TypeError``); in a forked child every use and
    every ``close()`` that would release something raises
    :class:`~vmmpool.ForkedError`.
    """

    _fin: weakref.finalize

    @property
    def closed(self) -> bool:
        """True once the resource has been released."""
        return not self._fin.alive

    def _check_open(self) -> None:
        self.device._backend.check_process(type(self).__name__)  # type: ignore[attr-defined]
        if not self._fin.alive:
            raise ClosedError(type(self).__name__)

    def __enter__(self) -> Any:
        self._check_open()
        return self


# --------------------------------------------------------------------- physical
def _release(backend: Backend, handle: int) -> None:
    backend.release(handle)


class PhysicalAllocation(_Closable):
    """Physical device memory (``cuMemCreate``); owns one ``cuMemRelease``.

    Create one with :func:`create`, :meth:`from_fd` or
    :meth:`Mapping.retain_allocation`.

    Attributes
    ----------
    size : int
        Bytes (a multiple of the device's granularity).
    device : Device
        Where the memory lives.
    handle : int
        The driver handle (for the backend; valid until :meth:`close`).
    exportable : bool
        Whether :meth:`export` can hand out a POSIX file descriptor.

    Notes
    -----
    Releasing a handle that is still mapped is legal: the memory lives on
    until its last mapping is unmapped (driver rule 7). A :class:`Mapping`
    keeps its allocation object alive, so dropping the allocation object
    after mapping it is safe.
    """

    def __init__(self, device: Device, handle: int, size: int, exportable: bool) -> None:
        self.device = device
        self.size = size
        self.handle = handle
        self.exportable = exportable
        self._fin = safety_finalizer(self, _release, device._backend, handle, backend=device._backend)

    @classmethod
    def from_fd(cls, fd: int, size: int, device: DeviceLike = None) -> PhysicalAllocation:
        """Import physical memory exported by :meth:`export` (possibly in another process).

        Parameters
        ----------
        fd : int
            The POSIX file descriptor; it stays owned by the caller.
        size : int
            The allocation's size in bytes, as the exporter reported it.
        device : Device-like, optional
            The device the memory lives on.

        Returns
        -------
        PhysicalAllocation
            A new handle holding one reference.

        Raises
        ------
        TypeError, ValueError
            Before anything is imported: `fd` is not an open descriptor, or it
            names something no export hands out (a directory, a pipe, a
            socket, or a file with a name on a file system); on the host
            emulator also when `fd` is not a memfd or its size is not `size`.

        Notes
        -----
        What is checked with ``fstat``: an exported handle is anonymous (no
        link on any file system). The host emulator exports memfds, whose size
        is the allocation's, so a wrong `size` is caught here. A CUDA handle's
        descriptor does not carry the size: the driver checks it when the
        memory is mapped.
        """
        dev = Device(device)
        fd = check_int("fd", fd, maximum=(1 << 31) - 1)
        size = check_int(
            "size", size, minimum=1, maximum=address_limit(dev), multiple=dev.granularity
        )
        _check_shareable_fd(fd, size, dev)
        handle = dev._backend.import_fd(fd)
        return cls(dev, handle, size, exportable=True)

    def export(self) -> int:
        """Export a POSIX file descriptor for this memory (for IPC).

        Returns
        -------
        int
            A new file descriptor the caller owns (close it with ``os.close``).

        Raises
        ------
        ValueError
            If the allocation was not created with ``handle_type="posix_fd"``.
        """
        self._check_open()
        if not self.exportable:
            raise ValueError(
                "allocation was created with handle_type='none'; "
                "create it with handle_type='posix_fd' to export it"
            )
        return self.device._backend.export_fd(self.handle)

    def close(self) -> None:
        """Release this handle's reference (idempotent). Mapped memory lives on."""
        if self._fin.alive:
            self.device._backend.check_process("PhysicalAllocation")
            self.device._backend.release(self.handle)
            self._fin.detach()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"handle={self.handle:#x}"
        return f"<PhysicalAllocation {self.size} bytes on {self.device} {state}>"


def _check_shareable_fd(fd: int, size: int, dev: Device) -> None:
    """Raise ``ValueError`` unless `fd` could be an exported handle of `size` bytes on `dev`."""
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise ValueError(f"fd must be an open file descriptor, got {fd} ({err.strerror})") from None
    mode = st.st_mode
    kind = (
        "a directory" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode) else None
    )
    if kind is None and stat.S_ISREG(mode) and st.st_nlink > 0:
        kind = "a file with a name on a file system"
    if kind is not None:
        raise ValueError(
            f"fd must be a handle exported by PhysicalAllocation.export(), got fd {fd}, {kind}"
        )
    if not dev.is_host:
        return
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the size check below still applies
        target = "/memfd:"
    if not stat.S_ISREG(mode) or not target.startswith("/memfd:"):
        raise ValueError(
            f"fd must be a memfd exported by PhysicalAllocation.export() on the host emulator, "
            f"got fd {fd} ({target})"
        )
    if st.st_size != size:
        raise ValueError(
            f"size must be the exported allocation's size, {st.st_size} bytes, got {size}"
        )


def create(
    nbytes: int, device: DeviceLike = None, *, handle_type: HandleType | str = "none"
) -> PhysicalAllocation:
    """Create physical memory on a device (``cuMemCreate``).

    Parameters
    ----------
    nbytes : int
        Size in bytes: positive and a multiple of ``device.granularity``
        (use :meth:`Device.round_up`). Not rounded silently.
    device : Device-like, optional
        Where to allocate; :func:`default_device` when omitted.
    handle_type : {"none", "posix_fd"}
        ``"posix_fd"`` makes the allocation exportable for IPC.

    Returns
    -------
    PhysicalAllocation

    Raises
    ------
    TypeError, ValueError
        Bad size (before any driver call).
    OutOfMemoryError
        The device has no more memory.
    """
    dev = Device(device)
    size = check_int(
        "nbytes", nbytes, minimum=1, maximum=address_limit(dev), multiple=dev.granularity
    )
    exportable = HandleType.parse(handle_type) is HandleType.POSIX_FD
    if exportable and not dev.supports_posix_fd:
        raise ValueError(f"{dev} does not support POSIX file descriptor handles")
    handle = dev._backend.create(size, exportable)
    return PhysicalAllocation(dev, handle, size, exportable)


# ------------------------------------------------------------------ reservation
class _MapRecord:
    """Bookkeeping for one live mapping, shared by its Mapping and reservation."""

    __slots__ = ("offset", "size", "access", "live")

    def __init__(self, offset: int, size: int) -> None:
        self.offset = offset
        self.size = size
        self.access = Access.NONE
        self.live = True


class _ReservationState:
    """What the reservation's finalizer needs: no reference to the Python objects."""

    __slots__ = ("backend", "address", "size", "records", "offsets", "lock", "on_unmap")

    def __init__(self, backend: Backend, address: int, size: int) -> None:
        self.backend = backend
        self.address = address
        self.size = size
        self.records: dict[int, _MapRecord] = {}  # offset -> record
        self.offsets: list[int] = []  # sorted keys of `records`, for O(log n) overlap checks
        self.lock = threading.RLock()
        # Called with each record unmapped (the reservation drops its Mapping
        # object); a plain function holding no reference to the reservation.
        self.on_unmap: Callable[[_MapRecord], None] | None = None

    def add(self, rec: _MapRecord) -> None:
        self.records[rec.offset] = rec
        bisect.insort(self.offsets, rec.offset)

    def overlapping(self, offset: int, size: int) -> _MapRecord | None:
        """The live mapping overlapping [offset, offset + size), if any."""
        i = bisect.bisect_right(self.offsets, offset) - 1
        if i >= 0:
            rec = self.records[self.offsets[i]]
            if offset < rec.offset + rec.size:
                return rec
        i += 1
        if i < len(self.offsets) and self.offsets[i] < offset + size:
            return self.records[self.offsets[i]]
        return None

    def runs(self) -> list[tuple[int, int, list[_MapRecord]]]:
        """Live mappings grouped into runs of adjacent ones: (offset, size, records)."""
        out: list[tuple[int, int, list[_MapRecord]]] = []
        for off in sorted(self.records):
            rec = self.records[off]
            if out and out[-1][0] + out[-1][1] == off:
                start, size, recs = out[-1]
                recs.append(rec)
                out[-1] = (start, size + rec.size, recs)
            else:
                out.append((off, rec.size, [rec]))
        return out

    def unmap_records(self, offset: int, size: int, recs: Sequence[_MapRecord]) -> None:
        self.backend.unmap(self.address + offset, size)
        for rec in recs:
            rec.live = False
            del self.records[rec.offset]
            del self.offsets[bisect.bisect_left(self.offsets, rec.offset)]
            if self.on_unmap is not None:
                self.on_unmap(rec)

    def free(self) -> None:
        with self.lock:
            for off, size, recs in self.runs():
                self.unmap_records(off, size, recs)
            self.backend.free_address(self.address, self.size)


def _forget_mapping(ref: weakref.ReferenceType[AddressReservation], rec: _MapRecord) -> None:
    # Through a weak reference: the state (held by the finalizer) must not keep
    # the reservation, or its Mapping objects, alive.
    res = ref()
    if res is not None:
        res._mappings.pop(rec.offset, None)


class AddressReservation(_Closable):
    """A range of virtual addresses (``cuMemAddressReserve``); owns one ``cuMemAddressFree``.

    Create one with :func:`reserve`.

    Attributes
    ----------
    address : int
        First byte of the range (an integer address; compare as ``int``).
    size : int
        Bytes reserved.
    device : Device
        The device whose memory may be mapped here.

    Notes
    -----
    :meth:`close` unmaps every mapping still in the range (adjacent ones in one
    driver call) before freeing it, so the range is never freed while mapped.
    """

    def __init__(self, device: Device, address: int, size: int, alignment: int = 0) -> None:
        self.device = device
        self.address = address
        self.size = size
        self.alignment = alignment
        self._state = _ReservationState(device._backend, address, size)
        # Live Mapping objects, kept alive by the reservation: a mapping lasts
        # until it is unmapped or the reservation is closed, even if the
        # caller drops the Mapping object. (The state must not hold them: the
        # finalizer holds the state, and a mapping holds the reservation.)
        self._mappings: dict[int, Mapping] = {}
        self._state.on_unmap = functools.partial(_forget_mapping, weakref.ref(self))
        self._fin = safety_finalizer(self, self._state.free, backend=device._backend)

    @property
    def end(self) -> int:
        """One past the last byte: ``address + size``."""
        return self.address + self.size

    def mappings(self) -> list[Mapping]:
        """The live mappings, in address order."""
        self.device._backend.check_process("AddressReservation")
        with self._state.lock:
            return [self._mappings[off] for off in sorted(self._mappings)]

    def access_at(self, offset: int) -> Access | None:
        """The access of the mapping that starts at `offset`, or None when none starts there.

        Parameters
        ----------
        offset : int
            Bytes from the reservation's start.

        Returns
        -------
        Access or None
            What was last granted to the owning device through vmmpool
            (``Access.NONE`` until :meth:`set_access`); None when no live
            mapping starts at `offset` (nothing mapped there, or inside a
            larger mapping). No driver call.
        """
        off = check_int("offset", offset)
        # Before the lock: a parent thread may have held it at a fork.
        self.device._backend.check_process("AddressReservation")
        with self._state.lock:
            rec = self._state.records.get(off)
            return None if rec is None else rec.access

    def _check_range(self, offset: object, size: object) -> tuple[int, int]:
        g = self.device.granularity
        off = check_int("offset", offset, multiple=g)
        n = check_int("size", size, minimum=1, multiple=g)
        if off + n > self.size:
            raise ValueError(
                f"range [{off}, {off + n}) must lie inside the reservation of {self.size} bytes"
            )
        return off, n

    def _covering_records(self, off: int, n: int) -> list[_MapRecord]:
        """Records that exactly tile [off, off + n), or a ValueError."""
        recs = []
        cur = off
        while cur < off + n:
            rec = self._state.records.get(cur)
            if rec is None:
                raise ValueError(
                    f"range [{off}, {off + n}) must be covered by whole adjacent mappings; "
                    f"no mapping starts at offset {cur}"
                )
            recs.append(rec)
            cur += rec.size
        if cur != off + n:
            raise ValueError(
                f"range [{off}, {off + n}) ends inside a mapping that ends at offset {cur}"
            )
        return recs

    def map(
        self,
        allocation: PhysicalAllocation,
        offset: int = 0,
        *,
        access: Access | str | None = None,
        peers: Iterable[int] = (),
    ) -> Mapping:
        """Map a whole physical allocation at `offset` bytes into this range.

        Parameters
        ----------
        allocation : PhysicalAllocation
            Memory on this reservation's device; mapped whole, at its offset 0.
        offset : int
            Where in the reservation, in bytes; a multiple of the granularity.
        access : {"rw", "r", "none"}, optional
            If given, also grant this access (one more driver call). Mapping
            alone grants no access (driver rule 3).
        peers : iterable of int
            With `access`, other device ordinals that get it too.

        Returns
        -------
        Mapping

        Raises
        ------
        TypeError, ValueError
            Wrong type, wrong device, misaligned offset, range outside the
            reservation or overlapping a live mapping (before any driver call).
        """
        self._check_open()
        if not isinstance(allocation, PhysicalAllocation):
            raise TypeError(f"allocation must be a PhysicalAllocation, got {type(allocation).__name__}")
        allocation._check_open()
        if allocation.device is not self.device:
            raise ValueError(
                f"allocation is on {allocation.device!r}, but this reservation is on {self.device!r}"
            )
        off, n = self._check_range(offset, allocation.size)
        acc = None if access is None else Access.parse(access)
        devs = check_peers(self.device, peers)
        st = self._state
        with st.lock:
            hit = st.overlapping(off, n)
            if hit is not None:
                raise ValueError(
                    f"range [{off}, {off + n}) overlaps the mapping at "
                    f"[{hit.offset}, {hit.offset + hit.size})"
                )
            st.backend.map(self.address + off, n, allocation.handle, 0)
            rec = _MapRecord(off, n)
            st.add(rec)
            if acc is not None:
                try:
                    st.backend.set_access(self.address + off, n, acc, devs)
                except BaseException:
                    st.unmap_records(off, n, (rec,))
                    raise
                rec.access = acc
            mapping = Mapping(self, allocation, rec)
            self._mappings[off] = mapping
        return mapping

    def _unmap_records(self, off: int, n: int, recs: Sequence[_MapRecord]) -> None:
        with self._state.lock:
            self._state.unmap_records(off, n, recs)

    def set_access(
        self, offset: int, size: int, access: Access | str = "rw", peers: Iterable[int] = ()
    ) -> None:
        """Grant `access` over several adjacent whole mappings in one driver call.

        Parameters
        ----------
        offset, size : int
            The range, in bytes from the reservation's start; it must be
            tiled exactly by live mappings.
        access : {"rw", "r", "none"}
            What the owning device (and `peers`) may do.
        peers : iterable of int
            Other device ordinals granted the same access.
        """
        self._check_open()
        off, n = self._check_range(offset, size)
        acc = Access.parse(access)
        devs = check_peers(self.device, peers)
        with self._state.lock:
            recs = self._covering_records(off, n)
            self._state.backend.set_access(self.address + off, n, acc, devs)
            for rec in recs:
                rec.access = acc

    def unmap(self, offset: int, size: int) -> None:
        """Unmap several adjacent whole mappings in one driver call.

        Their :class:`Mapping` objects become closed.
        """
        self._check_open()
        off, n = self._check_range(offset, size)
        with self._state.lock:
            recs = self._covering_records(off, n)
            self._unmap_records(off, n, recs)

    def close(self) -> None:
        """Unmap what is still mapped, then free the range (idempotent)."""
        if self._fin.alive:
            self.device._backend.check_process("AddressReservation")
            self._state.free()
            self._fin.detach()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._state.records)} mapping(s)"
        return f"<AddressReservation {self.address:#x}+{self.size} on {self.device} {state}>"


def reserve(
    nbytes: int, device: DeviceLike = None, alignment: int = 0, *, hint: int = 0
) -> AddressReservation:
    """Reserve a range of virtual addresses (``cuMemAddressReserve``).

    Parameters
    ----------
    nbytes : int
        Size in bytes: positive and a multiple of ``device.granularity``.
    device : Device-like, optional
        The device whose memory will be mapped here; :func:`default_device`
        when omitted.
    alignment : int
        0 (the granularity) or a power of two.
    hint : int
        Preferred address, a multiple of ``device.granularity`` (0: none).
        Only a hint: the result may be elsewhere (driver rule 6), so compare
        :attr:`AddressReservation.address`.

    Returns
    -------
    AddressReservation
    """
    dev = Device(device)
    limit = address_limit(dev)
    size = check_int("nbytes", nbytes, minimum=1, maximum=limit, multiple=dev.granularity)
    align = check_int("alignment", alignment, maximum=limit)
    if align & (align - 1):
        raise ValueError(f"alignment must be 0 or a power of two, got {align}")
    # cuMemAddressReserve wants a hint aligned as the range; the emulator rounded an odd one
    hint = check_int("hint", hint, maximum=limit, multiple=dev.granularity)
    if hint and hint + size - 1 > limit:
        raise ValueError(
            f"hint + nbytes must be <= {limit} (the largest the device can address), "
            f"got {hint} + {size}"
        )
    address = dev._backend.reserve(size, align, hint)
    return AddressReservation(dev, address, size, align)


# ---------------------------------------------------------------------- mapping
class Mapping(_Closable):
    """Physical memory mapped into a reservation (``cuMemMap``); owns one ``cuMemUnmap``.

    Create one with :meth:`AddressReservation.map`. It keeps its reservation
    and its allocation alive.

    Attributes
    ----------
    reservation : AddressReservation
    allocation : PhysicalAllocation
    offset : int
        Bytes from the reservation's start.
    size : int
        Bytes mapped.
    """

    def __init__(
        self, reservation: AddressReservation, allocation: PhysicalAllocation, rec: _MapRecord
    ) -> None:
        self.reservation = reservation
        self.allocation = allocation
        self.offset = rec.offset
        self.size = rec.size
        self._rec = rec

    @property
    def closed(self) -> bool:
        """True once unmapped (by :meth:`close`, the reservation, or a batched unmap)."""
        return not self._rec.live

    def _check_open(self) -> None:
        self.device._backend.check_process("Mapping")
        if self.closed:
            raise ClosedError("Mapping")

    @property
    def address(self) -> int:
        """First mapped byte."""
        return self.reservation.address + self.offset

    @property
    def device(self) -> Device:
        """The device of the mapped memory."""
        return self.reservation.device

    @property
    def access(self) -> Access:
        """The access last granted through vmmpool to the owning device."""
        return self._rec.access

    def set_access(self, access: Access | str = "rw", peers: Iterable[int] = ()) -> None:
        """Grant `access` to the owning device and `peers` (``cuMemSetAccess``).

        Parameters
        ----------
        access : {"rw", "r", "none"}
        peers : iterable of int
            Other CUDA device ordinals that get the same access.
        """
        self._check_open()
        acc = Access.parse(access)
        devs = check_peers(self.device, peers)
        self.device._backend.set_access(self.address, self.size, acc, devs)
        self._rec.access = acc

    def get_access(self, device: DeviceLike | int | None = None) -> Access:
        """Ask the driver what access `device` (default: the owner) has here.

        Parameters
        ----------
        device : Device, str, int or None
            A :class:`Device`, its spec (``"cuda:1"``) or a CUDA ordinal
            (``>= 0``); ``None`` for the owning device.

        Raises
        ------
        TypeError
            `device` is none of these (``bool`` included).
        ValueError
            A negative ordinal, a device spec that does not parse, or (on the
            host emulator) a device other than this one.
        """
        self._check_open()
        if device is None:
            ordinal = self.device.ordinal
        elif isinstance(device, int) and not isinstance(device, bool):
            ordinal = check_int("device", device, maximum=(1 << 31) - 1)
        elif isinstance(device, (str, Device)):
            ordinal = Device(device).ordinal
        else:
            raise TypeError(
                "device must be None, a Device, a device spec such as 'cuda:1' or an ordinal, "
                f"got {type(device).__name__} ({brief(device)})"
            )
        if self.device.is_host and ordinal != self.device.ordinal:
            raise ValueError(
                f"the host emulator has one device (ordinal {self.device.ordinal}), got {ordinal}"
            )
        return self.device._backend.get_access(self.address, ordinal)

    def retain_allocation(self) -> PhysicalAllocation:
        """A new handle to the mapped memory (``cuMemRetainAllocationHandle``); close it too."""
        self._check_open()
        handle = self.device._backend.retain(self.address)
        return PhysicalAllocation(self.device, handle, self.size, self.allocation.exportable)

    def unmap(self) -> None:
        """Unmap (idempotent); same as :meth:`close`."""
        self.close()

    def close(self) -> None:
        """Unmap this range (idempotent)."""
        if self._rec.live:
            self.device._backend.check_process("Mapping")
            self.reservation._unmap_records(self.offset, self.size, (self._rec,))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"access={self._rec.access.value}"
        return f"<Mapping {self.address:#x}+{self.size} on {self.device} {state}>"

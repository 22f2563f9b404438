"""The small internal interface every backend implements.

One method per driver operation. Addresses, sizes and handles are plain
``int``; access is an :class:`~vmmpool._options.Access`. Backends validate
nothing that the higher layers validate (argument types, ranges inside a
reservation): they enforce the *driver's* contract and report violations as
:class:`~vmmpool.DriverError` with the driver's error name.

Every public operation starts with ``self._enter("op")``, which counts the call
and fires an injected fault if one is armed for that call. Backends also count
their live resources, so tests can prove that nothing leaked and that hot
paths make no backend calls.
"""

from __future__ import annotations

import abc
import collections
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import _process
from .._errors import DriverError, ForkedError, OutOfMemoryError
from .._options import Access

__all__ = ["Backend", "BackendCounters", "DeviceInfo", "OPERATIONS", "ADDRESS_LIMIT_64"]

#: Exclusive bound of a 64-bit driver's sizes and addresses (``size_t``).
ADDRESS_LIMIT_64 = 1 << 64

#: The operations a backend provides, in the order of the interface.
OPERATIONS: tuple[str, ...] = (
    "reserve",
    "free_address",
    "create",
    "release",
    "map",
    "unmap",
    "set_access",
    "get_access",
    "retain",
    "export_fd",
    "import_fd",
    "mem_info",
    "synchronize",
    "write",
    "read",
)


@dataclass(frozen=True)
class BackendCounters:
    """A snapshot of one backend's live resources and call counts.

    Attributes
    ----------
    reservations : int
        Live virtual address reservations.
    allocations : int
        Live physical allocations (memory not yet given back: a released handle
        whose memory is still mapped counts until its last mapping goes).
    mappings : int
        Live mappings (one per successful ``map``).
    physical_bytes : int
        Bytes of live physical allocations.
    calls : dict of str to int
        Calls per operation since the backend was created.
    """

    reservations: int
    allocations: int
    mappings: int
    physical_bytes: int
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def live(self) -> tuple[int, int, int]:
        """``(reservations, allocations, mappings)``: all zero when nothing leaked."""
        return (self.reservations, self.allocations, self.mappings)

    def total_calls(self) -> int:
        """Sum of all operation calls."""
        return sum(self.calls.values())

    def __sub__(self, other: BackendCounters) -> dict[str, int]:
        """Calls per operation made between `other` and this snapshot (non-zero only)."""
        out = {}
        for op, n in self.calls.items():
            d = n - other.calls.get(op, 0)
            if d:
                out[op] = d
        return out


@dataclass(frozen=True)
class DeviceInfo:
    """Static facts about a backend's device."""

    kind: str
    ordinal: int
    name: str
    granularity: int
    recommended_granularity: int
    supports_vmm: bool
    supports_posix_fd: bool


class _Fault:
    __slots__ = ("countdown", "name", "message")

    def __init__(self, countdown: int, name: str, message: str) -> None:
        self.countdown = countdown
        self.name = name
        self.message = message


class Backend(abc.ABC):
    """Abstract backend: one method per driver operation.

    Subclasses implement the public methods directly and begin each with
    ``self._enter(op)``, which keeps the instrumentation to one method call.
    Subclasses keep ``_live_*`` and ``_physical_bytes`` up to date under
    ``self._lock``.
    """

    info: DeviceInfo

    #: Exclusive upper bound of what the device can address: every size,
    #: alignment, hint, address and ``address + size`` a caller passes must lie
    #: below it. Higher layers check against it (:meth:`check_value`,
    #: :meth:`check_range`, :meth:`check_transfer`) before anything changes, so
    #: that no value is truncated on its way to the driver.
    address_limit: int = ADDRESS_LIMIT_64

    #: True where device memory is this machine's host RAM (the host emulator):
    #: a copy of device memory to host memory then needs RAM beside the very
    #: memory it copies, so sleep gives device pages back as it copies them
    #: (host RAM peaks near the live bytes, not at twice them). False on a GPU,
    #: where one pipelined copy of everything is fastest.
    device_memory_is_host_ram: bool = False

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._faults: dict[str, list[_Fault]] = {}
        self._live_reservations = 0
        self._live_allocations = 0
        self._live_mappings = 0
        self._physical_bytes = 0
        # Releases a finalizer asked for while this thread was inside a backend
        # call (the garbage collector runs wherever Python allocates): run by
        # the next call that starts outside the lock, never re-entrantly.
        self._deferred: collections.deque[tuple[Callable[..., object], tuple[object, ...]]] = (
            collections.deque()
        )
        self._draining = threading.local()
        #: The process that made this backend: it owns every object on it.
        self.owner_pid = os.getpid()
        #: True in a child forked from the owner (set once by a fork hook):
        #: every call then raises ForkedError before it touches anything.
        self.forked = False
        _process.track(self)

    # ------------------------------------------------------------------ fork
    def _forked(self) -> None:
        """In a forked child (the fork hook): refuse everything, release nothing.

        The lock is replaced (a parent thread may have held it at the fork) and
        the releases finalizers queued are dropped: they belong to the parent.
        """
        self.forked = True
        self._lock = threading.RLock()
        self._deferred = collections.deque()
        self._draining = threading.local()

    def check_process(self, what: str) -> None:
        """Raise :class:`~vmmpool.ForkedError` naming `what` in a forked child.

        Parameters
        ----------
        what : str
            The object used, for the message (``"PagePool"``, ``"Mapping"``...).
        """
        if self.forked:
            raise ForkedError(what, self.owner_pid, os.getpid())

    # ---------------------------------------------------------- finalizer work
    def in_call(self) -> bool:
        """True when the current thread is inside a call of this backend (holds its lock).

        A finalizer that runs there must neither call the backend (the call it
        interrupted is half done) nor wait for a lock whose holder may be
        waiting for this one (see ``Core.free_contended``).
        """
        is_owned = getattr(self._lock, "_is_owned", None)
        return bool(is_owned()) if is_owned is not None else False

    def run_or_defer(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` now, or, inside a call of this backend, after it (finalizers).

        A finalizer that releases a driver resource may be run by the garbage
        collector in the middle of a backend call of the same thread; the lock
        is re-entrant, so running it there would change the backend's state
        under the interrupted call. It is queued instead and run by the next
        backend call (or :meth:`counters`) that starts outside the lock.
        """
        if self.in_call():
            self._deferred.append((fn, args))
        else:
            fn(*args)

    def run_deferred(self) -> None:
        """Run the releases finalizers deferred (outside the lock); errors are swallowed.

        One loop per thread: the backend calls a release makes do not start another
        (a queue of thousands of releases never recurses).
        """
        tls = self._draining
        if getattr(tls, "active", False) or self.in_call():
            return
        tls.active = True
        try:
            q = self._deferred
            while q:
                try:
                    fn, args = q.popleft()
                except IndexError:  # pragma: no cover - emptied by another thread
                    break
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - a finalizer's work never raises
                    pass
        finally:
            tls.active = False

    # ------------------------------------------------------------------ counting
    def _enter(self, op: str) -> None:
        if self.forked:
            raise ForkedError(f"Device {self.info.name!r} ({op})", self.owner_pid, os.getpid())
        if self._deferred:
            self.run_deferred()
        # Under the lock: an unlocked Counter increment can lose counts when
        # threads race, and tests rely on exact call counts.
        with self._lock:
            self._calls[op] += 1
        if self._faults:
            self._check_fault(op)

    def _check_fault(self, op: str) -> None:
        with self._lock:
            faults = self._faults.get(op)
            if not faults:
                return
            fired = None
            for f in faults:
                f.countdown -= 1
                if f.countdown == 0:
                    fired = f
            faults[:] = [f for f in faults if f.countdown > 0]
            if not faults:
                del self._faults[op]
        if fired is not None:
            if fired.name == "CUDA_ERROR_OUT_OF_MEMORY":
                raise OutOfMemoryError(
                    0, self._physical_bytes, self._physical_bytes, message=f"injected fault in {op}"
                )
            raise DriverError(fired.name, fired.message, operation=op)

    def inject_fault(
        self,
        op: str,
        nth: int = 1,
        name: str = "CUDA_ERROR_OUT_OF_MEMORY",
        message: str = "injected fault",
    ) -> None:
        """Make the `nth` next call of `op` fail (before it touches anything).

        Parameters
        ----------
        op : str
            One of :data:`OPERATIONS`.
        nth : int
            1 fails the very next call, 2 the one after, and so on.
        name : str
            The driver error name to raise. ``CUDA_ERROR_OUT_OF_MEMORY`` raises
            :class:`~vmmpool.OutOfMemoryError`; any other name a
            :class:`~vmmpool.DriverError`.
        """
        if op not in OPERATIONS:
            raise ValueError(f"op must be one of {OPERATIONS}, got {op!r}")
        if nth < 1:
            raise ValueError(f"nth must be >= 1, got {nth}")
        with self._lock:
            self._faults.setdefault(op, []).append(_Fault(nth, name, message))

    def clear_faults(self) -> None:
        """Disarm every injected fault."""
        with self._lock:
            self._faults.clear()

    def counters(self) -> BackendCounters:
        """Snapshot of live resources and call counts."""
        if self._deferred:
            self.run_deferred()
        with self._lock:
            return BackendCounters(
                self._live_reservations,
                self._live_allocations,
                self._live_mappings,
                self._physical_bytes,
                dict(self._calls),
            )

    # ------------------------------------------------------------ 64-bit guards
    def _limit_text(self) -> str:
        lim = self.address_limit
        bits = lim.bit_length() - 1
        return f"2**{bits}" if lim == 1 << bits else str(lim)

    def check_value(self, op: str, what: str, value: int) -> None:
        """Reject a size, alignment, hint or address the device cannot address.

        Parameters
        ----------
        op : str
            The operation, for the message.
        what : str
            The argument's name, for the message.
        value : int
            Must satisfy ``0 <= value < address_limit``.

        Raises
        ------
        DriverError
            ``CUDA_ERROR_INVALID_VALUE``, naming the bound and the value.
        """
        if not 0 <= value < self.address_limit:
            raise DriverError(
                "CUDA_ERROR_INVALID_VALUE",
                f"{what} must be in [0, {self._limit_text()}) (what {self.info.name} can "
                f"address), got {value:#x}",
                operation=op,
            )

    def check_range(self, op: str, address: int, size: int, what: str = "range") -> None:
        """Reject ``[address, address + size)`` unless it lies below :attr:`address_limit`.

        Raises
        ------
        DriverError
            ``CUDA_ERROR_INVALID_VALUE``, naming the bound and the range.
        """
        if not (0 <= address and 0 <= size and address + size <= self.address_limit):
            raise DriverError(
                "CUDA_ERROR_INVALID_VALUE",
                f"{what} [{address:#x}, {address + size:#x}) must lie below "
                f"{self._limit_text()} (what {self.info.name} can address)",
                operation=op,
            )

    def check_transfer(self, address: int, nbytes: int, write: bool = False) -> None:
        """Check a host copy of `nbytes` at `address` before any buffer is allocated.

        The base check is the addressable range; a backend that knows its
        mappings (the host emulator) also checks that the range is mapped
        with enough access.

        Raises
        ------
        ValueError
            If the range does not lie below :attr:`address_limit`.
        DriverError
            ``CUDA_ERROR_INVALID_VALUE`` where the backend knows the range is
            not accessible.
        """
        if not (0 <= address and 0 <= nbytes and address + nbytes <= self.address_limit):
            op = "write" if write else "read"
            raise ValueError(
                f"cannot {op} {nbytes} bytes at {address:#x}: [{address:#x}, "
                f"{address + nbytes:#x}) must lie below {self._limit_text()} "
                f"(what {self.info.name} can address)"
            )

    # ------------------------------------------------------------ the interface
    @abc.abstractmethod
    def reserve(self, size: int, alignment: int = 0, hint: int = 0) -> int:
        """Reserve `size` bytes of virtual address space; return the address."""

    @abc.abstractmethod
    def free_address(self, address: int, size: int) -> None:
        """Free exactly one reservation, given as its ``(address, size)``."""

    @abc.abstractmethod
    def create(self, size: int, exportable: bool = False) -> int:
        """Create `size` bytes of physical memory; return its handle."""

    @abc.abstractmethod
    def release(self, handle: int) -> None:
        """Drop one reference to a physical allocation handle."""

    @abc.abstractmethod
    def map(self, address: int, size: int, handle: int, offset: int = 0) -> None:
        """Back ``[address, address + size)`` with the physical allocation `handle`."""

    @abc.abstractmethod
    def unmap(self, address: int, size: int) -> None:
        """Unmap one or more whole, adjacent mappings covering exactly the range."""

    @abc.abstractmethod
    def set_access(self, address: int, size: int, access: Access, devices: Sequence[int]) -> None:
        """Grant `access` to the range (whole adjacent mappings) for `devices`."""

    @abc.abstractmethod
    def get_access(self, address: int, device: int) -> Access:
        """Return the access `device` has at `address`."""

    @abc.abstractmethod
    def mapped_at(self, address: int) -> tuple[int, int, int, Access | None] | None:
        """What backs `address`: ``(start, size, handle, access)`` of the mapping holding it.

        None when nothing is mapped there. For invariant checks (``PagePool._check``):
        neither a driver call nor counted, and it takes no lock but the backend's own.
        `access` is the owning device's, or None where the backend cannot tell without
        asking the driver.
        """

    @abc.abstractmethod
    def retain(self, address: int) -> int:
        """Return the handle mapped at `address`, adding one reference."""

    @abc.abstractmethod
    def export_fd(self, handle: int) -> int:
        """Export a POSIX file descriptor for `handle` (the caller owns it)."""

    @abc.abstractmethod
    def import_fd(self, fd: int) -> int:
        """Import a POSIX file descriptor; return a new handle (one reference)."""

    @abc.abstractmethod
    def mem_info(self) -> tuple[int, int]:
        """Return ``(free, total)`` bytes of the device."""

    @abc.abstractmethod
    def synchronize(self, stream: int | None = None) -> None:
        """Wait for `stream` (or, with ``None``, the whole device) to finish its work."""

    @abc.abstractmethod
    def write(self, address: int, data: memoryview) -> None:
        """Copy host bytes `data` to device memory at `address`.

        Synchronous with respect to the host, but on CUDA it is ordered only
        after the current context's legacy default stream: synchronize streams
        that may still use the memory first (driver rule 8).
        """

    @abc.abstractmethod
    def read(self, address: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes of device memory at `address` into `out`.

        Same ordering as :meth:`write`.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend-wide resources (contexts); resources must be closed first."""

    # ---------------------------------------------------------------- events
    # Stream-ordered reuse (issue 12): the pool records an event on the stream
    # that freed memory and queries or waits on it before the memory leaves
    # that stream, instead of synchronizing the whole device. Kept in one block
    # at the end of the interface (and of OPERATIONS below).
    @abc.abstractmethod
    def event_record(self, stream: int) -> int:
        """Create an event, record it on `stream` (a ``CUstream`` value) and return it.

        The event completes when the work queued on `stream` before it is
        done. It stays valid after its stream is destroyed.
        """

    @abc.abstractmethod
    def event_query(self, event: int) -> bool:
        """Return True when the work before `event` is done (never blocks)."""

    @abc.abstractmethod
    def event_wait(self, event: int) -> None:
        """Block the calling thread until `event` has completed."""

    @abc.abstractmethod
    def event_destroy(self, event: int) -> None:
        """Release `event` (legal while it is still pending)."""

    def live_events(self) -> int:
        """Events recorded and not yet destroyed (tests prove none leak)."""
        with self._lock:
            return getattr(self, "_live_events", 0)

    # ---------------------------------------------------------------- staging
    # Sleep / wake (issue 18) copies device memory to host memory and back in
    # large runs, through one reusable page-locked ("pinned") staging buffer and
    # a stream. Not abstract: a backend without them raises NotImplementedError.

    def host_alloc(self, size: int) -> int:
        """Allocate `size` bytes of page-locked host memory; return its address.

        On CUDA ``cuMemHostAlloc`` (portable); the host emulator maps anonymous
        memory. Counted by :meth:`Backend.live_host_allocations`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no host staging memory")

    def host_free(self, address: int) -> None:
        """Free page-locked host memory from :meth:`host_alloc` (``cuMemFreeHost``)."""
        raise NotImplementedError(f"{type(self).__name__} has no host staging memory")

    def copy_dtoh_async(self, dst: int, src: int, size: int, stream: int) -> None:
        """Queue a copy of `size` bytes of device memory at `src` to host memory at `dst` on `stream`.

        `dst` lies in memory from :meth:`host_alloc`. The copy is ordered after
        the work already queued on `stream`; record an event after it and wait
        on that event before reading `dst` (``cuMemcpyDtoHAsync``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no stream-ordered copies")

    def copy_htod_async(self, dst: int, src: int, size: int, stream: int) -> None:
        """Queue a copy of `size` bytes of host memory at `src` to device memory at `dst` on `stream`.

        `src` lies in memory from :meth:`host_alloc` and must not change until an
        event recorded after the copy has completed (``cuMemcpyHtoDAsync``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no stream-ordered copies")

    def live_host_allocations(self) -> int:
        """Page-locked host allocations made and not yet freed (tests prove none leak)."""
        return int(getattr(self, "_live_host", 0))

    # ---------------------------------------------------------------- streams
    # The replay (``vmmpool.replay``) gives each stream of a multi-stream trace
    # a stream of its own on a GPU: a recorded handle is a pointer of the
    # process that recorded it. Not abstract: a backend without them raises
    # NotImplementedError.

    def stream_create(self) -> int:
        """Create a stream that does not synchronize with the legacy default stream; return it.

        On CUDA ``cuStreamCreate(CU_STREAM_NON_BLOCKING)`` (a ``CUstream``
        value, usable wherever a stream handle is taken); the host emulator
        returns a fresh key. Counted by :meth:`Backend.live_streams`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot create streams")

    def stream_destroy(self, stream: int) -> None:
        """Destroy a stream from :meth:`stream_create` (events recorded on it stay valid)."""
        raise NotImplementedError(f"{type(self).__name__} cannot create streams")

    def live_streams(self) -> int:
        """Streams created and not yet destroyed (tests prove none leak)."""
        return int(getattr(self, "_live_streams", 0))


#: Event operations, appended to :data:`OPERATIONS` (fault injection accepts them).
EVENT_OPERATIONS: tuple[str, ...] = ("event_record", "event_query", "event_wait", "event_destroy")
OPERATIONS = (*OPERATIONS, *EVENT_OPERATIONS)


#: Host staging and stream-ordered copies, appended to :data:`OPERATIONS` (fault injection accepts them).
STAGING_OPERATIONS: tuple[str, ...] = ("host_alloc", "host_free", "copy_dtoh_async", "copy_htod_async")
OPERATIONS = (*OPERATIONS, *STAGING_OPERATIONS)


#: Stream creation for replays, appended to :data:`OPERATIONS` (fault injection accepts them).
STREAM_OPERATIONS: tuple[str, ...] = ("stream_create", "stream_destroy")
OPERATIONS = (*OPERATIONS, *STREAM_OPERATIONS)

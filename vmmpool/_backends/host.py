"""The host emulator: CUDA's VMM contract on Linux virtual memory.

============================  ==============================================
CUDA driver                   host emulator
============================  ==============================================
``cuMemAddressReserve``       anonymous ``PROT_NONE`` mapping, aligned
``cuMemCreate``               ``memfd_create`` + ``ftruncate``
``cuMemMap``                  ``mmap(MAP_FIXED | MAP_SHARED)`` of the memfd
``cuMemSetAccess``            ``mprotect``
``cuMemUnmap``                ``mmap(MAP_FIXED)`` of ``PROT_NONE`` anonymous
``cuMemAddressFree``          ``munmap``
``cuMemExportToShareable...``  ``dup`` of the memfd (another process can map it)
============================  ==============================================

The memory is real: bytes written through one mapping of a physical
allocation are read back through every other mapping of it. The emulator
enforces the driver's rules (``VMM_DESIGN.md`` lists them) *before* it changes
anything, and reports a violation with the error name the CUDA driver gives,
so code that passes here does not break on a GPU. Physical memory is counted
against a configurable capacity so that out-of-memory is reachable.

Pages of a memfd are committed lazily by the kernel on first touch, as with
any anonymous memory; the capacity check is what makes "out of memory" happen
at ``create`` time, exactly where the driver reports it.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import itertools
import os
from collections.abc import Sequence

from .._errors import DriverError, OutOfMemoryError
from .._options import Access
from .base import Backend, DeviceInfo

__all__ = ["HostBackend", "DEFAULT_GRANULARITY", "default_capacity"]

DEFAULT_GRANULARITY = 2 << 20

_PROT_NONE = 0
_PROT_READ = 1
_PROT_WRITE = 2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

_PROT = {Access.READWRITE: _PROT_READ | _PROT_WRITE, Access.READ: _PROT_READ, Access.NONE: _PROT_NONE}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def default_capacity() -> int:
    """Physical capacity of the default host device.

    ``VMMPOOL_HOST_CAPACITY`` (bytes, or with a ``K``/``M``/``G`` suffix, e.g.
    ``"512M"``) when set; otherwise a quarter of RAM, at most 8 GiB. Rounded
    down to the granularity.

    Raises
    ------
    ValueError
        If ``VMMPOOL_HOST_CAPACITY`` is not a size of at least one granule.
    """
    env = os.environ.get("VMMPOOL_HOST_CAPACITY", "").strip()
    if env:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        mult = units.get(env[-1:].upper(), 1)
        digits = env[:-1] if mult > 1 else env
        if not (digits.isascii() and digits.isdigit()) or int(digits) * mult < DEFAULT_GRANULARITY:
            raise ValueError(
                f"VMMPOOL_HOST_CAPACITY must be a size of at least {DEFAULT_GRANULARITY} bytes "
                f"like '512M' or '4G', got {env!r}"
            )
        cap = int(digits) * mult
        return cap - cap % DEFAULT_GRANULARITY
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - exotic platforms
        ram = 4 << 30
    cap = min(ram // 4, 8 << 30)
    return max(cap - cap % DEFAULT_GRANULARITY, 64 * DEFAULT_GRANULARITY)


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _invalid(op: str, message: str) -> DriverError:
    return DriverError("CUDA_ERROR_INVALID_VALUE", message, operation=op)


class _Physical:
    __slots__ = ("fd", "size", "refs", "mapped", "exportable", "charged")

    def __init__(self, fd: int, size: int, exportable: bool, charged: bool) -> None:
        self.fd = fd
        self.size = size
        self.refs = 1
        self.mapped = 0
        self.exportable = exportable
        self.charged = charged


class _Mapped:
    __slots__ = ("size", "handle", "access")

    def __init__(self, size: int, handle: int) -> None:
        self.size = size
        self.handle = handle
        self.access = Access.NONE


class _Reservation:
    __slots__ = ("address", "size", "starts", "maps")

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size
        self.starts: list[int] = []  # sorted mapping start addresses
        self.maps: dict[int, _Mapped] = {}

    def covering(self, address: int) -> int | None:
        """Start of the mapping that contains `address`, if any."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            start = self.starts[i]
            if address < start + self.maps[start].size:
                return start
        return None

    def overlaps(self, address: int, size: int) -> bool:
        if self.covering(address) is not None:
            return True
        i = bisect.bisect_left(self.starts, address)
        return i < len(self.starts) and self.starts[i] < address + size

    def whole_run(self, op: str, address: int, size: int) -> list[int]:
        """Starts of the whole adjacent mappings exactly covering the range."""
        run = []
        cur, end = address, address + size
        while cur < end:
            m = self.maps.get(cur)
            if m is None:
                raise _invalid(
                    op,
                    f"[{address:#x}, {end:#x}) must consist of whole adjacent mappings; "
                    f"nothing is mapped starting at {cur:#x}",
                )
            run.append(cur)
            cur += m.size
        if cur != end:
            raise _invalid(
                op,
                f"[{address:#x}, {end:#x}) ends inside a mapping that ends at {cur:#x}: "
                "a sub-range of one mapping cannot be used",
            )
        return run


class HostBackend(Backend):
    """A VMM backend on Linux virtual memory (see the module docstring).

    Parameters
    ----------
    capacity : int, optional
        Physical bytes this emulated device has; :func:`default_capacity` when
        omitted. ``create`` fails with ``CUDA_ERROR_OUT_OF_MEMORY`` beyond it.
    granularity : int
        Minimum granularity (2 MiB, as on current NVIDIA GPUs).
    recommended_granularity : int, optional
        Recommended granularity; equal to `granularity` when omitted.
    name : str
        Device name shown by ``python -m vmmpool info``.
    """

    def __init__(
        self,
        capacity: int | None = None,
        granularity: int = DEFAULT_GRANULARITY,
        recommended_granularity: int | None = None,
        name: str = "host emulator (Linux virtual memory)",
    ) -> None:
        super().__init__()
        page = os.sysconf("SC_PAGE_SIZE")
        if granularity <= 0 or granularity % page or granularity & (granularity - 1):
            raise ValueError(
                f"granularity must be a power of two multiple of the OS page size ({page}), "
                f"got {granularity}"
            )
        rec = granularity if recommended_granularity is None else recommended_granularity
        if rec < granularity or rec % granularity:
            raise ValueError(
                f"recommended_granularity must be a multiple of granularity ({granularity}), got {rec}"
            )
        cap = default_capacity() if capacity is None else int(capacity)
        if cap < 0:
            raise ValueError(f"capacity must be >= 0, got {cap}")
        self.capacity = cap
        self.info = DeviceInfo(
            kind="host",
            ordinal=0,
            name=name,
            granularity=granularity,
            recommended_granularity=rec,
            supports_vmm=True,
            supports_posix_fd=True,
        )
        self._gran = granularity
        self._res_starts: list[int] = []
        self._reservations: dict[int, _Reservation] = {}
        self._physical: dict[int, _Physical] = {}
        self._next_handle = itertools.count(0x1000)

    # ------------------------------------------------------------- helpers
    def _reservation_of(self, op: str, address: int, size: int) -> _Reservation:
        i = bisect.bisect_right(self._res_starts, address) - 1
        if i >= 0:
            r = self._reservations[self._res_starts[i]]
            if address + size <= r.address + r.size:
                return r
        raise _invalid(op, f"[{address:#x}, {address + size:#x}) is not inside one reservation")

    def _check_gran(self, op: str, what: str, value: int) -> None:
        if value % self._gran:
            raise _invalid(op, f"{what} {value:#x} is not a multiple of the granularity {self._gran:#x}")

    def _handle(self, op: str, handle: int) -> _Physical:
        p = self._physical.get(handle)
        if p is None or p.refs == 0:
            raise _invalid(op, f"{handle:#x} is not a live allocation handle")
        return p

    def _maybe_free(self, handle: int, p: _Physical) -> None:
        if p.refs == 0 and p.mapped == 0:
            del self._physical[handle]
            os.close(p.fd)
            self._live_allocations -= 1
            if p.charged:
                self._physical_bytes -= p.size

    @staticmethod
    def _fixed_none(address: int, size: int) -> None:
        """Put an inaccessible, unbacked placeholder over the range (atomically)."""
        r = _mmap(
            address,
            size,
            _PROT_NONE,
            _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED,
            -1,
            0,
        )
        if r == _MAP_FAILED or r != address:
            raise _os_error("mmap(PROT_NONE)")

    # ------------------------------------------------------------- interface
    def reserve(self, size: int, alignment: int = 0, hint: int = 0) -> int:
        self._enter("reserve")
        if size <= 0:
            raise _invalid("reserve", f"size must be > 0, got {size}")
        self._check_gran("reserve", "size", size)
        if alignment < 0 or alignment & (alignment - 1):
            raise _invalid("reserve", f"alignment must be 0 or a power of two, got {alignment}")
        align = max(alignment, self._gran)
        with self._lock:
            span = size + align
            raw = _mmap(
                hint or None,
                span,
                _PROT_NONE,
                _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                -1,
                0,
            )
            if raw == _MAP_FAILED or raw is None:
                raise DriverError(
                    "CUDA_ERROR_OUT_OF_MEMORY",
                    f"cannot reserve {size} bytes of address space",
                    operation="reserve",
                )
            start = -(-raw // align) * align
            if start > raw:
                _munmap(raw, start - raw)
            tail = raw + span - (start + size)
            if tail:
                _munmap(start + size, tail)
            bisect.insort(self._res_starts, start)
            self._reservations[start] = _Reservation(start, size)
            self._live_reservations += 1
            return start

    def free_address(self, address: int, size: int) -> None:
        self._enter("free_address")
        with self._lock:
            r = self._reservations.get(address)
            if r is None or r.size != size:
                raise _invalid(
                    "free_address",
                    f"({address:#x}, {size}) is not exactly one reservation "
                    "(adjacent reservations are freed one by one)",
                )
            if r.maps:
                raise _invalid(
                    "free_address",
                    f"reservation {address:#x} still has {len(r.maps)} mapping(s); unmap them first",
                )
            if _munmap(address, size) != 0:
                raise _os_error("munmap")
            del self._reservations[address]
            self._res_starts.remove(address)
            self._live_reservations -= 1

    def create(self, size: int, exportable: bool = False) -> int:
        self._enter("create")
        if size <= 0:
            raise _invalid("create", f"size must be > 0, got {size}")
        self._check_gran("create", "size", size)
        with self._lock:
            if self._physical_bytes + size > self.capacity:
                raise OutOfMemoryError(
                    size,
                    self._physical_bytes,
                    self.capacity,
                    message="host emulator capacity exhausted",
                )
            fd = os.memfd_create("vmmpool", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
            handle = next(self._next_handle)
            self._physical[handle] = _Physical(fd, size, exportable, charged=True)
            self._live_allocations += 1
            self._physical_bytes += size
            return handle

    def release(self, handle: int) -> None:
        self._enter("release")
        with self._lock:
            p = self._handle("release", handle)
            p.refs -= 1
            self._maybe_free(handle, p)

    def map(self, address: int, size: int, handle: int, offset: int = 0) -> None:
        self._enter("map")
        self._check_gran("map", "address", address)
        self._check_gran("map", "size", size)
        if offset != 0:
            raise _invalid("map", f"offset must be 0 (a whole allocation is mapped), got {offset}")
        with self._lock:
            p = self._handle("map", handle)
            if size != p.size:
                raise _invalid(
                    "map", f"size must equal the allocation's size {p.size}, got {size}"
                )
            r = self._reservation_of("map", address, size)
            if r.overlaps(address, size):
                raise _invalid(
                    "map", f"[{address:#x}, {address + size:#x}) overlaps an existing mapping"
                )
            got = _mmap(address, size, _PROT_NONE, _MAP_SHARED | _MAP_FIXED, p.fd, 0)
            if got == _MAP_FAILED or got != address:
                raise _os_error("mmap(MAP_FIXED)")
            bisect.insort(r.starts, address)
            r.maps[address] = _Mapped(size, handle)
            p.mapped += 1
            self._live_mappings += 1

    def unmap(self, address: int, size: int) -> None:
        self._enter("unmap")
        with self._lock:
            r = self._reservation_of("unmap", address, size)
            run = r.whole_run("unmap", address, size)
            self._fixed_none(address, size)
            for start in run:
                m = r.maps.pop(start)
                del r.starts[bisect.bisect_left(r.starts, start)]
                p = self._physical[m.handle]
                p.mapped -= 1
                self._live_mappings -= 1
                self._maybe_free(m.handle, p)

    def set_access(self, address: int, size: int, access: Access, devices: Sequence[int]) -> None:
        self._enter("set_access")
        if not devices:
            raise _invalid("set_access", "at least one device is required")
        for d in devices:
            if d != 0:
                raise DriverError(
                    "CUDA_ERROR_INVALID_DEVICE",
                    f"the host emulator has one device (0), got {d}",
                    operation="set_access",
                )
        with self._lock:
            r = self._reservation_of("set_access", address, size)
            run = r.whole_run("set_access", address, size)
            if _mprotect(address, size, _PROT[access]) != 0:
                raise _os_error("mprotect")
            for start in run:
                r.maps[start].access = access

    def get_access(self, address: int, device: int) -> Access:
        self._enter("get_access")
        if device != 0:
            raise DriverError(
                "CUDA_ERROR_INVALID_DEVICE",
                f"the host emulator has one device (0), got {device}",
                operation="get_access",
            )
        with self._lock:
            r = self._reservation_of("get_access", address, 1)
            start = r.covering(address)
            if start is None:
                raise _invalid("get_access", f"{address:#x} is not mapped")
            return r.maps[start].access

    def retain(self, address: int) -> int:
        self._enter("retain")
        with self._lock:
            r = self._reservation_of("retain", address, 1)
            start = r.covering(address)
            if start is None:
                raise _invalid("retain", f"{address:#x} is not mapped")
            handle = r.maps[start].handle
            self._physical[handle].refs += 1
            return handle

    def export_fd(self, handle: int) -> int:
        self._enter("export_fd")
        with self._lock:
            p = self._handle("export_fd", handle)
            if not p.exportable:
                raise _invalid(
                    "export_fd",
                    "allocation was not created exportable (request the posix_fd handle type)",
                )
            return os.dup(p.fd)

    def import_fd(self, fd: int) -> int:
        self._enter("import_fd")
        try:
            size = os.fstat(fd).st_size
        except OSError as err:
            raise _invalid("import_fd", f"{fd} is not an open file descriptor") from err
        if size <= 0 or size % self._gran:
            raise _invalid(
                "import_fd", f"fd {fd} is not a shareable handle (size {size} is not granular)"
            )
        with self._lock:
            handle = next(self._next_handle)
            # Imported memory belongs to the exporter: it is not charged against capacity.
            self._physical[handle] = _Physical(os.dup(fd), size, exportable=True, charged=False)
            self._live_allocations += 1
            return handle

    def mem_info(self) -> tuple[int, int]:
        self._enter("mem_info")
        with self._lock:
            return (self.capacity - self._physical_bytes, self.capacity)

    def synchronize(self, stream: int | None = None) -> None:
        # Host "work" is synchronous: there is nothing in flight to wait for.
        self._enter("synchronize")

    def _check_accessible(self, op: str, address: int, size: int, write: bool) -> None:
        """Raise instead of faulting: the range must be mapped with enough access."""
        with self._lock:
            r = self._reservation_of(op, address, size)
            cur, end = address, address + size
            while cur < end:
                start = r.covering(cur)
                if start is None:
                    raise _invalid(op, f"{cur:#x} is not mapped")
                m = r.maps[start]
                if m.access is Access.NONE or (write and m.access is Access.READ):
                    raise _invalid(
                        op, f"{cur:#x} is mapped with access {m.access.value!r}: cannot {op} it"
                    )
                cur = start + m.size

    def write(self, address: int, data: memoryview) -> None:
        self._enter("write")
        n = data.nbytes
        self._check_accessible("write", address, n, write=True)
        src = (ctypes.c_char * n).from_buffer_copy(data) if data.readonly else (
            (ctypes.c_char * n).from_buffer(data)
        )
        ctypes.memmove(address, src, n)

    def read(self, address: int, out: memoryview) -> None:
        self._enter("read")
        self._check_accessible("read", address, out.nbytes, write=False)
        ctypes.memmove((ctypes.c_char * out.nbytes).from_buffer(out), address, out.nbytes)

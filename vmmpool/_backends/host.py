"""The host emulator: CUDA's VMM contract on Linux virtual memory.

============================  ==============================================
CUDA driver                   host emulator
============================  ==============================================
``cuMemAddressReserve``       anonymous ``PROT_NONE`` mapping, aligned
``cuMemCreate``               a slot of a shared 1 GiB memfd chunk (first
                              fit); its own ``memfd_create`` when exportable
``cuMemMap``                  ``mmap(MAP_SHARED)`` of the slot, moved over the
                              reservation with ``mremap(MREMAP_FIXED)``
``cuMemSetAccess``            ``mprotect``
``cuMemUnmap``                ``mmap(MAP_FIXED)`` of ``PROT_NONE`` anonymous
``cuMemRelease``              ``fallocate(PUNCH_HOLE)`` of the slot
``cuMemAddressFree``          ``munmap``
``cuMemExportToShareable...``  ``dup`` of the memfd (another process can map it)
============================  ==============================================

Scale: physical allocations share a few large memfds (one file descriptor per
1 GiB chunk), so an 80 GiB device of 40,960 live 2 MiB allocations needs about
80 descriptors, well under the common soft limit of 1,024. Released slots are
hole-punched, so their memory goes back to the OS at once. Adjacent mappings of
adjacent slots coalesce into one kernel mapping. Only allocations created
exportable, or imported, keep a memfd of their own, since an fd must be
shareable on its own.

OS exhaustion (descriptors, address space, ``vm.max_map_count``, memory)
surfaces as :class:`~vmmpool.OutOfMemoryError` (``CUDA_ERROR_OUT_OF_MEMORY``)
naming the OS cause, never as a raw ``OSError``, and a failed call changes
nothing. Each operation is ordered so that its undo only releases: ``map``
first maps the slot at an address of the kernel's choosing (the only step
that needs a new resource) and then moves it into place with ``mremap``, which
checks the mapping count before it changes anything; if the move fails, the
undo is one ``munmap`` of a whole mapping. ``unmap`` replaces whole mappings
in one call (the kernel checks its limits before it removes anything).
``reserve`` never undoes a trim: slack it could not trim stays part of the
kernel mapping and is freed with the reservation.

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
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import weakref
from collections.abc import Iterator, Sequence

from .._errors import ClosedError, DriverError, OutOfMemoryError
from .._options import Access
from .._prefault import populate_write
from .base import Backend, DeviceInfo

__all__ = ["HostBackend", "DEFAULT_GRANULARITY", "ADDRESS_LIMIT", "CHUNK_SIZE", "default_capacity"]

DEFAULT_GRANULARITY = 2 << 20

#: Exclusive bound of the emulator's addresses and sizes: Linux's user address
#: space on x86-64 (47 bits; also within arm64's 48).
ADDRESS_LIMIT = 1 << 47

#: Bytes of one shared memfd chunk that non-exportable allocations are cut from.
CHUNK_SIZE = 1 << 30

_PROT_NONE = 0
_PROT_READ = 1
_PROT_WRITE = 2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_MAP_POPULATE = 0x8000
_MAP_FIXED_NOREPLACE = 0x100000  # Linux >= 4.17; older kernels take it as a plain hint
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
_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_fallocate = _libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2

#: errno values that mean "the OS ran out of something": reported as out of memory.
_EXHAUSTION = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EAGAIN, errno.EDQUOT, errno.EFBIG}
)
_HINTS = {
    errno.EMFILE: "the process's open-file limit (ulimit -n) is reached",
    errno.ENFILE: "the system's open-file limit is reached",
    errno.ENOMEM: "out of address space (RLIMIT_AS), mappings (vm.max_map_count) or memory",
    errno.ENOSPC: "no space left for the memory file",
}


def default_capacity() -> int:
    """Physical capacity of the default host device.

    ``VMMPOOL_HOST_CAPACITY`` when set (a size in the one grammar of
    :mod:`vmmpool._sizes`: ``"4096"``, ``"512M"``, ``"4 GiB"``, ``"1.5GB"``);
    otherwise a quarter of RAM, at most 8 GiB. Rounded down to the granularity.

    Raises
    ------
    ValueError
        If ``VMMPOOL_HOST_CAPACITY`` is not a size of at least one granule.
    """
    env = os.environ.get("VMMPOOL_HOST_CAPACITY", "").strip()
    if env:
        from .._options import brief
        from .._sizes import EXAMPLES, parse_size

        try:
            cap = parse_size(env)
        except ValueError:
            cap = -1
        if not DEFAULT_GRANULARITY <= cap <= ADDRESS_LIMIT:
            raise ValueError(
                f"VMMPOOL_HOST_CAPACITY must be a size from {DEFAULT_GRANULARITY} bytes to "
                f"2**47 (128 TiB) such as {EXAMPLES}, got {brief(env)}"
            )
        return cap - cap % DEFAULT_GRANULARITY
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - exotic platforms
        ram = 4 << 30
    cap = min(ram // 4, 8 << 30)
    return max(cap - cap % DEFAULT_GRANULARITY, 64 * DEFAULT_GRANULARITY)


def _os_failure(op: str, what: str, err: int, requested: int, in_use: int, limit: int) -> Exception:
    """The driver's error for an OS call that failed with `err`.

    Exhaustion becomes :class:`OutOfMemoryError` naming the OS cause; anything
    else ``CUDA_ERROR_OPERATING_SYSTEM``.
    """
    name = errno.errorcode.get(err, str(err))
    cause = f"{what} failed with {name} ({os.strerror(err)})"
    if err in _EXHAUSTION:
        hint = _HINTS.get(err)
        text = f"{op}: host emulator: {cause}" + (f": {hint}" if hint else "")
        return OutOfMemoryError(requested, in_use, limit, message=text)
    return DriverError("CUDA_ERROR_OPERATING_SYSTEM", cause, status=304, operation=op)


def _close_files(chunks: list[_Chunk], physical: dict[int, _Physical]) -> None:
    """Finalizer of a :class:`HostBackend`: close every memory file it still holds."""
    fds = [c.fd for c in chunks] + [p.fd for p in physical.values() if p.chunk is None]
    chunks.clear()
    physical.clear()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _invalid(op: str, message: str) -> DriverError:
    return DriverError("CUDA_ERROR_INVALID_VALUE", message, operation=op)


def _invalid_handle(op: str, message: str) -> DriverError:
    """A handle (event, stream) that is not live: the driver's name, as the CUDA backend's."""
    return DriverError("CUDA_ERROR_INVALID_HANDLE", message, operation=op)


class _Chunk:
    """A shared memfd that allocations are cut from, first fit, in granules."""

    __slots__ = ("fd", "size", "free_starts", "free_ends", "free_bytes")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.free_starts = [0]  # sorted, disjoint, non-adjacent free extents
        self.free_ends = [size]
        self.free_bytes = size

    def take(self, size: int) -> int | None:
        """Offset of a free extent of `size` bytes (first fit), or None."""
        if size > self.free_bytes:
            return None
        for i, (s, e) in enumerate(zip(self.free_starts, self.free_ends, strict=True)):
            if e - s >= size:
                if e - s == size:
                    del self.free_starts[i], self.free_ends[i]
                else:
                    self.free_starts[i] = s + size
                self.free_bytes -= size
                return s
        return None

    def give(self, offset: int, size: int) -> None:
        """Return ``[offset, offset + size)`` to the free extents, merging neighbours."""
        end = offset + size
        i = bisect.bisect_left(self.free_starts, offset)
        merge_prev = i > 0 and self.free_ends[i - 1] == offset
        merge_next = i < len(self.free_starts) and self.free_starts[i] == end
        if merge_prev and merge_next:
            self.free_ends[i - 1] = self.free_ends[i]
            del self.free_starts[i], self.free_ends[i]
        elif merge_prev:
            self.free_ends[i - 1] = end
        elif merge_next:
            self.free_starts[i] = offset
        else:
            self.free_starts.insert(i, offset)
            self.free_ends.insert(i, end)
        self.free_bytes += size

    @property
    def empty(self) -> bool:
        return self.free_bytes == self.size


class _Physical:
    __slots__ = (
        "fd", "offset", "chunk", "size", "refs", "mapped", "exportable", "charged", "exported"
    )

    def __init__(
        self,
        fd: int,
        size: int,
        exportable: bool,
        charged: bool,
        chunk: _Chunk | None = None,
        offset: int = 0,
    ) -> None:
        self.fd = fd  # the chunk's fd for a slot; an fd of its own otherwise
        self.offset = offset
        self.chunk = chunk
        self.size = size
        self.refs = 1
        self.mapped = 0
        self.exportable = exportable
        self.charged = charged
        #: An fd was handed out (export_fd): another process may hold the memory.
        self.exported = False


class _Mapped:
    __slots__ = ("size", "handle", "access")

    def __init__(self, size: int, handle: int) -> None:
        self.size = size
        self.handle = handle
        self.access = Access.NONE


class _Reservation:
    __slots__ = ("address", "size", "starts", "maps", "pieces")

    def __init__(self, address: int, size: int, pieces: list[tuple[int, int]]) -> None:
        self.address = address
        self.size = size
        # Kernel ranges to munmap at free: the reservation, plus any alignment
        # slack that could not be trimmed when it was made.
        self.pieces = pieces
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
        """Starts of the whole adjacent mappings exactly covering the range.

        An empty range is refused: it is no mapped range ("the entire contiguous address
        range that was mapped to", cuMemUnmap; "a fully mapped address range",
        cuMemSetAccess), and the stand-in driver refuses it too.
        """
        if size <= 0:
            raise _invalid(op, f"size must be > 0 (one or more whole mappings), got {size}")
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
        At most :data:`ADDRESS_LIMIT`.
    granularity : int
        Minimum granularity (2 MiB, as on current NVIDIA GPUs).
    recommended_granularity : int, optional
        Recommended granularity; equal to `granularity` when omitted.
    name : str
        Device name shown by ``python -m vmmpool info``.
    chunk_size : int
        Bytes of each shared memfd that non-exportable allocations are cut
        from (:data:`CHUNK_SIZE`); a multiple of `granularity`. An allocation
        larger than a chunk gets a chunk of its own size.
    """

    address_limit = ADDRESS_LIMIT
    device_memory_is_host_ram = True

    def __init__(
        self,
        capacity: int | None = None,
        granularity: int = DEFAULT_GRANULARITY,
        recommended_granularity: int | None = None,
        name: str = "host emulator (Linux virtual memory)",
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        super().__init__()
        page = os.sysconf("SC_PAGE_SIZE")
        if granularity <= 0 or granularity % page or granularity & (granularity - 1):
            raise ValueError(
                f"granularity must be a power of two multiple of the OS page size ({page}), "
                f"got {granularity}"
            )
        if granularity >= ADDRESS_LIMIT:
            raise ValueError(f"granularity must be below 2**47, got {granularity}")
        rec = granularity if recommended_granularity is None else recommended_granularity
        if rec < granularity or rec % granularity or rec >= ADDRESS_LIMIT:
            raise ValueError(
                f"recommended_granularity must be a multiple of granularity ({granularity}) "
                f"below 2**47, got {rec}"
            )
        cap = default_capacity() if capacity is None else int(capacity)
        if not 0 <= cap <= ADDRESS_LIMIT:
            raise ValueError(
                f"capacity must be in [0, 2**47] (what the emulator can address), got {cap}"
            )
        if chunk_size <= 0 or chunk_size % granularity or chunk_size >= ADDRESS_LIMIT:
            raise ValueError(
                f"chunk_size must be a positive multiple of granularity ({granularity}), "
                f"got {chunk_size}"
            )
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
        self._chunk_size = chunk_size
        self._chunks: list[_Chunk] = []
        # Chunks with a free slot, and empty chunks (insertion-ordered sets): a create or a
        # release costs O(1) in the number of chunks, not a scan of all of them.
        self._nonfull: dict[_Chunk, None] = {}
        self._empties: dict[_Chunk, None] = {}
        self._res_starts: list[int] = []
        self._reservations: dict[int, _Reservation] = {}
        self._physical: dict[int, _Physical] = {}
        self._next_handle = itertools.count(0x1000)
        self._closed = False
        # Safety net (issue 17): a device dropped without close() still closes its memory
        # files. The callback holds the containers, not self; closing an fd takes no lock.
        self._finalizer = weakref.finalize(self, _close_files, self._chunks, self._physical)
        self._finalizer.atexit = False

    def _forked(self) -> None:
        """In a forked child: refuse everything, and never close the memory files.

        The descriptors are the child's copies, but the child may have closed them and
        reused their numbers for files of its own: closing them by number from the safety
        net would close the child's files. They go when the child exits.
        """
        super()._forked()
        self._finalizer.detach()

    # ------------------------------------------------------------- helpers
    def _fail(self, op: str, what: str, requested: int = 0) -> Exception:
        """The driver's error for the OS call `what` that just failed (errno)."""
        return _os_failure(
            op, what, ctypes.get_errno(), requested, self._physical_bytes, self.capacity
        )

    def _from_oserror(self, op: str, what: str, exc: OSError, requested: int = 0) -> Exception:
        return _os_failure(
            op, what, exc.errno or 0, requested, self._physical_bytes, self.capacity
        )

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
            if p.chunk is None:
                if p.charged and not p.exported:
                    # Nobody else may hold this memory (never exported): give it back now.
                    # Closing the file alone left it to a forked child's inherited mappings
                    # (they keep the file), committed for as long as the child lived.
                    _fallocate(p.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, p.size)
                os.close(p.fd)
            else:
                self._give_slot(p.chunk, p.offset, p.size)
            self._live_allocations -= 1
            if p.charged:
                self._physical_bytes -= p.size

    def _give_slot(self, chunk: _Chunk, offset: int, size: int) -> None:
        """Return a slot; its memory goes back to the OS (a hole is punched)."""
        chunk.give(offset, size)
        self._nonfull[chunk] = None
        # Releasing never fails: a hole that cannot be punched (it cannot on
        # memfds) only keeps the memory until the slot is reused. Punched also when the
        # chunk is closed next: a forked child's inherited mappings keep the file.
        _fallocate(chunk.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, size)
        if chunk.empty:
            self._empties[chunk] = None
            if len(self._empties) > 1 or self._closed:
                # Keep one empty chunk for the next create (none once closed); close the others.
                self._forget_chunk(chunk)

    def _forget_chunk(self, chunk: _Chunk) -> None:
        self._chunks.remove(chunk)
        self._nonfull.pop(chunk, None)
        self._empties.pop(chunk, None)
        os.close(chunk.fd)

    def _take_slot(self, size: int) -> tuple[_Chunk, int]:
        """A free slot of `size` bytes, first fit over the chunks with room; a new chunk if none."""
        for c in self._nonfull:
            off = c.take(size)
            if off is not None:
                self._empties.pop(c, None)
                if c.free_bytes == 0:
                    del self._nonfull[c]
                return c, off
        csize = max(self._chunk_size, size)
        fd = self._new_memfd("create", csize, size)
        c = _Chunk(fd, csize)
        self._chunks.append(c)
        off = c.take(size)
        assert off == 0
        if c.free_bytes:
            self._nonfull[c] = None
        return c, off

    def _new_memfd(self, op: str, size: int, requested: int) -> int:
        if self._closed:
            raise ClosedError("emulated Device")
        try:
            fd = os.memfd_create("vmmpool", os.MFD_CLOEXEC)
        except OSError as exc:
            raise self._from_oserror(op, "memfd_create", exc, requested) from None
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            raise self._from_oserror(op, "ftruncate", exc, requested) from None
        return fd

    @staticmethod
    def _fixed_none(address: int, size: int) -> bool:
        """Put an inaccessible, unbacked placeholder over the range (atomically)."""
        r = _mmap(
            address,
            size,
            _PROT_NONE,
            _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED,
            -1,
            0,
        )
        return not (r == _MAP_FAILED or r != address)

    # ------------------------------------------------------------- interface
    def reserve(self, size: int, alignment: int = 0, hint: int = 0) -> int:
        self._enter("reserve")
        self.check_value("reserve", "size", size)
        self.check_value("reserve", "alignment", alignment)
        self.check_value("reserve", "hint", hint)
        if size <= 0:
            raise _invalid("reserve", f"size must be > 0, got {size}")
        self._check_gran("reserve", "size", size)
        if alignment & (alignment - 1):
            raise _invalid("reserve", f"alignment must be 0 or a power of two, got {alignment}")
        align = max(alignment, self._gran)
        span = size + align
        self.check_range("reserve", 0, span, what="size + alignment")
        if hint and hint + span > self.address_limit:
            hint = 0  # only a hint: one the emulator cannot honour is ignored
        with self._lock:
            if self._closed:
                raise ClosedError("emulated Device")
            if hint and hint % align == 0:
                # A hint naming free, aligned address space is honoured exactly, as the
                # driver does ("treats it as a hint about where to place the reservation"):
                # the plain path below asks the kernel for size + alignment bytes at the hint,
                # so it never landed right below another mapping (the hint for an adjacent
                # reservation was never honoured). Refused (taken): the plain path.
                got = _mmap(
                    hint,
                    size,
                    _PROT_NONE,
                    _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
                if got == hint:
                    bisect.insort(self._res_starts, hint)
                    self._reservations[hint] = _Reservation(hint, size, [(hint, size)])
                    self._live_reservations += 1
                    return hint
                if got != _MAP_FAILED and got is not None:
                    _munmap(got, size)  # a kernel without MAP_FIXED_NOREPLACE placed it elsewhere
            raw = _mmap(
                hint or None,
                span,
                _PROT_NONE,
                _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                -1,
                0,
            )
            if raw == _MAP_FAILED or raw is None:
                raise self._fail("reserve", f"mmap of {span} bytes of address space", size)
            start = -(-raw // align) * align
            pieces = [(start, size)]
            # Trimming the slack can need a split the kernel refuses at its
            # mapping limit; then the slack stays, freed with the reservation.
            # No step here needs undoing.
            if start > raw and _munmap(raw, start - raw) != 0:
                pieces.append((raw, start - raw))
            tail = raw + span - (start + size)
            if tail and _munmap(start + size, tail) != 0:
                pieces.append((start + size, tail))
            bisect.insort(self._res_starts, start)
            self._reservations[start] = _Reservation(start, size, pieces)
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
            while r.pieces:
                a, n = r.pieces[-1]
                if _munmap(a, n) != 0:
                    # A split the kernel refused (its mapping limit): the
                    # reservation stays as it was and can be freed later.
                    raise self._fail("free_address", f"munmap of [{a:#x}, {a + n:#x})")
                r.pieces.pop()
            del self._reservations[address]
            self._res_starts.remove(address)
            self._live_reservations -= 1

    def create(self, size: int, exportable: bool = False) -> int:
        self._enter("create")
        self.check_value("create", "size", size)
        if size <= 0:
            raise _invalid("create", f"size must be > 0, got {size}")
        self._check_gran("create", "size", size)
        with self._lock:
            if self._closed:
                raise ClosedError("emulated Device")
            if self._physical_bytes + size > self.capacity:
                raise OutOfMemoryError(
                    size,
                    self._physical_bytes,
                    self.capacity,
                    message="host emulator capacity exhausted",
                )
            if exportable:
                # An fd must be shareable on its own: an exportable allocation
                # has a memfd of its own.
                p = _Physical(self._new_memfd("create", size, size), size, True, charged=True)
            else:
                chunk, off = self._take_slot(size)
                p = _Physical(chunk.fd, size, False, charged=True, chunk=chunk, offset=off)
            handle = next(self._next_handle)
            self._physical[handle] = p
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
        self.check_range("map", address, size)
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
            # Step 1, the only one that needs a new resource: map the memory
            # wherever the kernel likes. Failing here changes nothing.
            tmp = _mmap(None, size, _PROT_NONE, _MAP_SHARED, p.fd, p.offset)
            if tmp == _MAP_FAILED or tmp is None:
                raise self._fail("map", "mmap of the allocation", size)
            # Step 2: move it over the placeholder. mremap checks the mapping
            # count before it unmaps anything; its undo only releases.
            got = _mremap(tmp, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, address)
            if got == _MAP_FAILED or got != address:
                exc = self._fail("map", "mremap into the reservation", size)
                _munmap(tmp, size)  # a whole mapping: needs no split
                raise exc
            bisect.insort(r.starts, address)
            r.maps[address] = _Mapped(size, handle)
            p.mapped += 1
            self._live_mappings += 1

    def unmap(self, address: int, size: int) -> None:
        self._enter("unmap")
        self.check_range("unmap", address, size)
        with self._lock:
            r = self._reservation_of("unmap", address, size)
            run = r.whole_run("unmap", address, size)
            # One call: the kernel checks its limits (mapping count, address
            # space) before it removes the old mappings.
            if not self._fixed_none(address, size):
                raise self._fail("unmap", "mmap(MAP_FIXED) of the PROT_NONE placeholder")
            if run:  # consecutive in the sorted starts: one slice, not one deletion per page
                i0 = bisect.bisect_left(r.starts, run[0])
                del r.starts[i0 : i0 + len(run)]
            for start in run:
                m = r.maps.pop(start)
                p = self._physical[m.handle]
                p.mapped -= 1
                self._live_mappings -= 1
                self._maybe_free(m.handle, p)

    def set_access(self, address: int, size: int, access: Access, devices: Sequence[int]) -> None:
        self._enter("set_access")
        self.check_range("set_access", address, size)
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
                exc = self._fail("set_access", "mprotect")
                # mprotect may have changed a prefix of the range. Putting back
                # each run's old protection only merges what it split: it needs
                # no new kernel mapping.
                i = 0
                while i < len(run):
                    old = r.maps[run[i]].access
                    j = i
                    end = run[i]
                    while j < len(run) and r.maps[run[j]].access is old:
                        end = run[j] + r.maps[run[j]].size
                        j += 1
                    _mprotect(run[i], end - run[i], _PROT[old])
                    i = j
                raise exc
            for start in run:
                r.maps[start].access = access

    def get_access(self, address: int, device: int) -> Access:
        self._enter("get_access")
        self.check_value("get_access", "address", address)
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

    def mapped_at(self, address: int) -> tuple[int, int, int, Access | None] | None:
        # The emulated device's own state (its page tables), not a record of calls.
        with self._lock:
            i = bisect.bisect_right(self._res_starts, address) - 1
            if i < 0:
                return None
            r = self._reservations[self._res_starts[i]]
            start = r.covering(address) if address < r.address + r.size else None
            if start is None:
                return None
            m = r.maps[start]
            return start, m.size, m.handle, m.access

    def retain(self, address: int) -> int:
        self._enter("retain")
        self.check_value("retain", "address", address)
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
            try:
                fd = os.dup(p.fd)
            except OSError as exc:
                raise self._from_oserror("export_fd", "dup", exc) from None
            p.exported = True
            return fd

    def import_fd(self, fd: int) -> int:
        self._enter("import_fd")
        if not 0 <= fd < 1 << 31:
            raise _invalid("import_fd", f"{fd} is not an open file descriptor")
        try:
            size = os.fstat(fd).st_size
        except OSError as err:
            raise _invalid("import_fd", f"{fd} is not an open file descriptor") from err
        if size <= 0 or size % self._gran:
            raise _invalid(
                "import_fd", f"fd {fd} is not a shareable handle (size {size} is not granular)"
            )
        with self._lock:
            if self._closed:
                raise ClosedError("emulated Device")
            try:
                own = os.dup(fd)
            except OSError as exc:
                raise self._from_oserror("import_fd", "dup", exc, size) from None
            handle = next(self._next_handle)
            # Imported memory belongs to the exporter: it is not charged against capacity.
            self._physical[handle] = _Physical(own, size, exportable=True, charged=False)
            self._live_allocations += 1
            return handle

    def mem_info(self) -> tuple[int, int]:
        self._enter("mem_info")
        with self._lock:
            return (self.capacity - self._physical_bytes, self.capacity)

    def synchronize(self, stream: int | None = None) -> None:
        # Host "work" is synchronous: there is nothing in flight to wait for.
        self._enter("synchronize")

    def check_transfer(self, address: int, nbytes: int, write: bool = False) -> None:
        """Check the addressable range, then that the range is mapped with enough access."""
        super().check_transfer(address, nbytes, write)
        if nbytes:
            op = "write" if write else "read"
            self._check_accessible(op, address, nbytes, write=write)

    def _check_accessible(self, op: str, address: int, size: int, write: bool) -> None:
        """Raise instead of faulting: the range must be mapped with enough access."""
        self.check_range(op, address, size)
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

    # write / read hold the lock from the check through the copy (issue 17 item 5):
    # checked under the lock but copied outside it, a racing unmap (a pool's
    # close() in another thread) could pull the mapping out between the two, and
    # the copy then faulted (a segfault) instead of raising DriverError.
    def write(self, address: int, data: memoryview) -> None:
        self._enter("write")
        n = data.nbytes
        src = (ctypes.c_char * n).from_buffer_copy(data) if data.readonly else (
            (ctypes.c_char * n).from_buffer(data)
        )
        with self._lock:
            self._check_accessible("write", address, n, write=True)
            ctypes.memmove(address, src, n)

    def read(self, address: int, out: memoryview) -> None:
        self._enter("read")
        dst = (ctypes.c_char * out.nbytes).from_buffer(out)
        with self._lock:
            self._check_accessible("read", address, out.nbytes, write=False)
            ctypes.memmove(dst, address, out.nbytes)

    def close(self) -> None:
        """Close the device's memory files; refuse new memory (idempotent).

        The empty shared chunks are closed now. Memory still allocated keeps
        working and its file is closed as soon as it is released; only
        ``reserve``, ``create`` and ``import_fd`` raise
        :class:`~vmmpool.ClosedError` afterwards.
        """
        self.check_process("HostBackend")
        with self._lock:
            self._closed = True
            for c in list(self._empties):
                self._forget_chunk(c)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def open_files(self) -> int:
        """Memory files (memfds) the device holds open now."""
        with self._lock:
            return len(self._chunks) + sum(p.chunk is None for p in self._physical.values())

    # ---------------------------------------------------------------- events
    # Host work is synchronous, so by itself every event completes at once. A
    # test can hold a stream's work pending (hold_stream / holding): events
    # recorded on it then stay incomplete until release_stream. Waiting on such
    # an event models a GPU that finishes the work: the wait completes it (the
    # stream's hold ends), and the wait is counted like every call.
    _ev: tuple[dict[int, list[int]], dict[int, tuple[int, bool]], set[int]]
    _live_events: int

    def _event_state(self) -> tuple[dict[int, list[int]], dict[int, tuple[int, bool]], set[int]]:
        st = getattr(self, "_ev", None)
        if st is None:
            # held stream -> pending events; event -> (stream, done); held streams
            st = self._ev = ({}, {}, set())
        return st

    def hold_stream(self, stream: int) -> None:
        """Keep events recorded on `stream` from now on incomplete (test hook)."""
        with self._lock:
            _pending, _events, held = self._event_state()
            held.add(int(stream))

    def release_stream(self, stream: int) -> None:
        """Complete `stream`'s pending work: its events become complete (test hook)."""
        with self._lock:
            pending, events, held = self._event_state()
            s = int(stream)
            held.discard(s)
            for ev in pending.pop(s, []):
                if ev in events:
                    events[ev] = (s, True)

    @contextlib.contextmanager
    def holding(self, *streams: int) -> Iterator[None]:
        """Context manager: hold `streams` pending inside the block, release them after."""
        for s in streams:
            self.hold_stream(s)
        try:
            yield
        finally:
            for s in streams:
                self.release_stream(s)

    def event_record(self, stream: int) -> int:
        self._enter("event_record")
        with self._lock:
            pending, events, held = self._event_state()
            s = int(stream)
            ev = next(self._next_handle)
            done = s not in held
            events[ev] = (s, done)
            if not done:
                pending.setdefault(s, []).append(ev)
            self._live_events = getattr(self, "_live_events", 0) + 1
            return ev

    def _event(self, op: str, event: int) -> tuple[int, bool]:
        _pending, events, _held = self._event_state()
        rec = events.get(event)
        if rec is None:
            raise _invalid_handle(op, f"{event:#x} is not a live event")
        return rec

    def event_query(self, event: int) -> bool:
        self._enter("event_query")
        with self._lock:
            return self._event("event_query", event)[1]

    def event_wait(self, event: int) -> None:
        self._enter("event_wait")
        with self._lock:
            s, done = self._event("event_wait", event)
            if not done:
                self.release_stream(s)

    def event_destroy(self, event: int) -> None:
        self._enter("event_destroy")
        with self._lock:
            pending, events, _held = self._event_state()
            s, _done = self._event("event_destroy", event)
            del events[event]
            if event in pending.get(s, ()):
                pending[s].remove(event)
            self._live_events -= 1

    # ---------------------------------------------------------------- staging
    # "Page-locked" host memory is plain anonymous memory here, and the copies
    # are synchronous memmoves (host work is synchronous): an event recorded
    # after them completes as any other. The emulator still checks what the
    # driver requires: the host side lies inside one host_alloc block, the
    # device side is mapped with enough access.
    _host_blocks: dict[int, int]
    _live_host: int

    def _host_state(self) -> dict[int, int]:
        blocks = getattr(self, "_host_blocks", None)
        if blocks is None:
            blocks = self._host_blocks = {}
        return blocks

    def host_alloc(self, size: int) -> int:
        self._enter("host_alloc")
        self.check_value("host_alloc", "size", size)
        if size <= 0:
            raise _invalid("host_alloc", f"size must be > 0, got {size}")
        with self._lock:
            # Resident from the start (MAP_POPULATE), as page-locked memory is:
            # no copy through it takes a page fault.
            addr = _mmap(
                None, size, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_POPULATE,
                -1, 0,
            )
            if addr == _MAP_FAILED or addr is None:
                raise self._fail("host_alloc", "mmap of host staging memory", size)
            self._host_state()[addr] = size
            self._live_host = getattr(self, "_live_host", 0) + 1
            return int(addr)

    def host_free(self, address: int) -> None:
        self._enter("host_free")
        with self._lock:
            blocks = self._host_state()
            size = blocks.get(address)
            if size is None:
                raise _invalid("host_free", f"{address:#x} is not host memory from host_alloc")
            if _munmap(address, size) != 0:
                raise self._fail("host_free", "munmap of host staging memory")
            del blocks[address]
            self._live_host -= 1

    def _check_host(self, op: str, address: int, size: int) -> None:
        with self._lock:
            for start, n in self._host_state().items():
                if start <= address and address + size <= start + n:
                    return
        raise _invalid(
            op, f"host range [{address:#x}, {address + size:#x}) is not inside memory from host_alloc"
        )

    def _check_stream(self, op: str, stream: int) -> None:
        if not 0 <= int(stream) < 1 << 64:
            raise _invalid(op, f"stream must be a CUstream value >= 0, got {stream}")

    def copy_dtoh_async(self, dst: int, src: int, size: int, stream: int) -> None:
        self._enter("copy_dtoh_async")
        self._check_stream("copy_dtoh_async", stream)
        if size:
            self._check_host("copy_dtoh_async", dst, size)
            self._check_accessible("copy_dtoh_async", src, size, write=False)
            ctypes.memmove(dst, src, size)

    def copy_htod_async(self, dst: int, src: int, size: int, stream: int) -> None:
        self._enter("copy_htod_async")
        self._check_stream("copy_htod_async", stream)
        if size:
            self._check_host("copy_htod_async", src, size)
            self._check_accessible("copy_htod_async", dst, size, write=True)
            # Pages of a new allocation are committed on first touch: commit
            # the destination in one call rather than a fault per 4 KiB page
            # (the same pages the copy would commit; the copy then runs at
            # memory speed). Only advice: without it the copy faults them in.
            populate_write(dst, size)
            ctypes.memmove(dst, src, size)

    # ---------------------------------------------------------------- streams
    # A stream of the emulator is only a key (its work runs at once): a
    # created one is a fresh handle, kept until destroyed.
    _streams: set[int]

    def stream_create(self) -> int:
        self._enter("stream_create")
        with self._lock:
            streams: set[int] | None = getattr(self, "_streams", None)
            if streams is None:
                streams = set()
                self._streams = streams
            s = next(self._next_handle)
            streams.add(s)
            self._live_streams = len(streams)
            return s

    def stream_destroy(self, stream: int) -> None:
        self._enter("stream_destroy")
        with self._lock:
            streams: set[int] = getattr(self, "_streams", set())
            if stream not in streams:
                raise _invalid_handle("stream_destroy", f"{stream!r} is not a stream from stream_create")
            streams.remove(stream)
            self._live_streams = len(streams)


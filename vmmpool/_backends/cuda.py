"""The CUDA backend: :class:`~vmmpool._backends.base.Backend` on the driver API.

Every operation is one call into ``cuda.bindings.driver`` (cuda-bindings 12.x
and 13.x), whose ``CUresult`` is checked by :func:`_check`. The module imports
the bindings lazily, so ``import vmmpool`` works where cuda-bindings is not
installed; :func:`probe` and :func:`device_count` say whether a device is usable
without raising.

Rules of the driver this module relies on (numbers refer to
``vmmpool/VMM_DESIGN.md``, "Driver rules relied on"):

* Context: CuPy and PyTorch use each device's *primary* context, so the backend
  retains it and makes it current on a thread that has no current context
  (once per thread); memory mapped here is then what their kernels see.
* Rule 1: the granularities in :attr:`CudaBackend.info` come from
  ``cuMemGetAllocationGranularity`` and are never hard-coded.
* Rules 3 and 4: ``set_access`` and ``unmap`` may cover several whole adjacent
  mappings; the backend walks its table of mappings to count what an unmap
  removed. The driver enforces the contract itself: the backend does not
  pre-validate ranges.
* Rule 6: a hinted reservation may land elsewhere; ``reserve`` returns what the
  driver gave and the caller checks it.
* Rule 7: physical memory is freed only when every reference is released AND
  every mapping is gone; the live counters follow that rule.
* Rule 8 (pytorch #196258): ``synchronize(None)`` synchronizes the device that
  owns the memory (its primary context pushed), not whatever context is current.
* Rule 11: exportable memory requests ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``
  at create time. Where the driver refuses that handle type although the
  device attribute says it is supported (``CUDA_ERROR_NOT_PERMITTED`` or
  ``CUDA_ERROR_NOT_SUPPORTED``, as in some containers), ``create`` falls back
  to memory without it: see :meth:`CudaBackend.create`.
* GPUDirect RDMA: where ``CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED``
  is 1, allocations request ``allocFlags.gpuDirectRDMACapable`` (as PyTorch
  does) so NCCL and RDMA stacks can register them.
* Copies (``write``/``read``) run with the owning device's primary context
  pushed, so they work whatever context (another device's) is current.
* ``CUdeviceptr`` and handle wrappers have no value equality in cuda-bindings
  13.5.0 (cuda-python #2388): every value is converted with ``int(...)``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from .._errors import ClosedError, DeviceUnavailableError, DriverError, OutOfMemoryError
from .._options import Access, check_int
from .base import Backend, DeviceInfo

__all__ = ["CudaBackend", "device_count", "probe"]

#: ``CUresult`` names meaning "no usable CUDA here" rather than a bug. Every
#: name exists in cuda-bindings 12.8 and 13.x (a test checks it).
_UNAVAILABLE_ERRORS: frozenset[str] = frozenset(
    {
        "CUDA_ERROR_NO_DEVICE",
        "CUDA_ERROR_NOT_INITIALIZED",
        "CUDA_ERROR_DEINITIALIZED",
        "CUDA_ERROR_INVALID_DEVICE",
        "CUDA_ERROR_NOT_SUPPORTED",
        "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        "CUDA_ERROR_STUB_LIBRARY",
        "CUDA_ERROR_DEVICE_UNAVAILABLE",
        "CUDA_ERROR_DEVICE_NOT_LICENSED",
    }
)

#: Short reasons for the commonest "not available" errors.
_REASONS: dict[str, str] = {
    "CUDA_ERROR_NO_DEVICE": "no CUDA device",
    "CUDA_ERROR_STUB_LIBRARY": "CUDA driver library not found (only the stub libcuda)",
    "CUDA_ERROR_NOT_SUPPORTED": "VMM not supported",
}

_MISSING_LIBRARY = "CUDA driver library not found"

#: What cuMemCreate answers where the POSIX fd handle type is refused.
_HANDLE_TYPE_REFUSED: frozenset[str] = frozenset({"CUDA_ERROR_NOT_PERMITTED", "CUDA_ERROR_NOT_SUPPORTED"})

_NAME_LENGTH = 256


# --------------------------------------------------------------------- helpers
def _driver() -> Any:
    """Import and return ``cuda.bindings.driver`` (raises ImportError without it)."""
    from cuda.bindings import driver

    return driver


_NOT_FOUND = re.compile(r'^[Ff]unction "?(cu\w+)"? (?:is )?not found')


def _missing_library_reason(exc: BaseException) -> str | None:
    """Why `exc` says that libcuda (or an entry point of it) could not be loaded, or ``None``.

    cuda-bindings 13.x raises ``cuda.pathfinder.DynamicLibNotFoundError`` (a
    ``RuntimeError``) on the first driver call. 12.8 and 12.9.0 raise
    ``RuntimeError("Failed to dlopen libcuda.so.1")`` on the first call and
    ``RuntimeError('Function "cuInit" not found')`` on every later one. A driver
    lacking an entry point the bindings need gives ``Function "cuX" not found``
    (12.x) or ``FunctionNotFoundError("function cuX is not found")`` (13.x).
    """
    if not isinstance(exc, RuntimeError):
        return None
    if any(cls.__name__ == "DynamicLibNotFoundError" for cls in type(exc).__mro__):
        return _MISSING_LIBRARY
    text = str(exc)
    if text.startswith(("Failed to dlopen libcuda", "Failed to LoadLibraryEx")):
        return _MISSING_LIBRARY
    found = _NOT_FOUND.match(text)
    if found is None:
        return None
    if found.group(1) in ("cuInit", "cuGetProcAddress", "cuDriverGetVersion"):
        return _MISSING_LIBRARY  # the library never loaded (12.x after a failed dlopen)
    return f"the CUDA driver lacks {found.group(1)} (too old for this cuda-bindings)"


def _unavailable_reason(exc: BaseException) -> str | None:
    """Return why CUDA is unavailable if `exc` means so, else ``None`` (real error)."""
    if isinstance(exc, ImportError):
        return "cuda-bindings is not installed (pip install cuda-bindings)"
    if isinstance(exc, DriverError):
        if exc.name not in _UNAVAILABLE_ERRORS:
            return None
        return _REASONS.get(exc.name, f"{exc.name}: {exc.message}")
    return _missing_library_reason(exc)


def _to_str(value: Any) -> str:
    """Decode a driver string (bytes, NUL-padded) to ``str``."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).split(b"\x00", 1)[0].decode("utf-8", "replace")
    return "" if value is None else str(value)


def _raise_driver_error(
    err: Any, op: str, owner: CudaBackend | None, requested: int, drv: Any = None
) -> None:
    """Raise the vmmpool exception for the failed ``CUresult`` `err`.

    The error's name and text come from the driver module that made the call:
    `drv`, else the `owner` backend's own, else the module-level one.
    """
    if drv is None:
        drv = owner._drv if owner is not None else _driver()
    status = int(err)
    name_result = drv.cuGetErrorName(err)
    name = _to_str(name_result[1]) if not name_result[0] else ""
    if not name:
        name = getattr(err, "name", "") or f"CUresult {status}"
    text_result = drv.cuGetErrorString(err)
    message = _to_str(text_result[1]) if not text_result[0] else ""
    if not message:
        message = "unknown driver error"
    if name == "CUDA_ERROR_OUT_OF_MEMORY":
        in_use = owner._physical_bytes if owner is not None else 0
        limit = owner._total_memory if owner is not None else 0
        raise OutOfMemoryError(
            requested=requested,
            in_use=in_use,
            limit=limit,
            status=status,
            message=f"driver: {op}: {message}",
        )
    raise DriverError(name, message, status=status, operation=op)


def _check(
    result: tuple[Any, ...],
    op: str,
    owner: CudaBackend | None = None,
    requested: int = 0,
    drv: Any = None,
) -> Any:
    """Check the ``CUresult`` of a driver call and return the rest of its tuple.

    Parameters
    ----------
    result : tuple
        What the binding returned: ``(CUresult, *values)``.
    op : str
        The operation, for the error message (``"map"``, ``"cuInit"``, ...).
    owner : CudaBackend, optional
        The backend making the call, whose live physical bytes and device
        capacity go into an :class:`~vmmpool.OutOfMemoryError`.
    requested : int
        Bytes the call asked for, if known (for out-of-memory errors).
    drv : module, optional
        The driver module that made the call (default: `owner`'s).

    Returns
    -------
    object
        ``None`` when the call returns only a status, the single value when it
        returns one, else the tuple of values.

    Raises
    ------
    OutOfMemoryError
        On ``CUDA_ERROR_OUT_OF_MEMORY``.
    DriverError
        On any other error, with the driver's error name and description.
    """
    err = result[0]
    if err:  # CUresult is an int enum; CUDA_SUCCESS is 0
        _raise_driver_error(err, op, owner, requested, drv)
    n = len(result)
    if n == 1:
        return None
    if n == 2:
        return result[1]
    return result[1:]


def _device_attribute(drv: Any, dev: Any, *names: str) -> int:
    """Return the first of the device attributes `names` this binding knows."""
    for name in names:
        attr = getattr(drv.CUdevice_attribute, name, None)
        if attr is not None:
            return int(_check(drv.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute", drv=drv))
    return 0


class _Facts:
    """What :func:`_inspect` learned about one device."""

    __slots__ = ("count", "dev", "reason", "supports_posix_fd", "supports_rdma", "supports_vmm")

    def __init__(self) -> None:
        self.count = 0
        self.dev: Any = None
        self.reason: str | None = None
        self.supports_vmm = False
        self.supports_posix_fd = False
        self.supports_rdma = False


def _inspect(drv: Any, ordinal: int) -> _Facts:
    """Initialise the driver and inspect device `ordinal` (driver errors propagate)."""
    facts = _Facts()
    _check(drv.cuInit(0), "cuInit", drv=drv)
    facts.count = int(_check(drv.cuDeviceGetCount(), "cuDeviceGetCount", drv=drv))
    if facts.count == 0:
        facts.reason = "no CUDA device"
        return facts
    if not 0 <= ordinal < facts.count:
        plural = "device" if facts.count == 1 else "devices"
        facts.reason = f"device ordinal {ordinal} out of range ({facts.count} {plural})"
        return facts
    facts.dev = _check(drv.cuDeviceGet(ordinal), "cuDeviceGet", drv=drv)
    facts.supports_vmm = bool(
        _device_attribute(
            drv,
            facts.dev,
            "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
            "CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED",
        )
    )
    facts.supports_posix_fd = bool(
        _device_attribute(
            drv,
            facts.dev,
            "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
        )
    )
    facts.supports_rdma = bool(
        _device_attribute(drv, facts.dev, "CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED")
    )
    if not facts.supports_vmm:
        facts.reason = "VMM not supported"
    return facts


# ------------------------------------------------------------------ public API
def probe(ordinal: int = 0) -> str | None:
    """Say whether CUDA device `ordinal` can back a :class:`CudaBackend`.

    Parameters
    ----------
    ordinal : int
        The CUDA device ordinal.

    Returns
    -------
    str or None
        ``None`` when the device is usable; otherwise a short reason such as
        ``"CUDA driver library not found"``, ``"no CUDA device"``,
        ``"device ordinal 3 out of range (2 devices)"`` or ``"VMM not supported"``.

    Raises
    ------
    DriverError
        For driver failures that do not mean "CUDA is not available here".
    """
    ordinal = check_int("ordinal", ordinal, minimum=None)
    try:
        return _inspect(_driver(), ordinal).reason
    except (ImportError, RuntimeError) as exc:
        reason = _unavailable_reason(exc)
        if reason is None:
            raise
        return reason


def device_count() -> int:
    """Return the number of CUDA devices, or 0 where CUDA is not available.

    Raises
    ------
    DriverError
        For driver failures that do not mean "CUDA is not available here".
    """
    try:
        drv = _driver()
        _check(drv.cuInit(0), "cuInit", drv=drv)
        return int(_check(drv.cuDeviceGetCount(), "cuDeviceGetCount", drv=drv))
    except (ImportError, RuntimeError) as exc:
        if _unavailable_reason(exc) is None:
            raise
        return 0


class _Allocation:
    """Bookkeeping for one physical allocation (rule 7).

    The memory is live until ``refs`` and ``mapped`` both reach zero. ``keys``
    lists the handle values that name it in the backend's table.
    """

    __slots__ = ("keys", "mapped", "refs", "size")

    def __init__(self, size: int, refs: int, keys: list[int]) -> None:
        self.size = size
        self.refs = refs
        self.mapped = 0
        self.keys = keys


class CudaBackend(Backend):
    """Backend on the CUDA driver's virtual memory management API.

    Parameters
    ----------
    ordinal : int
        The CUDA device ordinal. Physical memory is created on this device and
        its primary context is retained until :meth:`close`.

    Raises
    ------
    DeviceUnavailableError
        When :func:`probe` reports the device unusable (no cuda-bindings, no
        driver, no device, ordinal out of range, no VMM support) or its primary
        context cannot be retained.

    Notes
    -----
    Imported allocations (:meth:`import_fd`) count as live allocations but add
    nothing to the live physical bytes: the memory belongs to the exporting
    process (as in the host emulator), and the driver API offers no query for
    an allocation's size anyway. The same holds for a handle :meth:`retain`
    returns for memory this backend did not map.

    A thread on which no context is current gets this device's primary context
    made current the first time it calls an operation; a thread that already
    has a context current keeps it (VMM calls name the device explicitly).
    """

    def __init__(self, ordinal: int) -> None:
        super().__init__()
        ordinal = check_int("ordinal", ordinal, minimum=None)
        self._ordinal = ordinal
        self._closed = False
        self._pctx: Any = None
        self._tls = threading.local()
        device = f"cuda:{ordinal}"
        try:
            drv = _driver()
            facts = _inspect(drv, ordinal)
        except (ImportError, RuntimeError) as exc:
            reason = _unavailable_reason(exc)
            if reason is None:
                raise
            raise DeviceUnavailableError(device, reason) from exc
        if facts.reason is not None:
            raise DeviceUnavailableError(device, facts.reason)
        self._drv: Any = drv
        self._dev: Any = facts.dev
        try:
            self._pctx = _check(
                drv.cuDevicePrimaryCtxRetain(facts.dev), "cuDevicePrimaryCtxRetain", drv=drv
            )
        except DriverError as exc:
            reason = _unavailable_reason(exc)
            if reason is None:
                raise
            raise DeviceUnavailableError(device, reason) from exc
        try:
            self._setup(drv, facts)
        except BaseException:
            with contextlib.suppress(DriverError):  # keep the original error
                self._release_context()
            raise

    def _setup(self, drv: Any, facts: _Facts) -> None:
        """Build the driver structures and :attr:`info` (primary context retained)."""
        ordinal = self._ordinal
        dev_type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._posix_fd = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._props: dict[bool, Any] = {}
        for exportable in (False, True):
            prop = drv.CUmemAllocationProp()
            prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            prop.location.type = dev_type
            prop.location.id = ordinal
            prop.requestedHandleTypes = (
                self._posix_fd if exportable else drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
            )
            if facts.supports_rdma:
                prop.allocFlags.gpuDirectRDMACapable = 1
            self._props[exportable] = prop
        #: Whether cuMemCreate refused the POSIX fd handle type here (create()'s fallback).
        self._posix_fd_refused = False
        #: Handles created exportable=True that fell back to no handle type.
        self._unexportable: set[int] = set()
        flags = drv.CUmemAccess_flags
        self._flags: dict[Access, Any] = {
            Access.READWRITE: flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            Access.READ: flags.CU_MEM_ACCESS_FLAGS_PROT_READ,
            Access.NONE: flags.CU_MEM_ACCESS_FLAGS_PROT_NONE,
        }
        self._access_of: dict[int, Access] = {int(v): k for k, v in self._flags.items()}
        self._descs: dict[tuple[Any, tuple[int, ...]], list[Any]] = {}
        self._locations: dict[int, Any] = {}
        # Physical allocations by handle, and mappings by address -> (size, handle).
        self._allocs: dict[int, _Allocation] = {}
        self._mappings: dict[int, tuple[int, int]] = {}
        #: Sorted starts of `_mappings` for mapped_at's lookups; None after a change (rebuilt there).
        self._starts: list[int] | None = None
        #: The owning device's access granted (set_access) per mapping start; absent: none.
        self._access: dict[int, Access] = {}

        gran = drv.CUmemAllocationGranularity_flags
        minimum = int(
            _check(
                drv.cuMemGetAllocationGranularity(self._props[False], gran.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                "cuMemGetAllocationGranularity",
                drv=drv,
            )
        )
        recommended = int(
            _check(
                drv.cuMemGetAllocationGranularity(
                    self._props[False], gran.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
                ),
                "cuMemGetAllocationGranularity",
                drv=drv,
            )
        )
        self._total_memory = int(_check(drv.cuDeviceTotalMem(facts.dev), "cuDeviceTotalMem", drv=drv))
        name = _to_str(_check(drv.cuDeviceGetName(_NAME_LENGTH, facts.dev), "cuDeviceGetName", drv=drv))
        self.info = DeviceInfo(
            kind="cuda",
            ordinal=ordinal,
            name=name,
            granularity=minimum,
            recommended_granularity=max(recommended, minimum),
            supports_vmm=facts.supports_vmm,
            supports_posix_fd=facts.supports_posix_fd,
        )

    # ----------------------------------------------------------------- context
    def _ctx(self) -> None:
        """Make the primary context current here if none is (once per thread)."""
        tls = self._tls
        if getattr(tls, "ready", False):
            return
        if self._closed:
            raise ClosedError("CudaBackend")
        drv = self._drv
        current = _check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent", self)
        if current is None or int(current) == 0:
            _check(drv.cuCtxSetCurrent(self._pctx), "cuCtxSetCurrent", self)
        tls.ready = True

    def _push(self, ctx: Any = None) -> None:
        """Push `ctx` (default: this device's primary context); pair with :meth:`_pop`."""
        _check(self._drv.cuCtxPushCurrent(self._pctx if ctx is None else ctx), "cuCtxPushCurrent", self)

    def _pop(self) -> None:
        _check(self._drv.cuCtxPopCurrent(), "cuCtxPopCurrent", self)

    def _release_context(self) -> None:
        if self._pctx is not None:
            self._pctx = None
            _check(
                self._drv.cuDevicePrimaryCtxRelease(self._dev),
                "cuDevicePrimaryCtxRelease",
                drv=self._drv,
            )

    # ------------------------------------------------------------- bookkeeping
    def _drop(self, rec: _Allocation) -> None:
        """Forget `rec` if its memory is gone (no refs, no mappings). Lock held."""
        if rec.refs <= 0 and rec.mapped <= 0:
            for key in rec.keys:
                if self._allocs.get(key) is rec:
                    del self._allocs[key]
                    self._unexportable.discard(key)
            self._live_allocations -= 1
            self._physical_bytes -= rec.size

    def _record_of_address(self, address: int) -> _Allocation | None:
        """Return the allocation mapped at `address` (inside any mapping). Lock held."""
        start = self._mapping_start(address)
        return None if start is None else self._allocs.get(self._mappings[start][1])

    def _mapping_start(self, address: int) -> int | None:
        """The start of the recorded mapping holding `address`, or None. Lock held."""
        if address in self._mappings:
            return address
        starts = self._starts
        if starts is None:
            starts = self._starts = sorted(self._mappings)
        i = bisect.bisect_right(starts, address) - 1
        if i < 0:
            return None
        start = starts[i]
        return start if address < start + self._mappings[start][0] else None

    # --------------------------------------------------------------- interface
    def reserve(self, size: int, alignment: int = 0, hint: int = 0) -> int:
        """Reserve `size` bytes of virtual address space (``cuMemAddressReserve``).

        Parameters
        ----------
        size : int
            Bytes to reserve.
        alignment : int
            A power of two, or 0 for the default.
        hint : int
            Preferred address, or 0. Only a hint (rule 6): the returned address
            may differ, and the caller must check it.

        Returns
        -------
        int
            The start of the reservation.
        """
        self._enter("reserve")
        self._ctx()
        ptr = _check(
            self._drv.cuMemAddressReserve(size, alignment, hint, 0),
            "reserve",
            self,
            size,
        )
        address = int(ptr)
        with self._lock:
            self._live_reservations += 1
        return address

    def free_address(self, address: int, size: int) -> None:
        """Free exactly one reservation (``cuMemAddressFree``, rule 5).

        Parameters
        ----------
        address, size : int
            The reservation as :meth:`reserve` returned and was asked for.
        """
        self._enter("free_address")
        self._ctx()
        _check(self._drv.cuMemAddressFree(address, size), "free_address", self)
        with self._lock:
            self._live_reservations -= 1

    def create(self, size: int, exportable: bool = False) -> int:
        """Create `size` bytes of pinned device memory (``cuMemCreate``).

        Parameters
        ----------
        size : int
            Bytes; a multiple of ``info.granularity`` (rule 1).
        exportable : bool
            Request a POSIX file descriptor handle type (rule 11) so that
            :meth:`export_fd` works.

        Returns
        -------
        int
            The handle, holding one reference.

        Raises
        ------
        OutOfMemoryError
            When the device has no memory left.

        Notes
        -----
        Fallback: where the driver refuses the POSIX fd handle type
        (``CUDA_ERROR_NOT_PERMITTED`` or ``CUDA_ERROR_NOT_SUPPORTED``, as in
        some containers) although the device attribute reports it supported,
        the memory is created without it, ``info.supports_posix_fd`` becomes
        False (so later exportable requests are refused up front by
        :func:`vmmpool.create`), and :meth:`export_fd` of that handle raises a
        :class:`~vmmpool.DriverError` naming the refusal. The memory itself is
        usable as any other.
        """
        self._enter("create")
        self._ctx()
        wanted = bool(exportable)
        fd_type = wanted and not self._posix_fd_refused
        try:
            handle = int(_check(self._drv.cuMemCreate(size, self._props[fd_type], 0), "create", self, size))
        except DriverError as exc:
            if not fd_type or exc.name not in _HANDLE_TYPE_REFUSED:
                raise
            handle = int(_check(self._drv.cuMemCreate(size, self._props[False], 0), "create", self, size))
            fd_type = False
        with self._lock:
            if wanted and not fd_type:
                if not self._posix_fd_refused:
                    self._posix_fd_refused = True
                    self.info = dataclasses.replace(self.info, supports_posix_fd=False)
                self._unexportable.add(handle)
            else:
                self._unexportable.discard(handle)  # a reused handle value
            self._allocs[handle] = _Allocation(int(size), 1, [handle])
            self._live_allocations += 1
            self._physical_bytes += int(size)
        return handle

    def release(self, handle: int) -> None:
        """Drop one reference to `handle` (``cuMemRelease``).

        The memory is given back once every reference is released and every
        mapping is gone (rule 7); releasing right after mapping is normal.
        """
        self._enter("release")
        self._ctx()
        # The lock spans the driver call: once the memory is freed the driver
        # may hand the same handle value to a concurrent create(), whose record
        # must not receive this release's bookkeeping.
        with self._lock:
            _check(self._drv.cuMemRelease(handle), "release", self)
            rec = self._allocs.get(int(handle))
            if rec is not None:
                rec.refs -= 1
                self._drop(rec)

    def map(self, address: int, size: int, handle: int, offset: int = 0) -> None:
        """Back ``[address, address + size)`` with `handle` (``cuMemMap``).

        Mapping grants no access: call :meth:`set_access` afterwards (rule 3).
        """
        self._enter("map")
        self._ctx()
        with self._lock:  # spans the driver call, as in unmap(): the record is of this mapping
            _check(self._drv.cuMemMap(address, size, offset, handle, 0), "map", self, size)
            handle = int(handle)
            self._mappings[int(address)] = (int(size), handle)
            self._starts = None
            self._live_mappings += 1
            rec = self._allocs.get(handle)
            if rec is not None:
                rec.mapped += 1

    def unmap(self, address: int, size: int) -> None:
        """Unmap whole adjacent mappings covering exactly the range (``cuMemUnmap``).

        Rule 4. Does not wait for kernels still using the memory (rule 8):
        synchronize first.
        """
        self._enter("unmap")
        self._ctx()
        with self._lock:  # spans the driver call, as in release()
            _check(self._drv.cuMemUnmap(address, size), "unmap", self)
            cursor = int(address)
            end = cursor + int(size)
            while cursor < end:
                entry = self._mappings.pop(cursor, None)
                if entry is None:  # mapped outside this backend: nothing to count
                    break
                self._starts = None
                self._access.pop(cursor, None)
                msize, handle = entry
                self._live_mappings -= 1
                rec = self._allocs.get(handle)
                if rec is not None:
                    rec.mapped -= 1
                    self._drop(rec)
                cursor += msize

    def _descs_for(self, access: Access | str, devices: Sequence[int]) -> list[Any]:
        """Build (once) the ``CUmemAccessDesc`` list for `access` and `devices`."""
        flags = self._flags[Access.parse(access)]
        drv = self._drv
        descs = []
        for device in devices:
            desc = drv.CUmemAccessDesc()  # a fresh object per device, never [desc] * n
            desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            desc.location.id = int(device)
            desc.flags = flags
            descs.append(desc)
        return descs

    def set_access(self, address: int, size: int, access: Access, devices: Sequence[int]) -> None:
        """Grant `access` to `devices` over whole mappings (one ``cuMemSetAccess``).

        Parameters
        ----------
        address, size : int
            One or more whole adjacent mappings (rule 3).
        access : Access
            ``"rw"``, ``"r"`` or ``"none"``.
        devices : sequence of int
            Device ordinals to grant the access to.
        """
        self._enter("set_access")
        self._ctx()
        key = (access, tuple(devices))
        descs = self._descs.get(key)
        if descs is None:
            descs = self._descs_for(access, key[1])
            with self._lock:
                if len(self._descs) >= 64:
                    self._descs.clear()
                self._descs[key] = descs
        owner = self._ordinal in key[1]
        granted = Access.parse(access)
        # The lock spans the driver call, as in unmap(): the access recorded for mapped_at
        # (no driver call there) is the owner's, for the mapping the grant went to.
        with self._lock:
            _check(
                self._drv.cuMemSetAccess(address, size, descs, len(descs)),
                "set_access",
                self,
            )
            if owner:
                cursor = int(address)
                end = cursor + int(size)
                while cursor < end:
                    entry = self._mappings.get(cursor)
                    if entry is None:  # mapped outside this backend: nothing recorded
                        break
                    self._access[cursor] = granted
                    cursor += entry[0]

    def get_access(self, address: int, device: int) -> Access:
        """Return the access `device` has at `address` (``cuMemGetAccess``)."""
        self._enter("get_access")
        self._ctx()
        location = self._locations.get(device)
        if location is None:
            drv = self._drv
            location = drv.CUmemLocation()
            location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            location.id = int(device)
            with self._lock:
                self._locations[int(device)] = location
        flags = _check(self._drv.cuMemGetAccess(location, address), "get_access", self)
        return self._access_of.get(int(flags), Access.NONE)

    def mapped_at(self, address: int) -> tuple[int, int, int, Access | None] | None:
        """The mapping holding `address`, from this backend's record of the ``cuMemMap`` and
        ``cuMemSetAccess`` calls that succeeded (no driver call): the access is what this
        backend granted the owning device there (none until :meth:`set_access`)."""
        with self._lock:
            start = self._mapping_start(int(address))
            if start is None:
                return None
            size, handle = self._mappings[start]
            return start, size, handle, self._access.get(start, Access.NONE)

    def retain(self, address: int) -> int:
        """Return the handle mapped at `address`, adding one reference.

        ``cuMemRetainAllocationHandle``; release the result with :meth:`release`.
        """
        self._enter("retain")
        self._ctx()
        handle = int(_check(self._drv.cuMemRetainAllocationHandle(address), "retain", self))
        with self._lock:
            rec = self._allocs.get(handle)
            if rec is None:
                # The driver documents the same handle value as the mapping's; if it
                # ever differs, count the reference on the allocation mapped there.
                rec = self._record_of_address(int(address))
                if rec is None:
                    rec = _Allocation(0, 0, [])
                    self._live_allocations += 1
                rec.keys.append(handle)
                self._allocs[handle] = rec
            rec.refs += 1
        return handle

    def export_fd(self, handle: int) -> int:
        """Export a POSIX fd for `handle` (``cuMemExportToShareableHandle``).

        The handle must come from ``create(..., exportable=True)``. The caller
        owns the returned descriptor and closes it.
        """
        self._enter("export_fd")
        self._ctx()
        if int(handle) in self._unexportable:
            raise DriverError(
                "CUDA_ERROR_NOT_PERMITTED",
                "the driver refused the POSIX fd handle type, so this allocation was created "
                "without it (see CudaBackend.create) and cannot be exported",
                operation="export_fd",
            )
        fd = _check(
            self._drv.cuMemExportToShareableHandle(handle, self._posix_fd, 0),
            "export_fd",
            self,
        )
        return int(fd)

    def import_fd(self, fd: int) -> int:
        """Import a POSIX file descriptor (``cuMemImportFromShareableHandle``).

        Returns a new handle holding one reference. The descriptor stays open
        and is the caller's to close (the imported handle keeps the memory
        alive). The memory is not charged to this backend's physical bytes
        (see the class Notes).
        """
        self._enter("import_fd")
        self._ctx()
        handle = int(
            _check(
                self._drv.cuMemImportFromShareableHandle(int(fd), self._posix_fd),
                "import_fd",
                self,
            )
        )
        with self._lock:
            rec = self._allocs.get(handle)
            if rec is not None:  # the allocation is already known in this process
                rec.refs += 1
            else:
                self._allocs[handle] = _Allocation(0, 1, [handle])
                self._live_allocations += 1
        return handle

    def mem_info(self) -> tuple[int, int]:
        """Return ``(free, total)`` bytes of this device (``cuMemGetInfo``).

        The primary context is pushed around the call so the numbers are this
        device's even when another device's context is current.
        """
        self._enter("mem_info")
        self._ctx()
        self._push()
        try:
            free, total = _check(self._drv.cuMemGetInfo(), "mem_info", self)
        finally:
            self._pop()
        return int(free), int(total)

    def synchronize(self, stream: int | None = None) -> None:
        """Wait for `stream`, or with ``None`` for this whole device (rule 8).

        Parameters
        ----------
        stream : int or None
            A ``CUstream`` handle as an int. ``None`` synchronizes the device
            that owns the memory (its primary context pushed), not the current
            one (pytorch #196258). The special handles 0, 1 (legacy) and 2
            (per-thread) name the current context's stream, so they are
            synchronized with this device's primary context pushed too.
        """
        self._enter("synchronize")
        self._ctx()
        drv = self._drv
        if stream is not None and int(stream) > 2:
            _check(drv.cuStreamSynchronize(int(stream)), "synchronize", self)
            return
        self._push()
        try:
            if stream is None:
                _check(drv.cuCtxSynchronize(), "synchronize", self)
            else:
                _check(drv.cuStreamSynchronize(int(stream)), "synchronize", self)
        finally:
            self._pop()

    def write(self, address: int, data: memoryview) -> None:
        """Copy host bytes `data` to device memory at `address` (``cuMemcpyHtoD``).

        Synchronous: returns when the copy is done. The range must be mapped
        with at least read-write access for this device. The copy runs with
        this device's primary context pushed, whatever context is current.

        Parameters
        ----------
        address : int
            Destination device address.
        data : memoryview
            Source bytes; a non-contiguous view is copied to a contiguous one first.
        """
        self._enter("write")
        self._ctx()
        n = data.nbytes
        if not n:
            return
        if not data.contiguous:
            data = memoryview(data.tobytes())
        self._push()
        try:
            _check(self._drv.cuMemcpyHtoD(address, data, n), "write", self)
        finally:
            self._pop()

    def read(self, address: int, out: memoryview) -> None:
        """Copy ``out.nbytes`` bytes at device `address` into `out` (``cuMemcpyDtoH``).

        Synchronous: returns when the copy is done. The copy runs with this
        device's primary context pushed, whatever context is current.

        Parameters
        ----------
        address : int
            Source device address.
        out : memoryview
            A writable, contiguous destination buffer.

        Raises
        ------
        TypeError
            If `out` is read-only.
        ValueError
            If `out` is not contiguous.
        """
        self._enter("read")
        self._ctx()
        if out.readonly:
            raise TypeError("out must be a writable buffer")
        if not out.contiguous:
            raise ValueError("out must be a contiguous buffer")
        n = out.nbytes
        if n:
            self._push()
            try:
                _check(self._drv.cuMemcpyDtoH(out, address, n), "read", self)
            finally:
                self._pop()

    def close(self) -> None:
        """Release the primary context retained at construction (idempotent).

        Free every reservation and allocation first. Afterwards, operations
        raise :class:`~vmmpool.ClosedError`. In a forked child it raises
        :class:`~vmmpool.ForkedError` and releases nothing (the context is the parent's).
        """
        self.check_process("CudaBackend")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._tls = threading.local()  # every thread re-checks _closed in _ctx()
            self._release_context()

    # ---------------------------------------------------------------- events
    # cuEventCreate(CU_EVENT_DISABLE_TIMING) / cuEventRecord / cuEventQuery /
    # cuEventSynchronize / cuEventDestroy. An event is created and recorded in
    # its stream's context: "hEvent and hStream must be from the same context
    # otherwise CUDA_ERROR_INVALID_HANDLE is returned" (cuEventRecord). That is
    # this device's primary context for the special handles 0, 1 and 2, and
    # cuStreamGetCtx's answer for a stream handle (a stream of a peer device
    # using memory of a pool with peers, or of a context other than the primary
    # one). Querying, waiting and destroying need no current context.
    _events: dict[int, Any]
    _live_events: int

    def event_record(self, stream: int) -> int:
        """Create a timing-free event and record it on `stream` (0/1 legacy, 2 per-thread).

        The event is created in `stream`'s context (``cuStreamGetCtx``), which may be
        another device's: a pool with peers serves streams of its peer devices too.
        """
        self._enter("event_record")
        self._ctx()
        drv = self._drv
        ctx = None
        if int(stream) > 2:
            ctx = _check(drv.cuStreamGetCtx(int(stream)), "event_record", self)
        self._push(ctx)
        try:
            flags = drv.CUevent_flags.CU_EVENT_DISABLE_TIMING
            ev = _check(drv.cuEventCreate(int(flags)), "event_record", self)
            try:
                _check(drv.cuEventRecord(ev, int(stream)), "event_record", self)
            except BaseException:
                drv.cuEventDestroy(ev)
                raise
        finally:
            self._pop()
        h = int(ev)
        with self._lock:
            events = getattr(self, "_events", None)
            if events is None:
                events = self._events = {}
            events[h] = ev
            self._live_events = len(events)
        return h

    def _event_obj(self, op: str, event: int) -> Any:
        ev = getattr(self, "_events", {}).get(event)
        if ev is None:
            raise DriverError("CUDA_ERROR_INVALID_HANDLE", f"{event:#x} is not a live event", operation=op)
        return ev

    def event_query(self, event: int) -> bool:
        """True when the work before `event` is done (``CUDA_ERROR_NOT_READY``: False)."""
        self._enter("event_query")
        drv = self._drv
        (err,) = drv.cuEventQuery(self._event_obj("event_query", event))
        if err == drv.CUresult.CUDA_ERROR_NOT_READY:
            return False
        _check((err,), "event_query", self)
        return True

    def event_wait(self, event: int) -> None:
        """Block until `event` completes (``cuEventSynchronize``)."""
        self._enter("event_wait")
        _check(self._drv.cuEventSynchronize(self._event_obj("event_wait", event)), "event_wait", self)

    def event_destroy(self, event: int) -> None:
        """Destroy `event` (``cuEventDestroy``; legal while it is pending)."""
        self._enter("event_destroy")
        with self._taken(
            "_events", "_live_events", event, "CUDA_ERROR_INVALID_HANDLE",
            f"{event:#x} is not a live event", "event_destroy",
        ) as ev:
            _check(self._drv.cuEventDestroy(ev), "event_destroy", self)

    @contextlib.contextmanager
    def _taken(self, table: str, live: str, key: int, code: str, message: str, op: str) -> Iterator[Any]:
        """Take `key`'s object out of the table named `table` for the driver call that destroys it.

        Out of the table under the lock before the call, so of two threads destroying one
        object only one calls the driver (a second call would reach a dead handle, or a
        new object the driver gave the same value): the other, and a key not in the table,
        get ``DriverError(code, message)``. Put back if the body raises: a failed destroy
        changes nothing. `live` names the count kept beside the table.
        """
        with self._lock:
            items: dict[int, Any] = getattr(self, table, {})
            obj = items.pop(key, None)
            if obj is None:
                raise DriverError(code, message, operation=op)
            setattr(self, live, len(items))
        try:
            yield obj
        except BaseException:
            with self._lock:
                items[key] = obj
                setattr(self, live, len(items))
            raise

    # ---------------------------------------------------------------- staging
    # cuMemHostAlloc(PORTABLE) / cuMemFreeHost / cuMemcpyDtoHAsync /
    # cuMemcpyHtoDAsync, with this device's primary context pushed. Host
    # addresses are plain ints (the bindings take an int as a host pointer).
    _host_blocks: dict[int, int]
    _live_host: int

    def host_alloc(self, size: int) -> int:
        """Allocate `size` bytes of page-locked host memory (``cuMemHostAlloc``, portable)."""
        self._enter("host_alloc")
        self._ctx()
        drv = self._drv
        flags = getattr(drv, "CU_MEMHOSTALLOC_PORTABLE", 1)
        self._push()
        try:
            ptr = _check(drv.cuMemHostAlloc(int(size), int(flags)), "host_alloc", self, size)
        finally:
            self._pop()
        address = int(ptr)
        with self._lock:
            blocks = getattr(self, "_host_blocks", None)
            if blocks is None:
                blocks = self._host_blocks = {}
            blocks[address] = int(size)
            self._live_host = len(blocks)
        return address

    def host_free(self, address: int) -> None:
        """Free page-locked host memory from :meth:`host_alloc` (``cuMemFreeHost``)."""
        self._enter("host_free")
        self._ctx()
        address = int(address)
        # As the host emulator: only memory from host_alloc; of two frees of one block only
        # one reaches cuMemFreeHost (a second would free whatever the driver gave that
        # address since); a failed free puts it back (see _taken).
        with self._taken(
            "_host_blocks", "_live_host", address, "CUDA_ERROR_INVALID_VALUE",
            f"{address:#x} is not host memory from host_alloc", "host_free",
        ):
            self._push()
            try:
                _check(self._drv.cuMemFreeHost(address), "host_free", self)
            finally:
                self._pop()

    def copy_dtoh_async(self, dst: int, src: int, size: int, stream: int) -> None:
        """Queue ``cuMemcpyDtoHAsync(dst, src, size, stream)`` (`dst`: page-locked host memory)."""
        self._enter("copy_dtoh_async")
        self._ctx()
        self._push()
        try:
            _check(
                self._drv.cuMemcpyDtoHAsync(int(dst), int(src), int(size), int(stream)),
                "copy_dtoh_async",
                self,
            )
        finally:
            self._pop()

    def copy_htod_async(self, dst: int, src: int, size: int, stream: int) -> None:
        """Queue ``cuMemcpyHtoDAsync(dst, src, size, stream)`` (`src`: page-locked host memory)."""
        self._enter("copy_htod_async")
        self._ctx()
        self._push()
        try:
            _check(
                self._drv.cuMemcpyHtoDAsync(int(dst), int(src), int(size), int(stream)),
                "copy_htod_async",
                self,
            )
        finally:
            self._pop()

    # ---------------------------------------------------------------- streams
    # cuStreamCreate(CU_STREAM_NON_BLOCKING) / cuStreamDestroy, with this
    # device's primary context pushed (a stream belongs to a context).
    _streams: dict[int, Any]
    _live_streams: int

    def stream_create(self) -> int:
        """Create a stream that does not synchronize with the legacy default stream."""
        self._enter("stream_create")
        self._ctx()
        drv = self._drv
        self._push()
        try:
            flags = drv.CUstream_flags.CU_STREAM_NON_BLOCKING
            st = _check(drv.cuStreamCreate(int(flags)), "stream_create", self)
        finally:
            self._pop()
        h = int(st)
        with self._lock:
            streams = getattr(self, "_streams", None)
            if streams is None:
                streams = self._streams = {}
            streams[h] = st
            self._live_streams = len(streams)
        return h

    def stream_destroy(self, stream: int) -> None:
        """Destroy a stream from :meth:`stream_create` (``cuStreamDestroy``)."""
        self._enter("stream_destroy")
        # Of two threads destroying one stream only one calls cuStreamDestroy; a failed
        # destroy puts it back (see _taken).
        with self._taken(
            "_streams", "_live_streams", stream, "CUDA_ERROR_INVALID_HANDLE",
            f"{stream!r} is not a stream from stream_create", "stream_destroy",
        ) as st:
            self._push()
            try:
                _check(self._drv.cuStreamDestroy(st), "stream_destroy", self)
            finally:
                self._pop()


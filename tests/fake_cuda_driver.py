"""A test double of ``cuda.bindings.driver`` for running ``vmmpool._backends.cuda`` without a GPU.

**For tests only.** :class:`FakeDriver` stands in for the *binding layer*
(``cuda.bindings.driver``): it is not a GPU, it does not emulate CUDA kernels,
streams or contexts beyond simple bookkeeping, and passing tests against it
proves nothing about how the real driver behaves. What it does prove is that
``cuda.py`` calls the binding the way the binding expects (argument shapes,
``(CUresult, *values)`` tuples, the real wrapper and enum types) and that its
own logic (error translation, bookkeeping of live resources, context handling,
descriptor lists) is right, given a driver that follows the documented
contract.

How it works:

* Types are the real binding's, built without a GPU: ``CUresult`` members are
  the statuses, ``CUdeviceptr`` / ``CUmemGenericAllocationHandle`` /
  ``CUcontext`` / ``CUdevice`` wrap returned values (they have no value
  equality, so code under test must compare with ``int()``), and the real
  ``CUmemAllocationProp`` / ``CUmemAccessDesc`` / ``CUmemLocation`` structs and
  enums are exposed as attributes so ``cuda.py`` builds real ones.
* Memory operations are translated to a
  :class:`~vmmpool._backends.host.HostBackend` (``self.host``), so mapped memory
  is real Linux memory and the driver's VMM contract is enforced. A
  :class:`~vmmpool.DriverError` / :class:`~vmmpool.OutOfMemoryError` raised by
  the host backend becomes the matching ``CUresult`` in the returned tuple, as
  the real driver reports errors (the host's detailed message is kept in
  :attr:`FakeDriver.errors`; the caller only sees ``cuGetErrorString``).
* The host backend knows only device 0. Devices ``1 .. device_count - 1`` exist
  for queries and as *peers* in ``cuMemSetAccess`` / ``cuMemGetAccess``: their
  grants are bookkeeping in :attr:`FakeDriver.peer_access` and are dropped when
  the mapping is unmapped (mapping grants no access, rule 3).
* Contexts: each device has one primary context (retain / release counted in
  :attr:`FakeDriver.primary_refs`); each thread has a context stack. Calls that
  need a current context (``cuMemGetInfo``, ``cuCtxSynchronize``,
  ``cuStreamSynchronize``, ``cuMemcpy*``) fail with
  ``CUDA_ERROR_INVALID_CONTEXT`` without one. Every call is counted in
  :attr:`FakeDriver.calls` and logged with its thread and current context in
  :attr:`FakeDriver.log`.
* Faults: :meth:`FakeDriver.fail` makes the n-th next call of a function return
  a status without doing anything; :meth:`FakeDriver.raise_on` makes it raise
  (for example a missing-library ``RuntimeError`` from ``cuInit``);
  :attr:`FakeDriver.after` runs a hook after a call's work, before it returns
  (to interleave another "thread's" calls deterministically).
* Options model driver freedoms the host emulator does not exercise:
  ``reuse_handles`` hands out the lowest free handle value (a real driver's
  handle values are opaque and may be reused once freed), ``retain_aliases``
  makes ``cuMemRetainAllocationHandle`` return a new handle value naming the
  same allocation, and ``import_existing`` makes an in-process import return
  the existing handle with one more reference.

Anything of the real module that ``cuda.py`` does not use is absent, so a new,
unmodelled use fails loudly with ``AttributeError``.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from cuda.bindings import driver as real

from vmmpool import Access, DriverError, OutOfMemoryError
from vmmpool._backends.host import DEFAULT_GRANULARITY, HostBackend

__all__ = ["FakeDriver", "FakeDriverError", "PEER_FREE_MEMORY", "PEER_TOTAL_MEMORY", "R"]

#: The real ``CUresult`` enum (statuses).
R = real.CUresult
_OK = R.CUDA_SUCCESS

_LOC_DEVICE = real.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
_POSIX_FD = real.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_HANDLE_NONE = real.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
_PINNED = real.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
_GRAN = real.CUmemAllocationGranularity_flags
_FLAGS = real.CUmemAccess_flags
_ATTR = real.CUdevice_attribute

_ACCESS_OF_FLAGS: dict[int, Access] = {
    int(_FLAGS.CU_MEM_ACCESS_FLAGS_PROT_READWRITE): Access.READWRITE,
    int(_FLAGS.CU_MEM_ACCESS_FLAGS_PROT_READ): Access.READ,
    int(_FLAGS.CU_MEM_ACCESS_FLAGS_PROT_NONE): Access.NONE,
}
_FLAGS_OF_ACCESS: dict[Access, int] = {v: k for k, v in _ACCESS_OF_FLAGS.items()}

#: What ``cuGetErrorString`` says (the real driver's wording for the common ones).
_ERROR_STRINGS: dict[str, bytes] = {
    "CUDA_SUCCESS": b"no error",
    "CUDA_ERROR_INVALID_VALUE": b"invalid argument",
    "CUDA_ERROR_OUT_OF_MEMORY": b"out of memory",
    "CUDA_ERROR_NOT_INITIALIZED": b"initialization error",
    "CUDA_ERROR_NO_DEVICE": b"no CUDA-capable device is detected",
    "CUDA_ERROR_INVALID_DEVICE": b"invalid device ordinal",
    "CUDA_ERROR_INVALID_CONTEXT": b"invalid device context",
    "CUDA_ERROR_INVALID_HANDLE": b"invalid resource handle",
    "CUDA_ERROR_NOT_SUPPORTED": b"operation not supported",
    "CUDA_ERROR_UNKNOWN": b"unknown error",
}

#: Sizes of the peer devices (they have no memory behind them).
PEER_TOTAL_MEMORY = 80 << 30
PEER_FREE_MEMORY = 79 << 30


class FakeDriverError(Exception):
    """Raised inside a fake call to return `status` (never escapes a call)."""

    def __init__(self, status: Any, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


def _int(value: Any) -> int:
    """What the binding does with a pointer/handle argument: ``None`` is 0, wrappers convert."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise TypeError("a bool is not a pointer or handle")
    return int(value)


def _size(name: str, value: Any) -> int:
    """A ``size_t`` argument: a non-negative int (the binding raises TypeError/OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (size_t), got {type(value).__name__}")
    if value < 0:
        raise OverflowError(f"{name} must be >= 0, got {value}")
    return value


def _api(n_out: int, *, needs_init: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a fake driver function: count, log, inject faults, translate errors to a status tuple.

    The wrapped function returns the tuple of its output values (without the
    status) or raises; on error the other items are ``None``, as in the binding.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__

        @functools.wraps(fn)
        def call(self: FakeDriver, *args: Any) -> tuple[Any, ...]:
            with self._lock:
                self.calls[name] += 1
                self.log.append((name, threading.get_ident(), self._current()))
                exc = self._take_fault(self._raises, name)
                status = self._take_fault(self._fails, name)
            if exc is not None:
                raise exc
            if status is None and needs_init and not self.initialized:
                status = R.CUDA_ERROR_NOT_INITIALIZED
            if status is not None:
                return (status,) + (None,) * n_out
            try:
                out = fn(self, *args)
            except FakeDriverError as err:
                self.errors.append((name, err.status.name, str(err)))
                return (err.status,) + (None,) * n_out
            except OutOfMemoryError as err:
                self.errors.append((name, "CUDA_ERROR_OUT_OF_MEMORY", str(err)))
                return (R.CUDA_ERROR_OUT_OF_MEMORY,) + (None,) * n_out
            except DriverError as err:
                self.errors.append((name, err.name, str(err)))
                return (getattr(R, err.name, R.CUDA_ERROR_UNKNOWN),) + (None,) * n_out
            hook = self.after.get(name)
            if hook is not None:
                hook(*args)
            assert len(out) == n_out, f"fake {name} returned {len(out)} values, expected {n_out}"
            return (_OK, *out)

        return call

    return deco


class FakeDriver:
    """Stands in for ``cuda.bindings.driver`` (see the module docstring; tests only).

    Parameters
    ----------
    device_count : int
        Devices ``cuDeviceGetCount`` reports (0, 1 or 2 are the useful values).
        Only device 0 has memory (the host backend); the others are peers.
    capacity : int
        Physical bytes of device 0 (the host backend's capacity).
    granularity, recommended_granularity : int
        What ``cuMemGetAllocationGranularity`` answers (MINIMUM / RECOMMENDED).
    vmm_supported, posix_fd_supported : bool
        The two device attributes ``cuda.py`` queries.
    name : str
        What ``cuDeviceGetName`` answers.
    reuse_handles : bool
        Hand out the lowest free handle value, reusing freed ones (a driver may).
    retain_aliases : bool
        ``cuMemRetainAllocationHandle`` returns a new handle value for the
        mapped allocation instead of the mapping's handle value.
    import_existing : bool
        ``cuMemImportFromShareableHandle`` of memory that already has a live
        handle in this process returns that handle, with one more reference.
    """

    # ---------------------------------------------------- the real binding's types
    CUresult = real.CUresult
    CUdeviceptr = real.CUdeviceptr
    CUdevice = real.CUdevice
    CUcontext = real.CUcontext
    CUstream = real.CUstream
    CUmemGenericAllocationHandle = real.CUmemGenericAllocationHandle
    CUmemAllocationProp = real.CUmemAllocationProp
    CUmemAccessDesc = real.CUmemAccessDesc
    CUmemLocation = real.CUmemLocation
    CUmemLocationType = real.CUmemLocationType
    CUmemAllocationType = real.CUmemAllocationType
    CUmemAllocationHandleType = real.CUmemAllocationHandleType
    CUmemAccess_flags = real.CUmemAccess_flags
    CUmemAllocationGranularity_flags = real.CUmemAllocationGranularity_flags
    CUdevice_attribute = real.CUdevice_attribute
    CUevent = real.CUevent
    CUevent_flags = real.CUevent_flags
    CUstream_flags = real.CUstream_flags

    def __init__(
        self,
        device_count: int = 2,
        *,
        capacity: int = 64 << 20,
        granularity: int = DEFAULT_GRANULARITY,
        recommended_granularity: int | None = None,
        vmm_supported: bool = True,
        posix_fd_supported: bool = True,
        name: str = "Fake GPU (test double, not a GPU)",
        reuse_handles: bool = False,
        retain_aliases: bool = False,
        import_existing: bool = False,
    ) -> None:
        self.device_count = device_count
        self.host = HostBackend(capacity, granularity, name="fake device 0")
        self.granularity = granularity
        self.recommended_granularity = (
            granularity if recommended_granularity is None else recommended_granularity
        )
        self.vmm_supported = vmm_supported
        self.posix_fd_supported = posix_fd_supported
        self.name = name
        self.reuse_handles = reuse_handles
        self.retain_aliases = retain_aliases
        self.import_existing = import_existing

        self.initialized = False
        self._lock = threading.RLock()
        self._tls = threading.local()
        #: Calls per function name.
        self.calls: collections.Counter[str] = collections.Counter()
        #: Every call: (function, thread ident, current context value or 0).
        self.log: list[tuple[str, int, int]] = []
        #: Every error returned: (function, CUresult name, detail).
        self.errors: list[tuple[str, str, str]] = []
        #: Contract violations of the calling code that the real driver might not report.
        self.violations: list[str] = []
        #: Hooks run after a successful call's work: name -> fn(*args).
        self.after: dict[str, Callable[..., Any]] = {}
        self._fails: dict[str, list[list[Any]]] = {}
        self._raises: dict[str, list[list[Any]]] = {}

        # Contexts: one primary context per device.
        self.primary_refs: dict[int, int] = {d: 0 for d in range(device_count)}
        self._ctx_value = {d: 0xC7F00000 + 0x100 * d for d in range(device_count)}
        self._ctx_device = {v: d for d, v in self._ctx_value.items()}
        #: Synchronizations: ("ctx", device) or ("stream", handle, device).
        self.syncs: list[tuple[Any, ...]] = []
        #: Stream handles (> 2) that exist; others fail with CUDA_ERROR_INVALID_HANDLE.
        self.streams: set[int] = set()
        #: The device (primary context) each stream of `streams` belongs to; a stream added to
        #: `streams` by a test without an entry here is taken to be device 0's.
        self.stream_device: dict[int, int] = {}
        self.created_streams = 0  # by cuStreamCreate
        #: Live events: handle -> [stream recorded on, device, flags]; streams whose work is pending.
        self.events: dict[int, list[Any]] = {}
        self.busy_streams: set[int] = set()
        self._next_event = 0xE0000

        # Handles: fake value <-> host handle (values differ from the host's).
        self._host_of: dict[int, int] = {}
        self._aliases: dict[int, int] = {}  # extra handle value (retain alias) -> host handle
        self._free_values: list[int] = []
        self._next_value = 0x10000
        #: Each cuMemSetAccess that succeeded: (address, size, ((device, Access), ...), the desc list).
        self.access_log: list[tuple[int, int, tuple[tuple[int, Access], ...], Any]] = []
        #: Peer grants: device -> {mapping start -> Access}.
        self.peer_access: dict[int, dict[int, Access]] = {d: {} for d in range(1, device_count)}
        #: Each cuMemcpy: ("HtoD" | "DtoH", address, nbytes).
        self.copies: list[tuple[Any, ...]] = []  # (kind, device address, bytes[, stream])
        self.host_alloc_flags: list[int] = []

    # ------------------------------------------------------------ test helpers
    def fail(self, name: str, status: Any, nth: int = 1, times: int = 1) -> None:
        """Make `times` calls of function `name`, from the `nth` next one on, return `status`.

        The failing calls do nothing else (their other return values are ``None``).
        """
        self._check_name(name)
        with self._lock:
            faults = self._fails.setdefault(name, [])
            faults.extend([nth + i, status] for i in range(times))

    def raise_on(self, name: str, exc: BaseException, nth: int = 1, times: int = 1) -> None:
        """Make `times` calls of function `name`, from the `nth` next one on, raise `exc`."""
        self._check_name(name)
        with self._lock:
            faults = self._raises.setdefault(name, [])
            faults.extend([nth + i, exc] for i in range(times))

    def _check_name(self, name: str) -> None:
        if name not in self.functions():
            raise ValueError(f"{name!r} is not a function of the fake driver")

    @staticmethod
    def _take_fault(table: dict[str, list[list[Any]]], name: str) -> Any:
        faults = table.get(name)
        if not faults:
            return None
        fired = None
        for f in faults:
            f[0] -= 1
            if f[0] == 0:
                fired = f[1]
        faults[:] = [f for f in faults if f[0] > 0]
        if not faults:
            del table[name]
        return fired

    def reset_calls(self) -> None:
        """Forget the call counts and the call log."""
        with self._lock:
            self.calls.clear()
            self.log.clear()

    def primary_context(self, ordinal: int) -> int:
        """The value of device `ordinal`'s primary context."""
        return self._ctx_value[ordinal]

    def current_context(self) -> int:
        """The calling thread's current context value (0 when none)."""
        return self._current()

    def context_stack(self) -> list[int]:
        """A copy of the calling thread's context stack (values)."""
        return list(self._stack())

    def live_handles(self) -> int:
        """Handle values the fake currently hands out (created, imported, aliases)."""
        with self._lock:
            return len(self._host_of) + len(self._aliases)

    # ------------------------------------------------------------- internals
    def _stack(self) -> list[int]:
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        return stack

    def _current(self) -> int:
        stack = self._stack()
        return stack[-1] if stack else 0

    def _need_context(self) -> int:
        """The device of the current context, or CUDA_ERROR_INVALID_CONTEXT."""
        ctx = self._current()
        if ctx == 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_CONTEXT, "no context is current on this thread")
        return self._ctx_device[ctx]

    def _live_context(self, ctx: Any) -> int:
        value = _int(ctx)
        device = self._ctx_device.get(value)
        if device is None or self.primary_refs[device] <= 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_CONTEXT, f"{value:#x} is not a live context")
        return value

    def _device(self, dev: Any) -> int:
        d = _int(dev)
        if not 0 <= d < self.device_count:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_DEVICE, f"device {d} does not exist")
        return d

    def _new_value(self, host_handle: int) -> int:
        with self._lock:
            if self.reuse_handles and self._free_values:
                self._free_values.sort()
                value = self._free_values.pop(0)
            else:
                value = self._next_value
                self._next_value += 0x10
            self._host_of[value] = host_handle
            return value

    def _host_handle(self, handle: Any) -> int:
        value = _int(handle)
        with self._lock:
            h = self._host_of.get(value)
            if h is None:
                h = self._aliases.get(value)
        if h is None:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, f"{value:#x} is not a live handle value")
        return h

    def _value_of_host(self, host_handle: int) -> int:
        with self._lock:
            for value, h in self._host_of.items():
                if h == host_handle:
                    return value
        raise AssertionError(f"host handle {host_handle:#x} has no fake handle value")

    def _forget_if_gone(self) -> None:
        """Free the handle values whose memory is gone (released AND unmapped).

        A released handle whose memory is still mapped keeps its value (it can
        no longer be used as a reference, the host rejects it), so that
        ``cuMemRetainAllocationHandle`` can return it again.
        """
        with self._lock:
            live = self.host._physical
            for value, h in list(self._host_of.items()):
                if h not in live:
                    del self._host_of[value]
                    self._free_values.append(value)

    def _run(self, op: str, address: int, size: int) -> list[int]:
        """Starts of the whole adjacent mappings covering exactly the range (host's check)."""
        host = self.host
        with host._lock:
            r = host._reservation_of(op, address, size)
            return r.whole_run(op, address, size)

    def _mapping_start(self, op: str, address: int) -> int:
        host = self.host
        with host._lock:
            r = host._reservation_of(op, address, 1)
            start = r.covering(address)
        if start is None:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, f"{address:#x} is not mapped")
        return start

    def _location(self, op: str, loc: Any) -> int:
        if not isinstance(loc, real.CUmemLocation):
            raise TypeError(f"{op}: location must be a CUmemLocation, got {type(loc).__name__}")
        if loc.type != _LOC_DEVICE:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, f"{op}: location type {loc.type!r}")
        return self._device(loc.id)

    def _prop(self, op: str, prop: Any) -> tuple[int, bool]:
        """Check a CUmemAllocationProp; return (device, exportable)."""
        if not isinstance(prop, real.CUmemAllocationProp):
            raise TypeError(f"{op}: prop must be a CUmemAllocationProp, got {type(prop).__name__}")
        if prop.type != _PINNED:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, f"{op}: allocation type {prop.type!r}")
        device = self._location(op, prop.location)
        handle_type = prop.requestedHandleTypes
        if handle_type not in (_HANDLE_NONE, _POSIX_FD):
            raise FakeDriverError(R.CUDA_ERROR_NOT_SUPPORTED, f"{op}: handle type {handle_type!r}")
        exportable = handle_type == _POSIX_FD
        if exportable and not self.posix_fd_supported:
            raise FakeDriverError(R.CUDA_ERROR_NOT_SUPPORTED, f"{op}: POSIX fd handles unsupported")
        return device, exportable

    # ----------------------------------------------------------- errors (no init)
    @_api(1, needs_init=False)
    def cuGetErrorName(self, error: Any) -> tuple[Any, ...]:
        if isinstance(error, int) and not isinstance(error, (bool, real.CUresult)):
            error = real.CUresult(error)  # the real binding accepts ints
        if not isinstance(error, real.CUresult):
            raise TypeError(f"error must be a CUresult, got {type(error).__name__}")
        return (error.name.encode(),)

    @_api(1, needs_init=False)
    def cuGetErrorString(self, error: Any) -> tuple[Any, ...]:
        if isinstance(error, int) and not isinstance(error, (bool, real.CUresult)):
            error = real.CUresult(error)  # the real binding accepts ints
        if not isinstance(error, real.CUresult):
            raise TypeError(f"error must be a CUresult, got {type(error).__name__}")
        text = _ERROR_STRINGS.get(error.name, error.name.lower().replace("_", " ").encode())
        return (text,)

    # ------------------------------------------------------- init and devices
    @_api(0, needs_init=False)
    def cuInit(self, flags: int) -> tuple[Any, ...]:
        if _size("Flags", flags) != 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "cuInit flags must be 0")
        # (A real driver on a machine without a GPU fails here with
        # CUDA_ERROR_NO_DEVICE: inject that with fail("cuInit", ...).)
        self.initialized = True
        return ()

    @_api(1)
    def cuDeviceGetCount(self) -> tuple[Any, ...]:
        return (self.device_count,)

    @_api(1)
    def cuDeviceGet(self, ordinal: int) -> tuple[Any, ...]:
        if isinstance(ordinal, bool) or not isinstance(ordinal, int):
            raise TypeError(f"ordinal must be an int, got {type(ordinal).__name__}")
        return (real.CUdevice(self._device(ordinal)),)

    @_api(1)
    def cuDeviceGetAttribute(self, attrib: Any, dev: Any) -> tuple[Any, ...]:
        if not isinstance(attrib, real.CUdevice_attribute):
            raise TypeError(f"attrib must be a CUdevice_attribute, got {type(attrib).__name__}")
        self._device(dev)
        if attrib == _ATTR.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
            return (int(self.vmm_supported),)
        if attrib == _ATTR.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED:
            return (int(self.posix_fd_supported),)
        if attrib == _ATTR.CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED:
            return (0,)
        raise FakeDriverError(R.CUDA_ERROR_NOT_SUPPORTED, f"attribute {attrib!r} is not modelled")

    @_api(1)
    def cuDeviceGetName(self, length: int, dev: Any) -> tuple[Any, ...]:
        d = self._device(dev)
        text = self.name if d == 0 else f"Fake peer {d} (test double)"
        raw = text.encode()[: max(_size("length", length) - 1, 0)]
        # Like the real binding: the name, a NUL, then the buffer's spaces.
        return (raw + b"\x00" + b" " * max(length - len(raw) - 1, 0),)

    @_api(1)
    def cuDeviceTotalMem(self, dev: Any) -> tuple[Any, ...]:
        d = self._device(dev)
        return (self.host.capacity if d == 0 else PEER_TOTAL_MEMORY,)

    # ---------------------------------------------------------------- contexts
    @_api(1)
    def cuDevicePrimaryCtxRetain(self, dev: Any) -> tuple[Any, ...]:
        d = self._device(dev)
        with self._lock:
            self.primary_refs[d] += 1
        return (real.CUcontext(self._ctx_value[d]),)

    @_api(0)
    def cuDevicePrimaryCtxRelease(self, dev: Any) -> tuple[Any, ...]:
        d = self._device(dev)
        with self._lock:
            if self.primary_refs[d] <= 0:
                raise FakeDriverError(R.CUDA_ERROR_INVALID_CONTEXT, f"primary context {d} not retained")
            self.primary_refs[d] -= 1
        return ()

    @_api(1)
    def cuCtxGetCurrent(self) -> tuple[Any, ...]:
        return (real.CUcontext(self._current()),)

    @_api(0)
    def cuCtxSetCurrent(self, ctx: Any) -> tuple[Any, ...]:
        stack = self._stack()
        if _int(ctx) == 0:
            if stack:
                stack.pop()
            return ()
        value = self._live_context(ctx)
        if stack:
            stack[-1] = value
        else:
            stack.append(value)
        return ()

    @_api(0)
    def cuCtxPushCurrent(self, ctx: Any) -> tuple[Any, ...]:
        self._stack().append(self._live_context(ctx))
        return ()

    @_api(1)
    def cuCtxPopCurrent(self) -> tuple[Any, ...]:
        stack = self._stack()
        if not stack:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_CONTEXT, "the context stack is empty")
        return (real.CUcontext(stack.pop()),)

    @_api(0)
    def cuCtxSynchronize(self) -> tuple[Any, ...]:
        device = self._need_context()
        with self._lock:
            self.syncs.append(("ctx", device))
        return ()

    @_api(0)
    def cuStreamSynchronize(self, hStream: Any) -> tuple[Any, ...]:
        s = _int(hStream)
        if s <= 2:  # 0 / 1 legacy, 2 per-thread: the current context's stream
            device: int | None = self._need_context()
        elif s in self.streams:
            device = None  # a stream names its own context
        else:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_HANDLE, f"stream {s:#x} does not exist")
        with self._lock:
            self.syncs.append(("stream", s, device))
        return ()

    # -------------------------------------------------------------- VMM calls
    @_api(1)
    def cuMemGetAllocationGranularity(self, prop: Any, option: Any) -> tuple[Any, ...]:
        self._prop("cuMemGetAllocationGranularity", prop)
        if isinstance(option, int) and not isinstance(option, bool):
            option = real.CUmemAllocationGranularity_flags(option)  # the real binding accepts ints
        if not isinstance(option, real.CUmemAllocationGranularity_flags):
            raise TypeError(f"option must be a CUmemAllocationGranularity_flags, got {option!r}")
        if option == _GRAN.CU_MEM_ALLOC_GRANULARITY_MINIMUM:
            return (self.granularity,)
        return (self.recommended_granularity,)

    @_api(1)
    def cuMemAddressReserve(self, size: Any, alignment: Any, addr: Any, flags: Any) -> tuple[Any, ...]:
        if _size("flags", flags) != 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
        address = self.host.reserve(_size("size", size), _size("alignment", alignment), _int(addr))
        return (real.CUdeviceptr(address),)

    @_api(0)
    def cuMemAddressFree(self, ptr: Any, size: Any) -> tuple[Any, ...]:
        self.host.free_address(_int(ptr), _size("size", size))
        return ()

    @_api(1)
    def cuMemCreate(self, size: Any, prop: Any, flags: Any) -> tuple[Any, ...]:
        device, exportable = self._prop("cuMemCreate", prop)
        if _size("flags", flags) != 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
        if device != 0:
            self.violations.append(f"cuMemCreate on device {device}: the fake backs only device 0")
            raise FakeDriverError(R.CUDA_ERROR_NOT_SUPPORTED, "only device 0 has memory in the fake")
        h = self.host.create(_size("size", size), exportable)
        return (real.CUmemGenericAllocationHandle(self._new_value(h)),)

    @_api(0)
    def cuMemRelease(self, handle: Any) -> tuple[Any, ...]:
        value = _int(handle)
        h = self._host_handle(value)
        self.host.release(h)
        with self._lock:
            if value in self._aliases:
                del self._aliases[value]
                self._free_values.append(value)
        self._forget_if_gone()
        return ()

    @_api(0)
    def cuMemMap(self, ptr: Any, size: Any, offset: Any, handle: Any, flags: Any) -> tuple[Any, ...]:
        if _size("flags", flags) != 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
        h = self._host_handle(handle)
        self.host.map(_int(ptr), _size("size", size), h, _size("offset", offset))
        return ()

    @_api(0)
    def cuMemUnmap(self, ptr: Any, size: Any) -> tuple[Any, ...]:
        address, n = _int(ptr), _size("size", size)
        run = self._run("unmap", address, n)  # validate before changing anything
        self.host.unmap(address, n)
        with self._lock:
            for grants in self.peer_access.values():
                for start in run:
                    grants.pop(start, None)
        self._forget_if_gone()
        return ()

    @_api(0)
    def cuMemSetAccess(self, ptr: Any, size: Any, desc: Any, count: Any) -> tuple[Any, ...]:
        address, n = _int(ptr), _size("size", size)
        if not isinstance(desc, (list, tuple)):
            raise TypeError(f"desc must be a list or tuple of CUmemAccessDesc, got {type(desc).__name__}")
        count = _size("count", count)
        # As the real binding: a count past the list raises, a shorter one
        # silently passes the first `count`, aliased objects are accepted. The
        # last two are recorded as violations of cuda.py's own rules.
        if count > len(desc):
            raise RuntimeError(f"List is too small: {len(desc)} < {count}")
        if count != len(desc) or count == 0:
            self.violations.append(f"cuMemSetAccess count {count} with {len(desc)} descriptor(s)")
        if len({id(d) for d in desc}) != len(desc):
            self.violations.append("cuMemSetAccess descriptors alias one object ([desc] * n)")
        if count == 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "count must be > 0")
        grants: list[tuple[int, Access]] = []
        for d in desc[:count]:
            if not isinstance(d, real.CUmemAccessDesc):
                raise TypeError(f"desc items must be CUmemAccessDesc, got {type(d).__name__}")
            device = self._location("cuMemSetAccess", d.location)
            if not isinstance(d.flags, real.CUmemAccess_flags) or int(d.flags) not in _ACCESS_OF_FLAGS:
                raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, f"flags {d.flags!r}")
            grants.append((device, _ACCESS_OF_FLAGS[int(d.flags)]))
        devices = [g[0] for g in grants]
        if len(set(devices)) != len(devices):
            self.violations.append(f"cuMemSetAccess names a device twice: {devices}")
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "a device is named twice")
        run = self._run("set_access", address, n)  # validate the range before changing anything
        for device, access in grants:
            if device == 0:
                self.host.set_access(address, n, access, [0])
        with self._lock:
            for device, access in grants:
                if device != 0:
                    for start in run:
                        self.peer_access[device][start] = access
            self.access_log.append((address, n, tuple(grants), desc))
        return ()

    @_api(1)
    def cuMemGetAccess(self, location: Any, ptr: Any) -> tuple[Any, ...]:
        device = self._location("cuMemGetAccess", location)
        address = _int(ptr)
        if device == 0:
            access = self.host.get_access(address, 0)
        else:
            start = self._mapping_start("get_access", address)
            with self._lock:
                access = self.peer_access[device].get(start, Access.NONE)
        return (_FLAGS_OF_ACCESS[access],)  # the binding returns a plain int

    @_api(1)
    def cuMemRetainAllocationHandle(self, addr: Any) -> tuple[Any, ...]:
        h = self.host.retain(_int(addr))
        if self.retain_aliases:
            with self._lock:
                value = self._next_value
                self._next_value += 0x10
                self._aliases[value] = h
        else:
            value = self._value_of_host(h)
        return (real.CUmemGenericAllocationHandle(value),)

    @_api(1)
    def cuMemExportToShareableHandle(self, handle: Any, handleType: Any, flags: Any) -> tuple[Any, ...]:
        if not isinstance(handleType, real.CUmemAllocationHandleType):
            raise TypeError(f"handleType must be a CUmemAllocationHandleType, got {handleType!r}")
        if handleType != _POSIX_FD:
            raise FakeDriverError(R.CUDA_ERROR_NOT_SUPPORTED, f"handle type {handleType!r}")
        if _size("flags", flags) != 0:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
        return (self.host.export_fd(self._host_handle(handle)),)

    @_api(1)
    def cuMemImportFromShareableHandle(self, osHandle: Any, shHandleType: Any) -> tuple[Any, ...]:
        if not isinstance(shHandleType, real.CUmemAllocationHandleType):
            raise TypeError(f"shHandleType must be a CUmemAllocationHandleType, got {shHandleType!r}")
        if shHandleType != _POSIX_FD:
            raise FakeDriverError(R.CUDA_ERROR_NOT_SUPPORTED, f"handle type {shHandleType!r}")
        fd = _int(osHandle)
        if self.import_existing:
            existing = self._existing_handle_of_fd(fd)
            if existing is not None:
                return (real.CUmemGenericAllocationHandle(existing),)
        h = self.host.import_fd(fd)
        return (real.CUmemGenericAllocationHandle(self._new_value(h)),)

    def _existing_handle_of_fd(self, fd: int) -> int | None:
        """With ``import_existing``: the live handle value of the memory behind `fd`, plus a reference."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        host = self.host
        with host._lock:
            for h, p in host._physical.items():
                pst = os.fstat(p.fd)
                if p.refs > 0 and (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
                    p.refs += 1  # the host has no import-as-retain: add the reference directly
                    return self._value_of_host(h)
        return None

    @_api(2)
    def cuMemGetInfo(self) -> tuple[Any, ...]:
        device = self._need_context()
        if device == 0:
            return self.host.mem_info()
        return (PEER_FREE_MEMORY, PEER_TOTAL_MEMORY)

    # ---------------------------------------------------------------- copies
    @staticmethod
    def _host_buffer(buf: Any, n: int, writable: bool) -> memoryview:
        if isinstance(buf, int) and not isinstance(buf, bool):
            return memoryview((ctypes.c_char * n).from_address(buf)).cast("B")
        try:
            mv = memoryview(buf)
        except TypeError:
            raise TypeError(
                f"host pointer must be an int or support the buffer protocol, got {type(buf).__name__}"
            ) from None
        if not mv.contiguous:
            raise BufferError("host buffer must be contiguous")
        mv = mv.cast("B")
        if mv.nbytes < n:
            raise FakeDriverError(
                R.CUDA_ERROR_INVALID_VALUE, f"host buffer has {mv.nbytes} bytes, copy of {n} requested"
            )
        if writable and mv.readonly:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_VALUE, "destination host buffer is read-only")
        return mv[:n]

    @_api(0)
    def cuMemcpyHtoD(self, dstDevice: Any, srcHost: Any, ByteCount: Any) -> tuple[Any, ...]:
        self._need_context()
        n = _size("ByteCount", ByteCount)
        src = self._host_buffer(srcHost, n, writable=False)
        address = _int(dstDevice)
        if n:
            self.host.write(address, src)
        with self._lock:
            self.copies.append(("HtoD", address, n))
        return ()

    @_api(0)
    def cuMemcpyDtoH(self, dstHost: Any, srcDevice: Any, ByteCount: Any) -> tuple[Any, ...]:
        self._need_context()
        n = _size("ByteCount", ByteCount)
        dst = self._host_buffer(dstHost, n, writable=True)
        address = _int(srcDevice)
        if n:
            self.host.read(address, dst)
        with self._lock:
            self.copies.append(("DtoH", address, n))
        return ()

    # ------------------------------------------------ page-locked memory, async copies
    # Delegated to the host emulator's staging methods (anonymous memory, memmove), which
    # check that the host side is page-locked and the device side mapped with access.
    def _check_stream(self, hStream: Any) -> None:
        s = _int(hStream)
        if s > 2 and s not in self.streams:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_HANDLE, f"stream {s:#x} does not exist")

    @_api(1)
    def cuMemHostAlloc(self, bytesize: Any, Flags: Any) -> tuple[Any, ...]:
        self._need_context()
        with self._lock:
            self.host_alloc_flags.append(_int(Flags))
        return (self.host.host_alloc(_size("bytesize", bytesize)),)

    @_api(0)
    def cuMemFreeHost(self, p: Any) -> tuple[Any, ...]:
        self._need_context()
        self.host.host_free(_int(p))
        return ()

    @_api(0)
    def cuMemcpyDtoHAsync(
        self, dstHost: Any, srcDevice: Any, ByteCount: Any, hStream: Any
    ) -> tuple[Any, ...]:
        self._need_context()
        n = _size("ByteCount", ByteCount)
        self._check_stream(hStream)
        self.host.copy_dtoh_async(_int(dstHost), _int(srcDevice), n, 0)
        with self._lock:
            self.copies.append(("DtoHAsync", _int(srcDevice), n, _int(hStream)))
        return ()

    @_api(0)
    def cuMemcpyHtoDAsync(
        self, dstDevice: Any, srcHost: Any, ByteCount: Any, hStream: Any
    ) -> tuple[Any, ...]:
        self._need_context()
        n = _size("ByteCount", ByteCount)
        self._check_stream(hStream)
        self.host.copy_htod_async(_int(dstDevice), _int(srcHost), n, 0)
        with self._lock:
            self.copies.append(("HtoDAsync", _int(dstDevice), n, _int(hStream)))
        return ()

    # --------------------------------------------------------------- streams
    # A created stream joins `streams` (events may be recorded on it) until destroyed.
    @_api(1)
    def cuStreamCreate(self, flags: Any) -> tuple[Any, ...]:
        device = self._need_context()
        _size("Flags", flags)
        with self._lock:
            self._next_event += 0x10
            self.streams.add(self._next_event)
            self.stream_device[self._next_event] = device
            self.created_streams += 1
            return (real.CUstream(self._next_event),)

    @_api(1)
    def cuStreamGetCtx(self, hStream: Any) -> tuple[Any, ...]:
        s = _int(hStream)
        if s <= 2:  # the special handles name the current context's stream
            device = self._need_context()
        elif s not in self.streams:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_HANDLE, f"stream {s:#x} does not exist")
        else:
            device = self.stream_device.get(s, 0)
        return (real.CUcontext(self._ctx_value[device]),)

    @_api(0)
    def cuStreamDestroy(self, hStream: Any) -> tuple[Any, ...]:
        s = _int(hStream)
        with self._lock:
            if s not in self.streams:
                raise FakeDriverError(R.CUDA_ERROR_INVALID_HANDLE, f"stream {s:#x} does not exist")
            self.streams.discard(s)
            self.stream_device.pop(s, None)
            self.busy_streams.discard(s)
        return ()

    # ---------------------------------------------------------------- events
    # Work on the fake is synchronous: every recorded event is complete, unless
    # its stream is in `busy_streams` (then cuEventQuery says NOT_READY until
    # the stream leaves the set or cuEventSynchronize waits for it).
    @_api(1)
    def cuEventCreate(self, flags: Any) -> tuple[Any, ...]:
        device = self._need_context()
        with self._lock:
            self._next_event += 0x10
            self.events[self._next_event] = [None, device, _size("Flags", flags)]
            return (real.CUevent(self._next_event),)

    def _live_event(self, ev: Any) -> list[Any]:
        rec = self.events.get(_int(ev))
        if rec is None:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_HANDLE, f"event {_int(ev):#x} does not exist")
        return rec

    @_api(0)
    def cuEventRecord(self, hEvent: Any, hStream: Any) -> tuple[Any, ...]:
        rec = self._live_event(hEvent)
        s = _int(hStream)
        if s <= 2:
            stream_device = self._need_context()  # the current context's default stream
        elif s not in self.streams:
            raise FakeDriverError(R.CUDA_ERROR_INVALID_HANDLE, f"stream {s:#x} does not exist")
        else:
            stream_device = self.stream_device.get(s, 0)
        # "hEvent and hStream must be from the same context otherwise
        # CUDA_ERROR_INVALID_HANDLE is returned" (cuEventRecord, Driver API docs).
        if stream_device != rec[1]:
            raise FakeDriverError(
                R.CUDA_ERROR_INVALID_HANDLE,
                f"event of device {rec[1]}'s context recorded on a stream of device {stream_device}'s",
            )
        rec[0] = s
        return ()

    @_api(0)
    def cuEventQuery(self, hEvent: Any) -> tuple[Any, ...]:
        rec = self._live_event(hEvent)
        if rec[0] in self.busy_streams:
            raise FakeDriverError(R.CUDA_ERROR_NOT_READY, "work pending")
        return ()

    @_api(0)
    def cuEventSynchronize(self, hEvent: Any) -> tuple[Any, ...]:
        rec = self._live_event(hEvent)
        self.busy_streams.discard(rec[0])
        return ()

    @_api(0)
    def cuEventDestroy(self, hEvent: Any) -> tuple[Any, ...]:
        self._live_event(hEvent)
        del self.events[_int(hEvent)]
        return ()

    # --------------------------------------------------------------- summary
    def set_access_devices(self) -> list[tuple[int, ...]]:
        """The device tuple of every successful ``cuMemSetAccess``, in order."""
        return [tuple(d for d, _ in grants) for _, _, grants, _ in self.access_log]

    def functions(self) -> Iterable[str]:
        """Names of the driver functions the fake implements."""
        return sorted(
            n for n in dir(type(self)) if n[:2] == "cu" and n[2:3].isupper() and callable(getattr(self, n))
        )

"""Array views of device memory that other libraries consume (DLPack, array interfaces).

:class:`ArrayView` describes a typed, C-contiguous window of memory that some
owner object (a :class:`~vmmpool.GrowableBuffer`, a pool allocation) keeps
mapped. It exports the memory three ways, so NumPy, CuPy, PyTorch, JAX and
Numba can use it without a copy:

* DLPack (``__dlpack__`` / ``__dlpack_device__``), as the array API standard
  specifies: a versioned capsule (``"dltensor_versioned"``, DLPack 1.0 ABI)
  when the consumer passes ``max_version >= (1, 0)``, a legacy
  ``"dltensor"`` capsule otherwise;
* ``__cuda_array_interface__`` (version 3) for memory on a CUDA device;
* ``__array_interface__`` (version 3) for memory of the host emulator.

Only the interface that applies exists: the other raises ``AttributeError``,
so ``hasattr`` tells consumers which one to use.

Everything is done with ctypes (no compiled extension). The rules that keeps
this safe (the DLPack contract, as dlpack.h states it):

1. The structs (``DLManagedTensor[Versioned]`` with its shape and strides
   arrays) live in a module-level table keyed by their address, together with
   the view, until the deleter runs. The view keeps its owner alive, so a
   consumer's array keeps the memory mapped even after every other reference
   to the buffer is gone.
2. The deleter and the capsule destructor are ``ctypes.CFUNCTYPE`` callbacks,
   which take the GIL, so consumers may call them from any thread. They are
   created once and given an extra reference, so they outlive module teardown.
   They do nothing at interpreter shutdown, and at exit (``atexit``) the
   deleter of every export still held is set to NULL, which DLPack allows and
   consumers check: a consumer that outlives the interpreter (a C++ static)
   would otherwise call a callback that can no longer run.
3. The deleter releases an export at most once; a second call (a consumer bug)
   is a no-op. The capsule destructor calls it only when the capsule was never
   consumed (its name is still ``"dltensor"`` / ``"dltensor_versioned"``).
4. A consumer that rejects a capsule may drop it while its own exception is
   pending (NumPy does, for a CUDA capsule). Python code cannot run with an
   exception set, so each callback first moves the pending exception aside
   (``PyErr_Fetch``, with argument slots prepared per export so no other call
   is needed first) and then releases the export. A ctypes callback cannot hand
   the exception back, so it is logged on the ``vmmpool`` logger and dropped:
   the consumer then reports a ``SystemError`` instead of its own message. The
   export is freed either way.

Data pointers are exported as is (``byte_offset`` 0); a view at a byte offset
that is not a multiple of 256 is legal but slower for some CUDA kernels.

``copy=True`` (or ``dl_device=(1, 0)`` for CUDA memory) exports a host copy
that the capsule owns (a :class:`_Copy`); the view's memory is then not
exported at all. A view's range, dtype and shape are fixed when it is made
(its owner's checks trust them), and a view has at most :data:`MAX_NDIM`
dimensions: NumPy refuses more only after taking the capsule (rule 4).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ._device import KDL_CPU, KDL_CUDA, Device
from ._errors import ExportAsleepError, ExportClosedError
from ._logq import QueuedLogger
from ._options import brief, check_int
from ._process import NoCopy

__all__ = ["ArrayView", "DLPACK_VERSION", "dlpack_dtype", "export_stats"]

# Queued while this thread holds a pool's lock (see _logq): never a logging lock there.
_log = QueuedLogger("vmmpool")

#: DLPack ABI version of the versioned capsules this module produces.
DLPACK_VERSION: tuple[int, int] = (1, 0)

# DLManagedTensorVersioned.flags bits.
_FLAG_IS_COPIED = 1 << 1

#: The most dimensions a view may have: NumPy's (NPY_MAXDIMS) and CuPy's limit. NumPy checks
#: it only after it took the capsule, while its error is pending, so the user saw a SystemError.
MAX_NDIM = 64

# DLDataTypeCode values.
_KDL_INT, _KDL_UINT, _KDL_FLOAT, _KDL_COMPLEX, _KDL_BOOL = 0, 1, 2, 5, 6
_CODES = {"i": _KDL_INT, "u": _KDL_UINT, "f": _KDL_FLOAT, "c": _KDL_COMPLEX, "b": _KDL_BOOL}
_SIZES = {"i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8), "c": (8, 16), "b": (1,)}


# ------------------------------------------------------------------- ABI structs
class DLDevice(ctypes.Structure):
    """``DLDevice``: device type and ordinal."""

    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    """``DLDataType``: type code, bits per lane, lanes."""

    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    """``DLTensor``; shape and strides are in elements."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


# The deleter takes the struct's address as a plain pointer: no ctypes
# pointer-type conversion happens on entry.
_DELETER_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_DESTRUCTOR_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    """Legacy ``DLManagedTensor`` (capsule name ``"dltensor"``)."""

    _fields_ = [
        ("dl_tensor", DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _DELETER_T),
    ]


class DLPackVersion(ctypes.Structure):
    """``DLPackVersion``."""

    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    """``DLManagedTensorVersioned`` (capsule name ``"dltensor_versioned"``); ``dl_tensor`` at offset 32."""

    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _DELETER_T),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


# ------------------------------------------------------------------ Python C-API
_api = ctypes.pythonapi
_PyCapsule_New = _api.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _DESTRUCTOR_T]
_PyCapsule_IsValid = _api.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
# argtypes None on purpose: the prepared byref() arguments are passed through
# without any conversion that could notice a pending exception (rule 4).
_PyErr_Fetch = _api.PyErr_Fetch
_PyErr_Fetch.restype = None
_PyErr_Fetch.argtypes = None  # type: ignore[assignment]
_Py_DecRef = _api.Py_DecRef
_Py_DecRef.restype = None
_Py_DecRef.argtypes = [ctypes.c_void_p]
_Py_IncRef = _api.Py_IncRef
_Py_IncRef.restype = None
_Py_IncRef.argtypes = [ctypes.py_object]


def _immortal(obj: Any) -> Any:
    """Give `obj` one reference that is never dropped: it lives for the process."""
    _Py_IncRef(obj)
    return obj


# Capsule names must stay valid as long as any capsule: never freed.
_NAME_LEGACY = _immortal(ctypes.create_string_buffer(b"dltensor"))
_NAME_VERSIONED = _immortal(ctypes.create_string_buffer(b"dltensor_versioned"))


class _ErrorSlot:
    """Where a callback parks an exception that was pending when it was called."""

    __slots__ = ("args", "ptrs")

    def __init__(self) -> None:
        self.ptrs = (ctypes.c_void_p * 3)()
        size = ctypes.sizeof(ctypes.c_void_p)
        self.args = tuple(ctypes.byref(self.ptrs, i * size) for i in range(3))

    def drop(self) -> None:
        """Log and release an exception moved aside by ``PyErr_Fetch`` (if any)."""
        ptrs = self.ptrs
        if not ptrs[0]:
            return
        # The value if there is one (it may be unnormalized), else the type.
        index = 1 if ptrs[1] else 0
        size = ctypes.sizeof(ctypes.c_void_p)
        what = ctypes.py_object.from_address(ctypes.addressof(ptrs) + index * size).value
        _log.warning(
            "a DLPack consumer dropped a capsule while its own exception was pending (%r); "
            "a ctypes callback cannot preserve it, so the consumer will report SystemError",
            what,
        )
        del what
        for i in range(3):
            if ptrs[i]:
                _Py_DecRef(ptrs[i])
                ptrs[i] = None


class _Export:
    """One exported tensor: the struct and everything it points to, until the deleter runs."""

    __slots__ = ("managed", "shape", "strides", "view", "error", "capsule")

    def __init__(
        self, managed: ctypes.Structure, shape: Any, strides: Any, view: ArrayView | _Copy
    ) -> None:
        self.managed = managed
        self.shape = shape
        self.strides = strides
        self.view = view
        self.error = _ErrorSlot()
        #: ``id()`` of the capsule made for it (the key of its ``_capsules`` record), once made.
        self.capsule: int | None = None


class _CapsuleRecord:
    """What the capsule destructor needs: the struct's address and its own error slot."""

    __slots__ = ("address", "name", "error")

    def __init__(self, address: int, name: Any) -> None:
        self.address = address
        self.name = name
        self.error = _ErrorSlot()


_lock = threading.RLock()  # re-entrant: a deleter may run from GC on a thread holding it
_exports: dict[int, _Export] = {}  # struct address -> export
_capsules: dict[int, _CapsuleRecord] = {}  # id(capsule) -> record
_stats = {"exported": 0, "released": 0, "deleter_calls": 0}
_spare = _ErrorSlot()  # for a callback on an address we do not know (a consumer bug)


def _new_lock_in_child() -> None:
    # After os.fork(), in the child: a parent thread may have held the lock at the
    # fork, and a deleter run in the child (an inherited array dropped) takes it.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _disarm() -> None:
    """At interpreter exit: clear the deleter of every export a consumer still holds.

    A C or C++ consumer may keep a tensor past ``Py_Finalize`` (a static) and
    call its deleter then; a ctypes callback cannot run without the interpreter
    and the process would crash. DLPack allows a NULL deleter ("if there is no
    way for the caller to provide a reasonable destructor") and consumers check
    it, so such an export is leaked at exit instead, as NumPy's deleter does
    when Python is gone. Registered with ``atexit``: consumers running after it
    (module teardown) skip the call, which at shutdown released nothing anyway;
    so do exit handlers registered before vmmpool was imported (they run after
    this one): an array they drop keeps its memory until the process ends.
    """
    global _disarmed
    with _lock:
        _disarmed = True
        # A copy: a collection during the loop may free an array whose deleter runs here
        # (the lock is re-entrant) and releases its export.
        for ex in list(_exports.values()):
            ex.managed.deleter = _DELETER_T()  # NULL


#: Set by :func:`_disarm`: exports made after it (in a later exit handler) get no deleter.
_disarmed = False
atexit.register(_disarm)


def export_stats() -> dict[str, int]:
    """Counters of DLPack exports in this process (for tests and debugging).

    Returns
    -------
    dict of str to int
        ``exported``: capsules created; ``released``: exports freed by their
        deleter; ``deleter_calls``: deleter invocations (a second call for the
        same export is counted but does nothing); ``live``: exports not yet
        released.
    """
    with _lock:
        out = dict(_stats)
        out["live"] = len(_exports)
    return out


def _release(address: int) -> None:
    """Free the export at `address` once; later calls only count."""
    with _lock:
        _stats["deleter_calls"] += 1
        ex = _exports.pop(address, None)
        if ex is not None:
            _stats["released"] += 1
            ex.view._exports -= 1
            # A consumer may clear the capsule's destructor when it takes the capsule
            # (JAX does), so the record would never be dropped by _destructor: drop it
            # here. (A capsule still alive then finds no record and does nothing.)
            key = ex.capsule
            if key is not None:
                rec = _capsules.get(key)
                if rec is not None and rec.address == address:
                    del _capsules[key]
    # Dropped outside the lock: this may be the view's, and then the owner's,
    # last reference, and the owner's finalizer may give memory back.
    del ex


def _deleter(
    address: int,
    _table: dict[int, _Export] = _exports,
    _fetch: Any = _PyErr_Fetch,
    _spare: _ErrorSlot = _spare,
    _finalizing: Any = sys.is_finalizing,
) -> None:
    # Only a dict lookup may come before PyErr_Fetch (rule 4).
    slot = _table[address].error if address in _table else _spare
    _fetch(*slot.args)
    try:
        slot.drop()
        if not _finalizing():
            _release(address)
    except BaseException:  # noqa: BLE001 - a C callback must never raise
        pass


def _destructor(
    capsule: int,
    _table: dict[int, _CapsuleRecord] = _capsules,
    _fetch: Any = _PyErr_Fetch,
    _spare: _ErrorSlot = _spare,
    _finalizing: Any = sys.is_finalizing,
) -> None:
    rec = _table[capsule] if capsule in _table else None
    _fetch(*(rec.error if rec is not None else _spare).args)
    try:
        (rec.error if rec is not None else _spare).drop()
        if rec is None or _finalizing():
            return
        with _lock:  # as _release, which drops the record when the deleter runs first
            if _table.get(capsule) is not rec:
                return  # the deleter ran: the export is released, its record gone
            del _table[capsule]
        # A consumer renames the capsule ("used_dltensor...") when it takes
        # ownership; only an unconsumed capsule still owns the export.
        if _PyCapsule_IsValid(capsule, rec.name):
            _release(rec.address)
    except BaseException:  # noqa: BLE001 - a C callback must never raise
        pass


# Created once, never freed (rule 2).
_DELETER = _immortal(_DELETER_T(_deleter))
_DESTRUCTOR = _immortal(_DESTRUCTOR_T(_destructor))
_DELETER_ADDRESS = ctypes.cast(_DELETER, ctypes.c_void_p).value


def _new_capsule(
    view: ArrayView | _Copy,
    data: int,
    device: tuple[int, int],
    dtype: tuple[int, int, int],
    shape: Sequence[int],
    strides: Sequence[int],
    versioned: bool,
    flags: int = 0,
) -> Any:
    """Build the managed tensor for `view` and wrap it in a capsule the consumer owns.

    `view` is what the export keeps alive (an :class:`ArrayView`, or a :class:`_Copy`);
    `flags` are the versioned capsule's (``DLPACK_FLAG_BITMASK_*``).
    """
    ndim = len(shape)
    c_shape = (ctypes.c_int64 * max(ndim, 1))(*shape)
    c_strides = (ctypes.c_int64 * max(ndim, 1))(*strides)
    managed: DLManagedTensor | DLManagedTensorVersioned
    if versioned:
        managed = DLManagedTensorVersioned()
        managed.version.major, managed.version.minor = DLPACK_VERSION
        managed.flags = flags  # 0: writable, not a copy
        name = _NAME_VERSIONED
    else:
        managed = DLManagedTensor()
        name = _NAME_LEGACY
    t = managed.dl_tensor
    t.data = data or None
    t.device.device_type, t.device.device_id = device
    t.ndim = ndim
    t.dtype.code, t.dtype.bits, t.dtype.lanes = dtype
    t.shape = ctypes.cast(c_shape, ctypes.POINTER(ctypes.c_int64))
    t.strides = ctypes.cast(c_strides, ctypes.POINTER(ctypes.c_int64))  # never NULL (DLPack >= 1.2)
    t.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _DELETER
    address = ctypes.addressof(managed)
    # Built before the lock: allocating may run the garbage collector, and its finalizers.
    ex = _Export(managed, c_shape, c_strides, view)
    rec = _CapsuleRecord(address, name)
    with _lock:
        if _disarmed:  # made in an exit handler after _disarm: no deleter either
            managed.deleter = _DELETER_T()
        _exports[address] = ex
        view._exports += 1
        try:
            capsule = _PyCapsule_New(address, name, _DESTRUCTOR)
            ex.capsule = id(capsule)
            _capsules[ex.capsule] = rec
        except BaseException:
            _exports.pop(address)
            view._exports -= 1
            del ex
            raise
        _stats["exported"] += 1
    return capsule


class _Copy:
    """What a copying export (``copy=True``) keeps alive: a host array of its own."""

    __slots__ = ("array", "_exports")

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self._exports = 0


# ------------------------------------------------------------------------ dtypes
def dlpack_dtype(dtype: DTypeLike) -> tuple[int, int, int]:
    """Return the DLPack ``(code, bits, lanes)`` of a NumPy dtype.

    Parameters
    ----------
    dtype : dtype-like
        bool, int8..int64, uint8..uint64, float16/32/64 or complex64/128, in
        native byte order.

    Raises
    ------
    TypeError
        `dtype` is not a dtype NumPy understands.
    ValueError
        The dtype has no DLPack equivalent here.
    """
    dt = _parse_dtype(dtype)
    return (_CODES[dt.kind], dt.itemsize * 8, 1)


def _parse_dtype(dtype: DTypeLike) -> np.dtype:
    if dtype is None:
        # NumPy reads None as float64; a view's element type is never guessed.
        raise TypeError("dtype must be a NumPy dtype such as 'float32' or numpy.float32, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            "dtype must be a NumPy dtype such as 'float32' or numpy.float32 (a dtype, a scalar "
            f"type or a dtype string NumPy knows), got {type(dtype).__name__} {brief(dtype)}, "
            "which NumPy does not read as a dtype"
        ) from err
    if dt.kind not in _CODES or dt.itemsize not in _SIZES[dt.kind] or dt.fields or dt.subdtype:
        raise ValueError(
            "dtype must be one of bool, int8..int64, uint8..uint64, float16/32/64, "
            f"complex64/128, got {dt}"
        )
    if not dt.isnative:
        raise ValueError(f"dtype must be in native byte order, got {dt.str}")
    return dt


# ------------------------------------------------------------------------- view
class ArrayView(NoCopy):
    """A typed, C-contiguous view of device memory that exports DLPack and array interfaces.

    Parameters
    ----------
    owner : object
        What keeps the memory valid (a buffer, a pool allocation). The view
        holds a strong reference to it, and so does every capsule exported from
        the view, until the consumer is done. If `owner` has a true ``closed``
        or ``freed`` attribute, the view refuses new exports with a
        ``BufferError`` that is also a :class:`~vmmpool.ClosedError`; while it
        has a true ``asleep`` attribute (nothing is mapped there), with a
        ``BufferError`` that is also an :class:`~vmmpool.AsleepError`.
    device : Device
        Where the memory is.
    ptr : int
        Address of the owner's first byte. 0 (NULL) only with `nbytes` 0: an
        empty view exports a NULL data pointer, a non-empty one never does.
    nbytes : int
        Bytes available from `ptr`; ``ptr + nbytes`` must stay within
        :attr:`Device.address_limit`.
    dtype : dtype-like
        Element type: bool, int8..int64, uint8..uint64, float16/32/64,
        complex64/128 (native byte order).
    shape : int or sequence of int, optional
        Shape in elements. Default: 1-D, every whole element available from
        `offset`.
    offset : int
        Byte offset of the first element from `ptr`; a multiple of the item size.

    Attributes
    ----------
    owner, device
        As given.
    ptr : int
        Address of the first element (``ptr + offset`` of the arguments).
    offset : int
        Byte offset from the owner's first byte.
    dtype : numpy.dtype
    shape : tuple of int
    strides : tuple of int
        C-contiguous strides in bytes (as NumPy spells them).

    Raises
    ------
    TypeError, ValueError
        Wrong types, an unsupported dtype, a misaligned offset, or a shape that
        does not fit in the bytes available.

    Notes
    -----
    Create views with ``GrowableBuffer.view()`` (which also tracks them, so the
    buffer refuses to unmap memory under a live view or to move while views
    exist). Constructing one directly is for owners of other memory.
    """

    owner: object
    device: Device
    ptr: int
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    _exports: int

    def __init__(
        self,
        owner: object,
        device: Device,
        ptr: int,
        nbytes: int,
        dtype: DTypeLike = "uint8",
        shape: int | Sequence[int] | None = None,
        offset: int = 0,
    ) -> None:
        if not isinstance(device, Device):
            raise TypeError(f"device must be a vmmpool.Device, got {type(device).__name__}")
        limit = device.address_limit
        base = check_int("ptr", ptr, maximum=limit)
        avail = check_int("nbytes", nbytes, maximum=limit)
        if base == 0 and avail:
            raise ValueError(
                f"ptr must be a device address (not 0) when nbytes > 0, got ptr 0 with nbytes {avail}"
            )
        if base + avail - 1 > limit:
            raise ValueError(
                f"ptr + nbytes must be <= {limit} (the largest the device can address), "
                f"got {base:#x} + {avail}"
            )
        dt = _parse_dtype(dtype)
        off = check_int("offset", offset)
        item = dt.itemsize
        if off % item:
            raise ValueError(f"offset must be a multiple of the item size {item} of {dt}, got {off}")
        if off > avail:
            raise ValueError(f"offset must be <= {avail} (the bytes available), got {off}")
        if shape is None:
            dims: tuple[int, ...] = ((avail - off) // item,)
        else:
            dims = _parse_shape(shape)
            if len(dims) > MAX_NDIM:
                # NumPy and CuPy refuse more, but only after taking the capsule (their error is
                # then lost: the user saw a SystemError); refused here, with the reason.
                raise ValueError(
                    f"shape must have at most {MAX_NDIM} dimensions (NumPy's and CuPy's limit), "
                    f"got {len(dims)}"
                )
        count = 1
        for d in dims:
            count *= d
        need = count * item
        if off + need > avail:
            raise ValueError(
                f"shape {dims} of {dt} needs {need} bytes from offset {off}, "
                f"but only {avail - off} are available"
            )
        strides = []
        step = item
        for d in reversed(dims):
            strides.append(step)
            step *= max(d, 1)
        if step > _INT64_MAX:
            # DLPack's shape and strides are int64 (and NumPy's are ssize_t): larger values
            # would be exported wrapped (an empty view of shape (2**64 - 1, 0) read as -1).
            raise ValueError(
                f"shape {dims} of {dt} is too large: its extents (empty dimensions counted as 1) "
                f"span {step} bytes, but DLPack and NumPy shapes and strides must be "
                f"<= {_INT64_MAX} (2**63 - 1)"
            )
        # Set once: the owner's checks (a buffer's shrink and move, a free) and every
        # export trust them (see __setattr__).
        init = object.__setattr__
        init(self, "owner", owner)
        init(self, "device", device)
        init(self, "ptr", base + off)
        init(self, "offset", off)
        init(self, "dtype", dt)
        init(self, "shape", dims)
        init(self, "strides", tuple(reversed(strides)))
        self._exports = 0

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIXED:
            # `view.shape = (4, 8)` reads like NumPy's in-place reshape, but a view's
            # range is checked once, when it is made: a new shape would export memory
            # past it (another allocation's) or shape and strides that disagree.
            raise AttributeError(
                f"ArrayView.{name} is read-only: a view's memory, dtype and shape are fixed when "
                "it is made; make another view (view(dtype, shape, offset)) or reshape the array "
                "a consumer made from it"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _FIXED:
            raise AttributeError(f"ArrayView.{name} is read-only")
        object.__delattr__(self, name)

    # ------------------------------------------------------------------ facts
    @property
    def address(self) -> int:
        """Device address of the view's first byte: the same as :attr:`ptr`."""
        return self.ptr

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes the view covers."""
        return self.size * self.dtype.itemsize

    @property
    def end(self) -> int:
        """One past the view's last byte, as a byte offset from the owner's first byte."""
        return self.offset + self.nbytes

    @property
    def exports(self) -> int:
        """DLPack capsules exported from this view whose deleter has not run yet."""
        return self._exports

    def _check_owner(self, export: str) -> None:
        self.device._backend.check_process("ArrayView")
        owner = self.owner
        if getattr(owner, "closed", False) or getattr(owner, "freed", False):
            raise ExportClosedError(type(owner).__name__)  # a ClosedError and a BufferError
        if getattr(owner, "asleep", False):
            # Nothing is mapped at the addresses: an array made now would crash its
            # process at the first touch. Exports made before the sleep are the
            # caller's to leave alone until wake(); so is one racing sleep() in
            # another thread (no lock here: it touches no memory, and the array's
            # use would race the sleep all the same; see _pool/_sleep.py).
            raise ExportAsleepError(type(owner).__name__, export)  # an AsleepError and a BufferError

    # ----------------------------------------------------------------- DLPack
    def __dlpack_device__(self) -> tuple[int, int]:
        """``(device_type, device_id)``: ``(2, ordinal)`` (kDLCUDA) or ``(1, 0)`` (kDLCPU) for host."""
        return self.device.dlpack_device

    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """Export the view as a DLPack capsule (array API standard).

        Parameters
        ----------
        stream : int or None
            The consumer's stream. CUDA: ``None`` or 1 (legacy default
            stream), 2 (per-thread default stream), -1 (no synchronization) or
            a stream handle > 2. Host: only ``None``. vmmpool queues no work on
            this memory, so there is nothing to wait for; ordering work you
            launched yourself is up to you.
        max_version : tuple of int, optional
            Highest DLPack version the consumer supports. ``(1, x)`` or later
            gives a ``"dltensor_versioned"`` capsule (version
            :data:`DLPACK_VERSION`); ``None`` or ``(0, x)`` a legacy
            ``"dltensor"`` capsule.
        dl_device : tuple of int, optional
            :meth:`__dlpack_device__` (or ``None``): the memory itself. ``(1, 0)``
            (kDLCPU) for a view in CUDA memory: a host copy (not with
            ``copy=False``). Any other device raises ``BufferError``.
        copy : bool, optional
            ``None`` or ``False``: share the memory (``False`` never copies).
            ``True``: export a host copy of the view's bytes, which the capsule
            owns (a versioned capsule says so: ``DLPACK_FLAG_BITMASK_IS_COPIED``);
            for a view in CUDA memory only with ``dl_device=(1, 0)``, as vmmpool
            allocates no device memory for a copy.

        Returns
        -------
        PyCapsule
            Owns one reference to this view (and so to its owner), or to its
            copy, until the consumer calls the deleter, or until the capsule is
            dropped unconsumed.

        Raises
        ------
        BufferError
            A request this export cannot satisfy (another device, a device copy,
            a copy to the host with ``copy=False``, a stream not allowed here, or
            a closed owner: then the error is also a :class:`~vmmpool.ClosedError`;
            or an owner that is asleep: then it is also an :class:`~vmmpool.AsleepError`).
        TypeError
            An argument of the wrong type.
        """
        self._check_owner("an export (__dlpack__)")
        if isinstance(copy, np.bool_):
            copy = bool(copy)  # NumPy passes its `copy` argument through as given
        if copy is not None and not isinstance(copy, bool):
            raise TypeError(
                f"copy must be None, True or False, got {type(copy).__name__} {brief(copy)}"
            )
        here = self.__dlpack_device__()
        target = here if dl_device is None else _parse_dl_device(dl_device)
        if target != here:
            if target != (KDL_CPU, 0):
                raise BufferError(
                    f"cannot export to dl_device {target}: the memory is on {here}, and a view "
                    "copies only to the host, dl_device (1, 0)"
                )
            if copy is False:
                raise BufferError(
                    f"cannot export to dl_device {target} with copy=False: the memory is on "
                    f"{here}, and only a copy reaches the host"
                )
            copy = True  # None: "copy if needed" (array API standard)
        elif copy and here[0] != KDL_CPU:
            raise BufferError(
                f"copy=True on {here} is not supported (vmmpool allocates no device memory for "
                "a copy): pass dl_device=(1, 0) for a host copy, or copy in the consumer"
            )
        _check_stream(stream, target[0])
        versioned = False
        if max_version is not None:
            if (
                not isinstance(max_version, tuple)
                or len(max_version) != 2
                or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in max_version
                )
            ):
                raise TypeError(
                    "max_version must be a (major, minor) tuple of two ints >= 0 such as "
                    f"(1, 0), or None, got {_brief_items(max_version)}"
                )
            versioned = max_version[0] >= 1
        item = self.dtype.itemsize
        strides = [s // item for s in self.strides]
        code = dlpack_dtype(self.dtype)
        if copy:
            if here[0] != KDL_CPU:
                # To the host: the array API standard asks the producer to synchronize. The
                # stream that orders the owner's memory (an allocation's, a buffer's) is
                # waited for, else the whole device (a synchronous copy reads after neither).
                wait = getattr(self.owner, "_host_copy_stream", None)
                self.device.synchronize(wait() if wait is not None else None)
            # Read now (synchronous): the capsule owns bytes of its own, in host memory.
            n = self.nbytes
            raw = self.device.read(self.ptr, n) if n else bytearray(0)
            arr = np.frombuffer(raw, dtype=self.dtype, count=self.size).reshape(self.shape)
            return _new_capsule(
                _Copy(arr),
                arr.ctypes.data,
                (KDL_CPU, 0),
                code,
                self.shape,
                strides,
                versioned,
                _FLAG_IS_COPIED if versioned else 0,
            )
        return _new_capsule(self, self.ptr, here, code, self.shape, strides, versioned)

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        """``numpy.asarray(view)``. NumPy reads :attr:`__array_interface__` first (host memory);
        this is what it falls back on for a view in CUDA memory, which it cannot read: a
        ``TypeError`` naming the consumers that can (NumPy would otherwise make a 0-d
        object array holding the view)."""
        if not self.device.is_host:
            raise TypeError(
                f"numpy.asarray(ArrayView) needs host memory, but this view is on {self.device}: "
                "use cupy.from_dlpack(view) or torch.from_dlpack(view), or "
                "numpy.from_dlpack(view, device='cpu') for a host copy"
            )
        arr = np.from_dlpack(self)
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError(
                    f"numpy.asarray(ArrayView, dtype={np.dtype(dtype)}, copy=False): the view is "
                    f"{arr.dtype} and a cast copies"
                )
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # -------------------------------------------------------- array interfaces
    def _interface(self, name: str) -> dict[str, Any]:
        self._check_owner(f"an export ({name})")
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "strides": None,  # C-contiguous
            "version": 3,
        }

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """NumPy's array interface (version 3); only for memory of the host emulator."""
        if not self.device.is_host:
            raise AttributeError(
                "__array_interface__ is for host memory; this view is on "
                f"{self.device}: use __cuda_array_interface__ or DLPack"
            )
        return self._interface("__array_interface__")

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """The CUDA array interface (version 3); only for memory on a CUDA device."""
        if self.device.is_host:
            raise AttributeError(
                "__cuda_array_interface__ is for CUDA memory; this view is on the host "
                "emulator: use __array_interface__ or DLPack"
            )
        desc = self._interface("__cuda_array_interface__")
        if not self.nbytes:
            # The CUDA Array Interface: "For zero-size arrays, use 0 here". An empty view's
            # address may lie past the last mapped page (or in a range that maps nothing).
            desc["data"] = (0, False)
        desc["stream"] = None  # no producer work to wait for
        return desc

    def __repr__(self) -> str:
        return (
            f"<ArrayView {self.dtype}{list(self.shape)} at {self.ptr:#x} on {self.device}, "
            f"owner {type(self.owner).__name__}>"
        )


_INT64_MAX = (1 << 63) - 1

#: ArrayView attributes fixed at construction (ArrayView.__setattr__).
_FIXED = frozenset(("owner", "device", "ptr", "offset", "dtype", "shape", "strides"))


def _parse_shape(shape: object) -> tuple[int, ...]:
    """A view's shape: an int (1-D) or a sequence (or 1-D NumPy array) of ints >= 0."""
    if isinstance(shape, np.ndarray) and shape.ndim:
        if shape.ndim > 1:
            raise TypeError(
                f"shape must be an int or a sequence of ints, got a {shape.ndim}-D array"
            )
        seq: Any = list(shape)
    elif hasattr(shape, "__index__"):
        seq = (shape,)
    else:
        seq = shape
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise TypeError(f"shape must be an int or a sequence of ints, got {brief(shape)}")
    return tuple(check_int("shape entry", d) for d in seq)


def _brief_items(value: object) -> str:
    """`brief` of a short tuple or list with its items shown (``tuple (-1, 0)``), else `brief`."""
    if isinstance(value, (tuple, list)) and len(value) <= 4:
        inner = ", ".join(brief(v) for v in value)
        if isinstance(value, tuple) and len(value) == 1:
            inner += ","
        return f"{type(value).__name__} ({inner})"
    return f"{type(value).__name__} {brief(value)}"


def _parse_dl_device(dl_device: object) -> tuple[int, int]:
    """``(device_type, device_id)`` from a consumer's `dl_device`: exactly two ints."""
    items = (
        tuple(dl_device)
        if isinstance(dl_device, Sequence) and not isinstance(dl_device, (str, bytes))
        else None
    )
    try:
        if (
            items is not None
            and len(items) == 2
            and all(hasattr(v, "__index__") and not isinstance(v, bool) for v in items)
        ):
            return (int(items[0].__index__()), int(items[1].__index__()))
    except TypeError:  # __index__ refused (numpy.bool, a NumPy array)
        pass
    raise TypeError(
        "dl_device must be a (device_type, device_id) tuple of two ints such as (1, 0), "
        f"got {_brief_items(dl_device)}"
    )


def _check_stream(stream: object, kind: int) -> None:
    if stream is None:
        return
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be None or an int, got {type(stream).__name__}")
    if kind == KDL_CPU:
        raise BufferError(f"stream must be None for host memory (kDLCPU), got {stream}")
    if kind == KDL_CUDA and (stream == 0 or stream < -1):
        raise BufferError(
            "stream must be None, -1, 1 (legacy default), 2 (per-thread default) or a stream "
            f"handle > 2 for CUDA memory, got {stream} (0 is ambiguous and disallowed by DLPack)"
        )

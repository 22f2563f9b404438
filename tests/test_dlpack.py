"""ArrayView: DLPack capsules and array interfaces, consumed by NumPy (host) and CuPy/PyTorch (CUDA)."""

from __future__ import annotations

import ctypes
import gc
import logging
import pickle
import subprocess
import sys
import textwrap
import threading
from typing import Any

import numpy as np
import pytest
from conftest import cuda_device_or_skip

import vmmpool
from vmmpool import _dlpack
from vmmpool._buffer import GrowableBuffer
from vmmpool._dlpack import ArrayView, DLManagedTensor, DLManagedTensorVersioned, export_stats

MiB = 1 << 20

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]

_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.restype = ctypes.c_int
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]


class Capsule:
    """A producer that hands out one given capsule (to feed numpy.from_dlpack)."""

    def __init__(self, capsule: Any, device: tuple[int, int] = (1, 0)) -> None:
        self.capsule = capsule
        self.device = device

    def __dlpack__(self, **kwargs: Any) -> Any:
        cap, self.capsule = self.capsule, None
        return cap

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device


@pytest.fixture
def buf(host: vmmpool.Device) -> Any:
    with GrowableBuffer(max_size=8 * MiB, device=host, initial_size=MiB) as b:
        yield b
    gc.collect()
    assert host.counters().live == (0, 0, 0)


def expected_values(dtype: np.dtype, n: int) -> np.ndarray:
    if dtype.kind == "b":
        return np.arange(n) % 3 == 0
    if dtype.kind == "c":
        return (np.arange(n) + 1j * np.arange(n)[::-1]).astype(dtype)
    return (np.arange(n) % 100).astype(dtype)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_round_trip_shares_memory(buf: GrowableBuffer, dtype: str) -> None:
    dt = np.dtype(dtype)
    offset = 4 * dt.itemsize
    shape = (3, 5, 7)
    view = buf.view(dtype, shape=shape, offset=offset)
    a = np.from_dlpack(view)
    assert (a.dtype, a.shape) == (dt, shape)
    assert a.ctypes.data == buf.ptr + offset
    values = expected_values(dt, a.size).reshape(shape)
    a[...] = values
    raw = bytes(buf.read(a.nbytes, offset=offset))
    assert raw == values.tobytes()  # writes through numpy reach the buffer
    buf.write(np.zeros(1, dt).tobytes(), offset=offset)
    assert a.flat[0] == np.zeros(1, dt)[0]  # and writes to the buffer show in numpy
    b = np.asarray(view)  # the array interface sees the same bytes
    assert b.ctypes.data == a.ctypes.data and np.array_equal(a, b)
    del a, b, view


def test_default_shape_covers_the_size_from_offset(buf: GrowableBuffer) -> None:
    buf.resize(1001)
    v = buf.view("int32", offset=8)
    assert v.shape == ((1001 - 8) // 4,)
    assert np.from_dlpack(v).shape == v.shape
    assert buf.view("uint8").shape == (1001,)
    s = buf.view("float64", shape=())  # 0-d
    assert np.from_dlpack(s).shape == ()


def test_legacy_and_versioned_capsules(buf: GrowableBuffer) -> None:
    view = buf.view("float32", shape=(4, 8), offset=64)
    np.from_dlpack(view)[...] = np.arange(32, dtype=np.float32).reshape(4, 8)
    legacy = view.__dlpack__(max_version=None)
    versioned = view.__dlpack__(max_version=(1, 0))
    assert "dltensor" in repr(legacy) and "dltensor_versioned" not in repr(legacy)
    assert "dltensor_versioned" in repr(versioned)
    assert "dltensor_versioned" in repr(view.__dlpack__(max_version=(1, 3)))
    assert "dltensor_versioned" not in repr(view.__dlpack__(max_version=(0, 8)))

    m = DLManagedTensor.from_address(_get_pointer(legacy, b"dltensor"))
    mv = DLManagedTensorVersioned.from_address(_get_pointer(versioned, b"dltensor_versioned"))
    assert DLManagedTensorVersioned.dl_tensor.offset == 32
    assert (mv.version.major, mv.version.minor, mv.flags) == (1, 0, 0)
    for t in (m.dl_tensor, mv.dl_tensor):
        assert t.data == buf.ptr + 64 and t.byte_offset == 0
        assert (t.device.device_type, t.device.device_id) == (1, 0)
        assert (t.ndim, t.dtype.code, t.dtype.bits, t.dtype.lanes) == (2, 2, 32, 1)
        assert [t.shape[0], t.shape[1], t.strides[0], t.strides[1]] == [4, 8, 8, 1]

    for cap in (legacy, versioned):
        a = np.from_dlpack(Capsule(cap))
        assert np.array_equal(a, np.arange(32, dtype=np.float32).reshape(4, 8))
        assert "used_dltensor" in repr(cap)  # the consumer took it over
        del a


def test_unconsumed_capsule_is_freed_once(buf: GrowableBuffer) -> None:
    view = buf.view("uint8")
    start = export_stats()
    cap = view.__dlpack__(max_version=(1, 0))
    assert view.exports == 1
    assert export_stats()["live"] == start["live"] + 1
    del cap
    stats = export_stats()
    assert stats["deleter_calls"] - start["deleter_calls"] == 1
    assert stats["released"] - start["released"] == 1
    assert stats["live"] == start["live"]
    assert view.exports == 0


def test_consumed_capsule_deleter_runs_once_when_the_array_goes(buf: GrowableBuffer) -> None:
    view = buf.view("int64")
    start = export_stats()
    a = np.from_dlpack(view)
    gc.collect()
    assert export_stats()["deleter_calls"] == start["deleter_calls"]  # capsule consumed, not freed
    assert view.exports == 1
    del a
    gc.collect()
    stats = export_stats()
    assert stats["deleter_calls"] - start["deleter_calls"] == 1
    assert stats["released"] - start["released"] == 1
    assert view.exports == 0


def test_a_second_deleter_call_does_nothing(buf: GrowableBuffer) -> None:
    view = buf.view("uint8")
    start = export_stats()
    cap = view.__dlpack__()
    m = DLManagedTensor.from_address(_get_pointer(cap, b"dltensor"))
    assert _set_name(cap, b"used_dltensor") == 0  # what a consumer does
    address = ctypes.addressof(m)
    m.deleter(address)
    m.deleter(address)  # a buggy consumer
    del cap, m
    stats = export_stats()
    assert stats["deleter_calls"] - start["deleter_calls"] == 2
    assert stats["released"] - start["released"] == 1
    assert view.exports == 0


def test_deleter_from_another_thread(buf: GrowableBuffer) -> None:
    start = export_stats()
    holder = [np.from_dlpack(buf.view("float32")), buf.view("uint8").__dlpack__()]
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    stats = export_stats()
    assert stats["released"] - start["released"] == 2
    assert stats["live"] == start["live"]


def test_del_buffer_while_an_array_uses_it(host: vmmpool.Device) -> None:
    data = np.arange(MiB // 8, dtype=np.float64)
    b = GrowableBuffer(max_size=4 * MiB, device=host, initial_size=MiB)
    b.write(data)
    a: Any = np.from_dlpack(b.view("float64"))
    c: Any = np.asarray(b.view("float64"))
    del b
    gc.collect()
    assert np.array_equal(a, data) and np.array_equal(c, data)  # still mapped, still right
    a += 1
    assert np.array_equal(c, data + 1)
    assert host.counters().live != (0, 0, 0)
    del a, c
    gc.collect()
    assert host.counters().live == (0, 0, 0)  # the last array took the buffer with it


def test_capsule_rejected_by_a_consumer_with_its_error_pending(
    buf: GrowableBuffer, caplog: pytest.LogCaptureFixture
) -> None:
    """NumPy drops a CUDA capsule while its own error is set: the export must still be freed."""
    view = buf.view("float32")
    start = export_stats()
    producer = Capsule(_dlpack._new_capsule(view, view.ptr, (2, 0), (2, 32, 1), view.shape, [1], True))
    with caplog.at_level(logging.WARNING, logger="vmmpool"):
        with pytest.raises((SystemError, BufferError, RuntimeError)):
            np.from_dlpack(producer)  # holds the only reference to the capsule
    stats = export_stats()
    assert stats["released"] - start["released"] == 1
    assert view.exports == 0
    assert "exception was pending" in caplog.text


def test_exports_at_interpreter_shutdown_are_left_alone() -> None:
    code = textwrap.dedent(
        """
        import numpy as np, vmmpool
        from vmmpool._buffer import GrowableBuffer
        dev = vmmpool.Device.emulated(capacity=8 << 20)
        buf = GrowableBuffer(max_size=4 << 20, device=dev, initial_size=1 << 20)
        a = np.from_dlpack(buf.view("float32"))     # consumed, alive at exit
        cap = buf.view("int8").__dlpack__()           # unconsumed, alive at exit
        vcap = buf.view("int8").__dlpack__(max_version=(1, 0))
        a[:] = 1.0
        del buf
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-W", "error", "-X", "dev", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "ok", "")


def test_at_exit_the_deleter_of_an_export_still_held_is_null() -> None:
    # A C or C++ consumer may keep a tensor past Py_Finalize and call its deleter then: the
    # ctypes callback could not run. At exit (atexit) the deleter of each export still held
    # becomes NULL, which DLPack allows and consumers check. The check below is registered
    # before vmmpool is imported, so it runs after vmmpool's own exit handler.
    code = textwrap.dedent(
        """
        import atexit, ctypes
        held = []
        def look():
            for addr, off in held:
                ptr = ctypes.c_void_p.from_address(addr + off).value
                print("deleter", "null" if not ptr else "set")
        atexit.register(look)
        import numpy as np, vmmpool
        from vmmpool._buffer import GrowableBuffer
        from vmmpool._dlpack import DLManagedTensor, DLManagedTensorVersioned
        getp = ctypes.pythonapi.PyCapsule_GetPointer
        getp.restype, getp.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        setn = ctypes.pythonapi.PyCapsule_SetName
        setn.argtypes = [ctypes.py_object, ctypes.c_char_p]
        used = [ctypes.create_string_buffer(n) for n in (b"used_dltensor", b"used_dltensor_versioned")]
        dev = vmmpool.Device.emulated(capacity=8 << 20)
        buf = GrowableBuffer(max_size=4 << 20, device=dev, initial_size=1 << 20)
        for i, (name, cls) in enumerate(((b"dltensor", DLManagedTensor),
                                         (b"dltensor_versioned", DLManagedTensorVersioned))):
            cap = buf.view("int8").__dlpack__(max_version=(1, 0) if i else None)
            held.append((getp(cap, name), cls.deleter.offset))
            setn(cap, used[i])  # taken by a consumer that never lets go
            del cap
        vmmpool._dlpack._disarm()  # as at exit; an export made after it has no deleter either
        cap = buf.view("int8").__dlpack__(max_version=(1, 0))
        held.append((getp(cap, b"dltensor_versioned"), DLManagedTensorVersioned.deleter.offset))
        setn(cap, used[1])
        del cap
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-W", "error", "-X", "dev", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert (run.returncode, run.stdout.split(), run.stderr) == (
        0, ["ok"] + ["deleter", "null"] * 3, ""
    )


# ------------------------------------------------------------------ validation
def test_dlpack_device_and_interfaces_on_host(buf: GrowableBuffer) -> None:
    view = buf.view("float32")
    assert view.__dlpack_device__() == (1, 0)
    assert hasattr(view, "__array_interface__")
    assert not hasattr(view, "__cuda_array_interface__")
    with pytest.raises(AttributeError, match="use __array_interface__ or DLPack"):
        view.__cuda_array_interface__  # noqa: B018
    desc = view.__array_interface__
    assert desc == {
        "shape": view.shape,
        "typestr": "<f4",
        "data": (buf.ptr, False),
        "strides": None,
        "version": 3,
    }


def test_unsupported_requests_raise_buffer_error(buf: GrowableBuffer) -> None:
    view = buf.view("uint8")
    with pytest.raises(BufferError, match=r"cannot export to dl_device \(2, 0\)"):
        view.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError, match="stream must be None for host memory"):
        view.__dlpack__(stream=1)
    with pytest.raises(TypeError, match="stream must be None or an int"):
        view.__dlpack__(stream="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_version must be a"):
        view.__dlpack__(max_version=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="copy must be None, True or False"):
        view.__dlpack__(copy=1)  # type: ignore[arg-type]
    start = export_stats()["exported"]
    view.__dlpack__(copy=False, dl_device=(1, 0), stream=None)  # accepted
    assert export_stats()["exported"] == start + 1


def test_stream_values_for_cuda_memory() -> None:
    for ok in (None, -1, 1, 2, 3, 1 << 40):
        _dlpack._check_stream(ok, 2)
    for bad in (0, -2):
        with pytest.raises(BufferError, match="stream must be None, -1, 1"):
            _dlpack._check_stream(bad, 2)
    with pytest.raises(TypeError):
        _dlpack._check_stream(True, 2)


@pytest.mark.parametrize("dtype", ["float128", ">f4", "U2", "O", [("a", "i4")], "datetime64[s]"])
def test_unsupported_dtypes(buf: GrowableBuffer, dtype: Any) -> None:
    if dtype == "float128" and not hasattr(np, "float128"):
        pytest.skip("no float128 here")
    with pytest.raises(ValueError, match="dtype must be"):
        buf.view(dtype)


def test_dlpack_dtype_codes() -> None:
    assert _dlpack.dlpack_dtype("bool") == (6, 8, 1)
    assert _dlpack.dlpack_dtype(np.int16) == (0, 16, 1)
    assert _dlpack.dlpack_dtype("u8") == (1, 64, 1)
    assert _dlpack.dlpack_dtype("float16") == (2, 16, 1)
    assert _dlpack.dlpack_dtype("complex128") == (5, 128, 1)
    with pytest.raises(TypeError, match="dtype must be a NumPy dtype"):
        _dlpack.dlpack_dtype("no such type")


def test_view_of_any_owner(host: vmmpool.Device) -> None:
    """The generic constructor, as pool allocations use it."""
    mem = (ctypes.c_int32 * 8)(*range(8))

    class Owner:
        closed = False

    owner = Owner()
    v = ArrayView(owner, host, ctypes.addressof(mem), ctypes.sizeof(mem), "int32", (2, 3), offset=8)
    assert v.owner is owner
    assert np.from_dlpack(v).tolist() == [[2, 3, 4], [5, 6, 7]]
    assert "int32[2, 3]" in repr(v)
    owner.closed = True
    with pytest.raises(BufferError, match="Owner has been closed") as info:
        v.__dlpack__()
    assert isinstance(info.value, vmmpool.ClosedError)

    class Allocation:  # a pool allocation says "freed"
        freed = True

    w = ArrayView(Allocation(), host, ctypes.addressof(mem), ctypes.sizeof(mem), "int32")
    with pytest.raises(BufferError, match="Allocation has been closed"):
        w.__array_interface__  # noqa: B018
    with pytest.raises(TypeError, match=r"device must be a vmmpool\.Device"):
        ArrayView(owner, "host", 0, 0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cupy_kernel_writes_are_seen_through_the_buffer_and_cai() -> None:
    dev = cuda_device_or_skip(0)
    cp = pytest.importorskip("cupy")
    n = 1 << 20
    with GrowableBuffer(max_size=64 * MiB, device=dev, initial_size=4 * n) as buf:
        buf.write(np.arange(n, dtype=np.float32))
        view = buf.view("float32")
        assert view.__dlpack_device__() == (2, dev.ordinal)
        assert not hasattr(view, "__array_interface__")
        x = cp.from_dlpack(view)  # versioned capsule, consumer's stream
        x += 1  # a kernel on the mapped pages
        cp.cuda.Device(dev.ordinal).synchronize()
        assert np.array_equal(np.frombuffer(buf.read(), np.float32), np.arange(n) + 1)
        y = cp.asarray(view)  # __cuda_array_interface__
        assert y.data.ptr == buf.ptr
        y *= 2
        cp.cuda.Device(dev.ordinal).synchronize()
        assert float(x[3]) == 8.0
        del x, y, view


@pytest.mark.cuda
def test_torch_and_cupy_share_the_buffer() -> None:
    dev = cuda_device_or_skip(0)
    cp = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    with GrowableBuffer(max_size=64 * MiB, device=dev, initial_size=MiB) as buf:
        t = torch.from_dlpack(buf.view("int32", shape=(256, 1024)))
        assert t.device.type == "cuda" and t.data_ptr() == buf.ptr
        t.fill_(41)
        t += 1  # torch kernels
        torch.cuda.synchronize(dev.ordinal)
        c = cp.from_dlpack(buf.view("int32", shape=(256, 1024)))
        assert int(c.sum()) == 42 * 256 * 1024  # read back through CuPy
        legacy = torch.utils.dlpack.from_dlpack(buf.view("int32").__dlpack__())  # legacy capsule
        assert int(legacy[0]) == 42
        del t, c, legacy


# ------------------------------------------------------- the buffer itself (issue 21)
def test_numpy_takes_the_buffer_itself_as_bytes(buf: GrowableBuffer) -> None:
    """np.from_dlpack(buf) and np.asarray(buf): a zero-copy uint8 view of the current size."""
    buf.write(b"abc", offset=5)
    for a in (np.from_dlpack(buf), np.asarray(buf)):
        assert (a.dtype, a.shape) == (np.uint8, (buf.size,))  # not a 0-d object array
        assert a.ctypes.data == buf.ptr
        assert bytes(a[5:8]) == b"abc"
        a[0] = 7
        assert bytes(buf.read(1)) == b"\x07"  # shared, not copied
    a = np.asarray(buf)
    with pytest.raises(BufferError, match="live view"):
        buf.resize(0)  # the array keeps its bytes mapped, as any view's does
    copied = np.asarray(buf, copy=True)
    assert copied.ctypes.data != buf.ptr and np.array_equal(copied, a)
    as_f32 = np.asarray(buf, dtype="float32")  # a cast: a copy of the values
    assert as_f32.dtype == np.float32 and as_f32.shape == (buf.size,) and as_f32[0] == 7
    with pytest.raises(ValueError, match=r"a cast copies; use buf\.view"):
        np.asarray(buf, dtype="float32", copy=False)
    del a
    buf.resize(0)
    assert np.asarray(buf).shape == (0,)
    buf.close()
    with pytest.raises(vmmpool.ClosedError):
        np.asarray(buf)
    with pytest.raises(vmmpool.ClosedError):
        np.from_dlpack(buf)
    with pytest.raises(BufferError, match="GrowableBuffer has been closed"):
        np.from_dlpack(buf)  # the DLPack convention: BufferError when it cannot export


def test_a_closed_buffer_and_its_views_refuse_dlpack_alike(device: vmmpool.Device) -> None:
    # GrowableBuffer.__dlpack__ raised ClosedError (a ValueError) after close(), while a view
    # of the same closed buffer raised BufferError (the DLPack convention): a consumer had to
    # catch both. Both now raise one error that is each.
    buf = GrowableBuffer(max_size=device.granularity, device=device, initial_size=64)
    v = buf.view("uint8")
    buf.close()  # deferred: the view keeps the memory mapped
    assert buf.closed
    for obj in (buf, v):
        # Where the memory is stays answerable (as buf.device is); __dlpack__ is what refuses.
        assert obj.__dlpack_device__() == device.dlpack_device
        for kwargs in ({}, {"max_version": (1, 0)}):
            with pytest.raises(vmmpool.ClosedError, match="GrowableBuffer has been closed") as info:
                obj.__dlpack__(**kwargs)
            err = info.value
            assert isinstance(err, BufferError) and not isinstance(err, vmmpool.ForkedError)
            back = pickle.loads(pickle.dumps(err))
            assert type(back) is type(err) and str(back) == str(err) and back.what == "GrowableBuffer"
    with pytest.raises(vmmpool.ClosedError):
        buf.view()  # view() itself is no DLPack export: a plain ClosedError, as before
    assert v.exports == 0
    del v
    gc.collect()


def test_numpy_refuses_a_buffer_on_a_cuda_device_clearly(device: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=8 * MiB, device=device, initial_size=MiB) as b:
        assert b.__dlpack_device__() == device.dlpack_device
        if device.is_host:
            assert np.asarray(b).nbytes == MiB
        else:
            with pytest.raises(TypeError, match=r"needs host memory, but this buffer is on .*from_dlpack"):
                np.asarray(b)


def test_an_empty_view_exports_a_null_cuda_array_interface_pointer(device: vmmpool.Device) -> None:
    """CUDA Array Interface v3: "For zero-size arrays, use 0 here" (an empty view's address may
    lie past the last mapped page, or in a range that maps nothing at all)."""
    g = device.granularity
    with GrowableBuffer(max_size=2 * g, device=device) as b:
        views = [b.view()]  # size 0: nothing mapped
        b.resize(g)
        views += [b.view(offset=g), b.view("float32", shape=(0, 3))]
        for v in views:
            if device.is_host:
                assert v.__array_interface__["data"] == (v.ptr, False)
            else:
                assert v.__cuda_array_interface__["data"] == (0, False)
        full = b.view()
        if not device.is_host:
            assert full.__cuda_array_interface__["data"] == (b.ptr, False)
        del views, v, full
        gc.collect()


# ------------------------------------------------------------ hostile review (dlpack)
_set_destructor = ctypes.pythonapi.PyCapsule_SetDestructor
_set_destructor.restype = ctypes.c_int
_set_destructor.argtypes = [ctypes.py_object, ctypes.c_void_p]


@pytest.mark.parametrize("versioned", [False, True])
def test_a_consumer_that_clears_the_destructor_leaves_no_record(
    buf: GrowableBuffer, versioned: bool
) -> None:
    # JAX renames the capsule and sets its destructor to NULL as it takes it: the
    # capsule's record (keyed by its id) was then never dropped, one per export.
    records = len(_dlpack._capsules)
    view = buf.view("uint8")
    name = b"dltensor_versioned" if versioned else b"dltensor"
    for _ in range(3):
        cap = view.__dlpack__(max_version=(1, 0) if versioned else None)
        address = _get_pointer(cap, name)
        m: Any = (DLManagedTensorVersioned if versioned else DLManagedTensor).from_address(address)
        assert _set_name(cap, b"used_" + name) == 0
        assert _set_destructor(cap, None) == 0
        del cap
        m.deleter(address)
        del m
    assert len(_dlpack._capsules) == records
    assert view.exports == 0


def test_a_capsule_kept_after_its_deleter_ran_is_released_once(buf: GrowableBuffer) -> None:
    view = buf.view("uint8")
    start = export_stats()
    cap = view.__dlpack__()
    address = _get_pointer(cap, b"dltensor")
    m = DLManagedTensor.from_address(address)
    assert _set_name(cap, b"used_dltensor") == 0
    m.deleter(address)  # the consumer is done, the capsule object lives on
    del m
    assert view.exports == 0
    del cap  # its destructor finds nothing more to do
    stats = export_stats()
    assert stats["released"] - start["released"] == 1
    assert stats["live"] == start["live"]


@pytest.mark.parametrize(
    "shape", [(2**64 - 1, 0), (2**63, 0), (0, 2**40, 2**40), (0, 2**62, 2)]
)
def test_shapes_beyond_int64_are_refused(buf: GrowableBuffer, shape: tuple[int, ...]) -> None:
    # DLPack's shape and strides are int64: these were exported wrapped (NumPy raised
    # SystemError, JAX read a dimension of -1 or -2**63).
    with pytest.raises(ValueError, match=r"too large.*2\*\*63 - 1"):
        buf.view("float32", shape=shape)


def test_the_largest_empty_shape_exports_exactly(buf: GrowableBuffer) -> None:
    dim = ((1 << 63) - 1) // 4
    view = buf.view("float32", shape=(dim, 0))
    cap = view.__dlpack__()
    m = DLManagedTensor.from_address(_get_pointer(cap, b"dltensor"))
    t = m.dl_tensor
    assert (t.shape[0], t.shape[1]) == (dim, 0)
    assert (t.strides[0], t.strides[1]) == (1, 1)
    del m, cap


@pytest.mark.parametrize(
    "dl_device",
    [(1.7, 0), "10", (1, 0, 5), (1,), (True, 0), 1, None.__class__, [1, "0"], (np.True_, 0),
     (np.array([1, 2]), 0)],
)
def test_dl_device_must_be_two_ints(buf: GrowableBuffer, dl_device: Any) -> None:
    # (1.7, 0) and "10" were read as (1, 0) and accepted; (1, 0, 5) too.
    view = buf.view("uint8")
    start = export_stats()
    with pytest.raises(TypeError, match=r"dl_device must be a \(device_type, device_id\) tuple of two ints"):
        view.__dlpack__(dl_device=dl_device)
    assert export_stats() == start
    assert view.exports == 0


def test_dl_device_accepts_int_likes(buf: GrowableBuffer) -> None:
    import enum

    class DLDeviceType(enum.IntEnum):
        kDLCPU = 1

    view = buf.view("uint8")
    for dl_device in ((DLDeviceType.kDLCPU, 0), [1, 0], (np.int32(1), np.int64(0))):
        a = np.from_dlpack(Capsule(view.__dlpack__(dl_device=dl_device)))
        assert a.ctypes.data == view.ptr
        del a


def test_shape_as_a_numpy_array(buf: GrowableBuffer) -> None:
    view = buf.view("float32", shape=np.array([4, 8]))
    assert view.shape == (4, 8) and all(type(d) is int for d in view.shape)
    assert buf.view("float32", shape=np.int64(5)).shape == (5,)
    with pytest.raises(TypeError, match="shape must be an int or a sequence of ints"):
        buf.view("float32", shape=np.ones((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="shape entry must be an int"):
        buf.view("float32", shape=np.array([2.0, 2.0]))


# ------------------------------------------------------ hostile review (dlpack, views)
def test_a_views_range_and_type_are_read_only(host: vmmpool.Device) -> None:
    # `view.shape = (8, 8)` reads like NumPy's in-place reshape; it was accepted and the
    # export then read strides past its one-entry array, or (a larger shape) reached the
    # next allocation's bytes, which could then be freed under the array.
    with vmmpool.PagePool(host, limit=16 * MiB) as pool:
        a = pool.malloc(256)
        v = a.view("float32")
        for name, value in [("shape", (8, 8)), ("ptr", v.ptr + 256), ("offset", 4), ("dtype", np.dtype("f8")),
                            ("strides", (4, 4)), ("owner", None), ("device", host)]:
            with pytest.raises(AttributeError, match=f"ArrayView.{name} is read-only"):
                setattr(v, name, value)
            with pytest.raises(AttributeError, match=f"ArrayView.{name} is read-only"):
                delattr(v, name)
        assert v.shape == (64,) and v.owner is a
        assert np.from_dlpack(v).shape == (64,)
        del v
        gc.collect()
        a.free()


def test_more_than_64_dimensions_are_refused_when_the_view_is_made(buf: GrowableBuffer) -> None:
    # NumPy took the capsule, then refused it with its error pending: a SystemError.
    assert np.from_dlpack(buf.view("uint8", shape=(1,) * 64)).ndim == 64
    with pytest.raises(ValueError, match=r"at most 64 dimensions .* got 65"):
        buf.view("uint8", shape=(1,) * 65)


@pytest.mark.parametrize("versioned", [False, True])
def test_copy_true_exports_a_host_copy(buf: GrowableBuffer, versioned: bool) -> None:
    data = np.arange(12, dtype=np.float32)
    buf.write(data)
    view = buf.view("float32", shape=(3, 4))
    start = export_stats()
    cap = view.__dlpack__(copy=True, max_version=(1, 0) if versioned else None)
    assert view.exports == 0  # the capsule owns a copy, not the view's memory
    if versioned:
        m = DLManagedTensorVersioned.from_address(_get_pointer(cap, b"dltensor_versioned"))
        assert m.flags == 2  # DLPACK_FLAG_BITMASK_IS_COPIED
        del m
    del cap
    c = np.from_dlpack(view, copy=True)
    assert np.array_equal(c, data.reshape(3, 4)) and c.flags.writeable
    c[:] = -1
    assert np.array_equal(np.frombuffer(buf.read(48), np.float32), data)  # not shared
    assert np.from_dlpack(buf.view("float32", shape=(0, 3)), copy=np.True_).shape == (0, 3)
    del c
    gc.collect()
    stats = export_stats()
    assert stats["exported"] - start["exported"] == stats["released"] - start["released"] == 3


def test_a_view_in_cuda_memory_exports_a_host_copy_and_refuses_asarray(device: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=8 * MiB, device=device, initial_size=MiB) as b:
        data = np.arange(16, dtype=np.int32)
        b.write(data)
        v = b.view("int32", shape=(4, 4))
        syncs = device.counters().calls.get("synchronize", 0)
        c = np.from_dlpack(v, device="cpu")  # dl_device=(1, 0), copy=None: a host copy
        assert np.array_equal(c, data.reshape(4, 4))
        # A copy to the host waits for the memory's work first (the array API standard asks the
        # producer to synchronize); on the host emulator there is nothing to copy.
        assert device.counters().calls.get("synchronize", 0) - syncs == (0 if device.is_host else 1)
        if device.is_host:
            assert np.shares_memory(c, np.asarray(v))
        else:
            with pytest.raises(BufferError, match="with copy=False"):
                v.__dlpack__(dl_device=(1, 0), copy=False)
            with pytest.raises(BufferError, match=r"copy=True on .* not supported"):
                v.__dlpack__(copy=True)
            with pytest.raises(BufferError, match="stream must be None for host memory"):
                v.__dlpack__(dl_device=(1, 0), stream=1)
            # NumPy made a 0-d object array holding the view.
            with pytest.raises(TypeError, match="needs host memory, but this view is on"):
                np.asarray(v)
            assert v.exports == 0
        del c, v
        gc.collect()


def test_argument_errors_show_what_was_given(buf: GrowableBuffer) -> None:
    view = buf.view()
    with pytest.raises(TypeError, match=r"got tuple \(-1, 0\)"):
        view.__dlpack__(max_version=(-1, 0))
    with pytest.raises(TypeError, match=r"got tuple \(1,\)"):
        view.__dlpack__(max_version=(1,))
    with pytest.raises(TypeError, match=r"got int 1"):
        view.__dlpack__(copy=1)  # type: ignore[arg-type]
    assert np.from_dlpack(view, copy=np.False_).size == view.size  # NumPy passes copy as given

"""The CUDA backend through the real ``cuda.bindings`` on the stand-in driver.

Collected only in the stand-in run (``test_standin_suite.py`` starts it with
``--device-kind=cuda-standin``); each test takes the ``standin`` fixture, the
driver's control functions. Some run twice, under the stand-in's default
answers and under its other documented ones (``STANDIN_CUDA_*``, read here to
know which answer to expect).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

import pytest
from conftest import StandinDriver

import vmmpool
from vmmpool import Access, DriverError, OutOfMemoryError
from vmmpool._backends import cuda as _cuda

RDMA = os.environ.get("STANDIN_CUDA_RDMA", "0") == "1"
POSIX_FD_REFUSED = os.environ.get("STANDIN_CUDA_POSIX_FD", "yes") == "refuse"

CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_UNKNOWN = 999


def _in_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on a fresh thread (no context current there) and re-raise its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def test_backend_is_the_real_bindings_on_the_standin(standin: StandinDriver) -> None:
    dev = vmmpool.Device(0)
    assert dev.kind == "cuda"
    assert dev.name == "vmmpool stand-in GPU 0"  # the binding's "name, NUL, spaces" decoded
    assert dev.granularity == 2 << 20
    before = standin.calls("cuMemAddressReserve")
    with vmmpool.reserve(dev.granularity, dev):
        pass
    assert standin.calls("cuMemAddressReserve") == before + 1


def test_injected_driver_failures_are_translated(standin: StandinDriver, device: vmmpool.Device) -> None:
    g = device.granularity
    b = device._backend
    standin.fail("cuMemCreate", CUDA_ERROR_OUT_OF_MEMORY)
    with pytest.raises(OutOfMemoryError, match="out of memory"):
        b.create(g)
    standin.fail("cuMemAddressReserve", CUDA_ERROR_UNKNOWN, nth=2)
    a = b.reserve(g)
    with pytest.raises(DriverError) as err:
        b.reserve(g)
    assert (err.value.name, err.value.status, err.value.operation) == ("CUDA_ERROR_UNKNOWN", 999, "reserve")
    h = b.create(g)
    standin.fail("cuMemMap", CUDA_ERROR_INVALID_VALUE)
    live = device.counters().live
    with pytest.raises(DriverError, match="CUDA_ERROR_INVALID_VALUE"):
        b.map(a, g, h)
    assert device.counters().live == live  # a failed map changes nothing
    b.release(h)
    b.free_address(a, g)


def test_a_failed_driver_call_inside_a_growth_leaves_the_buffer_as_it_was(
    standin: StandinDriver, device: vmmpool.Device
) -> None:
    g = device.granularity
    with vmmpool.GrowableBuffer(max_size=8 * g, device=device, initial_size=g) as buf:
        buf.write(b"kept")
        size = buf.size
        standin.fail("cuMemSetAccess", CUDA_ERROR_UNKNOWN)
        with pytest.raises(DriverError, match="CUDA_ERROR_UNKNOWN"):
            buf.resize(4 * g)
        assert buf.size == size
        assert buf.read(4) == b"kept"


def test_write_and_read_use_the_owning_devices_context(standin: StandinDriver) -> None:
    # Another device's context is current on the thread: the copy must still
    # run as device 1, which alone has access (multi-GPU).
    dev0, dev1 = vmmpool.Device(0), vmmpool.Device(1)
    g = dev1.granularity

    def body() -> None:
        dev0._backend.mem_info()  # makes device 0's primary context current here
        b = dev1._backend
        a = b.reserve(g)
        h = b.create(g)
        try:
            b.map(a, g, h)
            try:
                b.set_access(a, g, Access.READWRITE, [1])
                dev1.write(a, b"device one")
                assert dev1.read(a, 10) == b"device one"
            finally:
                b.unmap(a, g)
        finally:
            b.release(h)
            b.free_address(a, g)
        drv = _cuda._driver()
        err, ctx = drv.cuCtxGetCurrent()
        assert int(err) == 0
        assert int(ctx) == int(dev0._backend._pctx)  # pushes and pops balanced

    _in_thread(body)


def test_gpudirect_rdma_is_requested_where_supported(standin: StandinDriver, device: vmmpool.Device) -> None:
    drv = _cuda._driver()
    with vmmpool.create(device.granularity, device) as a:
        assert standin.handle_flags(a.handle) & 2 == (2 if RDMA else 0)
        err, prop = drv.cuMemGetAllocationPropertiesFromHandle(a.handle)
        assert int(err) == 0
        assert int(prop.allocFlags.gpuDirectRDMACapable) == int(RDMA)


def test_posix_fd_allocation_falls_back_when_the_handle_type_is_refused(
    standin: StandinDriver, device: vmmpool.Device
) -> None:
    g = device.granularity
    if POSIX_FD_REFUSED and not device.supports_posix_fd:
        # An earlier test here already met the refusal: refused up front now.
        with pytest.raises(ValueError, match="does not support POSIX file descriptor"):
            vmmpool.create(g, device, handle_type="posix_fd")
        return
    assert device.supports_posix_fd  # the attribute says 1 in both modes
    with vmmpool.create(g, device, handle_type="posix_fd") as a:
        if POSIX_FD_REFUSED:
            assert standin.handle_flags(a.handle) & 1 == 0  # created without the handle type
            with pytest.raises(DriverError, match="refused the POSIX fd handle type") as err:
                a.export()
            assert err.value.name == "CUDA_ERROR_NOT_PERMITTED"
            assert not device.supports_posix_fd
        else:
            assert standin.handle_flags(a.handle) & 1
            fd = a.export()
            try:
                with vmmpool.PhysicalAllocation.from_fd(fd, g, device) as b:
                    assert b.handle != a.handle
            finally:
                os.close(fd)
        with vmmpool.reserve(g, device) as res:
            m = res.map(a)
            m.set_access("rw")
            device.write(m.address, b"usable either way")
            assert device.read(m.address, 17) == b"usable either way"
    if POSIX_FD_REFUSED:
        with pytest.raises(ValueError, match="does not support POSIX file descriptor"):
            vmmpool.create(g, device, handle_type="posix_fd")


def test_shareable_pools_and_buffers_check_the_handle_type_up_front(
    standin: StandinDriver, device: vmmpool.Device
) -> None:
    g = device.granularity
    if POSIX_FD_REFUSED:
        # The attribute says 1 but cuMemCreate refuses: the probe (a real
        # cuMemCreate) finds out at construction, not at share().
        with pytest.raises(ValueError, match="POSIX file descriptor"):
            vmmpool.PagePool(device, shareable=True)
        with pytest.raises(ValueError, match="POSIX file descriptor"):
            vmmpool.GrowableBuffer(max_size=4 * g, device=device, shareable=True)
        return
    with vmmpool.PagePool(device, shareable=True) as pool:
        a = pool.malloc(g + 4096)
        with a.share() as h:
            assert h.n_pages == 2
            for phys in pool._core.pages:
                assert standin.handle_flags(phys.handle) & 1  # requested POSIX_FILE_DESCRIPTOR
        a.free()


def test_streams_and_events_through_the_bindings(standin: StandinDriver, device: vmmpool.Device) -> None:
    # The pool's event-ordered reuse needs these; the stand-in completes work at once.
    drv = _cuda._driver()
    b = device._backend
    b.mem_info()  # a context is current on this thread from here on
    err, stream = drv.cuStreamCreate(0)
    assert int(err) == 0
    try:
        b.synchronize(int(stream))
        b.synchronize(None)
        err, event = drv.cuEventCreate(0)
        assert int(err) == 0
        try:
            assert drv.cuEventRecord(event, stream) == (drv.CUresult.CUDA_SUCCESS,)
            assert drv.cuEventQuery(event) == (drv.CUresult.CUDA_SUCCESS,)
            assert drv.cuEventSynchronize(event) == (drv.CUresult.CUDA_SUCCESS,)
        finally:
            assert drv.cuEventDestroy(event) == (drv.CUresult.CUDA_SUCCESS,)
        standin.fail("cuStreamSynchronize", CUDA_ERROR_UNKNOWN)
        with pytest.raises(DriverError, match="CUDA_ERROR_UNKNOWN"):
            b.synchronize(int(stream))
    finally:
        assert drv.cuStreamDestroy(stream) == (drv.CUresult.CUDA_SUCCESS,)
    assert standin.calls("cuEventDestroy") >= 1


def test_a_peer_devices_stream_takes_events_in_its_own_context(
    standin: StandinDriver, device: vmmpool.Device
) -> None:
    # The stand-in refuses cuEventRecord across contexts, as the driver documents.
    from vmmpool._backends.cuda import CudaBackend

    if _cuda.device_count() < 2:
        pytest.skip("needs the stand-in's second device")
    peer = CudaBackend(1)
    try:
        s1 = peer.stream_create()
        try:
            pool = vmmpool.PagePool(device, limit=2 * device.granularity, peers=[1])
            a = pool.malloc(2 * device.granularity, stream=s1)
            pool.free(a)
            b = pool.malloc(2 * device.granularity, stream=0)  # records an event on s1 first
            pool.free(b)
            assert pool.trim() == 2 * device.granularity
            pool.close()
        finally:
            peer.stream_destroy(s1)
    finally:
        peer.close()
    assert standin.calls("cuStreamGetCtx") >= 1


def test_notebook_01s_raw_cuda_bindings_cell_runs(standin: StandinDriver, device: vmmpool.Device) -> None:
    """Notebook 01's "the same in raw cuda.bindings" cell, run as the notebook runs it on a GPU."""
    import contextlib
    import io
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        from build_notebooks import cells_of
    finally:
        sys.path.pop(0)
    src = (root / "notebooks" / "src" / "01_vmm_basics.py").read_text()
    (cell,) = [body for kind, body in cells_of(src) if kind == "code" and "def raw_vmm_round_trip" in body]
    names = ["cuMemGetAllocationGranularity", "cuMemAddressReserve", "cuMemCreate", "cuMemMap",
             "cuMemSetAccess", "cuMemUnmap", "cuMemRelease", "cuMemAddressFree"]
    calls = {n: standin.calls(n) for n in names}
    live = standin.live()[:4]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(cell, "01_vmm_basics raw cell", "exec"), {"vmmpool": vmmpool, "__name__": "__main__"})
    assert out.getvalue() == (
        f"granularity: {device.granularity} bytes; read back at the new address: b'moved, not copied'\n"
    )
    made = {n: standin.calls(n) - calls[n] for n in names}
    assert made == {"cuMemGetAllocationGranularity": 1, "cuMemAddressReserve": 1, "cuMemCreate": 1,
                    "cuMemMap": 2, "cuMemSetAccess": 2, "cuMemUnmap": 2, "cuMemRelease": 1,
                    "cuMemAddressFree": 1}
    assert standin.live()[:4] == live  # nothing left behind


def test_sleep_pins_one_staging_buffer_and_copies_on_the_stream(
    standin: StandinDriver, device: vmmpool.Device
) -> None:
    """Issue 18: cuMemHostAlloc once for two sleeps, async copies both ways, everything freed."""
    standin.lib.standin_live_host.restype = ctypes.c_long
    g = device.granularity
    pool = vmmpool.PagePool(device, limit=8 * g)
    a = pool.malloc(3 * g)
    data = bytes(range(256)) * 64
    device.write(a.ptr, data)
    pinned = standin.calls("cuMemHostAlloc")
    d2h, h2d = standin.calls("cuMemcpyDtoHAsync"), standin.calls("cuMemcpyHtoDAsync")
    for _ in range(2):
        pool.sleep()
        assert standin.live()[1] == 0  # the driver holds no allocation of ours
        pool.wake()
        assert bytes(device.read(a.ptr, len(data))) == data
    assert standin.calls("cuMemHostAlloc") == pinned + 1  # reused by the second sleep
    assert standin.calls("cuMemcpyDtoHAsync") > d2h and standin.calls("cuMemcpyHtoDAsync") > h2d
    assert standin.lib.standin_live_host() == 1
    a.free()
    pool.close()
    assert standin.lib.standin_live_host() == 0
    standin.fail("cuMemHostAlloc", CUDA_ERROR_OUT_OF_MEMORY)
    with pytest.raises(OutOfMemoryError):
        device._backend.host_alloc(4096)

"""The Pythonic VMM objects: data round trips, lifetimes, bad input."""

from __future__ import annotations

import gc
import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import vmmpool
from vmmpool import Access, ClosedError, Device
from vmmpool._errors import ExportAsleepError, ExportClosedError

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_two_pages_in_one_reservation_round_trip_and_remap(device: Device) -> None:
    g = device.granularity
    with vmmpool.reserve(4 * g, device) as res:
        a = vmmpool.create(g, device)
        b = vmmpool.create(g, device)
        res.map(a, 0)
        mb = res.map(b, g)
        res.set_access(0, 2 * g, "rw")  # one call over two adjacent mappings
        data = pattern(1, 2 * g)
        device.write(res.address, data)
        assert device.read(res.address, 2 * g) == data
        # Remap the second page elsewhere in the range: the same bytes show there.
        mb.unmap()
        mb2 = res.map(b, 3 * g, access="rw")
        assert mb2.address == res.address + 3 * g
        assert device.read(mb2.address, g) == data[g:]
        assert device.read(res.address, g) == data[:g]
        a.close()
        b.close()


def test_numpy_over_host_mapping_round_trip(host: Device) -> None:
    g = host.granularity
    with vmmpool.reserve(2 * g, host) as res:
        with vmmpool.create(g, host) as a, vmmpool.create(g, host) as b:
            res.map(a, 0)
            res.map(b, g)
        # the handles are released: the mappings keep the memory (rule 7)
        res.set_access(0, 2 * g, Access.READWRITE)
        import ctypes

        arr = np.frombuffer((ctypes.c_char * (2 * g)).from_address(res.address), dtype=np.float32)
        arr[:] = np.arange(arr.size, dtype=np.float32)
        assert np.frombuffer(host.read(res.address + g, 16), dtype=np.float32).tolist() == [
            g / 4,
            g / 4 + 1,
            g / 4 + 2,
            g / 4 + 3,
        ]
        del arr


def test_one_allocation_mapped_at_two_addresses_shows_same_bytes(device: Device) -> None:
    g = device.granularity
    with vmmpool.reserve(g, device) as r1, vmmpool.reserve(g, device) as r2:
        with vmmpool.create(g, device) as a:
            m1 = r1.map(a, 0, access="rw")
            m2 = r2.map(a, 0, access="rw")
        assert m1.address != m2.address
        device.write(m1.address + 100, b"hello through one mapping")
        assert device.read(m2.address + 100, 25) == b"hello through one mapping"
        device.write(m2.address, b"\x07" * 64)
        assert device.read(m1.address, 64) == b"\x07" * 64


def test_mapping_grants_no_access_until_set_access(device: Device) -> None:
    g = device.granularity
    with vmmpool.reserve(g, device) as res, vmmpool.create(g, device) as a:
        m = res.map(a)
        assert m.access is Access.NONE
        m.set_access("r")
        assert m.get_access() is Access.READ
        m.set_access("rw")
        assert m.get_access() is Access.READWRITE
        m.unmap()
        m2 = res.map(a)  # a remap starts with no access again
        assert m2.get_access() is Access.NONE


def test_access_at_reports_the_mapping_starting_at_an_offset(device: Device) -> None:
    g = device.granularity
    with vmmpool.reserve(3 * g, device) as res, vmmpool.create(2 * g, device) as a:
        assert [res.access_at(k * g) for k in range(3)] == [None, None, None]
        m = res.map(a, g)  # two pages' worth at offset g: one mapping
        assert res.access_at(g) is Access.NONE
        assert res.access_at(2 * g) is None  # inside the mapping, not its start
        assert res.access_at(0) is None
        m.set_access("r")
        assert res.access_at(g) is Access.READ
        m.unmap()
        assert res.access_at(g) is None
        calls = device.counters().calls
        res.access_at(g)
        assert device.counters().calls == calls  # no driver call


def test_host_emulator_enforces_access_in_another_process() -> None:
    # Reading a mapping without set_access must fault, as on a GPU. Faulting
    # kills the process, so the read happens in a child.
    code = textwrap.dedent(
        """
        import ctypes, vmmpool
        d = vmmpool.Device.emulated(capacity=4 << 20)
        r = vmmpool.reserve(d.granularity, d)
        a = vmmpool.create(d.granularity, d)
        m = r.map(a)
        print("mapped", flush=True)
        ctypes.string_at(m.address, 1)
        print("read without access", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "mapped" in proc.stdout
    assert "read without access" not in proc.stdout
    assert proc.returncode == -11  # SIGSEGV


def test_counters_return_to_zero_after_close(host: Device) -> None:
    g = host.granularity
    res = vmmpool.reserve(3 * g, host)
    allocs = [vmmpool.create(g, host) for _ in range(3)]
    for i, a in enumerate(allocs):
        res.map(a, i * g)
    res.set_access(0, 3 * g)
    c = host.counters()
    assert c.live == (1, 3, 3)
    assert c.physical_bytes == 3 * g
    for a in allocs:
        a.close()
    assert host.counters().live == (1, 3, 3)  # still mapped: memory lives on (rule 7)
    res.close()  # unmaps the three adjacent mappings in one call, then frees
    c2 = host.counters()
    assert c2.live == (0, 0, 0)
    assert c2.physical_bytes == 0
    assert (c2 - c)["unmap"] == 1


def test_dropped_objects_are_released_by_finalizers(host: Device) -> None:
    g = host.granularity
    res = vmmpool.reserve(2 * g, host)
    a = vmmpool.create(g, host)
    res.map(a, g, access="rw")
    del a  # the mapping keeps the allocation object alive
    assert host.counters().live == (1, 1, 1)
    del res
    gc.collect()
    assert host.counters().live == (0, 0, 0)


def test_reference_cycle_is_collected(host: Device) -> None:
    g = host.granularity

    class Holder:
        pass

    h = Holder()
    h.res = vmmpool.reserve(g, host)  # type: ignore[attr-defined]
    h.alloc = vmmpool.create(g, host)  # type: ignore[attr-defined]
    h.mapping = h.res.map(h.alloc)  # type: ignore[attr-defined]
    h.self = h  # type: ignore[attr-defined]
    del h
    gc.collect()
    assert host.counters().live == (0, 0, 0)


def test_mapping_lives_until_reservation_closes_even_if_object_dropped(host: Device) -> None:
    g = host.granularity
    with vmmpool.reserve(g, host) as res, vmmpool.create(g, host) as a:
        res.map(a, access="rw")  # Mapping object not kept by the caller
        gc.collect()
        host.write(res.address, b"still mapped")
        assert host.read(res.address, 12) == b"still mapped"
        (m,) = res.mappings()
        assert m.offset == 0 and m.size == g
    assert host.counters().live == (0, 0, 0)


def test_double_close_and_use_after_close(device: Device) -> None:
    g = device.granularity
    res = vmmpool.reserve(g, device)
    a = vmmpool.create(g, device)
    m = res.map(a)
    m.close()
    m.close()
    with pytest.raises(ClosedError, match="Mapping has been closed"):
        m.set_access("rw")
    a.close()
    a.close()
    with pytest.raises(ClosedError, match="PhysicalAllocation has been closed"):
        res.map(a)
    res.close()
    res.close()
    with pytest.raises(ClosedError, match="AddressReservation has been closed"):
        res.set_access(0, g)
    assert res.closed and a.closed and m.closed


def test_closing_reservation_closes_its_mappings(device: Device) -> None:
    g = device.granularity
    res = vmmpool.reserve(2 * g, device)
    with vmmpool.create(g, device) as a:
        m = res.map(a, g)
    res.close()
    assert m.closed
    with pytest.raises(ClosedError):
        m.get_access()


def test_context_manager_does_not_hide_callers_exception(host: Device) -> None:
    with pytest.raises(KeyError, match="mine"):
        with vmmpool.reserve(host.granularity, host):
            raise KeyError("mine")
    assert host.counters().live == (0, 0, 0)


def test_batched_unmap_closes_covered_mappings(device: Device) -> None:
    g = device.granularity
    with vmmpool.reserve(3 * g, device) as res:
        maps = []
        for i in range(3):
            with vmmpool.create(g, device) as a:
                maps.append(res.map(a, i * g))
        before = device.counters()
        res.unmap(0, 2 * g)
        assert (device.counters() - before) == {"unmap": 1}
        assert maps[0].closed and maps[1].closed and not maps[2].closed
        assert [(m.offset, m.size) for m in res.mappings()] == [(2 * g, g)]


def test_retain_allocation_adds_a_reference(device: Device) -> None:
    g = device.granularity
    with vmmpool.reserve(g, device) as res:
        with vmmpool.create(g, device) as a:
            m = res.map(a, access="rw")
        device.write(m.address, b"retained")
        r = m.retain_allocation()
        m.unmap()
        assert device.counters().live[1] >= 1  # the retained reference keeps the memory
        m2 = res.map(r, access="rw")
        assert device.read(m2.address, 8) == b"retained"
        r.close()


def test_export_and_import_posix_fd(host: Device) -> None:
    g = host.granularity
    with vmmpool.reserve(g, host) as r1, vmmpool.reserve(g, host) as r2:
        with vmmpool.create(g, host, handle_type="posix_fd") as a:
            m1 = r1.map(a, access="rw")
            fd = a.export()
        try:
            host.write(m1.address, b"shared across handles")
            with vmmpool.PhysicalAllocation.from_fd(fd, g, host) as b:
                m2 = r2.map(b, access="rw")
            assert host.read(m2.address, 21) == b"shared across handles"
            # Another process can map the same memory through the fd.
            code = (
                "import mmap, os, sys\n"
                f"f = os.open('/proc/{os.getpid()}/fd/{fd}', os.O_RDWR)\n"
                f"m = mmap.mmap(f, {g})\n"
                "sys.stdout.write(m[:21].decode()); m[:5] = b'CHILD'\n"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
            assert out.stdout == "shared across handles", out.stderr
            assert host.read(m1.address, 5) == b"CHILD"
        finally:
            os.close(fd)


def test_export_requires_posix_fd_handle_type(host: Device) -> None:
    with vmmpool.create(host.granularity, host) as a:
        with pytest.raises(ValueError, match="handle_type='posix_fd'"):
            a.export()


# --------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("nbytes", "exc", "match"),
    [
        (-1, ValueError, "nbytes must be >= 1, got -1"),
        (0, ValueError, "nbytes must be >= 1, got 0"),
        (1.5, TypeError, "nbytes must be an int, got float"),
        ("4", TypeError, "nbytes must be an int, got str"),
        (True, TypeError, "nbytes must be an int, got bool"),
        ((2 << 20) + 1, ValueError, "multiple of 2097152 bytes"),
    ],
)
def test_bad_sizes_rejected_before_any_driver_call(
    host: Device, nbytes: object, exc: type[Exception], match: str
) -> None:
    before = host.counters()
    with pytest.raises(exc, match=match):
        vmmpool.create(nbytes, host)  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        vmmpool.reserve(nbytes, host)  # type: ignore[arg-type]
    assert host.counters() - before == {}


def test_numpy_integer_sizes_are_accepted(host: Device) -> None:
    with vmmpool.create(np.int64(host.granularity), host) as a:
        assert a.size == host.granularity and type(a.size) is int


def test_bad_map_arguments(host: Device) -> None:
    g = host.granularity
    other = Device.emulated(capacity=4 * g)
    with vmmpool.reserve(2 * g, host) as res, vmmpool.create(g, host) as a:
        before = host.counters()
        with pytest.raises(ValueError, match="multiple of 2097152"):
            res.map(a, 4096)
        with pytest.raises(ValueError, match="inside the reservation of 4194304 bytes"):
            res.map(a, 2 * g)
        with pytest.raises(TypeError, match="must be a PhysicalAllocation, got int"):
            res.map(a.handle)  # type: ignore[arg-type]
        with vmmpool.create(g, other) as foreign:
            with pytest.raises(ValueError, match=r"allocation is on Device\('host', emulated at"):
                res.map(foreign)
        res.map(a, g)
        with pytest.raises(ValueError, match=r"overlaps the mapping at \[2097152, 4194304\)"):
            res.map(a, g)
        with pytest.raises(ValueError, match="access must be 'rw', 'r' or 'none', got 'write'"):
            res.set_access(g, g, "write")
        with pytest.raises(ValueError, match="no mapping starts at offset 0"):
            res.set_access(0, 2 * g)
        with pytest.raises(ValueError, match="the host device has no peers"):
            res.set_access(g, g, "rw", peers=[1])
        with pytest.raises(ValueError, match="alignment must be 0 or a power of two, got 3"):
            vmmpool.reserve(g, host, alignment=3)
        assert host.counters() - before == {"map": 1}


def test_alignment_is_honoured(host: Device) -> None:
    with vmmpool.reserve(host.granularity, host, alignment=64 << 20) as res:
        assert res.address % (64 << 20) == 0


# ------------------------------------------------------------------- devices
def test_device_specs() -> None:
    assert Device("host") is Device("HOST") is vmmpool.devices()[-1]
    assert Device(Device("host")) is Device("host")
    emulated = Device.emulated(capacity=8 << 20)
    assert emulated is not Device("host") and emulated.is_host
    assert emulated.total_memory == 8 << 20
    assert emulated.granularity == 2 << 20 == emulated.recommended_granularity
    assert emulated.dlpack_device == (1, 0)
    assert emulated.round_up(1) == 2 << 20 and emulated.round_up(0) == 0
    for bad, exc in [("gpu", ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="device"):
            Device(bad)  # type: ignore[arg-type]


def test_cuda_unavailable_error_says_how_to_use_host() -> None:
    from vmmpool._backends import cuda

    reason = cuda.probe(0)
    if reason is None:
        assert Device("cuda:0").kind == "cuda"
        return
    with pytest.raises(vmmpool.DeviceUnavailableError, match=r"Device\('host'\)") as info:
        Device("cuda:0")
    assert reason in str(info.value)
    assert vmmpool.default_device() is Device("host")
    assert [d.kind for d in vmmpool.devices()] == ["host"]


def test_free_memory_tracks_allocations(host: Device) -> None:
    total = host.total_memory
    with vmmpool.create(2 * host.granularity, host):
        assert host.free_memory == total - 2 * host.granularity
    assert host.free_memory == total


def test_out_of_memory_is_a_memory_error(host: Device) -> None:
    g = host.granularity
    held = [vmmpool.create(g, host) for _ in range(host.total_memory // g)]
    with pytest.raises(vmmpool.OutOfMemoryError) as info:
        vmmpool.create(g, host)
    assert isinstance(info.value, MemoryError)
    assert info.value.requested == g and info.value.limit == host.total_memory
    for a in held:
        a.close()
    vmmpool.create(g, host).close()  # usable again


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "err",
    [
        vmmpool.DriverError("CUDA_ERROR_INVALID_VALUE", "bad", operation="map"),
        vmmpool.OutOfMemoryError(10, 20, 30, cached=4, message="m"),
        vmmpool.DeviceUnavailableError("cuda:0", "no CUDA device"),
        ClosedError("Mapping"),
        vmmpool.ForkedError("PagePool", 100, 101),
        vmmpool.AsleepError("PagePool", "malloc(1)"),
        ExportClosedError("GrowableBuffer"),  # raised by DLPack exports: also BufferErrors
        ExportAsleepError("Allocation", "an export (__dlpack__)"),
    ],
)
def test_errors_pickle_round_trip(err: Exception) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__


def test_driver_error_fields() -> None:
    e = vmmpool.DriverError("CUDA_ERROR_INVALID_VALUE", "bad range", operation="unmap")
    assert e.status == 1 and e.name == "CUDA_ERROR_INVALID_VALUE"
    assert str(e) == "unmap: CUDA_ERROR_INVALID_VALUE: bad range"
    assert isinstance(e, RuntimeError) and isinstance(e, vmmpool.VmmError)


def test_failed_close_keeps_bookkeeping_consistent_and_can_retry(host: Device) -> None:
    g = host.granularity
    res = vmmpool.reserve(2 * g, host)
    with vmmpool.create(g, host) as a:
        m = res.map(a, access="rw")
    host._backend.inject_fault("free_address", name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        res.close()
    # The unmap happened, the free did not: the reservation is still open and
    # knows it has no mappings left.
    assert m.closed and not res.closed
    assert res.mappings() == []
    assert host.counters().live == (1, 0, 0)
    res.close()
    assert res.closed and host.counters().live == (0, 0, 0)


def test_many_mappings_in_one_reservation(host: Device) -> None:
    g = host.granularity
    dev = Device.emulated(capacity=130 * g)
    with vmmpool.reserve(256 * g, dev) as res:
        for i in range(0, 256, 2):  # every other slot, out of order
            with vmmpool.create(g, dev) as a:
                res.map(a, ((i * 37) % 256) // 2 * 2 * g)
        assert len(res.mappings()) == 128
        with vmmpool.create(g, dev) as a:
            with pytest.raises(ValueError, match="overlaps the mapping at"):
                res.map(a, 10 * g)
            res.map(a, 11 * g)  # the gaps are free
    assert dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize(("env", "expected"), [("64M", 64 << 20), ("1G", 1 << 30), ("5242880", 4 << 20)])
def test_host_capacity_from_environment(monkeypatch: pytest.MonkeyPatch, env: str, expected: int) -> None:
    from vmmpool._backends.host import default_capacity

    monkeypatch.setenv("VMMPOOL_HOST_CAPACITY", env)
    assert default_capacity() == expected


@pytest.mark.parametrize("env", ["lots", "1M", "-4G", "2.5Q", "1e9"])
def test_bad_host_capacity_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    from vmmpool._backends.host import default_capacity

    monkeypatch.setenv("VMMPOOL_HOST_CAPACITY", env)
    with pytest.raises(ValueError, match=f"VMMPOOL_HOST_CAPACITY must be a size .* got '{re.escape(env)}'"):
        default_capacity()


# ------------------------------------------------- emulated devices' memory files (issue 17)
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_closing_an_emulated_device_closes_its_memory_files() -> None:
    dev = vmmpool.Device.emulated(capacity=64 * MiB)
    b = dev._backend
    with vmmpool.PagePool(dev) as pool:
        a = pool.malloc(MiB)
        assert b.open_files() == 1
        dev.write(a.ptr, b"kept")
        dev.close()
        assert dev.closed
        # Memory still allocated keeps working; nothing new is handed out.
        assert dev.read(a.ptr, 4) == b"kept"
        with pytest.raises(vmmpool.ClosedError, match="emulated Device has been closed"):
            vmmpool.create(2 * MiB, dev)
        a.free()
    # Its last release closed the file: nothing kept for reuse after close().
    assert b.open_files() == 0 and dev.counters().live == (0, 0, 0)
    dev.close()  # idempotent
    with pytest.raises(ValueError, match=r"only a device made by Device\.emulated\(\)"):
        vmmpool.Device("host").close()
    with vmmpool.Device.emulated(capacity=64 * MiB) as dev2:
        vmmpool.create(2 * MiB, dev2).close()
        assert dev2._backend.open_files() == 1  # one spare chunk, kept for reuse
    assert dev2.closed and dev2._backend.open_files() == 0


def test_a_dropped_emulated_device_closes_its_memory_files() -> None:
    before = _open_fds()
    for _ in range(20):
        dev = vmmpool.Device.emulated(capacity=64 * MiB)
        vmmpool.create(2 * MiB, dev).close()
        vmmpool.create(2 * MiB, dev, handle_type="posix_fd")  # dropped live: its finalizer

        del dev
    gc.collect()
    assert _open_fds() == before

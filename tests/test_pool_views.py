"""Views of PagePool allocations: DLPack and array interfaces, and the free rule."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import vmmpool
from vmmpool import Device, PagePool


def test_numpy_shares_a_pool_allocation(host: Device) -> None:
    with PagePool(host, limit=16 << 20) as pool:
        a = pool.malloc(4096)
        arr = np.from_dlpack(a.view("int32", shape=(32, 32)))
        arr[:] = np.arange(1024, dtype=np.int32).reshape(32, 32)
        assert np.frombuffer(host.read(a.ptr + 4 * 33, 4), dtype=np.int32)[0] == 33
        host.write(a.ptr, np.int32(-7).tobytes())
        assert arr[0, 0] == -7
        with pytest.raises(BufferError, match="1 live view"):
            a.free()
        assert not a.freed  # refused: nothing changed
        del arr
        gc.collect()
        a.free()
        assert pool.stats().requested_bytes == 0


def test_memory_returns_when_the_last_array_goes(host: Device) -> None:
    with PagePool(host, limit=16 << 20) as pool:
        a = pool.malloc(3 << 20)  # a large allocation: whole pages
        arr = np.from_dlpack(a.view("float64"))
        arr[-1] = 2.5
        del a  # the array keeps the allocation alive through its view
        gc.collect()
        assert pool.stats().requested_bytes == 3 << 20
        assert arr[-1] == 2.5
        del arr
        gc.collect()
        assert pool.stats().requested_bytes == 0


def test_view_of_freed_allocation_is_refused(host: Device) -> None:
    with PagePool(host, limit=16 << 20) as pool:
        a = pool.malloc(1024)
        a.free()
        with pytest.raises(ValueError, match="was freed"):
            a.view()


def test_view_bounds_are_checked(host: Device) -> None:
    with PagePool(host, limit=16 << 20) as pool:
        with pool.malloc(1000) as a:
            with pytest.raises(ValueError, match="needs 1024 bytes from offset 0"):
                a.view("float64", shape=128)
            v = a.view("uint8", offset=8)
            assert v.shape == (992,) and v.ptr == a.ptr + 8
            assert v.__dlpack_device__() == (1, 0)
            del v


@pytest.mark.cuda
def test_cuda_libraries_consume_a_pool_allocation(cuda: vmmpool.Device) -> None:
    cupy = pytest.importorskip("cupy")
    with PagePool(cuda, limit=64 << 20) as pool:
        a = pool.malloc(1 << 20)
        x = cupy.from_dlpack(a.view("float32"))
        x[:] = cupy.arange(x.size, dtype=cupy.float32) * 2  # a kernel writes
        cupy.cuda.Device(cuda.ordinal).synchronize()
        got = np.frombuffer(cuda.read(a.ptr + 4 * 10, 8), dtype=np.float32)
        assert got.tolist() == [20.0, 22.0]
        del x
        gc.collect()
        a.free()


def test_a_view_covers_the_block_even_after_ptr_or_size_is_assigned(device: Device) -> None:
    # Allocation.ptr and .size are plain attributes; view() trusted them, so after
    # `a.size = 4096` a view exported (and writes through it reached) the next block.
    with PagePool(device, limit=8 * device.granularity) as pool:
        a = pool.malloc(16)
        b = pool.malloc(16)
        where = a.ptr
        a.size = 1 << 20
        a.ptr = b.ptr
        v = a.view()
        assert (v.ptr, v.nbytes) == (where, 16)
        del v
        a.ptr, a.size = where, 16
        a.free()
        b.free()

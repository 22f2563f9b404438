"""PagePool lifetime and limits (issue 8 items 2, 4, 5, 6 and 8), through the public API."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import vmmpool
from vmmpool import PagePool


def test_close_keeps_memory_used_by_a_dlpack_array(device: vmmpool.Device) -> None:
    P = device.granularity
    if not device.is_host:
        pytest.skip("NumPy reads host memory only")
    with PagePool(device, limit=16 * P) as pool:
        arr = np.from_dlpack(pool.malloc(4096).view("float32"))
        arr[:] = 2.0
        big = pool.malloc(3 * P)
        bigarr = np.from_dlpack(big.view("uint8"))
        bigarr[-1] = 9
        del big
    assert float(arr.sum()) == 2048.0  # mapped still: no segfault, same bytes
    assert bigarr[-1] == 9
    assert device.counters().live[0] >= 1  # the arena stays for the arrays
    del arr
    gc.collect()
    assert bigarr[-1] == 9  # one array left: its arena stays
    del bigarr
    gc.collect()  # the conftest fixture checks that every resource is gone


def test_view_after_close_says_the_pool_was_closed(device: vmmpool.Device) -> None:
    pool = PagePool(device, limit=4 * device.granularity)
    a = pool.malloc(100)
    pool.close()
    with pytest.raises(vmmpool.ClosedError, match="PagePool has been closed"):
        a.view("uint8")


def test_lowered_limit_holds_once_usage_drops(device: vmmpool.Device) -> None:
    P = device.granularity
    with PagePool(device, limit=16 * P) as pool:
        a = pool.malloc(6 * P)
        pool.set_limit(4 * P)
        assert pool.stats().total_pages == 6  # live data stays
        a.free()
        s = pool.stats()
        assert s.total_pages <= 4 and s.reserved_bytes <= s.limit, s
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(6 * P)  # the cache must not serve beyond the limit
        pool.malloc(4 * P).free()
        assert pool.stats().total_pages <= 4
        pool._check()


def test_lowered_limit_holds_after_a_collected_allocation(device: vmmpool.Device) -> None:
    P = device.granularity
    with PagePool(device, limit=16 * P) as pool:
        a = pool.malloc(6 * P)
        pool.set_limit(3 * P)
        del a
        gc.collect()
        s = pool.stats()
        assert s.total_pages <= 3, s
        pool._check()


@pytest.mark.parametrize("op", ["release", "unmap", "event_query"])
def test_set_limit_fault_keeps_the_old_limit(host: vmmpool.Device, op: str) -> None:
    P = host.granularity
    with PagePool(host, limit=16 * P) as pool:
        live = pool.malloc(2 * P)
        for stream in (1, 2):
            pool.malloc(3 * P, stream=stream).free()  # 6 cached pages
        host._backend.inject_fault(op, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError):
            pool.set_limit(P)
        host._backend.clear_faults()
        assert pool.limit == 16 * P
        assert not live.freed
        pool._check()
        pool.set_limit(3 * P)  # a retry works
        assert pool.limit == 3 * P and pool.stats().total_pages <= 3
        live.free()


@pytest.mark.parametrize("op", ["release", "free_address", "synchronize"])
def test_failed_close_can_be_retried(host: vmmpool.Device, op: str) -> None:
    P = host.granularity
    before = host.counters().live
    pool = PagePool(host, limit=8 * P)
    keep = [pool.malloc(2 * P), pool.malloc(100)]
    pool.malloc(3 * P, stream=1).free()
    host._backend.inject_fault(op, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.close()
    assert pool.closed
    pool.close()  # resumes: releases what is left
    assert host.counters().live == before
    pool.close()  # and then is a no-op
    del keep


def test_oom_message_agrees_with_stats(device: vmmpool.Device) -> None:
    P = device.granularity
    with PagePool(device, limit=8 * P) as pool:
        small = [pool.malloc(3000) for _ in range(5)]
        big = pool.malloc(4 * P)
        pool.malloc(2 * P, stream=1).free()
        with pytest.raises(vmmpool.OutOfMemoryError) as info:
            pool.malloc(6 * P)
        s = pool.stats()
        err = info.value
        assert err.in_use == s.allocated_bytes
        assert err.cached == s.cached_bytes
        assert f"requested {6 * P} bytes, {s.allocated_bytes} in use, {s.cached_bytes} cached" in str(err)
        assert f"{s.reclaimable_pages} cached page(s) reclaimable, {s.free_pages} free" in str(err)
        big.free()
        del small


def test_oom_message_states_the_sum_that_refused(device: vmmpool.Device) -> None:
    """Issue 21: the message gives the pages the block would pin, not only those it maps."""
    P = device.granularity
    with PagePool(device, limit=8 * P) as pool:
        a = pool.malloc(2 * P)
        b = pool.malloc(2 * P)
        b.free()  # two cached pages right after a: a block there maps fewer pages than it pins
        with pytest.raises(vmmpool.OutOfMemoryError) as info:
            pool.malloc(7 * P)
        text = str(info.value)
        s = pool.stats()
        assert s.pinned_pages == 2 and s.reclaimable_pages == 2
        # 5 pages to map after the 2 cached ones: 7 newly pinned, and 2 + 7 > 8
        assert "would pin 7 more page(s)" in text and "(5 to map, 2 cached it covers)" in text
        assert "2 of the limit's 8 pages hold live data: 2 + 7 > 8" in text
        assert "2 cached page(s) reclaimable" in text and f"{s.allocated_bytes} in use" in text
        pool.malloc(6 * P).free()  # 2 + 6 <= 8: fits
        a.free()


def test_growth_oom_names_the_request(device: vmmpool.Device) -> None:
    P = device.granularity
    with PagePool(device, limit=4 * P) as pool:
        buf = vmmpool.GrowableBuffer(max_size=16 * P, pool=pool, initial_size=P)
        want = 7 * P + 5
        with pytest.raises(vmmpool.OutOfMemoryError) as info:
            buf.resize(want)
        assert str(want) in str(info.value), str(info.value)
        assert info.value.requested == want
        assert buf.size == P
        buf.close()


def test_buffer_collected_after_its_pool_closed_releases_its_range(device: vmmpool.Device) -> None:
    P = device.granularity
    pool = PagePool(device, limit=8 * P)
    buf = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=2 * P)
    pool.close()
    del buf
    gc.collect()  # the fixture checks that the buffer's reservation is gone


def test_collected_pooled_buffer_gives_its_pages_back_at_the_next_call(device: vmmpool.Device) -> None:
    P = device.granularity
    with PagePool(device, limit=8 * P) as pool:
        buf = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=3 * P)
        assert pool.stats().acquired_pages == 3
        del buf
        gc.collect()
        assert pool.stats().acquired_pages == 0  # the deferred release ran
        pool.malloc(8 * P).free()

"""PagePool lifetime and limits (issue 8 items 2, 4, 5, 6 and 8; issue 17 items 4 and 7)."""

from __future__ import annotations

import gc
import sys
import threading
import time

import numpy as np
import pytest

import vmmpool
from vmmpool import PagePool


def test_close_keeps_memory_used_by_a_dlpack_array(host: vmmpool.Device) -> None:
    # Host only (NumPy reads host memory only): a `device` test skipped on every GPU.
    device = host
    P = device.granularity
    before = device.counters().live
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
    gc.collect()
    assert device.counters().live == before  # every resource is gone


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


# ---------------------------------------------------------------- issue 17 item 4
class _Owner:
    """A user's object in a reference cycle whose ``__del__`` frees its allocation."""

    def __init__(self, a: vmmpool.Allocation, errors: list[str], times: int = 1) -> None:
        self.a = a
        self.errors = errors
        self.times = times
        self.me = self

    def __del__(self) -> None:
        for _ in range(self.times):
            try:
                self.a.free()
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{type(e).__name__}: {e}")


def test_user_del_freeing_after_the_safety_net_is_silent(device: vmmpool.Device) -> None:
    """Default GC settings: the pool's safety net frees the allocation (weak-reference
    callbacks run before ``__del__``); the user's free() that follows does nothing."""
    P = device.granularity
    errors: list[str] = []
    with PagePool(device, limit=8 * P) as pool:
        for i in range(20):
            _Owner(pool.malloc(1000 + 512 * i, stream=i % 2), errors)
        _Owner(pool.malloc(3 * P), errors)
        gc.collect()
        assert errors == []  # was "already freed" for every one of them
        s = pool.stats()
        assert s.live_allocations == 0 and (s.n_malloc, s.n_free) == (21, 21), s
        pool._check()


def test_double_free_outside_the_safety_net_still_raises(device: vmmpool.Device) -> None:
    P = device.granularity
    errors: list[str] = []
    with PagePool(device, limit=8 * P) as pool:
        a = pool.malloc(100)
        a.free()
        with pytest.raises(ValueError, match="already freed"):
            a.free()
        # a __del__ freeing twice: the first is a no-op after the safety net, the second
        # is the user's own double free
        _Owner(pool.malloc(100), errors, times=2)
        gc.collect()
        assert len(errors) == 1 and "ValueError" in errors[0] and "already freed" in errors[0]
        # a racing free() (the allocation is alive, its block freed by another call)
        b = pool.malloc(5000)
        ref = b._ref
        b.free()
        b._ref = ref
        with pytest.raises(ValueError, match="already freed"):
            b.free()
        assert pool.stats().live_allocations == 0
        pool._check()


# ---------------------------------------------------------------- issue 17 item 7
def test_release_after_close_is_done_by_the_thread_holding_the_lock(device: vmmpool.Device) -> None:
    """The last view dies while another thread is inside the pool: that thread releases
    the arena when it lets go of the lock (it used to be dropped, never retried)."""
    P = device.granularity
    before = device.counters().live
    pool = PagePool(device, limit=8 * P)
    v = pool.malloc(3 * P).view("uint8")
    pool.close()
    assert device.counters().live != before  # the arena stays for the view
    core = pool._core
    inside = threading.Event()
    go = threading.Event()
    real = core.pinned

    def pinned() -> int:  # stats() calls it with the lock held
        inside.set()
        go.wait(10)
        return real()

    core.pinned = pinned  # type: ignore[method-assign]
    t = threading.Thread(target=pool.stats)
    t.start()
    try:
        assert inside.wait(10)
        del v
        gc.collect()  # the view's finalizer finds the lock busy: queued
        assert device.counters().live != before
    finally:
        go.set()
        t.join()
        del core.pinned
    assert device.counters().live == before  # released by stats() on its way out


def test_release_after_close_with_a_thread_calling_stats(device: vmmpool.Device) -> None:
    """Issue 17 item 7 as reported: a thread calls stats() in a loop while the pool is
    closed and its last view dropped; the memory is released while the pool is alive."""
    P = device.granularity
    before = device.counters().live
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the stats thread holds the lock often when the view dies
    try:
        for _ in range(10):
            pool = PagePool(device, limit=8 * P)
            a = pool.malloc(3 * P)
            v = a.view("uint8")
            del a
            stop = threading.Event()

            def spin(pool: PagePool = pool, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    pool.stats()

            t = threading.Thread(target=spin)
            t.start()
            try:
                time.sleep(0.005)
                pool.close()
                del v
                deadline = time.monotonic() + 10
                while device.counters().live != before and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert device.counters().live == before, "memory held after close + last view"
            finally:
                stop.set()
                t.join()
    finally:
        sys.setswitchinterval(interval)


def test_free_and_a_collected_allocation_leave_the_same_state(device: vmmpool.Device) -> None:
    # Issue 21: Core.free keeps an inlined copy of Core.free_rec (measured to pay ~3% of a
    # malloc+free pair); the collected path (drain) calls free_rec. Both must do the same.
    import gc

    def run(collect: bool) -> tuple[object, ...]:
        P = device.granularity
        pool = vmmpool.PagePool(device, limit=16 * P)
        pool.record_history("all", context=None)
        keep = pool.malloc(100)
        for n in (300, P + 5, 4096):
            # Stream 1 (CU_STREAM_LEGACY), not 3: on CUDA a stream is a real handle, and
            # cuEventRecord on the pointer 0x3 dereferences it (a segfault on the stand-in
            # driver, and on a GPU: the whole test run lost).
            a = pool.malloc(n, stream=1)
            if collect:
                del a
                gc.collect()
            else:
                a.free()
        s = pool.stats()
        events = [(e["action"], e["addr"], e["size"], e["stream"])
                  for e in pool.memory_snapshot()["device_traces"][0]]
        keep.free()
        pool.close()
        return (s.live_allocations, s.n_free, s.requested_bytes, s.allocated_bytes,
                s.cached_bytes, s.cached_blocks, s.largest_allocatable, events)

    freed, collected = run(False), run(True)
    assert freed == collected
    assert [e[0] for e in freed[-1]].count("free_requested") == 3

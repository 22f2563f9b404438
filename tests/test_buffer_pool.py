"""GrowableBuffer with pages from a PagePool: many buffers, one physical pool."""

from __future__ import annotations

import gc
from typing import Any

import pytest

import vmmpool
from vmmpool._buffer import GrowableBuffer


def make_pool(device: vmmpool.Device, **kwargs: Any) -> Any:
    pool_mod = pytest.importorskip("vmmpool._pool")
    return pool_mod.PagePool(device, **kwargs)


def warm(pool: Any, pages: int) -> None:
    """Make the pool create `pages` pages up front, so buffers only take free ones."""
    pool.release_pages(pool.acquire_pages(pages))


def test_pages_come_from_and_return_to_the_pool(device: vmmpool.Device) -> None:
    g = device.granularity
    with make_pool(device, limit=16 * g) as pool:
        warm(pool, 6)
        with GrowableBuffer(max_size=8 * g, pool=pool) as buf:
            assert buf.device is device and buf.page_size == g
            assert id(buf.pool) == id(pool)
            before = device.counters()
            buf.resize(5 * g)
            # free pool pages: no create, one map per page, one set_access
            assert device.counters() - before == {"map": 5, "set_access": 1}
            assert pool.stats().acquired_pages == 5
            before = device.counters()
            buf.resize(2 * g)
            assert device.counters() - before == {"synchronize": 1, "unmap": 1}  # pages stay in the pool
            stats = pool.stats()
            assert (stats.acquired_pages, stats.free_pages, stats.total_pages) == (2, 4, 6)
        assert pool.stats().acquired_pages == 0
        assert pool.stats().free_pages == 6


def test_many_buffers_share_one_pool(device: vmmpool.Device) -> None:
    g = device.granularity
    with make_pool(device, limit=8 * g) as pool:
        bufs = [GrowableBuffer(max_size=8 * g, pool=pool) for _ in range(4)]
        try:
            for step in range(1, 3):
                for b in bufs:
                    b.resize(step * g)
            assert pool.stats().acquired_pages == 8
            b0 = bufs[0]
            b0.write(b"kept")
            live = device.counters().live
            with pytest.raises(vmmpool.OutOfMemoryError):
                b0.resize(3 * g)  # the pool's limit, not the device, is reached
            assert (b0.size, b0.capacity, bytes(b0.read(4))) == (2 * g, 2 * g, b"kept")
            assert device.counters().live == live
            bufs[1].resize(0)  # one request finishes: its pages serve another
            before = device.counters()
            b0.resize(4 * g)
            assert device.counters() - before == {"map": 2, "set_access": 1}
            assert bytes(b0.read(4)) == b"kept"
        finally:
            for b in bufs:
                b.close()
        assert pool.stats().acquired_pages == 0


def test_page_size_and_device_come_from_the_pool(device: vmmpool.Device) -> None:
    g = device.granularity
    with make_pool(device, page_size=2 * g, limit=8 * g) as pool:
        with GrowableBuffer(max_size=3 * g, pool=pool, initial_size=1) as buf:
            assert buf.page_size == 2 * g
            assert buf.max_size == 4 * g  # rounded up to pool pages
            assert buf.capacity == 2 * g
            buf.resize(4 * g)
            assert pool.stats().acquired_pages == 2
        other = vmmpool.Device.emulated(capacity=4 * g)
        with pytest.raises(ValueError, match="differs from the pool's device") as info:
            GrowableBuffer(max_size=g, device=other, pool=pool)
        assert repr(other) in str(info.value) and repr(device) in str(info.value)  # told apart
    # A closed pool: refused up front (it was accepted, and every growth raised ClosedError).
    before = device.counters().live
    with pytest.raises(vmmpool.ClosedError):
        GrowableBuffer(max_size=g, pool=pool)
    assert device.counters().live == before


def test_move_with_pool_pages(device: vmmpool.Device) -> None:
    g = device.granularity
    with make_pool(device, limit=8 * g) as pool:
        with GrowableBuffer(max_size=2 * g, pool=pool) as buf:
            buf.resize(g)
            buf.write(b"first page")
            buf.resize(2 * g)
            buf.write(b"second page", offset=g)
            old = buf.ptr
            assert buf.resize(5 * g, allow_move=True) != old
            assert bytes(buf.read(10)) == b"first page"
            assert bytes(buf.read(11, offset=g)) == b"second page"
            assert pool.stats().acquired_pages == 5


def test_failed_release_to_the_pool_is_undone_by_remapping(device: vmmpool.Device) -> None:
    g = device.granularity
    with make_pool(device, limit=8 * g) as pool:
        with GrowableBuffer(max_size=4 * g, pool=pool, initial_size=4 * g) as buf:
            buf.write(b"x" * 10, offset=3 * g)
            real = pool.release_pages

            def failing(pages: Any) -> None:
                raise ValueError("pool refused")

            pool.release_pages = failing
            live = device.counters().live
            try:
                with pytest.raises(ValueError, match="pool refused"):
                    buf.resize(g)
            finally:
                del pool.release_pages
            assert pool.release_pages == real
            assert (buf.size, buf.capacity) == (4 * g, 4 * g)
            assert device.counters().live == live
            assert bytes(buf.read(10, offset=3 * g)) == b"x" * 10  # remapped and accessible


def test_dropped_buffer_returns_pages_to_the_pool(device: vmmpool.Device) -> None:
    g = device.granularity
    with make_pool(device, limit=4 * g) as pool:
        buf = GrowableBuffer(max_size=4 * g, pool=pool, initial_size=3 * g)
        assert pool.stats().acquired_pages == 3
        del buf
        gc.collect()
        assert pool.stats().acquired_pages == 0


@pytest.mark.parametrize("asleep", [False, True])
@pytest.mark.parametrize("order", ["buffer-first", "together"])
def test_pool_and_buffer_dropped_without_close_release_everything(
    device: vmmpool.Device, order: str, asleep: bool
) -> None:
    """The buffer's queued release held the pool, and the pool's finalizer holds that queue:
    the pool was never collected (nor closed), and both leaked every driver resource for the
    life of the process. The fixture's leak check fails the test if anything is left."""
    g = device.granularity
    pool = make_pool(device, limit=8 * g)
    buf = GrowableBuffer(max_size=4 * g, pool=pool, initial_size=2 * g)
    keep = pool.malloc(g)
    if asleep:  # issue 18: the buffer's and the pool's staging buffers too
        buf.sleep()
        pool.sleep()
    del keep
    if order == "buffer-first":
        del buf
        gc.collect()
        assert len(pool._core.tasks) == 1  # its release waits for the pool's next call
        del pool
    else:
        del buf, pool
    gc.collect()
    assert device.counters().live == (0, 0, 0)
    if device.is_host:
        assert device._backend.live_host_allocations() == 0


def test_pool_closed_before_the_buffer(device: vmmpool.Device) -> None:
    g = device.granularity
    pool = make_pool(device, limit=4 * g)
    buf = GrowableBuffer(max_size=4 * g, pool=pool, initial_size=2 * g)
    pool.close()  # pages lose the pool's reference; the mapping keeps the memory
    buf.write(b"still here")
    assert bytes(buf.read(10)) == b"still here"
    buf.close()  # release_pages is a no-op now; unmapping frees the memory


def test_fault_at_every_call_with_a_pool(device: vmmpool.Device) -> None:
    from test_buffer_faults import OPS, all_or_nothing, fill

    g = device.granularity
    with make_pool(device, limit=12 * g) as pool:
        warm(pool, 12)

        def setup() -> GrowableBuffer:
            buf = GrowableBuffer(max_size=4 * g, pool=pool)
            for k in (1, 3):
                buf.resize(k * g)
                fill(buf, k)
            return buf

        base = dict.fromkeys(OPS, 0)
        assert all_or_nothing(device, setup, lambda b: b.resize(4 * g)) == {
            **base,
            "map": 1,
            "set_access": 1,
        }
        assert all_or_nothing(device, setup, lambda b: b.resize(1)) == {**base, "synchronize": 1, "unmap": 1}
        assert all_or_nothing(device, setup, lambda b: b.resize(6 * g, allow_move=True)) == {
            **base,
            "reserve": 1,
            "map": 6,
            "set_access": 1,
            "synchronize": 1,
            "unmap": 1,
            "free_address": 1,
        }
        assert pool.stats().acquired_pages == 0

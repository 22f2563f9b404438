"""Stream-ordered reuse with events, sub-page blocks, and reuse before creation.

The host emulator can hold a stream's work pending (``hold_stream``): events
recorded on it stay incomplete until ``release_stream`` (or until the pool
waits on one, which models a GPU finishing the work).
"""

from __future__ import annotations

import random

import pytest

import vmmpool
from vmmpool._pool import ALIGNMENT, PagePool

MiB = 1 << 20


@pytest.fixture
def dev() -> vmmpool.Device:
    return vmmpool.Device.emulated(capacity=256 * MiB)


def pages_of(pool: PagePool, stream: int) -> dict[int, int | None]:
    """Page index -> address of the mapped pages of `stream`."""
    return {p.index: p.address for p in pool.snapshot() if p.stream == stream and p.address}


# ------------------------------------------------------------------ events
def test_pages_under_pending_work_stay_put_while_other_pages_exist(dev: vmmpool.Device) -> None:
    with PagePool(dev, limit=16 * 2 * MiB) as pool:
        P = pool.page_size
        a = pool.malloc(4 * P, stream=1)
        with dev._backend.holding(1):
            a.free()  # its kernels are still running
            held = pages_of(pool, 1)
            before = dev.counters()
            b = pool.malloc(6 * P, stream=2)  # new pages, not stream 1's
            delta = dev.counters() - before
            assert pages_of(pool, 1) == held and "unmap" not in delta
            assert delta.get("create", 0) == 6 and "synchronize" not in delta
            pages = pool.acquire_pages(2, stream=3)  # lent pages are new too
            assert pages_of(pool, 1) == held
            pool.release_pages(pages)
        # the work completed: now its pages may leave stream 1
        pool.set_limit(10 * P)  # 6 live + 4 of stream 1: only free pages go
        s = pool.stats()
        assert s.total_pages == 10
        c = pool.malloc(4 * P, stream=2)  # at the limit: stream 1's pages, no wait
        s = pool.stats()
        assert not pages_of(pool, 1) and s.n_event_waits == 0 and s.total_pages == 10
        assert s.n_syncs == 0 and "synchronize" not in dev.counters().calls
        for x in (b, c):
            x.free()
        pool._check()
    assert dev._backend.live_events() == 0


def test_at_the_limit_the_pool_waits_on_the_event_not_the_device(dev: vmmpool.Device) -> None:
    with PagePool(dev, limit=8 * 2 * MiB) as pool:
        P = pool.page_size
        a = pool.malloc(8 * P, stream=1)
        dev._backend.hold_stream(1)
        a.free()
        before = dev.counters()
        b = pool.malloc(8 * P, stream=2)  # nothing else left: wait for stream 1's work
        delta = dev.counters() - before
        assert delta["event_record"] == 1 and delta["event_query"] == 1
        assert delta["event_wait"] == 1 and delta["unmap"] == 1
        assert "synchronize" not in delta and "create" not in delta
        s = pool.stats()
        assert (s.n_events, s.n_event_queries, s.n_event_waits, s.n_syncs) == (1, 1, 1, 0)
        b.free()
        pool._check()


def test_one_event_per_stream_per_reclaim_and_none_on_the_hot_path(dev: vmmpool.Device) -> None:
    with PagePool(dev, limit=13 * 2 * MiB) as pool:
        P = pool.page_size
        for _ in range(3):
            pool.malloc(3 * P, stream=1).free()  # steady state: no driver call at all
            pool.malloc(1000, stream=1).free()  # (a page of the small-block heap)
        before = dev.counters()
        for _ in range(100):
            pool.malloc(3 * P, stream=1).free()
            pool.malloc(1000, stream=1).free()
        assert dev.counters() - before == {}
        before = dev.counters()
        # past the growth budget, stream 2 reuses stream 1's large cached range (one event)
        xs = [pool.malloc(3 * P, stream=s) for s in (2, 3, 4)]
        delta = dev.counters() - before
        assert delta["event_record"] == 1 and delta["event_query"] == 1 and delta["unmap"] == 2
        for x in xs:
            x.free()
        before = dev.counters()
        big = pool.malloc(13 * P, stream=5)  # every page: the limit
        delta = dev.counters() - before
        # one event each for streams 2-4; stream 1's last page needs none (its work is known done)
        assert delta["event_record"] == 3 and delta["event_query"] == 3 and delta["unmap"] == 4
        big.free()
        pool._check()


def test_a_completed_event_needs_no_second_query(dev: vmmpool.Device) -> None:
    with PagePool(dev, limit=4 * 2 * MiB) as pool:
        P = pool.page_size
        xs = [pool.malloc(P, stream=1) for _ in range(4)]
        xs[0].free()
        xs[2].free()  # two ranges of stream 1, freed before one event
        y = pool.malloc(2 * P, stream=2)  # at the limit: needs both
        assert dev.counters().calls["event_query"] == 1
        y.free()
        for x in (xs[1], xs[3]):
            x.free()
        pool._check()


def test_event_faults_leave_the_pool_as_it_was(dev: vmmpool.Device) -> None:
    with PagePool(dev, limit=4 * 2 * MiB) as pool:
        P = pool.page_size
        a = pool.malloc(4 * P, stream=1)
        a.free()
        for op in ("event_record", "event_query"):
            dev._backend.inject_fault(op, 1, name="CUDA_ERROR_LAUNCH_FAILED")
            before = pool.stats()
            with pytest.raises(vmmpool.DriverError):
                pool.malloc(4 * P, stream=2)
            after = pool.stats()
            assert (after.total_pages, after.mapped_pages, after.free_pages) == (
                before.total_pages, before.mapped_pages, before.free_pages,
            )
            pool._check()
        b = pool.malloc(4 * P, stream=2)  # and it carries on
        b.free()
    assert dev._backend.live_events() == 0 and dev.counters().live == (0, 0, 0)


# -------------------------------------------------------- sub-page blocks
def test_blocks_share_pages_and_span_page_boundaries(dev: vmmpool.Device) -> None:
    with PagePool(dev, limit=16 * 2 * MiB) as pool:
        P = pool.page_size
        a = pool.malloc(P // 2)
        b = pool.malloc(P)  # from P/2 to 3P/2: spans the boundary, shares both pages
        c = pool.malloc(P // 2)  # up to 2P
        assert (b.ptr, c.ptr) == (a.ptr + P // 2, a.ptr + 3 * P // 2)
        s = pool.stats()
        assert s.total_pages == 2 and s.small_pages == 2 and s.pinned_pages == 2
        b.free()  # both pages are still touched by a and c: nothing to reclaim
        pool.defragment()
        s = pool.stats()
        assert s.reclaimable_pages == 0 and s.mapped_pages == 2 and s.free_pages == 0
        a.free()  # page 0 is touched by no live block now: it goes, page 1 stays
        assert pool.stats().reclaimable_pages == 1
        pool.defragment()
        s = pool.stats()
        assert s.mapped_pages == 1 and s.free_pages == 1 and s.pinned_pages == 1
        d = pool.malloc(P)  # needs one page whichever way: page 0 is mapped again
        assert d.ptr in (a.ptr, a.ptr + P // 2) and pool.stats().mapped_pages == 2
        for x in (c, d):
            x.free()
        pool._check()


def test_waste_per_request_size_class(dev: vmmpool.Device) -> None:
    # Only the 512-byte rounding: 2.1 MiB takes 2.1 MiB, not two pages.
    with PagePool(dev, limit=64 * 2 * MiB) as pool:
        for nbytes in (1, 511, 513, 100_000, MiB + 1, 2 * MiB + MiB // 10, 5 * MiB + 3):
            xs = [pool.malloc(nbytes) for _ in range(8)]
            s = pool.stats()
            assert s.allocated_bytes - s.requested_bytes < 8 * ALIGNMENT
            assert s.pinned_pages <= -(-8 * s.allocated_bytes // 8 // pool.page_size) + 1
            for x in xs:
                x.free()
        pool._check()


# ---------------------------------------------------- reuse before create
def synthetic_step(seed: int, streams: int = 1) -> list[tuple[str, int, int, int]]:
    """Training steps of 1-16 MiB tensors: weights, then per step a forward pass
    (activations kept, temporaries freed at once, layer shapes recurring), a
    backward pass freeing activations in reverse, and gradient temporaries."""
    rng = random.Random(seed)
    ops: list[tuple[str, int, int, int]] = []
    n = 0

    def size(lo: int, hi: int) -> int:
        return rng.randint(lo, hi) * MiB + rng.randint(0, 2047) * 512

    for _ in range(12):  # weights
        n += 1
        ops.append(("a", n, size(1, 16), 0))
    layers = [(size(1, 16), size(1, 16), size(1, 8), rng.randrange(streams)) for _ in range(10)]
    for _step in range(4):
        acts = []
        for tmp_size, act_size, _grad, s in layers:
            n += 1
            ops.append(("a", n, tmp_size, s))
            n += 1
            acts.append(n)
            ops.append(("a", n, act_size, s))
            ops.append(("f", n - 1, 0, s))
        for (_t, _a, grad, _s), i in zip(reversed(layers), reversed(acts), strict=True):
            n += 1
            ops.append(("a", n, grad, 0))
            ops.append(("f", i, 0, 0))
            ops.append(("f", n, 0, 0))
    return ops


def replay(ops: list[tuple[str, int, int, int]], limit: int | None) -> tuple[bool, int, int]:
    dev = vmmpool.Device.emulated(capacity=4096 * MiB)
    live: dict[int, vmmpool.Allocation] = {}
    cur = peak = 0
    with PagePool(dev, limit=limit) as pool:
        try:
            for kind, i, nbytes, stream in ops:
                if kind == "a":
                    live[i] = pool.malloc(nbytes, stream=stream)
                    cur += nbytes
                    peak = max(peak, cur)
                else:
                    a = live.pop(i)
                    cur -= a.size
                    a.free()
        except vmmpool.OutOfMemoryError:
            return False, peak, pool.stats().peak_reserved_bytes
        s = pool.stats()
        assert s.n_syncs == 0 and "synchronize" not in dev.counters().calls
        return True, peak, s.peak_reserved_bytes


@pytest.mark.parametrize(("streams", "default", "at_limit"), [(1, 1.09, 1.03), (3, 1.15, 1.06)])
def test_the_pool_holds_what_the_work_needs(streams: int, default: float, at_limit: float) -> None:
    # Measured on 2026-12-02 (small and large heaps, adaptive growth slack):
    # one stream 1.085 (default) and <= 1.03 (smallest limit); three streams
    # 1.112 and <= 1.06. On this 107-page trace the budget's fixed part (2
    # pages) and its slack (up to 8 pages, grown by remaps below the limit)
    # are large; on the shared traces they are under 1%. Page rounding alone
    # would cost 1.13 here. The bounds guard against regressions.
    ops = synthetic_step(7, streams)
    ok, peak, total = replay(ops, None)
    assert ok and total <= default * peak, f"default settings: {total / peak:.3f} x peak live"
    P = 2 * MiB
    limit = -(-int(at_limit * peak) // P) * P
    ok, _, total = replay(ops, limit)
    assert ok, f"the replay does not complete at {at_limit} x peak live"
    assert total <= limit


# ------------------------------------------------- per-thread default stream
def test_per_thread_default_stream_is_one_stream_per_thread(dev: vmmpool.Device) -> None:
    """Handle 2 (CU_STREAM_PER_THREAD) names each calling thread's own stream: memory freed
    on it is reused in stream order by the same thread only; another thread gets memory of
    its own stream. Snapshots, histories and Allocation.stream still say 2."""
    import threading

    with PagePool(dev, limit=16 * 2 * MiB) as pool:
        pool.record_history(context=None)
        a = pool.malloc(4096, stream=2)
        ptr = a.ptr
        a.free()
        got: list[int] = []

        def other() -> None:
            b = pool.malloc(4096, stream=2)
            got.append(b.ptr)
            assert b.stream == 2
            b.free()

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert got and got[0] != ptr  # not the block the main thread's stream freed
        c = pool.malloc(4096, stream=2)
        assert c.ptr == ptr and c.stream == 2  # the same thread reuses it at once
        assert len(pool._core.streams) == 2
        assert {p.stream for p in pool.snapshot() if p.stream is not None} == {2}
        snap = pool.memory_snapshot()
        assert {s["stream"] for s in snap["segments"]} == {2}
        assert {e["stream"] for e in snap["device_traces"][0]} == {2}
        c.free()
        pool._check()


def test_per_thread_default_stream_events_go_on_the_legacy_stream(dev: vmmpool.Device) -> None:
    """A thread cannot record on another thread's per-thread stream: events covering memory
    freed on handle 2 are recorded on the legacy default stream (1), which waits for every
    blocking stream's work, whichever thread records them."""
    import threading

    backend = dev._backend
    recorded: list[int] = []
    orig = backend.event_record

    def record(stream: int) -> int:
        recorded.append(stream)
        return orig(stream)

    with PagePool(dev, limit=8 * 2 * MiB) as pool:
        P = pool.page_size
        box: list[vmmpool.Allocation] = []
        t = threading.Thread(target=lambda: box.append(pool.malloc(6 * P, stream=2)))
        t.start()
        t.join()
        box.pop().free()  # freed on the other thread's per-thread stream
        backend.event_record = record  # type: ignore[method-assign]
        try:
            b = pool.malloc(8 * P, stream=2)  # at the limit: takes that thread's pages
        finally:
            backend.event_record = orig  # type: ignore[method-assign]
        assert recorded == [1], recorded
        assert pool.stats().n_syncs == 0
        b.free()
        pool._check()

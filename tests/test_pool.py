"""Behaviour of vmmpool.PagePool: allocation, caches, remapping, limits, errors, lifetime.

Tests taking the ``device`` fixture run on the host emulator and, where a GPU
is present, on CUDA; the others use host-only tools (fault injection, tiny
pages) through the ``host`` fixture or their own emulated device.
"""

from __future__ import annotations

import gc
import itertools
import logging
import pickle
import threading
import weakref

import numpy as np
import pytest

import vmmpool
from vmmpool import _logq
from vmmpool._options import PER_THREAD_KEYS, pool_key, stream_key
from vmmpool._pool import ALIGNMENT, Allocation, PageInfo, PagePool, PoolStats
from vmmpool._pool._core import REFUSED_MAX_WAIT

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return ((np.arange(n, dtype=np.uint32) * 13 + seed * 7 + 3) % 251).astype(np.uint8).tobytes()


def fill(a: Allocation, seed: int) -> None:
    a.device.write(a.ptr, pattern(seed, a.size))


def intact(a: Allocation, seed: int) -> bool:
    return bytes(a.device.read(a.ptr, a.size)) == pattern(seed, a.size)


def pool_of(device: vmmpool.Device, pages: int = 16, **kw: object) -> PagePool:
    return PagePool(device, limit=pages * device.granularity, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------- basics
def test_malloc_small_and_large(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device) as pool:
        assert pool.page_size == P and pool.limit == 16 * P and pool.device is device
        assert pool.small_threshold is None  # no page rounding
        small = pool.malloc(1000)
        half = pool.malloc(P // 2)
        large = pool.malloc(P + 1)
        assert small.ptr % ALIGNMENT == 0 and small.ptr != 0 and ALIGNMENT == 512
        assert half.ptr == small.ptr + 1024  # carved right after it, in the same page
        # Blocks over a page come from another heap (arena) than blocks of a page or less.
        assert not small.ptr - 64 * P < large.ptr < small.ptr + 64 * P
        assert (small.size, half.size, large.size) == (1000, P // 2, P + 1)
        assert small.device is device and small.stream == 0 and small.pool is pool
        assert int(large) == large.ptr
        fill(small, 1)
        fill(half, 3)
        fill(large, 2)
        s = pool.stats()
        assert s.requested_bytes == 1000 + P // 2 + P + 1
        assert s.allocated_bytes == 1024 + P // 2 + P + 512  # 512-byte rounding, no page rounding
        # small and half share a page; large spans two pages of its own
        assert s.live_allocations == 3 and s.total_pages == 3 and s.small_pages == 1
        assert intact(small, 1) and intact(half, 3) and intact(large, 2)
        small.free()
        half.free()
        pool.free(large)
        assert small.freed and large.freed
        s = pool.stats()
        assert (s.requested_bytes, s.allocated_bytes, s.live_allocations) == (0, 0, 0)
        assert s.cached_bytes == 3 * P and s.reclaimable_pages == 3
        assert (s.n_malloc, s.n_free) == (3, 3)
        pool._check()


def test_check_compares_each_slot_with_what_the_backend_maps(device: vmmpool.Device) -> None:
    # PagePool._check() asks the backend what backs each slot (Backend.mapped_at: the
    # emulated device's page tables, or the CUDA backend's record of its cuMemMap and
    # cuMemSetAccess calls):
    # a slot mapping another page's handle, one with the wrong access, or a mapping the
    # pool does not know of is an invariant broken. Each corruption is undone afterwards.
    P = device.granularity
    backend = device._backend
    with pool_of(device) as pool:
        a, b = pool.malloc(P), pool.malloc(P)
        core = pool._core
        arena = next(x for x in core.arenas if any(q is not None for q in x.slots))
        sa, sb = ((x.ptr - arena.base) // P for x in (a, b))
        pa, pb = arena.slots[sa], arena.slots[sb]
        assert pa is not None and pb is not None
        start, size, handle, acc = backend.mapped_at(a.ptr)
        assert (start, size, handle) == (a.ptr, P, pa.phys.handle)
        assert acc is vmmpool.Access.READWRITE
        assert backend.mapped_at(a.ptr + P // 2)[:3] == (a.ptr, P, pa.phys.handle)
        pool._check()

        def remap(h: int) -> None:
            backend.unmap(a.ptr, P)
            backend.map(a.ptr, P, h)
            backend.set_access(a.ptr, P, vmmpool.Access.READWRITE, (device.ordinal,))

        remap(pb.phys.handle)  # slot of `a` now maps b's page
        with pytest.raises(AssertionError, match=f"slot {sa}: page {pa.index} .* of handle"):
            pool._check()
        remap(pa.phys.handle)
        pool._check()

        # take write away
        backend.set_access(a.ptr, P, vmmpool.Access.READ, (device.ordinal,))
        with pytest.raises(AssertionError, match=f"slot {sa}: page {pa.index} is mapped with access"):
            pool._check()
        backend.set_access(a.ptr, P, vmmpool.Access.READWRITE, (device.ordinal,))
        pool._check()
        backend.unmap(a.ptr, P)  # mapped again without access: none until granted
        backend.map(a.ptr, P, pa.phys.handle)
        assert backend.mapped_at(a.ptr)[3] is vmmpool.Access.NONE
        with pytest.raises(AssertionError, match=f"slot {sa}: page {pa.index} is mapped with access"):
            pool._check()
        backend.set_access(a.ptr, P, vmmpool.Access.READWRITE, (device.ordinal,))
        pool._check()

        free = next((s for s in range(arena.nslots) if arena.slots[s] is None), None)
        if free is not None:  # a mapping behind the pool's back, on a slot it has not mapped
            addr = arena.base + free * P
            assert backend.mapped_at(addr) is None
            h = backend.create(P)
            backend.map(addr, P, h)
            with pytest.raises(AssertionError, match=f"slot {free}: the backend maps it"):
                pool._check()
            backend.unmap(addr, P)
            backend.release(h)
            pool._check()
        a.free()
        b.free()
    assert backend.mapped_at(a.ptr) is None  # closed: nothing mapped there


def test_zero_size_allocations_are_valid_unique_and_non_null(device: vmmpool.Device) -> None:
    with pool_of(device) as pool:
        zs = [pool.malloc(0) for _ in range(10)]
        ptrs = {z.ptr for z in zs}
        assert len(ptrs) == 10 and 0 not in ptrs
        assert all(z.size == 0 for z in zs)
        assert pool.stats().allocated_bytes == 10 * ALIGNMENT
        for z in zs:
            z.free()
        pool._check()


def test_small_allocations_share_pages(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device) as pool:
        blocks = [pool.malloc(4096) for _ in range(1000)]
        s = pool.stats()
        assert s.total_pages == -(-1000 * 4096 // P)  # 2 pages of 2 MiB, not 1000
        assert s.small_pages == s.total_pages  # both pages hold many blocks
        ptrs = sorted(b.ptr for b in blocks)
        assert all(b - a >= 4096 for a, b in itertools.pairwise(ptrs))
        for b in blocks:
            b.free()
        s = pool.stats()
        assert s.pinned_pages == 0 and s.reclaimable_pages == s.total_pages and s.small_pages == 0
        # Pages no live block touches go back to the free pages on demand.
        pool.defragment()
        s = pool.stats()
        assert s.mapped_pages == 0 and s.free_pages == s.total_pages
        pool._check()


def test_small_blocks_coalesce_back_into_a_whole_page(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device) as pool:
        a, b, c = pool.malloc(1000), pool.malloc(3000), pool.malloc(500)
        assert b.ptr == a.ptr + 1024 and c.ptr == b.ptr + 3072
        b.free()
        d = pool.malloc(2900)  # best fit: the hole b left
        assert d.ptr == b.ptr
        for x in (a, c, d):
            x.free()
        s = pool.stats()
        assert s.cached_blocks == 1 and s.cached_bytes == P
        pool._check()


def test_same_stream_reuse_is_immediate_other_streams_are_separate(device: vmmpool.Device) -> None:
    # Streams 1 and 2 (legacy and per-thread default streams) are valid handles on a GPU too.
    P = device.granularity
    with pool_of(device) as pool:
        a = pool.malloc(3 * P, stream=1)
        ptr = a.ptr
        a.free()
        b = pool.malloc(3 * P, stream=1)
        assert b.ptr == ptr and b.stream == 1
        c = pool.malloc(3 * P, stream=2)
        assert c.ptr != ptr and c.stream == 2
        b.free()
        c.free()
        s1 = pool.malloc(100, stream=1)
        s2 = pool.malloc(100, stream=2)
        assert s1.ptr // P != s2.ptr // P  # small pages belong to one stream
        s1.free()
        s2.free()
        pool._check()


def test_steady_state_makes_no_backend_calls(device: vmmpool.Device) -> None:
    P = device.granularity
    sizes = [256, 4096, 65536, P // 2, 2 * P, 4 * P + 1, 100, P + 7]
    with pool_of(device, pages=24) as pool:
        window: list[Allocation] = []

        def step(i: int) -> None:
            window.append(pool.malloc(sizes[i % len(sizes)], stream=i % 2))
            if len(window) > 3:
                window.pop(0).free()

        for i in range(5 * len(sizes)):  # warm-up
            pool.malloc(sizes[i % len(sizes)]).free()
            step(i)
        before = device.counters()
        for i in range(400):
            pool.malloc(sizes[i % len(sizes)]).free()
            step(i)
        assert device.counters() - before == {}
        for a in window:
            a.free()
        pool._check()


def test_preallocate_maps_up_front_and_never_calls_the_driver_again(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=8, preallocate=8 * P) as pool:
        s = pool.stats()
        assert s.total_pages == 8 and s.cached_bytes == 8 * P and s.n_page_creations == 8
        before = device.counters()
        allocs = [pool.malloc(n) for n in (100, P, 3 * P, 5000, 2 * P)]
        for a in allocs:
            a.free()
        allocs = [pool.malloc(n) for n in (4 * P, P + 1, 300)]
        assert device.counters() - before == {}
        for a in allocs:
            a.free()
    with pytest.raises(ValueError, match="preallocate"):
        pool_of(device, pages=4, preallocate=5 * P)


# ------------------------------------------------------------ limits and OOM
def test_oom_exactly_at_the_limit_and_recovery(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=16) as pool:
        big = pool.malloc(15 * P)
        one = pool.malloc(P)  # exactly at the limit
        assert pool.stats().largest_allocatable == 0
        with pytest.raises(vmmpool.OutOfMemoryError) as info:
            pool.malloc(1)  # even a small block needs a page
        err = info.value
        assert isinstance(err, MemoryError)
        assert (err.requested, err.in_use, err.limit, err.cached) == (1, 16 * P, 16 * P, 0)
        for word in ("requested 1 bytes", f"limit {16 * P}", "in use", "cached"):
            assert word in str(err)
        one.free()
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(2 * P)
        s = pool.stats()
        assert s.n_ooms == 2 and s.live_allocations == 1 and s.largest_allocatable == P
        pool._check()
        again = pool.malloc(P)  # recovers: the cached page is reused
        again.free()
        big.free()
        whole = pool.malloc(16 * P)
        whole.free()
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(16 * P + 1)
        pool._check()


def test_oom_error_pickles() -> None:
    err = vmmpool.OutOfMemoryError(5, 6, 7, cached=8, message="x")
    back = pickle.loads(pickle.dumps(err))
    assert (back.requested, back.in_use, back.limit, back.cached) == (5, 6, 7, 8)


def test_driver_oom_below_the_pool_limit_reclaims_then_raises() -> None:
    dev = vmmpool.Device.emulated(capacity=8 * (2 * MiB))
    other = [vmmpool.create(2 * MiB, dev) for _ in range(2)]  # another user holds 2 pages
    with PagePool(dev) as pool:  # limit: the device's 8 pages
        a = pool.malloc(6 * 2 * MiB)
        a.free()
        b = pool.malloc(3 * 2 * MiB, stream=1)  # device full: reclaims a's cached pages
        assert pool.stats().n_remaps == 1
        with pytest.raises(vmmpool.OutOfMemoryError, match="device is out of memory"):
            pool.malloc(4 * 2 * MiB, stream=1)
        b.free()
        pool._check()
    for p in other:
        p.close()


def test_n_ooms_counts_requests_that_raised_a_driver_out_of_memory() -> None:
    """A driver out-of-memory from a mapping (not from the pool's own refusal) is counted
    once when the request raises it, and not at all (never below zero) when the request
    is served elsewhere after it. Both used to be off: the pool decremented a count the
    driver's error had never incremented (n_ooms went to -1 after a successful malloc),
    and a request that raised the driver's error was not counted."""
    P = 64 << 10
    dev = vmmpool.Device.emulated(capacity=64 * P, granularity=P)
    with PagePool(dev) as pool:
        a = pool.malloc(5 * P // 4)
        b = pool.malloc(5 * P // 4)  # large heap: [1.25P, 2.5P) once freed, no whole page
        keep = [pool.malloc(P // 2), pool.malloc(P // 2)]  # the small heap's page is full
        b.free()
        dev._backend.inject_fault("map", nth=1)  # the new small page's map fails
        y = pool.malloc(P // 2)  # served from the large heap's free range instead
        assert pool.stats().n_ooms == 0
        pool._check()
        y.free()
        for x in keep:
            x.free()
        a.free()
    dev2 = vmmpool.Device.emulated(capacity=64 * P, granularity=P)
    with PagePool(dev2) as pool:
        keep = [pool.malloc(P // 2), pool.malloc(P // 2)]
        dev2._backend.inject_fault("map", nth=1)
        with pytest.raises(vmmpool.OutOfMemoryError, match="injected fault in map"):
            pool.malloc(P // 2)
        assert pool.stats().n_ooms == 1
        pool._check()
        keep.append(pool.malloc(P // 2))  # the map works again: served, not counted
        assert pool.stats().n_ooms == 1
        for x in keep:
            x.free()


def test_a_block_joining_two_free_ranges_can_use_the_cached_pages_it_leaves() -> None:
    """A block placed across an unmapped slot, joining the free ranges on either side,
    needs a page for that slot: the cached pages of the right range that the block does
    not cover can be remapped there. They could not: both ranges left the free index
    before the pages were gathered, so a request failed ("0 cached page(s) reclaimable")
    with 5 pages cached and largest_allocatable above the request."""
    P = 64 << 10
    dev = vmmpool.Device.emulated(capacity=64 * P, granularity=P)
    with PagePool(dev, limit=6 * P) as pool:
        x = pool.malloc(2 * P, stream=1)  # slots 0-1
        y = pool.malloc(P + P // 2, stream=1)  # slots 2-3 (half)
        z = pool.malloc(2 * P + P // 2, stream=1)  # slots 3 (half)-5
        fill(x, 1)
        y.free()
        w = pool.malloc(P // 2, stream=2)  # at the limit: y's whole slot 2 is remapped here
        fill(w, 2)
        x.free()
        z.free()  # stream 1: 2 cached pages, slot 2 unmapped, 3 cached pages
        s = pool.stats()
        assert s.total_pages == 6 and s.pinned_pages == 1
        r = 4 * P + P // 4  # joins both ranges across slot 2; slot 5's page is left over
        assert s.largest_allocatable >= r
        big = pool.malloc(r, stream=1)
        fill(big, 3)
        pool._check()
        assert pool.stats().total_pages == 6
        assert intact(big, 3) and intact(w, 2)
        big.free()
        w.free()
        pool._check()
    assert dev.counters().live == (0, 0, 0)


# ------------------------------------------- the device full below the limit
def refusal_schedule(first: int, upto: int) -> list[int]:
    """The requests (indexes below `upto`) that ask a refusing device for pages, from `first`."""
    out, wait, i = [first], 1, first
    while i + wait + 1 < upto:
        i += wait + 1
        out.append(i)
        wait = min(2 * wait, REFUSED_MAX_WAIT)
    return out


class Shared:
    """Two pools on one emulated device of 16 pages: B holds 10, so A (limit 14) fills it at 6."""

    def __init__(self, **kw: object) -> None:
        self.dev = vmmpool.Device.emulated(capacity=16 * (2 * MiB))
        self.P = P = self.dev.granularity
        self.b = PagePool(self.dev, limit=14 * P)
        self.hog = [self.b.malloc(P) for _ in range(10)]
        self.a = PagePool(self.dev, limit=14 * P, **kw)  # type: ignore[arg-type]

    def request(self, i: int) -> tuple[dict[str, int], int]:
        """A slow-path request of A (5 pages on alternate streams: each remaps the other's
        cached pages while the device is full); returns its backend calls and pages created."""
        before, made = self.dev.counters(), self.a.stats().n_page_creations
        x = self.a.malloc(5 * self.P, stream=1 + i % 2)
        calls = self.dev.counters() - before
        x.free()
        return calls, self.a.stats().n_page_creations - made

    def close(self) -> None:
        self.a.close()
        self.b.close()
        assert self.dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize(
    "kw",
    [{}, {"keep_cached": True}, {"preallocate": 6 * 2 * MiB}],
    ids=["default", "keep_cached", "preallocate"],
)
def test_device_full_below_the_limit_stops_asking_until_the_backoff_allows(kw: dict[str, object]) -> None:
    """A pool whose device runs out below its limit (another pool holds the rest) serves
    from its cached pages without a failing create on every slow-path request (each one
    a slow driver call on a GPU): it asks the device again after 1, 2, 4, ... requests,
    and grows again at the first ask after the other pool gave its memory back."""
    sh = Shared(**kw)
    a = sh.a
    live = a.malloc(1000, stream=9)  # live data on a page of A's
    fill(live, 5)
    failed: list[int] = []
    asked: list[int] = []
    for i in range(30):
        calls, made = sh.request(i)
        if calls.get("create", 0):
            asked.append(i)
        if calls.get("create", 0) > made:
            assert calls["create"] == made + 1  # one refusal a request at most
            failed.append(i)
        assert intact(live, 5)
    assert a.stats().total_pages == 6 and a.stats().n_ooms == 0
    # Before the change: a failing create on every request from the first refusal on.
    assert failed == refusal_schedule(failed[0], 30) and len(failed) == 5, failed
    assert [i for i in asked if i > failed[0]] == failed[1:]  # no other create call after it
    a._check()
    # B gives its memory back: A grows at its next ask, not before.
    for x in sh.hog:
        x.free()
    sh.b.trim()
    grown = refusal_schedule(failed[0], 100)[len(failed)]
    for i in range(30, grown):
        calls, _made = sh.request(i)
        assert "create" not in calls, (i, calls)
    calls, made = sh.request(grown)
    assert calls["create"] == made > 0  # past the mark, and no refusal
    assert a.stats().total_pages > 6
    for i in range(grown + 1, grown + 3):
        sh.request(i)
    for i in range(grown + 3, grown + 9):  # it settles: no backend call at all
        assert sh.request(i)[0] == {}, i
    assert intact(live, 5)
    live.free()
    a._check()
    sh.close()


def test_device_full_below_the_limit_asks_before_a_request_fails() -> None:
    """A request that cannot be served without new pages asks the device even while the
    pool is not asking it: a genuinely full device still raises OutOfMemoryError saying
    so (and leaves the pool consistent), and memory given back is used at once."""
    sh = Shared()
    a, P = sh.a, sh.P
    live = a.malloc(1000, stream=9)
    fill(live, 7)
    for i in range(4):  # A holds the 6 pages left (5 cached), and the device refused one
        sh.request(i)
    core = a._core
    assert core.refused_at == 6 and core.refused_skips < core.refused_wait
    s0 = a.stats()
    before = sh.dev.counters()
    with pytest.raises(vmmpool.OutOfMemoryError, match="device is out of memory") as e:
        a.malloc(6 * P, stream=3)  # 5 cached pages, 1 more the device does not have
    assert (sh.dev.counters() - before).get("create") == 1  # asked it, once
    assert "capacity exhausted" in str(e.value)
    s1 = a.stats()
    assert s1.n_ooms == s0.n_ooms + 1 and s1.total_pages == 6 and s1.live_allocations == 1
    a._check()
    before = sh.dev.counters()
    with pytest.raises(vmmpool.OutOfMemoryError, match="device is out of memory"):
        a.acquire_pages(6)
    assert (sh.dev.counters() - before).get("create") == 1
    assert a.stats().n_ooms == s0.n_ooms + 2
    a._check()
    sh.request(4)  # still serves from its cached pages
    assert intact(live, 7)
    # B frees 4 pages: the next request that needs them gets them, whatever the backoff says.
    for x in sh.hog[:4]:
        x.free()
    sh.b.trim()
    assert core.refused_at == 6 and core.refused_skips < core.refused_wait
    big = a.malloc(7 * P, stream=4)
    fill(big, 8)
    assert 8 <= a.stats().total_pages <= 10 and core.refused_at == -1
    assert intact(live, 7) and intact(big, 8)
    big.free()
    live.free()
    a._check()
    sh.close()


def test_device_full_one_request_counts_as_one_refusal() -> None:
    """A request that gathers pages twice (its own slots, then across a free tail) and then
    retries asking the device made up to three failing creates, each doubling the wait (a
    refused 7-page request left it at 4, not 1). Now a request does not ask the device again
    once it refused a page, and once a request skipped asking it does not ask again but in its
    retry: one failing create and one doubling per request."""
    sh = Shared()
    a, P = sh.a, sh.P
    core = a._core
    live = a.malloc(1000, stream=9)  # its free tail is where a placement across pages looks
    fill(live, 6)
    waits = []
    for _ in range(3):
        before, made = sh.dev.counters(), a.stats().n_page_creations
        with pytest.raises(vmmpool.OutOfMemoryError, match="device is out of memory"):
            a.malloc(7 * P - 4096, stream=9)  # 5 more pages than the device has
        failing = (sh.dev.counters() - before).get("create", 0) - (a.stats().n_page_creations - made)
        assert failing == 1
        waits.append(core.refused_wait)
        a._check()
    assert waits == [1, 2, 4] and core.refused_at == 6
    sh.request(0)  # still serves from its cached pages
    assert intact(live, 6)
    live.free()
    a._check()
    sh.close()


def test_device_full_near_the_limit_a_growing_block_counts_as_one_refusal() -> None:
    """Near the limit, a request like a set of growing blocks first tries the pages after the
    newest of them (fit_after_growing), then the usual placement: two steps of one request.
    Each ran as a request of its own, so a device that ran out just below the limit got two
    failing creates a request and the wait doubled twice (1 -> 2 -> 8 -> 32). Now the first
    step's refusal carries into the second: one failing create and one doubling a request."""
    dev = vmmpool.Device.emulated(capacity=16 * (2 * MiB))
    P = dev.granularity
    b = PagePool(dev, limit=14 * P)
    hog = [b.malloc(P) for _ in range(3)]  # the device has 13 pages for A
    a = PagePool(dev, limit=14 * P)
    core = a._core
    filler = [a.malloc(P) for _ in range(6)]
    caches = [a.malloc(3 * P // 2) for _ in range(4)]  # four alike: a growing set
    for i, x in enumerate(caches):
        fill(x, i)
    assert a.stats().total_pages == 12  # within SPLIT_OPEN_MARGIN of the limit: the rule applies
    waits = []
    for _ in range(3):
        before, made = dev.counters(), a.stats().n_page_creations
        with pytest.raises(vmmpool.OutOfMemoryError, match="device is out of memory"):
            a.malloc(3 * P // 2 + 16384)  # one grown: 2 pages after the newest, the device has 1
        failing = (dev.counters() - before).get("create", 0) - (a.stats().n_page_creations - made)
        assert failing == 1
        waits.append(core.refused_wait)
        assert core.carry is None
        a._check()
    assert waits == [1, 2, 4] and core.refused_at == 13
    assert all(intact(x, i) for i, x in enumerate(caches))
    for x in caches + filler + hog:
        x.free()
    a.close()
    b.close()
    assert dev.counters().live == (0, 0, 0)


def test_device_full_below_the_limit_recreates_what_the_pool_gave_back() -> None:
    """Below the mark where the device refused, pages the pool released are created again
    without waiting for the backoff; a refusal there (someone took them) lowers the mark."""
    sh = Shared()
    a, P = sh.a, sh.P
    core = a._core
    live = a.malloc(1000, stream=9)
    fill(live, 3)
    for i in range(3):
        sh.request(i)
    assert core.refused_at == 6
    a.trim()  # gives the 5 cached pages back; the live one stays
    assert a.stats().total_pages == 1
    calls, made = sh.request(3)
    assert calls["create"] == made == 5  # up to the mark, no refusal
    a.trim()
    taken = [sh.b.malloc(P) for _ in range(2)]  # B takes 2 of the 5
    before, made = sh.dev.counters(), a.stats().n_page_creations
    a.malloc(3 * P, stream=1).free()
    assert (sh.dev.counters() - before)["create"] == a.stats().n_page_creations - made == 3
    before = sh.dev.counters()
    a.malloc(3 * P, stream=2).free()  # the device refuses at 4 pages: stream 1's are remapped
    assert (sh.dev.counters() - before)["create"] == 1 and a.stats().n_page_creations == made + 3
    assert core.refused_at == 4 and a.stats().total_pages == 4
    wait = core.refused_wait
    assert wait >= 2  # doubled: a refusal again
    for i in range(wait + 1):  # the 3 cached pages serve; the device is asked after `wait`
        before = sh.dev.counters()
        a.malloc(3 * P, stream=1 + i % 2).free()
        assert (sh.dev.counters() - before).get("create", 0) == (i == wait)
    assert core.refused_wait == 2 * wait and a.stats().n_page_creations == made + 3
    for x in taken:
        x.free()
    sh.b.trim()
    calls, made = sh.request(5)  # would fail without 2 more pages: asks, and gets them
    assert calls["create"] == made == 2 and core.refused_at == -1
    assert intact(live, 3)
    live.free()
    a._check()
    sh.close()


def test_device_full_below_the_limit_survives_a_lowered_and_raised_limit() -> None:
    """A lowered limit gives pages back under the device's refusal; raised again, the pool
    recreates them without a refused call and keeps not asking for more."""
    sh = Shared()
    a, P = sh.a, sh.P
    core = a._core
    live = a.malloc(1000, stream=9)
    fill(live, 4)
    for i in range(2):
        sh.request(i)
    assert core.refused_at == 6 and core.refused_skips < core.refused_wait
    a.set_limit(4 * P)
    assert a.stats().total_pages <= 4 and core.refused_at == 6
    a._check()
    with pytest.raises(vmmpool.OutOfMemoryError, match="limit is reached"):
        a.malloc(5 * P, stream=1)
    a.set_limit(14 * P)
    calls, made = sh.request(2)
    assert calls.get("create", 0) == made > 0  # back up to the mark: no refusal
    assert a.stats().total_pages == 6 and core.refused_at == 6
    assert intact(live, 4)
    live.free()
    a._check()
    sh.close()


def test_limit_above_the_device_is_clamped() -> None:
    """Issue 8 item 8: largest_allocatable never promises more than the device has."""
    dev = vmmpool.Device.emulated(capacity=8 * (2 * MiB))
    clamped = r"limit 67108864 bytes is more than .* clamped to 16777216"
    with pytest.warns(vmmpool.VmmWarning, match=clamped) as w:
        pool = PagePool(dev, limit=32 * 2 * MiB)
    assert len(w) == 1 and w[0].filename == __file__  # once, pointing at the caller
    with pool:
        assert pool.limit == 8 * 2 * MiB
        assert pool.stats().largest_allocatable == 8 * 2 * MiB
        with pytest.warns(vmmpool.VmmWarning, match="clamped") as w:
            pool.set_limit(1 << 40)
        assert len(w) == 1 and w[0].filename == __file__
        assert pool.limit == 8 * 2 * MiB
        pool.malloc(8 * 2 * MiB).free()  # what it promises, it gives
        pool.set_limit(8 * 2 * MiB)  # exactly the device: no warning (warnings are errors here)


def test_set_limit(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=16) as pool:
        allocs = [pool.malloc(P) for _ in range(8)]
        for a in allocs[4:]:
            a.free()
        pool.set_limit(2 * P)  # below what is in use: allowed
        s = pool.stats()
        assert s.limit == 2 * P and s.total_pages == 4  # cached pages given back
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(P)
        for a in allocs[:3]:
            a.free()
        b = pool.malloc(P)  # 1 + 1 pinned <= 2
        pool.set_limit(16 * P + P // 2)  # rounded down to pages
        assert pool.limit == 16 * P
        c = pool.malloc(10 * P)
        for x in (allocs[3], b, c):
            x.free()
        pool.set_limit(None)
        assert pool.limit == device.total_memory // P * P
        with pytest.raises(ValueError):
            pool.set_limit(-1)
        with pytest.raises(TypeError):
            pool.set_limit(1.5)  # type: ignore[arg-type]
        pool._check()


def test_default_limit_is_the_device_memory(host: vmmpool.Device) -> None:
    with PagePool(host) as pool:
        assert pool.limit == host.total_memory
        assert pool.stats().total_pages == 0  # nothing created up front


# ---------------------------------------------------------- defragmentation
def test_defragment_by_remapping_keeps_survivors(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=16) as pool:
        allocs = [pool.malloc(P) for _ in range(16)]
        survivors = allocs[1::4]  # 4 pages scattered over the range
        for i, a in enumerate(survivors):
            fill(a, i)
        for a in allocs:
            if a not in survivors:
                a.free()
        # 12 cached pages in runs of <= 3: only remapping makes 12 contiguous.
        big = pool.malloc(12 * P)
        s = pool.stats()
        assert s.n_remaps == 1 and s.total_pages == 16 and s.n_page_creations == 16
        fill(big, 99)
        assert intact(big, 99)
        assert all(intact(a, i) for i, a in enumerate(survivors))
        assert not any(big.ptr < a.ptr + a.size and a.ptr < big.ptr + big.size for a in survivors)
        big.free()
        for a in survivors:
            a.free()
        pool._check()


def test_remap_waits_with_events_never_a_device_synchronize() -> None:
    dev = vmmpool.Device.emulated(capacity=16 * 2 * MiB)
    with PagePool(dev) as pool:
        P = pool.page_size
        allocs = [pool.malloc(P, stream=1 + i // 6) for i in range(16)]  # 6 + 6 + 4 pages
        for a in allocs:
            a.free()
        before = dev.counters()
        big = pool.malloc(16 * P, stream=9)
        delta = dev.counters() - before
        assert "synchronize" not in delta
        # one event per stream whose cached pages leave it, recorded lazily, queried once
        assert delta["event_record"] == 3 and delta["event_query"] == 3
        assert delta["event_destroy"] == 3 and "event_wait" not in delta
        assert delta["map"] == 16 and delta["set_access"] == 1
        assert delta["unmap"] == 3  # each stream's cache had coalesced into one range
        big.free()
        assert dev._backend.live_events() == 0
        s = pool.stats()
        assert (s.n_syncs, s.n_events, s.n_event_queries, s.n_event_waits) == (0, 3, 3, 0)


def test_defragment_and_trim(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=16) as pool:
        keep = pool.malloc(100)
        allocs = [pool.malloc(2 * P) for _ in range(4)]
        for a in allocs:
            a.free()
        pool.defragment()
        s = pool.stats()
        assert s.free_pages == 8 and s.cached_bytes == P - ALIGNMENT and s.total_pages == 9
        phys = device.counters().physical_bytes
        assert pool.trim() == 8 * P
        assert device.counters().physical_bytes == phys - 8 * P
        s = pool.stats()
        assert s.total_pages == 1 and s.free_pages == 0 and s.n_page_releases == 8
        assert pool.trim() == 0
        keep.free()
        assert pool.trim() == P
        assert pool.stats().address_space_bytes == 0  # empty arenas are given back too
        a = pool.malloc(3 * P)  # and the pool carries on
        a.free()
        pool._check()


# ----------------------------------------------------------------- streams
class _CupyLike:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _Protocol:
    def __init__(self, handle: int = 1234) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class _TorchLike:
    cuda_stream = 77


def test_stream_key() -> None:
    assert stream_key(None) == 0
    assert stream_key(5) == 5
    assert stream_key(np.uint64(9)) == 9
    assert stream_key(_CupyLike(42)) == 42
    assert stream_key(_Protocol()) == 1234
    assert stream_key(_TorchLike()) == 77
    with pytest.raises(TypeError, match="stream"):
        stream_key("0")
    with pytest.raises(TypeError):
        stream_key(True)
    with pytest.raises(TypeError):
        stream_key(_CupyLike("x"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stream_key(-1)


def test_stream_objects_are_accepted(device: vmmpool.Device) -> None:
    with pool_of(device) as pool:
        a = pool.malloc(10, stream=_CupyLike(0))
        b = pool.malloc(10, stream=_Protocol(2))
        assert (a.stream, b.stream) == (0, 2)
        a.free()
        b.free()
        with pytest.raises(TypeError):
            pool.malloc(10, stream=object())
        pool._check()


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [1.5, "8", None, True, [1]])
def test_malloc_rejects_non_integer_sizes(device: vmmpool.Device, bad: object) -> None:
    with pool_of(device) as pool:
        keep = pool.malloc(100)
        with pytest.raises(TypeError, match="nbytes must be an int"):
            pool.malloc(bad)  # type: ignore[arg-type]
        assert pool.stats().live_allocations == 1
        keep.free()
        pool._check()


def test_malloc_rejects_negative_and_survives_huge(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device) as pool:
        with pytest.raises(ValueError, match=">= 0, got -1"):
            pool.malloc(-1)
        before = device.counters()
        for huge in (1 << 62, 10**30):
            with pytest.raises(vmmpool.OutOfMemoryError):
                pool.malloc(huge)
        assert device.counters() - before == {}  # refused before any driver call
        a = pool.malloc(np.int64(3 * P))
        assert a.size == 3 * P
        a.free()
        assert pool.stats().n_ooms == 2
        pool._check()


def test_double_free(device: vmmpool.Device) -> None:
    with pool_of(device) as pool:
        a = pool.malloc(100)
        b = pool.malloc(3 << 20)
        a.free()
        with pytest.raises(ValueError, match="already freed"):
            a.free()
        b.free()
        with pytest.raises(ValueError, match="already freed"):
            pool.free(b)
        s = pool.stats()
        assert (s.n_free, s.live_allocations) == (2, 0)
        c = pool.malloc(100)
        c.free()
        pool._check()


def test_free_of_another_pools_allocation(device: vmmpool.Device) -> None:
    with pool_of(device, pages=4) as p1, pool_of(device, pages=4) as p2:
        a = p1.malloc(100)
        with pytest.raises(ValueError, match="another PagePool"):
            p2.free(a)
        with pytest.raises(TypeError, match="Allocation"):
            p2.free(a.ptr)  # type: ignore[arg-type]
        assert not a.freed and p1.stats().live_allocations == 1
        p1.free(a)
        p1._check()
        p2._check()


def test_bad_constructor_arguments(host: vmmpool.Device) -> None:
    with pytest.raises(ValueError, match="multiple"):
        PagePool(host, page_size=3 * MiB)
    with pytest.raises(ValueError, match=">="):
        PagePool(host, page_size=MiB)
    with pytest.raises(ValueError):
        PagePool(host, limit=-1)
    with pytest.raises(TypeError):
        PagePool(host, limit=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="peer"):
        PagePool(host, peers=[1])
    with pytest.raises(ValueError, match="small_threshold"):
        PagePool(host, small_threshold=-512)
    with pytest.raises(ValueError, match="multiple"):
        PagePool(host, small_threshold=1000)
    assert host.counters().live == (0, 0, 0)


def test_page_size_and_small_threshold_options(host: vmmpool.Device) -> None:
    with PagePool(host, page_size=4 * MiB, small_threshold=0) as pool:
        a = pool.malloc(0)  # no small class: every request gets pages
        b = pool.malloc(5 * MiB)
        assert pool.stats().total_pages == 3 and a.ptr % (4 * MiB) == 0
        a.free()
        b.free()
        pool._check()


# --------------------------------------------------------------- lifetime
def test_use_after_close(device: vmmpool.Device) -> None:
    pool = pool_of(device)
    a = pool.malloc(100)
    pool.close()
    pool.close()  # idempotent
    assert pool.closed and a.freed
    for call in (
        lambda: pool.malloc(1),
        pool.defragment,
        pool.trim,
        lambda: pool.set_limit(None),
        lambda: pool.acquire_pages(1),
    ):
        with pytest.raises(vmmpool.ClosedError, match="PagePool has been closed"):
            call()
    with pytest.raises(ValueError):  # ClosedError is a ValueError
        pool.malloc(1)
    a.free()  # invalidated by close(): a no-op
    pool.release_pages([])
    s = pool.stats()
    assert s.total_pages == 0 and s.live_allocations == 0 and s.n_malloc == 1
    assert s.largest_allocatable == 0
    assert pool.snapshot() == []
    assert "closed" in repr(pool)
    with pytest.raises(vmmpool.ClosedError):
        with pool:
            pass


def test_every_locked_method_runs_the_deferred_tasks_and_refuses_a_closed_pool(
    device: vmmpool.Device,
) -> None:
    # Issue 21: the methods share one prologue (PagePool's `_locked`): deferred tasks first,
    # then the lock, the finalizers' queue, and (for most) the closed check.
    pool = pool_of(device)
    calls = {
        "set_limit": lambda: pool.set_limit(None),
        "retire_stream": lambda: pool.retire_stream(7),
        "acquire_pages": lambda: pool.release_pages(pool.acquire_pages(1)),
        "defragment": pool.defragment,
        "trim": pool.trim,
        "stats": pool.stats,
        "snapshot": pool.snapshot,
        "reset_peak_memory_stats": pool.reset_peak_memory_stats,
        "sleep": pool.sleep,
        "wake": pool.wake,
        "share": lambda: pool.malloc(100).share().close() if pool.shareable else None,
    }
    for name, call in calls.items():
        ran: list[str] = []
        pool._defer(lambda: ran.append(name))  # noqa: B023 - called before the loop moves on
        call()
        assert ran == [name] or (name == "share" and not pool.shareable), name
    pool.close()
    for name in ("set_limit", "retire_stream", "acquire_pages", "defragment", "trim", "sleep", "wake"):
        with pytest.raises(vmmpool.ClosedError, match="PagePool has been closed"):
            calls[name]()
    assert pool.stats().total_pages == 0 and pool.snapshot() == []


def test_close_releases_everything_with_live_allocations(device: vmmpool.Device) -> None:
    before = device.counters().live
    pool = pool_of(device, pages=8)
    allocs = [pool.malloc(n) for n in (10, 3 << 20, 5000, 1 << 20)]
    pages = pool.acquire_pages(2)
    assert device.counters().live != before
    pool.close()
    assert device.counters().live == before
    for a in allocs:
        a.free()
    pool.release_pages(pages)  # no-op after close
    del allocs
    gc.collect()


def test_context_managers(device: vmmpool.Device) -> None:
    with pool_of(device) as pool:
        with pool.malloc(100) as a:
            assert not a.freed
        assert a.freed
        with pool.malloc(100) as b:
            b.free()  # freeing inside the block is fine
        with pytest.raises(RuntimeError, match="boom"):
            with pool.malloc(3 << 20):
                raise RuntimeError("boom")
        assert pool.stats().live_allocations == 0
    assert pool.closed
    with pytest.raises(KeyError):  # the caller's exception wins
        with pool_of(device):
            raise KeyError("x")


def test_garbage_collected_allocations_are_freed(device: vmmpool.Device) -> None:
    with pool_of(device) as pool:
        pool.malloc(100)
        pool.malloc(3 << 20)
        a = pool.malloc(200)
        cycle: list[object] = [a]
        cycle.append(cycle)
        del a, cycle
        gc.collect()
        s = pool.stats()
        assert s.live_allocations == 0 and s.n_free == 3
        pool._check()


def test_garbage_collection_after_close_is_a_noop(device: vmmpool.Device) -> None:
    pool = pool_of(device)
    a = pool.malloc(100)
    pool.close()
    del a
    gc.collect()
    assert pool.stats().live_allocations == 0


def test_dropping_the_pool_releases_its_resources(device: vmmpool.Device) -> None:
    before = device.counters().live
    pool = pool_of(device)
    a = pool.malloc(3 << 20)
    del pool  # the allocation keeps the pool alive
    fill(a, 1)
    assert intact(a, 1)
    del a
    gc.collect()
    assert device.counters().live == before


# --------------------------------------------------------------- page level
def test_acquire_and_release_pages(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=8) as pool:
        a = pool.malloc(2 * P)
        a.free()  # 2 cached pages
        pages = pool.acquire_pages(3)
        assert len(pages) == 3 and all(isinstance(p, vmmpool.PhysicalAllocation) for p in pages)
        s = pool.stats()
        assert s.acquired_pages == 3 and s.allocated_bytes == 3 * P and s.pinned_pages == 3
        with vmmpool.reserve(3 * P, device) as res:
            for i, p in enumerate(pages):
                res.map(p, i * P)
            res.set_access(0, 3 * P, "rw")
            device.write(res.address, pattern(1, 3 * P))
            assert bytes(device.read(res.address, 3 * P)) == pattern(1, 3 * P)
            res.unmap(0, 3 * P)
        pool.release_pages(pages)
        s = pool.stats()
        assert s.acquired_pages == 0 and s.allocated_bytes == 0 and s.free_pages == 3
        assert pool.acquire_pages(0) == []
        pool._check()


def test_acquire_pages_is_all_or_nothing(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=8) as pool:
        live = pool.malloc(5 * P)
        cached = pool.malloc(2 * P)
        cached.free()
        before = pool.stats()
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.acquire_pages(4)
        after = pool.stats()
        assert (after.total_pages, after.free_pages, after.cached_bytes, after.acquired_pages) == (
            before.total_pages, before.free_pages, before.cached_bytes, 0,
        )
        pages = pool.acquire_pages(3)  # 1 new + 2 reclaimed from the cache
        assert pool.stats().n_remaps == 1
        pool.release_pages(pages)
        live.free()
        pool._check()


def test_release_pages_validation(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=8) as pool, pool_of(device, pages=8) as other:
        pages = pool.acquire_pages(2)
        foreign = other.acquire_pages(1)
        stranger = vmmpool.create(P, device)
        try:
            with pytest.raises(ValueError, match="not a page of this pool"):
                pool.release_pages([pages[0], foreign[0]])
            with pytest.raises(ValueError, match="not a page of this pool"):
                pool.release_pages([stranger])
            with pytest.raises(ValueError, match="twice"):
                pool.release_pages([pages[0], pages[0]])
            with pytest.raises(TypeError, match="PhysicalAllocation"):
                pool.release_pages([pages[0], 5])  # type: ignore[list-item]
            assert pool.stats().acquired_pages == 2  # nothing changed
            pool.release_pages(pages)
            with pytest.raises(ValueError, match="not acquired"):
                pool.release_pages(pages[:1])
        finally:
            stranger.close()
        other.release_pages(foreign)
        pool._check()


# ---------------------------------------------------------- observability
def test_snapshot(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=8) as pool:
        big = pool.malloc(2 * P + 10, stream=2)
        small = [pool.malloc(100), pool.malloc(200)]
        gone = pool.malloc(P)
        gone.free()
        acq = pool.acquire_pages(1)
        snap = pool.snapshot()
        assert all(isinstance(p, PageInfo) for p in snap)
        assert [p.index for p in snap] == sorted(p.index for p in snap)
        by_state: dict[str, list[PageInfo]] = {}
        for p in snap:
            by_state.setdefault(p.state, []).append(p)
        mine = sorted((p for p in by_state["in_use"] if p.stream == 2), key=lambda p: p.address or 0)
        # 2 * P + 10 bytes: two pages covered wholly, the third holds the last 10 bytes
        big_info = vmmpool.AllocationInfo(big.ptr, 2 * P + ALIGNMENT, 2 * P + 10, 2)
        assert [p.allocations for p in mine] == [(big_info,)] * 3
        assert [p.kind for p in mine] == ["large"] * 2 + ["small"]
        assert [p.used_bytes for p in mine] == [P, P, 10]
        assert [p.address for p in mine] == [big.ptr, big.ptr + P, big.ptr + 2 * P]
        (sp,) = [p for p in by_state["in_use"] if p.stream == 0]
        assert sp.allocations == (
            vmmpool.AllocationInfo(small[0].ptr, ALIGNMENT, 100, 0),
            vmmpool.AllocationInfo(small[1].ptr, ALIGNMENT, 200, 0),
        )
        assert sp.used_bytes == 300 and sp.kind == "small"
        # `gone` touched the shared page and the next one, which no live block touches now
        cached = [(p.allocations, p.address, p.stream) for p in by_state["cached"]]
        assert cached == [((), (sp.address or 0) + P, 0)]
        assert [(p.allocations, p.address) for p in by_state["acquired"]] == [((), None)]
        s = pool.stats()
        assert isinstance(s, PoolStats) and len(snap) == s.total_pages
        assert s.mapped_pages == len(by_state["in_use"]) + len(by_state["cached"])
        pool.release_pages(acq)
        for a in (big, *small):
            a.free()
        assert "1 page(s)" not in repr(pool)


def test_stats_add_up(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, pages=16) as pool:
        big = 3 * P - 5 * ALIGNMENT - 1
        allocs = [pool.malloc(n) for n in (0, 1, 255, 257, P // 2, P // 2 + 1, P, big)]
        allocs[2].free()
        allocs[5].free()
        s = pool.stats()
        assert s.requested_bytes == sum(a.size for a in allocs) - 255 - (P // 2 + 1)
        # 512-byte rounding only
        assert s.allocated_bytes == 3 * ALIGNMENT + P // 2 + P + 3 * P - 5 * ALIGNMENT
        assert s.allocated_bytes + s.cached_bytes == s.mapped_pages * P
        assert s.free_pages + s.mapped_pages + s.acquired_pages == s.total_pages
        # the free pages, plus the free tail of the last partly used page a large block can
        # start in: `big` (the only block over a page) ends 5 * ALIGNMENT bytes before its
        # third page does; the smaller blocks share three pages of their own
        assert s.pinned_pages == 6
        # ... and at the limit a block may also start in the free tail of a partly used
        # page of the small heap, mapped a second time (an alias): larger still
        tails = [x[0] for x in pool._core.alias_sources(pool._core.streams[0])[0]]
        assert tails and max(tails) > 5 * ALIGNMENT
        assert s.largest_allocatable >= (16 - s.pinned_pages) * P + max(tails)
        assert s.peak_allocated_bytes >= s.allocated_bytes and s.peak_reserved_bytes == s.reserved_bytes
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(s.largest_allocatable + ALIGNMENT)
        pool.malloc(s.largest_allocatable).free()
        for i, a in enumerate(allocs):
            if i not in (2, 5):
                a.free()
        pool._check()


def test_logging(caplog: pytest.LogCaptureFixture) -> None:
    dev = vmmpool.Device.emulated(capacity=8 * 2 * MiB)
    with caplog.at_level(logging.DEBUG, logger="vmmpool.pool"), PagePool(dev) as pool:
        a = pool.malloc(4 * 2 * MiB, stream=1)
        a.free()
        b = pool.malloc(8 * 2 * MiB)
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(1)
        b.free()
    text = caplog.text
    # the first 4 pages at once (a pool without a limit has no fixed headroom: its growth
    # budget is empty before its first allocation, and nothing is cached to reuse instead)
    assert "created 4 page(s) of 2097152 bytes (4 of 8 pages)" in text
    assert "remap: unmapped 4 cached page(s)" in text
    assert "out of memory" in text
    assert all(r.name == "vmmpool.pool" for r in caplog.records)


def test_records_logged_under_the_lock_keep_their_order_caller_thread_and_exc_info() -> None:
    """Records made inside the pool's lock are emitted after it is let go (never while a pool's
    lock is held by the emitting thread), in order, as the call made them; none is lost at close."""
    dev = vmmpool.Device.emulated(capacity=16 * 2 * MiB)
    P = dev.granularity
    lg = logging.getLogger("vmmpool.pool")
    pools: list[PagePool] = []

    class Handler(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[tuple[logging.LogRecord, bool]] = []

        def emit(self, record: logging.LogRecord) -> None:
            me = threading.get_ident()
            held = any(p._core.owner == me and p._core.lock.locked() for p in pools)
            self.records.append((record, held))

    h = Handler()
    lg.addHandler(h)
    level = lg.level
    lg.setLevel(logging.DEBUG)
    try:
        pool = PagePool(dev, limit=8 * P)
        pools.append(pool)
        a = [pool.malloc(P) for _ in range(4)]
        pool.set_limit(2 * P)  # the live pages stay above it
        dev._backend.inject_fault("unmap", name="CUDA_ERROR_UNKNOWN")
        a[0].free()  # gives pages above the limit back: the unmap fails, logged with exc_info
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(8 * P)
        for x in a[1:]:
            x.free()
        pool.close()
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)
    assert h.records and not [r.getMessage() for r, held in h.records if held]
    msgs = [r.getMessage() for r, _ in h.records]
    assert all(r.name == "vmmpool.pool" and r.threadName == threading.current_thread().name
               for r, _ in h.records)
    i = next(i for i, m in enumerate(msgs) if m.startswith("limit set to"))
    j = next(i for i, m in enumerate(msgs) if m.startswith("giving pages above the limit back failed"))
    k = next(i for i, m in enumerate(msgs) if m.startswith("out of memory"))
    assert i < j < k, msgs
    warn, _ = h.records[j]
    assert warn.levelno == logging.WARNING and warn.funcName == "enforce_limit"
    assert warn.exc_info is not None and isinstance(warn.exc_info[1], vmmpool.DriverError)
    oom, _ = h.records[k]
    assert oom.levelno == logging.INFO and oom.funcName == "oom"
    created = [r.created for r, _ in h.records]
    assert created == sorted(created)
    assert _logq.pending_records() == 0


def test_sleep_logs_a_failed_staging_cleanup_after_the_lock_is_let_go() -> None:
    """_staging logs on ``vmmpool`` (not ``vmmpool.pool``) and sleep() runs it under the pool's
    lock: a copy wait that fails, then its event's destroy, was logged with the lock held."""
    dev = vmmpool.Device.emulated(capacity=16 * 2 * MiB)
    P = dev.granularity
    pool = PagePool(dev)
    core = pool._core
    seen: list[tuple[str, bool]] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held = core.owner == threading.get_ident() and core.lock.locked()
            seen.append((record.getMessage(), held))

    lg = logging.getLogger("vmmpool")
    h = Handler()
    lg.addHandler(h)
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        a = pool.malloc(3 * P)
        # sleep: quiesce's event (wait 1, destroy 1), then staging.save's copies (wait 2 fails;
        # its cleanup destroys the pending events: destroy 2 fails, logged)
        dev._backend.inject_fault("event_wait", 2, name="CUDA_ERROR_UNKNOWN")
        dev._backend.inject_fault("event_destroy", 2, name="CUDA_ERROR_UNKNOWN")
        with pytest.raises(vmmpool.DriverError):
            pool.sleep()
        dev._backend.clear_faults()
        a.free()
        pool.close()
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)
    assert any(m.startswith("destroying a staging event failed") for m, _ in seen), seen
    assert not [m for m, held in seen if held], seen


def test_records_are_emitted_by_their_thread_when_another_takes_the_lock_first() -> None:
    """A thread that logged under the lock and lets go while another thread takes the lock
    before its settle() emits its records itself before its call returns (they waited for
    the other thread's section, and were emitted on that thread)."""
    pool = PagePool("host", limit=8 * MiB)
    core = pool._core
    real = core.lock
    taken = threading.Event()
    done = threading.Event()

    def other() -> None:
        with core.section:
            taken.set()
            done.wait(10)

    class HandoffLock:  # another thread takes the lock right after this one lets go
        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            return real.acquire(blocking, timeout)

        def release(self) -> None:
            real.release()
            if _logq.pending_records() and not taken.is_set():
                threading.Thread(target=other).start()
                taken.wait(10)

        def locked(self) -> bool:
            return real.locked()

    seen: list[tuple[str, str]] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), threading.current_thread().name))

    lg = logging.getLogger("vmmpool.pool")
    h = Handler()
    lg.addHandler(h)
    level = lg.level
    lg.setLevel(logging.INFO)
    try:
        pool.malloc(4 * MiB).free()
        core.lock = HandoffLock()  # type: ignore[assignment]
        assert pool.trim() == 4 * MiB
        got = list(seen)
    finally:
        done.set()
        lg.removeHandler(h)
        lg.setLevel(level)
    assert taken.is_set()
    me = threading.current_thread().name
    assert [m for m, t in got if m.startswith("trim:") and t == me], got
    core.lock = real
    pool.close()
    assert _logq.pending_records() == 0


# ------------------------------------------------------- failure injection
@pytest.mark.parametrize(
    ("op", "nth"),
    [("create", 1), ("create", 3), ("map", 1), ("map", 4), ("set_access", 1), ("reserve", 1)],
)
def test_failed_fresh_mapping_changes_nothing(op: str, nth: int) -> None:
    host = vmmpool.Device.emulated(capacity=128 * 2 * MiB)
    P = host.granularity
    with pool_of(host, pages=16) as pool:
        keep = pool.malloc(P + ALIGNMENT)  # over a page: in the large-block heap, as `want`
        fill(keep, 5)
        want = 6 * P
        if op == "reserve":  # leave the first arena (64 pages) too little room
            pool.set_limit(100 * P)
            hold = pool.malloc(20 * P)
            want = 50 * P
        before = pool.stats()
        live_before = host.counters().live
        host._backend.inject_fault(op, nth, name="CUDA_ERROR_INVALID_VALUE")
        if op == "reserve":  # the first failure makes the pool retry with just what it needs
            host._backend.inject_fault(op, nth + 1, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError, match=op):
            pool.malloc(want)
        host._backend.clear_faults()
        after = pool.stats()
        pool._check()
        created = after.n_page_creations - before.n_page_creations
        # Pages created before the failure are kept as free pages; nothing else moved.
        assert after.free_pages == before.free_pages + created
        assert (after.live_allocations, after.allocated_bytes, after.mapped_pages) == (
            before.live_allocations, before.allocated_bytes, before.mapped_pages,
        )
        live_after = host.counters().live
        assert live_after[2] == live_before[2]  # no mapping left behind
        assert live_after[1] == live_before[1] + created
        assert intact(keep, 5)
        a = pool.malloc(want)  # and the pool works afterwards
        fill(a, 6)
        assert intact(a, 6)
        a.free()
        keep.free()
        if op == "reserve":
            hold.free()
            assert pool.stats().address_space_bytes > 64 * P
        pool._check()
    assert host.counters().live == (0, 0, 0)


def test_failed_unmap_during_reclaim_keeps_the_cache(host: vmmpool.Device) -> None:
    P = host.granularity
    with pool_of(host, pages=8) as pool:
        allocs = [pool.malloc(P, stream=i) for i in range(8)]
        for a in allocs:
            a.free()
        host._backend.inject_fault("unmap", 2, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError):
            pool.malloc(8 * P, stream=99)
        host._backend.clear_faults()
        pool._check()
        s = pool.stats()
        assert s.free_pages == 1 and s.reclaimable_pages == 7 and s.live_allocations == 0
        big = pool.malloc(8 * P, stream=99)
        big.free()
        pool._check()


def test_a_retired_stream_handle_is_never_used_again(host: vmmpool.Device) -> None:
    # A raw stream handle may be destroyed while its freed memory is cached:
    # retire_stream() records its last event at once; reclaiming its pages
    # later waits on that event and never touches the (possibly dead) handle.
    P = host.granularity
    recorded: list[int] = []
    real = host._backend.event_record

    def spy(stream: int) -> int:
        recorded.append(stream)
        return real(stream)

    host._backend.event_record = spy  # type: ignore[method-assign]
    try:
        with pool_of(host, pages=4) as pool:
            a = pool.malloc(4 * P, stream=12345)
            a.free()
            pool.retire_stream(12345)
            assert recorded == [12345]
            before = host.counters()
            b = pool.malloc(4 * P, stream=1)  # reclaims stream 12345's cache
            delta = host.counters() - before
            assert recorded == [12345] and "synchronize" not in delta
            assert delta["event_query"] == 1 and delta["unmap"] == 1
            assert pool.stats().n_syncs == 0
            b.free()
            pool._check()
    finally:
        del host._backend.event_record


def test_a_retired_stream_freeing_later_is_covered_by_one_device_synchronize(
    host: vmmpool.Device,
) -> None:
    P = host.granularity
    with pool_of(host, pages=4) as pool:
        a = pool.malloc(4 * P, stream=777)
        pool.retire_stream(777)
        a.free()  # after its last event: nothing may be recorded on it any more
        b = pool.malloc(4 * P, stream=1)
        s = pool.stats()
        assert s.n_syncs == 1 and s.n_reclaimed_pages == 4
        assert 777 not in pool._core.streams  # its last block freed, its pages gone: forgotten
        b.free()
        pool._check()


# Issue 17 item 8: retired and empty streams cost nothing.
def test_one_shot_streams_cost_nothing(host: vmmpool.Device) -> None:
    """6,000 streams used once and retired: the pool forgets each once its pages leave it,
    so the stream count, the address space and the slow path's walk stay small."""
    from vmmpool._pool._streams import StreamState

    P = host.granularity
    pool = pool_of(host, pages=16)
    core = pool._core
    for i in range(6000):
        a = pool.malloc(1000 if i % 2 else 3 * P, stream=100 + i)
        a.free()
        pool.retire_stream(100 + i)
    s = pool.stats()
    # a stream still known holds a cached page (was: 6,000 streams, 6,000 x 2 arenas)
    assert len(core.streams) <= s.total_pages <= 16, (len(core.streams), s)
    assert s.address_space_bytes <= len(core.streams) * 2 * 2 * pool.limit, s
    # a slow-path malloc (a remap at the limit) walks the streams that hold something only
    visits = [0]
    methods = ("free_ranges", "cached_pages", "prune")
    real = {m: getattr(StreamState, m) for m in methods}

    def counting(m: str) -> object:
        def f(self: StreamState, *a: object) -> object:
            visits[0] += 1
            return real[m](self, *a)
        return f

    try:
        for m in methods:
            setattr(StreamState, m, counting(m))
        before = host.counters()
        big = pool.malloc(16 * P, stream=1)
        delta = host.counters() - before
    finally:
        for m in methods:
            setattr(StreamState, m, real[m])
    assert delta["map"] >= 1  # it was the slow path
    assert visits[0] <= 4 * 17, visits[0]  # was over 6,000 per call
    assert len(core.streams) <= 2, list(core.streams)  # every retired stream gave its pages up
    big.free()
    pool.trim()
    s = pool.stats()
    assert (len(core.streams), s.address_space_bytes, s.total_pages) == (0, 0, 0)
    assert host._backend.live_events() == 0
    pool._check()
    pool.close()


def test_retiring_an_empty_stream_forgets_it_at_once(device: vmmpool.Device) -> None:
    P = device.granularity
    k2 = pool_key(2)  # handle 2 is this thread's per-thread default stream
    with pool_of(device, pages=8) as pool:
        core = pool._core
        a = pool.malloc(3 * P, stream=2)
        a.free()
        pool.defragment()  # its pages leave it: stream 2 holds nothing but its arena
        va = pool.stats().address_space_bytes
        assert k2 in core.streams
        pool.retire_stream(2)
        assert k2 not in core.streams
        assert pool.stats().address_space_bytes < va
        pool.malloc(100, stream=2).free()  # the stream may be used again
        assert k2 in core.streams
        pool._check()


def test_the_per_thread_stream_of_an_ended_thread_is_retired(device: vmmpool.Device) -> None:
    # Handle 2 is one stream per thread, under a key no one else can name: when the
    # thread ends, the pool forgets it once it holds nothing. It kept every such
    # stream, with its arenas' address space, until trim(): 20 streams, 20 arenas.
    P = device.granularity
    with pool_of(device, pages=8) as pool:
        core = pool._core

        def work() -> None:
            pool.malloc(P, stream=2).free()

        for _ in range(20):
            t = threading.Thread(target=work)
            t.start()
            t.join()
        del t
        gc.collect()
        pool.malloc(100).free()  # the next call retires them
        per_thread = [st for k, st in core.streams.items() if k >= PER_THREAD_KEYS]
        assert all(st.ended and not st.retired for st in per_thread)  # events, not syncs
        assert len(per_thread) <= 8  # only those still holding a cached page
        va = sum(a.res.size for st in core.streams.values() for a in st.arenas)
        assert pool.stats().address_space_bytes == va
        assert len(core.arenas) <= 9
        pool._check()
        # A block the thread left live, freed by another thread: covered by an event (no
        # device synchronize) when its pages leave, and the stream forgotten after them.
        box: list[vmmpool.Allocation] = []
        t = threading.Thread(target=lambda: box.append(pool.malloc(3 * P, stream=2)))
        t.start()
        t.join()
        del t
        gc.collect()
        pool.stats()
        box.pop().free()
        big = pool.malloc(8 * P)  # at the limit: every cached page leaves its stream
        assert pool.stats().n_syncs == 0
        assert [k for k in core.streams if k >= PER_THREAD_KEYS] == []
        big.free()
        pool._check()


def test_a_retired_stream_is_forgotten_when_its_last_page_leaves(device: vmmpool.Device) -> None:
    P = device.granularity
    k2 = pool_key(2)  # handle 2 is this thread's per-thread default stream
    with pool_of(device, pages=8) as pool:
        core = pool._core
        a = pool.malloc(3 * P, stream=2)
        a.free()
        pool.retire_stream(2)
        assert k2 in core.streams  # its cached pages are still mapped
        b = pool.malloc(8 * P, stream=1)  # at the limit: takes them
        assert k2 not in core.streams
        assert pool.stats().address_space_bytes == sum(a.res.size for a in core.streams[1].arenas)
        b.free()
        pool._check()
        # a stream that is not retired (a raw handle may be used again) is kept
        pool.malloc(3 * P, stream=2).free()
        pool.malloc(8 * P, stream=1).free()
        assert k2 in core.streams
        pool.trim()  # trim forgets every stream left with nothing
        assert not core.streams


def test_a_stream_object_is_forgotten_when_its_pages_leave(device: vmmpool.Device) -> None:
    P = device.granularity
    k2 = pool_key(2)  # handle 2 is this thread's per-thread default stream
    with pool_of(device, pages=8) as pool:
        s = _CupyLike(2)
        pool.malloc(3 * P, stream=s).free()
        assert k2 in pool._core.streams
        pool.malloc(8 * P, stream=1).free()
        assert k2 not in pool._core.streams
        pool._check()


def test_forgetting_a_stream_fails_quietly_and_is_retried(host: vmmpool.Device) -> None:
    P = host.granularity
    with pool_of(host, pages=8) as pool:
        core = pool._core
        pool.malloc(3 * P, stream=5).free()
        pool.defragment()
        host._backend.inject_fault("free_address", name="CUDA_ERROR_INVALID_VALUE")
        pool.retire_stream(5)  # the arena's free_address fails: kept, not an error
        host._backend.clear_faults()
        assert 5 in core.streams and core.streams[5].retired
        pool._check()
        pool.trim()
        assert 5 not in core.streams and pool.stats().address_space_bytes == 0


def test_stream_objects_are_kept_alive_while_they_have_memory_in_the_pool(
    host: vmmpool.Device,
) -> None:
    P = host.granularity
    with pool_of(host, pages=4) as pool:
        s = _CupyLike(0x4242)
        ref = weakref.ref(s)
        a = pool.malloc(4 * P, stream=s)
        del s
        a.free()
        gc.collect()
        assert ref() is not None  # its cached memory may still be used by its work
        b = pool.malloc(4 * P, stream=1)  # its pages leave it: the object is let go
        gc.collect()
        assert ref() is None
        b.free()
        pool._check()


def test_racing_double_free_never_frees_a_reused_block(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device) as pool:
        for n in (100, 3 * P):
            a = pool.malloc(n)
            ref = a._ref
            a.free()
            b = pool.malloc(n)  # reuses the same block or range
            assert b.ptr == a.ptr
            a._ref = ref  # what a second thread still sees after a racing free()
            with pytest.raises(ValueError, match="already freed"):
                a.free()
            assert not b.freed and pool.stats().live_allocations == 1
            b.free()
        pool._check()


def test_failed_undo_quarantines_pages(host: vmmpool.Device) -> None:
    P = host.granularity
    with pool_of(host, pages=8) as pool:
        host._backend.inject_fault("set_access", 1, name="CUDA_ERROR_INVALID_VALUE")
        # The batched undo unmap fails, and so do the per-page unmaps after it.
        for nth in range(1, 5):
            host._backend.inject_fault("unmap", nth, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError, match="set_access"):
            pool.malloc(3 * P)
        host._backend.clear_faults()
        pool._check()
        s = pool.stats()
        assert s.quarantined_pages == 3 and s.pinned_pages == 3
        assert s.largest_allocatable == 5 * P
        assert [p.state for p in pool.snapshot()].count("quarantined") == 3
        a = pool.malloc(5 * P)
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(1)
        a.free()
    assert host.counters().live == (0, 0, 0)  # close() releases quarantined pages too


def test_preallocate_failure_leaves_nothing(host: vmmpool.Device) -> None:
    host._backend.inject_fault("create", 3)
    with pytest.raises(vmmpool.OutOfMemoryError):
        PagePool(host, preallocate=6 * host.granularity)
    host._backend.inject_fault("set_access", 1, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        PagePool(host, preallocate=6 * host.granularity)
    assert host.counters().live == (0, 0, 0)


# -------------------------------------------------------------- scenario
def test_fragmentation_scenario() -> None:
    from vmmpool._demo import PagePoolAdapter, contiguous_baseline, run_scenario

    dev = vmmpool.Device.emulated(capacity=128 * MiB)
    ad = PagePoolAdapter(dev, 128 * MiB)
    try:
        res = run_scenario(
            ad, live_fraction=0.05, seed=1, baseline=lambda a: contiguous_baseline(a.pool)
        )
    finally:
        ad.close()
    assert res.verified and res.survivors >= 1
    P = res.details["page_size"]
    target = res.limit - res.details["pinned_pages"] * P
    assert res.largest >= 0.99 * target
    assert res.baseline is not None and res.largest >= res.baseline
    assert dev.counters().live == (0, 0, 0)


def test_demo_main(capsys: pytest.CaptureFixture[str]) -> None:
    from vmmpool._demo import main

    assert main(["--device", "host", "--limit", "64M", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "vmmpool.PagePool" in out and "contiguous" in out
    assert main(["--live-fraction", "2"]) == 2


class _FirstFit:
    """A contiguous first-fit allocator over host bytes: the generic (CuPy / PyTorch) scenario path."""

    name = "first-fit"
    oom_errors = (MemoryError,)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.mem = bytearray(limit)
        self.blocks: dict[int, int] = {}  # start -> size

    def malloc(self, n: int) -> tuple[int, int]:
        n = max(512, -(-n // 512) * 512)
        cur = 0
        for start in sorted(self.blocks):
            if start - cur >= n:
                break
            cur = start + self.blocks[start]
        if cur + n > self.limit:
            raise MemoryError(n)
        self.blocks[cur] = n
        return (cur, n)

    def free(self, h: tuple[int, int]) -> None:
        del self.blocks[h[0]]

    def write(self, h: tuple[int, int], offset: int, data: bytes) -> None:
        self.mem[h[0] + offset : h[0] + offset + len(data)] = data

    def read(self, h: tuple[int, int], offset: int, n: int) -> bytes:
        return bytes(self.mem[h[0] + offset : h[0] + offset + n])

    def largest(self, upper: int) -> tuple[int, object]:
        from vmmpool._demo import bisect_largest

        return bisect_largest(self, upper)

    def details(self) -> dict[str, object]:
        return {"blocks": len(self.blocks)}


@pytest.mark.parametrize("survivors_from", ["small", "bytes"])
def test_scenario_generic_path_and_comparison(survivors_from: str) -> None:
    from vmmpool._demo import PagePoolAdapter, run_scenario

    limit = 64 * MiB
    ff = _FirstFit(limit)
    theirs = run_scenario(ff, live_fraction=0.1, seed=4, survivors_from=survivors_from)
    assert theirs.verified and ff.blocks == {}  # everything freed at the end
    assert 0 < theirs.largest < theirs.available and theirs.largest % (2 * MiB) == 0
    dev = vmmpool.Device.emulated(capacity=limit)
    ad = PagePoolAdapter(dev, limit)
    try:
        ours = run_scenario(ad, live_fraction=0.1, seed=4, survivors_from=survivors_from)
        assert ad.pool.stats().live_allocations == 0
    finally:
        ad.close()
    assert ours.verified and abs(ours.n_allocations - theirs.n_allocations) <= 3  # page rounding
    assert ours.largest > theirs.largest
    with pytest.raises(ValueError, match="survivors_from"):
        run_scenario(ff, survivors_from="large")


def test_largest_allocatable_counts_the_whole_page_rounding_of_small_threshold() -> None:
    """Requests above small_threshold are rounded up to whole pages: largest_allocatable is
    a request malloc serves, not one whose rounding goes past the limit."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    with PagePool(dev, limit=14 * P, small_threshold=P) as pool:
        a = pool.malloc(25088)  # a small page with a free tail
        largest = pool.stats().largest_allocatable
        assert largest == 13 * P
        pool.malloc(largest).free()
        a.free()

"""Stateful property test of PagePool on the host emulator.

Random malloc / free / garbage collection / defragment / trim / set_limit /
acquire / release / injected driver faults / forked children / refused copies /
first views taken by two threads at once on a pool of 64 KiB pages with a
limit of a few dozen pages (so that remapping and out-of-memory happen all
the time), with streams held pending (their events stay incomplete), frees
from other threads (with a thread calling ``stats()`` meanwhile), frees from a
user's ``__del__`` in a reference cycle (after the pool's safety net), retired
streams and one-shot streams. After every step: the internal invariants hold,
live allocations never overlap, every allocation's bytes (its own pattern)
survived, the statistics add up, a page is in use exactly when a live
allocation touches it (else cached while mapped, or free), no device
synchronize was issued, a request failed only if the limit forced it, and a
retired stream that holds nothing is forgotten. At the end a view outlives
``close()`` while a thread calls ``stats()``: its memory is released when it
is dropped.
"""

from __future__ import annotations

import copy
import gc
import itertools
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

import vmmpool
from vmmpool._pool import ALIGNMENT, Allocation, PagePool

P = 64 << 10  # page size: small, so that reading every live byte each step is cheap
CAPACITY = 40  # pages the emulated device has
LIMIT = 24  # the pool's starting limit, in pages


def pattern(seed: int, n: int) -> bytes:
    return ((np.arange(n, dtype=np.uint32) * 5 + seed * 11 + 1) % 253).astype(np.uint8).tobytes()


sizes = st.one_of(
    st.integers(0, 300),
    st.integers(0, P // 2),  # small
    st.integers(P // 2 + 1, 8 * P),  # large
    st.sampled_from([P, 2 * P, 3 * P - 1, P // 2, 4096]),
)
streams = st.sampled_from([0, 1, 7])


class Owner:
    """A user's object in a reference cycle whose ``__del__`` frees its allocation."""

    def __init__(self, a: Allocation, errors: list[str]) -> None:
        self.a = a
        self.errors = errors
        self.me = self

    def __del__(self) -> None:
        try:
            self.a.free()
        except Exception as e:  # noqa: BLE001 - checked by the rule
            self.errors.append(repr(e))


class PoolMachine(RuleBasedStateMachine):
    allocs = Bundle("allocs")
    acquired = Bundle("acquired")

    def __init__(self) -> None:
        super().__init__()
        self.device = vmmpool.Device.emulated(capacity=CAPACITY * P, granularity=P)
        self.pool = PagePool(self.device, limit=LIMIT * P)
        self.live: dict[int, tuple[Allocation, int]] = {}  # token -> (allocation, seed)
        self.n_acquired = 0
        self.limit_pages = LIMIT
        self.seed = 0
        self.expected_mallocs = 0
        self.expected_frees = 0
        self.one_shot = itertools.count(1000)

    def _must_succeed(self, nbytes: int) -> bool:
        # A request fails only if the pages touched by live blocks plus the
        # pages it needs exceed the limit; a fresh placement needs ceil(r / P).
        s = self.pool.stats()
        r = max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)
        return s.pinned_pages + -(-r // P) <= self.limit_pages

    @rule(target=allocs, nbytes=sizes, stream=streams)
    def malloc(self, nbytes: int, stream: int) -> object:
        must = self._must_succeed(nbytes)
        before = self.pool.stats()
        try:
            a = self.pool.malloc(nbytes, stream=stream)
        except vmmpool.OutOfMemoryError:
            assert not must, f"malloc({nbytes}) failed though the limit allowed it"
            return None
        after = self.pool.stats()
        # A request never makes the pool hold more than the limit, or than it held already
        # (after a lowered limit, pages above it wait for their streams' work); it pins pages
        # above the limit only among those it held (a stream reusing the blocks it freed
        # there while its work is pending, see PagePool.set_limit).
        assert after.total_pages <= max(before.total_pages, self.limit_pages), (
            "a request made the pool hold more than its limit"
        )
        assert after.pinned_pages <= max(before.pinned_pages, self.limit_pages, before.total_pages), (
            "a request exceeded the limit"
        )
        self.seed += 1
        self.device.write(a.ptr, pattern(self.seed, nbytes))
        self.live[self.seed] = (a, self.seed)
        self.expected_mallocs += 1
        return self.seed  # a token: the machine holds the only reference to the allocation

    @rule(target=allocs, nbytes=st.lists(sizes, min_size=1, max_size=8), stream=streams)
    def fill(self, nbytes: list[int], stream: int) -> object:
        """Allocate until the limit: at the limit the pool lends partly used pages (aliases)."""
        tokens = []
        for n in nbytes:
            token = self.malloc(n, stream)
            if token is None:
                break
            tokens.append(token)
        return multiple(*tokens)

    @rule(token=consumes(allocs))
    def free(self, token: int | None) -> None:
        if token is None or token not in self.live:  # not allocated, or freed while asleep
            return
        a, _ = self.live.pop(token)
        if token % 2:
            self.pool.free(a)
        else:
            a.free()
        self.expected_frees += 1

    @rule(token=consumes(allocs))
    def drop(self, token: int | None) -> None:
        """Lose the last reference: the garbage collector's safety net frees it."""
        if token is None or token not in self.live:
            return
        del self.live[token]
        gc.collect()
        self.expected_frees += 1

    @rule(token=consumes(allocs))
    def free_in_del(self, token: int | None) -> None:
        """A user's ``__del__`` frees it: the safety net ran first; nothing happens then."""
        if token is None or token not in self.live:  # not allocated, or freed while asleep
            return
        a, _ = self.live.pop(token)
        errors: list[str] = []
        Owner(a, errors)
        del a
        gc.collect()
        assert errors == [], errors
        self.expected_frees += 1

    @rule(t1=consumes(allocs), t2=consumes(allocs), t3=consumes(allocs))
    def free_in_threads(self, t1: int | None, t2: int | None, t3: int | None) -> None:
        """Free from three threads at once while a fourth calls stats()."""
        mine = [self.live.pop(t)[0] for t in (t1, t2, t3) if t is not None and t in self.live]
        errors: list[BaseException] = []
        start = threading.Barrier(len(mine) + 1)

        def run(fn: object) -> None:
            try:
                start.wait()
                fn()  # type: ignore[operator]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=run, args=(a.free,)) for a in mine]
        ts.append(threading.Thread(target=run, args=(lambda: [self.pool.stats() for _ in range(3)],)))
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        self.expected_frees += len(mine)

    @rule(stream=streams)
    def retire(self, stream: int) -> None:
        """Retire a stream no live allocation of the machine uses (frees after retirement
        would need a device synchronize, which this machine forbids)."""
        if any(a.stream == stream for a, _ in self.live.values()):
            return
        self.pool.retire_stream(stream)

    @rule(nbytes=sizes)
    def one_shot_stream(self, nbytes: int) -> None:
        """Allocate and free once on a new stream, then retire it."""
        key = next(self.one_shot)
        try:
            a = self.pool.malloc(nbytes, stream=key)
        except vmmpool.OutOfMemoryError:
            return
        self.device.write(a.ptr, pattern(0, nbytes))
        a.free()
        self.pool.retire_stream(key)
        self.expected_mallocs += 1
        self.expected_frees += 1

    @rule()
    def defragment(self) -> None:
        self.pool.defragment()
        s = self.pool.stats()
        assert s.reclaimable_pages == 0 and s.free_pages + s.pinned_pages == s.total_pages

    @rule()
    def trim(self) -> None:
        pinned = self.pool.stats().pinned_pages
        self.pool.trim()
        s = self.pool.stats()
        assert s.free_pages == 0 and s.reclaimable_pages == 0 and s.total_pages == pinned

    @rule(pages=st.integers(4, CAPACITY))
    def set_limit(self, pages: int) -> None:
        self.pool.set_limit(pages * P)
        self.limit_pages = pages
        s = self.pool.stats()
        assert s.total_pages <= max(pages, s.pinned_pages)

    @rule(stream=streams)
    def hold(self, stream: int) -> None:
        """Keep the stream's work pending: its events stay incomplete."""
        self.device._backend.hold_stream(stream)

    @rule(stream=streams)
    def complete(self, stream: int) -> None:
        self.device._backend.release_stream(stream)

    @rule(target=acquired, count=st.integers(0, 4), stream=streams)
    def acquire(self, count: int, stream: int) -> object:
        must = self.pool.stats().pinned_pages + count <= self.limit_pages
        try:
            pages = self.pool.acquire_pages(count, stream=stream)
        except vmmpool.OutOfMemoryError:
            assert not must
            return []
        assert len(pages) == count
        self.n_acquired += count
        return pages

    @rule(pages=consumes(acquired))
    def release(self, pages: list[vmmpool.PhysicalAllocation]) -> None:
        self.pool.release_pages(pages)
        self.n_acquired -= len(pages)

    @rule(backup=st.booleans(), free_one=st.booleans())
    def sleep_and_wake(self, backup: bool, free_one: bool) -> None:
        """Issue 18: every page given back, addresses kept; a free while asleep; wake."""
        if self.n_acquired:
            with pytest.raises(ValueError, match="acquire_pages"):
                self.pool.sleep()
            return
        ptrs = {k: a.ptr for k, (a, _) in self.live.items()}
        self.pool.sleep(backup=backup)
        self.pool._check()
        s = self.pool.stats()
        assert s.asleep and s.total_pages == 0 and self.device.counters().allocations == 0
        if free_one and self.live:
            a, _ = self.live.pop(max(self.live))
            a.free()
            self.expected_frees += 1
            self.pool._check()
        try:
            self.pool.wake()
        except vmmpool.OutOfMemoryError:
            assert s.live_allocations and self.limit_pages < CAPACITY  # the live pages exceed the limit
            self.pool.set_limit(CAPACITY * P)
            self.limit_pages = CAPACITY
            self.pool.wake()
        assert {k: a.ptr for k, (a, _) in self.live.items()} == {k: ptrs[k] for k in self.live}
        if not backup:  # contents dropped: write them again
            for a, seed in self.live.values():
                self.device.write(a.ptr, pattern(seed, a.size))

    @precondition(lambda self: self.live)
    @rule(op=st.sampled_from(["create", "map", "set_access", "unmap", "event_record", "event_query",
                              "event_wait", "event_destroy"]), nth=st.integers(1, 3),
          nbytes=st.integers(P // 2 + 1, 6 * P), stream=streams)
    def malloc_with_fault(self, op: str, nth: int, nbytes: int, stream: int) -> None:
        """A driver call fails in the middle: nothing may change but the free set."""
        before = {k: (a.ptr, a.size) for k, (a, _) in self.live.items()}
        self.device._backend.inject_fault(op, nth, name="CUDA_ERROR_INVALID_VALUE")
        try:
            a = self.pool.malloc(nbytes, stream=stream)
        except (vmmpool.DriverError, vmmpool.OutOfMemoryError):
            pass
        else:
            a.free()
            self.expected_mallocs += 1
            self.expected_frees += 1
        finally:
            self.device._backend.clear_faults()
        assert before == {k: (a.ptr, a.size) for k, (a, _) in self.live.items()}

    @rule(token=allocs, drop=st.booleans())
    def fork(self, token: int | None, drop: bool) -> None:
        """A forked child tries to malloc, free and close, or drops everything, then exits.

        The child shares the pool's memory: whatever it did, the invariants after
        this step must find the parent's bytes and bookkeeping untouched.
        """
        a = self.live[token][0] if token in self.live else None
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            report = b"ok"
            try:
                os.close(r)
                pool = self.pool
                tries = [lambda: pool.malloc(100), lambda: pool.malloc(3 * P), pool.close]
                if a is not None:
                    tries.append(a.free)
                for fn in tries:
                    try:
                        fn()
                    except vmmpool.ForkedError:
                        pass
                    else:
                        report = b"a forked child's call was accepted"
                if drop:
                    del pool, a, tries
                    self.live.clear()
                    self.pool = None  # type: ignore[assignment]
                    gc.collect()
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                report = repr(err).encode()
            os.write(w, report)
            os._exit(0)
        os.close(w)
        got = os.read(r, 4096)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert status == 0 and got == b"ok", (status, got)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def copy_refused(self, data: st.DataObject) -> None:
        """Copies of an allocation, its view or the pool are refused (they would escape tracking)."""
        token = data.draw(st.sampled_from(sorted(self.live)))
        a = self.live[token][0]
        for obj in (a, a.view(), self.pool):
            for fn in (copy.copy, copy.deepcopy):
                with pytest.raises(TypeError, match="cannot be"):
                    fn(obj)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def two_threads_view(self, data: st.DataObject) -> None:
        """Two threads take views of one allocation at once: both are tracked."""
        token = data.draw(st.sampled_from(sorted(self.live)))
        a = self.live[token][0]
        views: list[object] = [None, None]
        start = threading.Barrier(2, timeout=10)

        def take(i: int) -> None:
            start.wait()
            views[i] = a.view()

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a._views is not None and set(views) <= set(a._views)
        keep = views[1]
        views.clear()
        with pytest.raises(BufferError):
            a.free()
        del keep

    @invariant()
    def consistent(self) -> None:
        pool = self.pool
        pool._check()
        s = pool.stats()
        allocs = sorted((a for a, _ in self.live.values()), key=lambda a: a.ptr)
        for x, y in itertools.pairwise(allocs):
            assert x.ptr + max(x.size, 1) <= y.ptr, "live allocations overlap"
        for a, seed in self.live.values():
            assert bytes(self.device.read(a.ptr, a.size)) == pattern(seed, a.size), (
                f"bytes of {a!r} changed"
            )
        def rounded(a: Allocation) -> int:
            return max(ALIGNMENT, -(-a.size // ALIGNMENT) * ALIGNMENT)

        assert s.live_allocations == len(self.live)
        assert s.requested_bytes == sum(a.size for a in allocs)
        assert s.allocated_bytes == sum(rounded(a) for a in allocs) + self.n_acquired * P
        assert s.acquired_pages == self.n_acquired
        assert s.allocated_bytes - s.acquired_pages * P + s.cached_bytes == s.mapped_pages * P
        assert (
            s.free_pages + s.mapped_pages + s.acquired_pages + s.quarantined_pages == s.total_pages
        )
        assert s.largest_allocatable >= max(0, self.limit_pages - s.pinned_pages) * P
        assert (s.n_malloc, s.n_free) == (self.expected_mallocs, self.expected_frees)
        assert s.quarantined_pages == 0
        snap = pool.snapshot()
        assert len(snap) == s.total_pages
        assert sum(p.state == "free" for p in snap) == s.free_pages
        assert sum(p.state == "acquired" for p in snap) == s.acquired_pages
        # A page is in use exactly when a live allocation touches it (through
        # any of its mappings); a mapped page no live allocation touches is cached
        # (a page mapped more than once too: a reclaim dissolves its aliases);
        # an unmapped one is free.
        spans = [(a.ptr, a.ptr + rounded(a)) for a in allocs]
        core = pool._core
        with core.lock:
            alias_at: dict[int, list[int]] = {}
            for al in core.aliases:
                alias_at.setdefault(al.page.index, []).append(al.arena.base + al.slot * P)
        self.n_aliased = max(getattr(self, "n_aliased", 0), core.n_aliases)
        for p in snap:
            if p.state in ("free", "acquired"):
                assert p.address is None
                continue
            assert p.address is not None
            touched = []
            for lo in (p.address, *alias_at.get(p.index, ())):
                if lo is not None:
                    touched += [x for x, y in spans if x < lo + P and lo < y]
            touched.sort()
            in_use = bool(touched)
            assert (p.state == "in_use") == in_use, f"page {p.index} is {p.state}"
            assert [x.address for x in p.allocations] == touched
            assert sorted(p.alias_addresses) == sorted(alias_at.get(p.index, []))
        assert sum(p.state == "cached" for p in snap) == s.reclaimable_pages
        assert s.n_syncs == 0 and "synchronize" not in self.device.counters().calls
        for stream in pool._core.streams.values():  # retired and empty: forgotten
            if stream.retired and not stream.stale:
                assert any(a.mapped for a in stream.arenas), f"stream {stream.key} holds nothing"

    def teardown(self) -> None:
        # A view outlives close() while a thread calls stats(): dropping it releases the
        # memory even when that thread holds the lock at that moment.
        views = [a.view("uint8") for a, _ in self.live.values()][:1]
        self.live.clear()
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                self.pool.stats()
                time.sleep(0)  # let the main thread run: it closes and drops the view

        t = threading.Thread(target=spin)
        t.start()
        try:
            self.pool.close()
            views.clear()
            gc.collect()
            deadline = time.monotonic() + 10
            while self.device.counters().live != (0, 0, 0) and time.monotonic() < deadline:
                time.sleep(0.001)
        finally:
            stop.set()
            t.join()
        gc.collect()
        assert self.device.counters().live == (0, 0, 0), "close() left driver resources behind"
        assert self.device._backend.live_events() == 0, "close() left events behind"


PoolMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPagePoolStateful = PoolMachine.TestCase


def test_a_stream_reuses_what_it_freed_above_a_lowered_limit_while_its_work_is_pending() -> None:
    # Found by the machine above (2026-12-07): a 4-page block and three small ones on a fifth
    # page, the stream's work held, the limit lowered to 4 pages, the small ones freed (their
    # page cannot be given back: its work is pending), then a small request of that stream.
    # It reuses the fifth page (no wait, no new page); once the work is done and the blocks
    # are freed, the pool is back at its limit.
    m = PoolMachine()
    toks = [m.malloc(n, 0) for n in (201616, 0, 0)]
    m.hold(0)
    t3 = m.malloc(0, 0)
    m.set_limit(4)
    m.free_in_threads(t3, toks[2], toks[1])
    assert m.pool.stats().total_pages == 5
    assert m.malloc(0, 0) is not None
    s = m.pool.stats()
    assert (s.total_pages, s.pinned_pages, s.n_page_creations) == (5, 5, 5)
    m.consistent()
    m.complete(0)
    for t in list(m.live):
        m.free(t)
    assert m.pool.stats().total_pages == 4
    m.teardown()

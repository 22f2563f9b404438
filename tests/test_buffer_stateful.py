"""Stateful property test of GrowableBuffer on the host emulator.

Random resize / reserve / shrink_to_fit (moving past ``max_size`` or not) /
write / sleep (with and without a backup) / wake / views kept alive across
steps / up to two injected driver faults in an operation (the second often
in the undo of the first), on a buffer of 64 KiB pages with or without a
PagePool behind it. A model holds the bytes the
buffer must hold (those it was given, never the undefined bytes of new pages).
After every step: pointer, size and capacity are what the documented rules
say (capacity: the smallest page multiple holding the size, never below what
``reserve`` asked for until ``shrink_to_fit``; the pointer moves only past
``max_size``), every known byte survived (read through ``read()`` and through
each live view), a failed operation changed nothing (where the documentation
allows it, a double fault left a sleep asleep with its backup, or made a move
whose old range was unmapped, or a pooled shrink, unusable: the buffer is then
closed and a new one made),
the device holds exactly the buffer's mapped pages (plus those a failed growth
left mapped, and the pool's cached ones), and ``n_sleeps -
n_wakes`` is 1 asleep and 0 awake. At the end ``close()`` leaves nothing live.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vmmpool
from vmmpool._buffer import GrowableBuffer
from vmmpool._pool import PagePool

P = 64 << 10  # page size: small, so that reading every byte each step is cheap
CAPACITY = 48  # pages the emulated device has
LIMIT = 32  # the pool's limit, in pages

#: Driver calls a buffer operation may make (one of them fails once, at its nth call).
FAULT_OPS = ("create", "release", "map", "unmap", "set_access", "reserve", "free_address", "retain")


def _pages(n: int) -> int:
    return -(-n // P)


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dev = vmmpool.Device.emulated(capacity=CAPACITY * P, granularity=P)
        self.pool: PagePool | None = None
        self.buf: GrowableBuffer | None = None
        self.known = bytearray()  # the bytes [0, len(known)) the buffer must hold
        self.floor = 0  # pages reserve() asked to keep
        self.max_pages = 0
        self.asleep = False
        self.lost = False  # asleep without a backup: the bytes given back are undefined
        self.views: list[tuple[object, int, int]] = []  # (numpy array, offset, length)
        self.seed = 0

    # ------------------------------------------------------------------ setup
    @initialize(pooled=st.booleans(), max_pages=st.integers(1, 8), initial=st.integers(0, 3 * P))
    def start(self, pooled: bool, max_pages: int, initial: int) -> None:
        if pooled:
            self.pool = PagePool(self.dev, limit=LIMIT * P)
        self.new_buffer(max_pages, initial)

    def new_buffer(self, max_pages: int, initial: int) -> None:
        initial = min(initial, max_pages * P)
        self.buf = GrowableBuffer(
            max_size=max_pages * P, device=None if self.pool is not None else self.dev,
            pool=self.pool, initial_size=initial,
        )
        self.max_pages = max_pages
        self.known = bytearray()
        self.floor = 0
        self.fill(0, initial)

    @precondition(lambda self: self.buf is None)
    @rule(max_pages=st.integers(1, 8), initial=st.integers(0, 3 * P))
    def restart(self, max_pages: int, initial: int) -> None:
        """After a documented double fault made the buffer unusable (it was closed): a new one."""
        self.new_buffer(max_pages, initial)

    def fill(self, lo: int, hi: int) -> None:
        """Write fresh bytes to [lo, hi) and note them."""
        if hi <= lo:
            return
        self.seed += 1
        data = np.random.default_rng(self.seed).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
        assert self.buf is not None
        self.buf.write(data, lo)
        if len(self.known) < lo:
            self.known.extend(bytes(self.buf.read(lo - len(self.known), len(self.known))))
        self.known[lo:hi] = data

    def capacity_pages(self) -> int:
        assert self.buf is not None
        return self.buf.capacity // P

    def state(self) -> tuple[int, int, int, int, bytes]:
        b = self.buf
        assert b is not None
        return b.ptr, b.size, b.capacity, b.max_size, bytes(b.read(min(len(self.known), b.size)))

    def unmapped_from(self, capacity: int) -> None:
        """Bytes past the capacity are gone; those past the size in mapped pages stay."""
        del self.known[capacity:]

    def arm(self, faults: list[tuple[str, int]]) -> None:
        for op, nth in faults:
            self.dev._backend.inject_fault(op, nth=nth, name="CUDA_ERROR_INVALID_VALUE")

    def attempt(self, faults: list[tuple[str, int]], call: object, may_break: bool = False) -> bool:
        """Run `call` with `faults` armed: True if it succeeded. A failure changed nothing, but
        where the documentation allows it (`may_break`: a move whose old range was unmapped, or
        a shrink with a pool, whose undo failed too) it made the buffer unusable: then it is
        closed and the run goes on without it."""
        before = self.state()
        self.arm(faults)
        try:
            call()  # type: ignore[operator]
        except (vmmpool.OutOfMemoryError, vmmpool.DriverError):
            assert faults or self.pool is not None, "failed without a fault"
            assert self.buf is not None
            if self.buf._state.unusable is not None:
                assert may_break and len(faults) == 2, self.buf._state.unusable
                assert any(op == "free_address" for op, _n in faults) or self.pool is not None, (
                    "a move whose old range is still mapped stays usable", faults)
                self.views.clear()
                gc.collect()
                self.buf.close()
                self.buf = None
                return False
            assert self.state() == before, "a failed operation changed the buffer"
            return False
        finally:
            self.dev._backend.clear_faults()
        return True

    @staticmethod
    def refused(call: Callable[[], object], exc: type[BaseException], what: str) -> None:
        try:
            call()
        except exc:
            return
        raise AssertionError(f"{what} did not raise {exc.__name__}")

    #: None, one or two faults (the second often in the undo of the first's failure)
    faults = st.lists(st.tuples(st.sampled_from(FAULT_OPS), st.integers(1, 4)), max_size=2)

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: self.buf is not None and not self.asleep)
    @rule(n=st.integers(0, 10 * P), move=st.booleans(), fault=faults)
    def resize(self, n: int, move: bool, fault: list[tuple[str, int]]) -> None:
        b = self.buf
        assert b is not None
        old_ptr, old_size, old_max = b.ptr, b.size, b.max_size
        target = max(_pages(n), self.floor)
        if n > old_max and not move:
            self.refused(lambda: b.resize(n), ValueError, "resize past max_size without allow_move")
            return
        if self.views and (
            n > old_max or any(off + ln > target * P for _v, off, ln in self.views)
        ):
            self.refused(lambda: b.resize(n, allow_move=move), BufferError,
                         "a resize that unmaps (or moves) bytes under a live view")
            assert self.state()[:2] == (old_ptr, old_size)
            return
        breaks = n > old_max or (self.pool is not None and target < self.capacity_pages())
        if not self.attempt(fault, lambda: b.resize(n, allow_move=move), breaks):
            return
        assert b.size == n
        assert b.capacity == target * P, (b.capacity, target)
        if n > old_max:
            assert b.max_size >= max(n, 2 * old_max)
        else:
            assert b.ptr == old_ptr and b.max_size == old_max
        self.unmapped_from(b.capacity)
        if n > len(self.known):
            self.fill(len(self.known), n)

    @precondition(lambda self: self.buf is not None and not self.asleep)
    @rule(n=st.integers(0, 10 * P), move=st.booleans(), fault=faults)
    def reserve(self, n: int, move: bool, fault: list[tuple[str, int]]) -> None:
        b = self.buf
        assert b is not None
        old_ptr, old_max, have = b.ptr, b.max_size, self.capacity_pages()
        if n > old_max and not move:
            self.refused(lambda: b.reserve(n), ValueError, "reserve past max_size without allow_move")
            return
        if n > old_max and self.views:
            self.refused(lambda: b.reserve(n, allow_move=True), BufferError, "a move with live views")
            return
        if not self.attempt(fault, lambda: b.reserve(n, allow_move=move), n > old_max):
            return
        assert b.capacity == max(_pages(n), have) * P
        if n <= old_max:
            assert b.ptr == old_ptr
        self.floor = max(self.floor, _pages(n))

    @precondition(lambda self: self.buf is not None and not self.asleep)
    @rule(fault=faults)
    def shrink_to_fit(self, fault: list[tuple[str, int]]) -> None:
        b = self.buf
        assert b is not None
        target = _pages(b.size)
        if any(off + ln > target * P for _v, off, ln in self.views):
            self.refused(b.shrink_to_fit, BufferError, "shrink_to_fit under a live view")
            return
        breaks = self.pool is not None and target < self.capacity_pages()
        if not self.attempt(fault, b.shrink_to_fit, breaks):
            return
        assert b.capacity == target * P
        self.floor = 0
        self.unmapped_from(b.capacity)

    def span(self, data: st.DataObject, most: int | None) -> tuple[int, int]:
        """A non-empty byte range [lo, hi) inside the size, at most `most` long."""
        assert self.buf is not None
        size = self.buf.size
        lo = data.draw(st.integers(0, size - 1))
        return lo, data.draw(st.integers(lo + 1, size if most is None else min(size, lo + most)))

    @precondition(lambda self: self.buf is not None and not self.asleep and self.buf.size > 0)
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        lo, hi = self.span(data, 3 * P)
        self.fill(lo, hi)

    @precondition(lambda self: self.buf is not None and not self.asleep and self.buf.size > 0)
    @rule(data=st.data())
    def take_view(self, data: st.DataObject) -> None:
        off, end = self.span(data, None)
        ln = end - off
        assert self.buf is not None
        arr = np.from_dlpack(self.buf.view(shape=ln, offset=off))
        self.views.append((arr, off, ln))

    @precondition(lambda self: bool(self.views))
    @rule(data=st.data())
    def drop_view(self, data: st.DataObject) -> None:
        del self.views[data.draw(st.integers(0, len(self.views) - 1))]
        gc.collect()

    @precondition(lambda self: self.buf is not None and not self.asleep and not self.views)
    @rule(backup=st.booleans(), fault=faults)
    def sleep(self, backup: bool, fault: list[tuple[str, int]]) -> None:
        b = self.buf
        assert b is not None
        cap = b.capacity
        before = self.state()
        self.arm(fault)
        try:
            b.sleep(backup)
        except (vmmpool.OutOfMemoryError, vmmpool.DriverError):
            assert fault or self.pool is not None, "failed without a fault"
            assert b._state.unusable is None  # sleep never leaves it unusable
            if b.asleep:  # its undo failed too: asleep with its backup (documented)
                assert len(fault) == 2
                self.asleep = True
                self.lost = not backup
            else:
                assert self.state() == before, "a failed sleep changed the buffer"
            return
        finally:
            self.dev._backend.clear_faults()
        assert b.asleep and b.capacity == cap
        self.asleep = True
        self.lost = not backup

    @precondition(lambda self: self.asleep)
    @rule(fault=faults)
    def wake(self, fault: list[tuple[str, int]]) -> None:
        b = self.buf
        assert b is not None
        self.arm(fault)
        try:
            b.wake()
        except (vmmpool.OutOfMemoryError, vmmpool.DriverError):
            assert fault or self.pool is not None
            assert b.asleep and b._state.unusable is None  # a failed wake: still asleep
            return
        finally:
            self.dev._backend.clear_faults()
        assert not b.asleep
        self.asleep = False
        if self.lost:  # woken without a backup: every byte undefined; give it known ones
            self.lost = False
            self.known = bytearray()
            self.fill(0, b.size)

    @precondition(lambda self: self.asleep)
    @rule()
    def refused_while_asleep(self) -> None:
        b = self.buf
        assert b is not None
        for call in (lambda: b.resize(0), lambda: b.reserve(P), b.shrink_to_fit, lambda: b.write(b"x")):
            self.refused(call, vmmpool.AsleepError, "an operation on a sleeping buffer")

    # ------------------------------------------------------------- invariants
    @invariant()
    def holds(self) -> None:
        b = self.buf
        if b is None:
            return
        s = b.sleep_stats()
        assert s.n_sleeps - s.n_wakes == (1 if b.asleep else 0), s
        assert b.asleep == self.asleep
        c = self.dev.counters()
        if self.asleep:  # (a failed sleep or wake may leave slots mapped: kept or stale)
            assert c.mappings == len(b._state.kept) + len(b._state.stale), (c, b._state.kept)
            return
        assert b.capacity == max(_pages(b.size), self.floor, b.capacity // P) * P
        assert b.capacity >= _pages(b.size) * P and b.capacity // P >= self.floor
        n = min(len(self.known), b.size)
        assert bytes(b.read(n)) == bytes(self.known[:n]), "bytes lost"
        for arr, off, ln in self.views:
            assert bytes(np.asarray(arr).tobytes()) == bytes(self.known[off : off + ln]), "view bytes lost"
        st_ = b._state  # pages a failed growth left mapped past the capacity are mapped too,
        # and so are those a range a failed move could not close still maps
        stray = sum(1 for r in st_.debris_res for m in r.mappings() if not m.closed)
        assert c.mappings == b.capacity // P + len(st_.tail) + stray, (c, b.capacity, st_.tail)
        if self.pool is None:
            debris = sum(1 for p in st_.debris_pages if not p.closed)
            assert c.allocations == b.capacity // P + len(st_.tail) + debris, c
        else:
            assert c.allocations == self.pool.stats().total_pages, (c, self.pool.stats())

    def teardown(self) -> None:
        self.dev._backend.clear_faults()
        self.views.clear()
        gc.collect()
        if self.buf is not None:
            self.buf.close()
        if self.pool is not None:
            self.pool.close()
        gc.collect()
        assert self.dev.counters().live == (0, 0, 0), self.dev.counters()
        assert self.dev._backend.live_events() == 0
        assert self.dev._backend.live_host_allocations() == 0
        self.dev.close()


BufferMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGrowableBufferStateful = BufferMachine.TestCase

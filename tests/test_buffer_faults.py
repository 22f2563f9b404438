"""GrowableBuffer under stress: 1,000 random resizes, and a fault at every driver call.

The fault loop follows the issue: for each backend operation, fail its 1st,
2nd, 3rd... call during the operation under test, until the operation
succeeds without the fault firing. After every failure the buffer (pointer,
size, capacity, max_size, contents) and the backend's live resource counts
must be exactly what they were.
"""

from __future__ import annotations

import ctypes
import gc
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import vmmpool
from vmmpool._buffer import GrowableBuffer

MiB = 1 << 20

#: Every backend operation a resize, reserve, shrink or move may call.
OPS = ("create", "release", "map", "unmap", "set_access", "reserve", "free_address", "retain", "synchronize")


_NOISE = np.random.default_rng(7).integers(0, 256, 24 * MiB, dtype=np.uint8)


def fill(buf: GrowableBuffer, seed: int) -> None:
    """Fill the whole size with bytes that differ per seed and per position."""
    buf.write(_NOISE[seed * 4099 : seed * 4099 + buf.size])


@dataclass(frozen=True)
class Snapshot:
    ptr: int
    size: int
    capacity: int
    max_size: int
    data: bytes
    live: tuple[int, int, int]

    @classmethod
    def of(cls, buf: GrowableBuffer) -> Snapshot:
        return cls(
            buf.ptr, buf.size, buf.capacity, buf.max_size, bytes(buf.read()), buf.device.counters().live
        )


def unchanged(buf: GrowableBuffer, snap: Snapshot) -> bool:
    """Pointer, size, capacity, max_size and contents as in `snap` (live counts aside)."""
    return Snapshot.of(buf).__dict__ | {"live": snap.live} == snap.__dict__


def all_or_nothing(
    device: vmmpool.Device,
    setup: Callable[[], GrowableBuffer],
    action: Callable[[GrowableBuffer], object],
    ops: tuple[str, ...] = OPS,
) -> dict[str, int]:
    """Fail every call of every op in `action` in turn; return the faults that fired per op."""
    backend = device._backend
    fired_per_op = {}
    for op in ops:
        nth = 1
        while True:
            buf = setup()
            snap = Snapshot.of(buf)
            calls = device.counters().calls.get(op, 0)
            name = "CUDA_ERROR_OUT_OF_MEMORY" if nth % 2 else "CUDA_ERROR_INVALID_VALUE"
            backend.inject_fault(op, nth=nth, name=name)
            try:
                action(buf)
            except (vmmpool.OutOfMemoryError, vmmpool.DriverError) as err:
                fired = device.counters().calls.get(op, 0) - calls >= nth
                assert fired, f"{op} #{nth}: failed without the injected fault: {err!r}"
                assert Snapshot.of(buf) == snap, f"{op} #{nth} changed the buffer"
                assert getattr(err, "name", "") == name
                buf.close()
                nth += 1
                continue
            finally:
                backend.clear_faults()
            fired = device.counters().calls.get(op, 0) - calls >= nth
            assert not fired, f"{op} #{nth} fired but the operation succeeded"
            buf.close()
            break
        fired_per_op[op] = nth - 1
    return fired_per_op


def grown(device: vmmpool.Device, steps: list[int], max_pages: int) -> Callable[[], GrowableBuffer]:
    """A buffer grown in several steps (sizes in pages), filled with data."""
    g = device.granularity

    def setup() -> GrowableBuffer:
        buf = GrowableBuffer(max_size=max_pages * g, device=device)
        for i, pages in enumerate(steps):
            buf.resize(pages * g - 3 * i)
            fill(buf, i)
        return buf

    return setup


def test_fault_at_every_call_of_growth_in_place(device: vmmpool.Device) -> None:
    g = device.granularity
    fired = all_or_nothing(device, grown(device, [1, 2], 8), lambda b: b.resize(6 * g))
    assert fired == {**dict.fromkeys(OPS, 0), "create": 4, "map": 4, "set_access": 1}


def test_fault_at_every_call_of_reserve(device: vmmpool.Device) -> None:
    g = device.granularity
    fired = all_or_nothing(device, grown(device, [2], 8), lambda b: b.reserve(5 * g))
    assert fired == {**dict.fromkeys(OPS, 0), "create": 3, "map": 3, "set_access": 1}


def test_fault_at_every_call_of_shrink(device: vmmpool.Device) -> None:
    g = device.granularity
    fired = all_or_nothing(device, grown(device, [1, 3, 5], 8), lambda b: b.resize(g + 1))
    assert fired == {**dict.fromkeys(OPS, 0), "synchronize": 1, "release": 3, "unmap": 1}


def test_fault_at_every_call_of_shrink_to_fit(device: vmmpool.Device) -> None:
    g = device.granularity

    def setup() -> GrowableBuffer:
        buf = grown(device, [2], 8)()
        buf.reserve(6 * g)
        return buf

    fired = all_or_nothing(device, setup, lambda b: b.shrink_to_fit())
    assert fired == {**dict.fromkeys(OPS, 0), "synchronize": 1, "release": 4, "unmap": 1}


def test_fault_at_every_call_of_move_after_several_growth_steps(device: vmmpool.Device) -> None:
    g = device.granularity
    setup = grown(device, [1, 2, 3, 4], 4)  # four growth steps, full

    def move(buf: GrowableBuffer) -> None:
        old = buf.ptr
        assert buf.resize(6 * g, allow_move=True) != old

    fired = all_or_nothing(device, setup, move)
    assert fired == {
        **dict.fromkeys(OPS, 0),
        "create": 2,
        "reserve": 1,
        "map": 6,
        "set_access": 1,
        "synchronize": 1,
        "unmap": 1,
        "free_address": 1,
    }
    # and the successful move kept every byte
    buf = setup()
    data = bytes(buf.read())
    buf.resize(6 * g, allow_move=True)
    assert bytes(buf.read(len(data))) == data
    buf.close()


def test_fault_at_every_call_of_construction(device: vmmpool.Device) -> None:
    g = device.granularity
    live = device.counters().live
    backend = device._backend
    for op in OPS:
        nth = 1
        while True:
            backend.inject_fault(op, nth=nth)
            try:
                buf = GrowableBuffer(max_size=4 * g, device=device, initial_size=3 * g)
            except vmmpool.OutOfMemoryError:
                assert device.counters().live == live
                nth += 1
                continue
            finally:
                backend.clear_faults()
            buf.close()
            break


# --------------------------------------------------------- when undo fails too
def test_a_growth_whose_undo_fails_leaves_the_buffer_as_it_was(
    device: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    """Growth fails at its third page and unmapping the two it mapped fails too: the buffer
    is as it was (usable, every byte), the two pages stay mapped past its capacity, and the
    next growth unmaps them first (once more failing: raises, nothing changed)."""
    g = device.granularity
    live = device.counters().live
    backend = device._backend
    buf = grown(device, [2], 8)()
    snap = Snapshot.of(buf)
    backend.inject_fault("map", nth=3)  # growth fails at its third page...
    backend.inject_fault("unmap", nth=1)  # ...and unmapping the first two fails too
    with pytest.raises(vmmpool.OutOfMemoryError) as info:
        buf.resize(6 * g)
    backend.clear_faults()
    if sys.version_info >= (3, 11):  # notes (add_note) exist from Python 3.11
        assert "the buffer is as it was" in "".join(info.value.__notes__)
    assert "undoing it failed too" in caplog.text
    assert unchanged(buf, snap)
    assert buf._state.unusable is None and sorted(buf._state.tail) == [2, 3]
    assert "2 page(s) a failed growth left mapped past the capacity" in repr(buf)
    c = device.counters()
    assert c.mappings - live[2] == 4 and c.allocations - live[1] == 4  # 2 + the 2 left mapped
    backend.inject_fault("unmap", nth=1, name="CUDA_ERROR_INVALID_VALUE")  # the next growth's
    # unmap of them fails: nothing changes
    with pytest.raises(vmmpool.DriverError):
        buf.resize(3 * g)
    backend.clear_faults()
    assert Snapshot.of(buf).data == snap.data and sorted(buf._state.tail) == [2, 3]
    assert buf.resize(5 * g) == snap.ptr  # unmaps them, then grows in place
    assert buf._state.tail == {} and bytes(buf.read(snap.size)) == snap.data
    assert "failed growth" not in repr(buf)
    c = device.counters()
    assert c.mappings - live[2] == 5 and c.allocations - live[1] == 5
    buf.close()
    assert device.counters().live == live


def test_a_shrink_gives_back_the_pages_a_failed_growth_left_mapped(device: vmmpool.Device) -> None:
    g = device.granularity
    live = device.counters().live
    backend = device._backend
    buf = grown(device, [2], 8)()
    bad = "CUDA_ERROR_INVALID_VALUE"
    backend.inject_fault("set_access", nth=1, name=bad)
    backend.inject_fault("unmap", nth=1, name=bad)
    with pytest.raises(vmmpool.DriverError):
        buf.resize(6 * g)
    backend.clear_faults()
    assert len(buf._state.tail) == 4
    backend.inject_fault("unmap", nth=1, name=bad)  # a shrink that cannot unmap them: kept
    buf.resize(g)
    backend.clear_faults()
    assert buf.capacity == g and len(buf._state.tail) == 4
    buf.resize(g)  # a resize to the same size unmaps them, best effort
    assert buf._state.tail == {}
    assert device.counters().live[1:] == (live[1] + 1, live[2] + 1)
    buf.close()
    assert device.counters().live == live


@pytest.mark.parametrize("then", ["sleep", "move", "close"])
def test_pages_a_failed_growth_left_mapped_go_at_sleep_move_or_close(
    device: vmmpool.Device, then: str
) -> None:
    g = device.granularity
    live = device.counters().live
    backend = device._backend
    buf = grown(device, [2], 4)()
    data = bytes(buf.read())
    bad = "CUDA_ERROR_INVALID_VALUE"
    backend.inject_fault("set_access", nth=1, name=bad)  # growth maps 2 pages, granting access
    backend.inject_fault("unmap", nth=1, name=bad)  # fails, and unmapping them fails too
    with pytest.raises(vmmpool.DriverError):
        buf.resize(4 * g)
    backend.clear_faults()
    assert sorted(buf._state.tail) == [2, 3]
    if then == "sleep":
        buf.sleep()
        assert device.counters().mappings == live[2] and buf._state.tail == {}
        buf.wake()
    elif then == "move":
        buf.resize(6 * g, allow_move=True)
        assert buf._state.tail == {} and device.counters().mappings - live[2] == 6
    if then != "close":
        assert bytes(buf.read(len(data))) == data
    buf.close()
    assert device.counters().live == live


def _double_faults() -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """A growth of 3 pages failing at one call, then its undo failing at another."""
    first = [("create", 2), ("map", 1), ("map", 3), ("set_access", 1)]
    second = [("unmap", 1), ("unmap", 2), ("release", 1), ("release", 2)]
    return [(a, b) for a in first for b in second]


def _arm(backend: Any, *faults: tuple[str, int]) -> None:
    """Inject each ``(op, nth)`` fault (an invalid-value driver error)."""
    for op, nth in faults:
        backend.inject_fault(op, nth=nth, name="CUDA_ERROR_INVALID_VALUE")


def _emulated_buffer(
    pooled: bool, max_pages: int, pages: int, short: int, seed: int, limit_pages: int = 24
) -> tuple[vmmpool.Device, vmmpool.PagePool | None, GrowableBuffer]:
    """A fresh emulated device, a PagePool on it if `pooled`, and a buffer of `pages` pages
    less `short` bytes, filled."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    g = dev.granularity
    pool = vmmpool.PagePool(dev, limit=limit_pages * g) if pooled else None
    buf = GrowableBuffer(max_size=max_pages * g, device=None if pooled else dev, pool=pool)
    buf.resize(pages * g - short)
    fill(buf, seed)
    return dev, pool, buf


@pytest.mark.parametrize(("first", "second"), _double_faults())
@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_double_faults_in_a_growth_never_lose_a_byte_or_leak(
    first: tuple[str, int], second: tuple[str, int], pooled: bool
) -> None:
    dev, pool, buf = _emulated_buffer(pooled, 8, 2, 5, 3, limit_pages=16)
    g = dev.granularity
    snap = Snapshot.of(buf)
    be = dev._backend
    _arm(be, first, second)
    try:
        buf.resize(5 * g)
    except (vmmpool.OutOfMemoryError, vmmpool.DriverError):
        assert unchanged(buf, snap)
    be.clear_faults()
    assert buf._state.unusable is None
    buf.resize(6 * g)
    assert buf.ptr == snap.ptr and bytes(buf.read(snap.size)) == snap.data
    c = dev.counters()
    assert c.mappings == 6 and buf._state.tail == {}
    buf.close()
    if pool is not None:
        pool.close()
    assert dev.counters().live == (0, 0, 0)


def _move_double_faults() -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """A move failing at one call (creating, reserving, mapping, granting, unmapping or freeing
    the old range), then its undo failing at another."""
    first = [("create", 2), ("reserve", 1), ("map", 2), ("set_access", 1), ("unmap", 1),
             ("free_address", 1)]
    second = [("unmap", 1), ("unmap", 2), ("free_address", 1), ("free_address", 2), ("release", 1),
              ("map", 1), ("map", 4), ("set_access", 1), ("set_access", 2)]
    return [(a, b) for a in first for b in second]


@pytest.mark.parametrize(("first", "second"), _move_double_faults())
@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_double_faults_in_a_move_leave_it_as_it_was_unless_the_old_range_is_gone(
    first: tuple[str, int], second: tuple[str, int], pooled: bool
) -> None:
    """A move whose undo fails too leaves the buffer as it was (usable, every byte) while its
    old range still maps the pages; only when that range was unmapped (its free failed) and
    mapping it back failed is it unusable. Either way nothing leaks once it is closed, and a
    usable one moves on the next try, clearing what the failed undo left first."""
    dev, pool, buf = _emulated_buffer(pooled, 2, 2, 5, 4)
    g = dev.granularity
    snap = Snapshot.of(buf)
    be = dev._backend
    _arm(be, first, second)
    try:
        buf.resize(3 * g, allow_move=True)
    except (vmmpool.OutOfMemoryError, vmmpool.DriverError):
        if buf._state.unusable is not None:
            assert first == ("free_address", 1) and second[0] in ("map", "set_access")
        else:
            assert unchanged(buf, snap)
    be.clear_faults()
    if buf._state.unusable is None:
        if buf.ptr == snap.ptr:  # failed: moves now
            left = len(buf._state.debris_res)
            assert ("range(s) a failed move left reserved" in repr(buf)) == (left > 0)
            buf.resize(3 * g, allow_move=True)
            assert buf._state.debris_res == [] and buf._state.debris_pages == []
        assert buf.ptr != snap.ptr and bytes(buf.read(snap.size)) == snap.data
        c = dev.counters()
        assert (c.mappings, c.reservations) == (3, 1)
    buf.close()
    if pool is not None:
        pool.close()
    assert dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize("then", ["grow", "move", "sleep", "shrink", "close"])
@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_a_range_a_failed_move_could_not_close_goes_at_the_next_operation(
    then: str, pooled: bool
) -> None:
    dev, pool, buf = _emulated_buffer(pooled, 2, 2, 0, 5)
    g = dev.granularity
    snap = Snapshot.of(buf)
    be = dev._backend
    # the move maps 3 pages into its new range, and neither its undo nor the second try
    # unmaps them
    _arm(be, ("set_access", 1), ("unmap", 1), ("unmap", 2))
    with pytest.raises(vmmpool.DriverError) as info:
        buf.resize(3 * g, allow_move=True)
    be.clear_faults()
    if sys.version_info >= (3, 11):
        assert "stays reserved and mapped" in "".join(info.value.__notes__)
    assert unchanged(buf, snap) and buf._state.unusable is None
    assert len(buf._state.debris_res) == 1 and len(buf._state.debris_pages) == 1
    assert "1 range(s) a failed move left reserved" in repr(buf)
    c = dev.counters()
    assert (c.mappings, c.reservations) == (2 + 3, 2)  # the new range maps the 2 pages and 1 new
    _arm(be, ("unmap", 1), ("unmap", 2))  # (a shrink tries twice: quietly, then for real)
    if then in ("grow", "move", "sleep", "shrink"):  # they close it first: fails again, no change
        with pytest.raises(vmmpool.DriverError):
            if then == "sleep":
                buf.sleep()
            elif then == "shrink":  # it maps the pages the shrink would give back
                buf.resize(g)
            else:
                buf.resize(3 * g, allow_move=True)
        assert unchanged(buf, snap) and len(buf._state.debris_res) == 1
        if pool is not None:
            assert pool.stats().free_pages == 0  # no page went back while mapped there
    be.clear_faults()
    if then == "grow":
        buf.resize(2 * g)  # within max_size: nothing to map; clears it (best effort)
        assert buf._state.debris_res == []
    elif then == "move":
        buf.resize(3 * g, allow_move=True)
        assert buf.ptr != snap.ptr and bytes(buf.read(snap.size)) == snap.data
    elif then == "sleep":
        buf.sleep()
        assert dev.counters().mappings == 0
        buf.wake()
    elif then == "shrink":
        buf.resize(g)
        assert bytes(buf.read()) == snap.data[:g]
    if then != "close":
        assert buf._state.debris_res == [] and buf._state.debris_pages == []
        c = dev.counters()
        assert c.reservations == 1 and c.mappings == buf.capacity // g
    buf.close()
    if pool is not None:
        pool.close()
    assert dev.counters().live == (0, 0, 0)


def test_pages_a_failed_move_could_not_give_back_go_at_the_next_resize(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The move fails at its reserve, after creating its page; giving that page back fails
    # twice (the undo, then move_failed's second try): it is held, named in the note and in
    # repr, and the next resize gives it back (not only close()).
    dev, _pool, buf = _emulated_buffer(False, 2, 2, 0, 6)
    g = dev.granularity
    snap = Snapshot.of(buf)
    be = dev._backend
    _arm(be, ("reserve", 1), ("release", 1), ("release", 2))
    with pytest.raises(vmmpool.DriverError) as info:
        buf.resize(3 * g, allow_move=True)
    be.clear_faults()
    if sys.version_info >= (3, 11):
        assert "1 page(s) acquired for it are given back" in "".join(info.value.__notes__)
    assert unchanged(buf, snap) and buf._state.unusable is None
    assert len(buf._state.debris_pages) == 1 and buf._state.debris_res == []
    assert "1 page(s) a failed undo could not give back" in repr(buf)
    assert dev.counters().allocations == 3
    buf.resize(2 * g)  # maps and unmaps nothing: gives it back on the way
    assert buf._state.debris_pages == [] and dev.counters().allocations == 2
    assert "could not give back" not in repr(buf)
    buf.close()
    assert dev.counters().live == (0, 0, 0)


def test_failed_undo_of_a_move_frees_both_ranges_on_close(device: vmmpool.Device) -> None:
    g = device.granularity
    live = device.counters().live
    backend = device._backend
    buf = grown(device, [1, 2], 2)()
    backend.inject_fault("free_address", nth=1)  # freeing the old range fails after its unmap...
    backend.inject_fault("map", nth=5)  # ...(3 maps into the new range) and remapping it fails
    with pytest.raises(vmmpool.OutOfMemoryError):
        buf.resize(3 * g, allow_move=True)
    backend.clear_faults()
    with pytest.raises(vmmpool.VmmError, match="unusable"):
        buf.view()
    buf.close()
    assert device.counters().live == live


@pytest.mark.parametrize(
    "faults", [(("unmap", 1), ("retain", 2)), (("release", 2), ("retain", 1)), (("unmap", 1), ("retain", 1))]
)
@pytest.mark.parametrize("then", ["move", "sleep", "shrink", "share", "close"])
def test_a_shrink_whose_undo_fails_leaves_the_buffer_as_it_was(
    device: vmmpool.Device, faults: tuple[tuple[str, int], ...], then: str
) -> None:
    """Without a pool a shrink releases the handles of the pages it drops, then unmaps them.
    The unmap (or a release) fails and taking a handle back fails too: the buffer is as it
    was, those pages keep their memory through their mappings, and a move, sleep or share
    takes their handles back first; nothing leaks."""
    g = device.granularity
    live = device.counters().live
    backend = device._backend
    shareable = then == "share"
    buf = GrowableBuffer(max_size=4 * g, device=device, shareable=shareable)
    buf.resize(4 * g)
    fill(buf, 5)
    snap = Snapshot.of(buf)
    for op, nth in faults:
        backend.inject_fault(op, nth=nth, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        buf.resize(g)
    backend.clear_faults()
    st = buf._state
    assert st.unusable is None and st.released, st.released
    assert unchanged(buf, snap)
    if then == "move":
        buf.resize(6 * g, allow_move=True)
        assert not st.released and bytes(buf.read(snap.size)) == snap.data
    elif then == "sleep":
        buf.sleep()
        assert not st.released
        buf.wake()
        assert bytes(buf.read()) == snap.data
    elif then == "shrink":
        buf.resize(g)
        assert not st.released and bytes(buf.read()) == snap.data[:g]
    elif then == "share":
        handle = buf.share()
        assert not st.released
        handle.close()
    buf.close()
    assert device.counters().live == live


# ---------------------------------------------------------------- 1,000 resizes
def test_thousand_random_resizes() -> None:
    """Pointer fixed, bytes kept, and driver calls = pages added or removed, for every step."""
    g = 64 << 10
    pages = 48
    max_size = pages * g
    dev = vmmpool.Device.emulated(capacity=2 * max_size, granularity=g)
    rng = random.Random(20240607)
    model = np.zeros(max_size, dtype=np.uint8)
    with GrowableBuffer(max_size=max_size, device=dev) as buf:
        ptr = buf.ptr
        size = 0
        for step in range(1000):
            r = rng.random()
            if r < 0.4:
                n = rng.randrange(0, max_size + 1)
            elif r < 0.7:
                n = min(max(size + rng.randrange(-3 * g, 3 * g + 1), 0), max_size)
            elif r < 0.9:
                n = min(max(size + rng.randrange(-100, 101), 0), max_size)
            else:
                n = rng.choice([0, max_size])
            before = dev.counters()
            assert buf.resize(n) == ptr
            delta = dev.counters() - before
            added = -(-n // g) - -(-size // g)
            if added > 0:
                assert delta == {"create": added, "map": added, "set_access": 1}, step
            elif added < 0:
                assert delta == {"synchronize": 1, "release": -added, "unmap": 1}, step
            else:
                assert delta == {}, step
            assert (buf.size, buf.capacity) == (n, -(-n // g) * g)
            if n:
                mem = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
                keep = min(size, n)
                assert np.array_equal(mem[:keep], model[:keep]), f"step {step}: bytes lost"
                if n > size:
                    value = step % 255 + 1
                    mem[size:n] = value
                    model[size:n] = value
                del mem
            size = n
        assert buf.ptr == ptr
    assert dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize("faults", [(("unmap", 1),), (("unmap", 1), ("retain", 1))])
def test_a_shared_page_taken_back_after_a_failed_shrink_stays_shared(
    device: vmmpool.Device, faults: tuple[tuple[str, int], ...]
) -> None:
    """A failed shrink takes the handles it released back as new objects (at once, or at the
    next move): pages a share exported stay exported, so a sleep is refused while the
    receiver maps them (it was not: the share was tracked by the old objects)."""
    g = device.granularity
    live = device.counters().live
    buf = GrowableBuffer(max_size=4 * g, device=device, shareable=True)
    buf.resize(4 * g)
    handle = buf.share()
    mapped = handle.open(device)
    for op, nth in faults:
        device._backend.inject_fault(op, nth=nth, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        buf.resize(0)
    device._backend.clear_faults()
    buf.resize(6 * g, allow_move=True)  # takes back what stayed released
    assert not buf._state.released
    with pytest.raises(ValueError, match="shared"):
        buf.sleep()
    mapped.close()
    handle.close()
    buf.close()
    gc.collect()
    assert device.counters().live == live

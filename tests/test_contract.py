"""The driver's VMM contract (VMM_DESIGN.md, rules 1-7), at the backend level.

Each violation must be rejected with the error name the CUDA driver gives, so
code that passes on the host emulator does not break on a GPU. These tests
run on every backend: on a GPU they check the emulator's fidelity too.

Where the Driver API documentation allows more than one answer (a non-zero
map offset, the error for an absent device, hinted reservations), a test
accepts each documented answer, checks what follows from it, and cleans up
either way: whatever the driver created is tracked and released.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmmpool import Access, Device, DriverError, OutOfMemoryError
from vmmpool._backends.base import Backend

INVALID = "CUDA_ERROR_INVALID_VALUE"


class Tracker:
    """Creates backend resources and releases whatever a test leaves behind."""

    def __init__(self, dev: Device) -> None:
        self.b: Backend = dev._backend
        self.g = dev.granularity
        self.dev = dev
        self.res: list[tuple[int, int]] = []
        self.handles: list[int] = []
        self.maps: list[tuple[int, int]] = []

    def reserve(self, pages: int, hint: int = 0) -> int:
        addr = self.b.reserve(pages * self.g, 0, hint)
        self.res.append((addr, pages * self.g))
        return addr

    def create(self, pages: int = 1) -> int:
        h = self.b.create(pages * self.g)
        self.handles.append(h)
        return h

    def map(self, addr: int, h: int, pages: int = 1) -> None:
        self.b.map(addr, pages * self.g, h)
        self.maps.append((addr, pages * self.g))

    def cleanup(self) -> None:
        for addr, size in self.maps:
            self.b.unmap(addr, size)
        for h in self.handles:
            self.b.release(h)
        for addr, size in self.res:
            self.b.free_address(addr, size)


@pytest.fixture
def t(device: Device) -> Iterator[Tracker]:
    tr = Tracker(device)
    yield tr
    tr.cleanup()


def rejects(name: str = INVALID) -> pytest.RaisesExc[DriverError]:
    return pytest.raises(DriverError, match=name)


def try_reserve(t: Tracker, pages: int, hint: int) -> int | None:
    """A hinted reservation, or ``None`` where the driver refuses hints outright (DALI #3128)."""
    before = t.dev.counters().reservations
    try:
        return t.reserve(pages, hint=hint)
    except DriverError:
        assert t.dev.counters().reservations == before  # a refusal leaves nothing behind
        return None


# Rule 1: sizes and offsets are multiples of the minimum granularity.
def test_rule1_create_size_must_be_granular(t: Tracker) -> None:
    with rejects():
        t.b.create(t.g + 4096)
    with rejects():
        t.b.create(t.g // 2)


def test_rule1_map_address_and_size_must_be_granular(t: Tracker) -> None:
    addr = t.reserve(2)
    h = t.create()
    with rejects():
        t.b.map(addr + 4096, t.g, h)
    with rejects():
        t.b.map(addr, t.g - 4096, h)


def test_rule1_reservation_alignment_is_power_of_two(t: Tracker) -> None:
    with rejects():
        t.b.reserve(t.g, 3 * t.g)


def test_rule1_granularity_is_queried_not_assumed(device: Device) -> None:
    g = device.granularity
    assert g > 0 and g & (g - 1) == 0
    assert device.recommended_granularity % g == 0


# Rule 2: a physical allocation is mapped whole, at offset 0.
def test_rule2_map_offset_must_be_zero(t: Tracker) -> None:
    # The docs say both "a multiple of the granularity" and "currently must be
    # zero": the driver may refuse the map or accept it. Either way nothing
    # may be left behind, and an accepted map must show the allocation's
    # second page.
    addr = t.reserve(2)
    h = t.create(2)
    try:
        t.b.map(addr, t.g, h, t.g)
    except DriverError as err:
        assert err.name == INVALID
        return
    t.maps.append((addr, t.g))  # accepted: tracked so that cleanup unmaps it
    t.b.set_access(addr, t.g, Access.READWRITE, [t.dev.ordinal])
    t.dev.write(addr, b"second page")
    other = t.reserve(2)
    t.map(other, h, pages=2)
    t.b.set_access(other, 2 * t.g, Access.READWRITE, [t.dev.ordinal])
    assert t.dev.read(other + t.g, 11) == b"second page"


def test_rule2_partial_map_rejected_by_emulator(host: Device) -> None:
    # The driver's docs contradict themselves on partial maps; the emulator is
    # stricter (a whole allocation or nothing), which is always safe on a GPU.
    t = Tracker(host)
    try:
        addr = t.reserve(2)
        h = t.create(2)
        with rejects():
            t.b.map(addr, t.g, h)
    finally:
        t.cleanup()


# Rule 3: map only into unmapped parts of a reservation; mapping grants no access.
def test_rule3_map_over_a_mapping_rejected(t: Tracker) -> None:
    addr = t.reserve(2)
    h1, h2 = t.create(), t.create(2)
    t.map(addr + t.g, h1)
    with rejects():
        t.b.map(addr + t.g, t.g, h1)
    with rejects():
        t.b.map(addr, 2 * t.g, h2)  # overlaps the second page


def test_rule3_map_outside_a_reservation_rejected(t: Tracker) -> None:
    addr = t.reserve(1)
    h = t.create(2)
    with rejects():
        t.b.map(addr, 2 * t.g, h)  # runs past the end


def test_rule3_new_mapping_has_no_access(t: Tracker) -> None:
    addr = t.reserve(1)
    h = t.create()
    t.map(addr, h)
    assert t.b.get_access(addr, t.dev.ordinal) is Access.NONE
    t.b.set_access(addr, t.g, Access.READWRITE, [t.dev.ordinal])
    assert t.b.get_access(addr, t.dev.ordinal) is Access.READWRITE


def test_rule3_set_access_covers_whole_adjacent_mappings_only(t: Tracker) -> None:
    addr = t.reserve(3)
    for i in range(2):
        t.map(addr + i * t.g, t.create())
    t.b.set_access(addr, 2 * t.g, Access.READWRITE, [t.dev.ordinal])  # two mappings: fine
    with rejects():
        t.b.set_access(addr, 3 * t.g, Access.READWRITE, [t.dev.ordinal])  # unmapped tail


def test_rule3_access_for_an_absent_device_rejected(t: Tracker) -> None:
    addr = t.reserve(1)
    t.map(addr, t.create())
    # The docs allow either name for a location id that is no device.
    with pytest.raises(DriverError) as err:
        t.b.set_access(addr, t.g, Access.READWRITE, [9999])
    assert err.value.name in ("CUDA_ERROR_INVALID_DEVICE", INVALID)


# Rule 4: unmap whole mappings (several adjacent ones at once), never a part.
def test_rule4_unmap_subrange_of_one_mapping_rejected(t: Tracker) -> None:
    addr = t.reserve(2)
    t.map(addr, t.create(2), pages=2)
    with rejects():
        t.b.unmap(addr, t.g)
    with rejects():
        t.b.unmap(addr + t.g, t.g)


def test_rule4_unmap_including_never_mapped_part_rejected(t: Tracker) -> None:
    addr = t.reserve(3)
    t.map(addr, t.create())
    with rejects():
        t.b.unmap(addr, 2 * t.g)  # pytorch #188008
    with rejects():
        t.b.unmap(addr + 2 * t.g, t.g)  # never mapped at all


def test_rule4_unmap_several_adjacent_whole_mappings(t: Tracker) -> None:
    addr = t.reserve(3)
    for i in range(3):
        t.b.map(addr + i * t.g, t.g, t.create())
    before = t.dev.counters()
    t.b.unmap(addr, 3 * t.g)
    after = t.dev.counters()
    assert before.mappings - after.mappings == 3


def test_rule4_empty_range_rejected_by_unmap_and_set_access(t: Tracker) -> None:
    # cuMemUnmap: "The range must be the entire contiguous address range that was mapped
    # to"; cuMemSetAccess: "The range must be a fully mapped address range". An empty range
    # is neither: the emulator raised CUDA_ERROR_OPERATING_SYSTEM (its mmap of 0 bytes
    # failed) for the unmap, and silently accepted the set_access.
    addr = t.reserve(2)
    t.map(addr, t.create())
    before = t.dev.counters()
    for at in (addr, addr + t.g):  # a mapping's start, and never-mapped space
        with rejects():
            t.b.unmap(at, 0)
        with rejects():
            t.b.set_access(at, 0, Access.READWRITE, [t.dev.ordinal])
    assert t.dev.counters().live == before.live


# Rule 5: free exactly one reservation.
def test_rule5_free_must_name_exactly_one_reservation(t: Tracker) -> None:
    a = t.reserve(2)
    with rejects():
        t.b.free_address(a, t.g)  # part of it
    with rejects():
        t.b.free_address(a + t.g, t.g)  # not its start
    b = try_reserve(t, 1, hint=a + 2 * t.g)
    if b == a + 2 * t.g:
        with rejects():
            t.b.free_address(a, 3 * t.g)  # two adjacent reservations in one call
    with rejects():
        t.b.free_address(a, 3 * t.g)


# Rule 6: the address hint is only a hint.
def test_rule6_hint_on_taken_range_returns_another_address(t: Tracker) -> None:
    a = t.reserve(1)
    b = try_reserve(t, 1, hint=a)
    if b is None:
        return  # the driver refuses hinted reservations outright: also documented
    assert b != a
    assert b % t.g == 0


def test_rule6_free_aligned_hint_is_honoured_by_emulator(host: Device) -> None:
    # The driver "treats it as a hint about where to place the reservation"; the emulator
    # asked the kernel for size + alignment bytes at the hint, so a hint naming free space
    # right below another mapping (an adjacent reservation) was never honoured, and the
    # adjacent-reservation case of rule 5 never ran on the emulator.
    t = Tracker(host)
    try:
        base = t.b.reserve(3 * t.g, 0, 0)
        t.b.free_address(base, 3 * t.g)  # [base, base + 3g) is free now
        high = t.reserve(1, hint=base + 2 * t.g)
        low = t.reserve(2, hint=base)  # directly below `high`: adjacent
        assert (low, high) == (base, base + 2 * t.g)
        with rejects():
            t.b.free_address(low, 3 * t.g)  # two adjacent reservations in one call (rule 5)
        h1, h2 = t.create(), t.create()
        t.map(low + t.g, h1)
        t.map(high, h2)
        t.b.set_access(low + t.g, t.g, Access.READWRITE, [0])
        t.b.set_access(high, t.g, Access.READWRITE, [0])
        t.dev.write(high, b"adjacent")
        assert t.dev.read(high, 8) == b"adjacent"
    finally:
        t.cleanup()
    assert host.counters().live == (0, 0, 0)


# Rule 7: memory lives until every reference is released and every mapping gone.
def test_rule7_release_after_map_keeps_memory(t: Tracker) -> None:
    addr = t.reserve(1)
    h = t.b.create(t.g)
    t.b.map(addr, t.g, h)
    t.b.set_access(addr, t.g, Access.READWRITE, [t.dev.ordinal])
    t.b.release(h)  # the normal pattern: release right after mapping
    t.dev.write(addr, b"alive")
    assert t.dev.read(addr, 5) == b"alive"
    live = t.dev.counters().allocations
    t.b.unmap(addr, t.g)
    assert t.dev.counters().allocations == live - 1  # freed with its last mapping


def test_rule7_retain_adds_a_reference(t: Tracker) -> None:
    addr = t.reserve(1)
    h = t.b.create(t.g)
    t.b.map(addr, t.g, h)
    h2 = t.b.retain(addr)
    t.b.release(h)
    t.b.unmap(addr, t.g)
    assert t.dev.counters().allocations >= 1  # the retained reference holds it
    t.handles.append(h2)


def test_rule7_double_release_rejected(host: Device) -> None:
    # On a GPU a released handle value may be reused at once, so this is
    # checked on the emulator only, where handle values are never reused.
    b = host._backend
    h = b.create(host.granularity)
    b.release(h)
    with rejects():
        b.release(h)
    with rejects():
        b.map(b.reserve(host.granularity), host.granularity, h)


def test_out_of_memory_at_capacity(host: Device) -> None:
    b = host._backend
    handles = [b.create(host.granularity) for _ in range(host.total_memory // host.granularity)]
    with pytest.raises(OutOfMemoryError, match="out of memory: requested 2097152"):
        b.create(host.granularity)
    for h in handles:
        b.release(h)


def test_injected_fault_fires_on_the_nth_call_only(host: Device) -> None:
    b = host._backend
    b.inject_fault("create", nth=2, name=INVALID)
    h1 = b.create(host.granularity)
    with rejects():
        b.create(host.granularity)
    h3 = b.create(host.granularity)
    b.release(h1)
    b.release(h3)
    with pytest.raises(ValueError, match="op must be one of"):
        b.inject_fault("nope")


def test_copies_to_unmapped_or_inaccessible_memory_raise_instead_of_faulting(host: Device) -> None:
    # Emulator only: on a GPU a copy through a bad address can leave a sticky
    # error that poisons the context for every later test.
    t = Tracker(host)
    try:
        _bad_copies(t)
    finally:
        t.cleanup()


def _bad_copies(t: Tracker) -> None:
    addr = t.reserve(2)
    with rejects():
        t.dev.write(addr, b"x")  # nothing mapped
    t.map(addr, t.create())
    with rejects():
        t.dev.read(addr, 1)  # mapped, no access yet
    t.b.set_access(addr, t.g, Access.READ, [t.dev.ordinal])
    assert t.dev.read(addr, 1) == b"\0"
    with rejects():
        t.dev.write(addr, b"x")  # read-only
    with rejects():
        t.dev.read(addr + t.g - 1, 2)  # runs into the unmapped second page

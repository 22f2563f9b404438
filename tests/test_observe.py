"""Statistics in PyTorch's terms, memory_summary, history, and snapshots in PyTorch's format."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

import vmmpool


def pool_of(device: vmmpool.Device, pages: int) -> vmmpool.PagePool:
    return vmmpool.PagePool(device, limit=pages * device.granularity)


def test_stats_speak_pytorch(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        a = pool.malloc(P + 1)  # P + 512 bytes over two pages
        b = pool.malloc(100)  # 512 bytes on a page of the small-block heap
        s = pool.stats()
        assert s.requested_bytes == P + 101  # what was asked for
        assert s.allocated_bytes == P + 1024  # with rounding (512 bytes)
        assert s.reserved_bytes == s.total_pages * P == 3 * P  # physical pages held
        assert s.address_space_bytes >= s.reserved_bytes  # addresses, not memory
        assert s.peak_reserved_bytes == 3 * P and s.peak_requested_bytes == P + 101
        text = repr(s)
        for words in ("allocated", "requested", "reserved", "cached", "limit 16.0 MiB", "peaks"):
            assert words in text
        assert len(text) < 600 and "\n" not in text
        a.free()
        b.free()
        s = pool.stats()
        assert s.requested_bytes == 0 and s.reserved_bytes == 3 * P and s.cached_bytes == 3 * P


def test_memory_summary_is_a_table_of_the_stats(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        a = pool.malloc(3 * P)
        text = pool.memory_summary()
        lines = text.splitlines()
        assert len({len(line) for line in lines}) == 1, "every row of the table has the same width"
        row = next(line for line in lines if "Reserved memory" in line)
        assert "6.00 MiB" in row
        assert any("mallocs" in line and " 1 " in line for line in lines)
        a.free()


def test_history_and_dump_snapshot_round_trip(device: vmmpool.Device, tmp_path: Path) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        early = pool.malloc(P)  # before recording: only in segments
        pool.record_history(True, stacks=True)
        a = pool.malloc(2 * P + 5, stream=3)
        b = pool.malloc(1000)
        b.free()
        path = tmp_path / "pool.pickle"
        pool.dump_snapshot(path)
        with open(path, "rb") as f:
            snap = pickle.load(f)
        assert set(snap) >= {"segments", "device_traces"}
        (trace,) = snap["device_traces"][-1:]
        actions = [(e["action"], e["addr"], e["size"], e["stream"]) for e in trace]
        assert actions == [
            ("segment_map", a.ptr, 3 * P, 3),  # stream 3's first pages
            ("alloc", a.ptr, 2 * P + 5, 3),
            ("segment_map", b.ptr, P, 0),  # a page for the small-block heap
            ("alloc", b.ptr, 1000, 0),
            ("free_requested", b.ptr, 1000, 0),
            ("free_completed", b.ptr, 1000, 0),
        ]
        assert all(e["frames"] and "filename" in e["frames"][0] for e in trace)
        assert all(isinstance(e["time_us"], int) for e in trace)
        # segments: mapped runs of the address space; blocks tile each segment exactly
        active = {}
        for seg in snap["segments"]:
            assert sum(blk["size"] for blk in seg["blocks"]) == seg["total_size"]
            at = seg["address"]
            for blk in seg["blocks"]:
                assert blk["address"] == at
                at += blk["size"]
                if blk["state"] == "active_allocated":
                    active[blk["address"]] = (blk["size"], blk["requested_size"])
            assert seg["allocated_size"] == sum(
                blk["size"] for blk in seg["blocks"] if blk["state"] == "active_allocated"
            )
        assert active == {early.ptr: (P, P), a.ptr: (2 * P + 512, 2 * P + 5)}
        s = pool.stats()
        assert sum(seg["total_size"] for seg in snap["segments"]) == s.mapped_pages * P
        # plain data only: loads with an unpickler that refuses every class
        class Refuse(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> object:
                raise pickle.UnpicklingError(f"refused {module}.{name}")

        with open(path, "rb") as f:
            assert Refuse(f).load() == snap
        pool.record_history(False)
        assert pool.memory_snapshot()["device_traces"][-1] == []
        a.free()
        early.free()


def test_history_is_bounded_and_validated(device: vmmpool.Device) -> None:
    with pool_of(device, 4) as pool:
        pool.record_history(True, max_entries=3)
        for _ in range(5):
            pool.malloc(100).free()
        trace = pool.memory_snapshot()["device_traces"][-1]
        assert [e["action"] for e in trace] == ["alloc", "free_requested", "free_completed"]
        with pytest.raises(ValueError, match=r"enabled must be 'all' .* or None .*, got 'yes'"):
            pool.record_history("yes")
        with pytest.raises(ValueError, match="no per-block stacks"):
            pool.record_history("state")
        with pytest.raises(TypeError, match="enabled must be 'all', None or a bool, got int"):
            pool.record_history(1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="context must be 'all', 'alloc' or None, got 'x'"):
            pool.record_history("all", context="x")
        with pytest.raises(ValueError, match="stacks must be 'python', 'all' or a bool"):
            pool.record_history("all", stacks="cpp")
        with pytest.raises(ValueError, match="max_entries"):
            pool.record_history(True, max_entries=0)


def test_record_history_as_pytorch_spells_it(device: vmmpool.Device) -> None:
    with pool_of(device, 4) as pool:
        pool.record_history(enabled="all", context=None, max_entries=10)
        pool.malloc(100).free()
        trace = pool.memory_snapshot()["device_traces"][-1]
        assert [e["action"] for e in trace] == ["segment_map", "alloc", "free_requested", "free_completed"]
        assert all(e["frames"] == [] for e in trace)  # context=None: no stack walk
        pool.record_history("all", context="alloc", stacks="python")
        pool.malloc(100).free()
        trace = pool.memory_snapshot()["device_traces"][-1]
        # the first four kept (as PyTorch keeps them), then stacks on the alloc only
        assert [bool(e["frames"]) for e in trace] == [False] * 4 + [True, False, False]
        pool.record_history(enabled=None)
        assert pool.memory_snapshot()["device_traces"][-1] == []


def test_memory_stats_uses_pytorchs_keys_and_numbers(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        a = pool.malloc(P + 1)  # P + 512 bytes with rounding
        b = pool.malloc(3 * P)
        b.free()
        m = pool.memory_stats()
        assert m["allocated_bytes.all.current"] == P + 512  # PyTorch's memory_allocated(): rounded
        assert m["requested_bytes.all.current"] == P + 1
        assert m["allocated_bytes.all.peak"] == 4 * P + 512
        assert m["requested_bytes.all.peak"] == 4 * P + 1
        assert m["reserved_bytes.all.current"] == pool.stats().reserved_bytes == m["segment.all.current"] * P
        assert m["reserved_bytes.all.peak"] >= m["reserved_bytes.all.current"]
        counts = (m["allocation.all.current"], m["allocation.all.allocated"], m["allocation.all.freed"])
        assert counts == (1, 2, 1)
        assert m["num_ooms"] == 0 and m["num_alloc_retries"] == 0 and m["num_sync_all_streams"] == 0
        assert all(isinstance(v, int) for v in m.values())
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(64 * P)
        assert pool.memory_stats()["num_ooms"] == 1
        # reset_peak_memory_stats: peaks start again from the current values
        pool.reset_peak_memory_stats()
        s = pool.stats()
        assert (s.peak_allocated_bytes, s.peak_requested_bytes) == (P + 512, P + 1)
        assert s.peak_reserved_bytes == s.reserved_bytes
        c = pool.malloc(P)
        assert pool.stats().peak_allocated_bytes == 2 * P + 512
        c.free()
        a.free()
        # empty_cache is trim: every page without live data goes back to the driver
        held = pool.stats().reserved_bytes
        assert pool.empty_cache() == held
        assert pool.memory_stats()["reserved_bytes.all.current"] == 0
        assert pool.memory_stats()["segment.all.freed"] == held // P


def test_reset_peaks_keeps_the_growth_budget(device: vmmpool.Device) -> None:
    """Resetting the reported peaks must not change what the pool does next."""
    P = device.granularity

    def run(reset: bool) -> tuple[int, int]:
        with pool_of(device, 24) as pool:
            big = pool.malloc(12 * P)
            big.free()
            if reset:
                pool.reset_peak_memory_stats()
            xs = [pool.malloc(3 * P, stream=1) for _ in range(5)]
            s = pool.stats()
            for x in xs:
                x.free()
            return s.n_page_creations, s.n_remaps

    assert run(True) == run(False)


def test_memory_summary_abbreviated(device: vmmpool.Device) -> None:
    with pool_of(device, 4) as pool:
        a = pool.malloc(1000)
        full = pool.memory_summary()
        short = pool.memory_summary(abbreviated=True)
        assert "mallocs" in full and "mallocs" not in short
        for row in ("Allocated memory", "Requested memory", "Reserved memory"):
            assert row in short
        assert len(short.splitlines()) < len(full.splitlines())
        assert len({len(line) for line in short.splitlines()}) == 1
        a.free()


def test_dump_snapshot_records_page_mappings_as_segment_events(
    device: vmmpool.Device, tmp_path: Path
) -> None:
    P = device.granularity
    with pool_of(device, 6) as pool:
        pool.record_history("all", context=None)
        keep = pool.malloc(P)  # a page mapped for it
        x = pool.malloc(3 * P)  # three more
        x.free()  # cached: still mapped
        big = pool.malloc(4 * P, stream=1)  # one new page and x's three cached ones, remapped
        assert pool.stats().n_remaps == 1
        big.free()
        pool.empty_cache()  # unmaps every cached page
        path = tmp_path / "segments.pickle"
        pool.dump_snapshot(path)
        with open(path, "rb") as f:
            trace = pickle.load(f)["device_traces"][-1]
        seg = [(e["action"], e["addr"], e["size"]) for e in trace if e["action"].startswith("segment_")]
        mapped = sum(size for a, _, size in seg if a == "segment_map")
        unmapped = sum(size for a, _, size in seg if a == "segment_unmap")
        assert [a for a, _, _ in seg][:2] == ["segment_map", "segment_map"]
        assert "segment_unmap" in [a for a, _, _ in seg[2:]]
        assert mapped - unmapped == pool.stats().mapped_pages * P == P  # only keep's page is left
        assert all(size % P == 0 and addr % P == 0 for _, addr, size in seg)
        # the block the remap served lies inside pages the trace mapped before it
        i_big = next(i for i, e in enumerate(trace) if e["action"] == "alloc" and e["addr"] == big.ptr)
        assert trace[i_big - 1]["action"] == "segment_map"
        m = trace[i_big - 1]
        assert m["addr"] <= big.ptr and big.ptr + 4 * P <= m["addr"] + m["size"]
        keep.free()


def test_snapshot_after_close_matches_its_history(tmp_path: Path) -> None:
    # dump_snapshot after a `with PagePool(...)` block: the segments are empty,
    # so the history must free the live blocks and unmap what it mapped, or the
    # replay's recorded reserved bytes start below zero.
    from vmmpool import replay as R

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    with vmmpool.PagePool(dev) as pool:
        pool.record_history(context=None)
        pool.malloc(100)
        pool.malloc(3 * P + 5)
        pool.malloc(P, 3).free()
    path = tmp_path / "closed.pickle"
    pool.dump_snapshot(path)
    snap = pickle.loads(path.read_bytes())
    assert snap["segments"] == []
    actions = [e["action"] for e in snap["device_traces"][0]]
    assert actions.count("alloc") == 3 and actions.count("free_completed") == 3
    tr = R.load(str(path))
    assert tr.recorded_reserved[0] == (0, 0) and tr.recorded_reserved[-1][1] == 0, tr.recorded_reserved
    assert min(r for _, r in tr.recorded_reserved) >= 0


def test_memory_snapshot_while_other_threads_allocate(host: vmmpool.Device) -> None:
    """The history is copied under the pool's lock: building the trace raced other threads'
    malloc/free (``RuntimeError: deque mutated during iteration``). A long history makes the
    trace take several thread switch intervals, so the old code failed nearly every time."""
    import threading

    with vmmpool.PagePool(host) as pool:
        pool.record_history(context=None)
        for _ in range(25_000):
            pool.malloc(100).free()
        stop = threading.Event()

        def churn() -> None:
            while not stop.is_set():
                pool.malloc(100).free()

        t = threading.Thread(target=churn)
        t.start()
        try:
            for _ in range(3):
                snap = pool.memory_snapshot()
                assert len(snap["device_traces"][0]) >= 50_000
        finally:
            stop.set()
            t.join()


def test_memory_snapshot_takes_pages_and_history_in_one_hold_of_the_lock(
    host: vmmpool.Device,
) -> None:
    """Pages and history are read in one hold of the pool's lock: between two holds another
    thread's sleep() (say) could run, and the segments and the end of the trace disagree."""
    import threading

    class Counting:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.n = 0

        def acquire(self, blocking: bool = True) -> bool:
            got = self.lock.acquire(blocking)
            self.n += got
            return got

        def release(self) -> None:
            self.lock.release()

        def locked(self) -> bool:
            return self.lock.locked()

    with vmmpool.PagePool(host) as pool:
        pool.record_history(context=None)
        a = pool.malloc(3 * host.granularity)
        core = pool._core
        counting = Counting()
        orig, core.lock = core.lock, counting  # type: ignore[assignment]
        try:
            snap = pool.memory_snapshot()
        finally:
            core.lock = orig
        assert counting.n == 1, counting.n
        assert sum(s["total_size"] for s in snap["segments"]) == pool.stats().reserved_bytes
        a.free()


def test_close_of_a_sleeping_pool_does_not_unmap_twice(tmp_path: Path) -> None:
    """sleep() recorded the unmap of its pages; close() must not record it again (the
    replay's recorded reserved bytes started above zero, its peak a page too high)."""
    from vmmpool import replay as R

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    pool = vmmpool.PagePool(dev, limit=8 * P)
    pool.record_history(context=None)
    a = pool.malloc(P)
    b = pool.malloc(P)
    pool.sleep()
    pool.close()
    path = tmp_path / "closed_asleep.pickle"
    pool.dump_snapshot(path)
    trace = pickle.loads(path.read_bytes())["device_traces"][0]
    mapped = sum(e["size"] for e in trace if e["action"] == "segment_map")
    unmapped = sum(e["size"] for e in trace if e["action"] == "segment_unmap")
    assert mapped == unmapped == 2 * P, [(e["action"], e["size"]) for e in trace]
    tr = R.load(str(path))
    assert tr.recorded_reserved[0] == (0, 0), tr.recorded_reserved
    assert max(r for _, r in tr.recorded_reserved) == 2 * P
    del a, b


def test_dump_snapshot_refuses_a_file_descriptor(tmp_path: Path) -> None:
    """open() takes an int as a file descriptor: dump_snapshot(3) wrote into and closed a
    file the caller never meant to hand over."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    with vmmpool.PagePool(dev) as pool, open(tmp_path / "other", "wb") as other:
        with pytest.raises(TypeError, match=r"path must be a str, bytes or os\.PathLike, got int"):
            pool.dump_snapshot(other.fileno())  # type: ignore[arg-type]
        other.write(b"still open")
        pool.dump_snapshot(str(tmp_path / "s.pickle"))
        pool.dump_snapshot(tmp_path / "s.pickle")


def test_snapshots_do_not_share_frames_with_the_history() -> None:
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    with vmmpool.PagePool(dev) as pool:
        pool.record_history()
        a = pool.malloc(100)
        first = pool.memory_snapshot()["device_traces"][0]
        for e in first:
            e["frames"].clear()  # a caller filtering frames in place
        again = pool.memory_snapshot()["device_traces"][0]
        assert all(e["frames"] for e in again)
        keys = {"filename", "line", "name"}
        assert all(isinstance(f, dict) and set(f) == keys for f in again[-1]["frames"])
        a.free()


def _blocks_outside_segments(trace: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Walk a recorded trace as PyTorch's memory viewer does: (event index, action) of every
    event after which a live block lies outside the mapped segments, or a free or unmap
    does not match what is live or mapped."""
    mapped: set[int] = set()  # bytes' page starts, at the trace's page size below
    live: dict[int, int] = {}
    bad = []
    P = min(e["size"] for e in trace if e["action"].startswith("segment"))
    for i, e in enumerate(trace):
        act, addr, size = e["action"], e["addr"], e["size"]
        pages = set(range(addr - addr % P, addr + size, P))
        if act == "segment_map":
            mapped |= pages
        elif act == "segment_unmap":
            if not pages <= mapped:
                bad.append((i, act))
            mapped -= pages
        elif act == "alloc":
            live[addr] = size
        elif act == "free_requested" and live.pop(addr, None) != size:
            bad.append((i, act))
        if any(not set(range(a - a % P, a + s, P)) <= mapped for a, s in live.items()):
            bad.append((i, act))
    return bad


def test_sleep_and_wake_record_frees_and_allocs_around_their_unmaps_and_maps(tmp_path: Path) -> None:
    """sleep() recorded the unmap of pages that live blocks used: PyTorch's viewer, which
    never sees a block outside a segment, crashed on every event while the pool slept
    (and at a free while asleep). Now the sleep records the frees of the live blocks
    before its unmaps and wake() their allocs after its maps; a free while asleep records
    nothing, and neither does close() for what the sleep recorded."""
    from vmmpool import replay as R

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    pool = vmmpool.PagePool(dev, limit=8 * P)
    pool.record_history(context=None)
    a, b, c = pool.malloc(P // 2), pool.malloc(P), pool.malloc(3 * P // 2)
    pool.sleep()
    asleep = pool.memory_snapshot()
    assert asleep["segments"] == []  # as the trace says: nothing mapped, nothing live
    b.free()  # while asleep
    pool.wake()
    woke = pool.memory_snapshot()
    assert sorted(blk["address"] for s in woke["segments"] for blk in s["blocks"]
                  if blk["state"] == "active_allocated") == sorted([a.address, c.address])
    pool.sleep()
    pool.close()  # while asleep
    path = tmp_path / "slept.pickle"
    pool.dump_snapshot(path)
    trace = pickle.loads(path.read_bytes())["device_traces"][0]
    assert _blocks_outside_segments(trace) == []
    actions = [e["action"] for e in trace]
    assert actions.count("alloc") == 3 + 2 and actions.count("free_requested") == 3 + 2
    assert sum(e["size"] for e in trace if e["action"] == "segment_map") == sum(
        e["size"] for e in trace if e["action"] == "segment_unmap")
    tr = R.load(str(path))
    assert tr.recorded_reserved[-1][1] == 0
    del a, b, c


def test_adjacent_pages_of_two_streams_are_two_segments() -> None:
    # Two arenas' reservations may abut on a driver: their pages made one segment,
    # labelled with the smaller stream, where PyTorch never merges across streams.
    from vmmpool._observe import AllocationInfo, torch_snapshot
    from vmmpool._pool._stats import PageInfo

    P = 2 << 20
    base = 0x7F0000000000
    pages = [PageInfo(0, "in_use", base - P, 7, "large", (AllocationInfo(base - P, P, P, 7),), P),
             PageInfo(1, "in_use", base, 0, "large", (AllocationInfo(base, P, P, 0),), P),
             PageInfo(2, "in_use", base + P, 0, "large", (AllocationInfo(base + P, P, P, 0),), P)]
    segs = torch_snapshot(pages, P, None)["segments"]
    assert [(s["address"], s["total_size"], s["stream"]) for s in segs] == [
        (base - P, P, 7), (base, 2 * P, 0)]


def test_counters_after_close_add_up() -> None:
    # close() released every page and freed every live block without counting either:
    # memory_stats() said segment.all current 0, allocated 3, freed 0.
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    for sleep in (False, True):
        pool = vmmpool.PagePool(dev, limit=8 * P)
        a, b = pool.malloc(3 * P), pool.malloc(P // 2)
        if sleep:
            pool.sleep()
        pool.close()
        m = pool.memory_stats()
        for k in ("segment", "allocation"):
            assert m[f"{k}.all.current"] == 0
            assert m[f"{k}.all.allocated"] == m[f"{k}.all.freed"] > 0, (k, sleep, m)
        assert m["reserved_bytes.all.allocated"] == m["reserved_bytes.all.freed"]
        assert dev.counters().live == (0, 0, 0)
        del a, b


def test_record_history_takes_pytorchs_device_and_clear_history() -> None:
    # torch.cuda.memory._record_memory_history(..., device=None, clear_history=False): enabling
    # again keeps the events so far unless clear_history; these keywords raised TypeError.
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    with vmmpool.PagePool(dev) as pool:
        pool.record_history(context=None)
        a = pool.malloc(100)
        pool.record_history("all", context=None, device=None)  # again: kept
        b = pool.malloc(200)
        actions = [(e["action"], e["size"]) for e in pool.memory_snapshot()["device_traces"][0]]
        assert ("alloc", 100) in actions and ("alloc", 200) in actions
        pool.record_history("all", context=None, max_entries=1)  # kept, the newest only
        assert [e["size"] for e in pool.memory_snapshot()["device_traces"][0]] == [200]
        pool.record_history("all", clear_history=True, device=dev)
        assert pool.memory_snapshot()["device_traces"] == [[]]
        pool.record_history(None)
        assert pool.memory_snapshot()["device_traces"] == [[]]
        for bad in ("cuda:0", 0):
            with pytest.raises(ValueError, match="device must be None or this pool's device"):
                pool.record_history(device=bad)
        with pytest.raises(ValueError, match="device must be None or this pool's device"):
            pool.record_history(device=vmmpool.Device.emulated(capacity=64 << 20))
        with pytest.raises(TypeError, match="clear_history must be a bool"):
            pool.record_history(clear_history=1)  # type: ignore[arg-type]
        a.free(), b.free()


def test_a_failed_request_is_recorded_once_as_pytorchs_oom_entry(tmp_path: Path) -> None:
    from vmmpool import replay as R

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    with vmmpool.PagePool(dev, limit=2 * P) as pool:
        pool.record_history(context=None)
        a = pool.malloc(P)
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(2 * P)
        trace = pool.memory_snapshot()["device_traces"][0]
        ooms = [e for e in trace if e["action"] == "oom"]
        assert len(ooms) == 1 and ooms[0]["size"] == 2 * P and "addr" not in ooms[0]
        assert 0 < ooms[0]["device_free"] <= dev.total_memory
        assert pool.memory_stats()["num_ooms"] == 1
        pool.dump_snapshot(tmp_path / "oom.pickle")
        assert R.load(str(tmp_path / "oom.pickle")).n_failed == 1
        a.free()

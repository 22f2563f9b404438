"""Sleep / wake (issue 18): pages given back, addresses kept, bytes restored, all or nothing."""

from __future__ import annotations

import gc
from collections.abc import Callable

import numpy as np
import pytest

import vmmpool
from vmmpool import AsleepError, GrowableBuffer, PagePool
from vmmpool import _buffer as buffer_module
from vmmpool._backends.base import EVENT_OPERATIONS, STAGING_OPERATIONS
from vmmpool._pool import _sleep as sleep_module
from vmmpool._pool._core import Core
from vmmpool._staging import Staging

P = 2 << 20

#: What a sweep's factory returns: the object, its state, its close, its bytes check.
Made = tuple[object, Callable[[], object], Callable[[], None], Callable[[], bool]]


def _fill(dev: vmmpool.Device, ptr: int, n: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    dev.write(ptr, data)
    return data


def _freed(dev: vmmpool.Device, free0: int, nbytes: int) -> None:
    """Free device memory rose by `nbytes` (on a GPU, other processes may move it a little)."""
    if dev.is_host:
        assert dev.free_memory == free0 + nbytes
    else:
        assert dev.free_memory >= free0 + nbytes - (32 << 20)


def _pool_world(dev: vmmpool.Device) -> tuple[PagePool, list[tuple[vmmpool.Allocation, bytes]]]:
    """Live blocks on three streams (large, small, spanning pages) plus cached memory."""
    pool = PagePool(dev, limit=16 * P)
    live = []
    for i, (n, s) in enumerate([(3 * P + 512, 0), (1000, 0), (5000, 1), (2 * P, 2), (P // 2, 1)]):
        a = pool.malloc(n, stream=s)
        live.append((a, _fill(dev, a.ptr, n, i)))
    pool.malloc(3 * P, stream=2).free()  # cached pages
    return pool, live


def _bytes_ok(dev: vmmpool.Device, live: list[tuple[vmmpool.Allocation, bytes]]) -> bool:
    return all(bytes(dev.read(a.ptr, len(d))) == d for a, d in live)


# ------------------------------------------------------------------ the pool
def test_pool_sleep_gives_every_page_back_and_wake_restores_bytes_at_the_same_addresses(
    device: vmmpool.Device,
) -> None:
    # Counts relative to before the pool: on a GPU the device is the process's Device(0),
    # where another test's memory may still be live (PyTorch keeps what it cached).
    base = device.counters()
    pool, live = _pool_world(device)
    views = [a.view("uint8") for a, _d in live]
    ptrs = [(a.address, v.ptr) for (a, _d), v in zip(live, views, strict=True)]
    reservations = device.counters().reservations
    free0 = device.free_memory
    held = pool.stats().reserved_bytes
    pool.sleep()
    assert pool.asleep
    c = device.counters()
    assert (c.allocations, c.mappings, c.reservations) == (  # every page given back
        base.allocations, base.mappings, reservations
    )
    _freed(device, free0, held)
    s = pool.stats()
    assert s.asleep and s.total_pages == 0 and s.mapped_pages == 0 and s.reserved_bytes == 0
    assert s.live_allocations == len(live) and s.n_sleeps == 1
    touched = sum(-(-(a.ptr % P + len(d)) // P) for a, d in live)  # pages live data touches, at most
    assert 0 < s.backup_bytes <= touched * P and s.sleep_bytes == s.backup_bytes
    pool._check()
    pool.wake()
    assert not pool.asleep
    assert _bytes_ok(device, live)
    assert [(a.address, v.ptr) for (a, _d), v in zip(live, views, strict=True)] == ptrs
    s = pool.stats()
    assert s.n_wakes == 1 and s.wake_bytes == s.sleep_bytes and s.backup_bytes == 0
    assert s.reclaimable_pages == 0  # cached pages are not brought back
    pool._check()
    del views
    for a, _d in live:
        a.free()
    pool.malloc(6 * P).free()  # serves as before
    pool.close()
    assert device._backend.live_host_allocations() == 0
    assert device._backend.live_events() == 0


def test_views_share_the_restored_memory(host: vmmpool.Device) -> None:
    with PagePool(host, limit=8 * P) as pool:
        a = pool.malloc(P + 4096)
        arr = np.from_dlpack(a.view("int32"))
        arr[:] = np.arange(arr.size, dtype=np.int32)
        pool.sleep()
        pool.wake()
        assert np.array_equal(arr, np.arange(arr.size, dtype=np.int32))  # same pointer, same bytes
        arr[0] = -1
        assert bytes(host.read(a.ptr, 4)) == np.int32(-1).tobytes()
        del arr
        a.free()


def test_frees_while_asleep_need_no_memory_and_their_pages_do_not_come_back(device: vmmpool.Device) -> None:
    pool, live = _pool_world(device)
    pool.sleep()
    calls = device.counters()
    big, _ = live.pop(0)  # 3 pages of its own, one shared with the 1000-byte block
    big.free()
    gc.collect()
    assert device.counters() - calls == {}  # no driver call
    pool._check()
    pool.wake()
    pool._check()
    assert _bytes_ok(device, live)
    s = pool.stats()
    assert s.mapped_pages == s.pinned_pages  # only pages live blocks touch came back
    for a, _d in live:
        a.free()
    pool.close()


def test_what_needs_memory_while_asleep_says_so_and_changes_nothing(host: vmmpool.Device) -> None:
    pool, live = _pool_world(host)
    pool.sleep()
    before = host.counters()
    with pytest.raises(AsleepError, match=r"PagePool is asleep.*malloc\(100\).*wake\(\)"):
        pool.malloc(100)
    with pytest.raises(AsleepError, match="acquire_pages"):
        pool.acquire_pages(1)
    pool.defragment()
    assert pool.trim() == 0
    pool.sleep()  # sleeping again: a no-op
    pool.set_limit(4 * P)  # below the live pages: wake will not fit
    assert host.counters() - before == {"mem_info": 1}  # set_limit asks the total; nothing else
    with pytest.raises(vmmpool.OutOfMemoryError, match="wake needs"):
        pool.wake()
    assert pool.asleep
    pool._check()
    pool.set_limit(16 * P)
    pool.wake()
    assert _bytes_ok(host, live)
    pool.wake()  # awake: a no-op
    pool.close()


def test_backup_false_drops_contents_but_keeps_addresses(device: vmmpool.Device) -> None:
    base = device.counters().allocations  # relative: see the test above
    pool, live = _pool_world(device)
    ptrs = [a.ptr for a, _d in live]
    pool.sleep(backup=False)
    s = pool.stats()
    assert s.backup_bytes == 0 and s.sleep_bytes == 0 and device.counters().allocations == base
    pool.wake()
    assert [a.ptr for a, _d in live] == ptrs
    for a, d in live:  # usable memory again at the same addresses
        device.write(a.ptr, d[::-1])
        assert bytes(device.read(a.ptr, len(d))) == d[::-1]
    pool.close()


def test_sleep_waits_for_pending_stream_work_with_events_not_a_device_sync(host: vmmpool.Device) -> None:
    backend = host._backend
    pool = PagePool(host, limit=8 * P)
    a = pool.malloc(2 * P, stream=7)
    data = _fill(host, a.ptr, 2 * P, 3)
    backend.hold_stream(7)  # a kernel still runs on stream 7
    before = host.counters()
    pool.sleep()
    calls = host.counters() - before
    assert calls.get("event_wait", 0) >= 1 and "synchronize" not in calls
    assert pool.stats().n_syncs == 0
    backend.release_stream(7)
    pool.wake()
    assert bytes(host.read(a.ptr, 2 * P)) == data
    a.free()
    pool.close()
    assert backend.live_events() == 0


def test_sleep_covers_a_retired_stream_by_its_last_event_when_it_holds_only_cached_memory(
    host: vmmpool.Device,
) -> None:
    """A one-shot stream (used, freed, retired) keeps cached pages until they are needed:
    sleep waits on the event recorded at retirement, no device synchronize (issue 17 item 8).
    A retired stream that still holds a live block is covered by one synchronize, as before."""
    backend = host._backend
    pool = PagePool(host, limit=8 * P)
    keep = pool.malloc(P, stream=1)
    data = _fill(host, keep.ptr, P, 5)
    backend.hold_stream(7)
    pool.malloc(2 * P, stream=7).free()
    pool.retire_stream(7)  # its event stays pending: sleep must wait on it
    before = host.counters()
    pool.sleep()
    calls = host.counters() - before
    assert "synchronize" not in calls and calls.get("event_wait", 0) >= 1, calls
    pool.wake()
    assert bytes(host.read(keep.ptr, P)) == data
    live = pool.malloc(P, stream=8)
    pool.retire_stream(8)
    pool.sleep()
    assert pool.stats().n_syncs == 1
    pool.wake()
    live.free()
    keep.free()
    pool.close()
    assert backend.live_events() == 0


def test_sleep_refuses_while_pages_are_lent_to_buffers(host: vmmpool.Device) -> None:
    pool = PagePool(host, limit=8 * P)
    buf = GrowableBuffer(max_size=4 * P, pool=pool, initial_size=2 * P)
    with pytest.raises(ValueError, match="lent by acquire_pages"):
        pool.sleep()
    assert not pool.asleep and host.counters().allocations == 2
    data = _fill(host, buf.ptr, 2 * P, 1)
    buf.sleep()  # the buffer's pages go back to the pool ...
    pool.sleep()  # ... which gives them to the driver
    assert host.counters().allocations == 0
    with pytest.raises(AsleepError, match="acquire_pages"):
        buf.wake()  # the pool must wake first
    assert buf.asleep
    pool.wake()
    buf.wake()
    assert bytes(buf.read(2 * P)) == data
    buf.close()
    pool.close()


def test_a_buffer_of_capacity_0_sleeps_and_wakes_while_its_pool_sleeps(host: vmmpool.Device) -> None:
    """Waking it needs no page: acquire_pages(0) said "acquire_pages(0) needs memory"."""
    pool = PagePool(host, limit=8 * P)
    buf = GrowableBuffer(max_size=4 * P, pool=pool)
    buf.sleep()
    pool.sleep()
    assert pool.acquire_pages(0) == []
    buf.wake()
    assert not buf.asleep and buf.capacity == 0
    buf.sleep()
    with pytest.raises(AsleepError, match=r"acquire_pages\(1\)"):
        pool.acquire_pages(1)
    pool.wake()
    buf.wake()
    buf.resize(P)
    buf.close()
    pool.close()


def test_close_while_asleep_releases_everything(host: vmmpool.Device) -> None:
    base = host.counters().live
    pool, live = _pool_world(host)
    pool.sleep()
    pool.close()
    assert pool.closed and host.counters().live == base
    assert host._backend.live_host_allocations() == 0
    for a, _d in live:
        a.free()  # a no-op after close


def test_stats_and_snapshot_while_asleep(host: vmmpool.Device) -> None:
    pool, _live = _pool_world(host)
    n = pool.stats().pinned_pages
    pool.sleep()
    states = {i.state for i in pool.snapshot()}
    assert states == {"asleep"}
    assert len(pool.snapshot()) == n
    # PyTorch's format lists device memory: none while asleep (its history unmapped it all)
    assert pool.memory_snapshot()["segments"] == []
    assert pool.memory_stats()["reserved_bytes.all.current"] == 0
    pool.wake()
    assert "asleep" not in {i.state for i in pool.snapshot()}
    segs = pool.memory_snapshot()["segments"]
    assert sum(s["total_size"] for s in segs) == pool.stats().reserved_bytes > 0
    assert sum(s["requested_size"] for s in segs) == pool.stats().requested_bytes
    pool.close()


# ------------------------------------------------------------------ buffers
@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_buffer_sleep_and_wake(device: vmmpool.Device, pooled: bool) -> None:
    base = device.counters().allocations  # relative: see the pool test above
    pool = PagePool(device, limit=16 * P) if pooled else None
    buf = GrowableBuffer(max_size=8 * P, device=None if pooled else device, pool=pool, initial_size=3 * P + 5)
    data = _fill(device, buf.ptr, buf.size, 9)
    v = buf.view("uint8")
    ptr, size, cap = buf.ptr, buf.size, buf.capacity
    free0 = device.free_memory
    buf.sleep()
    assert buf.asleep and (buf.ptr, buf.size, buf.capacity) == (ptr, size, cap)
    if pool is None:
        _freed(device, free0, cap)
        assert device.counters().allocations == base
    else:
        pool.sleep()
        assert device.counters().allocations == base
    for call in (lambda: buf.resize(P), lambda: buf.reserve(6 * P), buf.shrink_to_fit,
                 lambda: buf.read(1), lambda: buf.write(b"x")):
        with pytest.raises(AsleepError, match="GrowableBuffer is asleep"):
            call()
    s = buf.sleep_stats()
    assert s.asleep and s.backup_bytes == cap and s.n_sleeps == 1
    if pool is not None:
        pool.wake()
    buf.wake()
    assert bytes(buf.read()) == data and v.ptr == ptr
    s = buf.sleep_stats()
    assert not s.asleep and s.n_wakes == 1 and s.wake_bytes == cap and s.backup_bytes == 0
    buf.resize(6 * P)  # grows in place as before
    assert buf.ptr == ptr
    del v
    buf.close()
    if pool is not None:
        pool.close()
    assert device._backend.live_host_allocations() == 0


def test_numpy_copy_of_a_sleeping_buffer_is_refused_not_a_crash() -> None:
    """``numpy.array(buf)`` and a cast copy the bytes inside ``__array__``: while asleep they
    read unmapped memory (the host emulator's process died of SIGSEGV). Run in a child, so a
    regression fails this test, not the whole run."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, pytest, vmmpool
        dev = vmmpool.Device.emulated(capacity=64 << 20)
        buf = vmmpool.GrowableBuffer(max_size=4 * dev.granularity, device=dev, initial_size=100)
        buf.write(b"abc")
        buf.sleep()
        for copy in (lambda: np.array(buf), lambda: np.asarray(buf, dtype=np.float32)):
            with pytest.raises(vmmpool.AsleepError, match="numpy.array"):
                copy()
        with pytest.raises(vmmpool.AsleepError, match="numpy.asarray"):
            np.asarray(buf)  # no copy: an array over the unmapped addresses (crashed at a touch)
        with pytest.raises(ValueError, match="a cast copies"):
            np.asarray(buf, dtype=np.float32, copy=False)
        buf.wake()
        assert bytes(np.array(buf)[:3]) == b"abc"
        buf.close()
        print("OK")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "OK", (out.returncode, out.stdout, out.stderr)


def _export_calls(v: vmmpool.ArrayView) -> list[Callable[[], object]]:
    interface = "__array_interface__" if v.device.is_host else "__cuda_array_interface__"
    return [v.__dlpack__, lambda: v.__dlpack__(max_version=(1, 0)), lambda: getattr(v, interface)]


@pytest.mark.parametrize("pooled", [False, True], ids=["buffer", "allocation"])
def test_asleep_memory_exports_nothing_new(device: vmmpool.Device, pooled: bool) -> None:
    # An export of a sleeping buffer or pool allocation succeeded, and the array made from it
    # crashed the process at its first touch (SIGSEGV on the host emulator; on a GPU an
    # illegal address). Now every export from the buffer or any view of it is refused while
    # asleep, views made before the sleep included; the views themselves are kept (and can
    # still be made), and export again after wake().
    pool = PagePool(device, limit=8 * P) if pooled else None
    owner: GrowableBuffer | vmmpool.Allocation
    if pool is not None:
        owner = pool.malloc(P + 4096)
        sleeper: GrowableBuffer | PagePool = pool
    else:
        owner = sleeper = GrowableBuffer(max_size=4 * P, device=device, initial_size=P + 4096)
    what = type(owner).__name__
    before = owner.view("int32")
    kept = np.from_dlpack(before) if device.is_host else None  # exported before the sleep
    if kept is not None:
        kept[:4] = [1, 2, 3, 4]
    sleeper.sleep()
    assert owner.asleep
    during = owner.view("int32")  # a view is only a pointer: made while asleep all the same
    calls = [*_export_calls(before), *_export_calls(during)]
    if isinstance(owner, GrowableBuffer):
        calls += [owner.__dlpack__, lambda: owner.__dlpack__(max_version=(1, 0))]
    for call in calls:
        with pytest.raises(AsleepError, match=rf"{what} is asleep .* call wake\(\) first") as info:
            call()
        assert isinstance(info.value, BufferError)
    if device.is_host:
        with pytest.raises(BufferError):
            np.from_dlpack(during)
    assert (before.exports, during.exports) == (1 if kept is not None else 0, 0)  # nothing leaked
    sleeper.wake()
    assert not owner.asleep
    for call in calls:
        call()  # exports again (capsules dropped unconsumed)
    if kept is not None:
        assert kept[:4].tolist() == [1, 2, 3, 4]  # the array made before the sleep, restored
        assert np.from_dlpack(during)[:4].tolist() == [1, 2, 3, 4]
    del kept, before, during, calls, call, info  # closures and the traceback hold views too
    gc.collect()
    if isinstance(owner, GrowableBuffer):
        owner.close()
    else:
        owner.free()
    if pool is not None:
        pool.close()


def test_an_export_racing_sleep_is_an_export_made_before_it(
    host: vmmpool.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exports take no lock (documented choice, see _sleep.py): one run by another thread while
    sleep() is under way, its pages already unmapped, is not held up and succeeds, as one made
    just before the sleep: same pointer, touched by nobody until wake(), which restores its bytes.
    Exports begun after sleep() returned are refused."""
    import threading

    pool = PagePool(host, limit=8 * P)
    a = pool.malloc(P + 4096)
    data = _fill(host, a.ptr, a.size, 7)
    views = [a.view("uint8")]
    got: list[object] = []
    release = sleep_module._release

    def racing(core: Core, runs: list[sleep_module.Run], keep: set[object]) -> None:
        if not got:  # every run is unmapped now: another thread exports
            assert host.counters().mappings == 0 and not a.asleep
            t = threading.Thread(target=lambda: got.append(np.from_dlpack(views[0])))
            t.start()
            t.join(60)  # a deadlock detector, not a timing: the export waits for nothing
            assert not t.is_alive() and len(got) == 1
        release(core, runs, keep)  # type: ignore[arg-type]

    monkeypatch.setattr(sleep_module, "_release", racing)
    pool.sleep()
    arr = got.pop()
    assert isinstance(arr, np.ndarray) and arr.ctypes.data == a.ptr
    assert a.asleep
    with pytest.raises(AsleepError):
        np.from_dlpack(views[0])  # begun after sleep() returned: refused
    pool.wake()
    assert arr.tobytes() == data  # the racing export's array, once awake, sees the restored bytes
    del arr
    views.clear()
    gc.collect()
    a.free()
    pool.close()


def test_buffer_backup_false_and_close_while_asleep(host: vmmpool.Device) -> None:
    base = host.counters().live
    buf = GrowableBuffer(max_size=8 * P, device=host, initial_size=2 * P)
    buf.sleep(backup=False)
    assert buf.sleep_stats().backup_bytes == 0
    buf.wake()
    buf.write(b"ok")
    assert bytes(buf.read(2)) == b"ok"
    buf.sleep()
    buf.close()
    assert host.counters().live == base and host._backend.live_host_allocations() == 0


def test_staging_copies_many_pieces_in_order(host: vmmpool.Device) -> None:
    """Runs longer than a staging half, at scattered backup offsets, both ways."""
    with GrowableBuffer(max_size=8 * P, device=host, initial_size=6 * P) as buf:
        data = _fill(host, buf.ptr, 6 * P, 4)
        st = Staging(host._backend, chunk=256 << 10)  # halves of 256 KiB: many pieces
        runs = [(buf.ptr + 4 * P, 2 * P, 0), (buf.ptr, 3 * P, 2 * P)]
        out = np.zeros(6 * P, np.uint8)
        st.save(runs, out, 0)
        assert out[: 2 * P].tobytes() == data[4 * P:] and out[2 * P: 5 * P].tobytes() == data[: 3 * P]
        buf.write(bytes(6 * P))
        st.load(runs, out, 0)
        assert bytes(buf.read(3 * P)) == data[: 3 * P] and bytes(buf.read(2 * P, 4 * P)) == data[4 * P:]
        assert st.nbytes == 2 * (256 << 10)
        st.close()
        assert host._backend.live_host_allocations() == 0 and host._backend.live_events() == 0


@pytest.mark.parametrize("failing", ["event_record", "copy_htod_async", "event_wait"])
def test_a_failed_wake_waits_for_its_queued_copies_before_unmapping(
    host: vmmpool.Device, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Rule 8 on the failure path: a copy queued before the failure may still write the
    pages when wake's undo unmaps and releases them (on a GPU: an illegal address). The
    staging synchronizes the stream before the error leaves it (it used to destroy the
    events and return at once)."""
    b = host._backend
    calls: list[str] = []
    for name in ("copy_htod_async", "synchronize", "unmap", "event_wait"):
        real = getattr(b, name)

        def spy(*args: object, _real: Callable[..., None] = real, _name: str = name) -> None:
            calls.append(_name)
            _real(*args)

        monkeypatch.setattr(b, name, spy)
    pool = PagePool(host, limit=16 * P)
    a = pool.malloc(4 * P)
    data = _fill(host, a.ptr, 4 * P, 8)
    pool.sleep()
    assert pool._core.staging is not None
    pool._core.staging.close()
    pool._core.staging = Staging(b, chunk=P // 2)  # many pieces: copies in flight before the failure
    calls.clear()
    b.inject_fault(failing, nth=3, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.wake()
    b.clear_faults()
    last_copy = max(i for i, c in enumerate(calls) if c == "copy_htod_async")
    first_unmap = calls.index("unmap", last_copy)
    assert "synchronize" in calls[last_copy:first_unmap], calls
    assert pool.asleep
    pool.wake()
    assert bytes(host.read(a.ptr, 4 * P)) == data
    a.free()
    pool.close()
    assert b.live_events() == 0 and b.live_host_allocations() == 0


def test_host_emulator_checks_staging_copies(host: vmmpool.Device) -> None:
    b = host._backend
    with GrowableBuffer(max_size=2 * P, device=host, initial_size=P) as buf:
        h = b.host_alloc(4096)
        with pytest.raises(vmmpool.DriverError, match="not inside memory from host_alloc"):
            b.copy_dtoh_async(h + 4096, buf.ptr, 16, 0)  # host side outside the pinned block
        with pytest.raises(vmmpool.DriverError, match="not mapped"):
            b.copy_htod_async(buf.ptr + P, h, 16, 0)  # device side unmapped
        b.host_free(h)
        with pytest.raises(vmmpool.DriverError, match="not host memory"):
            b.host_free(h)


# --------------------------------------------------------------- fault sweep
OPS = (
    "create", "release", "map", "unmap", "set_access", "synchronize",
    *EVENT_OPERATIONS, *STAGING_OPERATIONS,
)


def _sweep(
    make: Callable[[vmmpool.Device], Made],
    action: Callable[[object], None],
    awake_after_failure: bool,
) -> int:
    """Fail the nth call of every op during `action` until it succeeds; check all or nothing."""
    fired = 0
    for op in OPS:
        nth = 1
        while True:
            dev = vmmpool.Device.emulated(capacity=64 << 20)
            base = dev.counters().live
            obj, state, close, bytes_ok = make(dev)
            before = state()
            calls = dev.counters().calls.get(op, 0)
            name = "CUDA_ERROR_OUT_OF_MEMORY" if nth % 2 else "CUDA_ERROR_INVALID_VALUE"
            dev._backend.inject_fault(op, nth=nth, name=name)
            try:
                action(obj)
            except (vmmpool.OutOfMemoryError, vmmpool.DriverError) as err:
                assert dev.counters().calls.get(op, 0) - calls >= nth, f"{op} #{nth}: {err!r}"
                dev._backend.clear_faults()
                assert obj.asleep is not awake_after_failure, f"{op} #{nth}: state flipped"  # type: ignore[attr-defined]
                assert state() == before, f"{op} #{nth}: addresses or accounting changed"
                if not awake_after_failure:
                    obj.wake()  # type: ignore[attr-defined]  # the retry works
                assert bytes_ok(), f"{op} #{nth}: bytes lost"
                fired += 1
                nth += 1
                done = False
            else:
                dev._backend.clear_faults()
                done = True
                if not obj.asleep:  # type: ignore[attr-defined]
                    assert bytes_ok(), f"{op} #{nth}: bytes lost"
            close()
            gc.collect()
            assert dev.counters().live == base, f"{op} #{nth}: leak"
            assert dev._backend.live_host_allocations() == 0, f"{op} #{nth}: pinned memory leaked"
            assert dev._backend.live_events() == 0, f"{op} #{nth}: event leaked"
            if done:
                break
    return fired


def _make_pool(asleep: bool) -> Callable[[vmmpool.Device], Made]:
    def make(dev: vmmpool.Device) -> Made:
        pool, live = _pool_world(dev)
        big = pool.malloc(2 * P, stream=3)  # freed while asleep below
        # Shapes of state: addresses, bytes (awake), accounting.
        if asleep:
            pool.sleep()
            big.free()

        def state() -> object:
            pool._check()
            s = pool.stats()
            return [[a.ptr for a, _d in live], s.allocated_bytes, s.live_allocations, s.limit]

        return pool, state, pool.close, lambda: _bytes_ok(dev, live)

    return make


@pytest.fixture(params=["one-group", "per-page"])
def grouping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The host emulator's pieces (``SLEEP_GROUP``): these pools fit in one; or one page each."""
    if request.param == "per-page":
        monkeypatch.setattr(sleep_module, "SLEEP_GROUP", 1)
    return str(request.param)


def test_a_fault_at_any_call_of_sleep_leaves_the_pool_awake_with_its_bytes(grouping: str) -> None:
    fired = _sweep(_make_pool(False), lambda p: p.sleep(), awake_after_failure=True)  # type: ignore[attr-defined]
    assert fired >= 10


def test_a_fault_at_any_call_of_wake_leaves_the_pool_asleep_and_wake_retries(grouping: str) -> None:
    def wake_and_check(p: object) -> None:
        p.wake()  # type: ignore[attr-defined]

    fired = _sweep(_make_pool(True), wake_and_check, awake_after_failure=False)
    assert fired >= 8


def _make_buffer(asleep: bool, pooled: bool) -> Callable[[vmmpool.Device], Made]:
    def make(dev: vmmpool.Device) -> Made:
        pool = PagePool(dev, limit=16 * P) if pooled else None
        buf = GrowableBuffer(max_size=8 * P, device=None if pooled else dev, pool=pool, initial_size=3 * P)
        data = _fill(dev, buf.ptr, 3 * P, 5)
        if asleep:
            buf.sleep()

        def state() -> object:
            return [buf.ptr, buf.size, buf.capacity]

        def close() -> None:
            buf.close()
            if pool is not None:
                pool.close()

        return buf, state, close, lambda: bytes(buf.read()) == data

    return make


@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
@pytest.mark.parametrize("piece", ["one-piece", "per-page"])
def test_a_fault_at_any_call_of_buffer_sleep_or_wake_loses_nothing(
    pooled: bool, piece: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if piece == "per-page":  # the host emulator's sleep pieces (SLEEP_PIECE): one page each
        monkeypatch.setattr(buffer_module, "SLEEP_PIECE", 1)
    n = _sweep(_make_buffer(False, pooled), lambda b: b.sleep(), awake_after_failure=True)  # type: ignore[attr-defined]
    m = _sweep(_make_buffer(True, pooled), lambda b: b.wake(), awake_after_failure=False)  # type: ignore[attr-defined]
    assert n >= 5 and m >= 5


def test_sleep_whose_undo_also_fails_leaves_the_pool_asleep_with_its_backup(
    host: vmmpool.Device, grouping: str, tmp_path: object
) -> None:
    """A release fails mid-sleep, then mapping back fails too: asleep, nothing lost, wake retries.
    The history records what stayed unmapped, so a dump replays consistently."""
    from pathlib import Path

    from vmmpool import replay as R

    pool, live = _pool_world(host)
    pool.record_history(context=None)
    r0 = pool.stats().reserved_bytes
    n = pool.stats().pinned_pages
    host._backend.inject_fault("release", nth=n - 1, name="CUDA_ERROR_INVALID_VALUE")  # late in sleep
    host._backend.inject_fault("create", nth=1, name="CUDA_ERROR_INVALID_VALUE")  # the undo's first page
    with pytest.raises(vmmpool.DriverError):
        pool.sleep()
    host._backend.clear_faults()
    assert pool.asleep and pool.stats().backup_bytes > 0
    pool._check()
    with pytest.raises(AsleepError):
        pool.malloc(1)
    pool.wake()
    assert _bytes_ok(host, live)
    pool._check()
    trace = pool.memory_snapshot()["device_traces"][0]
    mapped = sum(e["size"] for e in trace if e["action"] == "segment_map")
    unmapped = sum(e["size"] for e in trace if e["action"] == "segment_unmap")
    # the history's segment events account for every change of the reserved bytes
    assert mapped - unmapped == pool.stats().reserved_bytes - r0, (mapped, unmapped, r0)
    path = Path(str(tmp_path)) / "failed-sleep.pickle"
    pool.dump_snapshot(path)
    rec = R.load(str(path)).recorded_reserved  # a replay of the dump agrees
    assert rec[-1][1] - rec[0][1] == pool.stats().reserved_bytes - r0
    pool.close()
    assert host._backend.live_host_allocations() == 0


def _failing_undo(
    monkeypatch: pytest.MonkeyPatch, dev: vmmpool.Device, op: str,
    nth: int | Callable[[int], int], unmaps: int,
) -> None:
    """Make the next undo (``wake_runs``) of a failing sleep fail: at the `nth` call of `op` (or
    ``nth(pages to map back)``), and then its unmap of what it mapped, `unmaps` times in a row."""
    be = dev._backend
    undo = sleep_module.wake_runs

    def failing(core: Core, runs: list[sleep_module.Run], sl: sleep_module.PoolSleep) -> None:
        monkeypatch.setattr(sleep_module, "wake_runs", undo)
        k = nth if isinstance(nth, int) else nth(sum(len(pages) for _a, _s, pages in runs))
        be.inject_fault(op, nth=k, name="CUDA_ERROR_INVALID_VALUE")
        for i in range(1, unmaps + 1):
            be.inject_fault("unmap", nth=i, name="CUDA_ERROR_INVALID_VALUE")
        undo(core, runs, sl)

    monkeypatch.setattr(sleep_module, "wake_runs", failing)


@pytest.mark.parametrize("released", [False, True], ids=["handles-kept", "handles-released"])
@pytest.mark.parametrize("nth_map", [1, 2])
@pytest.mark.parametrize("unmaps", [1, 2], ids=["unmap-once", "unmap-twice"])
def test_sleep_whose_undo_fails_and_whose_undo_unmap_fails_too_can_still_wake(
    grouping: str, released: bool, nth_map: int, unmaps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three faults in a row: a release fails mid-sleep, the undo's map fails (after it mapped
    some slots back), and the undo's unmap of those slots fails too (and, "unmap-twice", its
    unmap of the first slot alone). Those slots stayed mapped while their pages slept: wake()
    mapped them again (refused, forever) and leaked what they held. Now a later wake() brings
    every byte back and leaks nothing."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool, live = _pool_world(dev)
    s = pool.stats()
    n = s.pinned_pages
    cached = s.total_pages - n  # released first
    be = dev._backend
    # per page, each page is released as soon as it is unmapped: fail the second release
    early = 2 if grouping == "per-page" else 1
    be.inject_fault("release", nth=cached + (n - 1 if released else early), name="CUDA_ERROR_INVALID_VALUE")
    # the map after the first (or second) one fails; every undo here maps back 2 pages or more
    _failing_undo(monkeypatch, dev, "map", lambda k: min(nth_map + 1, k), unmaps)
    with pytest.raises(vmmpool.DriverError):
        pool.sleep()
    be.clear_faults()
    assert pool.asleep
    st = pool.stats()  # left asleep by the failed sleep: it went to sleep all the same
    assert (st.n_sleeps, st.n_wakes) == (1, 0)
    core = pool._core
    awake_slots = sum(1 for a in core.arenas for p in a.slots if p is not None and p.state == "mapped")
    # Unmapped one at a time after the first unmap failed: all but the one whose unmap failed too.
    assert dev.counters().mappings == awake_slots + (unmaps - 1)
    pool._check()
    with pytest.raises(AsleepError):
        pool.malloc(1)
    pool.wake()
    assert not pool.asleep
    pool._check()
    assert _bytes_ok(dev, live)
    s = pool.stats()
    assert (s.n_sleeps, s.n_wakes) == (1, 1)
    c = dev.counters()
    assert (c.allocations, c.mappings) == (s.total_pages, s.mapped_pages)  # nothing leaked
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base
    assert be.live_host_allocations() == 0


def test_three_faults_at_any_call_of_the_undo_leave_the_pool_able_to_wake(
    grouping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep of the triple failure: a late release fails the sleep, then each call of the
    undo in turn (create, map, set_access, the copy back) fails, and the undo's unmap fails
    once or twice. Whatever stays mapped, wake() brings every byte back and leaks nothing."""
    runs = 0
    for op in ("create", "map", "set_access", "copy_htod_async"):
        nth = 1
        while True:
            asleep = False
            for unmaps in (1, 2):
                dev = vmmpool.Device.emulated(capacity=64 << 20)
                pool, live = _pool_world(dev)
                undo = sleep_module.wake_runs
                _failing_undo(monkeypatch, dev, op, nth, unmaps)
                late = pool.stats().total_pages - 1  # the last but one release of the sleep
                dev._backend.inject_fault("release", nth=late, name="CUDA_ERROR_INVALID_VALUE")
                with pytest.raises(vmmpool.DriverError):
                    pool.sleep()
                monkeypatch.setattr(sleep_module, "wake_runs", undo)  # if the undo was not reached
                dev._backend.clear_faults()
                pool._check()
                if pool.asleep:
                    asleep = True
                    runs += 1
                    pool.wake()
                    pool._check()
                assert _bytes_ok(dev, live), (op, nth, unmaps)
                s = pool.stats()
                c = dev.counters()
                assert (c.allocations, c.mappings) == (s.total_pages, s.mapped_pages), (op, nth, unmaps)
                pool.close()
                assert dev.counters().live == (0, 0, 0), (op, nth, unmaps)
            if not asleep:  # the undo made fewer calls than nth: next op
                break
            nth += 1
    assert runs >= 10


@pytest.mark.parametrize("unmaps", [1, 2], ids=["unmap-once", "unmap-twice"])
def test_wake_whose_undo_unmap_fails_too_wakes_at_the_next_call(grouping: str, unmaps: int) -> None:
    """A map fails mid-wake and the undo's unmap of what wake mapped fails too: those slots stay
    mapped (with handles the undo released), so the next wake() was refused forever. Now it
    unmaps them first: every byte back, nothing leaked."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool, live = _pool_world(dev)
    pool.sleep()
    be = dev._backend
    be.inject_fault("map", nth=3, name="CUDA_ERROR_INVALID_VALUE")
    for nth in range(1, unmaps + 1):
        be.inject_fault("unmap", nth=nth, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.wake()
    be.clear_faults()
    assert pool.asleep
    assert dev.counters().mappings == unmaps - 1  # the slot whose unmap failed twice
    pool._check()
    sl = pool._core.asleep
    assert sl is not None and len(sl.mapped) == unmaps - 1
    if sl.mapped:  # the record is what check() compares the slots with
        saved = dict(sl.mapped)
        sl.mapped.clear()
        with pytest.raises(AssertionError, match="sleeps, its slot is mapped"):
            pool._check()
        sl.mapped.update(saved)
    pool.wake()
    pool._check()
    assert _bytes_ok(dev, live)
    s = pool.stats()
    c = dev.counters()
    assert (c.allocations, c.mappings) == (s.total_pages, s.mapped_pages)
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base


def test_close_while_slots_of_sleeping_pages_stay_mapped_leaks_nothing() -> None:
    """close() after a wake whose undo left a slot mapped (STALE): the reservation's close unmaps it."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool, _live = _pool_world(dev)
    pool.sleep()
    be = dev._backend
    be.inject_fault("map", nth=3, name="CUDA_ERROR_INVALID_VALUE")
    be.inject_fault("unmap", nth=1, name="CUDA_ERROR_INVALID_VALUE")
    be.inject_fault("unmap", nth=2, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.wake()
    be.clear_faults()
    assert dev.counters().mappings == 1
    pool.close()
    gc.collect()
    assert dev.counters().live == (0, 0, 0)


def test_check_sees_a_slot_whose_mapping_disagrees_with_its_page_state(host: vmmpool.Device) -> None:
    """check() compares every slot with what its reservation maps: an awake page whose slot is
    unmapped, a sleeping page whose slot is mapped though the sleep record says it is not."""
    from vmmpool._resources import create

    pool = PagePool(host, limit=8 * P)
    a = pool.malloc(2 * P)
    core = pool._core
    arena = next(ar for ar in core.arenas if ar.mapped)
    s = next(i for i, p in enumerate(arena.slots) if p is not None)
    page = arena.slots[s]
    assert page is not None
    arena.res.unmap(s * P, P)  # behind the pool's back
    with pytest.raises(AssertionError, match="is mapped, its slot unmapped"):
        pool._check()
    arena.res.map(page.phys, s * P, access="rw")
    pool._check()
    pool.sleep()
    pool._check()
    phys = create(P, host)
    arena.res.map(phys, s * P)  # a sleeping page's slot mapped, not in the record
    with pytest.raises(AssertionError, match="sleeps, its slot is mapped, the sleep record says unmapped"):
        pool._check()
    arena.res.unmap(s * P, P)
    phys.close()
    pool._check()
    pool.wake()
    a.free()
    pool.close()
    assert host.counters().live == (0, 0, 0)


def test_free_pages_a_failed_sleep_kept_do_not_block_wake_under_a_lower_limit(host: vmmpool.Device) -> None:
    """Left asleep by a failed undo, the pool keeps some handles; blocks freed while asleep
    turn those pages free. A lower limit the live data fits under then failed wake with
    "wake needs 0 page(s) ...; the limit allows -3 more": the free pages are given back first."""
    pool, live = _pool_world(host)
    host._backend.inject_fault("release", nth=5, name="CUDA_ERROR_INVALID_VALUE")
    host._backend.inject_fault("create", nth=1, name="CUDA_ERROR_INVALID_VALUE")  # the undo fails
    with pytest.raises(vmmpool.DriverError):
        pool.sleep()
    host._backend.clear_faults()
    assert pool.asleep
    for _ in range(3):
        a, _d = live.pop(0)
        a.free()
    pool.set_limit(4 * P)
    assert len(pool._core.pages) > 4  # kept handles, some under blocks freed while asleep
    pool.wake()
    pool._check()
    assert _bytes_ok(host, live) and pool.stats().total_pages <= 4
    for a, _d in live:
        a.free()
    pool.close()


def test_memory_shared_with_other_processes_does_not_sleep(host: vmmpool.Device) -> None:
    """Receivers hold shared pages: sleeping would free nothing and end the sharing; refused."""
    pool = PagePool(host, limit=8 * P, shareable=True)
    a = pool.malloc(P)
    host.write(a.ptr, b"shared")
    handle = a.share()
    with pytest.raises(ValueError, match="shared with other processes"):
        pool.sleep()
    assert not pool.asleep and host.counters().allocations == 1
    del handle  # never sent: the lease ends
    gc.collect()
    pool.sleep()
    pool.wake()
    assert bytes(host.read(a.ptr, 6)) == b"shared"
    again = a.share()  # pages made by wake are exportable too
    assert again.nbytes == P
    del again
    gc.collect()
    a.free()
    pool.close()
    buf = GrowableBuffer(max_size=4 * P, device=host, initial_size=P, shareable=True)
    buf.write(b"buffer")
    h = buf.share()
    with pytest.raises(ValueError, match="shared with another process"):
        buf.sleep()
    assert not buf.asleep
    m = h.open(host)
    h.close()
    with pytest.raises(ValueError, match="shared with another process"):
        buf.sleep()  # a mapping still holds the lease
    m.close()  # every receiver is done: the buffer sleeps again
    buf.sleep()
    buf.wake()
    assert buf.read(6) == b"buffer"
    buf.close()


def test_share_while_asleep_is_refused_as_asleep(host: vmmpool.Device) -> None:
    """A sleeping pool's or buffer's pages were given back: share() says asleep, exports nothing.

    It raised ClosedError("PhysicalAllocation has been closed") for an allocation (the pool
    is not closed), and for a buffer handed out a handle of 0 pages that no open() could map.
    """
    pool = PagePool(host, limit=8 * P, shareable=True)
    a = pool.malloc(P)
    host.write(a.ptr, b"asleep")
    pool.sleep()
    with pytest.raises(AsleepError, match=r"PagePool is asleep.*share\(\)"):
        a.share()
    assert not pool._shares
    pool.wake()
    assert bytes(host.read(a.ptr, 6)) == b"asleep"
    a.free()
    pool.close()
    buf = GrowableBuffer(max_size=4 * P, device=host, initial_size=P, shareable=True)
    buf.sleep()
    with pytest.raises(AsleepError, match=r"GrowableBuffer is asleep.*share\(\)"):
        buf.share()
    buf.wake()
    with buf.share() as h, h.open(host) as m:
        assert h.n_pages == 1 and m.nbytes == P
    buf.close()


@pytest.mark.parametrize("free_while_asleep", [False, True])
def test_pages_mapped_twice_sleep_once_and_wake_at_both_addresses(
    free_while_asleep: bool, grouping: str
) -> None:
    """Issue 20's aliases: a page mapped in two slots is copied and released once, mapped back twice."""
    Q = 64 << 10
    dev = vmmpool.Device.emulated(capacity=16 * Q, granularity=Q)
    pool = PagePool(dev, limit=4 * Q)
    xs = [pool.malloc(Q // 2) for _ in range(8)]  # four pages of half-page blocks
    base = min(x.ptr for x in xs)
    by_off = {(x.ptr - base) // (Q // 2): x for x in xs}
    by_off.pop(1).free()  # a free tail on page 0 ...
    by_off.pop(4).free()  # ... and a free head on page 2
    c = pool.malloc(3 * Q // 4)  # at the limit: across the tail and the head, two aliases
    assert len(pool._core.aliases) == 2
    live = [(x, _fill(dev, x.ptr, x.size, i)) for i, x in by_off.items()]
    live.append((c, _fill(dev, c.ptr, c.size, 99)))
    pool.sleep()
    assert dev.counters().allocations == 0 and dev.counters().mappings == 0
    s = pool.stats()
    assert s.backup_bytes == 4 * Q  # four physical pages, each copied once
    pool._check()
    if free_while_asleep:
        x, _d = live.pop(0)
        x.free()
        pool._check()
    pool.wake()
    pool._check()
    assert dev.counters().allocations == 4 and len(pool._core.aliases) == 2
    assert _bytes_ok(dev, live)
    dev.write(c.ptr, bytes(c.size))  # both mappings show one page again: the neighbours keep theirs
    assert _bytes_ok(dev, live[:-1])
    for x, _d in live:
        x.free()
    pool.close()
    assert dev.counters().live == (0, 0, 0)


def test_history_records_sleep_and_wake_as_segment_events(tmp_path: object) -> None:
    # sleep() gives every page back and wake() maps the live ones back: a dump
    # taken afterwards must see both as segment events, or a replay of it starts
    # its recorded reserved bytes below zero (a block freed while asleep).
    from pathlib import Path

    from vmmpool import replay as R

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    with PagePool(dev) as pool:
        pool.record_history(context=None)
        a = pool.malloc(3 * P // 2)
        b = pool.malloc(2 * P)
        pool.sleep()
        b.free()
        pool.wake()
        path = Path(str(tmp_path)) / "slept.pickle"
        pool.dump_snapshot(path)
        tr = R.load(str(path))
        assert tr.recorded_reserved[0] == (0, 0), tr.recorded_reserved
        assert min(r for _, r in tr.recorded_reserved) >= 0, tr.recorded_reserved
        assert tr.recorded_reserved[-1][1] == pool.stats().reserved_bytes
        a.free()


def test_on_the_host_sleep_and_wake_go_by_pieces_so_ram_peaks_near_the_live_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Device memory is host RAM there: each piece is given back before the next is copied."""
    from vmmpool._prefault import discard as real_discard

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    assert dev._backend.device_memory_is_host_ram
    monkeypatch.setattr(sleep_module, "SLEEP_GROUP", 2 * P)
    pool = PagePool(dev, limit=16 * P)
    live = []
    for i in range(3):
        a = pool.malloc(2 * P)
        live.append((a, _fill(dev, a.ptr, a.size, i)))
    held: list[int] = []  # device pages held at each copy
    real_save, real_load = Staging.save, Staging.load

    def save(self: Staging, runs: list[tuple[int, int, int]], out: np.ndarray, stream: int) -> None:
        held.append(dev.counters().allocations)
        real_save(self, runs, out, stream)

    dropped: list[int] = []

    def discard(address: int, nbytes: int) -> bool:
        dropped.append(nbytes)
        return real_discard(address, nbytes)

    monkeypatch.setattr(Staging, "save", save)
    monkeypatch.setattr(sleep_module, "discard", discard)
    pool.sleep()
    assert held == [6, 4, 2]  # two pages a piece: each piece's pages are gone before the next copy
    assert dev.counters().allocations == 0 and pool.stats().backup_bytes == 6 * P
    loads: list[int] = []

    def load(self: Staging, runs: list[tuple[int, int, int]], src: np.ndarray, stream: int) -> None:
        loads.append(dev.counters().allocations)
        real_load(self, runs, src, stream)

    monkeypatch.setattr(Staging, "load", load)
    pool.wake()
    assert loads == [2, 4, 6] and dropped == [2 * P] * 3  # each piece's backup given back once restored
    assert _bytes_ok(dev, live)
    # A failure at the last piece: the restored pieces are copied back to the backup first.
    pool.sleep()
    dev._backend.inject_fault("create", nth=5, name="CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(vmmpool.OutOfMemoryError):
        pool.wake()
    dev._backend.clear_faults()
    assert pool.asleep and dev.counters().allocations == 0
    pool.wake()
    assert _bytes_ok(dev, live)
    for a, _d in live:
        a.free()
    pool.close()
    assert dev.counters().live == (0, 0, 0) and dev._backend.live_host_allocations() == 0


def test_on_a_gpu_sleep_copies_everything_in_one_pipelined_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where device memory is not host RAM: one save of every run, then the unmaps and releases."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    monkeypatch.setattr(dev._backend, "device_memory_is_host_ram", False)
    monkeypatch.setattr(sleep_module, "SLEEP_GROUP", 1)
    pool = PagePool(dev, limit=16 * P)
    live = []
    for i in range(3):
        a = pool.malloc(2 * P)
        live.append((a, _fill(dev, a.ptr, a.size, i)))
    saves: list[int] = []
    real_save = Staging.save

    def save(self: Staging, runs: list[tuple[int, int, int]], out: np.ndarray, stream: int) -> None:
        saves.append(sum(n for _a, n, _o in runs))
        real_save(self, runs, out, stream)

    monkeypatch.setattr(Staging, "save", save)
    pool.sleep()
    assert saves == [6 * P]
    pool.wake()
    assert _bytes_ok(dev, live)
    for a, _d in live:
        a.free()
    pool.close()


def test_a_retired_stream_emptied_while_asleep_is_forgotten_at_wake(host: vmmpool.Device) -> None:
    # Its blocks were freed while asleep: wake maps nothing back for it, and a retired stream
    # left with nothing is forgotten there (events, address space), as after a reclaim.
    P = host.granularity
    pool = PagePool(host)
    a = pool.malloc(3 * P, stream=5)
    keep = pool.malloc(P)
    pool.retire_stream(5)
    va = pool.stats().address_space_bytes
    pool.sleep()
    a.free()
    pool.wake()
    assert list(pool._core.streams) == [0]
    assert pool.stats().address_space_bytes < va
    pool._check()
    keep.free()
    pool.close()
    assert host.counters().live == (0, 0, 0)


@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_on_the_host_a_buffer_sleeps_and_wakes_by_pieces(
    pooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each piece's pages are given back before the next piece is copied, and at wake each
    piece's backup bytes once it is restored: host RAM peaks near the buffer's bytes, not twice
    them."""
    from vmmpool._prefault import discard as real_discard

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    monkeypatch.setattr(buffer_module, "SLEEP_PIECE", 2 * P)
    pool = PagePool(dev, limit=16 * P) if pooled else None
    buf = GrowableBuffer(max_size=8 * P, device=None if pooled else dev, pool=pool, initial_size=6 * P)
    data = _fill(dev, buf.ptr, 6 * P, 7)
    held: list[int] = []  # device pages held at each copy
    real_save = Staging.save

    def save(self: Staging, runs: list[tuple[int, int, int]], out: np.ndarray, stream: int) -> None:
        # pages still the buffer's: the driver's count, or the pool's pages not yet given back
        held.append(dev.counters().allocations if pool is None else 6 - pool.stats().free_pages)
        real_save(self, runs, out, stream)

    monkeypatch.setattr(Staging, "save", save)
    buf.sleep()
    assert held == [6, 4, 2]
    loads: list[tuple[int, int]] = []
    real_load = Staging.load

    def load(self: Staging, runs: list[tuple[int, int, int]], src: np.ndarray, stream: int) -> None:
        loads.append((runs[0][2], runs[0][1]))
        real_load(self, runs, src, stream)

    dropped: list[int] = []

    def discard(address: int, nbytes: int) -> bool:
        dropped.append(nbytes)
        return real_discard(address, nbytes)

    monkeypatch.setattr(Staging, "load", load)
    monkeypatch.setattr(buffer_module, "discard", discard)
    buf.wake()
    assert loads == [(0, 2 * P), (2 * P, 2 * P), (4 * P, 2 * P)]
    assert dropped == [2 * P] * 3  # each piece's backup given back once restored
    assert bytes(buf.read()) == data
    buf.close()
    if pool is not None:
        pool.close()
    assert dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize("op", ["copy_dtoh_async", "event_record", "event_wait"])
@pytest.mark.parametrize("nth_create", [2, 3, 5])
def test_a_failed_wake_whose_copy_back_fails_keeps_the_restored_pages_mapped(
    op: str, nth_create: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where device memory is host RAM, wake restores piece by piece and gives each piece's
    backup bytes back to the OS; a failure later copies the restored pieces back into the
    backup before it unmaps them. When that copy failed too, the undo unmapped and released
    them anyway ("their bytes are lost"): the next wake() brought zeros back. Now the pieces
    stay mapped with their pages (noted KEPT in the sleep record), and wake() finishes them."""
    monkeypatch.setattr(sleep_module, "SLEEP_GROUP", 1)  # one page a piece
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    be = dev._backend
    pool, live = _pool_world(dev)
    pool.sleep()
    core = pool._core
    save = Staging.save

    def failing_save(self: Staging, *args: object, **kwargs: object) -> None:
        be.inject_fault(op, nth=1, name="CUDA_ERROR_INVALID_VALUE")  # the undo's copy back fails
        save(self, *args, **kwargs)  # type: ignore[arg-type]

    be.inject_fault("create", nth=nth_create, name="CUDA_ERROR_INVALID_VALUE")  # a later piece
    monkeypatch.setattr(Staging, "save", failing_save)
    with pytest.raises(vmmpool.DriverError):
        pool.wake()
    monkeypatch.setattr(Staging, "save", save)
    be.clear_faults()
    assert pool.asleep
    kept = dict(core.asleep.mapped) if core.asleep is not None else {}
    assert kept and set(kept.values()) == {sleep_module.KEPT}
    pool._check()
    c = dev.counters()
    assert c.mappings == len(kept)
    pool.wake()
    assert not pool.asleep
    pool._check()
    assert _bytes_ok(dev, live)
    s = pool.stats()
    c = dev.counters()
    assert (c.allocations, c.mappings) == (s.total_pages, s.mapped_pages)  # nothing leaked
    # sleeps and wakes again as any pool
    pool.sleep()
    pool.wake()
    assert _bytes_ok(dev, live)
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base
    assert be.live_host_allocations() == 0


@pytest.mark.parametrize("nth_release", [1, 2])
def test_a_failed_wake_whose_release_fails_keeps_the_handle_in_the_pool(
    grouping: str, nth_release: int
) -> None:
    """A wake fails (a create), and its undo's release of a page it had created fails too.
    The undo dropped that handle (left to its finalizer, or leaked when that release failed
    as well): the device held a page the pool did not count. Now the sleeping page keeps
    the handle; the next wake() maps it, and close() releases everything."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    be = dev._backend
    pool, live = _pool_world(dev)
    pool.sleep()
    core = pool._core
    be.inject_fault("create", nth=3, name="CUDA_ERROR_INVALID_VALUE")
    for i in range(nth_release, 3):  # the undo's release, and the finalizer's if it gets one
        be.inject_fault("release", nth=i, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.wake()
    gc.collect()
    be.clear_faults()
    assert pool.asleep
    pool._check()
    assert dev.counters().allocations == len(core.pages)  # every handle the device holds is counted
    assert dev.counters().mappings == 0
    pool.wake()
    pool._check()
    assert _bytes_ok(dev, live)
    s = pool.stats()
    c = dev.counters()
    assert (c.allocations, c.mappings) == (s.total_pages, s.mapped_pages)
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base


def test_a_failed_sleep_without_backup_is_awake_and_usable_its_given_back_pages_undefined(
    grouping: str,
) -> None:
    """sleep(backup=False) whose late release fails: pages it had given back are created again
    for the undo, with nothing to restore them from (documented: their allocations hold
    undefined bytes, as after a wake). The pool is awake, consistent, and leaks nothing."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool, live = _pool_world(dev)
    n = pool.stats().total_pages
    dev._backend.inject_fault("release", nth=n - 1, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.sleep(backup=False)
    assert not pool.asleep
    pool._check()
    for a, d in live:  # every allocation is mapped and usable again
        dev.write(a.ptr, d)
    assert _bytes_ok(dev, live)
    s = pool.stats()
    c = dev.counters()
    assert (c.allocations, c.mappings) == (s.total_pages, s.mapped_pages)
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base


def test_a_sleep_interrupted_in_its_undo_is_recorded_asleep_and_wakes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release fails mid-sleep and an interrupt (KeyboardInterrupt) hits the undo's mapping
    back: the pool is asleep, recorded as such (slots the sleep did not reach KEPT, the sleep
    counted), check() holds, and wake() restores every byte."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool, live = _pool_world(dev)
    s = pool.stats()
    dev._backend.inject_fault("release", nth=s.total_pages - s.pinned_pages + 2,
                              name="CUDA_ERROR_INVALID_VALUE")

    def interrupted(*_a: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(sleep_module, "wake_runs", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.sleep()
    dev._backend.clear_faults()
    assert pool.asleep
    st = pool.stats()
    assert (st.n_sleeps, st.n_wakes) == (1, 0)
    pool._check()
    pool.wake()
    pool._check()
    assert _bytes_ok(dev, live)
    st = pool.stats()
    assert (st.n_sleeps, st.n_wakes) == (1, 1)
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base


def _interrupt_before(dev: vmmpool.Device, monkeypatch: pytest.MonkeyPatch, op: str, nth: int = 1) -> None:
    """A KeyboardInterrupt before the `nth` next backend call of `op` (it does not run)."""
    be = dev._backend
    orig = type(be)._enter
    left = [nth]

    def enter(self: object, o: str) -> None:
        if o == op:
            left[0] -= 1
            if left[0] == 0:
                raise KeyboardInterrupt(f"before {o}")
        orig(self, o)  # type: ignore[arg-type]

    monkeypatch.setattr(be, "_enter", enter.__get__(be))


@pytest.mark.parametrize("op", ["unmap", "release"])
def test_a_wake_interrupted_in_its_undo_stays_asleep_recorded_and_wakes(
    op: str, grouping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map fails mid-wake and an interrupt hits the undo: the undo still runs to its end (the
    interrupt is raised after it), so check() holds, the retry does not map onto a mapped slot
    (it raised ValueError for ever), every byte comes back and close() leaks no page."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool, live = _pool_world(dev)
    pool.sleep()
    dev._backend.inject_fault("map", nth=3, name="CUDA_ERROR_INVALID_VALUE")
    with monkeypatch.context() as mp:
        _interrupt_before(dev, mp, op)
        with pytest.raises(KeyboardInterrupt):
            pool.wake()
    dev._backend.clear_faults()
    assert pool.asleep
    pool._check()
    pool.wake()
    pool._check()
    assert _bytes_ok(dev, live)
    for a, _d in live:
        a.free()
    pool.close()
    gc.collect()
    assert dev.counters().live == base


@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_a_buffer_wake_interrupted_in_its_undo_settles_and_the_retry_wakes(
    pooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool = PagePool(dev, limit=16 * P) if pooled else None
    buf = GrowableBuffer(max_size=8 * P, device=None if pooled else dev, pool=pool, initial_size=4 * P)
    data = _fill(dev, buf.ptr, 4 * P, 3)
    buf.sleep()
    dev._backend.inject_fault("map", nth=2, name="CUDA_ERROR_INVALID_VALUE")
    with monkeypatch.context() as mp:
        _interrupt_before(dev, mp, "unmap")
        with pytest.raises(KeyboardInterrupt):
            buf.wake()
    dev._backend.clear_faults()
    assert buf.asleep
    buf.wake()  # the first retry works (it raised ValueError: a map onto a slot left mapped)
    assert bytes(buf.read()) == data
    buf.close()
    if pool is not None:
        pool.close()
    gc.collect()
    assert dev.counters().live == base


def test_an_interrupt_at_a_sleep_events_destroy_keeps_the_event_for_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool, live = _pool_world(dev)
    with monkeypatch.context() as mp:
        _interrupt_before(dev, mp, "event_destroy")
        with pytest.raises(KeyboardInterrupt):
            pool.sleep()
    assert not pool.asleep and _bytes_ok(dev, live)
    pool.close()
    assert dev._backend.live_events() == 0


def test_a_page_freed_while_asleep_through_its_aliases_is_not_brought_back() -> None:
    # An aliased page whose every byte was freed while asleep: wake() mapped it back (its
    # aliases' fences kept it out of forget_freed), costing a page, and under a limit that
    # fits the live pages wake() failed; _check() also called it pinned while asleep.
    Q = 64 << 10
    dev = vmmpool.Device.emulated(capacity=16 * Q, granularity=Q)
    pool = PagePool(dev, limit=4 * Q)
    xs = [pool.malloc(Q // 2) for _ in range(8)]
    base = min(x.ptr for x in xs)
    by_off = {(x.ptr - base) // (Q // 2): x for x in xs}
    for k in (1, 4):
        by_off.pop(k).free()
    c = pool.malloc(3 * Q // 4)  # across page 0's free tail and page 2's free head
    assert len(pool._core.aliases) == 2
    data = {x.ptr: bytes([k]) * (Q // 2) for k, x in by_off.items()}
    for ptr, b in data.items():
        dev.write(ptr, b)
    pool.sleep()
    pool._check()
    c.free()
    a0 = by_off.pop(0)
    del data[a0.ptr]
    a0.free()  # page 0: every byte free now, its own and the ones it lent
    pool._check()
    live_pages = {(x.ptr - base) // Q for x in by_off.values()}
    assert len(live_pages) == 3
    pool.set_limit(3 * Q)
    pool.wake()  # raised OutOfMemoryError: it brought page 0 back
    pool._check()
    s = pool.stats()
    assert (s.total_pages, s.pinned_pages, s.reclaimable_pages) == (3, 3, 0)
    assert not pool._core.aliases
    for ptr, b in data.items():
        assert bytes(dev.read(ptr, len(b))) == b
    for x in by_off.values():
        x.free()
    pool.close()
    assert dev.counters().live == (0, 0, 0)


def test_wake_without_device_memory_says_so_and_stays_asleep() -> None:
    # Another job took the device's memory while the pool slept: wake() raised the driver's
    # bare "capacity exhausted" (a request of one page, where it needs many), not counted.
    P = 2 << 20
    dev = vmmpool.Device.emulated(capacity=32 * P)
    a = PagePool(dev, limit=32 * P)
    data = [(a.malloc(n), bytes([k + 1]) * n) for k, n in enumerate((5 * P + 123, 777, 3 * P))]
    for x, d in data:
        dev.write(x.ptr, d)
    held = a.stats().total_pages
    a.sleep()
    b = PagePool(dev, limit=32 * P)
    hog = b.malloc((32 - held + 2) * P)  # leaves 2 pages fewer than the wake needs
    before = dev.counters().live
    with pytest.raises(vmmpool.OutOfMemoryError) as err:
        a.wake()
    msg = str(err.value)
    assert f"wake needs {held} page(s)" in msg and "the device could not create them" in msg
    assert "stays asleep" in msg and err.value.requested == held * P
    assert isinstance(err.value.__cause__, vmmpool.OutOfMemoryError)
    assert a.asleep and a.stats().n_ooms == 1 and dev.counters().live == before
    a._check()
    hog.free()
    b.close()
    a.wake()
    assert all(bytes(dev.read(x.ptr, len(d))) == d for x, d in data)
    for x, _ in data:
        x.free()
    a.close()
    assert dev.counters().live == (0, 0, 0)

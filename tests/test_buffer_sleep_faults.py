"""GrowableBuffer.sleep / wake under fuzzed driver faults: a buffer's bytes are never lost.

Every backend call of the operation is numbered; the sweep fails call ``n`` (any
operation: create, map, a copy, an event...) and, "with a failing undo", also
one or several of the calls that follow it (the undo's). After the failure,
with no fault armed:

* the buffer is usable (never "unusable": that lost the bytes);
* it is awake with its bytes, or asleep and ``wake()`` brings its bytes back;
* what the device holds is what the buffer (or its pool) counts;
* ``close()`` returns the device's live counts to their baseline.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import vmmpool
from vmmpool import GrowableBuffer, PagePool
from vmmpool import _buffer as buffer_module
from vmmpool._errors import DriverError

P = 2 << 20
PAGES = 3

#: Operations the numbering skips (queries that fail nothing a sleep or wake changes).
QUIET = frozenset({"mem_info", "get_access", "event_query"})


@contextmanager
def failing_calls(dev: vmmpool.Device, fail: set[int]) -> Iterator[list[str]]:
    """Number the backend's calls from 1; those in `fail` raise (after being counted)."""
    be = dev._backend
    enter = be._enter
    seen: list[str] = []

    def patched(op: str) -> None:
        enter(op)
        if op in QUIET:
            return
        seen.append(op)
        if len(seen) in fail:
            raise DriverError("CUDA_ERROR_INVALID_VALUE", f"fuzzed fault at call {len(seen)}", operation=op)

    be._enter = patched  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del be._enter


def _world(
    pooled: bool, asleep: bool, backup: bool
) -> tuple[vmmpool.Device, GrowableBuffer, PagePool | None, bytes]:
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = PagePool(dev, limit=16 * P) if pooled else None
    buf = GrowableBuffer(
        max_size=8 * P, device=None if pooled else dev, pool=pool, initial_size=PAGES * P - 7
    )
    data = np.random.default_rng(11).integers(0, 256, buf.size, dtype=np.uint8).tobytes()
    buf.write(data)
    if asleep:
        buf.sleep(backup)
    return dev, buf, pool, data


def _held(dev: vmmpool.Device, buf: GrowableBuffer, pool: PagePool | None) -> None:
    """The device holds exactly the buffer's mapped pages (and the pool's cached ones)."""
    c = dev.counters()
    assert c.mappings == buf.capacity // P, c
    if pool is None:
        assert c.allocations == buf.capacity // P, c
    else:
        assert c.allocations == pool.stats().total_pages, (c, pool.stats())


#: Calls to fail, from the nth: the nth alone; the nth and the kth after it (an undo's kth
#: call); the nth and the k after it (an undo failing, then its own fallback failing).
PATTERNS: dict[str, Callable[[int], set[int]]] = {
    "once": lambda n: {n},
    **{f"then-{k}": (lambda n, k=k: {n, n + k}) for k in (1, 2, 4)},
    "burst-3": lambda n: set(range(n, n + 4)),
}


def _sweep(pooled: bool, sleeping: bool, backup: bool, pattern: str) -> int:
    """Fail call n (and the pattern's others) for n = 1, 2, ... until the operation succeeds."""
    failures = 0
    n = 1
    while True:
        dev, buf, pool, data = _world(pooled, asleep=not sleeping, backup=backup)
        ok = False
        with failing_calls(dev, PATTERNS[pattern](n)) as seen:
            try:
                buf.sleep(backup) if sleeping else buf.wake()
                ok = True
            except (vmmpool.OutOfMemoryError, vmmpool.DriverError):
                assert len(seen) >= n
        where = f"{pattern} at call {n} ({seen[n - 1] if len(seen) >= n else '-'}) of {seen}"
        assert buf._state.unusable is None, f"{where}: unusable: {buf._state.unusable}"
        st = buf.sleep_stats()  # a failed sleep that left it asleep counts as a sleep
        assert st.n_sleeps - st.n_wakes == (1 if buf.asleep else 0), f"{where}: {st}"
        if not ok:
            failures += 1
            if not buf.asleep:
                if backup or not sleeping:
                    # awake after a failed sleep: bytes intact (backup=False: one piece, all or
                    # nothing); after a failed wake the buffer must still be asleep
                    assert sleeping, f"{where}: a failed wake left the buffer awake"
                    assert bytes(buf.read()) == data, f"{where}: bytes lost (awake)"
                _held(dev, buf, pool)
        if buf.asleep:
            buf.wake()
        st = buf.sleep_stats()
        assert st.n_sleeps == st.n_wakes, f"{where}: {st}"
        if backup:
            assert bytes(buf.read()) == data, f"{where}: bytes lost after wake"
        _held(dev, buf, pool)
        buf.sleep(backup)  # and it sleeps and wakes again as any buffer
        buf.wake()
        if backup:
            assert bytes(buf.read()) == data, f"{where}: bytes lost after a second sleep"
        buf.close()
        if pool is not None:
            pool.close()
        gc.collect()
        assert dev.counters().live == (0, 0, 0), f"{where}: leaked {dev.counters().live}"
        assert dev._backend.live_host_allocations() == 0, f"{where}: pinned memory leaked"
        assert dev._backend.live_events() == 0, f"{where}: event leaked"
        if ok:
            return failures
        n += 1


@pytest.fixture(params=["per-page", "one-piece", "gpu"])
def pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where device memory is host RAM, by pieces of a page or one piece; or as on a GPU."""
    if request.param == "per-page":
        monkeypatch.setattr(buffer_module, "SLEEP_PIECE", 1)
    elif request.param == "gpu":
        from vmmpool._backends.host import HostBackend

        monkeypatch.setattr(HostBackend, "device_memory_is_host_ram", False)
    return str(request.param)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
@pytest.mark.parametrize("backup", [True, False], ids=["backup", "no-backup"])
@pytest.mark.parametrize("op", ["sleep", "wake"])
def test_fuzzed_faults_in_buffer_sleep_and_wake_lose_no_byte_and_leak_nothing(
    pieces: str, pattern: str, pooled: bool, backup: bool, op: str
) -> None:
    fired = _sweep(pooled, op == "sleep", backup, pattern)
    assert fired >= 2


# ------------------------------------------------- each failure the sweep found, alone
def _inject(dev: vmmpool.Device, *faults: tuple[str, int]) -> None:
    for op, nth in faults:
        dev._backend.inject_fault(op, nth=nth, name="CUDA_ERROR_INVALID_VALUE")


def _finish(dev: vmmpool.Device, buf: GrowableBuffer, data: bytes, pool: PagePool | None = None) -> None:
    """No fault armed: usable, wakes with every byte, sleeps again, and close() leaks nothing."""
    dev._backend.clear_faults()
    assert buf._state.unusable is None, buf._state.unusable
    buf.wake()
    assert bytes(buf.read()) == data
    _held(dev, buf, pool)
    buf.sleep()
    buf.wake()
    assert bytes(buf.read()) == data
    buf.close()
    if pool is not None:
        pool.close()
    gc.collect()
    assert dev.counters().live == (0, 0, 0)
    assert dev._backend.live_events() == 0 and dev._backend.live_host_allocations() == 0


def test_a_sleep_whose_wake_back_fails_stays_asleep_with_its_backup(monkeypatch: pytest.MonkeyPatch) -> None:
    """By pieces (host RAM): the second piece's copy fails, and mapping new pages for the piece
    already given back fails too. The buffer became unusable and dropped the backup (the
    first piece's bytes were lost). Now it stays asleep with its backup and wake() restores."""
    monkeypatch.setattr(buffer_module, "SLEEP_PIECE", 1)
    dev, buf, _pool, data = _world(False, asleep=False, backup=True)
    # each 2 MiB piece is copied in two halves: the third copy is the second piece's
    _inject(dev, ("copy_dtoh_async", 3), ("create", 1))
    with pytest.raises(vmmpool.DriverError):
        buf.sleep()
    assert buf.asleep
    _finish(dev, buf, data)


@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_a_sleep_whose_give_back_and_its_undo_fail_loses_nothing(pooled: bool) -> None:
    """One piece: giving the pages back fails (a release; with a pool, the pool's release after
    the unmap: here the map back), and so does its undo (retain; map). The buffer became
    unusable. Now what stays mapped is read from the reservation, and the buffer is woken
    back from the backup: awake, every byte there."""
    dev, buf, pool, data = _world(pooled, asleep=False, backup=True)
    if pool is None:
        _inject(dev, ("release", 2), ("retain", 1))
    else:
        dev._backend.inject_fault("map", nth=2, name="CUDA_ERROR_INVALID_VALUE")
        real = pool.release_pages

        def failing(pages: object) -> None:
            pool.release_pages = real  # type: ignore[method-assign]
            raise vmmpool.DriverError("CUDA_ERROR_INVALID_VALUE", "release_pages fails", operation="release")

        pool.release_pages = failing  # type: ignore[method-assign]
    with pytest.raises(vmmpool.DriverError):
        buf.sleep()
    if pool is not None:
        pool.release_pages = real  # type: ignore[method-assign]
    assert not buf.asleep and bytes(buf.read()) == data
    _finish(dev, buf, data, pool)


@pytest.mark.parametrize(
    "faults",
    [
        (("create", 2), ("release", 1)),  # a create fails; releasing the first page fails too
        (("map", 2), ("unmap", 1)),  # a map fails; unmapping the first page fails too
        (("map", 2), ("unmap", 1), ("unmap", 2)),  # ... and unmapping it alone fails too
        (("set_access", 1), ("unmap", 1), ("release", 2)),
    ],
    ids=["release", "unmap", "unmap-twice", "unmap-release"],
)
def test_a_wake_whose_undo_fails_stays_asleep_and_the_next_wake_restores(
    faults: tuple[tuple[str, int], ...],
) -> None:
    """The buffer became unusable (bytes lost) when the undo of a failed wake failed. Now a
    page that will not go back stays with the buffer (spare), a slot that will not unmap is
    unmapped by the next wake first (stale), and that wake brings every byte back."""
    dev, buf, _pool, data = _world(False, asleep=True, backup=True)
    _inject(dev, *faults)
    with pytest.raises(vmmpool.DriverError):
        buf.wake()
    assert buf.asleep
    _finish(dev, buf, data)


@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_a_failed_wake_whose_copy_back_fails_keeps_the_restored_pieces(
    pooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By pieces (host RAM), wake gives each restored piece's backup bytes back to the OS; a
    later failure copies them back first. When that copy failed too, the buffer became
    unusable: those bytes were on the device only. Now those pieces stay mapped (kept) and
    the next wake() maps the rest around them."""
    monkeypatch.setattr(buffer_module, "SLEEP_PIECE", 1)
    dev, buf, pool, data = _world(pooled, asleep=True, backup=True)
    # the second piece's first copy fails; so does the first copy back
    _inject(dev, ("copy_htod_async", 3), ("copy_dtoh_async", 1))
    with pytest.raises(vmmpool.DriverError):
        buf.wake()
    assert buf.asleep and buf._state.unusable is None
    assert set(buf._state.kept) == {0}
    assert dev.counters().mappings == 1
    _finish(dev, buf, data, pool)


def test_a_staging_event_whose_destroy_fails_is_destroyed_at_close() -> None:
    """A copy fails, and destroying the event of the copy before it fails too: the event was
    left to nobody (the device held it after close). Now the staging keeps it, and close()
    destroys it (the pool's staging is the same object)."""
    dev, buf, _pool, data = _world(False, asleep=False, backup=True)
    _inject(dev, ("copy_dtoh_async", 2), ("event_destroy", 1))
    with pytest.raises(vmmpool.DriverError):
        buf.sleep()
    assert not buf.asleep and bytes(buf.read()) == data
    assert dev._backend.live_events() == 1
    _finish(dev, buf, data)


def test_a_sleep_whose_stream_event_destroy_fails_sleeps_and_leaks_nothing() -> None:
    """sleep() waits for the buffer's stream with an event; a failing destroy of that event
    failed the sleep and leaked the event. Now the sleep goes on (the wait is what counts)
    and close() destroys the event."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    buf = GrowableBuffer(max_size=4 * P, device=dev, initial_size=P, stream=7)
    buf.write(b"stream")
    _inject(dev, ("event_destroy", 1))
    buf.sleep()
    dev._backend.clear_faults()
    buf.wake()
    assert bytes(buf.read(6)) == b"stream"
    buf.close()
    assert dev._backend.live_events() == 0 and dev.counters().live == (0, 0, 0)


# ------------------------------------------------------------ threads and fork
@pytest.mark.parametrize("pooled", [False, True], ids=["driver", "pool"])
def test_sleep_and_wake_racing_resize_read_views_and_close(pooled: bool) -> None:
    """Four threads sleep, wake, resize, read, make views and read stats at random, then one
    closes the buffer under the others: no error but AsleepError / ClosedError, the first
    bytes always read back, and nothing left on the device."""
    import random
    import threading
    import time

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = PagePool(dev, limit=24 * P) if pooled else None
    buf = GrowableBuffer(max_size=8 * P, device=None if pooled else dev, pool=pool, initial_size=P)
    buf.write(b"head")
    stop = time.monotonic() + 1.0
    errors: list[BaseException] = []
    ops: list[Callable[[random.Random], object]] = [
        lambda r: buf.sleep(backup=True),
        lambda r: buf.wake(),
        lambda r: buf.resize(r.randrange(4, 6 * P)),
        lambda r: bytes(buf.read(4)) == b"head" or errors.append(AssertionError("bytes lost")),
        lambda r: buf.sleep_stats(),
        lambda r: buf.view(),
    ]

    def worker(seed: int, closer: bool) -> None:
        r = random.Random(seed)
        while time.monotonic() < stop + (0.5 if not closer else 0):
            try:
                r.choice(ops)(r)
            except (vmmpool.AsleepError, vmmpool.ClosedError):
                pass
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return
        if closer:
            buf.close()

    threads = [threading.Thread(target=worker, args=(i, i == 0)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert buf.closed and buf.sleep_stats().n_sleeps > 0
    gc.collect()
    if pool is not None:
        pool.close()
    assert dev.counters().live == (0, 0, 0)
    assert dev._backend.live_events() == 0 and dev._backend.live_host_allocations() == 0


def test_a_forked_child_of_a_buffer_asleep_after_a_failed_sleep_touches_nothing() -> None:
    """After a sleep whose undo failed (asleep, two pages kept mapped), a forked child is
    refused every call and drops the buffer without a driver call; the parent wakes it with
    every byte and close() leaks nothing."""
    import os

    dev, buf, _pool, data = _world(False, asleep=False, backup=True)
    _inject(dev, ("release", 2), ("retain", 1), ("create", 1))
    with pytest.raises(vmmpool.DriverError):
        buf.sleep()
    dev._backend.clear_faults()
    assert buf.asleep and sorted(buf._state.kept) == [1, 2]
    live = dev.counters().live
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        for call in (buf.wake, buf.close, buf.sleep_stats, buf.sleep):
            try:
                call()
                code = 1
            except vmmpool.ForkedError:
                pass
            except BaseException:  # noqa: BLE001
                code = 2
        del buf
        gc.collect()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert dev.counters().live == live
    _finish(dev, buf, data)


def test_repr_of_a_sleeping_buffer_says_asleep_with_its_capacity() -> None:
    """repr() said "capacity 0" while asleep, where capacity is what wake maps back."""
    dev, buf, _pool, data = _world(False, asleep=True, backup=True)
    assert f"capacity {PAGES * P}," in repr(buf) and "asleep" in repr(buf)
    buf.wake()
    assert "asleep" not in repr(buf) and f"capacity {PAGES * P}," in repr(buf)
    _finish(dev, buf, data)

"""GrowableBuffer.sleep / wake under driver faults: a buffer's bytes are never lost, nothing leaks."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import vmmpool
from vmmpool import GrowableBuffer, PagePool
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

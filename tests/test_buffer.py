"""GrowableBuffer: growth in place, shrinking, moves, views and lifetime (every backend)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import vmmpool
from vmmpool._buffer import GrowableBuffer

MiB = 1 << 20


def pattern(nbytes: int, seed: int = 0) -> bytes:
    """Bytes that differ page to page and position to position."""
    return ((np.arange(nbytes, dtype=np.uint64) * 2654435761 + seed) >> 7).astype(np.uint8).tobytes()


def grow_calls(pages: int) -> dict[str, int]:
    return {"create": pages, "map": pages, "set_access": 1} if pages else {}


def shrink_calls(pages: int) -> dict[str, int]:
    return {"synchronize": 1, "release": pages, "unmap": 1} if pages else {}


# ------------------------------------------------------------------ construction
def test_defaults_reserve_total_memory_and_map_nothing(device: vmmpool.Device) -> None:
    g = device.granularity
    before = device.counters()
    with GrowableBuffer(device=device) as buf:
        calls = device.counters() - before
        assert calls == {"mem_info": 1, "reserve": 1}
        assert buf.max_size == device.round_up(device.total_memory)
        assert (buf.size, buf.capacity) == (0, 0)
        assert buf.page_size == g
        assert buf.device is device
        assert buf.pool is None
        assert buf.ptr % g == 0
        assert not buf.closed


def test_initial_size_and_rounding(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=5 * g - 1, device=device, initial_size=g + 1) as buf:
        assert buf.max_size == 5 * g  # rounded up to whole pages
        assert buf.size == g + 1
        assert buf.capacity == 2 * g


def test_growth_maps_only_new_pages_with_one_set_access(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=16 * g, device=device) as buf:
        ptr = buf.ptr
        for target, added in [(1, 1), (g, 0), (g + 1, 1), (5 * g, 3), (5 * g, 0), (16 * g, 11)]:
            before = device.counters()
            assert buf.resize(target) == ptr
            assert device.counters() - before == grow_calls(added)
            assert buf.capacity == -(-target // g) * g
        assert buf.ptr == ptr


def test_shrink_syncs_then_unmaps_trailing_pages_in_one_call(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=8 * g, device=device, initial_size=8 * g) as buf:
        before = device.counters()
        buf.resize(3 * g + 5)
        assert device.counters() - before == shrink_calls(4)
        assert (buf.size, buf.capacity) == (3 * g + 5, 4 * g)
        before = device.counters()
        buf.resize(3 * g + 1)  # same page count: no driver call
        buf.resize(0)
        assert device.counters() - before == shrink_calls(4)
        assert buf.capacity == 0


def test_bytes_survive_growth_and_shrink(device: vmmpool.Device) -> None:
    g = device.granularity
    data = pattern(3 * g + 100)
    with GrowableBuffer(max_size=10 * g, device=device) as buf:
        buf.resize(len(data))
        buf.write(data)
        buf.resize(9 * g)
        assert bytes(buf.read(len(data))) == data
        buf.resize(g + 7)
        assert bytes(buf.read()) == data[: g + 7]
        buf.resize(4 * g)
        assert bytes(buf.read(g + 7)) == data[: g + 7]


def test_reserve_and_shrink_to_fit(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=8 * g, device=device) as buf:
        before = device.counters()
        ptr = buf.reserve(5 * g)
        assert device.counters() - before == grow_calls(5)
        assert (ptr, buf.size, buf.capacity) == (buf.ptr, 0, 5 * g)
        before = device.counters()
        buf.resize(g)  # reserve() keeps capacity: no unmap
        buf.resize(3 * g)
        buf.reserve(2 * g)  # never lowers
        assert device.counters() - before == {}
        assert buf.capacity == 5 * g
        buf.resize(6 * g)
        assert buf.capacity == 6 * g
        buf.resize(g)
        assert buf.capacity == 5 * g  # back to the reserved floor, not below
        before = device.counters()
        buf.shrink_to_fit()
        assert device.counters() - before == shrink_calls(4)
        assert (buf.size, buf.capacity) == (g, g)
        buf.resize(0)  # the floor is gone
        assert buf.capacity == 0


def test_zero_size_buffer(device: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=1, device=device) as buf:
        assert buf.max_size == device.granularity
        assert buf.resize(0) == buf.ptr
        buf.shrink_to_fit()
        assert bytes(buf.read()) == b""
        v = buf.view("float32")
        assert v.shape == (0,)


# ----------------------------------------------------------------------- moving
def test_beyond_max_size_without_allow_move_raises_before_any_call(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=2 * g, device=device, initial_size=g) as buf:
        before = device.counters()
        with pytest.raises(ValueError, match=f"size {2 * g + 1} bytes exceeds max_size {2 * g}"):
            buf.resize(2 * g + 1)
        with pytest.raises(ValueError, match="allow_move=True"):
            buf.reserve(3 * g)
        assert device.counters() - before == {}
        assert (buf.size, buf.capacity) == (g, g)


def test_a_move_beyond_what_the_device_addresses_raises_before_any_call(device: vmmpool.Device) -> None:
    """An impossible move target is a ValueError up front: no page is created first (without
    a pool that meant creating pages until the device ran out of memory)."""
    g = device.granularity
    most = device.address_limit // g * g  # the largest whole-page range
    with GrowableBuffer(max_size=g, device=device, initial_size=g) as buf:
        buf.write(b"kept")
        before = device.counters()
        for n in (most + 1, (1 << 64) - 1):
            with pytest.raises(ValueError, match=r"needs .* bytes of address space, but the device"):
                buf.resize(n, allow_move=True)
            with pytest.raises(ValueError, match=r"needs .* bytes of address space, but the device"):
                buf.reserve(n, allow_move=True)
        assert device.counters() - before == {}
        assert (buf.size, buf.capacity, buf.max_size) == (g, g, g)
        assert bytes(buf.read(4)) == b"kept"


def test_sleep_is_refused_once_the_pool_is_closed(host: vmmpool.Device) -> None:
    """A closed pool can never hand pages back to wake(): the backup would be unreachable."""
    g = host.granularity
    pool = vmmpool.PagePool(host, limit=4 * g)
    with GrowableBuffer(max_size=2 * g, pool=pool, initial_size=g) as buf:
        buf.write(b"precious")
        pool.close()
        with pytest.raises(vmmpool.ClosedError, match="PagePool has been closed"):
            buf.sleep()
        assert not buf.asleep
        assert bytes(buf.read(8)) == b"precious"
    assert host.counters().live == (0, 0, 0)


@pytest.mark.parametrize("peers", [None, 5, "ab", b"\x00"])
def test_peers_that_are_not_an_iterable_of_ints_are_named(host: vmmpool.Device, peers: object) -> None:
    with pytest.raises(TypeError, match="peers must be an iterable of device ordinals"):
        GrowableBuffer(max_size=1, device=host, peers=peers)  # type: ignore[arg-type]
    with vmmpool.PagePool(host, limit=host.granularity) as pool:
        with pytest.raises(TypeError, match="peers must be an iterable of device ordinals"):
            GrowableBuffer(max_size=1, pool=pool, peers=peers)  # type: ignore[arg-type]
    assert host.counters().live == (0, 0, 0)


def test_move_after_many_growth_steps_keeps_every_byte(device: vmmpool.Device) -> None:
    """cuda.core 1.2.2 remapped only the first chunk: every page must follow."""
    g = device.granularity
    with GrowableBuffer(max_size=6 * g, device=device) as buf:
        ptr0 = buf.ptr
        for k in range(1, 7):  # six growth steps, one page each, each written
            buf.resize(k * g)
            buf.write(pattern(g, seed=k), offset=(k - 1) * g)
        expected = b"".join(pattern(g, seed=k) for k in range(1, 7))
        before = device.counters()
        ptr1 = buf.resize(9 * g, allow_move=True)
        calls = device.counters() - before
        assert ptr1 != ptr0 and buf.ptr == ptr1
        assert buf.max_size == 12 * g  # at least twice the old range
        assert (buf.size, buf.capacity) == (9 * g, 9 * g)
        assert calls == {
            "create": 3,
            "reserve": 1,
            "map": 9,
            "set_access": 1,
            "synchronize": 1,
            "unmap": 1,
            "free_address": 1,
        }
        assert bytes(buf.read(6 * g)) == expected
        # and again: a second move after more growth
        buf.write(pattern(3 * g, seed=99), offset=6 * g)
        ptr2 = buf.resize(13 * g, allow_move=True)
        assert ptr2 not in (ptr0, ptr1)
        assert bytes(buf.read(9 * g)) == expected + pattern(3 * g, seed=99)
        # growth within the new range does not move
        assert buf.resize(buf.max_size) == ptr2


def test_move_from_empty_buffer(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=g, device=device) as buf:
        buf.resize(3 * g, allow_move=True)
        assert (buf.size, buf.capacity, buf.max_size) == (3 * g, 3 * g, 3 * g)


def test_reserve_with_allow_move(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=g, device=device, initial_size=10) as buf:
        buf.write(b"0123456789")
        p = buf.reserve(4 * g, allow_move=True)
        assert (p, buf.size, buf.capacity) == (buf.ptr, 10, 4 * g)
        assert bytes(buf.read()) == b"0123456789"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("value", "exc"),
    [(-1, ValueError), (1.5, TypeError), ("1", TypeError), (True, TypeError), (None, TypeError)],
)
def test_bad_sizes_raise_before_any_driver_call(host: vmmpool.Device, value: object, exc: type) -> None:
    with GrowableBuffer(max_size=4 * MiB, device=host) as buf:
        before = host.counters()
        for method in (buf.resize, buf.reserve):
            with pytest.raises(exc, match="nbytes must be"):
                method(value)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="allow_move must be a bool"):
            buf.resize(1, allow_move=1)  # type: ignore[arg-type]
        assert host.counters() - before == {}


def test_bad_constructor_arguments(host: vmmpool.Device) -> None:
    before = host.counters()
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        GrowableBuffer(max_size=0, device=host)
    with pytest.raises(TypeError, match="max_size must be an int"):
        GrowableBuffer(max_size=2.0, device=host)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"initial_size must be <= max_size \(2097152 bytes\), got 2097153"):
        GrowableBuffer(max_size=2 * MiB, device=host, initial_size=2 * MiB + 1)
    with pytest.raises(ValueError, match="initial_size must be >= 0"):
        GrowableBuffer(max_size=2 * MiB, device=host, initial_size=-1)
    with pytest.raises(ValueError, match="host device has no peers"):
        GrowableBuffer(max_size=2 * MiB, device=host, peers=[1])
    with pytest.raises(ValueError, match=r"stream handle must be >= 0.*, got -3"):
        GrowableBuffer(max_size=2 * MiB, device=host, stream=-3)
    assert host.counters() - before == {}


def test_initial_size_out_of_memory_leaves_nothing(host: vmmpool.Device) -> None:
    before = host.counters()
    with pytest.raises(vmmpool.OutOfMemoryError):
        GrowableBuffer(max_size=128 * MiB, device=host, initial_size=65 * MiB)  # capacity is 64 MiB
    assert host.counters().live == before.live


def test_out_of_memory_during_growth_keeps_buffer(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=128 * MiB, device=host, initial_size=10 * MiB) as buf:
        buf.write(pattern(10 * MiB))
        live = host.counters().live
        with pytest.raises(vmmpool.OutOfMemoryError):
            buf.resize(100 * MiB)  # page 28 of 45 fails
        assert (buf.size, buf.capacity) == (10 * MiB, 10 * MiB)
        assert host.counters().live == live
        assert bytes(buf.read()) == pattern(10 * MiB)


# ------------------------------------------------------------------ lifetime
def test_close_is_idempotent_and_use_after_close_raises(device: vmmpool.Device) -> None:
    buf = GrowableBuffer(max_size=4 * device.granularity, device=device, initial_size=1)
    buf.close()
    buf.close()
    assert buf.closed
    assert "closed" in repr(buf)
    for call in (
        lambda: buf.resize(1),
        lambda: buf.reserve(1),
        buf.shrink_to_fit,
        lambda: buf.view("uint8"),
        buf.read,
        lambda: buf.write(b"x"),
        lambda: buf.ptr,
        lambda: buf.size,
        lambda: buf.capacity,
        lambda: buf.max_size,
        buf.__enter__,
    ):
        with pytest.raises(vmmpool.ClosedError, match="GrowableBuffer has been closed"):
            call()


def test_context_manager_does_not_hide_the_callers_exception(device: vmmpool.Device) -> None:
    with pytest.raises(KeyError, match="mine"):
        with GrowableBuffer(max_size=device.granularity, device=device, initial_size=1) as buf:
            raise KeyError("mine")
    assert buf.closed


def test_dropped_buffer_gives_memory_back(device: vmmpool.Device) -> None:
    live = device.counters().live
    buf = GrowableBuffer(max_size=4 * device.granularity, device=device, initial_size=3 * device.granularity)
    assert device.counters().live != live
    del buf
    gc.collect()
    assert device.counters().live == live


def test_read_write_bounds(device: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=device.granularity, device=device, initial_size=10) as buf:
        with pytest.raises(ValueError, match=r"bytes \[8, 12\) must lie inside the size 10"):
            buf.write(b"abcd", offset=8)
        with pytest.raises(ValueError, match="must lie inside"):
            buf.read(11)
        buf.write(b"abcd", offset=6)
        assert bytes(buf.read(4, offset=6)) == b"abcd"


def test_stream_is_synchronized_before_unmap(host: vmmpool.Device) -> None:
    seen: list[int | None] = []
    backend = host._backend
    real = backend.synchronize

    def spy(stream: int | None = None) -> None:
        seen.append(stream)
        real(stream)

    backend.synchronize = spy  # type: ignore[method-assign]
    try:
        with GrowableBuffer(max_size=4 * MiB, device=host, stream=7, initial_size=4 * MiB) as buf:
            buf.resize(0)
        assert seen == [7, 7]  # the shrink, then close()
    finally:
        del backend.synchronize


def test_per_thread_stream_is_waited_for_on_the_legacy_stream_before_unmap(host: vmmpool.Device) -> None:
    # Handle 2 is each thread's own stream: synchronizing it from the thread that shrinks or
    # closes waited for that thread's work only, not for the work another thread queued on
    # its per-thread stream (rule 8). An event on the legacy stream (1) waits for every one's.
    synced: list[int | None] = []
    recorded: list[int] = []
    backend = host._backend
    real_sync, real_record = backend.synchronize, backend.event_record

    def sync(stream: int | None = None) -> None:
        synced.append(stream)
        real_sync(stream)

    def record(stream: int) -> int:
        recorded.append(stream)
        return real_record(stream)

    backend.synchronize = sync  # type: ignore[method-assign]
    backend.event_record = record  # type: ignore[method-assign]
    try:
        buf = GrowableBuffer(max_size=4 * MiB, device=host, stream=2, initial_size=4 * MiB)
        t = threading.Thread(target=lambda: (buf.resize(0), buf.close()))
        t.start()
        t.join()
        assert buf.closed
        assert synced == [] and recorded == [1, 1], (synced, recorded)  # the shrink, then close()
    finally:
        del backend.synchronize, backend.event_record


def test_concurrent_resizes_are_serialized(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=32 * MiB, device=host) as buf:
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for n in rng.integers(0, 32 * MiB, 60):
                    buf.resize(int(n))
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert buf.capacity == -(-buf.size // (2 * MiB)) * 2 * MiB


# ----------------------------------------------------------------------- views
def test_shrink_under_a_live_view_is_refused(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=8 * g, device=device, initial_size=4 * g) as buf:
        v = buf.view("uint8", shape=g + 1, offset=g)  # bytes [g, 2g + 1)
        before = device.counters()
        with pytest.raises(BufferError, match=f"uses bytes up to {2 * g + 1}"):
            buf.resize(2 * g)
        assert device.counters() - before == {}
        buf.resize(2 * g + 1)  # keeps the view's pages mapped: allowed
        assert buf.capacity == 3 * g
        del v
        gc.collect()
        buf.resize(0)
        assert buf.capacity == 0


def test_size_may_drop_below_a_view_while_pages_stay_mapped(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=8 * g, device=device) as buf:
        buf.reserve(4 * g)
        buf.resize(4 * g)
        v = buf.view("float64")
        buf.resize(0)  # the floor keeps all four pages mapped
        assert buf.capacity == 4 * g
        with pytest.raises(BufferError):
            buf.shrink_to_fit()
        del v


def test_move_with_a_live_view_is_refused(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=g, device=device, initial_size=g) as buf:
        v = buf.view("uint8", shape=0)
        before = device.counters()
        with pytest.raises(BufferError, match=r"cannot move the buffer while 1 view\(s\)"):
            buf.resize(2 * g, allow_move=True)
        assert device.counters() - before == {}
        buf.resize(g)  # growing in place is fine
        del v
        gc.collect()
        buf.resize(2 * g, allow_move=True)


def test_close_with_live_views_defers_until_the_last_goes(device: vmmpool.Device) -> None:
    live = device.counters().live
    buf = GrowableBuffer(max_size=2 * device.granularity, device=device, initial_size=64)
    buf.write(pattern(64))
    v = buf.view("uint8")
    buf.close()
    assert buf.closed
    with pytest.raises(vmmpool.ClosedError):
        buf.resize(0)
    with pytest.raises(BufferError, match="GrowableBuffer has been closed"):
        v.__dlpack__()
    assert device.counters().live != live  # the memory is still mapped for the view
    del v  # buf is still referenced here: the last view going is what frees it
    assert device.counters().live == live
    buf.close()


def test_view_validation(device: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=device.granularity, device=device, initial_size=64) as buf:
        with pytest.raises(ValueError, match="offset must be a multiple of the item size 4"):
            buf.view("float32", offset=2)
        too_big = r"shape \(17,\) of float32 needs 68 bytes from offset 0, but only 64"
        with pytest.raises(ValueError, match=too_big):
            buf.view("float32", shape=17)
        with pytest.raises(ValueError, match="offset must be <= 64"):
            buf.view("uint8", offset=65)
        with pytest.raises(ValueError, match="dtype must be one of"):
            buf.view("U4")
        with pytest.raises(TypeError, match="shape must be an int or a sequence"):
            buf.view("uint8", shape="4")  # type: ignore[arg-type]
        v = buf.view("int16", shape=(2, 3), offset=4)
        assert (v.shape, v.strides, v.ptr, v.nbytes, v.end) == ((2, 3), (6, 2), buf.ptr + 4, 12, 16)


def test_repr(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=4 * MiB, device=host, initial_size=5) as buf:
        assert repr(buf) == (
            f"<GrowableBuffer 5 bytes, capacity {2 * MiB}, max_size {4 * MiB} at {buf.ptr:#x} on host>"
        )


def test_default_device_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = vmmpool.Device.emulated(capacity=8 * MiB)
    monkeypatch.setattr("vmmpool._device._default", dev)
    with GrowableBuffer(max_size=MiB) as buf:
        assert buf.device is dev


# ------------------------------------------------- close() from a finalizer mid-operation
class _ClosesOnCollect:
    """Garbage in a reference cycle whose ``__del__`` closes a buffer (a user's finalizer)."""

    def __init__(self, buf: GrowableBuffer, seen: list[str]) -> None:
        self.buf = buf
        self.seen = seen
        self.me = self

    def __del__(self) -> None:
        try:
            self.buf.close()
            self.seen.append("closed")
        except Exception as err:  # noqa: BLE001 - recorded for the test
            self.seen.append(repr(err))


def _collect_at(monkeypatch: pytest.MonkeyPatch, name: str, buf: GrowableBuffer) -> list[str]:
    """Make the garbage collector run (and close `buf`) when the buffer calls `name`."""
    import vmmpool._buffer as mod

    real = getattr(mod, name)
    seen: list[str] = []
    armed = [True]

    def hooked(*args: object, **kwargs: object) -> object:
        if armed[0]:
            armed[0] = False
            _ClosesOnCollect(buf, seen)
            gc.collect()
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, hooked)
    return seen


@pytest.mark.parametrize("op", ["grow", "sleep"])
def test_close_from_a_finalizer_inside_an_operation_waits_for_it(
    device: vmmpool.Device, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    # The collector runs a __del__ that closes the buffer between two steps of the same
    # thread's resize (or sleep), outside any backend call. The re-entrant lock let
    # close() free the memory under the operation: the resize then failed with
    # "AddressReservation has been closed" and the sleep copied from unmapped pages
    # (DriverError) or completed on a closed buffer, keeping its backup.
    g = device.granularity
    buf = GrowableBuffer(max_size=8 * g, device=device, initial_size=g)
    buf.write(b"\x5a" * g)
    seen = _collect_at(monkeypatch, "create" if op == "grow" else "host_array", buf)
    if op == "grow":
        buf.resize(3 * g)  # completes
    else:
        buf.sleep()  # completes
    assert seen == ["closed"]
    assert buf.closed
    gc.collect()
    assert device.counters().live == (0, 0, 0)  # freed once the operation ended
    with pytest.raises(vmmpool.ClosedError):
        buf.resize(0)

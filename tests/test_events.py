"""Stream-ordered events on every backend; the host emulator can hold a stream's work pending."""

from __future__ import annotations

import pytest

import vmmpool


def test_event_record_query_wait_destroy(device: vmmpool.Device) -> None:
    b = device._backend
    live = b.live_events()
    ev = b.event_record(0)
    assert b.live_events() == live + 1
    b.event_wait(ev)
    assert b.event_query(ev) is True
    b.event_destroy(ev)
    assert b.live_events() == live
    calls = device.counters().calls
    assert all(calls.get(op, 0) >= 1 for op in ("event_record", "event_query", "event_wait", "event_destroy"))


def test_host_stream_held_pending_until_released() -> None:
    dev = vmmpool.Device.emulated(capacity=16 << 20)
    b = dev._backend
    before = b.event_record(7)
    b.hold_stream(7)
    pending = b.event_record(7)
    other = b.event_record(8)
    assert b.event_query(before) and b.event_query(other)
    assert not b.event_query(pending), "work recorded while the stream is held is pending"
    b.release_stream(7)
    assert b.event_query(pending)
    with b.holding(9):
        ev = b.event_record(9)
        assert not b.event_query(ev)
        b.event_wait(ev)  # a wait models the GPU finishing the work
        assert b.event_query(ev)
    for e in (before, pending, other, ev):
        b.event_destroy(e)
    assert b.live_events() == 0
    # A destroyed event is a stale handle: the driver's name for it, as the CUDA backend's.
    for op in (b.event_query, b.event_wait, b.event_destroy):
        with pytest.raises(vmmpool.DriverError) as info:
            op(ev)
        assert info.value.name == "CUDA_ERROR_INVALID_HANDLE"


def test_event_faults_can_be_injected() -> None:
    dev = vmmpool.Device.emulated(capacity=16 << 20)
    b = dev._backend
    b.inject_fault("event_record", name="CUDA_ERROR_INVALID_HANDLE")
    with pytest.raises(vmmpool.DriverError):
        b.event_record(0)
    assert b.live_events() == 0

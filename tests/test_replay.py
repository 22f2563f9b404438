"""Trace replay: readers, replay against a model of live bytes, min-limit search, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vmmpool
from vmmpool import replay as R
from vmmpool.__main__ import main
from vmmpool.replay._engine import run_replay

MiB = 1 << 20
P = 2 * MiB
BASE = 0x7F00_0000_0000


# ----------------------------------------------------------- trace builders
def ev(action: str, addr: int, size: int, stream: int = 0) -> dict[str, Any]:
    return {"action": action, "addr": addr, "size": size, "stream": stream, "frames": []}


def snapshot(events: list[dict[str, Any]], segments: list[dict[str, Any]] | None = None) -> dict:
    return {"segments": segments or [], "device_traces": [events]}


def segment(addr: int, total: int, blocks: list[tuple[int, int, int, str]], stream: int = 0) -> dict:
    return {
        "device": 0, "address": addr, "total_size": total, "stream": stream,
        "segment_type": "large", "segment_pool_id": (0, 0), "frames": [],
        "blocks": [
            {"address": a, "size": s, "requested_size": r, "state": st, "frames": []}
            for a, s, r, st in blocks
        ],
    }


def write_pickle(tmp_path: Path, data: object, name: str = "t.pickle") -> Path:
    p = tmp_path / name
    p.write_bytes(pickle.dumps(data))
    return p


def small_snapshot() -> dict:
    """A prelude block W (live throughout), a prelude block E freed in the trace,
    and traced allocations on two streams; segments grow and shrink."""
    seg0 = BASE
    W, E = seg0, seg0 + 8 * MiB
    seg1 = BASE + (1 << 30)
    a, b, c = seg1, seg1 + 4 * MiB, seg1 + 8 * MiB
    events = [
        ev("segment_alloc", seg1, 20 * MiB, 5),
        ev("alloc", a, 3 * MiB + 1, 5),
        ev("alloc", b, 1000, 7),
        ev("free_requested", E, 6 * MiB),       # E: live before recording started
        ev("free_completed", E, 6 * MiB),
        ev("alloc", c, 5 * MiB, 5),
        ev("free_requested", a, 3 * MiB + 1, 5),
        ev("free_completed", a, 3 * MiB + 1, 5),
        ev("free_requested", c, 5 * MiB, 5),
        ev("segment_free", seg1, 20 * MiB, 5),
    ]
    segs = [segment(seg0, 20 * MiB, [(W, 8 * MiB, 8 * MiB - 100, "active_allocated"),
                                      (E, 12 * MiB, 12 * MiB, "inactive")])]
    # b stays live: it is active at the end, but the trace allocated it.
    segs.append(segment(BASE + (2 << 30), 2 * MiB,
                        [(b, 1024, 1000, "active_allocated")], stream=7))
    return snapshot(events, segs)


# ------------------------------------------------------------------ readers
def test_snapshot_round_trip(tmp_path: Path) -> None:
    p = write_pickle(tmp_path, small_snapshot())
    tr = R.load(p)
    assert tr.name == "t.pickle" and tr.source == "pytorch-snapshot"
    # Prelude: E (freed early, size from its free event) and W; b is the trace's.
    assert tr.n_prelude == 2
    assert tr.events[:2] == ((False, 0, 8 * MiB - 100, 0), (False, 1, 6 * MiB, 0))
    kinds = [(f, n) for f, _s, n, _st in tr.events[2:]]
    assert kinds == [
        (False, 3 * MiB + 1), (False, 1000), (True, 6 * MiB), (False, 5 * MiB),
        (True, 3 * MiB + 1), (True, 5 * MiB),
    ]
    assert len(tr.events) == 8 and tr.n_slots == 5
    assert set(tr.streams) == {0, 5, 7}
    prelude = 8 * MiB - 100 + 6 * MiB
    assert tr.peak_live == prelude + 3 * MiB + 1 + 1000
    assert tr.final_live == 8 * MiB - 100 + 1000
    # Reserved: 22 MiB of final segments, +20 -20 in the trace -> started at 22.
    assert tr.recorded_peak_reserved == 42 * MiB
    # Allocated, 512-rounded, prelude at block size: 8 + 6 + (3 MiB + 512) + 1024.
    assert tr.recorded_peak_allocated == 14 * MiB + 3 * MiB + 512 + 1024


def test_a_pytorch_2_0_snapshot_places_blocks_by_size_and_reads_requests_from_history(
    tmp_path: Path,
) -> None:
    # PyTorch 2.0 wrote blocks with only size and state (plus a history, newest entry first,
    # with each allocation's real_size): no address, no requested_size. A block starts where
    # the one before it in its segment ends, as in PyTorch's own memory viewer.
    seg0, seg1 = BASE, BASE + (1 << 30)
    legacy = {"device": 0, "address": seg0, "total_size": 20 * MiB, "stream": 0,
              "segment_type": "large", "blocks": [
                  {"size": 4 * MiB, "state": "active_allocated",
                   "history": [{"addr": seg0, "real_size": 3 * MiB, "frames": []},
                               {"addr": seg0, "real_size": 4 * MiB - 7, "frames": []}]},
                  {"size": 6 * MiB, "state": "inactive"},
                  {"size": 2 * MiB, "state": "active_allocated"},  # no history: its size
                  {"size": 8 * MiB, "state": "active_pending_free"}]}
    # A newer segment alongside (addresses given) keeps its own.
    newer = segment(seg1, 2 * MiB, [(seg1 + MiB, MiB, 1000, "active_allocated")])
    events = [ev("alloc", seg0 + 4 * MiB, 5 * MiB), ev("free_requested", seg0 + 10 * MiB, 2 * MiB)]
    tr = R.load(write_pickle(tmp_path, snapshot(events, [legacy, newer])))
    assert tr.n_prelude == 3
    assert [n for _f, _s, n, _st in tr.events[:3]] == [3 * MiB, 2 * MiB, 1000]  # address order
    assert [(f, n) for f, _s, n, _st in tr.events[3:]] == [(False, 5 * MiB), (True, 2 * MiB)]
    assert tr.events[4][1] == 1  # the free is of the block at seg0 + 10 MiB: the 2nd prelude slot
    assert tr.peak_live == 3 * MiB + 2 * MiB + 1000 + 5 * MiB
    assert R.replay(tr).completed


def test_without_events_the_default_device_is_the_first_with_segments(tmp_path: Path) -> None:
    # A snapshot taken without recording history, in a process that used only cuda:1: its
    # live blocks are the whole trace (device 0 has nothing).
    seg = segment(BASE, 40 * MiB, [(BASE, 30 * MiB, 30 * MiB - 5, "active_allocated"),
                                   (BASE + 30 * MiB, 10 * MiB, 10 * MiB, "inactive")])
    seg["device"] = 1
    p = write_pickle(tmp_path, {"segments": [seg], "device_traces": [[], []]})
    tr = R.load(p)
    assert (tr.device, tr.n_prelude, tr.peak_live) == (1, 1, 30 * MiB - 5)
    assert tr.recorded_peak_reserved == 40 * MiB
    with pytest.raises(R.TraceError, match="device 0 has no events and no segments"):
        R.load(p, 0)  # asked for: nothing there is an error, not an empty row


def test_without_events_each_device_with_live_blocks_is_a_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Device 0 holds only cached memory, devices 1 and 3 live blocks: the default is device 1
    # (not 0, an empty row), and the command line gives devices 1 and 3 a row each.
    def seg(device: int, addr: int, blocks: list[tuple[int, int, int, str]]) -> dict[str, Any]:
        d = segment(addr, 8 * MiB, blocks)
        d["device"] = device
        return d

    segs = [seg(0, BASE, [(BASE, 8 * MiB, 8 * MiB, "inactive")]),
            seg(3, BASE + (2 << 30), [(BASE + (2 << 30), MiB, 1000, "active_allocated")]),
            seg(1, BASE + (1 << 30), [(BASE + (1 << 30), 6 * MiB, 5 * MiB, "active_allocated")])]
    p = write_pickle(tmp_path, {"segments": segs, "device_traces": [[], [], [], []]}, "nh.pickle")
    tr = R.load(p)
    assert (tr.device, tr.peak_live) == (1, 5 * MiB)
    assert main(["replay", str(p)]) == 0
    out = capsys.readouterr().out
    assert "nh.pickle [device 1]" in out and "nh.pickle [device 3]" in out
    assert "[device 0]" not in out


def test_free_of_a_block_allocated_before_recording_is_a_prelude_block(tmp_path: Path) -> None:
    # Its alloc was not recorded (recording started later, or max_entries dropped it): the
    # free's size says what was live at the start.
    data = snapshot([ev("alloc", BASE, 4096), ev("free_requested", BASE + 8192, 1000)])
    tr = R.load(write_pickle(tmp_path, data))
    assert tr.n_prelude == 1 and tr.peak_live == 5096
    assert R.replay(tr).completed


def test_a_second_free_names_file_and_event(tmp_path: Path) -> None:
    data = snapshot([ev("free_requested", BASE + 8192, 1000), ev("free_requested", BASE + 8192, 1000)])
    p = write_pickle(tmp_path, data, "bad.pickle")
    with pytest.raises(R.TraceError, match=r"bad\.pickle: event 1: free_requested of 0x7f0000002000, which"):
        R.load(p)


def test_a_pools_own_dump_snapshot_replays(tmp_path: Path) -> None:
    dev = vmmpool.Device.emulated(capacity=1 << 30)
    with vmmpool.PagePool(dev) as pool:
        a = pool.malloc(3 << 20)
        keep = pool.malloc(1000)
        pool.record_history(True)
        a.free()
        b = pool.malloc(5 << 20)
        pool.trim()
        path = tmp_path / "pool.pickle"
        pool.dump_snapshot(path)
        tr = R.load(path)
        # a (allocated before recording) is a prelude block; b and keep are live at the end
        assert tr.n_prelude == 2 and tr.n_slots == 3
        assert tr.final_live == (5 << 20) + 1000
        assert R.replay(tr).completed
        b.free()
        keep.free()


def test_double_alloc_is_an_error(tmp_path: Path) -> None:
    data = snapshot([ev("alloc", BASE, 4096), ev("alloc", BASE, 4096)])
    with pytest.raises(R.TraceError, match=r"event 1: alloc at 0x7f0000000000, which is already live"):
        R.load(write_pickle(tmp_path, data))


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, ("/tmp/vmmpool-replay-should-not-exist",))


@pytest.mark.parametrize(
    "obj, cls",
    [
        ({"segments": [], "device_traces": [[Evil()]]}, "posix.mkdir"),
        ({"segments": [], "device_traces": [], "x": Evil}, "test_replay.Evil"),
    ],
)
def test_pickle_referencing_a_class_is_refused(tmp_path: Path, obj: object, cls: str) -> None:
    p = write_pickle(tmp_path, obj, "evil.pickle")
    with pytest.raises(R.TraceError) as info:
        R.load(p)
    msg = str(info.value)
    assert msg.startswith("evil.pickle: refused at byte ")
    assert cls.split(".")[-1] in msg and "class" in msg
    assert not Path("/tmp/vmmpool-replay-should-not-exist").exists()


def test_truncated_pickle(tmp_path: Path) -> None:
    raw = pickle.dumps(small_snapshot())
    p = tmp_path / "cut.pickle"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(R.TraceError, match=r"^cut\.pickle: truncated pickle, stopped near byte \d+ of "
                       + str(len(raw) // 2)):
        R.load(p)


def test_corrupt_pickle_names_position(tmp_path: Path) -> None:
    raw = bytearray(pickle.dumps(small_snapshot()))
    raw[40:48] = b"\xff" * 8  # not an opcode
    p = tmp_path / "junk.pickle"
    p.write_bytes(bytes(raw))
    with pytest.raises(R.TraceError, match=r"^junk\.pickle: malformed pickle, stopped near byte \d+"):
        R.load(p)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ([1, 2], r"not a PyTorch memory snapshot: expected a dict with keys"),
        ({"segments": []}, r"not a PyTorch memory snapshot"),
        (snapshot([ev("alloc", BASE, 4096), {"action": "alloc", "addr": BASE + 4096}]),
         r"event 1: alloc event without 'size'"),
        (snapshot([ev("alloc", BASE, 4096), ev("alloc", BASE + 8192, -5)]),
         r"event 1: size must be an int in \[0, 2\*\*64\), got -5"),
        (snapshot([ev("alloc", BASE, 4096), "junk"]), r"event 1: expected a dict, got str"),
        (snapshot([], [{"address": 1}]), r"segment 0: malformed segment"),
    ],
)
def test_malformed_snapshot(tmp_path: Path, data: object, pattern: str) -> None:
    p = write_pickle(tmp_path, data, "m.pickle")
    with pytest.raises(R.TraceError, match=r"^m\.pickle: " + pattern):
        R.load(p)


CSV = """Thread,Time,Action,Pointer,Size,Stream
1,00:00:01.0,allocate,0x7f0000000000,4194304,0x0
1,00:00:01.1,allocate,0x7f0000400000,1000,0x55
1,00:00:01.2,allocate failure,0x0,99999999999,0x0
1,00:00:01.3,free,0x7f0000000000,4194304,0x0
1,00:00:01.4,allocate,0x7f0000000000,3000000,0x55
1,00:00:01.5,free,0x7f0000400000,1000,0x55
"""


def test_csv_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_text(CSV)
    tr = R.load(p)
    assert tr.source == "rmm-csv" and tr.n_prelude == 0 and tr.n_failed == 1
    assert tr.events == (
        (False, 0, 4194304, 0), (False, 1, 1000, 0x55), (True, 0, 4194304, 0),
        (False, 2, 3000000, 0x55), (True, 1, 1000, 0x55),
    )
    assert tr.streams == (0, 0x55)
    assert tr.peak_live == 4194304 + 1000
    assert tr.recorded_peak_reserved is None
    r = R.replay(tr, vmmpool.Device.emulated(64 * MiB))
    assert r.completed and r.events == 5 and r.peak_live == tr.peak_live and r.streams == 2


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("Thread,Time,Size\n", r"line 1: expected the header Thread,Time,Action,Pointer,Size,Stream"),
        ("", r"line 1: expected the header .* got an empty file"),
        (CSV + "1,00:00:02,allocate,0x7f00\n" + CSV.splitlines()[1] + "\n",
         r"line 8: expected 6 fields, got 4 \(truncated\?\)"),
        (CSV + "1,2,allocate,zz,12,0x0\n", r"line 8: expected a pointer, a size and a stream"),
        (CSV + "1,2,free,0x7f0000400000,1000,0x55\n", r"line 8: free of 0x7f0000400000, which is "
         r"not live \(freed twice\)"),
        (CSV + "1,2,resize,0x1234,12,0x0\n", r"line 8: unknown action 'resize'"),
        # a stray quote swallows the rest of a file without a final newline: an error at the
        # line it starts on, not the last line dropped as cut short
        (CSV + '1,"2,allocate,0x1,1,0x0\n' + CSV.splitlines()[1],
         r"line 8: malformed CSV \(unexpected end of data, to line 9\)"),
        # the first error in the file is the one reported
        (CSV + "1,2,allocate,0x7f0000000000,5,0x0\n1,2,resize,0x1,1,0x0\n",
         r"line 8: allocation at 0x7f0000000000, which is already live"),
    ],
)
def test_malformed_csv(tmp_path: Path, text: str, pattern: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(R.TraceError, match=r"^bad\.csv: " + pattern):
        R.load_csv(p)


def test_csv_of_every_rmm_version(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # RMM's logs: before mid-2020 without the Thread column; glibc's %p writes the null pointer
    # of an allocation failure as "(nil)" (RMM 25.x); logging enabled mid-run frees blocks the
    # log never allocated (live at its start: a prelude block of the free's size); a crash
    # cuts the buffered log anywhere, so a last line without its newline that is short is dropped.
    old = tmp_path / "old.csv"
    old.write_text("Time,Action,Pointer,Size,Stream\n00:00:01:5,allocate,0x10,100,0x0\n"
                   "00:00:01:6,free,0x10,100,0x0\n")
    assert R.load(old).events == ((False, 0, 100, 0), (True, 0, 100, 0))
    nil = tmp_path / "nil.dev0.csv"
    nil.write_text(CSV + "7,00:00:02.0,allocate failure,(nil),85899345920,0\n"
                   "7,00:00:02.1,allocate,(nil),0,0\n7,00:00:02.2,free,(nil),0,0\n")
    tr = R.load(nil)
    assert tr.n_failed == 2 and len(tr.events) == 5
    late = tmp_path / "late.csv"
    late.write_text("Thread,Time,Action,Pointer,Size,Stream\n"
                    "1,1,allocate,0x7f0000600000,5000,0x0\n"
                    "1,2,free,0x7f0000200000,3000000,0x0\n"  # allocated before logging began
                    "1,3,allocate,0x7f0000200000,1000,0x0\n"  # the address, reused
                    "1,4,free,0x7f0000600000,5000,0x0\n")
    tr = R.load(late)
    assert tr.n_prelude == 1 and tr.events[0] == (False, 0, 3000000, 0)
    assert tr.peak_live == 3000000 + 5000
    assert R.replay(tr).completed
    cut = tmp_path / "cut.csv"
    cut.write_text(CSV + "1,00:00:02.0,allocate,0x7f00")
    with caplog.at_level("WARNING", logger="vmmpool"):
        assert R.load(cut).events == R.load_csv(tmp_path / "x.csv", CSV).events
    assert "dropped line 8, the last, cut short" in caplog.text


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("hello")
    with pytest.raises(R.TraceError, match=r"x\.txt: unknown format"):
        R.load(p)


# ------------------------------------------------------------------- replay
def multi_stream_events(seed: int, n: int = 600) -> tuple[list[dict[str, Any]], int]:
    """Random allocs and frees on 3 streams; returns the events and peak live."""
    rng = random.Random(seed)
    live: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    next_addr = BASE
    peak = cur = 0
    sizes = [512, 3000, 200_000, MiB, MiB + 1, 3 * MiB, 7 * MiB + 123]
    for _ in range(n):
        if live and (rng.random() < 0.45 or len(live) > 40):
            addr = rng.choice(sorted(live))
            size, stream = live.pop(addr), (addr >> 4) % 3 * 1000
            out.append(ev("free_requested", addr, size, stream))
            cur -= size
        else:
            size = rng.choice(sizes)
            stream = (next_addr >> 4) % 3 * 1000
            live[next_addr] = size
            out.append(ev("alloc", next_addr, size, stream))
            next_addr += 16
            cur += size
            peak = max(peak, cur)
    return out, peak


@pytest.mark.parametrize("seed", [1, 2])
def test_replay_matches_model_of_live_bytes(tmp_path: Path, seed: int) -> None:
    events, peak = multi_stream_events(seed)
    p = write_pickle(tmp_path, snapshot(events))
    dev = vmmpool.Device.emulated(256 * MiB)
    r = R.replay(p, dev)
    assert r.completed and r.error is None and r.failed_event is None
    assert r.events == len(events)
    assert r.peak_live == peak
    assert r.streams == 3
    assert peak <= r.peak_in_use <= r.peak_held
    assert r.peak_held % P == 0
    assert r.page_creations == r.peak_held // P  # pages are kept and reused, never recreated
    assert r.backend_calls == sum(r.calls.values()) > 0
    assert "write" not in r.calls and "read" not in r.calls  # the memory is never touched
    assert dev.counters().live == (0, 0, 0)  # pool closed, nothing leaked
    assert r.wall_s > 0 and r.us_per_event > 0
    d = r.to_dict()
    assert d["held_ratio"] == pytest.approx(r.peak_held / peak)
    json.dumps(d)


def test_replay_out_of_memory_reports_and_leaks_nothing(tmp_path: Path) -> None:
    events = [ev("alloc", BASE + i * 16, 3 * MiB) for i in range(5)]
    dev = vmmpool.Device.emulated(64 * MiB)
    r = R.replay(R.snapshot_to_trace(snapshot(events)), dev, limit=12 * MiB)  # 4 x 3 MiB fit
    assert not r.completed and r.failed_event == 4 and r.events == 4
    assert "out of memory" in (r.error or "")
    assert dev.counters().live == (0, 0, 0)


def test_default_device_is_sized_to_the_trace() -> None:
    tr = R.snapshot_to_trace(snapshot([ev("alloc", BASE, 3 << 30)]))
    assert R.emulated_capacity(tr) == 7 << 30
    r = R.replay(tr)
    assert r.completed and r.limit == 7 << 30 and r.peak_held == 3 << 30
    with pytest.raises(ValueError, match="capacity applies only"):
        R.replay(tr, "host", capacity=1 << 30)


def test_replay_gives_each_recorded_stream_a_stream_of_its_own(device: vmmpool.Device) -> None:
    # A recorded handle (1000, 2000 here) is a pointer of the process that recorded it: on a GPU
    # an event recorded on it is undefined behaviour. Each gets a created stream (the default on
    # a GPU); handle 0 stays the default stream. Nothing is left behind.
    events, peak = multi_stream_events(3, n=60)  # 37 MiB live: fits the host fixture
    tr = R.snapshot_to_trace(snapshot(events))
    assert set(tr.streams) == {0, 1000, 2000}
    before = device.counters()
    own = run_replay(tr, device, None, {}, own_streams=True)
    calls = device.counters() - before
    assert own.completed and own.peak_live == peak and own.streams == 3
    assert calls["stream_create"] == calls["stream_destroy"] == 2
    assert device._backend.live_streams() == 0
    default = run_replay(tr, device, None, {})
    made = (device.counters() - before).get("stream_create", 0) - 2
    assert made == (0 if device.is_host else 2)  # the emulator's keys need no stream
    same = ("peak_in_use", "peak_held", "page_creations", "remaps", "syncs")
    assert [getattr(own, k) for k in same] == [getattr(default, k) for k in same]


def test_replay_streams_are_destroyed_when_one_cannot_be_made() -> None:
    events, _peak = multi_stream_events(3, n=50)
    tr = R.snapshot_to_trace(snapshot(events))
    dev = vmmpool.Device.emulated(256 * MiB)
    dev._backend.inject_fault("stream_create", 2, "CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError, match="CUDA_ERROR_INVALID_VALUE"):
        run_replay(tr, dev, None, {}, own_streams=True)
    assert dev._backend.live_streams() == 0 and dev.counters().live == (0, 0, 0)
    with pytest.raises(vmmpool.DriverError, match="not a stream from stream_create"):
        dev._backend.stream_destroy(12345)


def test_replay_error_is_not_hidden_by_a_stream_that_cannot_be_destroyed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An interrupt (or any error) during the replay is the error raised: a stream_destroy
    # failing on the way out replaced it (KeyboardInterrupt became a DriverError).
    events, _peak = multi_stream_events(3, n=50)
    tr = R.snapshot_to_trace(snapshot(events))
    dev = vmmpool.Device.emulated(256 * MiB)
    dev._backend.inject_fault("stream_destroy", 1, "CUDA_ERROR_INVALID_VALUE")

    def interrupt(i: int, live: int, pool: object) -> None:
        if i > 10:
            raise KeyboardInterrupt("stop")

    with caplog.at_level("WARNING", logger="vmmpool.replay"):
        with pytest.raises(KeyboardInterrupt, match="stop"):
            run_replay(tr, dev, None, {}, sampler=interrupt, own_streams=True)
    assert "destroying replay stream" in caplog.text
    assert dev._backend.live_streams() == 1  # the one the driver refused; the other went
    assert dev.counters().live == (0, 0, 0)
    # Without an error of its own, the replay raises the destroy failure (after destroying
    # every other stream).
    dev2 = vmmpool.Device.emulated(256 * MiB)
    dev2._backend.inject_fault("stream_destroy", 1, "CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError, match="CUDA_ERROR_INVALID_VALUE"):
        run_replay(tr, dev2, None, {}, own_streams=True)
    assert dev2._backend.live_streams() == 1 and dev2.counters().live == (0, 0, 0)


def two_stream_small_trace() -> R.Trace:
    # 0.6 MiB on each of two streams: 1.2 MiB live (1 page), but small pages
    # belong to one stream, so 2 pages are needed; then 3 large on one stream.
    events = [
        ev("alloc", BASE, 600_000, 1), ev("alloc", BASE + 16, 600_000, 2),
        ev("free_requested", BASE, 600_000, 1),
        ev("alloc", BASE + 32, 5 * MiB, 1),
        ev("free_requested", BASE + 32, 5 * MiB, 1),
        ev("alloc", BASE + 48, 3 * MiB, 2),
    ]
    return R.snapshot_to_trace(snapshot(events), "two.pickle")


def test_min_limit_is_minimal() -> None:
    tr = two_stream_small_trace()
    dev = vmmpool.Device.emulated(64 * MiB)
    m = R.min_limit(tr, dev)
    assert m.limit == m.pages * P
    assert m.pages > -(-tr.peak_live // P)  # the lower bound alone does not complete
    assert m.result.completed and m.result.limit == m.limit
    assert R.replay(tr, dev, m.pages * P).completed
    assert not R.replay(tr, dev, (m.pages - 1) * P).completed
    assert all(ok == (n >= m.pages) for n, ok in m.probes)
    assert m.ratio == pytest.approx(m.limit / tr.peak_live)
    assert dev.counters().live == (0, 0, 0)


# -------------------------------------------------------------------- peers
def test_peer_command_and_env(tmp_path: Path) -> None:
    argv, env = R.peer_command("torch-expandable", tmp_path / "t.pickle", 6 * MiB)
    assert argv[1:] == ["-m", "vmmpool.replay", "--peer", "torch-expandable",
                        str(tmp_path / "t.pickle"), "--limit", str(6 * MiB)]
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "garbage_collection_threshold:0.5"
    try:
        argv, env = R.peer_command("torch", "t.pickle")
        assert "PYTORCH_CUDA_ALLOC_CONF" not in env and "--limit" not in argv
    finally:
        del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    with pytest.raises(ValueError, match="peer must be one of torch, torch-expandable, torch-vmmpool, cupy"):
        R.peer_command("rmm", "t.pickle")


def test_parse_peer_output() -> None:
    from vmmpool.replay._peers import _PEER_MARK

    line = _PEER_MARK + json.dumps({"completed": True, "peak_reserved": 10, "wall_s": 0.5})
    out = R.parse_peer_output("cupy", f"warming up\n{line}\n")
    assert out == {"completed": True, "peak_reserved": 10, "wall_s": 0.5}
    with pytest.raises(RuntimeError, match=r"cupy: subprocess exited 1 without a result: \['boom'\]"):
        R.parse_peer_output("cupy", "boom\n", 1)
    with pytest.raises(RuntimeError, match="malformed result line"):
        R.parse_peer_output("cupy", _PEER_MARK + "[1]")


def test_peer_replays_without_gpu_are_skipped_with_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vmmpool.replay._peers as peers

    monkeypatch.setattr(peers, "gpu_unavailable_reason", lambda: "no driver here")
    got = R.peer_replays(tmp_path / "t.pickle")
    assert [p.peer for p in got] == list(R.PEERS)
    assert all(p.skipped == "no CUDA GPU (no driver here)" and p.completed is None for p in got)


@pytest.mark.cuda
@pytest.mark.gpu_peers
def test_peer_allocators_replay_a_trace_on_the_gpu(cuda: vmmpool.Device, tmp_path: Path) -> None:
    """Each peer subprocess (``_peer_main``: PyTorch's allocator, expandable segments, PyTorch on a
    vmmpool MemPool, CuPy's pool) replays a small three-stream trace on the GPU and reports."""
    import importlib.util

    events, peak = multi_stream_events(3, 200)
    p = write_pickle(tmp_path, snapshot(events), "ms.pickle")
    # 40 s a peer (PyTorch starts in a few): all four inside the GPU check's 180 s watchdog.
    got = {r.peer: r for r in R.peer_replays(p, search=False, timeout=40)}
    assert list(got) == list(R.PEERS)
    for name, r in got.items():
        mod = "cupy" if name == "cupy" else "torch"
        required = mod == "cupy" or os.environ.get("VMMPOOL_REQUIRE_TORCH", "") == "1"
        if r.skipped == f"{mod} is not installed" and not required:
            assert importlib.util.find_spec(mod) is None
            continue
        assert r.skipped is None, f"{name}: {r.skipped}"
        assert r.completed, name
        assert r.peak_allocated is not None and r.peak_reserved is not None, name
        assert peak <= r.peak_allocated <= r.peak_reserved, (name, peak, r)
        assert r.wall_s is not None and r.wall_s > 0, name


# ---------------------------------------------------------------------- CLI
def test_cli_replay_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events, peak = multi_stream_events(3, 200)
    p = write_pickle(tmp_path, snapshot(events), "ms.pickle")
    out = tmp_path / "r.json"
    assert main(["replay", str(p), "--min-limit", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:3] == ["trace", "events", "streams"]
    assert "ms.pickle" in text and f"{len(events):,}" in text
    data = json.loads(out.read_text())
    (rec,) = data["traces"]
    assert rec["peak_live"] == peak and rec["vmmpool"]["completed"]
    assert rec["min_limit"]["pages"] * P == rec["min_limit"]["bytes"]


def test_cli_replays_the_readable_traces_of_several_and_names_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events, _peak = multi_stream_events(3, 100)
    good = write_pickle(tmp_path, snapshot(events), "good.pickle")
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle\nat all")
    out = tmp_path / "r.json"
    assert main(["replay", str(good), str(bad), str(good), "--json", str(out)]) == 2
    cap = capsys.readouterr()
    assert cap.out.count("good.pickle") == 2
    (line,) = cap.err.splitlines()
    assert "bad.pickle" in line and "skipped" in line
    data = json.loads(out.read_text())
    assert len(data["traces"]) == 2 and len(data["unreadable"]) == 1
    # Only unreadable ones: a line for each and exit 2, nothing replayed.
    assert main(["replay", str(bad), str(bad), str(tmp_path / "missing.pickle")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.splitlines()) == 3 and "missing.pickle" in cap.err


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: TRACE"),
        (["{missing}"], "cannot read"),
        (["{good}", "--limit", "lots"], "argument --limit: expected a size such as"),
        # Issue 17: 1e400 (inf) raised OverflowError in int() with a traceback; issue 21: the one
        # size grammar has no exponent, and values of 2**64 bytes or more are refused.
        (["{good}", "--limit", "1e400"], "argument --limit: expected a size such as"),
        (["{good}", "--limit", "20000000000GB"], "argument --limit: a size must be below 2**64 bytes"),
        (["{good}", "--limit", "0"], "argument --limit: the size must be > 0"),
        (["{good}", "--limit", "nan"], "argument --limit: expected a size such as"),
        (["{good}", "--limit", "9" * 5000], "(str of 5000 characters)"),
        (["{good}", "--snapshot-device", "9" * 5000], "invalid int value"),
        (["{good}", "--frobnicate" + "x" * 5000], "unrecognized arguments"),
        (["{good}", "--limit", "8MiB", "--min-limit"], "not allowed with argument"),
        (["{good}", "--device", "gpu7"], "device must be"),
        (["{bad}"], "bad.csv: line 1: expected the header"),
        # Refused before any replay (a --min-limit search can run for minutes), not after it.
        (["{good}", "--min-limit", "--json", "{dir}"], "argument --json: '{dir}' is a directory"),
        (["{good}", "--json", "{missing}/r.json"], "argument --json: cannot write"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    good = write_pickle(tmp_path, snapshot([ev("alloc", BASE, 100)]), "good.pickle")
    bad = tmp_path / "bad.csv"
    bad.write_text("Thread,Nope\n")
    names = {"good": str(good), "bad": str(bad), "missing": str(tmp_path / "missing.pickle"),
             "dir": str(tmp_path)}
    argv = ["replay"] + [a.format(**names) for a in args]
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err
    assert len(err.strip().splitlines()) == 1 and message.format(**names) in err and len(err) < 300
    assert "Traceback" not in err
    assert cap.out == ""  # nothing was replayed


def test_cli_limit_too_small_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_pickle(tmp_path, snapshot([ev("alloc", BASE, 5 * MiB)]), "five.pickle")
    assert main(["replay", str(p), "--limit", "4MiB"]) == 1
    out = capsys.readouterr().out
    assert "0/1 (out of memory)" in out and "five.pickle: out of memory" in out
    assert main(["replay", str(p), "--limit", "6MiB"]) == 0


def test_cli_warnings_are_one_line(tmp_path: Path) -> None:
    # A limit above the device is clamped with a VmmWarning; the command printed Python's
    # warning format (a path, a line number and a source excerpt) on two lines.
    p = write_pickle(tmp_path, snapshot([ev("alloc", BASE, 5 * MiB)]), "five.pickle")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, "-m", "vmmpool", "replay", str(p), "--device", "host", "--limit", "100TiB"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m vmmpool: warning: PagePool limit")
    assert "clamped" in lines[0]


def test_timeline_samples_live_and_held_bytes_and_the_recorded_reserved(tmp_path: Path) -> None:
    P = 2 << 20
    events = [
        {"action": "segment_alloc", "addr": 0x10000000, "size": 8 * P, "stream": 0},
        {"action": "alloc", "addr": 0x10000000, "size": 3 * P, "stream": 0},
        {"action": "alloc", "addr": 0x10600000, "size": P, "stream": 0},
        {"action": "free_requested", "addr": 0x10000000, "size": 3 * P, "stream": 0},
        {"action": "segment_free", "addr": 0x10000000, "size": 8 * P, "stream": 0},
    ]
    path = tmp_path / "t.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [events]}))
    tl = vmmpool.replay.timeline(path, samples=10)
    assert tl.completed and tl.events == [0, 1, 2]
    assert tl.allocated == [3 * P, 4 * P, P]
    assert tl.reserved[0] == 3 * P and tl.reserved[1] == 4 * P and tl.reserved[2] >= P
    assert tl.recorded_reserved == [(0, 0), (0, 8 * P), (3, 0)]
    series = tl.series()
    assert set(series) == {
        "allocated (live requested bytes)", "reserved: vmmpool pages held", "reserved: PyTorch, recorded run",
    }


@pytest.mark.parametrize(
    "name, content, match",
    [
        # 2**63 - 1 bytes declared, 2 present: indistinguishable from a cut file.
        ("overflow.pickle", b"\x80\x04\x8e" + (2**63 - 1).to_bytes(8, "little") + b"x.", "truncated pickle"),
        ("field.csv",
         ("Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate," + "1" * 200_000 + ",1,0\n").encode(),
         "malformed CSV"),
        ("huge.csv", b"Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,17592186044416,0\n",
         "more than the host emulator replays"),
        ("mixed.pickle", pickle.dumps({1: 2, "a": 3}), "not a PyTorch memory snapshot"),
    ],
)
def test_cli_hostile_traces_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, match: str
) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    assert main(["replay", str(p)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err and name in err


def test_csv_with_a_byte_order_mark_and_json_without_nan(tmp_path: Path) -> None:
    p = tmp_path / "bom.log"
    p.write_text("\ufeffThread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,0,0\n1,1,free,0x10,0,0\n")
    out = tmp_path / "r.json"
    assert main(["replay", str(p), "--min-limit", "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    json.loads(text)  # strict JSON


def test_missing_csv_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(R.TraceError, match=r"missing\.csv: cannot read"):
        R.load_csv(tmp_path / "missing.csv")


def test_scaled_trace_multiplies_every_size() -> None:
    tr = R.Trace("t", ((False, 0, 100 << 20, 0), (False, 1, 10, 0), (True, 0, 100 << 20, 0)), 2, 0, (0,),
                 recorded_peak_reserved=1 << 30)
    s = R.scaled(tr, 0.1)
    assert [e[2] for e in s.events] == [10 << 20, 1, 10 << 20]
    assert s.peak_live == (10 << 20) + 1 and s.recorded_peak_reserved is None
    assert R.replay(s).completed
    with pytest.raises(ValueError, match="factor must be a number"):
        R.scaled(tr, 0)


# ------------------------------------------- hostile traces (issue 17): bounded before loading
def _su(text: str) -> bytes:
    """Pickle opcode SHORT_BINUNICODE pushing `text`."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _memo_bomb(depth: int) -> list[Any]:
    """A list nesting itself `depth` deep, each level holding the level below twice: a few
    hundred bytes pickled (the memo refers back), 2**depth objects expanded."""
    a: list[Any] = [0]
    for _ in range(depth):
        a = [a, a]
    return a


def _hostile_memo_action() -> bytes:
    return pickle.dumps(snapshot([{"action": _memo_bomb(40), "addr": 0, "size": 0}]))


def _hostile_segments_x_blocks() -> bytes:
    # One block dict referred to 10,000 times by one blocks list, whose segment is referred
    # to 10,000 times: 1e8 blocks to walk from a file of some 40 KB.
    block = {"address": 1, "size": 512, "requested_size": 512, "state": "active_allocated"}
    seg = {"device": 0, "address": 0, "total_size": 512, "stream": 0, "blocks": [block] * 10_000}
    return pickle.dumps({"segments": [seg] * 10_000, "device_traces": [[]]})


def _hostile_deep_tuple_key() -> bytes:
    # {((...((0,),)...),): None}, 200,000 deep: hashing the key crashed the interpreter.
    return b"\x80\x04}K\x00" + b"\x85" * 200_000 + b"Ns."


def _hostile_deep_action() -> bytes:
    # {"segments": [], "device_traces": [[{"action": [[[...]]]}]]}, the list 200,000 deep.
    n = 200_000
    return (
        b"\x80\x04}(" + _su("segments") + b"]" + _su("device_traces") + b"]]}" + _su("action")
        + b"]" * (n + 1) + b"a" * n + b"saau."
    )


def _hostile_memo_index() -> bytes:
    # LONG_BINPUT at index 2**32 - 16: the unpickler would size its memo to 32 GiB.
    return b"\x80\x04]r" + (2**32 - 16).to_bytes(4, "little") + b"."


def _hostile_many_keys() -> bytes:
    return pickle.dumps({i: 0 for i in range(300_000)})


def _hostile_huge_address() -> bytes:
    return pickle.dumps(snapshot([], [segment(10**5000, 2 * MiB, [])]))


def _hostile_huge_size() -> bytes:
    return pickle.dumps(snapshot([ev("alloc", BASE, 10**5000)]))


def _hostile_csv_huge_size() -> bytes:
    return ("Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10," + "9" * 5000 + ",0\n").encode()


@pytest.mark.parametrize(
    "name, build, reason",
    [
        ("memo_action.pickle", _hostile_memo_action, "refers to the same lists and dicts so often"),
        ("segs_blocks.pickle", _hostile_segments_x_blocks, "refers to the same lists and dicts so often"),
        ("deep_key.pickle", _hostile_deep_tuple_key, "nested more than 64 deep"),
        ("deep_action.pickle", _hostile_deep_action, "nested more than 64 deep"),
        ("memo_index.pickle", _hostile_memo_index, "memo index 4294967280 beyond"),
        # 300,000 number keys: ones that collide make loading quadratic (refused since).
        ("keys.pickle", _hostile_many_keys, "dict keys or set items that are not strings"),
        ("address.pickle", _hostile_huge_address,
         "segment 0: address must be an int in [0, 2**64), got an int of 16610 bits"),
        ("size.pickle", _hostile_huge_size,
         "event 0: size must be an int in [0, 2**64), got an int of 16610 bits"),
        ("size.csv", _hostile_csv_huge_size, "line 2: expected a pointer, a size and a stream"),
    ],
)
def test_hostile_trace_is_one_short_line_exit_2(
    tmp_path: Path, name: str, build: Any, reason: str
) -> None:
    # In a subprocess: before issue 17 these hung (exponential repr, 1e8 loop steps),
    # crashed the interpreter (deep hash), asked for 32 GiB, or printed a traceback or a
    # line of millions of characters. The address-space limit keeps a memo bomb from
    # taking the machine's memory.
    p = tmp_path / name
    data = build()
    assert len(data) < 2_000_000
    p.write_bytes(data)

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    out = subprocess.run(
        [sys.executable, "-m", "vmmpool", "replay", str(p)], capture_output=True, text=True,
        timeout=60, preexec_fn=limit_memory, check=False,
    )
    assert out.returncode == 2, (out.returncode, out.stderr[-500:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, out.stderr[:500]
    assert name in lines[0] and reason in lines[0], lines[0]


def test_snapshot_to_trace_never_reprs_a_deep_value() -> None:
    deep: list[Any] = []
    for _ in range(200_000):
        deep = [deep]
    data = snapshot([{"action": deep, "addr": 0, "size": 0}])
    with pytest.raises(R.TraceError, match=r"event 0: no 'action' string, got a list of 1 item$"):
        R.snapshot_to_trace(data, "deep")
    while deep:  # take it apart iteratively
        deep = deep[0]


def test_real_snapshot_shapes_pass_the_scan(tmp_path: Path) -> None:
    # Frames shared through the memo, as PyTorch writes them: a frame dict referred to by
    # many events, a frames list by an event and its block.
    frames = [{"filename": f"f{i}.py", "line": i, "name": "fn"} for i in range(30)]
    events = []
    for i in range(2000):
        fl = [frames[(i + j) % 30] for j in range(20)]
        events.append({"action": "alloc", "addr": BASE + i * 4096, "size": 4096, "stream": 0,
                       "frames": fl})
        events.append({"action": "free_requested", "addr": BASE + i * 4096, "size": 4096,
                       "stream": 0, "frames": fl})
    raw = pickle.dumps({"segments": [], "device_traces": [events]})
    R.scan_pickle(raw, "ok")  # raises if refused
    p = tmp_path / "ok.pickle"
    p.write_bytes(raw)
    assert len(R.load(p).events) == 4000


def test_scan_refuses_a_self_containing_list_and_stack_misuse() -> None:
    a: list[Any] = []
    a.append(a)
    with pytest.raises(R.TraceError, match="contains itself"):
        R.scan_pickle(pickle.dumps({"segments": a}), "cyc")
    with pytest.raises(R.TraceError, match="bottom of the stack"):
        R.scan_pickle(b"\x80\x04a.", "under")
    with pytest.raises(R.TraceError, match="never written"):
        R.scan_pickle(b"\x80\x04h\x05.", "get")
    with pytest.raises(R.TraceError, match="an integer of 80000 bits"):
        R.scan_pickle(pickle.dumps(1 << 79_999), "int")


def test_replay_and_min_limit_close_their_memory_files() -> None:
    # Issue 17: every Device.emulated kept a memfd open, so replay() leaked one per call
    # and min_limit one per probe; under `ulimit -n 256` the 251st call failed.
    code = """
import resource
import vmmpool.replay as R
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
tr = R.Trace("t", ((False, 0, 3 << 20, 0), (False, 1, 100, 0), (True, 0, 3 << 20, 0)), 2, 0, (0,))
for _ in range(300):
    assert R.replay(tr).completed
for _ in range(30):
    assert R.min_limit(tr).pages >= 2
for _ in range(100):
    assert R.timeline(tr).completed
print("done")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]


def test_repeated_segments_and_blocks_are_bounded_by_the_file_size(tmp_path: Path) -> None:
    # Shared moderately: the scan's bound on expansion (linear in the size) lets it through,
    # but the reader would walk 400,000 blocks from 5 KB; it refuses before walking any.
    block = {"address": BASE, "size": 512, "requested_size": 512, "state": "active_allocated"}
    seg = {"device": 0, "address": BASE, "total_size": 512, "stream": 0, "blocks": [block] * 2000}
    raw = pickle.dumps({"segments": [seg] * 200, "device_traces": [[]]})
    assert len(raw) < 10_000
    R.scan_pickle(raw, "moderate")  # within the scan's bounds
    p = tmp_path / "moderate.pickle"
    p.write_bytes(raw)
    with pytest.raises(R.TraceError, match=r"moderate\.pickle: refused: the snapshot lists more "
                       r"than [\d,]+ segments, blocks and events"):
        R.load(p)


def test_hashing_shared_tuples_is_bounded() -> None:
    # One 2**17-object tuple key (a few hundred bytes: each level holds the one below twice)
    # keying 64 dicts: 8 million objects to walk while loading, from under 1 KB.
    key: Any = (0,)
    for _ in range(16):
        key = (key, key)
    raw = pickle.dumps([{key: i} for i in range(64)])
    assert len(raw) < 1000
    with pytest.raises(R.TraceError, match="hashing the dict keys would walk more than"):
        R.scan_pickle(raw, "keys")
    # Once is cheap to hash, but a key that is not a string is counted with what it holds
    # (keys that collide make loading quadratic): 2**17 objects are beyond that bound.
    with pytest.raises(R.TraceError, match="dict keys or set items that are not strings"):
        R.scan_pickle(pickle.dumps([{key: 0}]), "one")
    small: Any = (0,)
    for _ in range(8):  # 2**9 objects: within the bound, once
        small = (small, small)
    R.scan_pickle(pickle.dumps([{small: 0}]), "one")


def test_scan_sees_depth_added_after_a_container_was_nested() -> None:
    # 100 lists, each appended to the one before it while still empty, then given its own
    # child: no list is deep when it is nested, the chain is 100 deep at the end.
    n = 100
    raw = b"\x80\x04(" + b"]\x94" * n + b"1"  # MARK, n x (EMPTY_LIST, MEMOIZE), POP_MARK
    for i in range(n - 1):
        raw += b"h" + bytes([i]) + b"h" + bytes([i + 1]) + b"a0"  # BINGET i, i+1, APPEND, POP
    raw += b"h\x00."
    deep: Any = pickle.loads(raw)
    assert len(deep) == 1 and len(deep[0]) == 1  # what the unpickler builds: a chain
    with pytest.raises(R.TraceError, match="nested more than 64 deep"):
        R.scan_pickle(raw, "late")


def two_device_snapshot() -> dict:
    """Device 0 has no events, device 1 allocates 3 MiB (and once ran out of memory),
    device 2 allocates 5 MiB; segments are per device."""
    d1 = [ev("alloc", BASE, 3 * MiB), ev("oom", 0, 64 * MiB), ev("free_requested", BASE, 3 * MiB)]
    d2 = [ev("alloc", BASE, 5 * MiB), ev("alloc", BASE + 8 * MiB, MiB)]
    seg = segment(BASE + (1 << 30), 2 * MiB, [(BASE + (1 << 30), MiB, MiB, "active_allocated")])
    seg["device"] = 2
    return {"segments": [seg], "device_traces": [[], d1, d2]}


def test_snapshot_devices_and_recorded_ooms(tmp_path: Path) -> None:
    p = write_pickle(tmp_path, two_device_snapshot(), "multi.pickle")
    first = R.load(p)
    assert (first.device, first.devices, first.n_failed) == (1, (1, 2), 1)
    assert first.peak_live == 3 * MiB
    second = R.load(p, 2)
    assert (second.device, second.n_failed, second.n_prelude) == (2, 0, 1)
    assert second.peak_live == 7 * MiB
    with pytest.raises(R.TraceError, match=r"device 3 not in the snapshot, which has devices 0\.\.2"):
        R.load(p, 3)


def test_cli_replays_every_device_of_a_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write_pickle(tmp_path, two_device_snapshot(), "multi.pickle")
    out = tmp_path / "r.json"
    assert main(["replay", str(p), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "multi.pickle [device 1] (1 recorded OOM)" in text
    assert "multi.pickle [device 2]" in text
    recs = json.loads(out.read_text())["traces"]
    assert [(r["trace"], r["peak_live"], r["recorded_ooms"]) for r in recs] == [
        ("multi.pickle [device 1]", 3 * MiB, 1), ("multi.pickle [device 2]", 7 * MiB, 0),
    ]
    assert main(["replay", str(p), "--snapshot-device", "2", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["traces"]
    assert [r["trace"] for r in recs] == ["multi.pickle [device 2]"]
    capsys.readouterr()
    assert main(["replay", str(p), "--snapshot-device", "5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "device 5 not in the snapshot" in err
    # a single-device snapshot keeps its plain name
    one = write_pickle(tmp_path, snapshot([ev("alloc", BASE, 100)]), "one.pickle")
    assert main(["replay", str(one)]) == 0
    assert "one.pickle " in capsys.readouterr().out


def test_an_rmm_log_has_no_device_to_choose(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_text("Thread,Time,Action,Pointer,Size,Stream\n")
    with pytest.raises(R.TraceError, match=r"log\.csv: an RMM log has no devices to choose \(device=1\)"):
        R.load(p, 1)


# ------------------------------------------------------- the package (issue 21)
def test_the_replay_package_exports_only_public_names() -> None:
    # Issue 21: everything vmmpool.replay holds without an underscore is in __all__ (no
    # `annotations`, no helper), and dir() lists exactly that.
    public = {n for n in vars(R) if not n.startswith("_")}
    assert public == set(R.__all__)
    assert [n for n in dir(R) if not n.startswith("_")] == sorted(R.__all__)
    for name in ("replay", "timeline", "min_limit", "load", "scan_pickle", "peer_command",
                 "format_table", "record", "json_safe", "COLUMNS", "Trace", "TraceError"):
        assert name in R.__all__


def test_timeline_and_replay_run_one_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 21: replay() and timeline() share one event loop (timeline is the loop with a
    # sampler): every event of both goes through run_events, and they agree.
    import vmmpool.replay._engine as engine

    calls: list[Any] = []
    real = engine.run_events

    def spy(tr: Any, pool: Any, handles: Any, sampler: Any = None, every: int = 1) -> Any:
        calls.append(sampler)
        return real(tr, pool, handles, sampler, every)

    monkeypatch.setattr(engine, "run_events", spy)
    P = 2 << 20
    tr = R.Trace("t", ((False, 0, 3 * P, 0), (False, 1, 100, 1), (True, 0, 3 * P, 0),
                       (False, 2, P, 0)), 3, 0, (0, 1))
    res = R.replay(tr)
    tl = R.timeline(tr, samples=2)
    assert len(calls) == 2 and calls[0] is None and calls[1] is not None
    assert res.completed and tl.completed and res.events == 4
    assert tl.events == [0, 2, 3] and tl.allocated == [3 * P, 100, P + 100]
    assert max(tl.allocated) <= res.peak_live


def test_timeline_stops_at_the_event_out_of_memory() -> None:
    P = 2 << 20
    tr = R.Trace("t", ((False, 0, 3 * P, 0), (False, 1, 4 * P, 0), (True, 0, 3 * P, 0)), 2, 0, (0,))
    res = R.replay(tr, limit=4 * P)
    tl = R.timeline(tr, limit=4 * P, samples=10)
    assert not res.completed and res.failed_event == 1 and res.events == 1
    assert not tl.completed and tl.events == [0] and tl.allocated == [3 * P]


def test_the_peer_entry_point_runs_by_module_path(tmp_path: Path) -> None:
    # peer_command's argv runs `python -m vmmpool.replay`, now the package's __main__: it must
    # start and parse its arguments (an unknown peer is refused by argparse, exit status 2).
    argv, env = R.peer_command("cupy", tmp_path / "t.pickle", 4 << 20)
    assert argv[1:3] == ["-m", "vmmpool.replay"]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                 env.get("PYTHONPATH", "")])}
    out = subprocess.run([*argv[:3], "--help"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and "--peer" in out.stdout and "cupy" in out.stdout, out.stderr
    out = subprocess.run([*argv[:3], "--peer", "rmm", "t.pickle"], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2 and "invalid choice: 'rmm'" in out.stderr, out.stderr
    from vmmpool.replay.__main__ import main as peer_main

    with pytest.raises(SystemExit):
        peer_main(["--peer", "torch", "t.pickle", "--limit", "x"])


def test_trace_files_are_bounded_before_they_are_parsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hostile pickle of empty containers costs up to 120x its size to scan: a file is read
    # only up to the bound (default 1 GiB), one byte past it at most (a pipe or a device file
    # has no size to ask first).
    good = write_pickle(tmp_path, small_snapshot())
    size = good.stat().st_size
    assert R.load(good, max_bytes=size).n_slots == R.load(good).n_slots
    with pytest.raises(R.TraceError, match=f"more than {size - 1} bytes.*--max-trace-bytes"):
        R.load(good, max_bytes=size - 1)
    lines = "Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,4096,0x0\n"
    log = tmp_path / "t.csv"
    log.write_text(lines)
    with pytest.raises(R.TraceError, match="more than 10 bytes"):
        R.load_csv(log, max_bytes=10)
    assert R.load_csv(log, max_bytes=len(lines)).n_slots == 1
    with pytest.raises(R.TraceError, match="zero: more than 4096 bytes"):
        R.load_snapshot(_device_file(tmp_path), max_bytes=4096)  # never ends: read no further
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes must be an int >= 1"):
            R.load(good, max_bytes=bad)  # type: ignore[arg-type]
    assert R.MAX_TRACE_BYTES == 1 << 30
    assert main(["replay", str(good), "--max-trace-bytes", str(size - 1)]) == 2
    assert "--max-trace-bytes" in capsys.readouterr().err
    assert main(["replay", str(good), "--max-trace-bytes", "1MiB"]) == 0


def _device_file(tmp_path: Path) -> Path:
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    return link


def _fifo_with(tmp_path: Path, name: str, data: bytes) -> tuple[Path, Any]:
    """A FIFO that a thread fills with `data` once a reader opens it."""
    import threading

    fifo = tmp_path / name
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return fifo, t


def _read_fifo(fifo: Path, writer: Any, read: Any) -> Any:
    """`read(fifo)` in a thread: its result, or its exception raised here; a read still
    waiting after 30 s fails the test (and is let go: a writer is opened and closed)."""
    import threading

    got: list[Any] = []

    def run() -> None:
        try:
            got.append(read(fifo))
        except BaseException as e:  # noqa: BLE001 - raised in the test thread
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    hung = t.is_alive()
    for _ in range(2):  # let go of whichever side still waits for the other
        for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
            if writer.is_alive() or t.is_alive():
                try:
                    os.close(os.open(fifo, flags))
                except OSError:
                    pass
        writer.join(5)
        t.join(5)
    assert not hung, f"reading {fifo.name} waited forever"
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_trace_from_a_fifo_is_read_once(tmp_path: Path) -> None:
    # The format was sniffed from a first opening of the file and the trace read from a
    # second: a FIFO (`replay <(zcat t.pickle.gz)`) lost its first 64 bytes to the sniff, and
    # the second open waited forever for a writer that had gone.
    lines = b"Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,4096,0x0\n"
    raw = pickle.dumps(small_snapshot())
    want = R.load(write_pickle(tmp_path, small_snapshot())).n_slots
    for name, data, n, read in (
        ("a.csv", lines, 1, lambda f: R.load(f)),
        ("b.pickle", raw, want, lambda f: R.load(f)),
        ("c.pickle", raw, want, lambda f: R._load._load_devices(f)[0]),
        ("d.csv", lines, 1, lambda f: R._load._load_devices(f)[0]),
        ("e.pickle", raw, want, lambda f: R.load(f, 0, max_bytes=len(raw))),
    ):
        fifo, t = _fifo_with(tmp_path, name, data)
        assert _read_fifo(fifo, t, read).n_slots == n
    fifo, t = _fifo_with(tmp_path, "f.pickle", raw)
    with pytest.raises(R.TraceError, match=f"f.pickle: more than {len(raw) - 1} bytes"):
        _read_fifo(fifo, t, lambda f: R.load(f, max_bytes=len(raw) - 1))


def test_a_bound_above_the_memory_reads_a_small_trace(tmp_path: Path) -> None:
    # read(max_bytes + 1) allocated a buffer of the bound up front: --max-trace-bytes 1TiB
    # on any trace was a MemoryError. A regular file is read at its size; one longer than
    # the bound is refused by its size, unread, and the message says the size.
    good = write_pickle(tmp_path, small_snapshot())
    size = good.stat().st_size
    assert R.load(good, max_bytes=1 << 50).n_slots == R.load(good).n_slots
    assert main(["replay", str(good), "--max-trace-bytes", "1TiB"]) == 0
    with pytest.raises(R.TraceError, match=f"t.pickle: {size} bytes, more than {size - 1} bytes"):
        R.load(good, max_bytes=size - 1)
    with pytest.raises(R.TraceError, match="zero: more than 100 bytes"):
        R.load_snapshot(_device_file(tmp_path), max_bytes=100)


def test_repeated_runs_the_part_after_the_prelude_again_on_slots_of_its_own() -> None:
    from vmmpool.replay._trace import repeated

    # prelude: slot 0 (a weight, never freed); a pass: slots 1 and 2, both freed
    body = ((False, 1, 3 * MiB, 0), (False, 2, MiB, 7), (True, 1, 3 * MiB, 0), (True, 2, MiB, 7))
    tr = R.Trace(name="t", events=((False, 0, 5 * MiB, 0), *body), n_slots=3, n_prelude=1,
                 streams=(0, 7))
    three = repeated(tr, 3)
    assert three is not None and three.n_slots == 1 + 3 * 2 and three.n_prelude == 1
    assert three.events[:5] == tr.events
    assert three.events[5:9] == tuple((f, s + 2, n, st) for f, s, n, st in body)
    assert three.events[9:] == tuple((f, s + 4, n, st) for f, s, n, st in body)
    res = R.replay(three)
    assert res.completed and res.peak_live == 9 * MiB and res.events == 13
    assert repeated(tr, 1) is not None and repeated(tr, 1).events == tr.events  # type: ignore[union-attr]
    # a pass that keeps a block (an optimizer's state) cannot be repeated
    kept = dataclasses.replace(tr, events=tr.events[:-1])
    assert repeated(kept, 2) is None
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="times must be an int >= 1"):
            repeated(tr, bad)  # type: ignore[arg-type]


def test_replay_and_the_cli_take_keep_cached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Pages of 2 MiB: a 3-page free range between live blocks, then a 4-page request.
    # By default the pool keeps to its budget and remaps the 3 cached pages; kept, it maps new ones.
    events = [ev("alloc", BASE, 2 * P), ev("alloc", BASE + 16, 3 * P), ev("alloc", BASE + 32, 2 * P),
              ev("free_requested", BASE + 16, 3 * P), ev("alloc", BASE + 48, 4 * P)]
    path = write_pickle(tmp_path, snapshot(events))
    default, kept = R.replay(path), R.replay(path, keep_cached=True)
    assert (default.remaps, default.peak_held // P) == (1, 8)
    assert (kept.remaps, kept.peak_held // P) == (0, 11)
    out = tmp_path / "r.json"
    assert main(["replay", str(path), "--keep-cached", "--json", str(out)]) == 0
    capsys.readouterr()
    (row,) = json.loads(out.read_text())["traces"]
    assert row["vmmpool"]["remaps"] == 0 and row["vmmpool"]["peak_held"] == 11 * P


def test_a_replay_says_whether_it_kept_cached_pages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The figures of the two modes differ: the result and the CLI's JSON say which mode ran,
    # and min_limit refuses a default run of the other mode (its peak held bounds the search).
    events = [ev("alloc", BASE, 2 * P), ev("alloc", BASE + 16, 3 * P), ev("alloc", BASE + 32, 2 * P),
              ev("free_requested", BASE + 16, 3 * P), ev("alloc", BASE + 48, 4 * P)]
    path = write_pickle(tmp_path, snapshot(events))
    default, kept = R.replay(path), R.replay(path, keep_cached=True)
    assert (default.keep_cached, kept.keep_cached) == (False, True)
    assert kept.to_dict()["keep_cached"] is True
    for flag, want in (([], False), (["--keep-cached"], True)):
        out = tmp_path / "r.json"
        assert main(["replay", str(path), *flag, "--json", str(out)]) == 0
        capsys.readouterr()
        (row,) = json.loads(out.read_text())["traces"]
        assert row["vmmpool"]["keep_cached"] is want
    with pytest.raises(ValueError, match="keep_cached=False, the search asks keep_cached=True"):
        R.min_limit(path, default=default, keep_cached=True)
    assert R.min_limit(path, default=kept, keep_cached=True).result.keep_cached

"""Regression tests from a hostile review of the replay tooling (readers, figures, CLI, peers)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from vmmpool import replay as R
from vmmpool.__main__ import main

MiB = 1 << 20
BASE = 0x7F00_0000_0000


def ev(action: str, addr: int, size: int, stream: int = 0) -> dict[str, Any]:
    return {"action": action, "addr": addr, "size": size, "stream": stream, "frames": []}


def write_pickle(tmp_path: Path, data: object, name: str = "t.pickle") -> Path:
    p = tmp_path / name
    p.write_bytes(pickle.dumps(data))
    return p


def two_device_snapshot() -> dict[str, Any]:
    """Device 0: 1 MiB live at most; device 2: 6 MiB (device 1 has no events)."""
    d0 = [ev("alloc", BASE, MiB), ev("free_requested", BASE, MiB)]
    d2 = [ev("alloc", BASE, 3 * MiB), ev("alloc", BASE + 4 * MiB, 3 * MiB), ev("oom", 0, 5 * MiB)]
    return {"segments": [], "device_traces": [d0, [], d2]}


# ------------------------------------------------------------------- peers
def test_peer_command_names_the_snapshot_device(tmp_path: Path) -> None:
    argv, _env = R.peer_command("cupy", tmp_path / "t.pickle", None, 2)
    assert argv[-2:] == ["--snapshot-device", "2"]
    argv, _env = R.peer_command("cupy", tmp_path / "t.pickle")
    assert "--snapshot-device" not in argv


def test_peer_entry_point_accepts_the_snapshot_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vmmpool.replay.__main__ as peer_entry

    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(peer_entry, "_peer_main", lambda *a: seen.append(a) or 0)
    assert peer_entry.main(["--peer", "cupy", "t.pickle", "--snapshot-device", "2"]) == 0
    assert seen == [("cupy", "t.pickle", None, 2, None)]


def test_cli_peers_replay_the_rows_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each row of a multi-device snapshot is one device's trace; the peer allocators under
    # it must replay that device, not the first device with events.
    import vmmpool.replay._peers as peers

    p = write_pickle(tmp_path, two_device_snapshot(), "m.pickle")
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        # The peer replays what it loads: report its peak live as its peak reserved.
        dev = int(argv[argv.index("--snapshot-device") + 1]) if "--snapshot-device" in argv else None
        live = R.load(argv[5], dev).peak_live
        line = peers._PEER_MARK + json.dumps(
            {"completed": True, "peak_reserved": live, "peak_allocated": live, "wall_s": 0.0}
        )
        return subprocess.CompletedProcess(argv, 0, line + "\n", "")

    monkeypatch.setattr(peers, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    out = tmp_path / "r.json"
    assert main(["replay", str(p), "--json", str(out)]) == 0
    capsys.readouterr()
    recs = json.loads(out.read_text())["traces"]
    assert [r["trace"] for r in recs] == ["m.pickle [device 0]", "m.pickle [device 2]"]
    for r, live in zip(recs, (MiB, 6 * MiB), strict=True):
        assert r["peak_live"] == live
        assert [p["peak_reserved"] for p in r["peers"]] == [live] * len(R.PEERS)
    assert calls


# --------------------------------------------------------- recorded figures
def test_recorded_reserved_is_unknown_without_segments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No segment of the device and no segment event: the recorded run's reserved bytes are
    # unknown. They were reported as 0 (below the 1 MiB recorded allocated: "0.00/0.00 GiB
    # = 0.0000" in the table).
    data = {"segments": [], "device_traces": [[ev("alloc", BASE, MiB), ev("free_requested", BASE, MiB)]]}
    tr = R.load(write_pickle(tmp_path, data))
    assert tr.recorded_peak_allocated == MiB
    assert tr.recorded_peak_reserved is None and tr.recorded_reserved == ()
    # With a segment event they are known again.
    data["device_traces"][0].insert(0, ev("segment_alloc", BASE, 2 * MiB))
    data["device_traces"][0].append(ev("segment_free", BASE, 2 * MiB))
    tr = R.load(write_pickle(tmp_path, data))
    assert tr.recorded_peak_reserved == 2 * MiB
    assert main(["replay", str(tmp_path / "t.pickle")]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.endswith("0.00/0.00 GiB = 2.0000")


# ----------------------------------------------------------------- timeline
def test_timeline_recorded_series_never_goes_back() -> None:
    # The last segment event follows the last free: it is recorded at x = len(events), after
    # the last sample (len(events) - 1). The series ended with a point back at the last sample.
    events = [
        ev("segment_alloc", BASE, 4 * MiB), ev("alloc", BASE, MiB), ev("alloc", BASE + MiB, MiB),
        ev("free_requested", BASE, MiB), ev("free_requested", BASE + MiB, MiB),
        ev("segment_free", BASE, 4 * MiB),
    ]
    tr = R.snapshot_to_trace({"segments": [], "device_traces": [events]})
    assert tr.recorded_reserved[-1] == (4, 0)
    t = R.timeline(tr, samples=2)
    xs, ys = t.series()["reserved: PyTorch, recorded run"]
    assert xs == sorted(xs) and xs[-1] == 4 and ys[-1] == 0
    for x, y in t.series().values():
        assert len(x) == len(y)


# ---------------------------------------------------------------------- CLI
CSV_HEAD = "Thread,Time,Action,Pointer,Size,Stream\n"


def test_cli_refuses_a_trace_too_large_for_the_emulator_before_any_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The second trace needs more than the emulator replays: the error came after the first
    # trace's replay (which can take minutes), and that replay's figures were thrown away.
    # Now it is named before any replay, and the first trace is replayed.
    ok = tmp_path / "ok.csv"
    ok.write_text(CSV_HEAD + "1,0,allocate,0x10,100,0\n")
    big = tmp_path / "big.csv"
    big.write_text(CSV_HEAD + "1,0,allocate,0x10,1000000000000,0\n")
    ran: list[str] = []
    real = R.replay
    monkeypatch.setattr(R, "replay", lambda tr, *a, **k: ran.append(tr.name) or real(tr, *a, **k))
    monkeypatch.setattr(R, "emulated_capacity", lambda tr, real=R.emulated_capacity: (
        ran.append("checked " + tr.name), real(tr))[1])
    assert main(["replay", str(ok), str(big)]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and "big.csv: peak live 1000000000000 bytes" in cap.err
    assert "skipped" in cap.err and "ok.csv" in cap.out
    assert ran[:2] == ["checked ok.csv", "checked big.csv"] and ran.count("ok.csv") == 1
    assert main(["replay", str(big)]) == 2  # alone: the one line, nothing replayed
    assert capsys.readouterr().err.count("\n") == 1


def test_device_of_a_snapshot_without_device_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The message said "device 2 not in the trace (0..-1)".
    p = write_pickle(tmp_path, {"segments": [], "device_traces": []}, "none.pickle")
    assert main(["replay", str(p), "--snapshot-device", "2"]) == 2
    err = capsys.readouterr().err
    assert "none.pickle: device 2 not in the snapshot, which has no device traces" in err
    assert "-1" not in err


@pytest.mark.parametrize(
    "fields", ["0x10,1_000,0", "0x10,+5,0", "0x10, -0,0", "0x10,\u0663,0", "0x_10,5,0", "0x,5,0",
               "0x10,1.0,0", "0x10,5 6,0", "0x10,ff,0", "g0,5,0", "0x10,5,-1", "0x10,5,0x"],
)
def test_csv_fields_are_plain_hex_and_decimal(tmp_path: Path, fields: str) -> None:
    # int() took '1_000', '+5', Arabic-Indic digits and '0x_10': none is a pointer or a size.
    p = tmp_path / "n.csv"
    p.write_text(CSV_HEAD + f"1,0,allocate,{fields}\n", encoding="utf-8")
    with pytest.raises(R.TraceError, match=r"n\.csv: line 2: expected a pointer, a size and a stream"):
        R.load(p)


def test_csv_pointers_and_streams_are_hex_with_or_without_0x(tmp_path: Path) -> None:
    # RMM 25.x logs pointers and streams with %llx (no 0x): '7f4a00000000' was refused, and a
    # pointer of hex digits only ('10') was read as decimal.
    p = tmp_path / "new.csv"
    p.write_text(
        CSV_HEAD
        + "140,10:00:00.000001,allocate,7f4a00000000,1024,7f4a1c000b20\n"
        + "140,10:00:00.000002,allocate,10,16,0\n"
        + "140,10:00:00.000003,free,0x10,16,0x0\n"
        + "140,10:00:00.000004,free,0X7F4A00000000,1024,7F4A1C000B20\n"
    )
    tr = R.load(p)
    s = 0x7F4A1C000B20
    assert tr.events == ((False, 0, 1024, s), (False, 1, 16, 0), (True, 1, 16, 0), (True, 0, 1024, s))
    assert tr.streams == (s, 0)
    assert R.replay(tr).completed


def test_csv_null_pointer_zero_byte_allocations_are_skipped(tmp_path: Path) -> None:
    # RMM resources return nullptr for 0 bytes and the logging adaptor logs it: the second
    # such line was refused ("allocation at 0x0, which is already live"), a free of nullptr
    # too ("free of unknown address 0x0").
    p = tmp_path / "null.csv"
    p.write_text(CSV_HEAD + "1,0,allocate,0x0,0,0\n1,0,allocate,0,0,0\n1,0,allocate,0x10,8,0\n"
                 "1,0,free,0x0,0,0\n1,0,free,0x10,8,0\n1,0,free,0,0,0\n")
    tr = R.load(p)
    assert tr.events == ((False, 0, 8, 0), (True, 0, 8, 0))
    # A null pointer with bytes is still an error, and an unknown action still refused.
    p.write_text(CSV_HEAD + "1,0,allocate,0x0,8,0\n1,0,allocate,0x0,8,0\n")
    with pytest.raises(R.TraceError, match=r"line 3: allocation at 0x0, which is already live"):
        R.load(p)
    p.write_text(CSV_HEAD + "1,0,resize,0x0,0,0\n")
    with pytest.raises(R.TraceError, match=r"line 2: unknown action 'resize'"):
        R.load(p)


# ---------------------------------------------------------------- benchmark
BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "replay.py"


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent.parent), "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False, cwd=tmp_path)


@pytest.mark.parametrize(
    "content, args, message",
    [
        (CSV_HEAD + "1,0,allocate,0x10,100,0\n", ["--scale", "0"], "factor must be a number in (0, 1e6)"),
        (CSV_HEAD + "1,0,allocate,0x10,nan,0\n", [], "t.csv: line 2: expected a pointer"),
        (CSV_HEAD + "1,0,allocate,0x10,1000000000000,0\n", [], "more than the host emulator replays"),
        (CSV_HEAD + "1,0,allocate,0x10,100,0\n", ["--scale", "1e300"], "factor must be a number"),
    ],
    ids=["scale-0", "bad-field", "too-large", "scale-huge"],
)
def test_benchmark_bad_input_is_one_line_exit_2(
    tmp_path: Path, content: str, args: list[str], message: str
) -> None:
    # They were tracebacks (ValueError from scaled(), TraceError from load()).
    p = tmp_path / "t.csv"
    p.write_text(content)
    out = run_bench(tmp_path, str(p), "--json", str(tmp_path / "r.json"), *args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and message in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_benchmark_replays_every_device_of_a_snapshot(tmp_path: Path) -> None:
    # Only the first device with events was replayed: device 2's row was missing.
    p = write_pickle(tmp_path, two_device_snapshot(), "m.pickle")
    out = run_bench(tmp_path, str(p), "--no-peers", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    recs = json.loads((tmp_path / "r.json").read_text())["traces"]
    assert [(r["trace"], r["peak_live"], r["recorded_ooms"]) for r in recs] == [
        ("m.pickle [device 0]", MiB, 0), ("m.pickle [device 2]", 6 * MiB, 1),
    ]


# ------------------------------------------------------------- pickle scan
M61 = (1 << 61) - 1  # k * M61 hashes to 0 for every int k


def colliding_dict_pickle(n: int, key: Any = lambda i: i * M61) -> bytes:
    """A snapshot dict whose 'x' is a dict of `n` keys (pickled without building it)."""
    out = bytearray(b"\x80\x04}(")
    for k in ("segments", "device_traces"):
        out += pickle.dumps(k, 4)[2:-1] + b"]"
    out += pickle.dumps("x", 4)[2:-1] + b"}("
    for i in range(1, n + 1):
        out += pickle.dumps(key(i), 4)[2:-1] + b"N"
    return bytes(out + b"uu.")


@pytest.mark.parametrize(
    "key", [lambda i: i * M61, lambda i: float(i * M61), lambda i: (i * M61,), lambda i: -i * M61],
    ids=["int", "float", "tuple", "negative"],
)
def test_pickle_with_colliding_dict_keys_is_refused(tmp_path: Path, key: Any) -> None:
    # 40,000 int keys that all hash to 0 (a 0.5 MB file) took 9 s to load, quadratic in the
    # count: a 5 MB file took about 15 minutes.
    p = tmp_path / "coll.pickle"
    p.write_bytes(colliding_dict_pickle(R.MAX_PICKLE_OTHER_KEYS + 1, key))
    with pytest.raises(R.TraceError, match=r"coll\.pickle: refused: more than 4,096 dict keys or set "
                       r"items that are not strings"):
        R.load(p)


def test_pickle_with_colliding_set_items_is_refused() -> None:
    n = R.MAX_PICKLE_OTHER_KEYS + 1
    for data in (pickle.dumps({"s": {i * M61 for i in range(1, 3)}}, 4),):
        R.scan_pickle(data)  # a few are fine
    body = b"".join(pickle.dumps(i * M61, 4)[2:-1] for i in range(1, n + 1))
    for data in (b"\x80\x04\x8f(" + body + b"\x90.", b"\x80\x04(" + body + b"\x91."):  # set, frozenset
        with pytest.raises(R.TraceError, match="dict keys or set items that are not strings"):
            R.scan_pickle(data, "s.pickle")


def test_pickle_with_a_few_number_keys_and_many_string_keys_loads(tmp_path: Path) -> None:
    data = {"segments": [], "device_traces": [[]], "ints": {i: i for i in range(R.MAX_PICKLE_OTHER_KEYS)},
            "strs": {f"k{i}": i for i in range(20_000)}}
    R.scan_pickle(pickle.dumps(data))
    assert R.load(write_pickle(tmp_path, data)).events == ()


# ------------------------------------------------------------ snapshot reader
@pytest.mark.parametrize("between", [[], [ev("alloc", BASE + 8192, 100)]])
def test_snapshot_double_free_of_a_traced_block_names_the_second_free(
    tmp_path: Path, between: list[dict[str, Any]]
) -> None:
    # The second free was taken for a block live before recording (a prelude block), and the
    # error blamed event 0: "allocation at 0x7f0000000000, which is already live".
    events = [ev("alloc", BASE, 100), ev("free_requested", BASE, 100), *between,
              ev("free_requested", BASE, 100)]
    p = write_pickle(tmp_path, {"segments": [], "device_traces": [events]}, "d.pickle")
    with pytest.raises(R.TraceError, match=rf"d\.pickle: event {len(events) - 1}: free_requested of "
                       r"0x7f0000000000, which is not live"):
        R.load(p)


def test_snapshot_free_alloc_free_of_a_prelude_block_is_fine(tmp_path: Path) -> None:
    events = [ev("free_requested", BASE, 100), ev("alloc", BASE, 50), ev("free_requested", BASE, 50)]
    tr = R.load(write_pickle(tmp_path, {"segments": [], "device_traces": [events]}))
    assert tr.n_prelude == 1 and tr.final_live == 0 and tr.peak_live == 100


# --------------------------------------------------------------------- plot
@pytest.mark.parametrize("unit", [0, -(1 << 30), True, 1.5])
def test_memory_timeline_refuses_a_unit_that_is_not_a_positive_int(unit: object) -> None:
    # unit=0 raised ZeroDivisionError from inside the plot; a negative unit drew every line
    # below the axis, which starts at 0 (an empty plot).
    pytest.importorskip("matplotlib")
    from vmmpool import plot

    with pytest.raises((TypeError, ValueError), match="unit"):
        plot.memory_timeline({"allocated": ([0, 1], [1, 2])}, unit=unit)  # type: ignore[arg-type]


def test_cli_reads_a_multi_device_snapshot_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One row per device: the file was read, scanned and unpickled again for every device
    # (8 devices of a 1 GB snapshot: 8 full loads).
    import vmmpool.replay._pickle_scan as scan
    import vmmpool.replay._snapshot as snap

    data = two_device_snapshot()
    data["device_traces"] += [[ev("alloc", BASE, 100)] for _ in range(5)]
    p = write_pickle(tmp_path, data, "m.pickle")
    scans: list[str] = []
    real = scan.scan_pickle
    monkeypatch.setattr(snap, "scan_pickle", lambda raw, name: scans.append(name) or real(raw, name))
    assert main(["replay", str(p)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:8]
    assert [r.split()[2] for r in rows] == ["0]", "2]", "3]", "4]", "5]", "6]", "7]"]
    assert scans == ["m.pickle"]


# ------------------------------------------------------------ error messages
@pytest.mark.parametrize(
    "name, content, shown",
    [
        ("esc.csv", b"Thread\x1b[31mRED,Time\n", r"got Thread\x1b[31mRED,Time"),
        ("esc.pickle", b"c\x1b]0;owned\x07os\nsystem\n.", r"the class \x1b]0;owned\x07os.system"),
    ],
)
def test_errors_escape_a_files_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, shown: str
) -> None:
    # A header or a class name from the file was quoted raw: its escape sequences reached
    # the terminal (colours, window title, worse).
    p = tmp_path / name
    p.write_bytes(content)
    assert main(["replay", str(p)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and shown in err


def test_snapshot_device_with_nothing_to_replay_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --snapshot-device 1 (no events, no segments) replayed an empty trace: exit 0, a row of
    # zeros, as if the device had been replayed.
    p = write_pickle(tmp_path, two_device_snapshot(), "m.pickle")
    assert main(["replay", str(p), "--snapshot-device", "1"]) == 2
    err = capsys.readouterr().err
    assert "m.pickle: device 1 has no events and no segments: nothing to replay (devices with " \
        "events: 0, 2)" in err
    # A device with segments but no events replays its live blocks (a snapshot taken without
    # recording history).
    data = two_device_snapshot()
    data["segments"] = [{"device": 1, "address": BASE, "total_size": 2 * MiB, "stream": 0, "blocks": [
        {"address": BASE, "size": MiB, "requested_size": 1000, "state": "active_allocated"}]}]
    tr = R.load(write_pickle(tmp_path, data, "s.pickle"), 1)
    assert tr.n_prelude == 1 and tr.peak_live == 1000 and tr.recorded_peak_reserved == 2 * MiB


def fake_peers(monkeypatch: pytest.MonkeyPatch, completes: Any) -> list[int | None]:
    """Peers on a pretend GPU: `completes(limit)` says whether a run completes."""
    import vmmpool.replay._peers as peers

    limits: list[int | None] = []

    def run(peer: str, path: str, limit: int | None, timeout: float, device: int | None = None,
            max_bytes: int | None = None) -> dict[str, Any]:
        limits.append(limit)
        return {"completed": completes(limit), "peak_reserved": 10 * MiB, "peak_allocated": MiB,
                "wall_s": 0.0}

    monkeypatch.setattr(peers, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(peers, "_peer_run", run)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    return limits


def test_peer_min_limit_is_one_a_run_completed_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # When no limited run completed (each crashed, or the peer needs more under a limit),
    # the search reported the peer's peak reserved as its smallest limit, never run.
    p = write_pickle(tmp_path, {"segments": [], "device_traces": [[ev("alloc", BASE, MiB)]]})
    fake_peers(monkeypatch, lambda limit: limit is None)
    got = R.peer_replays(p, ["cupy"])
    assert got[0].completed and got[0].min_limit is None
    limits = fake_peers(monkeypatch, lambda limit: limit is None or limit >= 6 * MiB)
    got = R.peer_replays(p, ["cupy"])
    assert got[0].min_limit == 6 * MiB
    assert 6 * MiB in limits and 10 * MiB in limits


def test_a_cut_peer_result_line_is_a_runtime_error() -> None:
    # json.JSONDecodeError went through peer_replays (it catches RuntimeError) and the CLI:
    # a traceback.
    from vmmpool.replay._peers import _PEER_MARK

    with pytest.raises(RuntimeError, match="cupy: malformed result line"):
        R.parse_peer_output("cupy", _PEER_MARK + '{"completed": tr', -9)


def test_table_has_no_ratios_for_a_replay_that_ran_out_of_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1 MiB then 5 MiB under a 4 MiB limit: the second allocation fails. The row showed
    # in use/live 0.1667 and held/live 0.3333: the first event's peaks over the whole trace's
    # 6 MiB peak live, figures of no run.
    events = [ev("alloc", BASE, MiB), ev("alloc", BASE + 8 * MiB, 5 * MiB)]
    p = write_pickle(tmp_path, {"segments": [], "device_traces": [events]}, "oom.pickle")
    out = tmp_path / "r.json"
    assert main(["replay", str(p), "--limit", "4MiB", "--json", str(out)]) == 1
    head, row = capsys.readouterr().out.splitlines()[:2]  # columns aligned: read by position
    assert "1/2 (out of memory)" in row
    for col in ("in use/live", "held/live"):
        assert row[head.index(col):].split()[0] == "-"
    (rec,) = json.loads(out.read_text())["traces"]
    assert rec["vmmpool"]["peak_in_use"] == MiB and rec["vmmpool"]["completed"] is False


# ------------------------------------------- second review: bounds across devices, figures
def test_an_events_list_shared_by_many_devices_is_bounded_by_the_file_size(tmp_path: Path) -> None:
    # One list of events, shared through the memo by 100 devices: each device was read on
    # its own (and bounded alone), so a 40 KB file read 2,000,000 events (10,000x its size
    # in memory).
    L = [ev("alloc", BASE, 512), ev("free_requested", BASE, 512)] * 10_000
    p = write_pickle(tmp_path, {"segments": [], "device_traces": [L] * 100}, "shared.pickle")
    with pytest.raises(R.TraceError, match=r"shared\.pickle: refused: the snapshot lists more than"):
        R.load(p)
    assert main(["replay", str(p)]) == 2


def test_many_devices_each_walking_every_segment_is_refused(tmp_path: Path) -> None:
    # 1,000 devices x 1,000 (shared) segments: each device's read walked every segment, so
    # reading took time quadratic in the file's size.
    seg = {"device": 99, "address": 0, "total_size": 0, "blocks": []}
    data = {"segments": [seg] * 1000, "device_traces": [[ev("alloc", BASE, 512)]] * 1000}
    p = write_pickle(tmp_path, data, "quad.pickle")
    with pytest.raises(R.TraceError, match=r"read for 1000 devices"):
        R._load._load_devices(p)
    p = write_pickle(tmp_path, {"segments": [], "device_traces": [[]] * 2000}, "devs.pickle")
    with pytest.raises(R.TraceError, match=r"lists 2,000 devices, more than 1024"):
        R.load(p)


def test_a_device_past_device_traces_with_live_blocks_is_read(tmp_path: Path) -> None:
    # device_traces shorter than the segments' devices: the default device (the first with
    # live blocks) was chosen, then refused as "not in the snapshot".
    blocks = [{"address": BASE, "size": 2 * MiB, "requested_size": MiB, "state": "active_allocated"}]
    seg = {"device": 1, "address": BASE, "total_size": 2 * MiB, "stream": 0, "blocks": blocks}
    p = write_pickle(tmp_path, {"segments": [seg], "device_traces": []}, "d1.pickle")
    tr = R.load(p)
    assert tr.device == 1 and tr.n_prelude == 1 and tr.peak_live == MiB
    assert R.load(p, 1).peak_live == MiB
    with pytest.raises(R.TraceError, match="device 2 not in the snapshot"):
        R.load(p, 2)


def test_a_block_freed_before_any_alloc_counts_512_byte_rounded(tmp_path: Path) -> None:
    # PyTorch rounds every request to 512 bytes; a prelude block known only from its free
    # was counted at its requested bytes in the recorded peak allocated (612, not 1024).
    events = [ev("alloc", BASE, 100), ev("free_requested", BASE + MiB, 100)]
    data = {"segments": [], "device_traces": [events]}
    tr = R.load(write_pickle(tmp_path, data))
    assert tr.n_prelude == 1 and tr.peak_live == 200
    assert tr.recorded_peak_allocated == 1024


def test_the_peers_read_the_trace_with_the_clis_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `replay --max-trace-bytes` raised the bound for the CLI only: peer_replays re-read the
    # file with the default (a TraceError traceback with --min-limit) and so did each peer.
    import vmmpool.replay._trace as trace_mod

    argv, _env = R.peer_command("cupy", tmp_path / "t.pickle", None, None, 5 * MiB)
    assert argv[-2:] == ["--max-trace-bytes", str(5 * MiB)]
    p = write_pickle(tmp_path, {"segments": [], "device_traces": [[ev("alloc", BASE, MiB)]]})
    monkeypatch.setattr(trace_mod, "MAX_TRACE_BYTES", 16)  # this file is over the default
    limits = fake_peers(monkeypatch, lambda limit: True)
    assert main(["replay", str(p), "--min-limit", "--max-trace-bytes", "1MiB"]) == 0
    assert limits and "skipped" not in capsys.readouterr().out


@pytest.mark.parametrize("events, n_slots, pattern", [
    (((False, 0, 10, 0),), 0, "event 0: an allocation in slot 0, but the trace has no slots"),
    (((True, 0, 10, 0),), 1, "event 0: a free of slot 0, which is not live"),
    (((False, 0, 10, 0), (True, 0, 10, 0), (True, 0, 10, 0)), 1,
     "event 2: a free of slot 0, which is not live"),
    (((False, 0, 10, 0), (False, 0, 10, 0)), 1, "event 1: an allocation in slot 0, which is still live"),
])
def test_a_hand_built_trace_whose_slots_do_not_add_up_is_a_trace_error(
    events: tuple[tuple[bool, int, int, int], ...], n_slots: int, pattern: str
) -> None:
    # An IndexError, an AttributeError on None, or a live allocation silently dropped.
    dev = R._engine.Device.emulated(64 * MiB)
    tr = R.Trace("hand", events, n_slots=n_slots, n_prelude=0, streams=(0,))
    with pytest.raises(R.TraceError, match=f"hand: {pattern}"):
        R.replay(tr, dev)
    assert dev.counters().live == (0, 0, 0)


def test_the_default_device_has_pages_for_every_stream() -> None:
    # 600 streams of one 512-byte block each: a page each, 600 pages, more than the 1 GiB
    # (512 pages) the default device had: "out of memory" at the default limit.
    events = [ev("alloc", BASE + 512 * i, 512, 0x10000 + i) for i in range(600)]
    tr = R.snapshot_to_trace({"segments": [], "device_traces": [events]})
    assert R.emulated_capacity(tr) >= 600 * 8 * 2 * MiB
    assert R.replay(tr).completed


def test_csv_blank_lines_before_the_header(tmp_path: Path) -> None:
    # The format was sniffed past leading whitespace, then the reader said "got an empty file".
    p = tmp_path / "b.csv"
    p.write_text("\n  \nThread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,16,0x0\n1,0,free,0x10\n")
    with pytest.raises(R.TraceError, match=r"b\.csv: line 5: expected 6 fields"):
        R.load(p)
    p.write_text("\n  \nThread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,16,0x0\n")
    assert R.load(p).events == ((False, 0, 16, 0),)

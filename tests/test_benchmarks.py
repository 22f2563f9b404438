"""Benchmarks: a --quick smoke run never replaces the committed results (issue 21)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import vmmpool

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

sys.path.insert(0, str(BENCH))
import _common  # noqa: E402

sys.path.pop(0)


def run_host_scale(tmp_path: Path, *extra: str) -> str:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(BENCH / "host_scale.py"), "--pages", "16", *extra],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_quick_run_writes_to_a_temporary_directory(tmp_path: Path) -> None:
    committed = _common.RESULTS / "host_scale-host.json"
    before = committed.read_bytes()
    line = run_host_scale(tmp_path, "--quick")
    want = tmp_path / "vmmpool-benchmarks" / "host_scale-host-quick.json"
    assert line == f"wrote {want}"
    doc = json.loads(want.read_text())
    assert doc["quick"] is True and doc["pages"] == 16
    assert committed.read_bytes() == before, "a --quick run replaced the committed results"


def test_where_results_go() -> None:
    dev = vmmpool.Device.emulated(capacity=4 << 20)
    committed = _common.RESULTS / "x-host.json"
    assert _common.result_path("x", dev) == committed
    assert _common.result_path("x", dev, quick=True, save=True) == committed
    assert _common.result_path("x", dev, quick=True).parent.name == "vmmpool-benchmarks"
    assert _common.result_path("x", dev, "here.json", quick=True) == Path("here.json")
    args = _common.parser("t").parse_args(["--quick", "--save"])
    assert args.quick and args.save
    assert not _common.parser("t").parse_args(["--quick"]).save


def test_replay_sweep_summarizes_each_family(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(BENCH / "replay.py"), "--sweep", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    doc = json.loads(out.read_text())
    assert doc["n_per_family"] == 1 and len(doc["rows"]) == 3
    # A device per trace, described as such (it described a 2 MiB stand-in device).
    assert doc["device"]["total_memory"] is None and "per trace" in doc["device"]["sized"]
    assert [s["family"] for s in doc["summary"]] == ["gpt2", "resnet50", "stress"]
    for s, row in zip(doc["summary"], doc["rows"], strict=True):
        assert s["rows"] == 1 and s["syncs"] == 0
        assert s["held_mean"] == s["held_max"] == row["held_ratio"] >= 1.0
        # the smallest limit is whole pages, at or above the whole-page floor
        assert row["min_limit_ratio"] >= row["floor_ratio"] >= 1.0
        assert s["min_limit_at_floor"] == (abs(row["min_limit_ratio"] - row["floor_ratio"]) < 1e-9)
        # the steady state of a loop: passes 3 and 4 of the trace (a training step for ResNet-50)
        assert row["steady_calls_per_pass"] >= 0 and row["steady_remaps_per_pass"] >= 0
        assert s["steady_rows_calling"] == (row["steady_calls_per_pass"] > 0)
        assert s["steady_held_mean"] == row["steady_held_ratio"] >= 1.0
        assert s["family"] in run.stdout
    bad = subprocess.run(
        [sys.executable, str(BENCH / "replay.py"), "--sweep", "1", "--synthetic"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert bad.returncode == 2 and "--sweep replays only generated traces" in bad.stderr


def _replay_benchmark(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """benchmarks/replay.py as a module (its name would clash with vmmpool.replay)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts benchmarks/ first
    spec = importlib.util.spec_from_file_location("_bench_replay", BENCH / "replay.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "error",
    [OSError(24, "Too many open files"), vmmpool.DriverError("CUDA_ERROR_INVALID_VALUE", "emulated")],
    ids=["oserror", "vmmerror"],
)
def test_replay_sweep_records_a_failed_replay_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    error: Exception,
) -> None:
    # A replay that failed with an OSError (an OS limit of the emulator) or a VmmError was a
    # traceback under --sweep, and the rows already replayed were lost; a trace replayed one
    # by one was recorded with its error and the run went on.
    bench = _replay_benchmark(monkeypatch)
    real = bench.R.replay

    def replay(tr: Any, *a: Any, **k: Any) -> Any:
        if tr.name.startswith("resnet50"):
            raise error
        return real(tr, *a, **k)

    monkeypatch.setattr(bench.R, "replay", replay)
    out = tmp_path / "sweep.json"
    assert bench.run_sweep(1, None, str(out)) == 1
    doc = json.loads(out.read_text())
    want = f"{type(error).__name__}: {error}"
    assert [r["family"] for r in doc["rows"]] == ["gpt2", "resnet50", "stress"]
    bad = doc["rows"][1]
    assert bad["error"] == want and bad["trace"].startswith("resnet50") and "held_ratio" not in bad
    assert [s["family"] for s in doc["summary"]] == ["gpt2", "stress"]
    assert all("error" not in r for r in (doc["rows"][0], doc["rows"][2]))
    stdout = capsys.readouterr().out
    assert f"{bad['trace']}: replay failed: {want}" in stdout
    assert stdout.count(bad["trace"]) == 1, stdout  # was printed twice (when it failed, and after the table)
    # The normal path, for comparison: the same failure, recorded, exit status 1.
    trace = tmp_path / "t.csv"
    trace.write_text("Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,100,0\n")
    monkeypatch.setattr(bench.R, "replay", lambda *a, **k: (_ for _ in ()).throw(error))
    assert bench.main([str(trace), "--no-peers", "--json", str(tmp_path / "r.json")]) == 1
    failed = json.loads((tmp_path / "r.json").read_text())["failed"]
    assert [f["error"] for f in failed] == [want]


def test_replay_sweep_prints_a_row_that_did_not_complete_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A replay that ran out of memory (the device too small) is a failed row too: one line."""
    import dataclasses

    bench = _replay_benchmark(monkeypatch)
    real = bench.R.replay

    def replay(tr: Any, *a: Any, **k: Any) -> Any:
        res = real(tr, *a, **k)
        if tr.name.startswith("synthetic"):  # the stress family's
            return dataclasses.replace(res, completed=False, error="out of memory: emulated")
        return res

    monkeypatch.setattr(bench.R, "replay", replay)
    out = tmp_path / "sweep.json"
    assert bench.run_sweep(1, None, str(out)) == 1
    bad = json.loads(out.read_text())["rows"][2]
    assert bad["error"] == "out of memory: emulated"
    stdout = capsys.readouterr().out
    assert stdout.count(bad["trace"]) == 1, stdout
    assert f"{bad['trace']}: did not complete: out of memory: emulated" in stdout


def test_every_benchmark_takes_the_gpu_checks_options() -> None:
    # scripts/gpu_check.sh runs each benchmark with --device cuda:0 --output PATH (and --quick when
    # it runs out of time): the replay benchmark took --json only, so the check failed it at once.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
    assert "replay.py" in names and len(names) >= 5
    for name in names:
        out = subprocess.run(
            [sys.executable, str(BENCH / name), "--help"],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        ).stdout
        for option in ("--device", "--output", "--quick"):
            assert option in out, f"{name} has no {option}"


def test_replay_quick_searches_no_limit_and_keeps_the_committed_results(tmp_path: Path) -> None:
    committed = _common.RESULTS / "replay-host.json"
    before = committed.read_bytes()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(BENCH / "replay.py"), "--synthetic", "--quick", "--device", "host"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    want = tmp_path / "vmmpool-benchmarks" / "replay-host-quick.json"
    assert run.stdout.strip().splitlines()[-1] == f"wrote {want}"
    doc = json.loads(want.read_text())
    assert doc["quick"] is True and len(doc["traces"]) == 12
    assert all(t["min_limit"] is None and t["vmmpool"]["completed"] for t in doc["traces"])
    assert committed.read_bytes() == before


def test_gpu_check_passes_the_traces_of_a_relative_vmmpool_traces(tmp_path: Path) -> None:
    # scripts/gpu_check.sh cds to the repository first: VMMPOOL_TRACES relative to where the
    # check was started was looked up under the repository, and its traces were skipped
    # without a word. Run with a stand-in python that records its arguments.
    log = tmp_path / "calls.log"
    stub = tmp_path / "python-stub"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$CALLS"\n'
                    'echo >> "$CALLS"\nexit 0\n')
    stub.chmod(0o755)
    traces = tmp_path / "my traces"
    traces.mkdir()
    for name in ("a b.pickle", "c.pickle", "notes.txt"):
        (traces / name).write_bytes(b"\x80")
    env = {**os.environ, "PYTHON": str(stub), "CALLS": str(log), "OUT": str(tmp_path / "out"),
           "VMMPOOL_TRACES": "my traces", "GPU_CHECK_BUDGET_S": "60"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    replay = [c for c in calls if c and c[0].endswith("benchmarks/replay.py")]
    assert replay, calls
    assert replay[0][1:4] == ["--synthetic", str(traces / "a b.pickle"), str(traces / "c.pickle")]
    (traces / "a b.pickle").unlink()
    (traces / "c.pickle").unlink()
    log.unlink()
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "no *.pickle in" in run.stderr, run.stderr
    env["VMMPOOL_TRACES"] = "missing"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "VMMPOOL_TRACES=missing is not a directory" in run.stderr


#: Just what benchmarks/fragmentation.py's TorchAdapter uses of torch, on host memory, with
#: set_per_process_memory_fraction enforced. `crash_after` (env) kills the worker after that
#: many allocations, as a crash on a GPU would.
FAKE_TORCH = '''
import os
import numpy as np

uint8 = np.uint8
_made = [0]
_state = {"total": 1 << 30, "limit": 1 << 30, "live": 0}


class device:
    def __init__(self, kind, index):
        self.type, self.index = kind, index


class Tensor:
    def __init__(self, arr, root=False):
        self.arr, self.root = arr, root

    def __getitem__(self, key):
        return Tensor(self.arr[key])

    def copy_(self, src):
        self.arr[:] = src.arr

    def cpu(self):
        return self

    def numpy(self):
        return self.arr

    def __del__(self):
        if self.root:
            _state["live"] -= self.arr.size


class _Cuda:
    class OutOfMemoryError(RuntimeError):
        pass

    @staticmethod
    def get_device_properties(dev):
        class P:
            total_memory = _state["total"]
        return P

    @staticmethod
    def set_per_process_memory_fraction(fraction, dev):
        _state["limit"] = int(fraction * _state["total"])

    @staticmethod
    def memory_reserved(dev):
        return _state["live"]

    @staticmethod
    def memory_allocated(dev):
        return _state["live"]

    @staticmethod
    def empty_cache():
        pass


cuda = _Cuda


def empty(n, dtype, device):
    _made[0] += 1
    if _made[0] > int(os.environ.get("FAKE_TORCH_CRASH_AFTER") or 1 << 62):
        os._exit(139)
    if _state["live"] + n > _state["limit"]:
        raise cuda.OutOfMemoryError(f"{n} bytes over the limit")
    _state["live"] += n
    return Tensor(np.zeros(n, np.uint8), root=True)


def frombuffer(buf, dtype):
    return Tensor(np.frombuffer(buf, dtype))
'''


def _fragmentation_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fragmentation", BENCH / "fragmentation.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


def test_fragmentation_runs_every_torch_scenario_in_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One subprocess per scenario paid PyTorch's import and CUDA start 8 times with --quick
    # (48 in a full run): more than the GPU check's share for this benchmark. Now one per peer.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    frag: object = _fragmentation_module()
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    scenarios = [(0.05, 0, "small"), (0.25, 0, "bytes"), (0.05, 1, "small")]
    calls: list[list[str]] = []
    real_run = subprocess.run

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return real_run(cmd, **kw)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    monkeypatch.setattr(subprocess, "run", run)
    got = frag.run_torch_subprocess("torch", dev, 64 << 20, scenarios)  # type: ignore[attr-defined]
    assert len(calls) == 1
    assert list(got) == scenarios
    for sc, res in got.items():
        assert res["available"], (sc, res)
        assert (res["live_fraction"], res["survivors_from"], res["limit"]) == (sc[0], sc[2], 64 << 20)
        assert res["verified"] and res["largest"] > 0
    # A worker that dies part way: what it reported stays, the rest is n/a with the reason.
    monkeypatch.setenv("FAKE_TORCH_CRASH_AFTER", "150")
    got = frag.run_torch_subprocess("torch", dev, 64 << 20, scenarios)  # type: ignore[attr-defined]
    assert list(got) == scenarios
    done = [sc for sc, res in got.items() if res["available"]]
    missing = [sc for sc, res in got.items() if not res["available"]]
    assert done and missing, got
    assert all("torch worker failed (rc 139)" in got[sc]["error"] for sc in missing)


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("alloc_latency.py", ["--device", "bogus"], "--device: device must be"),
        ("alloc_latency.py", ["--pairs", "-5"], "argument --pairs: expected an integer >= 1, got -5"),
        ("alloc_latency.py", ["--output", "."], "is a directory"),
        ("fragmentation.py", ["--seeds", "-1"], "argument --seeds: expected an integer >= 1"),
        ("fragmentation.py", ["--limit", "1MiB"], "--limit must be at least"),
        ("growth.py", ["--max-gib", "nan"], "argument --max-gib: expected a finite number > 0"),
        ("growth.py", ["--device", "cuda:x"], "--device: device must be"),
        ("sleep.py", ["--max-gib", "0.1"], "no size from 256 MiB to 8 GiB lies in"),
        ("sleep.py", ["--repeats", "0"], "argument --repeats: expected an integer >= 1"),
        ("host_scale.py", ["--pages", "-1"], "argument --pages: expected an integer >= 1"),
        ("cupy_pool.py", ["--device", "bogus"], "--device: device must be"),
        ("replay.py", ["--synthetic", "--json", "."], "--json '.' is a directory"),
    ],
)
def test_a_benchmark_refuses_bad_arguments_in_one_line(script: str, args: list[str], says: str) -> None:
    # Each was a traceback (exit status 1), or for --pairs -5 negative microseconds per pair
    # and "target met"; an --output directory failed only after the whole run, losing it.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and says in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")


def test_write_json_keeps_the_machine_facts(tmp_path: Path) -> None:
    # fragmentation.py's payload key "peers" (the allocators it compared) replaced the peers'
    # versions in every fragmentation result file.
    dev = vmmpool.Device.emulated(capacity=4 << 20)
    with pytest.raises(ValueError, match=r"payload keys \['peers'\]"):
        _common.write_json("x", dev, {"peers": ["a"]}, str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()
    out = tmp_path / "frag.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(BENCH / "fragmentation.py"), "--quick", "--limit", "32MiB",
         "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    doc = json.loads(out.read_text())
    assert set(doc["peers"]) == {"numpy", "cupy", "torch"}
    assert doc["compared"] == ["contiguous (same layout)"]


def test_replay_says_why_the_peers_did_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # --quick, --no-peers and scaled rows skipped the peer allocators without a word.
    bench = _replay_benchmark(monkeypatch)
    trace = tmp_path / "t.csv"
    trace.write_text("Thread,Time,Action,Pointer,Size,Stream\n1,0,allocate,0x10,100,0\n1,1,free,0x10,100,0\n")
    assert bench.main([str(trace), "--no-peers", "--scale", "0.5", "--json", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["peers_skipped"] == {
        "--no-peers": ["t.csv", "t.csv x0.5"],
    }
    assert "peer allocators not run on 2 row(s): --no-peers" in capsys.readouterr().out

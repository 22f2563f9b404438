"""Benchmarks: a --quick smoke run never replaces the committed results (issue 21)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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

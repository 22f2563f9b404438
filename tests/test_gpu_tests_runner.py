"""scripts/gpu_tests.py: the GPU check's test runner survives a crash and a hang of one test.

On the GPU a driver call that segfaults (or never returns) ended the whole pytest run:
every later test and the report were lost, with one try at a GPU. The runner records
the fatal test and runs the rest in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "scripts" / "gpu_tests.py"

TESTS = """
import os, signal, time, pytest

def test_pass(): pass
def test_fail(): assert False
def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)
def test_after_the_crash(): pass

@pytest.fixture
def broken():
    raise RuntimeError("setup")

def test_error(broken): pass
def test_skip(): pytest.skip("not here")
def test_hang(): time.sleep(60)
def test_last(): pass
"""


def run(tmp_path: Path, budget: float, per_test: float, *args: str) -> tuple[int, dict, str]:
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "t" / "test_fake.py").write_text(textwrap.dedent(TESTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_TESTS_")}
    out = subprocess.run(
        [sys.executable, str(RUNNER), "--out", str(tmp_path / "out"), "--name", "x",
         "--budget", str(budget), "--per-test", str(per_test), "--", "-q", "-p", "no:faulthandler",
         "t/test_fake.py", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    doc = json.loads((tmp_path / "out" / "x-tests.json").read_text())
    return out.returncode, doc, out.stdout + out.stderr


def test_a_crash_and_a_hang_cost_one_test_each(tmp_path: Path) -> None:
    rc, doc, text = run(tmp_path, 100, 2)
    assert rc == 1, text
    assert doc["counts"] == {"passed": 3, "failed": 1, "error": 1, "skipped": 1, "crashed": 1, "hung": 1}
    assert doc["not_passed"] == {
        "t/test_fake.py::test_fail": "failed",
        "t/test_fake.py::test_crash": "crashed",
        "t/test_fake.py::test_error": "error",
        "t/test_fake.py::test_hang": "hung",
    }
    assert [a.get("fatal", {}).get("kind") for a in doc["attempts"]] == ["crashed", "hung", None]
    assert not doc["timed_out"]
    assert "test_hang" in (tmp_path / "out" / "hang-x-2.txt").read_text()  # its stack
    assert "CRASHED" in text and "HUNG" in text


def test_out_of_budget_reports_what_ran(tmp_path: Path) -> None:
    rc, doc, text = run(tmp_path, 12, 0, "-k", "pass or hang")  # no watchdog: the budget ends it
    assert rc == 124, text
    assert doc["timed_out"] and doc["running_at_deadline"] == "t/test_fake.py::test_hang"
    assert doc["counts"]["passed"] == 1
    assert (tmp_path / "out" / "junit-x-1.xml").exists()  # pytest wrote its report at SIGINT


def test_all_passing_is_status_0(tmp_path: Path) -> None:
    rc, doc, text = run(tmp_path, 60, 30, "-k", "test_pass or test_last or test_skip")
    assert rc == 0, text
    assert doc["counts"]["passed"] == 2 and doc["counts"]["skipped"] == 1
    assert len(doc["attempts"]) == 1 and doc["not_passed"] == {}

"""Run pytest for ``scripts/gpu_check.sh`` so that a crash or a hang costs one test, not the run.

The GPU check has one try on a GPU. A plain ``pytest`` run that segfaults in a driver
call (or hangs in one) loses every later test, and its report: pytest writes its
summary and JUnit XML only at the end. So this runs pytest with a small plugin (this
module, loaded with ``-p gpu_tests``) that

* writes each test's start and outcome to a progress file as it happens (flushed, so
  it survives a crash of the process);
* arms ``faulthandler.dump_traceback_later(PER_TEST, exit=True)`` around each test:
  a test that runs longer dumps every thread's stack to a file and ends the process;

and, when pytest dies inside a test (a signal, or the watchdog), records that test as
``crashed`` or ``hung`` and runs pytest again on the tests not yet run (the finished and
the fatal ones deselected), until every test has run or the budget is spent. At the
deadline pytest gets SIGINT (it then reports what ran), then SIGKILL.

Usage::

    python scripts/gpu_tests.py --out DIR --name NAME --budget SECONDS [--per-test SECONDS] \\
        -- PYTEST_ARGS...

Writes ``DIR/NAME-tests.json`` (not ``tests-NAME.json``: ``*-cuda.json`` are the
benchmarks' results): counts (passed, failed, error, skipped, crashed, hung), the
failed/crashed/hung test ids, the test running at the deadline, every attempt's exit
status and seconds; and per attempt ``DIR/junit-NAME-N.xml`` (when pytest got to write it) and
``DIR/hang-NAME-N.txt`` (the stacks of a hung test). Exit status: 0 when every test
passed or skipped; 1 on any failure, error, crash or hang; 124 when the budget ran out
first (and nothing failed).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------- the plugin
_ENV_PROGRESS = "GPU_TESTS_PROGRESS"
_ENV_SKIP = "GPU_TESTS_SKIP"
_ENV_PER_TEST = "GPU_TESTS_PER_TEST"
_ENV_HANG = "GPU_TESTS_HANG_FILE"

_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
_outcomes: dict[str, str] = {}
_progress_fd: int | None = None
_hang_file: Any = None


def _note(line: str) -> None:
    if _progress_fd is not None:
        os.write(_progress_fd, (line + "\n").encode("utf-8", "replace"))


def pytest_configure(config: Any) -> None:
    global _progress_fd, _hang_file
    path = os.environ.get(_ENV_PROGRESS)
    if path:
        _progress_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    hang = os.environ.get(_ENV_HANG)
    if hang:
        _hang_file = open(hang, "w")  # kept open: faulthandler writes to it when a test hangs


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    path = os.environ.get(_ENV_SKIP)
    if not path or not os.path.exists(path):
        return
    skip = set(Path(path).read_text().splitlines())
    keep = [i for i in items if i.nodeid not in skip]
    drop = [i for i in items if i.nodeid in skip]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _note(f"start\t{nodeid}")


def pytest_runtest_logreport(report: Any) -> None:
    if report.passed:
        outcome = "passed"
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = "failed" if report.when == "call" else "error"
    old = _outcomes.get(report.nodeid, "passed")
    _outcomes[report.nodeid] = outcome if _RANK[outcome] > _RANK[old] else old


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _note(f"end\t{nodeid}\t{_outcomes.pop(nodeid, 'passed')}")


def _watchdog_seconds() -> float:
    try:
        return float(os.environ.get(_ENV_PER_TEST, "0"))
    except ValueError:
        return 0.0


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - the runner itself needs no pytest
    _pytest = None  # type: ignore[assignment]

if _pytest is not None:

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item: Any, nextitem: Any) -> Iterator[None]:
        seconds = _watchdog_seconds()
        if seconds > 0:
            # Written only when it fires ("Timeout (h:mm:ss)!" and every thread's stack).
            out = _hang_file if _hang_file is not None else sys.__stderr__
            faulthandler.dump_traceback_later(seconds, exit=True, file=out)
        try:
            yield
        finally:
            if seconds > 0:
                faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------ the runner
def _read_progress(path: Path) -> tuple[list[str], dict[str, str]]:
    started: list[str] = []
    ended: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if parts[0] == "start" and len(parts) >= 2:
                started.append(parts[1])
            elif parts[0] == "end" and len(parts) >= 3:
                ended[parts[1]] = parts[2]
    return started, ended


def run(out: Path, name: str, budget: float, per_test: float, pytest_args: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + budget
    outcomes: dict[str, str] = {}  # nodeid -> passed/failed/error/skipped/crashed/hung
    attempts: list[dict[str, Any]] = []
    running_at_deadline: str | None = None
    timed_out = False
    after_tests: list[str] = []
    skip_file = out / f"skip-{name}.txt"
    attempt = 0
    while True:
        left = deadline - time.monotonic()
        if left < 10:
            timed_out = True
            break
        attempt += 1
        progress = out / f"progress-{name}-{attempt}.txt"
        hang = out / f"hang-{name}-{attempt}.txt"
        junit = out / f"junit-{name}-{attempt}.xml"
        for p in (progress, hang, junit):
            p.unlink(missing_ok=True)
        skip_file.write_text("".join(n + "\n" for n in outcomes))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
        env[_ENV_PROGRESS] = str(progress)
        env[_ENV_SKIP] = str(skip_file)
        env[_ENV_PER_TEST] = str(per_test)
        env[_ENV_HANG] = str(hang)
        cmd = [sys.executable, "-u", "-m", "pytest", "-p", "gpu_tests", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *pytest_args]
        if attempt > 1:
            print(f"== {name}: attempt {attempt}, {len(outcomes)} tests done or fatal, "
                  f"{left:.0f} s left ==", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env)
        stopped = False
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGINT)  # pytest reports what ran and writes its XML
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        started, ended = _read_progress(progress)
        outcomes.update(ended)
        dangling = [n for n in started if n not in ended]
        record: dict[str, Any] = {"attempt": attempt, "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                                  "tests_ended": len(ended),
                                  "junit": junit.name if junit.exists() else None}
        attempts.append(record)
        if stopped:
            timed_out = True
            running_at_deadline = dangling[-1] if dangling else None
            break
        if dangling:
            fatal = dangling[-1]
            hung = hang.exists() and hang.stat().st_size > 0
            outcomes[fatal] = "hung" if hung else "crashed"
            record["fatal"] = {"test": fatal, "kind": outcomes[fatal]}
            if hung:
                print(f"== {name}: {fatal} HUNG (more than {per_test:.0f} s); stacks in {hang} ==",
                      flush=True)
                sys.stdout.write(hang.read_text(errors="replace")[-20000:])
            else:
                print(f"== {name}: {fatal} CRASHED the interpreter (exit status {rc}) ==", flush=True)
            continue  # the tests not run yet, in a fresh process
        if rc not in (0, 1, 5):
            # Not a test: collection, a usage error, or the interpreter dying after the tests.
            after_tests.append(f"pytest exit status {rc} outside any test (attempt {attempt})")
        break
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "crashed", "hung")}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    bad = {n: o for n, o in outcomes.items() if o in ("failed", "error", "crashed", "hung")}
    summary = {
        "name": name,
        "pytest_args": pytest_args,
        "budget_s": budget,
        "per_test_s": per_test,
        "seconds": round(time.monotonic() - start, 1),
        "counts": counts,
        "not_passed": bad,
        "timed_out": timed_out,
        "running_at_deadline": running_at_deadline,
        "problems_outside_tests": after_tests,
        "attempts": attempts,
    }
    (out / f"{name}-tests.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"== {name}: {json.dumps(counts)}; {len(attempts)} attempt(s)"
          + ("; OUT OF TIME" + (f" in {running_at_deadline}" if running_at_deadline else "")
             if timed_out else "") + " ==", flush=True)
    for n, o in bad.items():
        print(f"   {o.upper()}: {n}", flush=True)
    if bad or after_tests:
        return 1
    return 124 if timed_out else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--budget", required=True, type=float, help="seconds for every attempt together")
    p.add_argument("--per-test", type=float, default=180.0,
                   help="a test running longer is stopped as hung (default 180; 0: no watchdog)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
    return run(a.out, a.name, a.budget, a.per_test, args)


if __name__ == "__main__":
    sys.exit(main())

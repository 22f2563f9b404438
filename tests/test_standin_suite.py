"""The backend-parametrized suite through the real ``cuda.bindings`` on the stand-in driver.

``tests/standin_driver/standin_cuda.c`` is compiled (once per session, with
the system C compiler) into a ``libcuda.so.1``; a subprocess pytest with
``LD_LIBRARY_PATH`` naming it runs every test taking the ``device`` fixture
(resources, pool, buffer, buffer faults, contract, PyTorch callbacks, replay streams) plus the stand-in's own
tests (``test_cuda_standin.py``) with ``--device-kind=cuda-standin``: the
real CUDA backend, argument conversion, return unwrapping and error names of
the installed cuda-bindings, on host memory. A second run repeats the
contract and stand-in tests with the driver's other documented answers (a
non-zero map offset refused, hinted reservations refused, the POSIX fd
handle type refused, GPUDirect RDMA supported, CUDA_ERROR_INVALID_VALUE for
an absent device).

Without a C compiler the tests skip and say so; ``VMMPOOL_REQUIRE_STANDIN=1``
(set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from standin_driver import build as standin_build

TESTS = Path(__file__).parent
ROOT = TESTS.parent
REQUIRE = os.environ.get("VMMPOOL_REQUIRE_STANDIN", "") == "1"

SUITE = [
    "test_resources.py",
    "test_pool.py",
    "test_buffer.py",
    "test_buffer_faults.py",
    "test_buffer_pool.py",
    "test_dlpack.py",
    "test_contract.py",
    "test_cuda_standin.py",
    "test_torch.py",
    "test_share.py",
    "test_replay.py",
    # Every other file with `device`-parametrized tests: each runs on a GPU under
    # scripts/gpu_check.sh, so each must first pass on the stand-in (a fake stream
    # handle in test_pool_lifetime.py segfaulted here: it would have on a GPU too).
    "test_events.py",
    "test_host_scale.py",
    "test_observe.py",
    "test_pool_lifetime.py",
    "test_process.py",
    "test_sleep.py",
    "test_pool_views.py",
]

#: The documented answers the default stand-in does not give.
OTHER_ANSWERS = {
    "STANDIN_CUDA_MAP_OFFSET": "reject",
    "STANDIN_CUDA_HINT": "refuse",
    "STANDIN_CUDA_POSIX_FD": "refuse",
    "STANDIN_CUDA_RDMA": "1",
    "STANDIN_CUDA_ABSENT_DEVICE": "invalid_value",
}


@pytest.fixture(scope="session")
def standin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = standin_build.unavailable_reason()
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"VMMPOOL_REQUIRE_STANDIN=1 but {reason}")
        pytest.skip(reason)
    return standin_build.build(tmp_path_factory.mktemp("standin-cuda"))


def _run(lib: Path, files: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("VMMPOOL_REQUIRE_CUDA", None)
    for key in list(env):
        if key.startswith("STANDIN_CUDA_"):
            del env[key]
    env["LD_LIBRARY_PATH"] = str(lib.parent) + (
        os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
    )
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra_env)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "--device-kind=cuda-standin",
        *(str(TESTS / f) for f in files),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)


def _assert_passed(proc: subprocess.CompletedProcess[str]) -> None:
    tail = (proc.stdout + proc.stderr)[-12000:]
    assert proc.returncode == 0, f"stand-in run failed (rc {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
    assert " skipped" not in proc.stdout, f"nothing may skip on the stand-in:\n{tail}"


def test_suite_on_the_standin_driver(standin_lib: Path) -> None:
    _assert_passed(_run(standin_lib, SUITE, {}))


def test_contract_on_the_standin_drivers_other_answers(standin_lib: Path) -> None:
    _assert_passed(_run(standin_lib, ["test_contract.py", "test_cuda_standin.py"], OTHER_ANSWERS))


def _files_with_device_tests() -> set[str]:
    """Test files with a test (or a fixture) that takes the ``device`` fixture."""
    import ast

    def takes_device(node: ast.stmt) -> bool:
        return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
            a.arg == "device" for a in node.args.args
        )

    out = set()
    for path in TESTS.glob("test_*.py"):
        body = ast.parse(path.read_text()).body
        members = [n for c in body if isinstance(c, ast.ClassDef) for n in c.body]
        if any(takes_device(n) for n in body + members):  # module-level and class-level defs
            out.add(path.name)
    return out


def test_every_file_with_device_tests_runs_on_the_standin() -> None:
    # A `device`-parametrized test runs on the GPU in scripts/gpu_check.sh: it must have
    # passed on the stand-in first (a file left out hid a segfault until then).
    missing = sorted(_files_with_device_tests() - set(SUITE))
    assert not missing, f"add to SUITE: {missing}"

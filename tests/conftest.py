"""Shared fixtures: every behaviour test runs once per available backend.

``device`` is parametrized over ``host`` (a fresh emulated device with a small
capacity, so out-of-memory is reachable) and ``cuda`` (``Device(0)``). Without a
GPU the cuda case is skipped with the probe's reason; with
``VMMPOOL_REQUIRE_CUDA=1`` (set by ``scripts/gpu_check.sh``) that skip becomes
a failure. After each test the fixture checks that the device's live resources
are back where they started: a leak fails the test that caused it.

A third device kind, ``cuda-standin``, is the real CUDA backend and the real
``cuda.bindings`` on the stand-in driver of ``tests/standin_driver`` (a
``libcuda.so.1`` on host memory). The driver must be loaded before
``cuda.bindings`` initialises, so that kind runs in a subprocess started by
``tests/test_standin_suite.py`` as ``pytest --device-kind=cuda-standin`` with
``LD_LIBRARY_PATH`` naming the built library. In that run ``device`` is only
``cuda-standin``, tests that do not take ``device`` (or ``standin``) are
deselected, and the leak check also asks the stand-in driver itself.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator

import pytest

import vmmpool
from vmmpool._backends import cuda as _cuda

REQUIRE_CUDA = os.environ.get("VMMPOOL_REQUIRE_CUDA", "") == "1"

#: Capacity of the emulated device each host test gets.
HOST_CAPACITY = 64 << 20

STANDIN = "cuda-standin"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device-kind",
        choices=["default", STANDIN],
        default="default",
        help="default: host and cuda; cuda-standin: the CUDA backend on the stand-in driver "
        "(needs LD_LIBRARY_PATH naming the stand-in libcuda.so.1; see tests/test_standin_suite.py)",
    )


def _standin_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--device-kind") == STANDIN)


def pytest_configure(config: pytest.Config) -> None:
    if _standin_mode(config):
        reason = _cuda.probe(0)
        if reason is not None:
            raise pytest.UsageError(
                f"--device-kind={STANDIN}: the stand-in driver is not loaded ({reason}); "
                "set LD_LIBRARY_PATH to the directory of the built libcuda.so.1"
            )


@pytest.hookimpl(tryfirst=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that takes the ``cuda`` fixture is marked ``cuda`` (so ``-m cuda`` selects it:
    scripts/gpu_check.sh runs the GPU tests first that way), as the ``device`` case is."""
    if "cuda" in getattr(item, "fixturenames", ()) and item.get_closest_marker("cuda") is None:
        item.add_marker(pytest.mark.cuda)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    standin = _standin_mode(config)
    keep, drop = [], []
    for item in items:
        names = getattr(item, "fixturenames", ())
        wants_standin = "standin" in names
        if standin:
            ok = "device" in names or wants_standin
        else:
            ok = not wants_standin  # stand-in tests run in the subprocess only
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        if _standin_mode(metafunc.config):
            params = [pytest.param(STANDIN, id=STANDIN)]
        else:
            params = [
                pytest.param("host", id="host"),
                pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
            ]
        metafunc.parametrize("device", params, indirect=True)


@pytest.fixture(autouse=True)
def _no_gpu_peers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the replay CLI's GPU peer allocators off, unless a test is marked ``gpu_peers``.

    ``python -m vmmpool replay`` runs PyTorch's and CuPy's allocators (a subprocess each, a
    dozen with ``--min-limit``) wherever a GPU is usable. Without this, each CLI replay test
    spent up to a minute in them under ``scripts/gpu_check.sh`` (the run's test budget is
    300 s), testing nothing it asserts. Tests that patch ``gpu_unavailable_reason``
    themselves still do (their patch comes later).
    """
    if request.node.get_closest_marker("gpu_peers") is not None:
        return
    from vmmpool.replay import _peers

    monkeypatch.setattr(
        _peers, "gpu_unavailable_reason",
        lambda: "the GPU peers are off in the test suite (mark a test gpu_peers)",
    )


def cuda_device_or_skip(ordinal: int = 0) -> vmmpool.Device:
    """``Device(ordinal)``, or skip (fail under VMMPOOL_REQUIRE_CUDA=1) with the probe's reason."""
    reason = _cuda.probe(ordinal)
    if reason is not None:
        if REQUIRE_CUDA:
            pytest.fail(f"CUDA required (VMMPOOL_REQUIRE_CUDA=1) but unavailable: {reason}")
        pytest.skip(f"no usable CUDA device: {reason}")
    return vmmpool.Device(ordinal)


class StandinDriver:
    """The stand-in driver's control functions (``standin_*`` in standin_cuda.c)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")  # the copy cuda.bindings loaded
        self.lib.standin_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        self.lib.standin_calls.argtypes = [ctypes.c_char_p]
        self.lib.standin_calls.restype = ctypes.c_long
        self.lib.standin_handle_flags.argtypes = [ctypes.c_ulonglong]

    def fail(self, function: str, code: int, nth: int = 1) -> None:
        """Make the `nth` call of `function` from now return `code` (a ``CUresult``)."""
        assert self.lib.standin_fail(function.encode(), nth, int(code)) == 0

    def clear_faults(self) -> None:
        self.lib.standin_clear_faults()

    def calls(self, function: str) -> int:
        return int(self.lib.standin_calls(function.encode()))

    def live(self) -> tuple[int, int, int, int, int]:
        """(reservations, allocations, mappings, physical bytes, primary context refs)."""
        out = (ctypes.c_long * 5)()
        self.lib.standin_live(out)
        return (out[0], out[1], out[2], out[3], out[4])

    def handle_flags(self, handle: int) -> int:
        """Bit 0: POSIX fd handle type; bit 1: gpuDirectRDMACapable; -1: not a live handle."""
        return int(self.lib.standin_handle_flags(handle))


_STANDIN_DRIVER: StandinDriver | None = None


@pytest.fixture
def standin(request: pytest.FixtureRequest) -> StandinDriver:
    """The loaded stand-in driver's controls (tests taking it run only in the stand-in run)."""
    global _STANDIN_DRIVER
    if not _standin_mode(request.config):  # deselected in the default run; direct use is an error
        pytest.fail(f"the standin fixture needs --device-kind={STANDIN}")
    if _STANDIN_DRIVER is None:
        _STANDIN_DRIVER = StandinDriver()
    _STANDIN_DRIVER.clear_faults()
    return _STANDIN_DRIVER


def _live(dev: vmmpool.Device) -> tuple[int, int, int]:
    gc.collect()
    return dev.counters().live


@pytest.fixture
def device(request: pytest.FixtureRequest) -> Iterator[vmmpool.Device]:
    """A device per backend; fails the test if it leaves live resources behind."""
    if request.param == "host":
        dev = vmmpool.Device.emulated(capacity=HOST_CAPACITY)
    else:
        dev = cuda_device_or_skip(0)
    driver = None
    if request.param == STANDIN:
        driver = request.getfixturevalue("standin")
    before = _live(dev)
    driver_before = driver.live()[:4] if driver is not None else None
    yield dev
    if driver is not None:
        driver.clear_faults()
    after = _live(dev)
    assert after == before, (
        f"live (reservations, allocations, mappings) went from {before} to {after}: a leak"
    )
    if driver is not None:
        driver_after = driver.live()[:4]
        assert driver_after == driver_before, (
            f"the stand-in driver's live (reservations, allocations, mappings, bytes) went from "
            f"{driver_before} to {driver_after}: a driver resource leaked"
        )


@pytest.fixture
def host() -> vmmpool.Device:
    """A fresh emulated host device (64 MiB) for host-only tests."""
    return vmmpool.Device.emulated(capacity=HOST_CAPACITY)


@pytest.fixture
def cuda() -> vmmpool.Device:
    """``Device(0)``; skips without a GPU (fails under VMMPOOL_REQUIRE_CUDA=1)."""
    return cuda_device_or_skip(0)

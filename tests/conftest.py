"""Shared fixtures: every behaviour test runs once per available backend.

``device`` is parametrized over ``host`` (a fresh emulated device with a small
capacity, so out-of-memory is reachable) and ``cuda`` (``Device(0)``). Without a
GPU the cuda case is skipped with the probe's reason; with
``VMMPOOL_REQUIRE_CUDA=1`` (set by ``scripts/gpu_check.sh``) that skip becomes
a failure. After each test the fixture checks that the device's live resources
are back where they started: a leak fails the test that caused it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

import vmmpool
from vmmpool._backends import cuda as _cuda

REQUIRE_CUDA = os.environ.get("VMMPOOL_REQUIRE_CUDA", "") == "1"

#: Capacity of the emulated device each host test gets.
HOST_CAPACITY = 64 << 20


def cuda_device_or_skip(ordinal: int = 0) -> vmmpool.Device:
    """``Device(ordinal)``, or skip (fail under VMMPOOL_REQUIRE_CUDA=1) with the probe's reason."""
    reason = _cuda.probe(ordinal)
    if reason is not None:
        if REQUIRE_CUDA:
            pytest.fail(f"CUDA required (VMMPOOL_REQUIRE_CUDA=1) but unavailable: {reason}")
        pytest.skip(f"no usable CUDA device: {reason}")
    return vmmpool.Device(ordinal)


def _live(dev: vmmpool.Device) -> tuple[int, int, int]:
    gc.collect()
    return dev.counters().live


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> Iterator[vmmpool.Device]:
    """A device per backend; fails the test if it leaves live resources behind."""
    if request.param == "host":
        dev = vmmpool.Device.emulated(capacity=HOST_CAPACITY)
    else:
        dev = cuda_device_or_skip(0)
    before = _live(dev)
    yield dev
    after = _live(dev)
    assert after == before, (
        f"live (reservations, allocations, mappings) went from {before} to {after}: a leak"
    )


@pytest.fixture
def host() -> vmmpool.Device:
    """A fresh emulated host device (64 MiB) for host-only tests."""
    return vmmpool.Device.emulated(capacity=HOST_CAPACITY)


@pytest.fixture
def cuda() -> vmmpool.Device:
    """``Device(0)``; skips without a GPU (fails under VMMPOOL_REQUIRE_CUDA=1)."""
    return cuda_device_or_skip(0)

"""JAX imports vmmpool memory without a copy (DLPack, ``kDLCPU`` on the host emulator)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import vmmpool


def test_jax_imports_a_view_zero_copy(host: vmmpool.Device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    jax = pytest.importorskip("jax")

    pool = vmmpool.PagePool(host, limit=4 * host.granularity)
    a = pool.malloc(4096)
    v = a.view("float32", (32, 32))
    np.from_dlpack(v)[:] = np.arange(1024, dtype=np.float32).reshape(32, 32)
    x = jax.dlpack.from_dlpack(v)
    assert x.unsafe_buffer_pointer() == a.ptr  # the same memory: no copy
    assert x.shape == (32, 32) and x.dtype == np.float32
    assert float(x[3, 5]) == 3 * 32 + 5
    with pytest.raises(BufferError):
        a.free()  # JAX's array uses the memory
    del x, v
    gc.collect()
    a.free()
    pool.close()
    assert host.counters().live == (0, 0, 0)

"""JAX imports vmmpool memory without a copy (DLPack, ``kDLCPU`` on the host emulator).

JAX runs in a subprocess: importing it registers an ``os.fork()`` warning
("JAX is multithreaded") that would turn every later in-process fork of the
suite into an error (warnings are errors here).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
    import gc
    import jax
    import numpy as np
    import vmmpool

    host = vmmpool.Device.emulated(capacity=64 << 20)
    pool = vmmpool.PagePool(host, limit=4 * host.granularity)
    a = pool.malloc(4096)
    v = a.view("float32", (32, 32))
    np.from_dlpack(v)[:] = np.arange(1024, dtype=np.float32).reshape(32, 32)
    x = jax.dlpack.from_dlpack(v)
    assert x.unsafe_buffer_pointer() == a.ptr, (hex(x.unsafe_buffer_pointer()), hex(a.ptr))  # no copy
    assert x.shape == (32, 32) and x.dtype == np.float32
    assert float(x[3, 5]) == 3 * 32 + 5
    try:
        a.free()  # JAX's array uses the memory
    except BufferError:
        print("refused while JAX uses it")
    del x, v
    gc.collect()
    a.free()
    # JAX clears the capsule's destructor as it takes it: the export's record must still go.
    records = len(vmmpool._dlpack._capsules)
    b = pool.malloc(4096)
    for _ in range(3):
        y = jax.dlpack.from_dlpack(b.view("float32"))
        del y
        gc.collect()
    assert len(vmmpool._dlpack._capsules) == records, (records, len(vmmpool._dlpack._capsules))
    b.free()
    pool.close()
    print("jax", jax.__version__, "live", host.counters().live)
"""


def test_jax_imports_a_view_zero_copy() -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (the test extra installs it)")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "refused while JAX uses it" in out.stdout
    assert "live (0, 0, 0)" in out.stdout, out.stdout

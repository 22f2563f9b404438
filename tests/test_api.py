"""The public surface: names exported, CLI."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vmmpool

PUBLIC = {
    "Access",
    "AddressReservation",
    "Allocation",
    "AllocationInfo",
    "ArrayView",
    "AsleepError",
    "GrowableBuffer",
    "PageInfo",
    "PagePool",
    "PoolStats",
    "SleepStats",
    "SharedMapping",
    "SharedMemoryHandle",
    "stream_key",
    "BackendCounters",
    "ClosedError",
    "Device",
    "DeviceUnavailableError",
    "DriverError",
    "ExportAsleepError",
    "ExportClosedError",
    "ForkedError",
    "HandleType",
    "Mapping",
    "OutOfMemoryError",
    "PhysicalAllocation",
    "VmmError",
    "VmmWarning",
    "__version__",
    "create",
    "default_device",
    "devices",
    "reserve",
}


def test_all_is_pinned() -> None:
    names = set(vmmpool.__all__)
    assert names == PUBLIC
    for name in names:
        assert hasattr(vmmpool, name), name
    assert len(vmmpool.__all__) == len(names), "duplicates in __all__"


def test_export_errors_are_public_and_caught_by_both_bases() -> None:
    # A DLPack export of closed or sleeping memory raises these; code that wants to tell
    # them from other BufferErrors imports them from the package, not a private module.
    assert issubclass(vmmpool.ExportClosedError, vmmpool.ClosedError)
    assert issubclass(vmmpool.ExportClosedError, BufferError)
    assert issubclass(vmmpool.ExportAsleepError, vmmpool.AsleepError)
    assert issubclass(vmmpool.ExportAsleepError, BufferError)
    buf = vmmpool.GrowableBuffer(1 << 20, device=vmmpool.Device.emulated(capacity=64 << 20))
    buf.close()
    with pytest.raises(vmmpool.ExportClosedError, match="closed"):
        buf.__dlpack__()


def test_dir_shows_only_public_names() -> None:
    # Issue 21: dir(vmmpool) listed `annotations`, `logging` and every private module.
    code = (
        "import vmmpool; before = dir(vmmpool); import vmmpool.replay, vmmpool.plot; "
        "print(repr((before, dir(vmmpool), sorted(vars(vmmpool)))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, names = ast.literal_eval(out.stdout)
    assert before == sorted(PUBLIC | {"__version__"})
    assert after == sorted(PUBLIC | {"__version__", "plot", "replay"})
    assert "annotations" not in names and "logging" not in names


def test_cli_info_lists_host_device() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vmmpool", "info"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "\nhost\n" in out.stdout
    assert "host emulator" in out.stdout
    assert "granularity:  2 MiB minimum, 2 MiB recommended" in out.stdout
    assert "POSIX fd:     yes" in out.stdout


def test_cli_rejects_unknown_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vmmpool", "frobnicate"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_cli_output_to_a_closed_pipe_ends_quietly() -> None:
    # `python -m vmmpool demo | head -c1`: the reader goes away; the CLI ends with 141 (128 +
    # SIGPIPE, as a shell reports it) and no BrokenPipeError traceback.
    _ends_quietly_on_a_closed_pipe([sys.executable, "-m", "vmmpool", "demo", "--device", "host"])


def _ends_quietly_on_a_closed_pipe(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run `cmd`, read one byte of its output, close the pipe: status 141, no traceback."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(1)
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_the_vmmpool_script_ends_quietly_on_a_closed_pipe_too() -> None:
    # The `vmmpool` console script (pyproject's [project.scripts]) called main(), not the
    # wrapper `python -m vmmpool` runs: `vmmpool demo | head -c1` printed a BrokenPipeError.
    root = Path(__file__).resolve().parent.parent
    found = re.search(r'^vmmpool = "(.+)"$', (root / "pyproject.toml").read_text(), re.M)
    assert found is not None
    target = found.group(1)
    module, func = target.split(":")
    code = f"import sys; from {module} import {func}; sys.argv[1:] = ['demo', '--device', 'host']; " \
        f"sys.exit({func}())"
    _ends_quietly_on_a_closed_pipe(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(root)}
    )


def test_every_object_names_its_first_byte_address() -> None:
    dev = vmmpool.Device.emulated(capacity=16 << 20)
    with vmmpool.PagePool(dev, limit=8 << 20) as pool:
        a = pool.malloc(1000)
        v = a.view("uint8")
        assert a.address == a.ptr and v.address == v.ptr == a.ptr
        assert pool.snapshot()[0].allocations[0].address == a.address
        del v
        a.free()
    buf = vmmpool.GrowableBuffer(max_size=8 << 20, device=dev, initial_size=2 << 20)
    assert buf.address == buf.ptr
    buf.close()

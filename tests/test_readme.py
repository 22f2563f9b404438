"""README's Python examples run as written (on the host emulator)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.fixture(autouse=True)
def restore_cupy_allocator() -> Iterator[None]:
    # The "Using with CuPy" example installs a process-wide allocator.
    try:
        import cupy
    except ImportError:
        yield
        return
    previous = cupy.cuda.get_allocator()
    yield
    cupy.cuda.set_allocator(previous)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = BLOCKS[index]
    namespace: dict[str, object] = {"__name__": f"readme_block_{index}"}
    with warnings.catch_warnings():
        # The CuPy example names no device: without a GPU it warns (by design) that
        # CuPy kernels will fail on host memory; the example still runs.
        warnings.filterwarnings("ignore", r"vmmpool\.cupy\.MemoryPool\(\): CuPy sees no GPU", UserWarning)
        exec(compile(code, f"README.md block {index}", "exec"), namespace)
    # Expected output, where the block states it as "# -> text" on a print line.
    out = capsys.readouterr().out
    for expected in re.findall(r"#\s*->\s*(.+)", code):
        assert expected.strip() in out

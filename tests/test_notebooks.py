"""The teaching notebooks run top to bottom (their cells assert their results)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

sys.path.insert(0, str(ROOT / "scripts"))
from build_notebooks import cells_of  # noqa: E402

sys.path.pop(0)


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ has no .ipynb"


def stored_images(cell: dict) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs; every cell whose stored output has figures draws them again."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = json.loads(path.read_text())
    namespace: dict[str, object] = {"__name__": "__main__"}
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")  # figures other tests left open are not ours
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile("".join(cell["source"]), f"{path.name} cell {i}", "exec"), namespace)
        plt = sys.modules.get("matplotlib.pyplot")
        drawn = len(plt.get_fignums()) if plt is not None else 0
        if plt is not None:
            plt.close("all")
        assert drawn == stored_images(cell), (
            f"{path.name} cell {i}: stored outputs hold {stored_images(cell)} figure(s), "
            f"running it drew {drawn}"
        )


def test_notebooks_teach_with_figures() -> None:
    """Each notebook stores at least one figure (built by scripts/build_notebooks.py)."""
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        assert sum(stored_images(c) for c in cells) >= 1, f"{path.name} stores no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path: Path) -> None:
    src = ROOT / "notebooks" / "src" / (path.stem + ".py")
    nb = json.loads(path.read_text())
    built = [("".join(c["source"])) for c in nb["cells"]]
    assert built == [body for _, body in cells_of(src.read_text())], (
        f"{path.name} is stale: run python scripts/build_notebooks.py"
    )

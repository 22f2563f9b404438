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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path) -> None:
    nb = json.loads(path.read_text())
    namespace: dict[str, object] = {"__name__": "__main__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile("".join(cell["source"]), f"{path.name} cell {i}", "exec"), namespace)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path: Path) -> None:
    src = ROOT / "notebooks" / "src" / (path.stem + ".py")
    nb = json.loads(path.read_text())
    built = [("".join(c["source"])) for c in nb["cells"]]
    assert built == [body for _, body in cells_of(src.read_text())], (
        f"{path.name} is stale: run python scripts/build_notebooks.py"
    )

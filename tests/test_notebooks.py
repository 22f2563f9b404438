"""The teaching notebooks run top to bottom (their cells assert their results)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

import vmmpool

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

sys.path.insert(0, str(ROOT / "scripts"))
from build_notebooks import cells_of  # noqa: E402

sys.path.pop(0)


def gpu_usable() -> bool:
    try:
        vmmpool.Device("cuda:0")
    except vmmpool.DeviceUnavailableError:
        return False
    return True


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ has no .ipynb"


def stored_images(cell: dict) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def stored_stdout(cell: dict) -> str:
    return "".join(
        "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


HEX = re.compile(r"0x[0-9a-fA-F]+")
TIMED = re.compile(r"\d+(\.\d+)?\s*(us|ms|s)\b")
NUMBER = re.compile(r"\d+(\.\d+)?")


def comparable(text: str) -> list[str]:
    """Printed text without what changes between runs: addresses, and the figures of timed lines."""
    return [
        " ".join(NUMBER.sub("#", line).split()) if TIMED.search(line) else line
        for line in HEX.sub("0x?", text).splitlines()
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs, prints what its stored output says, and draws its stored figures again.

    Printed text is compared without addresses and timings. A cell that probes a
    GPU (``Device("cuda...``) prints something else where one is usable, so its text
    is compared only where none is (the stored outputs are made on the host emulator).
    """
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = json.loads(path.read_text())
    namespace: dict[str, object] = {"__name__": "__main__"}
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")  # figures other tests left open are not ours
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        printed = io.StringIO()
        source = "".join(cell["source"])
        with contextlib.redirect_stdout(printed):
            exec(compile(source, f"{path.name} cell {i}", "exec"), namespace)
        if not ('Device("cuda' in source and gpu_usable()):
            assert comparable(printed.getvalue()) == comparable(stored_stdout(cell)), (
                f"{path.name} cell {i}: its stored output is stale (run python "
                f"scripts/build_notebooks.py {path.stem}); it now prints:\n{printed.getvalue()}"
            )
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

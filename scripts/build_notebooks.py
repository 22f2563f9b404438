"""Build notebooks/*.ipynb from notebooks/src/*.py and run them to fill in outputs.

Source format: cells separated by lines starting with ``# %%``; a cell whose
marker line is ``# %% [markdown]`` holds Markdown in ``#``-prefixed lines.
Each code cell runs in one shared namespace; its printed output becomes the
cell's output, and every matplotlib figure it leaves open is stored as a PNG
image output (then closed), as Jupyter's inline backend would show it, so the
committed notebooks show what they print and draw. Run with
``python scripts/build_notebooks.py`` (no Jupyter needed; matplotlib for the
figures: ``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"


def cells_of(text: str) -> list[tuple[str, str]]:
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        out.append((kind, "\n".join(lines)))
    return out


def take_figures() -> list[dict[str, Any]]:
    """Every open matplotlib figure as a notebook image output; closes them."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    outputs = []
    for num in plt.get_fignums():
        fig = plt.figure(num)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
        outputs.append(
            {
                "data": {
                    "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                    "text/plain": [f"<Figure {num}>"],
                },
                "metadata": {},
                "output_type": "display_data",
            }
        )
    plt.close("all")
    return outputs


def build(src: Path) -> Path:
    os.environ["MPLBACKEND"] = "Agg"
    namespace: dict[str, object] = {"__name__": "__main__"}
    nb_cells = []
    count = 0
    for kind, body in cells_of(src.read_text()):
        source = [ln + "\n" for ln in body.splitlines()]
        if source:
            source[-1] = source[-1].rstrip("\n")
        if kind == "markdown":
            nb_cells.append({"cell_type": "markdown", "metadata": {}, "source": source})
            continue
        count += 1
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(body, f"{src.name} cell {count}", "exec"), namespace)
        outputs: list[dict[str, Any]] = []
        if buf.getvalue():
            outputs.append({"name": "stdout", "output_type": "stream", "text": buf.getvalue()})
        outputs.extend(take_figures())
        nb_cells.append(
            {
                "cell_type": "code",
                "execution_count": count,
                "metadata": {},
                "outputs": outputs,
                "source": source,
            }
        )
    nb = {
        "cells": nb_cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    dest = OUT / (src.stem + ".ipynb")
    dest.write_text(json.dumps(nb, indent=1) + "\n")
    return dest


def main() -> int:
    names = sys.argv[1:]
    for src in sorted(SRC.glob("*.py")):
        if names and src.stem not in names:
            continue
        print("built", build(src).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

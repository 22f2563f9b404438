"""The pictures render: each plot function draws a non-empty PNG with the Agg backend."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

import vmmpool

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vmmpool import plot  # noqa: E402

MiB = 1 << 20


def png_pixels(fig: object) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    buf.seek(0)
    return plt.imread(buf)


def assert_drawn(fig: object) -> np.ndarray:
    img = png_pixels(fig)
    flat = img.reshape(-1, img.shape[-1])
    # Not a blank canvas: many distinct colours, and non-white pixels.
    assert len(np.unique(flat.round(2), axis=0)) > 5
    assert (flat[:, :3] < 0.9).any(axis=1).mean() > 0.01
    return img


def test_importing_vmmpool_does_not_import_matplotlib() -> None:
    code = "import sys, vmmpool; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mapping_diagram_draws_reservations_allocations_and_mappings() -> None:
    dev = vmmpool.Device.emulated(capacity=16 * MiB)
    g = dev.granularity
    with vmmpool.reserve(4 * g, dev) as va:
        a = vmmpool.create(g, dev)
        b = vmmpool.create(g, dev)
        va.map(a, 0, access="rw")
        va.map(b, 2 * g)  # no access yet: hatched
        ax = plot.mapping_diagram([va], [a, b], title="two mappings")
        # one box per reservation slot, per mapping and per allocation; one line per mapping
        assert len(ax.patches) == 4 + 2 + 2
        assert len(ax.lines) == 2
        assert_drawn(ax.figure)
        a.close()
        b.close()
    assert dev.counters().live == (0, 0, 0)


def test_page_map_of_a_pool_before_and_after_a_remap() -> None:
    dev = vmmpool.Device.emulated(capacity=64 * MiB)
    with vmmpool.PagePool(dev, limit=16 * MiB) as pool:
        blocks = [pool.malloc(2 * MiB) for _ in range(8)]
        for b in blocks[::2]:
            b.free()
        fig, (top, bottom) = plt.subplots(2, figsize=(6, 5))
        before = pool.snapshot()
        plot.page_map(before, ax=top, page_size=pool.page_size, title="before")
        big = pool.malloc(8 * MiB)  # needs the four scattered free pages, side by side
        plot.page_map(pool, ax=bottom, title="after")
        n = len(before)
        # each page: one box below; each mapped page: one box above and a line
        assert len(top.patches) == n + sum(r.address is not None for r in before)
        assert len(bottom.lines) == sum(r.address is not None for r in pool.snapshot())
        assert_drawn(fig)
        big.free()
        for b in blocks[1::2]:
            b.free()


def test_memory_timeline_and_growth_cost() -> None:
    t = list(range(10))
    live = [i * MiB for i in t]
    held = [(i + 2) * MiB for i in t]
    ax = plot.memory_timeline({"allocated": (t, live), "reserved": (t, held)}, unit=MiB)
    assert ax.get_ylabel() == "MiB"
    assert_drawn(ax.figure)
    sizes = [2**k * MiB for k in range(1, 6)]
    ax = plot.growth_cost(sizes, {"map pages": [1e-5] * 5, "copy": [1e-4 * 2**k for k in range(5)]})
    assert len(ax.lines) == 2
    assert_drawn(ax.figure)


def test_bad_plot_input_names_what_was_expected() -> None:
    open_before = plt.get_fignums()
    with pytest.raises(ValueError, match="at least one series"):
        plot.memory_timeline({})
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        plot.memory_timeline({"allocated": ([0, 1, 2], [0, 1])})
    with pytest.raises(ValueError, match="2 costs for 3 sizes"):
        plot.growth_cost([1, 2, 3], {"copy": [1, 2]})
    assert plt.get_fignums() == open_before, "a rejected call must not leave a figure behind"


def test_a_huge_reservation_draws_fast_and_page_size_is_checked() -> None:
    import time

    dev = vmmpool.Device.emulated(capacity=16 * MiB)
    with vmmpool.reserve(64 << 30, dev) as va:
        t0 = time.perf_counter()
        ax = plot.mapping_diagram([va])
        assert time.perf_counter() - t0 < 5 and len(ax.patches) == 1
        plt.close(ax.figure)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        plot.page_map([], page_size=0)

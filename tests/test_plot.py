"""The pictures render: each plot function draws a non-empty PNG with the Agg backend."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

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


# ------------------------------------------------ figures that match their text (issue 21)
def test_owner_colors_are_distinct_and_never_near_a_state_colour() -> None:
    colors = plot.owner_colors(400)  # past the coarse candidates: the finer ones join
    assert len(set(colors)) == 400
    assert plot.owner_colors(12) == colors[:12]  # grows by appending: stable from figure to figure
    for c in colors:
        for state, sc in plot.STATE_COLORS.items():
            assert plot.color_distance(c, sc) >= plot.MIN_STATE_DISTANCE, (c, state)
    first = colors[:12]
    assert min(plot.color_distance(a, b) for a in first for b in first if a != b) > 30
    assert plot.color_distance("#dadaeb", plot.STATE_COLORS["free"]) < plot.MIN_STATE_DISTANCE  # the old trap


@pytest.mark.parametrize(
    ("n", "error"), [(-1, ValueError), (1.5, TypeError), ("3", TypeError), (True, TypeError)]
)
def test_owner_colors_refuses_a_count_that_is_not_a_natural_number(n: object, error: type) -> None:
    # owner_colors(-1) returned every colour but one (a slice), "3" and 1.5 were accepted.
    with pytest.raises(error, match="n must be"):
        plot.owner_colors(n)  # type: ignore[arg-type]
    assert plot.owner_colors(0) == []


def test_page_map_gives_each_allocation_its_own_colour_across_a_figure() -> None:
    dev = vmmpool.Device.emulated(capacity=128 * MiB)
    with vmmpool.PagePool(dev, limit=64 * MiB) as pool:
        blocks = [pool.malloc(2 * MiB + 512 * i + 1) for i in range(20)]  # 20 > the old 12 colours
        for b in blocks[1::3]:
            b.free()
        fig, (top, bottom) = plt.subplots(2, figsize=(8, 5))
        before = pool.snapshot()
        plot.page_map(before, ax=top, page_size=pool.page_size)
        big = pool.malloc(6 * MiB)
        plot.page_map(pool, ax=bottom)
        after = pool.snapshot()

        def colours(ax: object, recs: list) -> dict[tuple[int, int], set[str]]:
            patches = ax.patches  # type: ignore[attr-defined]
            by_gid = {p.get_gid(): matplotlib.colors.to_hex(p.get_facecolor()) for p in patches}
            out: dict[tuple[int, int], set[str]] = {}
            for i, r in enumerate(recs):
                if r.state == "in_use":
                    a = r.allocations[0]
                    out.setdefault((a.address, a.size), set()).update(
                        {by_gid[f"page {i}"], by_gid[f"mapped page {i}"]}
                    )
            return out

        c_before, c_after = colours(top, before), colours(bottom, after)
        both = {**c_before, **c_after}
        assert all(len(cs) == 1 for cs in [*c_before.values(), *c_after.values()])  # one colour each
        for key in c_before.keys() & c_after.keys():
            assert c_before[key] == c_after[key], "an allocation changed colour between the two pictures"
        used = [next(iter(cs)) for cs in both.values()]
        assert len(used) >= 14 and len(set(used)) == len(used), "two allocations share a colour"
        for c in used:
            nearest = min(plot.color_distance(c, s) for s in plot.STATE_COLORS.values())
            assert nearest >= plot.MIN_STATE_DISTANCE
        plt.close(fig)
        big.free()
        for b in blocks:
            if not b.freed:
                b.free()


def _inside(x: float, y: float, rect: Any) -> bool:
    x0, y0, w, h = rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()
    return x0 + 1e-6 < x < x0 + w - 1e-6 and y0 + 1e-6 < y < y0 + h - 1e-6


def test_mapping_lines_never_cross_another_reservation() -> None:
    """Notebook 01, steps 4-5: two reservations; no line may pass through a slot it does not start at."""
    dev = vmmpool.Device.emulated(capacity=16 * MiB)
    g = dev.granularity
    with vmmpool.reserve(4 * g, dev) as va, vmmpool.reserve(g, dev) as other:
        a = vmmpool.create(g, dev)
        b = vmmpool.create(g, dev)
        va.map(a, 0, access="rw")
        va.map(b, 3 * g, access="rw")
        other.map(b, 0, access="rw")
        ax = plot.mapping_diagram([va, other], [a, b])
        slots = [p for p in ax.patches if p.get_gid() in ("slot", "mapping")]
        lines = [ln for ln in ax.lines if ln.get_gid() == "mapping-line"]
        assert len(lines) == 3 and len(slots) == 5 + 3
        for ln in lines:
            (x0, x1), (y0, y1) = ln.get_xdata(), ln.get_ydata()
            for t in np.linspace(0.01, 0.99, 99):
                x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                hit = [p for p in slots if _inside(x, y, p)]
                assert not hit, f"mapping line from ({x0}, {y0}) crosses a slot at ({x:.2f}, {y:.2f})"
        # and each line starts at the bottom of its own mapping's box
        starts = sorted((ln.get_xdata()[0], ln.get_ydata()[0]) for ln in lines)
        boxes = sorted(
            (p.get_x() + p.get_width() / 2, p.get_y()) for p in ax.patches if p.get_gid() == "mapping"
        )
        assert starts == boxes
        plt.close(ax.figure)
        a.close()
        b.close()
    assert dev.counters().live == (0, 0, 0)

"""Pictures of virtual memory: mapping diagrams, pool page maps, memory over time, growth cost.

Needs matplotlib (``pip install vmmpool[plot]``). Importing :mod:`vmmpool` never imports this
module or matplotlib; ``import vmmpool.plot`` does, and raises a clear :class:`ImportError`
where matplotlib is missing. Every function draws on the axes it is given (or on a new figure)
and returns the axes, so pictures compose: ``fig, (a, b) = plt.subplots(2)``,
``page_map(pool, ax=a)``.

Functions
---------
mapping_diagram
    Reservations (virtual ranges) above, physical allocations below, a line for each mapping:
    the picture of ``reserve`` / ``create`` / ``map`` / ``set_access``.
page_map
    A :class:`~vmmpool.PagePool`'s pages: where each physical page is mapped in the pool's
    address space, coloured by state, and, for pages in use, by the allocation on them.
memory_timeline
    Allocated versus reserved bytes over time, for one or more runs side by side.
growth_cost
    Seconds (or bytes copied) to grow a buffer against its size, one line per method.
owner_colors
    The allocation colours: distinct, and never near a page state's colour. Every allocation in
    a figure gets its own, the same in each of the figure's axes.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._options import check_int

try:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex, to_rgb
    from matplotlib.patches import Rectangle
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vmmpool.plot needs matplotlib: pip install 'vmmpool[plot]' (or pip install matplotlib)"
    ) from err

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ._pool import PagePool
    from ._resources import AddressReservation, PhysicalAllocation

__all__ = [
    "MIN_STATE_DISTANCE",
    "STATE_COLORS",
    "color_distance",
    "growth_cost",
    "mapping_diagram",
    "memory_timeline",
    "owner_colors",
    "page_map",
]

#: Colours of page states (as in :meth:`PagePool.snapshot`). In-use pages are drawn in their
#: allocation's colour instead; allocation colours keep away from all five.
STATE_COLORS: dict[str, str] = {
    "free": "#e0e0e0",
    "cached": "#9ecae1",
    "in_use": "#fd8d3c",
    "acquired": "#a1d99b",
    "quarantined": "#de2d26",
}

#: Smallest CIE76 colour difference (Delta E) between an allocation's colour and any state
#: colour, so that the two never read as one another (2.3 is a just-noticeable difference).
MIN_STATE_DISTANCE = 25.0


def _lab(rgb: Any) -> Any:
    """sRGB in [0, 1] (shape (..., 3)) to CIELAB (D65)."""
    c = np.asarray(rgb, dtype=float)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _rgb_of_lab(lab: Any) -> Any:
    """CIELAB (D65) to sRGB in [0, 1]; NaN rows where out of gamut."""
    lab = np.asarray(lab, dtype=float)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    minv = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    lin = xyz @ minv.T
    rgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) - 0.055)
    bad = ((rgb < -1e-9) | (rgb > 1 + 1e-9)).any(-1)
    rgb = np.clip(rgb, 0, 1)
    rgb[bad] = np.nan
    return rgb


def color_distance(a: Any, b: Any) -> float:
    """CIE76 colour difference (Delta E in CIELAB) between two matplotlib colours."""
    return float(np.linalg.norm(_lab(to_rgb(a)) - _lab(to_rgb(b))))


_ORDER: list[str] = []
_ORDER_LOCK = threading.Lock()  # figures drawn from several threads extend one order


def _candidates(fine: bool) -> list[str]:
    """Saturated colours over the hue circle, none near a state colour (unique ``#rrggbb``)."""
    lights: tuple[int, ...]
    chromas: tuple[int, ...]
    if fine:
        step, lights, chromas = 1.0, tuple(range(30, 81, 5)), (35, 45, 55, 65, 75, 85, 95)
    else:
        step, lights, chromas = 5.0, (35, 45, 55, 65, 75), (45, 65, 85)
    hues = np.deg2rad(np.arange(0, 360, step))
    grid = np.array([(L, C * np.cos(h), C * np.sin(h)) for L in lights for C in chromas for h in hues])
    rgb = _rgb_of_lab(grid)
    hexes = list(dict.fromkeys(to_hex(c) for c in rgb[~np.isnan(rgb).any(-1)]))
    lab = _lab([to_rgb(h) for h in hexes])
    states = _lab([to_rgb(c) for c in STATE_COLORS.values()])
    far = np.linalg.norm(lab[:, None, :] - states[None, :, :], axis=-1).min(axis=1) >= MIN_STATE_DISTANCE
    return [h for h, keep in zip(hexes, far, strict=True) if keep]


def _extend(order: list[str], pool: list[str], n: int) -> None:
    """Append to `order` up to `n` colours of `pool`, each the farthest from all chosen so far."""
    cands = [h for h in pool if h not in set(order)]
    if not cands:
        return
    lab = _lab([to_rgb(h) for h in cands])
    if not order and n > 0:  # a mid violet first
        first = int(np.argmin(np.linalg.norm(lab - _lab(to_rgb("#6a51a3")), axis=-1)))
        order.append(cands[first])
    dist = np.linalg.norm(lab[:, None, :] - _lab([to_rgb(h) for h in order])[None], axis=-1).min(axis=1)
    while len(order) < n and dist.max() > 0:
        pick = int(np.argmax(dist))
        order.append(cands[pick])
        dist = np.minimum(dist, np.linalg.norm(lab - lab[pick], axis=-1))
        dist[pick] = -1.0


def owner_colors(n: int) -> list[str]:
    """`n` distinct allocation colours, none near a state colour.

    Each is at least :data:`MIN_STATE_DISTANCE` (CIE76) from every colour of
    :data:`STATE_COLORS`. The list is deterministic and grows by appending: the first ``k``
    of ``owner_colors(n)`` are ``owner_colors(k)``. Each next colour is the candidate
    farthest from those before it, so the first few are the most distinct. Candidates are
    saturated colours over the hue circle at several lightnesses: a few hundred, then over
    ten thousand finer ones when more are asked for.

    Raises
    ------
    TypeError
        `n` is not an int.
    ValueError
        `n` is negative, or more colours are asked for than distinct candidates exist.
    """
    n = check_int("n", n, maximum=None)
    with _ORDER_LOCK:
        if n > len(_ORDER):
            if not _ORDER:
                _extend(_ORDER, _candidates(False), 10**9)  # the whole coarse order (cheap)
            if n > len(_ORDER):
                _extend(_ORDER, _candidates(True), n)
            if n > len(_ORDER):
                raise ValueError(f"at most {len(_ORDER)} distinct allocation colours exist, {n} asked for")
        return _ORDER[:n]


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size)
    return new


def _palette(ax: Axes) -> dict[object, str]:
    """The figure's allocation colours, shared by every axes of the figure.

    Two pictures in one figure (before / after) give an allocation the same colour; two
    allocations in one figure never share one.
    """
    fig = ax.figure
    pal: dict[object, str] | None = getattr(fig, "_vmmpool_owner_colors", None)
    if pal is None:
        pal = {}
        fig._vmmpool_owner_colors = pal  # type: ignore[union-attr]
    return pal


def _owner_color(key: object, palette: dict[object, str]) -> str:
    if key not in palette:
        palette[key] = owner_colors(len(palette) + 1)[-1]
    return palette[key]


def mapping_diagram(
    reservations: Sequence[AddressReservation],
    allocations: Sequence[PhysicalAllocation] = (),
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Draw reservations above, physical allocations below, and one line per mapping.

    Reservations stand side by side on the upper row, each a row of granularity-sized slots
    labelled with its number and address; a mapped slot takes the colour of the allocation
    that backs it, hatched when the mapping grants no access yet. Each allocation is a box
    on the lower row (dashed once its handle is released; mapped memory lives on). A
    mapping's line runs from the slot straight down to its allocation, so it never crosses
    another reservation. Every allocation of a figure has its own colour
    (:func:`owner_colors`).

    Parameters
    ----------
    reservations : sequence of AddressReservation
        Open reservations to draw, left to right in the order given.
    allocations : sequence of PhysicalAllocation, optional
        Physical allocations to draw; allocations mapped in `reservations` but not listed are
        added after them.
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes
        Slot boxes have the gid ``"slot"``, mapping boxes ``"mapping"``, allocation boxes
        ``"allocation"``; mapping lines ``"mapping-line"``.
    """
    gran = min([r.device.granularity for r in reservations] or [1])
    # x of each reservation's first slot: side by side, one slot apart.
    x_of_res: list[float] = []
    x = 0.0
    for r in reservations:
        x_of_res.append(x)
        slots = r.size // gran
        x += (slots if slots <= 256 else 8) + 1  # a huge reservation is drawn as 8 slots wide
    res_width = max(x - 1, 0)
    ax = _axes(ax, (min(14.0, max(8.0, 1.5 + 0.55 * res_width)), 3.2))
    allocs: list[PhysicalAllocation] = list(allocations)
    maps = []
    for k, r in enumerate(reservations):
        for m in r.mappings():
            maps.append((k, m))
            if not any(m.allocation is a for a in allocs):
                allocs.append(m.allocation)
    palette = _palette(ax)
    for a in allocs:
        _owner_color(id(a), palette)
    # Rows: reservations at y = 1, physical allocations at y = 0.
    x_of_alloc: dict[int, float] = {}
    x = 0.0
    for i, a in enumerate(allocs):
        w = a.size / gran
        x_of_alloc[id(a)] = x
        ax.add_patch(
            Rectangle(
                (x, -0.3), w, 0.6, facecolor=palette[id(a)], edgecolor="black",
                linestyle="--" if a.closed else "-", linewidth=1, gid="allocation",
            )
        )
        ax.text(x + w / 2, 0, f"alloc {i}", ha="center", va="center", fontsize=8)
        x += w + 0.5
    width = max(x - 0.5, res_width)
    scale: list[float] = []
    for k, r in enumerate(reservations):
        slots = r.size // gran
        x0 = x_of_res[k]
        if slots <= 256:  # one box per slot; a huge reservation is one box (drawing stays fast)
            scale.append(1.0)
            for s in range(slots):
                ax.add_patch(
                    Rectangle((x0 + s, 0.7), 1, 0.6, facecolor="white", edgecolor="#999999", gid="slot")
                )
        else:
            scale.append(8 / slots)
            ax.add_patch(Rectangle((x0, 0.7), 8, 0.6, facecolor="white", edgecolor="#999999", gid="slot"))
        wide = 8 if slots > 256 else slots
        ax.text(x0 + wide / 2, 1.38, f"reservation {k}\n{r.address:#x}", ha="center", va="bottom", fontsize=8)
    for k, m in maps:
        f = scale[k]
        x0 = x_of_res[k] + m.offset / gran * f
        w = m.size / gran * f
        hatch = "//" if m.access.value == "none" else None
        color = palette[id(m.allocation)]
        ax.add_patch(
            Rectangle((x0, 0.7), w, 0.6, facecolor=color, edgecolor="black", hatch=hatch, gid="mapping")
        )
        ax.text(x0 + w / 2, 1.0, m.access.value, ha="center", va="center", fontsize=8)
        xa = x_of_alloc[id(m.allocation)] + m.allocation.size / gran / 2
        ax.plot([x0 + w / 2, xa], [0.7, 0.3], color=color, linewidth=1.5, gid="mapping-line")
    ax.set_xlim(-0.2, max(width, 1) + 0.2)
    ax.set_ylim(-0.5, 1.9)
    ax.set_yticks([0, 1], ["physical\nallocations", "reservations\n(addresses)"], fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel(f"slots of {gran >> 20} MiB (the granularity)" if gran >= 1 << 20 else "slots")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def _records(source: PagePool | Iterable[Any]) -> list[Any]:
    snap = getattr(source, "snapshot", None)
    return list(snap() if callable(snap) else source)  # type: ignore[arg-type]


def _alloc_key(rec: Any) -> object:
    """The allocation a page is coloured by: its first (lowest) live allocation, by (address, size)."""
    allocs = getattr(rec, "allocations", ()) or ()
    if not allocs:
        return getattr(rec, "owner", None)
    first = allocs[0]
    addr = getattr(first, "address", getattr(first, "ptr", None))
    if addr is None:
        return first
    return (addr, getattr(first, "size", None))


def page_map(
    source: PagePool | Iterable[Any],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    page_size: int | None = None,
) -> Axes:
    """Draw a pool's pages: physical pages below, where each is mapped above.

    The lower row holds every physical page the pool owns, by creation index; the upper row
    the pool's address space, in pages, with each mapped page drawn where it is mapped (large
    gaps between address-space arenas are shortened). Free pages are grey, cached blue,
    acquired green, quarantined red; pages in use take the colour of the (lowest-addressed)
    allocation on them, one colour per allocation in the whole figure (:func:`owner_colors`:
    never near a state colour; the same allocation keeps its colour in every axes of the
    figure), so the pages of one allocation, scattered physically but contiguous virtually,
    are easy to see.

    Parameters
    ----------
    source : PagePool or iterable of page records
        A pool (its :meth:`~PagePool.snapshot` is taken) or a snapshot taken earlier.
    ax : matplotlib.axes.Axes, optional
    title : str, optional
    page_size : int, optional
        Bytes per page (default: the pool's, or the smallest gap between mapped addresses).

    Returns
    -------
    matplotlib.axes.Axes
        The box of the `i`-th record has the gid ``"page i"``, its mapped box ``"mapped page i"``.
    """
    if page_size is None:
        page_size = getattr(source, "page_size", None)
    elif isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int (bytes), got {page_size!r}")
    recs = _records(source)
    mapped = sorted({r.address for r in recs if r.address is not None})
    if page_size is None:
        gaps = [b - a for a, b in itertools.pairwise(mapped) if b > a]
        page_size = min(gaps) if gaps else 1
    # Virtual x positions: consecutive pages side by side; a gap of more than 4 pages shrinks to 2.
    vx: dict[int, float] = {}
    x = 0.0
    prev: int | None = None
    for addr in mapped:
        if prev is not None:
            step = (addr - prev) / page_size
            x += step if step <= 4 else 2
        vx[addr] = x
        prev = addr
    n = len(recs)
    width = max([n, *(v + 1 for v in vx.values())] or [1])
    ax = _axes(ax, (min(16, 2 + 0.25 * width), 2.6))
    palette = _palette(ax)
    for i, r in enumerate(recs):
        if r.state == "in_use":
            color = _owner_color(_alloc_key(r), palette)
        else:
            color = STATE_COLORS.get(r.state, "white")
        ax.add_patch(
            Rectangle((i, -0.35), 1, 0.7, facecolor=color, edgecolor="black", linewidth=0.5, gid=f"page {i}")
        )
        if r.address is not None:
            xv = vx[r.address]
            ax.add_patch(
                Rectangle((xv, 1.65), 1, 0.7, facecolor=color, edgecolor="black", linewidth=0.5,
                          gid=f"mapped page {i}")
            )
            ax.plot([i + 0.5, xv + 0.5], [0.35, 1.65], color=color, linewidth=0.8, alpha=0.8)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-0.6, 2.6)
    ax.set_yticks([0, 2], ["physical pages", "virtual address"])
    ax.set_xticks([])
    ax.set_xlabel(f"{n} pages of {page_size >> 20} MiB" if page_size >= 1 << 20 else f"{n} pages")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    # In-use pages take their allocation's colour: the legend shows the first one's.
    first = next(iter(palette.values()), owner_colors(1)[0])
    handles = [
        Rectangle((0, 0), 1, 1, facecolor=first if s == "in_use" else c, edgecolor="black")
        for s, c in STATE_COLORS.items()
    ]
    labels = [
        s.replace("_", " ") + (" (one colour per allocation)" if s == "in_use" else "") for s in STATE_COLORS
    ]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=5, fontsize=7,
              frameon=False)
    if title:
        ax.set_title(title)
    return ax


def memory_timeline(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    xlabel: str = "event",
    unit: int = 1 << 30,
) -> Axes:
    """Plot memory over time: one line per named series.

    Parameters
    ----------
    series : mapping of str to (x, bytes)
        For example ``{"allocated": (t, live), "reserved (vmmpool)": (t, held),
        "reserved (PyTorch, recorded)": (t2, seg)}``. Lines whose name starts with
        ``"allocated"`` are drawn filled, so reserved memory above them shows as the gap.
    ax : matplotlib.axes.Axes, optional
    title : str, optional
    xlabel : str
        Label of the x axis (event index, seconds...).
    unit : int
        Bytes per unit of the y axis (default GiB).

    Returns
    -------
    matplotlib.axes.Axes
    """
    unit = check_int("unit", unit, minimum=1)
    if not series:
        raise ValueError("memory_timeline needs at least one series, got none")
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
    ax = _axes(ax, (8, 3.5))
    for name, (xs, ys) in series.items():
        yv = [v / unit for v in ys]
        if name.startswith("allocated"):
            ax.fill_between(xs, yv, step="post", alpha=0.3, label=name)
        else:
            ax.step(xs, yv, where="post", label=name, linewidth=1.2)
    names = {1 << 30: "GiB", 1 << 20: "MiB", 1 << 10: "KiB", 1: "bytes"}
    ax.set_ylabel(names.get(unit, f"x {unit} bytes"))
    ax.set_xlabel(xlabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def growth_cost(
    sizes: Sequence[float],
    costs: Mapping[str, Sequence[float]],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    ylabel: str = "seconds per growth step",
) -> Axes:
    """Plot the cost of growing a buffer against its size, one line per method (log-log).

    Parameters
    ----------
    sizes : sequence of float
        Buffer sizes in bytes (x axis).
    costs : mapping of str to sequence of float
        For each method (``"vmmpool (map pages)"``, ``"copy to a larger buffer"``), the cost at
        each size.
    ax : matplotlib.axes.Axes, optional
    title : str, optional
    ylabel : str

    Returns
    -------
    matplotlib.axes.Axes
    """
    if not costs:
        raise ValueError("growth_cost needs at least one method, got none")
    for name, ys in costs.items():
        if len(ys) != len(sizes):
            raise ValueError(f"method {name!r}: {len(ys)} costs for {len(sizes)} sizes")
    ax = _axes(ax, (6, 4))
    xs = [s / (1 << 20) for s in sizes]
    for name, ys in costs.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("buffer size (MiB)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax

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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vmmpool.plot needs matplotlib: pip install 'vmmpool[plot]' (or pip install matplotlib)"
    ) from err

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ._pool import PagePool
    from ._resources import AddressReservation, PhysicalAllocation

__all__ = ["OWNER_COLORS", "STATE_COLORS", "growth_cost", "mapping_diagram", "memory_timeline", "page_map"]

#: Colours of page states (as in :meth:`PagePool.snapshot`).
STATE_COLORS: dict[str, str] = {
    "free": "#e0e0e0",
    "cached": "#9ecae1",
    "in_use": "#fd8d3c",
    "acquired": "#a1d99b",
    "quarantined": "#de2d26",
}

#: Colours of allocations (warm hues and purples: never confused with a state's colour).
OWNER_COLORS: tuple[str, ...] = (
    "#fd8d3c", "#756bb1", "#e6550d", "#bcbddc", "#fdae6b", "#54278f", "#a63603", "#dadaeb",
    "#f768a1", "#8c6d31", "#e7ba52", "#ce6dbd",
)


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size)
    return new


def _owner_color(key: object, palette: dict[object, Any]) -> Any:
    # A colour per owner that stays the same from one picture to the next (before / after).
    if key not in palette:
        h = hash(key) if not isinstance(key, int) else (key >> 8) * 0x9E3779B1
        palette[key] = OWNER_COLORS[(h >> 7) % len(OWNER_COLORS)]
    return palette[key]


def mapping_diagram(
    reservations: Sequence[AddressReservation],
    allocations: Sequence[PhysicalAllocation] = (),
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Draw reservations above, physical allocations below, and one line per mapping.

    Each reservation is a row of granularity-sized slots: a mapped slot takes the colour of the
    allocation that backs it, hatched when the mapping grants no access yet. Each allocation is
    a box on the physical row (dashed once its handle is released; mapped memory lives on).

    Parameters
    ----------
    reservations : sequence of AddressReservation
        Open reservations to draw, top to bottom in the order given.
    allocations : sequence of PhysicalAllocation, optional
        Physical allocations to draw; allocations mapped in `reservations` but not listed are
        added after them.
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax, (8, 1.2 + 0.9 * (len(reservations) + 1)))
    allocs: list[PhysicalAllocation] = list(allocations)
    maps = []
    for r in reservations:
        for m in r.mappings():
            maps.append((r, m))
            if not any(m.allocation is a for a in allocs):
                allocs.append(m.allocation)
    gran = min([r.device.granularity for r in reservations] or [1])
    palette: dict[object, Any] = {}
    for a in allocs:
        _owner_color(id(a), palette)
    n_res = len(reservations)
    # Rows: reservation k at y = n_res - k (top), physical row at y = 0.
    x_of_alloc: dict[int, float] = {}
    x = 0.0
    for a in allocs:
        w = a.size / gran
        x_of_alloc[id(a)] = x
        ax.add_patch(
            Rectangle(
                (x, -0.35), w, 0.7, facecolor=palette[id(a)], edgecolor="black",
                linestyle="--" if a.closed else "-", linewidth=1,
            )
        )
        ax.text(x + w / 2, 0, f"alloc {allocs.index(a)}", ha="center", va="center", fontsize=8)
        x += w + 0.5
    width = x
    for k, r in enumerate(reservations):
        y = n_res - k
        slots = r.size // gran
        width = max(width, slots)
        if slots <= 256:  # one box per slot; a huge reservation is one box (drawing stays fast)
            for s in range(slots):
                ax.add_patch(Rectangle((s, y - 0.3), 1, 0.6, facecolor="white", edgecolor="#999999"))
        else:
            ax.add_patch(Rectangle((0, y - 0.3), slots, 0.6, facecolor="white", edgecolor="#999999"))
    for r, m in maps:
        y = n_res - reservations.index(r)
        x0 = m.offset / gran
        w = m.size / gran
        hatch = "//" if m.access.value == "none" else None
        ax.add_patch(
            Rectangle(
                (x0, y - 0.3), w, 0.6, facecolor=palette[id(m.allocation)], edgecolor="black",
                hatch=hatch,
            )
        )
        ax.text(x0 + w / 2, y, m.access.value, ha="center", va="center", fontsize=8)
        xa = x_of_alloc[id(m.allocation)] + m.allocation.size / gran / 2
        ax.plot([x0 + w / 2, xa], [y - 0.3, 0.35], color=palette[id(m.allocation)], linewidth=1.5)
    ax.set_xlim(-0.2, max(width, 1) + 0.2)
    ax.set_ylim(-0.7, n_res + 0.7)
    labels = [f"reservation {k}\n{r.address:#x}" for k, r in enumerate(reservations)]
    ax.set_yticks(list(range(n_res + 1)), ["physical\nallocations", *labels[::-1]], fontsize=8)
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
    allocs = getattr(rec, "allocations", ()) or ()
    if not allocs:
        return getattr(rec, "owner", None)
    first = allocs[0]
    for name in ("address", "ptr"):
        if hasattr(first, name):
            return getattr(first, name)
    return first


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
    acquired green, quarantined red; pages in use take one colour per allocation, so the
    pages of one allocation, scattered physically but contiguous virtually, are easy to see.

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
    palette: dict[object, Any] = {}
    for i, r in enumerate(recs):
        if r.state == "in_use":
            color = _owner_color(_alloc_key(r), palette)
        else:
            color = STATE_COLORS.get(r.state, "white")
        ax.add_patch(Rectangle((i, -0.35), 1, 0.7, facecolor=color, edgecolor="black", linewidth=0.5))
        if r.address is not None:
            xv = vx[r.address]
            ax.add_patch(Rectangle((xv, 1.65), 1, 0.7, facecolor=color, edgecolor="black", linewidth=0.5))
            ax.plot([i + 0.5, xv + 0.5], [0.35, 1.65], color=color, linewidth=0.8, alpha=0.8)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-0.6, 2.6)
    ax.set_yticks([0, 2], ["physical pages", "virtual address"])
    ax.set_xticks([])
    ax.set_xlabel(f"{n} pages of {page_size >> 20} MiB" if page_size >= 1 << 20 else f"{n} pages")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black") for c in STATE_COLORS.values()]
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

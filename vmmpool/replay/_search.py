"""The smallest limit at which a trace completes (:func:`min_limit`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._device import Device
from .._errors import OutOfMemoryError
from ._engine import ReplayResult, emulated_capacity, replay
from ._load import _as_trace
from ._trace import Trace

__all__ = ["MinLimit", "min_limit"]


@dataclass
class MinLimit:
    """Result of :func:`min_limit`.

    Attributes
    ----------
    pages : int
        Smallest page count at which the replay completes.
    limit : int
        ``pages * page_size`` bytes.
    ratio : float
        ``limit / peak_live``.
    probes : list of (int, bool)
        Page counts tried and whether each completed, in order.
    result : ReplayResult
        The completing replay at `pages`.
    wall_s : float
        Seconds the search took.
    """

    pages: int
    limit: int
    ratio: float
    probes: list[tuple[int, bool]]
    result: ReplayResult
    wall_s: float


def bisect_good(bad: int, good: int, ok: Callable[[int], bool]) -> int:
    """The smallest n in (bad, good] with ok(n), given not ok(bad) and ok(good) (monotonic)."""
    while good - bad > 1:
        mid = (bad + good) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def min_limit(
    trace: Trace | str | os.PathLike[str],
    device: Device | str | int | None = None,
    *,
    default: ReplayResult | None = None,
    page_size: int | None = None,
    small_threshold: int | None = None,
    capacity: int | None = None,
    keep_cached: bool = False,
) -> MinLimit:
    """Smallest pool limit, in whole pages, at which `trace` completes.

    The search runs between a lower bound, the default run's peak in-use
    bytes in pages (at least the peak live bytes in pages: the pool's
    rounding of a request does not depend on the limit, and pages holding
    live data cover every byte in use), and the default run's peak pages held
    (`default`, replayed when not given): an exponential search upward from
    the lower bound, then bisection, each probe a fresh pool (see
    :func:`replay` for the other parameters). Completing is assumed to be
    monotonic in the limit.

    Returns
    -------
    MinLimit

    Raises
    ------
    OutOfMemoryError
        The trace does not complete even with the default limit.
    ValueError
        `default` was replayed with another `keep_cached`.
    """
    tr = _as_trace(trace)
    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(
        page_size=page_size, small_threshold=small_threshold, keep_cached=keep_cached
    )
    if device is None:
        kw["capacity"] = emulated_capacity(tr) if capacity is None else capacity
    if default is None:
        default = replay(tr, device, **kw)
    elif default.keep_cached != keep_cached:
        # Its peak held bounds the search: a run of the other mode bounds another pool.
        raise ValueError(
            f"default was replayed with keep_cached={default.keep_cached}, the search asks "
            f"keep_cached={keep_cached}"
        )
    if not default.completed:
        raise OutOfMemoryError(
            0, 0, default.limit,
            message=f"{tr.name}: the replay does not complete even at the default limit "
            f"({default.limit} bytes): {default.error}",
        )
    P = default.page_size
    lo = max(1, -(-default.peak_live // P), -(-default.peak_in_use // P))
    hi = max(lo, -(-default.peak_held // P))
    probes: list[tuple[int, bool]] = []
    results: dict[int, ReplayResult] = {}

    def ok(n: int) -> bool:
        r = replay(tr, device, n * P, **kw)
        probes.append((n, r.completed))
        if r.completed:
            results[n] = r
        return r.completed

    # hi must complete (the default run never held more); check, grow if not.
    if not ok(hi):
        cap = default.limit // P
        while not ok(hi):
            if hi >= cap:
                raise OutOfMemoryError(0, 0, hi * P, message=f"{tr.name}: no limit completes")
            hi = min(cap, 2 * hi)
    # Exponential search up from lo, then bisection: (bad, good].
    bad = lo - 1
    step = 1
    n = lo
    while n < hi:
        if ok(n):
            hi = n
            break
        bad = n
        n = lo + step
        step *= 2
    hi = bisect_good(bad, hi, ok)
    res = results[hi]
    return MinLimit(
        pages=hi,
        limit=hi * P,
        ratio=hi * P / default.peak_live if default.peak_live else float("nan"),
        probes=probes,
        result=res,
        wall_s=time.perf_counter() - t0,
    )

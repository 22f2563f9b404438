"""Memory over a replay, sampled (:func:`timeline`): the replay loop with a sampler."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .._device import Device
from .._options import check_int
from ._engine import run_replay
from ._load import _as_trace
from ._trace import Trace

__all__ = ["Timeline", "timeline"]



@dataclass(frozen=True)
class Timeline:
    """Memory over a replay, sampled: what :func:`timeline` returns.

    Attributes
    ----------
    trace : str
    events : list of int
        Event index of each sample.
    allocated : list of int
        Live requested bytes at each sample.
    reserved : list of int
        Bytes of pages the pool held at each sample.
    recorded_reserved : list of (int, int)
        The recorded run's reserved bytes, ``(event index, bytes)`` (PyTorch snapshots).
    completed : bool
        False when the pool ran out of memory (the series stop there).
    """

    trace: str
    events: list[int]
    allocated: list[int]
    reserved: list[int]
    recorded_reserved: list[tuple[int, int]]
    completed: bool

    def series(self) -> dict[str, tuple[list[int], list[int]]]:
        """The series for :func:`vmmpool.plot.memory_timeline`."""
        out = {
            "allocated (live requested bytes)": (self.events, self.allocated),
            "reserved: vmmpool pages held": (self.events, self.reserved),
        }
        if self.recorded_reserved:
            # Held to the end of the plot: the last sample or the last segment event, whichever
            # is later (x must not go back: the last segment event can follow the last free).
            end = max(self.events[-1] if self.events else 0, self.recorded_reserved[-1][0])
            xs = [x for x, _ in self.recorded_reserved] + [end]
            ys = [y for _, y in self.recorded_reserved] + [self.recorded_reserved[-1][1]]
            out["reserved: PyTorch, recorded run"] = (xs, ys)
        return out


def timeline(
    trace: Trace | str | os.PathLike[str],
    device: Device | str | int | None = None,
    limit: int | None = None,
    *,
    samples: int = 400,
    **pool_options: Any,
) -> Timeline:
    """Replay `trace` like :func:`replay` and sample allocated and reserved bytes.

    Parameters
    ----------
    trace, device, limit
        As for :func:`replay`.
    samples : int
        About how many samples to take, at evenly spaced events (for plots: a peak between
        two samples is not shown; the figures of :func:`replay` are exact).

    **pool_options
        ``page_size``, ``small_threshold`` for :class:`PagePool`.

    Returns
    -------
    Timeline
        The series stop at an event that ran out of memory (``completed`` False).

    Notes
    -----
    The replay is :func:`replay`'s own loop with a sampler: the same pool, the same events.
    """
    tr = _as_trace(trace)
    n = check_int("samples", samples, minimum=1)
    xs: list[int] = []
    live_s: list[int] = []
    held_s: list[int] = []

    def sample(i: int, live: int, pool: Any) -> None:
        xs.append(i)
        live_s.append(live)
        held_s.append(pool.stats().reserved_bytes)

    res = run_replay(tr, device, limit, pool_options, sampler=sample,
                     every=max(1, len(tr.events) // n))
    return Timeline(tr.name, xs, live_s, held_s, list(tr.recorded_reserved), res.completed)

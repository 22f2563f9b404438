"""What a replay reports: :func:`record` dicts, the :func:`format_table` table, JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ._engine import ReplayResult
from ._peers import PeerResult
from ._search import MinLimit
from ._trace import Trace

__all__ = ["COLUMNS", "format_table", "json_safe", "record"]

_GIB = 1 << 30


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by ``None`` (valid JSON: a ratio to a
    peak of 0 bytes has no value)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / _GIB:.2f}"


def _ratio(n: int | None, d: int) -> str:
    return "-" if n is None or not d else f"{n / d:.4f}"


def record(
    trace: Trace,
    result: ReplayResult,
    minimum: MinLimit | None = None,
    peers: Sequence[PeerResult] = (),
) -> dict[str, Any]:
    """One trace's figures as a JSON-ready dict (what the CLI and benchmark write)."""
    return {
        "trace": trace.name,
        "source": trace.source,
        "events": len(trace.events),
        "prelude": trace.n_prelude,
        "streams": len(trace.streams),
        "peak_live": trace.peak_live,
        "recorded_peak_reserved": trace.recorded_peak_reserved,
        "recorded_peak_allocated": trace.recorded_peak_allocated,
        "recorded_ooms": trace.n_failed,
        "vmmpool": result.to_dict(),
        "min_limit": None if minimum is None else {
            "pages": minimum.pages, "bytes": minimum.limit, "ratio": minimum.ratio,
            "probes": minimum.probes, "wall_s": minimum.wall_s,
        },
        "peers": [asdict(p) for p in peers],
    }


#: Columns of :func:`format_table`, with what each means.
COLUMNS = (
    ("trace", "trace file"),
    ("events", "allocations and frees replayed, prelude included"),
    ("streams", "distinct streams (each its own pool stream key)"),
    ("live GiB", "peak live: largest sum of requested bytes"),
    ("in use/live", "peak in use (with the pool's rounding) / peak live"),
    ("held/live", "peak pages held by the pool, default limit / peak live"),
    ("min/live", "smallest limit (whole pages) that completes / peak live"),
    ("pages+", "pages created"),
    ("remaps", "cached pages unmapped and mapped elsewhere"),
    ("syncs", "device-wide synchronizes"),
    ("calls", "backend (driver) calls"),
    ("wall s", "seconds of the default replay"),
    ("us/ev", "microseconds per event"),
    ("torch res/alloc", "recorded PyTorch run: peak reserved / peak allocated"),
)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`record` dicts (peer rows under each trace)."""
    head = [c for c, _ in COLUMNS]
    rows: list[list[str]] = []
    skipped: dict[str, dict[str, None]] = {}
    for r in records:
        v = r["vmmpool"]
        live = r["peak_live"]
        mn = r["min_limit"]
        done = v["completed"]
        ooms = r.get("recorded_ooms") or 0
        rows.append([
            r["trace"] + (f" ({ooms} recorded OOM{'s' if ooms > 1 else ''})" if ooms else ""),
            f"{r['events']:,}" if done else f"{v['events']:,}/{r['events']:,} (out of memory)",
            str(r["streams"]),
            _gib(live),
            # An incomplete replay's peaks are those of the events before it ran out of
            # memory: not a ratio to the whole trace's peak live ("-"; the JSON has them).
            _ratio(v["peak_in_use"], live) if done else "-",
            _ratio(v["peak_held"], live) if done else "-",
            "-" if mn is None else _ratio(mn["bytes"], live),
            f"{v['page_creations']:,}",
            f"{v['remaps']:,}",
            f"{v['syncs']:,}",
            f"{v['backend_calls']:,}",
            f"{v['wall_s']:.2f}",
            f"{v['us_per_event']:.1f}",
            "-" if r["recorded_peak_reserved"] is None else
            f"{_gib(r['recorded_peak_reserved'])}/{_gib(r['recorded_peak_allocated'])} GiB"
            f" = {_ratio(r['recorded_peak_reserved'], r['recorded_peak_allocated'] or 0)}",
        ])
        for p in r["peers"]:
            if p["skipped"]:
                skipped.setdefault(p["skipped"], {})[p["peer"]] = None
                continue
            rows.append([
                f"  {p['peer']}", "completed" if p["completed"] else "out of memory", "", "",
                _ratio(p["peak_allocated"], live), _ratio(p["peak_reserved"], live),
                _ratio(p["min_limit"], live), "", "", "", "",
                "-" if p["wall_s"] is None else f"{p['wall_s']:.2f}", "", "",
            ])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for why, names in skipped.items():
        lines.append(f"peer allocators ({', '.join(names)}) skipped: {why}")
    return "\n".join(lines)

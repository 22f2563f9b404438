"""Reading a trace file of either format (:func:`load`)."""

from __future__ import annotations

import os
from pathlib import Path

from . import _csv, _snapshot
from ._csv import CSV_HEADER, load_csv
from ._trace import Trace, TraceError, _read_bounded

__all__ = ["load"]


def load(
    path: str | os.PathLike[str], device: int | None = None, *, max_bytes: int | None = None
) -> Trace:
    """Read a trace, choosing the reader by content (CSV header or pickle).

    `device` picks a PyTorch snapshot's device (see :func:`load_snapshot`);
    `max_bytes` bounds the file (default :data:`MAX_TRACE_BYTES`, 1 GiB).

    Raises
    ------
    TraceError
        Unreadable, unknown format, or malformed (see the readers).
    """
    p = Path(path)
    is_csv, raw = _read_sniffed(p, device, max_bytes)
    if is_csv:
        return load_csv(p, _csv._decode(p.name, raw))
    data, name, size = _snapshot._read(p, raw=raw)
    return _snapshot.snapshot_to_trace(data, name, device, max_items=size)


def _read_sniffed(p: Path, device: int | None, max_bytes: int | None) -> tuple[bool, bytes]:
    """Whether `p` is an RMM log (else a PyTorch snapshot), and its bytes: the file is opened
    and read once (a pipe or FIFO has no second reading)."""
    kind: list[bool] = []
    raw = _read_bounded(p, max_bytes, lambda head: kind.append(_is_csv(p, head, device)))
    return kind[0], raw


def _is_csv(p: Path, head: bytes, device: int | None) -> bool:
    """True for an RMM log, False for a PyTorch snapshot, by the file's first bytes `head`;
    TraceError for neither."""
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith((b"Thread", b"Time,")):
        if device is not None:
            raise TraceError(f"{p.name}: an RMM log has no devices to choose (device={device})")
        return True
    if head[:1] == b"\x80" or p.suffix in (".pickle", ".pkl"):
        return False
    raise TraceError(
        f"{p.name}: unknown format: expected a PyTorch snapshot pickle or an RMM CSV log "
        f"starting with {','.join(CSV_HEADER)}"
    )


def _load_devices(
    path: str | os.PathLike[str], device: int | None = None, max_bytes: int | None = None
) -> list[Trace]:
    """What one file replays as: `device` of a PyTorch snapshot when given, else every device
    with events (one trace each: the file is read, scanned and loaded once), or without any
    events every device with live blocks, or the one trace of an RMM log."""
    p = Path(path)
    if device is not None:
        return [load(p, device, max_bytes=max_bytes)]
    is_csv, raw = _read_sniffed(p, None, max_bytes)
    if is_csv:
        return [load_csv(p, _csv._decode(p.name, raw))]
    data, name, size = _snapshot._read(p, raw=raw)
    first = _snapshot.snapshot_to_trace(data, name, None, max_items=size)
    others: list[int] = list(first.devices[1:])
    if not first.devices:  # no events (history was not recorded): each device's live blocks
        segments = data["segments"] if isinstance(data, dict) else []
        others = [d for d in _snapshot._segment_devices(segments, True) if d != first.device]
    if others:  # each device read walks every segment again
        _snapshot._check_items(name, data["segments"], data["device_traces"], size, 1 + len(others))
    return [first, *(_snapshot.snapshot_to_trace(data, name, d, max_items=size) for d in others)]


def _as_trace(trace: Trace | str | os.PathLike[str]) -> Trace:
    return trace if isinstance(trace, Trace) else load(trace)

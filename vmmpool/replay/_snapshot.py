"""The reader of PyTorch memory snapshots (``torch.cuda.memory._dump_snapshot`` pickles)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from .._options import brief
from ._pickle_scan import scan_pickle
from ._trace import Trace, TraceError, _Builder, _cut, _int, _read_bounded

__all__ = ["load_snapshot", "snapshot_to_trace"]

#: PyTorch's rounding of every request (for the recorded peak allocated).
_TORCH_ROUND = 512
#: Most entries of a snapshot's ``device_traces`` (one per CUDA device of the process that
#: recorded it; c10's ``DeviceIndex`` is an 8-bit integer): each device with events is a row
#: read and replayed on its own.
MAX_SNAPSHOT_DEVICES = 1024


def _check_items(
    name: str, segments: list[Any], traces: list[Any], max_items: int, reads: int = 1
) -> None:
    """Refuse a snapshot whose segments and blocks, walked `reads` times (once for each device
    read), and the events of every device come to more than `max_items` (the file's size:
    each takes at least a byte unless the pickle's memo repeats it, which a snapshot never
    does; counted over every device, so that one list of events shared by many devices, or
    many devices each walking every segment, is refused too)."""
    n_items = sum(len(t) for t in traces if isinstance(t, list))
    n_seg = len(segments)
    for seg in segments:
        if n_items + reads * n_seg > max_items:
            break
        blocks = seg.get("blocks") if isinstance(seg, dict) else None
        if isinstance(blocks, (list, tuple)):
            n_seg += len(blocks)
    if n_items + reads * n_seg > max_items:
        what = "segments, blocks" if reads == 1 else f"segments and blocks (read for {reads} devices)"
        raise TraceError(
            f"{name}: refused: the snapshot lists more than {max_items:,} {what} "
            f"and events, more than a file of {max_items:,} bytes holds unless it repeats "
            "them through the pickle's memo (a snapshot never does)"
        )


class _Refused(pickle.UnpicklingError):
    """A class reference met while loading (never resolved)."""


class _NoClasses(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")


def load_snapshot(
    path: str | os.PathLike[str], device: int | None = None, *, max_bytes: int | None = None
) -> Trace:
    """Read a PyTorch memory snapshot pickle.

    Parameters
    ----------
    path : path-like
        A file written by ``torch.cuda.memory._dump_snapshot``.
    device : int, optional
        Which CUDA device's trace to read; default: the first with events, or
        without any events the first with live blocks (else with segments). A
        device given that has neither events nor segments is a :class:`TraceError`.
    max_bytes : int, optional
        The largest file read (default :data:`MAX_TRACE_BYTES`, 1 GiB); a longer
        one is a :class:`TraceError`, read no further.

    Returns
    -------
    Trace

    Raises
    ------
    TraceError
        The file references a class (refused, never loaded), fails the bounds
        of :func:`scan_pickle` (checked before anything is loaded), is
        truncated or malformed; the message names the file and the event index.
    """
    data, name, size = _read(Path(path), max_bytes)
    return snapshot_to_trace(data, name, device, max_items=size)


def _read(p: Path, max_bytes: int | None = None, raw: bytes | None = None) -> tuple[Any, str, int]:
    """The loaded data of a snapshot file (see :func:`load_snapshot`), its name and size
    (`raw`: the file's bytes, when already read)."""
    name = p.name
    if raw is None:
        raw = _read_bounded(p, max_bytes)
    size = len(raw)
    scan_pickle(raw, name)
    fh = io.BytesIO(raw)
    try:
        data = _NoClasses(fh).load()
    except _Refused as e:  # pragma: no cover - the scan refuses every class first
        raise TraceError(
            f"{name}: refused at byte {fh.tell()}: the pickle references the class "
            f"{_cut(str(e), 100)}; only plain dicts, lists and scalars are loaded (a class could "
            "run code)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, OverflowError, RecursionError) as e:
        what = "truncated" if fh.tell() >= size else "malformed"
        raise TraceError(
            f"{name}: {what} pickle, stopped near byte {fh.tell()} of {size} "
            f"({type(e).__name__}: {_cut(str(e))})"
        ) from None
    return data, name, size


def _segment_devices(segments: list[Any], live_only: bool) -> list[int]:
    """The ``device`` of the snapshot's segments, sorted (with `live_only`, of those holding an
    ``active_allocated`` block); malformed entries are skipped (the reader reports them)."""
    found = set()
    for seg in segments:
        if not isinstance(seg, dict):
            continue
        d = seg.get("device", 0)
        if type(d) is not int or d < 0:
            continue
        blocks = seg.get("blocks", ())
        if live_only and not (isinstance(blocks, (list, tuple)) and any(
            isinstance(b, dict) and b.get("state") == "active_allocated" for b in blocks
        )):
            continue
        found.add(d)
    return sorted(found)


def _first_segment_device(segments: list[Any]) -> int:
    """A snapshot without events: the first device with live blocks, else with segments, else 0."""
    found = _segment_devices(segments, True) or _segment_devices(segments, False)
    return found[0] if found else 0


def _requested(b: dict[str, Any], size: int, name: str, where: str) -> int:
    """A live block's requested bytes: ``requested_size`` (PyTorch >= 2.1), else the newest
    entry of its ``history`` (2.0: ``real_size``, newest first), else its size."""
    if "requested_size" in b:
        return _int(b["requested_size"], name, "requested_size", where)
    history = b.get("history")
    if isinstance(history, list) and history and isinstance(history[0], dict) \
            and "real_size" in history[0]:
        return _int(history[0]["real_size"], name, "history real_size", where)
    return size


def snapshot_to_trace(
    data: object, name: str = "snapshot", device: int | None = None, *, max_items: int | None = None
) -> Trace:
    """Build a :class:`Trace` from an already loaded snapshot ``dict``.

    See :func:`load_snapshot`; `name` is used in error messages.

    Parameters
    ----------
    max_items : int, optional
        Most segments, blocks and events (of every device) to read, checked
        before any is read. :func:`load_snapshot` passes the file's size in
        bytes: a snapshot never shares one of them through the pickle's memo,
        so each takes at least a byte; a file that lists more shares them, to
        make the reading long.
    """
    if not isinstance(data, dict) or "device_traces" not in data or "segments" not in data:
        if isinstance(data, dict):
            keys = [brief(k) for k, _ in zip(data, range(5), strict=False)]
            more = f" and {len(data) - 5:,} more" if len(data) > 5 else ""
            got = f"a dict with keys {', '.join(keys)}{more}" if data else "an empty dict"
        else:
            got = brief(data)
        raise TraceError(
            f"{name}: not a PyTorch memory snapshot: expected a dict with keys "
            f"'segments' and 'device_traces', got {got}"
        )
    traces = data["device_traces"]
    segments = data["segments"]
    if not isinstance(traces, list) or not isinstance(segments, list):
        raise TraceError(f"{name}: 'device_traces' and 'segments' must be lists")
    if len(traces) > MAX_SNAPSHOT_DEVICES:
        raise TraceError(
            f"{name}: refused: 'device_traces' lists {len(traces):,} devices, more than "
            f"{MAX_SNAPSHOT_DEVICES} (a process sees at most 128 CUDA devices)"
        )
    with_events = tuple(i for i, t in enumerate(traces) if t)
    explicit = device is not None
    if device is None:
        # The first device with events; without any (a snapshot taken without recording
        # history), the first one with live blocks (its whole trace), else with segments.
        device = with_events[0] if with_events else _first_segment_device(segments)
    elif isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device must be an int (a CUDA device index), got {type(device).__name__}")
    # A device past the end of `device_traces` (a file that lists none, or fewer than its
    # segments' devices) has no events; it is in the snapshot if its segments are.
    if not 0 <= device < max(len(traces), 1) and device not in _segment_devices(segments, False):
        have = f"devices 0..{len(traces) - 1}" if traces else "no device traces"
        raise TraceError(f"{name}: device {device} not in the snapshot, which has {have}")
    events = traces[device] if device < len(traces) else []
    if not isinstance(events, list):
        raise TraceError(f"{name}: device_traces[{device}] must be a list")
    if max_items is not None:
        _check_items(name, segments, traces, max_items)

    # Final segments and their blocks.
    final_segs: dict[int, int] = {}
    final_active: dict[int, tuple[int, int, int]] = {}  # addr -> (requested, size, stream)
    for i, seg in enumerate(segments):
        where = f"segment {i}"
        if not isinstance(seg, dict):
            raise TraceError(f"{name}: {where}: expected a dict, got {type(seg).__name__}")
        if seg.get("device", device) != device:
            continue
        try:
            addr = _int(seg["address"], name, "address", where)
            final_segs[addr] = _int(seg["total_size"], name, "total_size", where)
            sstream = _int(seg.get("stream", 0), name, "stream", where)
            at = addr  # a block without an address (PyTorch 2.0) starts where the one before ends
            for j, b in enumerate(seg.get("blocks", ())):
                w = f"{where} block {j}"
                size = _int(b["size"], name, "size", w)
                if "address" in b:
                    at = _int(b["address"], name, "address", w)
                if b.get("state") == "active_allocated":
                    final_active[at] = (_requested(b, size, name, w), size, sstream)
                at += size
        except (KeyError, AttributeError, TypeError) as e:
            raise TraceError(
                f"{name}: {where}: malformed segment ({type(e).__name__}: {_cut(str(e), 80)})"
            ) from None

    if explicit and not events and not final_segs:
        have = ", ".join(map(str, with_events)) if with_events else "none"
        raise TraceError(
            f"{name}: device {device} has no events and no segments: nothing to replay "
            f"(devices with events: {have})"
        )

    # Pass 1: parse the events; find segments that existed at the start.
    parsed: list[tuple[int, int, int, int, int]] = []  # (kind, addr, size, stream, index)
    seg_seen_alloc: set[int] = set()
    start_segs: dict[int, int] = {}
    net_seg = 0
    n_seg_events = 0
    n_oom = 0
    kinds = {"alloc": 0, "free_requested": 1, "segment_alloc": 2, "segment_map": 2,
             "segment_free": 3, "segment_unmap": 3}
    for i, ev in enumerate(events):
        where = f"event {i}"
        if not isinstance(ev, dict):
            raise TraceError(f"{name}: {where}: expected a dict, got {type(ev).__name__}")
        action = ev.get("action")
        if not isinstance(action, str):
            raise TraceError(f"{name}: {where}: no 'action' string, got {brief(action)}")
        kind = kinds.get(action)
        if kind is None:
            n_oom += action == "oom"  # the recorded run failed an allocation (not in the trace)
            continue  # free_completed, oom, snapshot: nothing to replay
        try:
            addr = _int(ev["addr"], name, "addr", where)
            size = _int(ev["size"], name, "size", where)
            stream = _int(ev.get("stream", 0), name, "stream", where)
        except KeyError as e:
            raise TraceError(
                f"{name}: {where}: {_cut(action, 40)} event without {_cut(str(e), 80)}"
            ) from None
        n_seg_events += kind >= 2
        if kind == 2:
            seg_seen_alloc.add(addr)
            net_seg += size
        elif kind == 3:
            if addr not in seg_seen_alloc:
                start_segs[addr] = size
            net_seg -= size
        parsed.append((kind, addr, size, stream, i))
    for addr, size in final_segs.items():
        if addr not in seg_seen_alloc:
            start_segs.setdefault(addr, size)

    # Pass 2: which blocks were live at the start.
    live: dict[int, int] = {}
    early: list[tuple[int, int, int]] = []  # (addr, size, stream) freed before any alloc
    early_addrs: set[int] = set()
    traced: set[int] = set()  # addresses the trace allocated
    for kind, addr, size, stream, i in parsed:
        if kind == 0:
            if addr in live:
                raise TraceError(f"{name}: event {i}: alloc at {addr:#x}, which is already live")
            live[addr] = size
            traced.add(addr)
        elif kind == 1:
            if addr in live:
                del live[addr]
            elif addr not in early_addrs and addr not in traced:
                # Allocated before recording started (in a segment live at the start, or one
                # whose events were not recorded, e.g. dropped past max_entries): a prelude block.
                early.append((addr, size, stream))
                early_addrs.add(addr)
            else:
                raise TraceError(
                    f"{name}: event {i}: free_requested of {addr:#x}, which is not live "
                    f"(freed twice, never allocated again)"
                )
    # (requested, block size, stream): a block freed before any alloc of it has no block size
    # in the file; PyTorch rounds every request to 512 bytes (a free's size is the request's).
    prelude: dict[int, tuple[int, int, int]] = {
        a: (s, -(-s // _TORCH_ROUND) * _TORCH_ROUND, st) for a, s, st in early
    }
    for addr, blk in final_active.items():
        if addr not in live and addr not in prelude:
            prelude[addr] = blk

    # Build the events: prelude first, in address order.
    b = _Builder(name)
    for addr in sorted(prelude):
        req, _size, st = prelude[addr]
        b.alloc(addr, req, st, f"prelude block {addr:#x}")
    n_prelude = b.n_slots
    reserved = sum(final_segs.values()) - net_seg
    peak_reserved = reserved
    reserved_series = [(len(b.events), reserved)]
    rounded = {a: s for a, (_r, s, _st) in prelude.items()}
    allocated = sum(rounded.values())
    peak_alloc = allocated
    for kind, addr, size, stream, i in parsed:
        where = f"event {i}"
        if kind == 0:
            b.alloc(addr, size, stream, where)
            r = -(-size // _TORCH_ROUND) * _TORCH_ROUND
            rounded[addr] = r
            allocated += r
            if allocated > peak_alloc:
                peak_alloc = allocated
        elif kind == 1:
            b.free(addr, where)
            allocated -= rounded.pop(addr)
        elif kind == 2:
            reserved += size
            if reserved > peak_reserved:
                peak_reserved = reserved
            reserved_series.append((len(b.events), reserved))
        else:
            reserved -= size
            reserved_series.append((len(b.events), reserved))
    # Reserved bytes are known from segments only: without any (neither final segments of
    # this device nor segment events), the recorded run's reserved bytes are unknown, not 0.
    known = bool(final_segs) or n_seg_events > 0
    return Trace(
        name=name,
        events=tuple(b.events),
        n_slots=b.n_slots,
        n_prelude=n_prelude,
        streams=tuple(b.streams),
        recorded_peak_reserved=peak_reserved if known else None,
        recorded_peak_allocated=peak_alloc,
        source="pytorch-snapshot",
        recorded_reserved=tuple(reserved_series) if known else (),
        n_failed=n_oom,
        device=device,
        devices=with_events,
    )

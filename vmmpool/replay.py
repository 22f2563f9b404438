"""Trace replay: run a recorded allocation trace through a :class:`PagePool`.

Two trace formats are read:

* PyTorch memory snapshots (``torch.cuda.memory._dump_snapshot`` pickles).
  torch is not needed: a snapshot is a pickled plain ``dict``, and it is
  loaded through an unpickler that refuses every class, so a file that
  references one (which could run code) is refused with an error naming it.
  Before anything is loaded, the pickle's opcodes are scanned and bounded
  (see :func:`scan_pickle`): a small hostile file cannot make the reader
  hang, crash or run out of memory.
* RMM ``logging_resource_adaptor`` CSV logs
  (``Thread,Time,Action,Pointer,Size,Stream``).

How a snapshot becomes a list of events
---------------------------------------
``device_traces[d]`` holds the events recorded after recording started.
``alloc`` events allocate their ``size`` (the requested bytes), frees happen
at ``free_requested`` (``free_completed`` is ignored: it only says when the
caching allocator could reuse the block). Blocks that were already live when
recording started appear only in ``segments``: the *prelude* allocates them
first, in address order, with their ``requested_size``. They are the
``active_allocated`` blocks of the final state that no traced ``alloc``
accounts for, plus the blocks the trace frees without having allocated them
(their address must lie in a segment that existed when recording started;
any other free of an unknown address is a :class:`TraceError`).

The recorded run's own peak reserved bytes come from the segment events:
the reserved bytes at the start are the final segments' ``total_size`` sum
minus the net change of ``segment_alloc``/``segment_map`` (added) and
``segment_free``/``segment_unmap`` (subtracted) events; the peak is the
largest running sum over the trace. Its peak allocated bytes are the largest
sum of live blocks with each request rounded up to 512 bytes (PyTorch's
rounding), prelude blocks counted at their block size.

Replay
------
:func:`replay` runs the events through a fresh :class:`PagePool` (by default
on a fresh host-emulated device sized to the trace: memfd pages are not
committed unless touched, and the replay never touches the memory) and
returns a :class:`ReplayResult`. :func:`min_limit` searches, over whole
pages, the smallest pool limit at which the replay completes.
:func:`peer_replays` (a GPU only) replays the same trace through PyTorch's
caching allocator and CuPy's ``MemoryPool``, each in its own subprocess.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._device import Device
from ._errors import OutOfMemoryError
from ._options import brief, check_int

__all__ = [
    "COLUMNS",
    "MinLimit",
    "PEERS",
    "PeerResult",
    "ReplayResult",
    "Timeline",
    "Trace",
    "TraceError",
    "load",
    "load_csv",
    "load_snapshot",
    "emulated_capacity",
    "parse_peer_output",
    "peer_command",
    "snapshot_to_trace",
    "min_limit",
    "format_table",
    "json_safe",
    "scaled",
    "scan_pickle",
    "peer_replays",
    "record",
    "replay",
    "timeline",
]

_GIB = 1 << 30
#: Largest emulated device replay makes (1 TiB: far beyond any GPU, far below what the
#: emulator's bookkeeping can map in seconds).
_EMULATOR_MAX = 1 << 40
#: PyTorch's rounding of every request (for the recorded peak allocated).
_TORCH_ROUND = 512
_CSV_HEADER = ("Thread", "Time", "Action", "Pointer", "Size", "Stream")
_PEER_MARK = "VMMPOOL-PEER-RESULT "

# Bounds on an untrusted snapshot pickle, checked on its opcodes before it is loaded
# (issue 17). Real snapshots nest 7 deep and expand to 2-4 objects per byte: stacks are
# shared through the pickle's memo (one frames list of 111 frames by up to 579 events in
# the llama trace), and deeper stacks expand further; the bounds leave a wide margin.
#: Deepest nesting of containers accepted.
MAX_PICKLE_DEPTH = 64
#: Objects the loaded data may hold when expanded as a tree (memo references counted each
#: time they are used): at most this many per byte of the file, plus :data:`PICKLE_WEIGHT_FLOOR`.
#: Any walk over the loaded data then takes time linear in the file's size.
PICKLE_WEIGHT_PER_BYTE = 1024
PICKLE_WEIGHT_FLOOR = 1 << 20
#: Work of hashing the dict keys and set items while loading (a tuple's hash walks it, and is
#: not cached): at most this many objects per byte, plus :data:`PICKLE_HASH_FLOOR`. Real
#: snapshots' keys are strings, under one per 2 bytes.
PICKLE_HASH_PER_BYTE = 4
PICKLE_HASH_FLOOR = 1 << 20
#: Largest integer in a pickle, in bits (snapshot values fit 64; a bigger one is refused
#: by the reader with its field's name).
MAX_PICKLE_INT_BITS = 1 << 16
#: Pickle opcodes that build objects other than plain containers and scalars (they
#: could run code): refused.
_CODE_OPS = frozenset({
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX",
    "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER",
})
_STR_OPS = frozenset({"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_INT_OPS = frozenset({"INT", "LONG", "LONG1", "LONG4"})
#: Kinds of container (what the unpickler hashes: dict keys, set items).
_LIST, _DICT, _SET, _TUPLE = 0, 1, 2, 3
_BUILDS = {"LIST": _LIST, "DICT": _DICT, "FROZENSET": _SET, "TUPLE": _TUPLE}
_EMPTIES = {"EMPTY_LIST": _LIST, "EMPTY_DICT": _DICT, "EMPTY_SET": _SET}
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
#: Opcodes that push one scalar.
_SCALAR_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE",
    "NEWTRUE", "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT",
    "BINFLOAT", "EMPTY_TUPLE",
})


class TraceError(ValueError):
    """A trace file that cannot be read: the message names file and position."""


@dataclass(frozen=True)
class Trace:
    """A trace, ready to replay.

    Attributes
    ----------
    name : str
        The file name (or a given name).
    events : tuple of (bool, int, int, int)
        ``(is_free, slot, nbytes, stream)`` in replay order, prelude first.
        ``slot`` numbers the allocation (``0 .. n_slots - 1``); a free names
        the slot of the allocation it frees (its ``nbytes`` is that size).
    n_slots : int
        Allocations in the trace (prelude included).
    n_prelude : int
        Allocations of blocks live before recording started.
    streams : tuple of int
        The distinct stream handles, in order of first use.
    recorded_peak_reserved : int or None
        The recorded run's peak reserved bytes (segment events), when known.
    recorded_peak_allocated : int or None
        The recorded run's peak allocated bytes (512-byte rounded), when known.
    source : str
        ``"pytorch-snapshot"`` or ``"rmm-csv"``.
    n_failed : int
        Allocations the recorded run reported as failed (skipped): RMM failures, PyTorch
        ``oom`` events.
    device : int or None
        The CUDA device whose events these are (PyTorch snapshots).
    devices : tuple of int
        Every device of the snapshot with events (PyTorch snapshots).
    """

    name: str
    events: tuple[tuple[bool, int, int, int], ...]
    n_slots: int
    n_prelude: int
    streams: tuple[int, ...]
    recorded_peak_reserved: int | None = None
    recorded_peak_allocated: int | None = None
    source: str = "pytorch-snapshot"
    n_failed: int = 0
    #: The recorded run's reserved bytes over the replay: ``(event index, bytes)`` at the start
    #: and after each segment event (PyTorch snapshots only; empty otherwise).
    recorded_reserved: tuple[tuple[int, int], ...] = ()
    device: int | None = None
    devices: tuple[int, ...] = ()

    @property
    def peak_live(self) -> int:
        """Largest sum of live requested bytes over the trace."""
        live = peak = 0
        for is_free, _slot, n, _s in self.events:
            if is_free:
                live -= n
            else:
                live += n
                if live > peak:
                    peak = live
        return peak

    @property
    def final_live(self) -> int:
        """Requested bytes still live after the last event."""
        return sum(-n if f else n for f, _sl, n, _s in self.events)


# ------------------------------------------------------------------ readers
class _Refused(pickle.UnpicklingError):
    """A class reference met while loading (never resolved)."""


class _NoClasses(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")


class _Builder:
    """Turns alloc/free by address into slot events (shared by both readers)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[bool, int, int, int]] = []
        self.live: dict[int, tuple[int, int, int]] = {}  # addr -> (slot, size, stream)
        self.n_slots = 0
        self.streams: dict[int, None] = {}

    def alloc(self, addr: int, size: int, stream: int, where: str) -> None:
        if addr in self.live:
            raise TraceError(f"{self.name}: {where}: allocation at {addr:#x}, which is already live")
        slot = self.n_slots
        self.n_slots += 1
        self.live[addr] = (slot, size, stream)
        self.streams.setdefault(stream, None)
        self.events.append((False, slot, size, stream))

    def free(self, addr: int, where: str) -> None:
        got = self.live.pop(addr, None)
        if got is None:
            raise TraceError(f"{self.name}: {where}: free of unknown address {addr:#x}")
        slot, size, stream = got
        self.events.append((True, slot, size, stream))


def _int(value: object, name: str, what: str, where: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        got = brief(value) if type(value) is int else f"{type(value).__name__} {brief(value)}"
        raise TraceError(f"{name}: {where}: {what} must be an int in [0, 2**64), got {got}")
    return value


def _cut(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (an error message quoting something untrusted)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def scan_pickle(data: bytes, name: str = "pickle") -> None:
    """Check an untrusted pickle's opcodes before it is loaded; raise if it is not safe.

    The scan reads the opcodes (``pickletools.genops``) without building any
    object and simulates the unpickler's stack with only the shape of what it
    would build: which containers hold which. It refuses

    * any opcode that names a class or calls code (``GLOBAL``, ``REDUCE``, ...);
    * containers nested deeper than :data:`MAX_PICKLE_DEPTH` (a deep tuple
      crashes the interpreter when hashed; deep values overflow the stack of
      every recursive function), and containers that contain themselves;
    * a container that, expanded as a tree, holds more than
      :data:`PICKLE_WEIGHT_PER_BYTE` objects per byte of the file (plus
      :data:`PICKLE_WEIGHT_FLOOR`): the memo lets a few hundred bytes refer to
      one list from many places, so that a walk over the loaded data takes
      exponentially long; within the bound, a walk is linear in the file's size;
    * dict keys and set items whose hashing, while loading, would walk more
      than :data:`PICKLE_HASH_PER_BYTE` objects per byte (plus
      :data:`PICKLE_HASH_FLOOR`): tuples built of shared tuples;
    * integers beyond :data:`MAX_PICKLE_INT_BITS` bits, memo indices beyond
      the number of opcodes read (the unpickler sizes its memo by the largest
      index), frames that run past the end of the file, and anything
      malformed or truncated.

    Every container built is checked, kept or not. The scan's own work is
    linear in the file's size.

    Parameters
    ----------
    data : bytes
        The whole file.
    name : str
        The file's name, for the messages.

    Raises
    ------
    TraceError
        One line naming the file, the byte offset and the reason; an untrusted
        value is never quoted whole.
    """
    size = len(data)
    # Stack items: a container node (int >= 0), a short string (kept to name the class
    # a STACK_GLOBAL refers to) or None (any other scalar).
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    kids: list[list[Any]] = []  # container node -> its items (stack items, as above)
    kinds = bytearray()  # container node -> _LIST, _DICT, _SET or _TUPLE
    # Container node -> a lower bound of its depth, kept as items arrive: a deep file is
    # refused as soon as it gets too deep (the exact walk after the scan decides the rest).
    low = bytearray()
    bio = io.BytesIO(data)
    pos = 0
    n_ops = 0

    def to_mark() -> list[Any]:
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def above(items: list[Any]) -> int:
        """1 + the deepest of `items` (a lower bound)."""
        d = 0
        for i in items:
            if type(i) is int and low[i] > d:
                d = low[i]
        if d >= MAX_PICKLE_DEPTH:
            raise TraceError(
                f"{name}: refused at byte {pos}: containers nested more than "
                f"{MAX_PICKLE_DEPTH} deep (a snapshot nests about 7)"
            )
        return d + 1

    def add(items: list[Any], op: str) -> None:
        top = stack[-1]
        if type(top) is not int:
            raise TraceError(f"{name}: malformed pickle: {op} at byte {pos} adds to a non-container")
        kids[top] += items
        d = above(items)
        if d > low[top]:
            low[top] = d

    try:
        for op, raw_arg, at in pickletools.genops(bio):
            arg: Any = raw_arg
            pos = at or 0
            n_ops += 1
            o = op.name
            # Most frequent first: memo reads are 70% of a snapshot's opcodes.
            if o in _GET_OPS:
                if arg not in memo:
                    raise TraceError(
                        f"{name}: malformed pickle: memo index {brief(arg)} read at byte {pos} "
                        "was never written"
                    )
                stack.append(memo[arg])
            elif o in _SCALAR_OPS:
                if o in _INT_OPS and arg.bit_length() > MAX_PICKLE_INT_BITS:
                    raise TraceError(
                        f"{name}: refused at byte {pos}: an integer of {arg.bit_length()} bits "
                        f"(at most {MAX_PICKLE_INT_BITS}; snapshot values fit 64)"
                    )
                stack.append(arg if o in _STR_OPS and len(arg) <= 100 else None)
            elif o in _PUT_OPS:
                idx = len(memo) if o == "MEMOIZE" else arg
                if idx > n_ops:
                    raise TraceError(
                        f"{name}: refused at byte {pos}: memo index {brief(idx)} beyond the "
                        f"{n_ops} opcodes read so far"
                    )
                memo[idx] = stack[-1]
            elif o == "MARK":
                marks.append(len(stack))
            elif o in _EMPTIES:
                kids.append([])
                kinds.append(_EMPTIES[o])
                low.append(1)
                stack.append(len(kids) - 1)
            elif o in ("APPENDS", "SETITEMS", "ADDITEMS"):
                add(to_mark(), o)
            elif o == "APPEND":
                add([stack.pop()], o)
            elif o == "SETITEM":
                v = stack.pop()
                add([stack.pop(), v], o)
            elif o in _BUILDS or o in ("TUPLE1", "TUPLE2", "TUPLE3"):
                if o in _BUILDS:
                    items = to_mark()
                else:
                    k = int(o[-1])
                    if len(stack) < k:
                        raise IndexError(o)
                    items = stack[-k:]
                    del stack[-k:]
                low.append(above(items))
                kids.append(items)
                kinds.append(_BUILDS.get(o, _TUPLE))
                stack.append(len(kids) - 1)
            elif o == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    stack.pop()
            elif o == "POP_MARK":
                to_mark()
            elif o == "DUP":
                stack.append(stack[-1])
            elif o == "FRAME":
                if arg > size - bio.tell():
                    raise TraceError(
                        f"{name}: truncated pickle, stopped near byte {pos} of {size} (a frame "
                        f"of {brief(arg)} bytes runs past the end of the file)"
                    )
            elif o == "STOP":
                if len(stack) != 1 or marks:
                    raise TraceError(
                        f"{name}: malformed pickle: the stack at STOP (byte {pos}) holds "
                        f"{len(stack)} items, not 1"
                    )
            elif o in _CODE_OPS:
                if o in ("GLOBAL", "INST"):
                    what = "the class " + _cut(str(arg).replace(" ", "."), 100)
                elif o == "STACK_GLOBAL" and len(stack) >= 2 and all(
                    isinstance(x, str) for x in stack[-2:]
                ):
                    what = "the class " + _cut(f"{stack[-2]}.{stack[-1]}", 100)
                else:
                    what = f"a class or code (opcode {o})"
                raise TraceError(
                    f"{name}: refused at byte {pos}: the pickle references {what}; only plain "
                    "dicts, lists and scalars are loaded (a class could run code)"
                )
            elif o != "PROTO":  # pragma: no cover - every opcode of protocols 0-5 is handled
                raise TraceError(f"{name}: malformed pickle: unexpected opcode {o} at byte {pos}")
    except IndexError:
        raise TraceError(
            f"{name}: malformed pickle: the opcode at byte {pos} reads past the bottom of "
            "the stack"
        ) from None
    except TraceError:
        raise
    except ValueError as e:
        what = "truncated" if bio.tell() >= size else "malformed"
        text = str(e)
        if "Exceeds the limit" in text:
            text = "an integer of more than 4300 decimal digits"
        raise TraceError(
            f"{name}: {what} pickle, stopped near byte {bio.tell()} of {size} ({_cut(text)})"
        ) from None
    _check_shape(kids, kinds, name, size)


def _check_shape(kids: list[list[Any]], kinds: bytearray, name: str, size: int) -> None:
    """Refuse deep, self-containing or exponentially shared containers, and costly hashing.

    One iterative depth-first walk over every container the unpickler would build,
    each visited once: linear in the number of containers and items.
    """
    max_weight = PICKLE_WEIGHT_PER_BYTE * size + PICKLE_WEIGHT_FLOOR
    max_hash = PICKLE_HASH_PER_BYTE * size + PICKLE_HASH_FLOOR
    n = len(kids)
    state = bytearray(n)  # 0 unseen, 1 on the walk's path, 2 done
    weight = [0] * n  # objects in the node's subtree, expanded as a tree
    depth = bytearray(n)  # containers on the longest path down from the node
    hashed = 0  # objects walked to hash dict keys and set items
    deep = (
        f"{name}: refused: containers nested more than {MAX_PICKLE_DEPTH} deep "
        "(a snapshot nests about 7)"
    )
    for start in range(n):
        if state[start]:
            continue
        path = [start]
        nexts = [0]
        state[start] = 1
        while path:
            cur = path[-1]
            i = nexts[-1]
            ch = kids[cur]
            while i < len(ch) and type(ch[i]) is not int:  # scalars: nothing below them
                i += 1
            if i < len(ch):
                nexts[-1] = i + 1
                c = ch[i]
                if state[c] == 1:
                    raise TraceError(f"{name}: refused: a container in the pickle contains itself")
                if state[c] == 0:
                    if len(path) >= MAX_PICKLE_DEPTH:
                        raise TraceError(deep)
                    state[c] = 1
                    path.append(c)
                    nexts.append(0)
                continue
            w = 1
            d = 0
            for c in ch:
                if type(c) is int:
                    w += weight[c]
                    if depth[c] > d:
                        d = depth[c]
                else:
                    w += 1
            if d >= MAX_PICKLE_DEPTH:  # reached on a short path, deep below: still too deep
                raise TraceError(deep)
            if w > max_weight:
                raise TraceError(
                    f"{name}: refused: the pickle refers to the same lists and dicts so often "
                    f"that it expands to more than {max_weight:,} objects "
                    f"({PICKLE_WEIGHT_PER_BYTE} per byte of its {size:,} bytes plus "
                    f"{PICKLE_WEIGHT_FLOOR:,}; a snapshot expands to about 4 per byte)"
                )
            kind = kinds[cur]
            if kind == _DICT or kind == _SET:
                keys = ch[::2] if kind == _DICT else ch
                hashed += sum(weight[k] if type(k) is int else 1 for k in keys)
                if hashed > max_hash:
                    raise TraceError(
                        f"{name}: refused: hashing the dict keys would walk more than "
                        f"{max_hash:,} objects (tuples built of shared tuples; "
                        f"{PICKLE_HASH_PER_BYTE} per byte of its {size:,} bytes plus "
                        f"{PICKLE_HASH_FLOOR:,})"
                    )
            weight[cur] = w
            depth[cur] = d + 1
            state[cur] = 2
            path.pop()
            nexts.pop()


def load_snapshot(path: str | os.PathLike[str], device: int | None = None) -> Trace:
    """Read a PyTorch memory snapshot pickle.

    Parameters
    ----------
    path : path-like
        A file written by ``torch.cuda.memory._dump_snapshot``.
    device : int, optional
        Which CUDA device's trace to read; default: the first with events.

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
    p = Path(path)
    name = p.name
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TraceError(f"{name}: cannot read: {e.strerror or e}") from None
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
    return snapshot_to_trace(data, name, device, max_items=size)


def snapshot_to_trace(
    data: object, name: str = "snapshot", device: int | None = None, *, max_items: int | None = None
) -> Trace:
    """Build a :class:`Trace` from an already loaded snapshot ``dict``.

    See :func:`load_snapshot`; `name` is used in error messages.

    Parameters
    ----------
    max_items : int, optional
        Most segments, blocks and events to read (checked before any is read).
        :func:`load_snapshot` passes the file's size in bytes: a snapshot never
        shares one of them through the pickle's memo, so each takes at least
        a byte; a file that lists more shares them, to make the reading long.
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
    with_events = tuple(i for i, t in enumerate(traces) if t)
    if device is None:
        device = with_events[0] if with_events else 0
    elif isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device must be an int (a CUDA device index), got {type(device).__name__}")
    if not 0 <= device < max(len(traces), 1):
        raise TraceError(f"{name}: device {device} not in the trace (0..{len(traces) - 1})")
    events = traces[device] if traces else []
    if not isinstance(events, list):
        raise TraceError(f"{name}: device_traces[{device}] must be a list")
    if max_items is not None:
        n_items = len(segments) + len(events)
        for seg in segments:
            if n_items > max_items:
                break
            blocks = seg.get("blocks") if isinstance(seg, dict) else None
            if isinstance(blocks, (list, tuple)):
                n_items += len(blocks)
        if n_items > max_items:
            raise TraceError(
                f"{name}: refused: the snapshot lists more than {max_items:,} segments, blocks "
                f"and events, more than a file of {max_items:,} bytes holds unless it repeats "
                "them through the pickle's memo (a snapshot never does)"
            )

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
            for j, b in enumerate(seg.get("blocks", ())):
                if b.get("state") == "active_allocated":
                    w = f"{where} block {j}"
                    size = _int(b["size"], name, "size", w)
                    req = _int(b.get("requested_size", size), name, "requested_size", w)
                    final_active[_int(b["address"], name, "address", w)] = (req, size, sstream)
        except (KeyError, AttributeError, TypeError) as e:
            raise TraceError(
                f"{name}: {where}: malformed segment ({type(e).__name__}: {_cut(str(e), 80)})"
            ) from None

    # Pass 1: parse the events; find segments that existed at the start.
    parsed: list[tuple[int, int, int, int, int]] = []  # (kind, addr, size, stream, index)
    seg_seen_alloc: set[int] = set()
    start_segs: dict[int, int] = {}
    net_seg = 0
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
    for kind, addr, size, stream, i in parsed:
        if kind == 0:
            if addr in live:
                raise TraceError(f"{name}: event {i}: alloc at {addr:#x}, which is already live")
            live[addr] = size
        elif kind == 1:
            if addr in live:
                del live[addr]
            elif addr not in early_addrs:
                # Allocated before recording started (in a segment live at the start, or one
                # whose events were not recorded, e.g. dropped past max_entries): a prelude block.
                early.append((addr, size, stream))
                early_addrs.add(addr)
            else:
                raise TraceError(
                    f"{name}: event {i}: free_requested of {addr:#x}, which is not live "
                    f"(freed twice, never allocated again)"
                )
    prelude: dict[int, tuple[int, int, int]] = {a: (s, s, st) for a, s, st in early}
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
    return Trace(
        name=name,
        events=tuple(b.events),
        n_slots=b.n_slots,
        n_prelude=n_prelude,
        streams=tuple(b.streams),
        recorded_peak_reserved=peak_reserved if (final_segs or parsed) else None,
        recorded_peak_allocated=peak_alloc,
        source="pytorch-snapshot",
        recorded_reserved=tuple(reserved_series) if (final_segs or parsed) else (),
        n_failed=n_oom,
        device=device,
        devices=with_events,
    )


def _parse_hex_or_int(text: str) -> int:
    """A pointer, size or stream of an RMM log: decimal or ``0x`` hex, in [0, 2**64)."""
    t = text.strip()
    if len(t) > 24:  # 2**64 takes 20 digits, 18 characters in hex: no int() of a long field
        raise ValueError(t)
    n = int(t, 16) if t.lower().startswith("0x") else int(t)
    if not 0 <= n < 1 << 64:
        raise ValueError(t)
    return n


def load_csv(path: str | os.PathLike[str], text: str | None = None) -> Trace:
    """Read an RMM ``logging_resource_adaptor`` CSV log.

    Parameters
    ----------
    path : path-like
        The log file (``Thread,Time,Action,Pointer,Size,Stream``). Actions are
        ``allocate``, ``free`` and ``allocate failure`` (skipped, counted in
        :attr:`Trace.n_failed`).
    text : str, optional
        The file's contents, when already read (`path` then only names it).

    Returns
    -------
    Trace
        No prelude and no recorded peaks (the log holds neither).

    Raises
    ------
    TraceError
        Bad header, a short or malformed line, a free of an unknown address;
        the message names the file and the line.
    """
    p = Path(path)
    name = p.name
    if text is None:
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise TraceError(f"{name}: not a text file ({e})") from None
        except OSError as e:
            raise TraceError(f"{name}: cannot read: {e.strerror or e}") from None
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff")), strict=True)
    try:
        return _csv_rows(name, rows)
    except csv.Error as e:
        raise TraceError(f"{name}: line {rows.line_num}: malformed CSV ({_cut(str(e))})") from None


def _csv_rows(name: str, rows: Any) -> Trace:
    header = next(rows, None)
    if header is None or tuple(h.strip() for h in header[:6]) != _CSV_HEADER:
        raise TraceError(
            f"{name}: line 1: expected the header {','.join(_CSV_HEADER)}, got "
            f"{_cut(','.join(header), 80) if header else 'an empty file'}"
        )
    b = _Builder(name)
    failed = 0
    for row in rows:
        line = rows.line_num
        where = f"line {line}"
        if not row:
            continue
        if len(row) < 6:
            raise TraceError(f"{name}: {where}: expected 6 fields, got {len(row)} (truncated?)")
        action = row[2].strip().lower()
        try:
            addr = _parse_hex_or_int(row[3])
            size = _parse_hex_or_int(row[4])
            stream = _parse_hex_or_int(row[5])
        except ValueError:
            got = ", ".join(brief(f.strip(), 24) for f in row[3:6])
            raise TraceError(
                f"{name}: {where}: expected a pointer, a size and a stream, each an integer in "
                f"[0, 2**64) (decimal or 0x hex), got {got}"
            ) from None
        if action == "allocate":
            b.alloc(addr, size, stream, where)
        elif action == "free":
            b.free(addr, where)
        elif action == "allocate failure":
            failed += 1
        else:
            raise TraceError(
                f"{name}: {where}: unknown action {brief(row[2])} (expected allocate, free or "
                f"allocate failure)"
            )
    return Trace(
        name=name,
        events=tuple(b.events),
        n_slots=b.n_slots,
        n_prelude=0,
        streams=tuple(b.streams),
        source="rmm-csv",
        n_failed=failed,
    )


def load(path: str | os.PathLike[str], device: int | None = None) -> Trace:
    """Read a trace, choosing the reader by content (CSV header or pickle).

    `device` picks a PyTorch snapshot's device (see :func:`load_snapshot`).

    Raises
    ------
    TraceError
        Unreadable, unknown format, or malformed (see the readers).
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
    except OSError as e:
        raise TraceError(f"{p.name}: cannot read: {e.strerror or e}") from None
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"Thread"):
        if device is not None:
            raise TraceError(f"{p.name}: an RMM log has no devices to choose (device={device})")
        return load_csv(p)
    if head[:1] == b"\x80" or p.suffix in (".pickle", ".pkl"):
        return load_snapshot(p, device)
    raise TraceError(
        f"{p.name}: unknown format: expected a PyTorch snapshot pickle or an RMM CSV log "
        f"starting with {','.join(_CSV_HEADER)}"
    )


# ------------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    """What one replay through a :class:`PagePool` measured.

    Attributes
    ----------
    trace : str
        The trace's name.
    completed : bool
        Every event ran; False when the pool raised out-of-memory.
    failed_event : int or None
        Index of the event that failed (into :attr:`Trace.events`).
    error : str or None
        The out-of-memory message.
    events : int
        Events run (allocations and frees, prelude included).
    n_prelude : int
        Prelude allocations.
    streams : int
        Distinct streams (each its own pool stream key).
    limit : int
        The pool's limit in bytes.
    page_size : int
        Bytes per page.
    peak_live : int
        Largest sum of live requested bytes.
    peak_in_use : int
        Largest bytes in use with the pool's rounding (``PoolStats.peak_allocated_bytes``).
    peak_held : int
        Largest bytes of pages the pool held (``peak_reserved_bytes``).
    page_creations, remaps, syncs, backend_calls : int
        Pages created, cached pages unmapped for reuse, device-wide
        synchronizes, and backend calls of every kind during the replay.
    wall_s : float
        Seconds the replay loop took.
    recorded_peak_reserved, recorded_peak_allocated : int or None
        The recorded run's figures (see :func:`load_snapshot`).
    """

    trace: str
    completed: bool
    failed_event: int | None
    error: str | None
    events: int
    n_prelude: int
    streams: int
    limit: int
    page_size: int
    peak_live: int
    peak_in_use: int
    peak_held: int
    page_creations: int
    remaps: int
    syncs: int
    backend_calls: int
    wall_s: float
    recorded_peak_reserved: int | None = None
    recorded_peak_allocated: int | None = None
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def in_use_ratio(self) -> float:
        """``peak_in_use / peak_live``."""
        return self.peak_in_use / self.peak_live if self.peak_live else float("nan")

    @property
    def held_ratio(self) -> float:
        """``peak_held / peak_live``."""
        return self.peak_held / self.peak_live if self.peak_live else float("nan")

    @property
    def us_per_event(self) -> float:
        """Microseconds of wall time per event run."""
        return 1e6 * self.wall_s / self.events if self.events else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (ratios and time per event included)."""
        d = asdict(self)
        d["in_use_ratio"] = self.in_use_ratio
        d["held_ratio"] = self.held_ratio
        d["us_per_event"] = self.us_per_event
        return d


def _as_trace(trace: Trace | str | os.PathLike[str]) -> Trace:
    return trace if isinstance(trace, Trace) else load(trace)


def scaled(trace: Trace, factor: float) -> Trace:
    """`trace` with every size multiplied by `factor` (at least 1 byte): the same program
    with smaller (or larger) tensors, e.g. ``0.1`` turns 10-160 MiB activations into 1-16 MiB.

    The recorded run's figures do not apply to the scaled trace and are dropped.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1e6:
        raise ValueError(f"factor must be a number in (0, 1e6), got {brief(factor)}")
    sizes: dict[int, int] = {}
    events = []
    for is_free, slot, nbytes, stream in trace.events:
        if not is_free:
            sizes[slot] = max(1, int(nbytes * factor))
        events.append((is_free, slot, sizes[slot], stream))
    return dataclasses.replace(
        trace, name=f"{trace.name} x{factor:g}", events=tuple(events),
        recorded_peak_reserved=None, recorded_peak_allocated=None, recorded_reserved=(),
    )


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


def emulated_capacity(trace: Trace, page_size: int = 2 << 20) -> int:
    """Capacity of the host-emulated device :func:`replay` makes for `trace`.

    Twice the trace's peak live bytes plus 1 GiB, in whole GiB: room for any
    reasonable pool overhead (memfd pages are committed only when touched).
    """
    want = 2 * trace.peak_live + _GIB
    gib = -(-want // _GIB) * _GIB
    cap = -(-gib // page_size) * page_size
    if cap > _EMULATOR_MAX:
        raise TraceError(
            f"{trace.name}: peak live {trace.peak_live} bytes needs an emulated device of {cap} bytes, "
            f"more than the host emulator replays ({_EMULATOR_MAX} bytes, 1 TiB); replay it on a GPU "
            f"(--device cuda) or check the trace"
        )
    return cap


def replay(
    trace: Trace | str | os.PathLike[str],
    device: Device | str | int | None = None,
    limit: int | None = None,
    *,
    page_size: int | None = None,
    small_threshold: int | None = None,
    capacity: int | None = None,
) -> ReplayResult:
    """Replay `trace` through a fresh :class:`PagePool`.

    Parameters
    ----------
    trace : Trace or path-like
        A trace, or a file for :func:`load`.
    device : Device-like, optional
        Where the pool lives. Default: a fresh host-emulated device of
        `capacity` bytes (:func:`emulated_capacity` when omitted).
    limit : int, optional
        The pool's limit in bytes (default: the device's memory).
    page_size, small_threshold : int, optional
        Passed to :class:`PagePool`.
    capacity : int, optional
        Capacity of the emulated device (only when `device` is None).

    Returns
    -------
    ReplayResult
        ``completed`` is False when the pool ran out of memory; everything
        allocated is freed and the pool closed either way, and the default
        emulated device is closed (its memory files with it). The memory is
        never read or written.
    """
    tr = _as_trace(trace)
    if device is not None:
        if capacity is not None:
            raise ValueError("capacity applies only to the default emulated device (device=None)")
        return _replay_on(tr, Device(device), limit, page_size, small_threshold)
    with Device.emulated(emulated_capacity(tr) if capacity is None else capacity) as dev:
        return _replay_on(tr, dev, limit, page_size, small_threshold)


def _replay_on(
    tr: Trace, dev: Device, limit: int | None, page_size: int | None, small_threshold: int | None
) -> ReplayResult:
    from ._pool import PagePool

    before = dev.counters()
    pool = PagePool(dev, limit=limit, page_size=page_size, small_threshold=small_threshold)
    handles: list[Any] = [None] * tr.n_slots
    failed: int | None = None
    error: str | None = None
    malloc = pool.malloc
    i = 0
    t0 = time.perf_counter()
    try:
        for i, (is_free, slot, nbytes, stream) in enumerate(tr.events):  # noqa: B007
            if is_free:
                handles[slot].free()
                handles[slot] = None
            else:
                handles[slot] = malloc(nbytes, stream)
        i = len(tr.events)
    except OutOfMemoryError as e:
        failed = i
        error = str(e)
    except BaseException:
        # Anything else (an OS resource of the emulator, an interrupt): give
        # everything back, then let it through.
        _close_quietly(pool, handles)
        raise
    wall = time.perf_counter() - t0
    try:
        for h in handles:
            if h is not None:
                h.free()
        handles.clear()
        st = pool.stats()
    finally:
        pool.close()
    calls = dev.counters() - before
    return ReplayResult(
        trace=tr.name,
        completed=failed is None,
        failed_event=failed,
        error=error,
        events=i,
        n_prelude=tr.n_prelude,
        streams=len(tr.streams),
        limit=st.limit,
        page_size=st.page_size,
        peak_live=st.peak_requested_bytes,
        peak_in_use=st.peak_allocated_bytes,
        peak_held=st.peak_reserved_bytes,
        page_creations=st.n_page_creations,
        remaps=st.n_remaps,
        syncs=st.n_syncs,
        backend_calls=sum(calls.values()),
        wall_s=wall,
        recorded_peak_reserved=tr.recorded_peak_reserved,
        recorded_peak_allocated=tr.recorded_peak_allocated,
        calls=calls,
    )


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
            xs = [x for x, _ in self.recorded_reserved] + [self.events[-1] if self.events else 0]
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

    Returns
    -------
    Timeline
    **pool_options
        ``page_size``, ``small_threshold`` for :class:`PagePool`.
    """
    tr = _as_trace(trace)
    n = check_int("samples", samples, minimum=1)
    if device is not None:
        return _timeline_on(tr, Device(device), limit, n, pool_options)
    with Device.emulated(emulated_capacity(tr)) as dev:
        return _timeline_on(tr, dev, limit, n, pool_options)


def _timeline_on(
    tr: Trace, dev: Device, limit: int | None, n: int, pool_options: dict[str, Any]
) -> Timeline:
    from ._pool import PagePool

    pool = PagePool(dev, limit=limit, **pool_options)
    handles: list[Any] = [None] * tr.n_slots
    every = max(1, len(tr.events) // n)
    xs: list[int] = []
    live_s: list[int] = []
    held_s: list[int] = []
    live = 0
    completed = True
    try:
        for i, (is_free, slot, nbytes, stream) in enumerate(tr.events):
            if is_free:
                handles[slot].free()
                handles[slot] = None
                live -= nbytes
            else:
                try:
                    handles[slot] = pool.malloc(nbytes, stream)
                except OutOfMemoryError:
                    completed = False
                    break
                live += nbytes
            if i % every == 0 or i == len(tr.events) - 1:
                xs.append(i)
                live_s.append(live)
                held_s.append(pool.stats().reserved_bytes)
    finally:
        _close_quietly(pool, handles)
    return Timeline(tr.name, xs, live_s, held_s, list(tr.recorded_reserved), completed)


def _close_quietly(pool: Any, handles: list[Any]) -> None:
    try:
        for h in handles:
            if h is not None:
                h.free()
    except Exception:  # noqa: BLE001 - close() below releases everything anyway
        pass
    handles.clear()
    pool.close()


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


def min_limit(
    trace: Trace | str | os.PathLike[str],
    device: Device | str | int | None = None,
    *,
    default: ReplayResult | None = None,
    page_size: int | None = None,
    small_threshold: int | None = None,
    capacity: int | None = None,
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
    """
    tr = _as_trace(trace)
    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(page_size=page_size, small_threshold=small_threshold)
    if device is None:
        kw["capacity"] = emulated_capacity(tr) if capacity is None else capacity
    if default is None:
        default = replay(tr, device, **kw)
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
    while hi - bad > 1:
        mid = (bad + hi) // 2
        if ok(mid):
            hi = mid
        else:
            bad = mid
    res = results[hi]
    return MinLimit(
        pages=hi,
        limit=hi * P,
        ratio=hi * P / default.peak_live if default.peak_live else float("nan"),
        probes=probes,
        result=res,
        wall_s=time.perf_counter() - t0,
    )


# -------------------------------------------------------------- reporting
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
            _ratio(v["peak_in_use"], live),
            _ratio(v["peak_held"], live),
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


# -------------------------------------------------------------------- peers
#: The peer allocators :func:`peer_replays` runs, by name.
PEERS = ("torch", "torch-expandable", "torch-vmmpool", "cupy")


@dataclass
class PeerResult:
    """One peer allocator's replay (run on a GPU, in a subprocess).

    Attributes
    ----------
    peer : str
        ``torch``, ``torch-expandable``, ``torch-vmmpool`` (PyTorch's caching
        allocator in a :func:`vmmpool.torch.MemPool`: its peak reserved is the
        page pool's peak bytes of pages) or ``cupy``.
    completed : bool or None
        None when it could not run (see `skipped`).
    peak_reserved, peak_allocated : int or None
        The allocator's own peak reserved / allocated bytes.
    min_limit : int or None
        Smallest completing limit in bytes (2 MiB steps), when searched.
    wall_s : float or None
        Seconds of the default replay.
    skipped : str or None
        Why the peer did not run.
    """

    peer: str
    completed: bool | None = None
    peak_reserved: int | None = None
    peak_allocated: int | None = None
    min_limit: int | None = None
    wall_s: float | None = None
    skipped: str | None = None


def peer_command(
    peer: str, trace_path: str | os.PathLike[str], limit: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """The subprocess command line and environment that replay through `peer`.

    Returns
    -------
    (argv, env)
        ``env`` is the current environment with ``PYTORCH_CUDA_ALLOC_CONF``
        set (``expandable_segments:True`` for ``torch-expandable``, removed
        otherwise).
    """
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {brief(peer)}")
    argv = [sys.executable, "-m", "vmmpool.replay", "--peer", peer, os.fspath(trace_path)]
    if limit is not None:
        argv += ["--limit", str(int(limit))]
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if peer == "torch-expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return argv, env


def parse_peer_output(peer: str, stdout: str, returncode: int = 0) -> dict[str, Any]:
    """Read the result line a peer subprocess printed.

    Raises
    ------
    RuntimeError
        No result line (the subprocess crashed): the message quotes its tail.
    """
    for line in reversed(stdout.splitlines()):
        if line.startswith(_PEER_MARK):
            out = json.loads(line[len(_PEER_MARK):])
            if not isinstance(out, dict) or "completed" not in out:
                raise RuntimeError(f"{peer}: malformed result line {_cut(line)!r}")
            return out
    tail = stdout.strip().splitlines()[-3:]
    raise RuntimeError(f"{peer}: subprocess exited {returncode} without a result: {tail}")


def _peer_run(peer: str, path: str, limit: int | None, timeout: float) -> dict[str, Any]:
    argv, env = peer_command(peer, path, limit)
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return parse_peer_output(peer, proc.stdout + proc.stderr, proc.returncode)


def gpu_unavailable_reason() -> str | None:
    """Why the peer replays cannot run here (None when a CUDA GPU is usable)."""
    from ._backends import cuda as _cuda

    return _cuda.probe(0)


def peer_replays(
    trace_path: str | os.PathLike[str],
    peers: Sequence[str] = PEERS,
    *,
    search: bool = True,
    timeout: float = 600.0,
) -> list[PeerResult]:
    """Replay a trace file through PyTorch's caching allocator (also on vmmpool) and CuPy's pool.

    Each replay runs in its own subprocess (so each starts with an empty
    allocator and, for PyTorch, its own ``PYTORCH_CUDA_ALLOC_CONF``); a limit
    is set with ``torch.cuda.set_per_process_memory_fraction`` or
    ``cupy.cuda.MemoryPool.set_limit`` (for ``torch-vmmpool``: the page
    pool's limit). With `search`, the smallest limit at
    which each completes is searched by bisection in 2 MiB steps between the
    peak live bytes and the peer's own peak reserved.

    Returns
    -------
    list of PeerResult
        One per peer; without a GPU (or the peer's package) each is skipped
        with the reason.

    Notes
    -----
    Needs a CUDA GPU; not verified on one in this project's CI.
    """
    reason = gpu_unavailable_reason()
    out = []
    path = os.fspath(trace_path)
    peak_live = load(path).peak_live if search and reason is None else 0
    for peer in peers:
        if reason is not None:
            out.append(PeerResult(peer, skipped=f"no CUDA GPU ({reason})"))
            continue
        mod = "cupy" if peer == "cupy" else "torch"
        try:
            __import__(mod)
        except ImportError:
            out.append(PeerResult(peer, skipped=f"{mod} is not installed"))
            continue
        try:
            r = _peer_run(peer, path, None, timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            out.append(PeerResult(peer, skipped=str(e)))
            continue
        res = PeerResult(
            peer, completed=bool(r["completed"]), peak_reserved=r.get("peak_reserved"),
            peak_allocated=r.get("peak_allocated"), wall_s=r.get("wall_s"),
        )
        if search and res.completed and res.peak_reserved:
            step = 2 << 20
            bad = max(0, peak_live // step - 1)
            good = -(-int(res.peak_reserved) // step)
            while good - bad > 1:
                mid = (bad + good) // 2
                try:
                    done = bool(_peer_run(peer, path, mid * step, timeout)["completed"])
                except (RuntimeError, subprocess.TimeoutExpired):
                    done = False
                if done:
                    good = mid
                else:
                    bad = mid
            res.min_limit = good * step
        out.append(res)
    return out


def _peer_main(peer: str, path: str, limit: int | None) -> int:  # pragma: no cover - GPU only
    """Inside the subprocess: replay through one peer, print one result line."""
    tr = load(path)
    handles: list[Any] = [None] * tr.n_slots
    completed = True
    if peer == "cupy":
        import cupy

        pool = cupy.cuda.MemoryPool()
        if limit is not None:
            pool.set_limit(size=limit)
        streams = {s: (cupy.cuda.Stream.null if s == 0 else cupy.cuda.Stream()) for s in tr.streams}
        peak_res = peak_used = 0
        t0 = time.perf_counter()
        try:
            for is_free, slot, nbytes, s in tr.events:
                if is_free:
                    handles[slot] = None
                else:
                    with streams[s]:
                        handles[slot] = pool.malloc(nbytes)
                    peak_res = max(peak_res, pool.total_bytes())
                    peak_used = max(peak_used, pool.used_bytes())
        except cupy.cuda.memory.OutOfMemoryError:
            completed = False
        wall = time.perf_counter() - t0
    elif peer == "torch-vmmpool":
        import torch

        from . import torch as vt
        from ._device import Device
        from ._pool import PagePool

        torch.cuda.init()
        vpool = PagePool(Device(0), limit=limit)
        tstreams = {
            s: (torch.cuda.default_stream() if s == 0 else torch.cuda.Stream()) for s in tr.streams
        }
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with vt.use_pool(vpool):
            try:
                for is_free, slot, nbytes, s in tr.events:
                    if is_free:
                        handles[slot] = None
                    else:
                        with torch.cuda.stream(tstreams[s]):
                            handles[slot] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError:
                completed = False
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak_res = vpool.stats().peak_reserved_bytes  # pages the page pool held
        peak_used = torch.cuda.max_memory_allocated()
    else:
        import torch

        torch.cuda.init()
        if limit is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), 0)
        tstreams = {
            s: (torch.cuda.default_stream() if s == 0 else torch.cuda.Stream()) for s in tr.streams
        }
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            for is_free, slot, nbytes, s in tr.events:
                if is_free:
                    handles[slot] = None
                else:
                    with torch.cuda.stream(tstreams[s]):
                        handles[slot] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        except torch.cuda.OutOfMemoryError:
            completed = False
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak_res = torch.cuda.max_memory_reserved()
        peak_used = torch.cuda.max_memory_allocated()
    handles.clear()
    print(_PEER_MARK + json.dumps({
        "completed": completed, "peak_reserved": peak_res, "peak_allocated": peak_used,
        "wall_s": wall, "limit": limit,
    }), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - the peer subprocess
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vmmpool.replay")
    ap.add_argument("--peer", required=True, choices=PEERS)
    ap.add_argument("trace")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    sys.exit(_peer_main(a.peer, a.trace, a.limit))

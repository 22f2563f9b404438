"""The reader of RMM ``logging_resource_adaptor`` CSV logs."""

from __future__ import annotations

import array
import csv
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

from .._options import brief
from ._trace import Trace, TraceError, _Builder, _cut, _read_bounded

__all__ = ["load_csv", "CSV_HEADER"]

_log = logging.getLogger("vmmpool")

#: The header an RMM log starts with.
CSV_HEADER = ("Thread", "Time", "Action", "Pointer", "Size", "Stream")
#: The header of RMM's logs before the thread column (RMM 0.14 and earlier, mid-2020).
CSV_HEADER_NO_THREAD = CSV_HEADER[1:]


#: A pointer or stream field: hex, with or without ``0x`` (RMM wrote ``fmt::ptr``, ``0x7f...``,
#: up to 24.x, ``%llx``, ``7f...``, in one 2024 revision, and ``%p`` since: ``0x7f...``, and
#: ``(nil)`` for the null pointer of an ``allocate failure``, glibc's ``%p`` of null). A size
#: field: decimal (``%zu``), or ``0x`` hex. int() alone also takes a sign, ``_`` separators
#: and non-ASCII digits: not these.
_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]+")
_SIZE = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")


def _parse_field(text: str, hex_only: bool) -> int:
    """A pointer or stream (`hex_only`) or a size of an RMM log, in [0, 2**64)."""
    t = text.strip()
    if hex_only and t == "(nil)":
        return 0
    if len(t) > 24 or not (_HEX if hex_only else _SIZE).fullmatch(t):
        raise ValueError(t)  # 2**64 takes 20 digits: no int() of a long field
    n = int(t, 16) if hex_only or t[1:2] in ("x", "X") else int(t)
    if not 0 <= n < 1 << 64:
        raise ValueError(t)
    return n


def load_csv(
    path: str | os.PathLike[str], text: str | None = None, *, max_bytes: int | None = None
) -> Trace:
    """Read an RMM ``logging_resource_adaptor`` CSV log.

    Parameters
    ----------
    path : path-like
        The log file (``Thread,Time,Action,Pointer,Size,Stream``, or without
        ``Thread,`` as RMM wrote before mid-2020). Pointers and streams are hex,
        with or without ``0x`` (``0x...`` from ``fmt::ptr`` and ``%p``, ``%llx``
        in one 2024 revision; ``(nil)``, glibc's null ``%p``, is 0); sizes are
        decimal (or ``0x`` hex). Actions are ``allocate``, ``free`` and ``allocate
        failure`` (skipped, counted in :attr:`Trace.n_failed`). 0-byte allocations
        at the null pointer (what RMM's resources return for 0 bytes) and frees of
        the null pointer are skipped. A free of an address the log never allocated
        (logging began after it: ``rmm.enable_logging()`` mid-run) is a block live
        at the start, of the free's size: a prelude block, as for PyTorch
        snapshots. A last line without its newline that is short or malformed is
        dropped, with a warning (RMM buffers its log: a crash cuts it anywhere).
    text : str, optional
        The file's contents, when already read (`path` then only names it).
    max_bytes : int, optional
        The largest file read (default :data:`MAX_TRACE_BYTES`, 1 GiB); a longer
        one is a :class:`TraceError`, read no further.

    Returns
    -------
    Trace
        No recorded peaks (the log holds none).

    Raises
    ------
    TraceError
        Bad header, a short or malformed line (but the last, unterminated one),
        an allocation at a live address, a second free of an address; the
        message names the file and the line.
    """
    p = Path(path)
    name = p.name
    if text is None:
        text = _decode(name, _read_bounded(p, max_bytes))
    text = text.removeprefix("\ufeff")
    rows = csv.reader(io.StringIO(text), strict=True)
    # RMM ends every line with a newline: a last line without one was cut (a crash).
    last = text.count("\n") + (0 if text.endswith("\n") else 1)
    cut_line = last if text and not text.endswith(("\n", "\r")) else 0
    try:
        return _csv_rows(name, rows, cut_line)
    except csv.Error as e:
        raise TraceError(f"{name}: line {rows.line_num}: malformed CSV ({_cut(str(e))})") from None


def _decode(name: str, raw: bytes) -> str:
    """The text of an RMM log's bytes (UTF-8, with or without a BOM)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TraceError(f"{name}: not a text file ({e})") from None


def _csv_rows(name: str, rows: Any, cut_line: int) -> Trace:
    """The trace of an RMM log's rows (a ``csv.reader``); `cut_line`: the number of a last
    line without its newline (0: none), dropped if it is short or malformed.

    One pass parses every row into compact arrays and checks them in line order (the
    first error in the file is the one reported); the frees of addresses the log never
    allocated are found on the way and allocated first, as the prelude.
    """
    header = next(rows, None)
    # Blank lines before the header (the format sniffing skips leading whitespace too).
    while header is not None and not any(h.strip() for h in header):
        header = next(rows, None)
    fields = tuple(h.strip() for h in header[:6]) if header else ()
    got = "an empty file" if rows.line_num == 0 else "only blank lines"
    if fields == CSV_HEADER:
        c = 0  # the column of Time; Action, Pointer, Size and Stream follow
    elif fields[:5] == CSV_HEADER_NO_THREAD:
        c = -1
    else:
        raise TraceError(
            f"{name}: line {max(rows.line_num, 1)}: expected the header {','.join(CSV_HEADER)} "
            f"(or, before RMM 0.15, {','.join(CSV_HEADER_NO_THREAD)}), got "
            f"{_cut(','.join(header), 80) if header else got}"
        )
    width = 6 + c
    # Parsed events, compact (a raw row costs ten times more): kind 0 alloc, 1 free.
    kinds = array.array("B")
    addrs, sizes, streams = array.array("Q"), array.array("Q"), array.array("Q")
    lines = array.array("Q")
    live: set[int] = set()
    traced: set[int] = set()
    prelude: dict[int, tuple[int, int]] = {}  # addr -> (size, stream), from the free
    failed = 0
    start = rows.line_num + 1  # the line the next record starts on
    while True:
        try:
            row = next(rows, None)
        except csv.Error as e:
            # Dropped only when the broken record starts on the cut last line (a stray
            # quote earlier would swallow the rest of the file into one field).
            if start != cut_line:
                to = f", to line {rows.line_num}" if rows.line_num > start else ""
                raise TraceError(
                    f"{name}: line {start}: malformed CSV ({_cut(str(e))}{to})"
                ) from None
            _log.warning("%s: dropped line %d, the last, cut short (no newline): malformed CSV "
                         "(%s)", name, start, _cut(str(e)))
            break
        if row is None:
            break
        line = rows.line_num
        start = line + 1
        where = f"line {line}"
        if not row:
            continue
        try:
            if len(row) < width:
                raise TraceError(
                    f"{name}: {where}: expected {width} fields, got {len(row)} (truncated?)"
                )
            action = row[2 + c].strip().lower()
            try:
                addr = _parse_field(row[3 + c], True)
                size = _parse_field(row[4 + c], False)
                stream = _parse_field(row[5 + c], True)
            except ValueError:
                got = ", ".join(brief(f.strip(), 24) for f in row[3 + c : 6 + c])
                raise TraceError(
                    f"{name}: {where}: expected a pointer, a size and a stream, each an integer "
                    f"in [0, 2**64) (pointer and stream in hex, 0x optional; size in decimal), "
                    f"got {got}"
                ) from None
        except TraceError as e:
            if line != cut_line:
                raise
            _log.warning("%s: dropped line %d, the last, cut short (no newline): %s", name,
                         line, e)
            break
        if addr == 0 and action in ("allocate", "free") and (size == 0 or action == "free"):
            # RMM resources return nullptr for 0 bytes, and the adaptor logs it; freeing
            # nullptr does nothing. Neither is an allocation (two would share address 0).
            continue
        if action == "allocate":
            if addr in live:
                raise TraceError(f"{name}: {where}: allocation at {addr:#x}, which is already live")
            live.add(addr)
            traced.add(addr)
            kind = 0
        elif action == "free":
            if addr in live:
                live.discard(addr)
            elif addr not in traced and addr not in prelude:
                # Allocated before logging began: live at the start (a prelude block).
                prelude[addr] = (size, stream)
            else:
                raise TraceError(
                    f"{name}: {where}: free of {addr:#x}, which is not live (freed twice)"
                )
            kind = 1
        elif action == "allocate failure":
            failed += 1
            continue
        else:
            raise TraceError(
                f"{name}: {where}: unknown action {brief(row[2 + c])} (expected allocate, free or "
                f"allocate failure)"
            )
        kinds.append(kind)
        addrs.append(addr)
        sizes.append(size)
        streams.append(stream)
        lines.append(line)
    b = _Builder(name)
    for addr in sorted(prelude):
        size, stream = prelude[addr]
        b.alloc(addr, size, stream, f"prelude block {addr:#x}")
    n_prelude = b.n_slots
    for k in range(len(kinds)):
        if kinds[k] == 0:
            b.alloc(addrs[k], sizes[k], streams[k], f"line {lines[k]}")
        else:
            b.free(addrs[k], f"line {lines[k]}")
    return Trace(
        name=name,
        events=tuple(b.events),
        n_slots=b.n_slots,
        n_prelude=n_prelude,
        streams=tuple(b.streams),
        source="rmm-csv",
        n_failed=failed,
    )

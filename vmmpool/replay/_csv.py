"""The reader of RMM ``logging_resource_adaptor`` CSV logs."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from .._options import brief
from ._trace import Trace, TraceError, _Builder, _cut, _read_bounded

__all__ = ["load_csv", "CSV_HEADER"]

#: The header an RMM log starts with.
CSV_HEADER = ("Thread", "Time", "Action", "Pointer", "Size", "Stream")


#: A pointer or stream field: hex, with or without ``0x`` (RMM wrote ``fmt::ptr``, ``0x7f...``,
#: up to 24.x and ``%llx``, ``7f...``, since). A size field: decimal (``%zu``), or ``0x`` hex.
#: int() alone also takes a sign, ``_`` separators and non-ASCII digits: not these.
_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]+")
_SIZE = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")


def _parse_field(text: str, hex_only: bool) -> int:
    """A pointer or stream (`hex_only`) or a size of an RMM log, in [0, 2**64)."""
    t = text.strip()
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
        The log file (``Thread,Time,Action,Pointer,Size,Stream``). Pointers and
        streams are hex, with or without ``0x`` (RMM 25.x writes ``%llx``, earlier
        versions ``0x...``); sizes are decimal (or ``0x`` hex). Actions are
        ``allocate``, ``free`` and ``allocate failure`` (skipped, counted in
        :attr:`Trace.n_failed`). 0-byte allocations at the null pointer (what RMM's
        resources return for 0 bytes) and frees of the null pointer are skipped.
    text : str, optional
        The file's contents, when already read (`path` then only names it).
    max_bytes : int, optional
        The largest file read (default :data:`MAX_TRACE_BYTES`, 1 GiB); a longer
        one is a :class:`TraceError`, read no further.

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
        text = _decode(name, _read_bounded(p, max_bytes))
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff")), strict=True)
    try:
        return _csv_rows(name, rows)
    except csv.Error as e:
        raise TraceError(f"{name}: line {rows.line_num}: malformed CSV ({_cut(str(e))})") from None


def _decode(name: str, raw: bytes) -> str:
    """The text of an RMM log's bytes (UTF-8, with or without a BOM)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TraceError(f"{name}: not a text file ({e})") from None


def _csv_rows(name: str, rows: Any) -> Trace:
    header = next(rows, None)
    if header is None or tuple(h.strip() for h in header[:6]) != CSV_HEADER:
        raise TraceError(
            f"{name}: line 1: expected the header {','.join(CSV_HEADER)}, got "
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
            addr = _parse_field(row[3], True)
            size = _parse_field(row[4], False)
            stream = _parse_field(row[5], True)
        except ValueError:
            got = ", ".join(brief(f.strip(), 24) for f in row[3:6])
            raise TraceError(
                f"{name}: {where}: expected a pointer, a size and a stream, each an integer in "
                f"[0, 2**64) (pointer and stream in hex, 0x optional; size in decimal), got {got}"
            ) from None
        if addr == 0 and action in ("allocate", "free") and (size == 0 or action == "free"):
            # RMM resources return nullptr for 0 bytes, and the adaptor logs it; freeing
            # nullptr does nothing. Neither is an allocation (two would share address 0).
            continue
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

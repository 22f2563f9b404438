"""The reader of RMM ``logging_resource_adaptor`` CSV logs."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from .._options import brief
from ._trace import Trace, TraceError, _Builder, _cut

__all__ = ["load_csv", "CSV_HEADER"]

#: The header an RMM log starts with.
CSV_HEADER = ("Thread", "Time", "Action", "Pointer", "Size", "Stream")


#: What a pointer, size or stream field holds: ASCII decimal digits or ``0x`` hex (int() alone
#: also takes a sign, ``_`` separators and non-ASCII digits).
_NUMBER = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")


def _parse_hex_or_int(text: str) -> int:
    """A pointer, size or stream of an RMM log: decimal or ``0x`` hex, in [0, 2**64)."""
    t = text.strip()
    if len(t) > 24 or not _NUMBER.fullmatch(t):  # 2**64 takes 20 digits: no int() of a long field
        raise ValueError(t)
    n = int(t, 16) if t[1:2] in ("x", "X") else int(t)
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

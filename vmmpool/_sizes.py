"""One grammar for every size a user types (issue 21).

Used by ``replay --limit``, ``demo --limit``, ``VMMPOOL_HOST_CAPACITY``,
``CUPY_GPU_MEMORY_LIMIT`` (:func:`vmmpool.cupy.parse_limit`) and the benchmarks'
size options.

Grammar: a number, optional spaces, an optional unit.

- The number: ASCII digits with an optional decimal fraction (``"4096"``,
  ``"1.5"``, ``".5"``); ``_`` may separate digits (``"1_000_000"``). No sign,
  no exponent.
- The unit, case-insensitive: none or ``B`` (bytes); ``K``, ``M``, ``G``, ``T``
  and ``KiB``, ``MiB``, ``GiB``, ``TiB`` (binary, powers of 1024);
  ``KB``, ``MB``, ``GB``, ``TB`` (decimal, powers of 1000, as disk makers and
  SI write them). So ``"1.5GB"`` is 1,500,000,000 bytes and ``"1.5G"`` or
  ``"1.5GiB"`` is 1,610,612,736 bytes. ``b`` means bytes, never bits.
- Spaces before and after the value and between number and unit are allowed
  (``"4 GiB"``).
- A fractional byte count is rounded down (``"1.3K"`` is 1331 bytes).

Bounds: at most :data:`MAX_CHARS` characters are looked at (a longer value is
refused before it is parsed, and the message shows only its start and length),
and the result must be below 2**64 bytes. A caller checks its own range (a
positive limit, at least one granule) on the returned int.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction

from ._options import brief

__all__ = ["parse_size", "parse_fraction", "size_arg", "positive_size_arg", "UNITS", "MAX_CHARS", "EXAMPLES"]

#: Bytes per unit, keyed by the unit in lower case.
UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}

#: The longest value parsed (spaces included); longer ones are refused unread.
MAX_CHARS = 64

#: What an error message offers as examples.
EXAMPLES = "4096, 512MiB, 1.5GiB or 2GB"

_GRAMMAR = re.compile(
    r"\s*(?P<num>[0-9]+(?:_[0-9]+)*(?:\.(?:[0-9]+(?:_[0-9]+)*)?)?|\.[0-9]+(?:_[0-9]+)*)"
    r"\s*(?P<unit>[a-z]*)\s*",
    re.ASCII | re.IGNORECASE,
)

_LIMIT = 1 << 64


def parse_size(text: str) -> int:
    """Bytes for a size such as ``"4096"``, ``"512M"``, ``"1.5 GiB"`` or ``"2GB"``.

    Parameters
    ----------
    text : str
        The size, in the grammar of this module (binary ``K``/``KiB`` ...,
        decimal ``KB`` ..., case-insensitive).

    Returns
    -------
    int
        The size in bytes, from 0 to below 2**64 (a fraction of a byte rounded down).

    Raises
    ------
    ValueError
        If `text` is not a size, is longer than :data:`MAX_CHARS` characters,
        or is 2**64 bytes or more. The message quotes at most the start of `text`.
    """
    if not isinstance(text, str):
        raise TypeError(f"a size must be a str, got {type(text).__name__} {brief(text)}")
    m = _GRAMMAR.fullmatch(text) if len(text) <= MAX_CHARS else None
    unit = None if m is None else UNITS.get(m["unit"].lower())
    if m is None or unit is None:
        raise ValueError(f"expected a size such as {EXAMPLES}, got {brief(text)}")
    value = Fraction(m["num"].replace("_", "")) * unit
    if value >= _LIMIT:
        raise ValueError(f"a size must be below 2**64 bytes (16 EiB), got {brief(text)}")
    return int(value)  # rounds down: a non-negative Fraction


def parse_fraction(text: str) -> Fraction:
    """The exact value of a plain number of this grammar, without a unit (``"12.5"``):
    a percentage's number. Raises ValueError as :func:`parse_size` does."""
    m = _GRAMMAR.fullmatch(text) if len(text) <= MAX_CHARS else None
    if m is None or m["unit"]:
        raise ValueError(f"expected a number such as 50 or 12.5, got {brief(text)}")
    return Fraction(m["num"].replace("_", ""))


def size_arg(text: str) -> int:
    """:func:`parse_size` as an argparse ``type``: its message becomes argparse's."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size_arg(text: str) -> int:
    """:func:`size_arg` of a size that must be above 0 (a limit)."""
    n = size_arg(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"the size must be > 0, got {brief(text)}")
    return n

"""Arenas: virtual address space, one reservation per arena, owned by one stream's heap.

An arena is cut into page *slots*. A slot is either mapped (it holds a page)
or unmapped; unmapped slots are always wholly free (a slot touched by a live
block is mapped), so they are kept as extents of whole slots, first fit,
coalescing. Blocks and free ranges inside the mapped slots are kept by the
stream (see ``_blocks.py``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._resources import AddressReservation
from ._pages import Page

if TYPE_CHECKING:
    from ._streams import Heap, StreamState


class Arena:
    """One address reservation of a stream's heap, carved into page slots."""

    __slots__ = ("res", "base", "P", "nslots", "slots", "heap", "fstarts", "flen", "fend", "mapped")

    def __init__(self, res: AddressReservation, page_size: int, heap: Heap) -> None:
        self.res = res
        self.base = res.address
        self.P = page_size
        self.nslots = res.size // page_size
        self.slots: list[Page | None] = [None] * self.nslots
        self.heap = heap
        self.fstarts = [0]  # sorted starts of unmapped extents
        self.flen = {0: self.nslots}  # start -> length
        self.fend = {self.nslots: 0}  # end -> start
        self.mapped = 0  # slots holding a page (quarantined ones included)

    @property
    def stream(self) -> StreamState:
        """The stream whose heap this arena belongs to."""
        return self.heap.stream

    def runs(self) -> Iterator[tuple[int, int]]:
        """The unmapped extents as ``(first slot, count)``, by address."""
        flen = self.flen
        for s in self.fstarts:
            yield s, flen[s]

    def take_at(self, s: int, n: int) -> None:
        """Remove slots ``[s, s + n)`` (inside one unmapped extent) from the extents."""
        i = bisect.bisect_right(self.fstarts, s) - 1
        es = self.fstarts[i]
        ln = self.flen[es]
        ee = es + ln
        assert es <= s and s + n <= ee, "slots are not unmapped"
        del self.flen[es]
        del self.fend[ee]
        del self.fstarts[i]
        if es < s:
            self.fstarts.insert(i, es)
            self.flen[es] = s - es
            self.fend[s] = es
            i += 1
        if s + n < ee:
            self.fstarts.insert(i, s + n)
            self.flen[s + n] = ee - s - n
            self.fend[ee] = s + n

    def give(self, s: int, n: int) -> None:
        """Return slots ``[s, s + n)`` to the unmapped extents (coalescing)."""
        e = s + n
        ps = self.fend.pop(s, None)
        if ps is not None:
            del self.flen[ps]
            del self.fstarts[bisect.bisect_left(self.fstarts, ps)]
            s = ps
        nl = self.flen.pop(e, None)
        if nl is not None:
            del self.fend[e + nl]
            del self.fstarts[bisect.bisect_left(self.fstarts, e)]
            e += nl
        bisect.insort(self.fstarts, s)
        self.flen[s] = e - s
        self.fend[e] = s

    def is_unmapped(self, s: int) -> bool:
        i = bisect.bisect_right(self.fstarts, s) - 1
        if i < 0:
            return False
        es = self.fstarts[i]
        return s < es + self.flen[es]

    @property
    def empty(self) -> bool:
        """True when nothing is mapped (so no block lies in it)."""
        return self.flen.get(0) == self.nslots

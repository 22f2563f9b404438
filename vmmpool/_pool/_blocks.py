"""Sub-page blocks: live allocations and free ranges at 512-byte granularity.

Blocks are carved out of an arena's address space, not out of pages: a block
may be smaller than a page, share pages with its neighbours, or span page
boundaries. Every byte of a mapped slot belongs to exactly one live block or
one free range; free ranges lie only in mapped slots ("mapped free ranges",
reusable at once) and are coalesced with their neighbours on free.

A page slot that lies wholly inside one free range is touched by no live block:
its page is *cached* (still mapped, reusable by its stream at zero cost) and can
be reclaimed (unmapped, to the free pages, or remapped). :func:`whole_slots`
finds those pages; :meth:`FreeBlocks.cached_pages` counts them off the hot path
(malloc and free keep no page counts at all).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._arena import Arena

#: Alignment (and rounding) of every block, in bytes.
ALIGNMENT = 512


class Block:
    """A live allocation (``live``) or a free range of one arena."""

    __slots__ = ("arena", "addr", "size", "nbytes", "live", "ref", "seq")

    def __init__(self, arena: Arena, addr: int, size: int, seq: int = 0) -> None:
        self.arena = arena
        self.addr = addr
        self.size = size
        self.nbytes = 0
        self.live = False
        self.ref: Any = None
        #: For a free range: the stream's free count when it was last freed into
        #: (its pages may leave the stream once an event with seq >= this is done).
        self.seq = seq


def whole_slots(b: Block) -> tuple[int, int]:
    """``(first, end)`` slots lying wholly inside `b` (``end <= first`` when none)."""
    a = b.arena
    P = a.P
    off = b.addr - a.base
    return (off + P - 1) // P, (off + b.size) // P


def n_whole(b: Block) -> int:
    if b.size < b.arena.P:
        return 0
    s, e = whole_slots(b)
    return e - s if e > s else 0


class FreeBlocks:
    """One stream's free ranges: size bins for best fit, address indexes for coalescing."""

    __slots__ = ("bins", "sizes", "by_start", "by_end", "spare")

    def __init__(self) -> None:
        self.bins: dict[int, dict[Block, None]] = {}  # size -> free ranges
        self.sizes: list[int] = []  # sorted keys of bins (bins may be empty)
        self.by_start: dict[int, Block] = {}
        self.by_end: dict[int, Block] = {}
        #: Block objects of free ranges merged away, reused by splits (no allocation).
        self.spare: list[Block] = []

    def add(self, b: Block) -> None:
        bin_ = self.bins.get(b.size)
        if bin_ is None:
            self.bins[b.size] = bin_ = {}
            bisect.insort(self.sizes, b.size)
        bin_[b] = None
        self.by_start[b.addr] = b
        self.by_end[b.addr + b.size] = b

    def remove(self, b: Block) -> None:
        del self.bins[b.size][b]
        del self.by_start[b.addr]
        del self.by_end[b.addr + b.size]

    def cached_pages(self, page_size: int) -> int:
        """Pages lying wholly inside free ranges (walks the ranges of a page or more)."""
        sizes = self.sizes
        bins = self.bins
        n = 0
        for i in range(bisect.bisect_left(sizes, page_size), len(sizes)):
            for b in bins[sizes[i]]:
                n += n_whole(b)
        return n

    def best_fit(self, r: int, exact: bool = True) -> Block | None:
        """Take the smallest free range of at least `r` bytes out of the index.

        With `exact` False the caller already found no range of exactly `r`.
        """
        bin_ = self.bins.get(r) if exact else None
        if not bin_:
            sizes = self.sizes
            bins = self.bins
            i = bisect.bisect_left(sizes, r)
            while True:
                if i >= len(sizes):
                    return None
                sz = sizes[i]
                bin_ = bins[sz]
                if bin_:
                    break
                del bins[sz]
                del sizes[i]
        b = bin_.popitem()[0]
        del self.by_start[b.addr]
        del self.by_end[b.addr + b.size]
        return b

    def insert(self, b: Block) -> None:
        """File free range `b`, coalescing with free neighbours of the same arena."""
        bins = self.bins
        by_start = self.by_start
        by_end = self.by_end
        addr = b.addr
        prv = by_end.get(addr)
        if prv is not None and prv.arena is b.arena:
            del bins[prv.size][prv]
            del by_end[addr]
            del by_start[prv.addr]
            addr = b.addr = prv.addr
            b.size += prv.size
            if prv.seq > b.seq:
                b.seq = prv.seq
            if len(self.spare) < 64:
                self.spare.append(prv)
        end = addr + b.size
        nxt = by_start.get(end)
        if nxt is not None and nxt.arena is b.arena:
            del bins[nxt.size][nxt]
            del by_start[end]
            end += nxt.size
            del by_end[end]
            b.size += nxt.size
            if nxt.seq > b.seq:
                b.seq = nxt.seq
            if len(self.spare) < 64:
                self.spare.append(nxt)
        bin_ = bins.get(b.size)
        if bin_ is None:
            bins[b.size] = bin_ = {}
            bisect.insort(self.sizes, b.size)
        bin_[b] = None
        by_start[addr] = b
        by_end[end] = b

    def prune(self) -> None:
        """Drop empty bins (otherwise dropped lazily by best-fit scans)."""
        for sz in [s for s, b in self.bins.items() if not b]:
            del self.bins[sz]
        self.sizes = sorted(self.bins)

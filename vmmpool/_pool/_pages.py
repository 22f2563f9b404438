"""Pages: the unit of physical memory and of remapping.

Each page is one ``cuMemCreate`` handle of ``page_size`` bytes (driver rule 2:
a handle is mapped whole, at offset 0), so any page can be unmapped and mapped
anywhere else on its own.

A page may also be mapped again, in other slots of its stream (*aliases*, see
:class:`Alias`): at the limit, the free head or tail of a partly used page
becomes the last or first page of a new block's range. The page's bytes are
then split between its mappings: each byte is used through one of them only
(the others cover it with a *fence*). A page lends at most its head to one
alias and its tail to another (bytes its own slot holds free), so it has at
most two aliases that lend bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._resources import PhysicalAllocation

if TYPE_CHECKING:
    from ._arena import Arena
    from ._blocks import Block

# Page states.
FREE = "free"  # unmapped, in the pool's free list
MAPPED = "mapped"  # mapped in a slot of an arena (live blocks on it, or cached)
ACQUIRED = "acquired"  # lent to a caller of acquire_pages()
QUARANTINED = "quarantined"  # an undo failed: never reused, released by close()
ASLEEP = "asleep"  # the pool sleeps: its slot is kept, the memory was given back (issue 18)


class Page:
    """One physical page and where it is."""

    __slots__ = ("phys", "index", "state", "addr", "stream", "aliases")

    def __init__(self, phys: PhysicalAllocation, index: int) -> None:
        self.phys = phys
        self.index = index
        self.state = FREE
        self.addr: int | None = None
        self.stream: int | None = None
        #: Its other mappings, if any (only while MAPPED); their bytes are disjoint.
        self.aliases: tuple[Alias, ...] = ()


class Alias:
    """A mapped page's other mapping: slot `slot` of `arena` (the same stream).

    Bytes ``[lo, hi)`` of the page are used through the alias only, the rest
    through the page's own slot (or its other alias) only. `pfence` covers
    ``[lo, hi)`` in the page's own slot, `afence` the rest in the alias slot (each ``None`` when
    empty): fences are neither live blocks nor free ranges, so nothing is
    placed on them and free ranges never merge across them. An aliased page is
    never cached; the alias is dissolved (its slot unmapped, `pfence`'s bytes
    freed in the page's own slot) once every byte it owns is free and the work
    that used them is done: at the next reclaim of its stream, or when a
    request at the limit fits nowhere else.
    """

    __slots__ = ("page", "arena", "slot", "lo", "hi", "pfence", "afence")

    def __init__(
        self, page: Page, arena: Arena, slot: int, lo: int, hi: int,
        pfence: Block | None, afence: Block | None,
    ) -> None:
        self.page = page
        self.arena = arena
        self.slot = slot
        self.lo = lo
        self.hi = hi
        self.pfence = pfence
        self.afence = afence

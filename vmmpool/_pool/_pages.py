"""Pages: the unit of physical memory and of remapping.

Each page is one ``cuMemCreate`` handle of ``page_size`` bytes (driver rule 2:
a handle is mapped whole, at offset 0), so any page can be unmapped and mapped
anywhere else on its own.
"""

from __future__ import annotations

from .._resources import PhysicalAllocation

# Page states.
FREE = "free"  # unmapped, in the pool's free list
MAPPED = "mapped"  # mapped in a slot of an arena (live blocks on it, or cached)
ACQUIRED = "acquired"  # lent to a caller of acquire_pages()
QUARANTINED = "quarantined"  # an undo failed: never reused, released by close()
ASLEEP = "asleep"  # the pool sleeps: its slot is kept, the memory was given back (issue 18)


class Page:
    """One physical page and where it is."""

    __slots__ = ("phys", "index", "state", "addr", "stream")

    def __init__(self, phys: PhysicalAllocation, index: int) -> None:
        self.phys = phys
        self.index = index
        self.state = FREE
        self.addr: int | None = None
        self.stream: int | None = None

"""Allocations shared with other processes, kept out of reuse while receivers map them.

A receiver maps whole pages; the pool places other blocks on the same pages and
reuses freed bytes at once. So a shared allocation's bytes must not be reused
while any receiver may still read them, or the receiver would silently see
another allocation's data. Each :meth:`~vmmpool.Allocation.share` starts a
:class:`~vmmpool._share.Lease` (the operating system counts the receivers'
copies of a pipe's write end); while one of an allocation's leases is alive:

* the registry holds the :class:`~vmmpool.Allocation` object, so garbage
  collection does not free it;
* :meth:`~vmmpool.Allocation.free` marks it freed for its owner (``freed`` is
  True, the pointer must not be used) but the block stays in use;
* once every lease is done, the block is freed as ``free()`` would have freed
  it. The pool looks at its leases in ``stats()``, ``trim()``,
  ``defragment()``, ``share()``, ``close()`` and before it reports out of
  memory (``malloc`` and ``acquire_pages``): never on the hot path.

Pages never move under a live block, so the receiver's view and the owner's
stay the same memory for the whole lease.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .._share import Lease

if TYPE_CHECKING:
    from ._blocks import Block


class _Entry:
    __slots__ = ("alloc", "leases", "freed")

    def __init__(self, alloc: Any) -> None:
        self.alloc = alloc  # keeps the Allocation alive: no GC free while leased
        self.leases: list[Lease] = []
        self.freed = False


class Shares:
    """The leases of one pool's shared allocations, by block."""

    def __init__(self) -> None:
        # Re-entrant: the garbage collector may run a finalizer that frees a
        # shared allocation (mark_freed) while this thread is inside done().
        self.lock = threading.RLock()  # never held while calling the pool
        self.entries: dict[Block, _Entry] = {}

    def held_here(self) -> bool:
        """True when this thread holds the lock (a finalizer that interrupted a method here)."""
        return bool(self.lock._is_owned())  # type: ignore[attr-defined]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __contains__(self, rec: object) -> bool:
        return rec in self.entries

    def add(self, rec: Block, alloc: Any, lease: Lease) -> None:
        with self.lock:
            e = self.entries.get(rec)
            if e is None:
                e = self.entries[rec] = _Entry(alloc)
            e.leases.append(lease)

    def mark_freed(self, rec: Block) -> bool:
        """The owner freed `rec`: True if it is leased (the pool frees it later)."""
        with self.lock:
            e = self.entries.get(rec)
            if e is None:
                return False
            e.freed = True
            return True

    def done(self) -> list[tuple[Block, Any]]:
        """Remove the entries whose leases are all done; return ``(block, allocation)`` to free."""
        out: list[tuple[Block, Any]] = []
        drop: list[_Entry] = []
        with self.lock:
            for rec, e in list(self.entries.items()):
                e.leases = [ls for ls in e.leases if not ls.ended()]
                if not e.leases:
                    del self.entries[rec]
                    drop.append(e)
                    if e.freed:
                        out.append((rec, e.alloc))
        # Dropped outside the lock: the last reference to an allocation its
        # owner let go of runs the pool's GC callback.
        del drop
        return out

    def clear(self) -> None:
        """Forget every entry (the pool is closing): close the read ends."""
        with self.lock:
            entries = list(self.entries.values())
            self.entries.clear()
        for e in entries:
            for ls in e.leases:
                ls.close()

    def leased_bytes(self) -> int:
        with self.lock:
            return sum(rec.size for rec in self.entries)

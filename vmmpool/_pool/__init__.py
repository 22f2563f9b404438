"""A page pool of sub-page blocks that defragments by remapping.

Where things are
================
``_pages.py`` (physical pages), ``_arena.py`` (address space: arenas and page
slots), ``_blocks.py`` (sub-page blocks and free ranges, best fit),
``_streams.py`` (per-stream caches and events), ``_stats.py`` (the public
records), ``_core.py`` (the state and algorithms), ``_sleep.py`` (sleep and
wake), ``pool.py`` (``PagePool`` and ``Allocation``), ``_shares.py``
(allocations shared with other processes: kept out of reuse while a receiver
maps them).

Design
======
*Pages* stay the unit of physical memory and of remapping: each page is one
``cuMemCreate`` handle of ``page_size`` bytes (2 MiB on current GPUs; driver
rule 2), created on demand up to ``limit`` and reused; only
:meth:`PagePool.trim` and :meth:`PagePool.set_limit` give pages back.

*Address space* is reserved generously (VA is cheap but finite, rule 10): each
stream has two *heaps*, one for blocks of at most a page and one for larger
blocks, and each heap gets arenas of twice the limit, cut into page *slots*; a
slot is mapped (holds a page) or unmapped.

*Blocks* are carved out of the address space, not out of pages: every request
is rounded up to 512 bytes (``ALIGNMENT``) and placed anywhere in its heap's
arenas, so blocks smaller than a page share pages, and blocks span page
boundaries (PyTorch's expandable segments do the same). Small blocks are kept
apart from large ones (as PyTorch keeps a small pool): they pack into pages of
their own instead of leaving sub-page holes between large blocks, so the holes
large blocks leave are mostly whole pages, which are reclaimable. Measured on
the shared traces scaled to 1-16 MiB tensors, this took the smallest
completing limit from up to 1.019 to at most 1.010 x peak live. Every byte of
a mapped slot belongs to one live block or one free range; free ranges are
coalesced.
Slots are mapped lazily, when a block needs them. A slot touched by no live
block (wholly inside a free range) holds a *cached* page: still mapped,
reusable by its stream at zero cost, and reclaimable. So a page returns to the
free pages, or is remapped, exactly when no live block touches it.

Waste: under 512 bytes per block for the rounding; beyond that, only the free
bytes of pages that live blocks also touch (at most one partial page at each
end of a run of live blocks), which later blocks of the stream reuse. There is
no page rounding (unless ``small_threshold`` asks for it).

malloc(n, stream)
-----------------
1. Best fit among the free ranges of the stream's heap for the size (exact-size
   bins, then ``bisect`` over the sorted sizes); a block larger than a page
   is split off at the end that leaves the most whole pages free, a smaller
   one at the range's start (the rest stays next to what its neighbours
   free: a tensor grown by concatenation fits there). On a tie, in a pool
   that holds (nearly) all its limit's pages, a block of at most 8 pages
   leaves the rest on the side that borders unmapped slots, where it can
   grow by mapping instead of being stranded beside live data
   (``Core.split_at_end``). Zero driver calls: the steady state.
2. Otherwise the block goes where it *pins* the fewest pages (pages it touches
   that no live block touched: the scarce resource at the limit), then
   where it needs the fewest new ones: after a free range that ends at
   unmapped slots, before one that starts after them, across unmapped slots
   between two free ranges, or on fresh slots (a new arena only when no
   arena of the heap has room). The missing pages come, in order, from: the
   free (unmapped) pages; new pages while the pool holds less than its
   *growth budget* (``GROWTH`` = 1.02 x its peak in-use bytes in whole
   pages, rounded down but never below the peak's own pages, + a slack
   that grows by a page with each remap below the limit, up to
   ``GROWTH_MAX_PAGES`` = 4 per stream and at most 2% of the peak or ``GROWTH_MIN_PAGES`` = 2
   pages: without it, streams whose recurring requests do not fit would
   remap cached pages back and forth forever instead of reaching a steady
   state; a pool given a limit rounds up and keeps ``GROWTH_PAGES`` = 2 more
   pages and a slack of up to 8 pages however small it is, see
   ``_core.GROWTH``; with ``keep_cached=True`` the budget is the limit, so
   no cached page is unmapped before the limit needs it);
   other streams' cached pages whose
   work is done; the stream's own cached pages whose work is done (unmapped
   and remapped: reuse before creation); new pages up to the limit (past a
   device's refusal below the limit, only on the schedule of
   ``Core.create_pages``); cached pages after waiting on the events of their
   work. If that fails, the best
   fit among the free ranges of the stream's other heap is taken (a pool
   that holds only its preallocated pages takes it before any remap).
3. At the limit, failing that, the block may span the free *tail* of one
   partly used page of the stream and the free *head* of another: each is
   mapped a second time (an *alias*) as the first or last page of a new
   range of the heap, with as few new pages between them as the block
   needs (none when a tail and a head hold it); as a last resort (free
   aliases dissolved first), a page that lends its head to one alias may
   lend its tail to another. A request therefore fails
   only when the pages touched by live blocks plus the pages it needs
   exceed the limit (or the driver has no memory left), no free range of
   either heap fits and no free tail and head complete it:
   :class:`~vmmpool.OutOfMemoryError`, and the pool stays as it was.

Aliases: a page may back several address ranges
------------------------------------------------
A page mapped again (its own slot and an alias slot of the same stream) lends
its alias the bytes the block there uses, a tail or a head: each byte of the
page is used through one mapping only, and a *fence* (neither live nor free)
covers it in the others. A page lends at most its head to one alias and its
tail to another (three mappings, only as a last resort: see step 3). So the
invariant is "every mapped byte is used by at most one live block", not
"every page is in one slot". Freed bytes of an alias are free ranges like any
other (reused at once, no driver call). An aliased page is never cached; the
alias is *dissolved* (its slot unmapped, the lent bytes free again in the
page's own slot) at the next reclaim of its stream (a remap,
:meth:`~PagePool.defragment`, :meth:`~PagePool.trim`, or a request at the
limit that fits nowhere else, which then tries again: an aliased page is not
aliased again while that can succeed, so a free alias keeps its page's free
bytes apart) once every byte it owns is free and the work that used them is
done (the same events as any reclaim). Measured on the host emulator (2026-12-06):
the shared traces scaled to 0.1x complete at 1.0060-1.0098 x peak live (was
1.0064-1.0098), generated GPT-2-shaped inference (1-8 MiB tensors, KV caches
grown by concatenation) at 1.009-1.020 (was 1.020-1.034, with the split rule
of step 1); a trace that completes without aliases runs as before (they are
made only where a request would fail).

free() makes no driver call: the block joins the free ranges of its heap.

Stream-ordered reuse with events
--------------------------------
Memory freed on a stream is reused at once by that stream (stream order makes
it safe) and never given to another stream's blocks directly. A cached page
leaves its stream (unmapped, for any range or stream, lent out by
:meth:`~PagePool.acquire_pages`, or given back) only once the work that used
it is complete: ``cuMemUnmap`` does not wait for kernels (rule 8), even on the
same stream. Events are recorded lazily on the freeing stream, only when its
cached memory must leave it (one per stream per reclaim), queried without
blocking, and waited on only when the pool must; pages under pending work are
passed over while other pages (free, done, or new under the limit) exist. The
pool never synchronizes the device, except once in ``close()`` (live memory
may still be in use). Destroyed streams: see ``_streams.py`` (stream objects
are kept alive while they have memory here; raw handles are retired with
:meth:`~PagePool.retire_stream` before they are destroyed).

Remapping changes what backs an address (rule 12): only free memory is ever
remapped, so live pointers never move, but anything that registered a *freed*
range by address (CUDA graphs, NCCL registration, IPC peers) must not keep
using it.

Sleep and wake
--------------
:meth:`PagePool.sleep` gives every page back to the driver and keeps every
address (the live bytes go to host memory); :meth:`PagePool.wake` maps new
pages at the same addresses and restores them. See ``_sleep.py``.

Page-level API
--------------
:meth:`PagePool.acquire_pages` lends whole unmapped pages (the same sources,
all or nothing) to a caller that maps them in its own reservations (a growable
buffer); they count as in use until :meth:`PagePool.release_pages`.

Invariants (checked by ``PagePool._check``, after every step of
``tests/test_pool_stateful.py``)
-------------------------------------------------------------------------
1. Every page is in exactly one state: free (unmapped), mapped in one slot
   (and, when aliased, in one alias slot of the same stream besides),
   acquired or quarantined.
2. ``total_pages * page_size`` never exceeds the limit, except after the limit
   was lowered below what is in use (pages freed above it are given back at
   the next free, malloc or stats).
3. Live blocks never overlap; every byte of a mapped slot is in exactly one
   live block, free range or fence; free ranges are coalesced and lie only in
   mapped slots of their heap's arenas. An aliased page lends a head or a tail
   to its alias: those bytes are fenced in its own slot, the rest in the alias
   slot (each byte used through one mapping only).
4. A mapped page is cached exactly when no live block touches it and it is
   not aliased; pinned pages (``mapped - cached + acquired + quarantined``)
   are exactly those touched by live blocks (through any mapping),
   aliased, lent or quarantined.
5. A multi-step operation that fails (driver error, out of memory) changes no
   allocation; pages it created or unmapped stay free pages; nothing leaks, no
   range is half mapped. (If even the undo fails, the pages concerned are
   *quarantined*: never reused, released by ``close()``.)
6. ``allocated_bytes + cached_bytes == mapped_pages * page_size`` (acquired pages
   are counted in ``allocated_bytes`` besides).
7. Cached memory leaves its stream only after an event recorded after its last
   free completed (or, for a retired stream, a device synchronize).

Lifetime
--------
An :class:`Allocation` keeps its pool object alive; the pool's driver
resources are released by :meth:`PagePool.close` (or when the pool and every
allocation are garbage). ``close()`` invalidates live allocations: their
pointers dangle, ``free()`` becomes a no-op and ``freed`` is True. An
allocation that is garbage collected without ``free()`` is freed as a safety
net (from a weak-reference callback that holds only the pool's internal
state; nothing happens at interpreter shutdown or after close). The callback
may run in any thread at any time, so it only queues the block; the queue is
drained under the pool's lock at once if the lock is free, else by the
thread holding it when it lets go (so queued work never waits for a later
call). A ``free()`` from a finalizer that interrupted this thread inside the
pool is queued the same way, and one made after the safety net already freed
the allocation does nothing.

Streams that hold nothing are forgotten (see ``_streams.py``): a retired
stream once its last cached page leaves it, and every empty stream at
:meth:`PagePool.trim`.

Thread safety: one ``threading.Lock`` per pool guards all state; driver calls
on the slow path are made under it. Its holder records its thread, so that a
call re-entered by a finalizer is detected instead of waiting for itself.
"""

from __future__ import annotations

from .._observe import AllocationInfo
from ._blocks import ALIGNMENT
from ._stats import PageInfo, PoolStats
from .pool import Allocation, PagePool

__all__ = ["ALIGNMENT", "Allocation", "AllocationInfo", "PageInfo", "PagePool", "PoolStats"]

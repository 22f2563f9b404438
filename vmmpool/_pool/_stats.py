"""The pool's public records: :class:`PoolStats` and :class:`PageInfo`."""

from __future__ import annotations

from dataclasses import dataclass

from .._observe import AllocationInfo


@dataclass(frozen=True, repr=False)
class PoolStats:
    """A snapshot of a :class:`PagePool`'s accounting (all sizes in bytes), in PyTorch's terms.

    The names mean what they mean in ``torch.cuda.memory_stats()``:

    - ``allocated_bytes``: live allocations with the pool's rounding (512 bytes), as
      ``memory_allocated()`` / ``"allocated_bytes.all.current"``; ``peak_allocated_bytes`` is
      ``max_memory_allocated()``.
    - ``requested_bytes``: the sizes the program asked for, as
      ``"requested_bytes.all.current"``; ``peak_requested_bytes`` its peak.
    - ``reserved_bytes``: physical memory held, as ``memory_reserved()``;
      ``peak_reserved_bytes`` is ``max_memory_reserved()``.
    - ``memory_reserved() - memory_allocated()``: ``cached_bytes + free_pages * page_size``.

    :meth:`PagePool.memory_stats` gives the same figures as PyTorch's flat dictionary.

    Attributes
    ----------
    allocated_bytes : int
        Live allocations with their rounding (512 bytes; whole pages above
        ``small_threshold``), plus pages lent by :meth:`PagePool.acquire_pages`
        (PyTorch's "allocated").
    requested_bytes : int
        Sum of the sizes asked for by live allocations (PyTorch's "requested").
    reserved_bytes : int
        Physical memory the pool holds: ``total_pages * page_size`` (PyTorch's
        "reserved"; the driver allocations the pool owns, mapped or not).
    cached_bytes : int
        Reserved, mapped and free: the free ranges of every stream.
    cached_blocks : int
        Number of free ranges.
    free_pages : int
        Pages owned by the pool, unmapped and unused.
    total_pages : int
        Pages owned by the pool (each one driver allocation).
    page_size : int
        Bytes per page.
    limit : int
        The pool's limit on reserved memory.
    peak_allocated_bytes, peak_requested_bytes, peak_reserved_bytes : int
        Highest values of allocated, requested and reserved bytes (since the pool was made
        or since :meth:`PagePool.reset_peak_memory_stats`).
    n_malloc, n_free : int
        Successful mallocs and frees (a garbage-collected allocation counts).
    n_page_creations : int
        Pages created (driver allocations).
    n_remaps : int
        Requests served by unmapping cached pages and mapping them into the
        request's range (the defragmentation slow path).
    n_ooms : int
        Requests that raised :class:`~vmmpool.OutOfMemoryError`.
    largest_allocatable : int
        The largest single ``malloc`` that can succeed now without exceeding
        the limit: ``(limit // page_size - pinned_pages) * page_size`` (free,
        reclaimable and still creatable pages), plus the free bytes of
        partly used pages a block can start or end in, or the largest free
        range. The driver may have less (other processes).
    live_allocations : int
        Allocations not yet freed.
    mapped_pages : int
        Pages mapped in the pool's arenas (touched by live blocks, or cached).
    pinned_pages : int
        Pages that cannot be reclaimed: touched by a live block, acquired or
        quarantined.
    reclaimable_pages : int
        Cached pages: mapped, touched by no live block (a page mapped a second
        time near the limit included, once no live block touches it in either
        mapping: :meth:`PagePool.trim` unmaps both).
    acquired_pages : int
        Pages lent by :meth:`PagePool.acquire_pages`.
    small_pages : int
        Mapped pages shared by more than one live block.
    quarantined_pages : int
        Pages whose undo failed after a driver error; never reused.
    address_space_bytes : int
        Virtual address space reserved (``cuMemAddressReserve``) for the pool's
        arenas. Addresses, not memory.
    n_page_releases : int
        Pages given back to the driver.
    n_reclaimed_pages : int
        Cached pages unmapped (remap, defragment, trim, set_limit).
    n_syncs : int
        Device synchronizations made by the pool (only ``close()`` makes one).
    n_events : int
        Events recorded (lazily: when cached memory had to leave its stream).
    n_event_queries : int
        Event queries (never blocking).
    n_event_waits : int
        Event waits: the pool needed pages still used by pending work.
    asleep : bool
        True between :meth:`PagePool.sleep` and :meth:`PagePool.wake`. Then
        ``total_pages``, ``mapped_pages``, ``pinned_pages``,
        ``reclaimable_pages``, ``cached_bytes`` and ``largest_allocatable``
        count only memory still held (none, unless pages are quarantined),
        while ``allocated_bytes``, ``requested_bytes`` and ``live_allocations``
        still describe the live allocations, whose bytes are in the backup.
    backup_bytes : int
        Bytes of host memory holding the sleeping pool's live pages (0 awake,
        or asleep with ``backup=False``).
    n_sleeps, n_wakes : int
        Times it went to sleep and woke: a ``sleep()`` that failed and left
        it asleep (its undo failed too) counts as a sleep, so ``n_sleeps -
        n_wakes`` is 1 while asleep and 0 while awake.
    sleep_bytes, wake_bytes : int
        Bytes copied to host memory by all sleeps, and back by all wakes.
    sleep_seconds, wake_seconds : float
        Time spent in all sleeps and all wakes (waiting for streams, copying,
        unmapping, releasing; creating and mapping).
    """

    allocated_bytes: int
    requested_bytes: int
    cached_bytes: int
    cached_blocks: int
    free_pages: int
    total_pages: int
    page_size: int
    limit: int
    peak_allocated_bytes: int
    peak_requested_bytes: int
    peak_reserved_bytes: int
    n_malloc: int
    n_free: int
    n_page_creations: int
    n_remaps: int
    n_ooms: int
    largest_allocatable: int
    live_allocations: int = 0
    mapped_pages: int = 0
    pinned_pages: int = 0
    reclaimable_pages: int = 0
    acquired_pages: int = 0
    small_pages: int = 0
    quarantined_pages: int = 0
    address_space_bytes: int = 0
    n_page_releases: int = 0
    n_reclaimed_pages: int = 0
    n_syncs: int = 0
    n_events: int = 0
    n_event_queries: int = 0
    n_event_waits: int = 0
    asleep: bool = False
    backup_bytes: int = 0
    n_sleeps: int = 0
    n_wakes: int = 0
    sleep_bytes: int = 0
    wake_bytes: int = 0
    sleep_seconds: float = 0.0
    wake_seconds: float = 0.0

    @property
    def reserved_bytes(self) -> int:
        """``total_pages * page_size``: physical memory the pool holds (PyTorch's "reserved")."""
        return self.total_pages * self.page_size

    def __repr__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / (1 << 20):.1f} MiB"

        return (
            f"PoolStats(allocated {mib(self.allocated_bytes)}, requested {mib(self.requested_bytes)}, "
            f"reserved {mib(self.reserved_bytes)} ({self.total_pages} pages: {self.mapped_pages} mapped, "
            f"{self.free_pages} free), cached {mib(self.cached_bytes)} in {self.cached_blocks} blocks, "
            f"limit {mib(self.limit)}; peaks: allocated {mib(self.peak_allocated_bytes)}, "
            f"requested {mib(self.peak_requested_bytes)}, reserved {mib(self.peak_reserved_bytes)}; "
            f"{self.live_allocations} live, {self.n_malloc} mallocs, {self.n_free} frees, "
            f"{self.n_page_creations} pages created, {self.n_remaps} remaps, {self.n_syncs} syncs, "
            f"{self.n_events} events ({self.n_event_waits} waited on), {self.n_ooms} OOMs)"
        )


@dataclass(frozen=True)
class PageInfo:
    """One physical page of a :meth:`PagePool.snapshot`.

    Attributes
    ----------
    index : int
        The physical page: its creation number (stable for its life).
    state : str
        ``"free"`` (unmapped), ``"in_use"`` (touched by a live block),
        ``"cached"`` (mapped, touched by no live block through any of its
        mappings, reusable at once by its stream), ``"acquired"`` (lent out by :meth:`PagePool.acquire_pages`)
        or ``"quarantined"``.
    address : int or None
        The virtual address where it is mapped in the pool's address space;
        ``None`` when unmapped (free, acquired).
    stream : int or None
        Stream key of the arena (or the acquirer) that has the page.
    kind : str or None
        For an in-use page: ``"large"`` when one live block covers it
        wholly, ``"small"`` otherwise (parts of several blocks, or only part
        of one: a block smaller than a page, or the first or last page of a
        larger block that does not fill it); ``None`` for a page not in use.
        It describes the page, not the heap the blocks came from.
    allocations : tuple of AllocationInfo
        The live allocations touching this page, by address: address, size
        (with rounding), requested size and stream. A block spanning pages is
        listed on each of them.
    used_bytes : int
        Bytes of this page that live allocations asked for.
    alias_address : int or None
        Where the page is mapped again (an alias at the limit, see
        :meth:`PagePool.malloc`), else ``None``: the first of
        `alias_addresses` (kept for compatibility). Its `allocations` are
        those of every mapping.
    alias_addresses : tuple of int
        Every other address the page is mapped at (at most two that lend
        bytes: its free head to one block's range, its free tail to another's).
    """

    index: int
    state: str
    address: int | None
    stream: int | None = None
    kind: str | None = None
    allocations: tuple[AllocationInfo, ...] = ()
    used_bytes: int = 0
    alias_address: int | None = None
    alias_addresses: tuple[int, ...] = ()

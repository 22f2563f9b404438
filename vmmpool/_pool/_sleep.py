"""Sleep and wake: give every physical page back, keep every address (issue 18).

``sleep(backup)``, under the pool's lock:

1. Wait for the work of every stream that has memory here: one event recorded
   on each stream and waited on (a retired stream, which cannot take an event,
   is covered by one device synchronize, as everywhere in the pool, unless it
   holds only cached memory freed before it was retired: then by its last event).
2. Unmap the cached pages (touched by no live block) into the free pages and
   give every free page back to the driver (what ``trim()`` does).
3. The pages still mapped are exactly those live blocks touch. They are copied
   to one host array (``backup``) in runs of adjacent mapped slots, through the
   reusable pinned staging buffer (``_staging.py``) on stream 0.
4. Every run is unmapped (one call each); then every page handle is released.
   The pages stay in their slots in state ``asleep``: the arenas, the blocks,
   the free ranges and every address are unchanged.

On a GPU, step 3 copies everything in one pipelined pass before step 4. Where
device memory is host RAM (the host emulator), steps 3-4 go by pieces of at
most :data:`SLEEP_GROUP` bytes (``_groups``), so the backup reuses the pages
just given back instead of needing as much RAM again.

If step 3 or 4 fails, what was unmapped is mapped back (the handles still hold
the memory; pages already released are created again and their bytes copied
back from the backup, which holds every unmapped page): the pool is awake and
nothing is lost. Steps 1-2 change no allocation (pages given back in step 2
are not needed by any). If mapping back fails too, the pool stays asleep with
its backup, and :attr:`PoolSleep.mapped` notes the slots of sleeping pages
that are still mapped (an alias slot the sleep did not reach; a slot the undo
mapped and then failed to unmap): ``wake()`` consults it (and ``check()``
verifies it against the reservations) instead of assuming every sleeping
slot is unmapped.

``wake()``: pages freed while asleep (slots no live block touches any more)
are forgotten without a driver call; for each run of sleeping slots new pages
are created, mapped at the same addresses, access is set once per run, and the
bytes are copied back. A failure undoes what wake did: the pool stays asleep
with its backup, and ``wake()`` can be called again (a slot the undo could
not unmap is noted, and the next ``wake()`` unmaps it first).

While asleep: ``free`` works (bookkeeping only); ``malloc`` and
``acquire_pages`` raise :class:`~vmmpool.AsleepError`; ``defragment`` and
``trim`` do nothing (there is nothing mapped to give back); ``set_limit``
changes the limit only (``wake`` fails with out-of-memory if the live pages
do not fit under it); ``stats`` shows no pages held (but
those whose handles a failed sleep or wake kept); ``close`` drops the backup.
Views of allocations export nothing (``Allocation.asleep`` is true: DLPack
and the array interfaces raise ``AsleepError``, also a ``BufferError``), as an
array over the unmapped addresses would crash at its first touch; arrays
exported before the sleep are the caller's to leave alone until ``wake``.
``core.asleep`` is set when sleep is done (or fails asleep) and cleared when
wake is done, and exports read it without the lock (they may run where the
lock must not be taken, and must not slow anything): an export racing sleep
in another thread may succeed, and is then an export made just before the
sleep. That is the same thing, not a weaker guarantee: an export touches no
memory (the capsule or interface holds the address, which sleep keeps), and
the array's first use comes after the export returns, where no lock inside
the export could order it against the sleep; only the caller can.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .._errors import OutOfMemoryError
from .._logq import pool_logger as logger
from .._options import event_handle
from .._prefault import discard
from .._resources import create
from .._staging import Staging, host_array
from ._blocks import Block, whole_slots
from ._pages import ASLEEP, FREE, MAPPED, Page

if TYPE_CHECKING:
    from ._arena import Arena
    from ._core import Core

#: Stream the copies are queued on (the legacy default stream on CUDA).
COPY_STREAM = 0

#: Bytes sleep copies, unmaps and releases at a time where device memory is host RAM.
SLEEP_GROUP = 64 << 20

Run = tuple["Arena", int, list[Page]]


#: A sleeping page's slot that a failed sleep did not reach (see :class:`PoolSleep`).
KEPT = "kept"
#: A sleeping page's slot that a failed undo mapped and could not unmap (see :class:`PoolSleep`).
STALE = "stale"


class PoolSleep:
    """A sleeping pool's backup: the bytes, where each page's bytes are in them, what stays mapped.

    `mapped`: the slots of sleeping pages that are still mapped, ``(arena, slot)``
    -> :data:`KEPT` or :data:`STALE`; every other slot of a sleeping page is
    unmapped (``check()`` verifies both against the reservations). Whether a
    sleeping page's handle is alive or released is ``page.phys.closed``. Empty
    but after failures:

    - :data:`KEPT`: a sleep failed and could not map back what it had unmapped.
      A page mapped more than once (an alias) sleeps once one of its slots is
      unmapped; the others the sleep did not reach stay mapped with the page's
      live handle, access and bytes: wake leaves them as they are. Also the
      pieces a failed wake had restored and could not copy back into the
      backup (host RAM only, see :func:`wake_runs`): their bytes are on the
      device only, so they stay mapped.
    - :data:`STALE`: an undo (of a failed sleep, or of a failed wake) mapped the
      slot, then failed, and unmapping it failed too. What is mapped there is
      not to be trusted (maybe a handle the undo created and released since,
      which the mapping keeps alive; no access, no bytes): wake unmaps it
      first, then maps the page as any other. Unmapping it is what gives the
      memory back; ``close()`` does it with the reservation.
    """

    __slots__ = ("backup", "offsets", "nbytes", "mapped")

    def __init__(self, backup: np.ndarray | None, offsets: dict[Page, int], nbytes: int) -> None:
        self.backup = backup
        self.offsets = offsets
        self.nbytes = nbytes
        self.mapped: dict[tuple[Arena, int], str] = {}


def runs_of(core: Core, state: str) -> list[Run]:
    """Runs of adjacent slots whose pages are in `state`, arena by arena, by address."""
    out: list[Run] = []
    for arena in core.arenas:
        if not arena.mapped:
            continue
        cur: list[Page] = []
        start = 0
        for s, p in enumerate(arena.slots):
            if p is not None and p.state is state:
                if not cur:
                    start = s
                cur.append(p)
            elif cur:
                out.append((arena, start, cur))
                cur = []
        if cur:
            out.append((arena, start, cur))
    return out


def quiesce(core: Core) -> None:
    """Wait for the work of every stream that has memory in the pool (events, never a device sync)."""
    backend = core.backend
    retired = False
    holding = {b.arena.heap.stream for b in core.live}
    for st in list(core.streams.values()):
        if not any(a.mapped for a in st.arenas):
            continue
        if st.retired:
            # Only cached memory, every free covered by the event recorded at
            # retirement (a one-shot stream): waiting on that event is enough.
            if st not in holding and st.wait(st.seq, backend, core.ev):
                continue
            retired = True
            continue
        core.ev.n_events += 1
        h = backend.event_record(event_handle(st.key))
        try:
            core.ev.n_event_waits += 1
            backend.event_wait(h)
        finally:
            try:
                backend.event_destroy(h)
            except BaseException as e:  # an interrupt too: kept for close, or the event leaks
                st.stale.append(h)
                if not isinstance(e, Exception):
                    raise
                logger.warning("destroying a sleep event failed", exc_info=True)
        # Every event already recorded is older: complete too.
        st.done_seq = st.seq
        if st.events:
            st._completed(len(st.events) - 1, backend)
    if retired:  # a retired stream cannot take an event (see _streams.py)
        core.sync()
        for st in core.streams.values():
            if st.retired:
                st.done_seq = st.seq


def staging(core: Core) -> Staging:
    st: Staging | None = core.staging
    if st is None:
        st = core.staging = Staging(core.backend)
    return st


def _device_runs(core: Core, runs: list[Run], offsets: dict[Page, int]) -> list[tuple[int, int, int]]:
    """(device address, bytes, backup offset) pieces: each run cut where the backup is not contiguous.

    A page mapped more than once (aliases, ``_pages.py``) is copied once, through its own slot.
    """
    P = core.P
    out: list[tuple[int, int, int]] = []
    for arena, s0, pages in runs:
        for i, p in enumerate(pages):
            addr = arena.base + (s0 + i) * P
            if addr != p.addr or p not in offsets:
                continue  # an alias slot: the same memory as the page's own slot
            off = offsets[p]
            if out and out[-1][0] + out[-1][1] == addr and out[-1][2] + out[-1][1] == off:
                a, n, o = out[-1]
                out[-1] = (a, n + P, o)
            else:
                out.append((addr, P, off))
    return out


def _groups(core: Core, runs: list[Run]) -> list[list[Run]]:
    """The runs in the order sleep copies, unmaps and releases them.

    On a GPU, one group: one pipelined copy of everything, then the unmaps and
    releases. Where device memory is host RAM (the host emulator), pieces of at
    most :data:`SLEEP_GROUP` bytes, each copied, unmapped and released before the
    next is copied: the backup then fills pages the device just gave back, and
    RAM peaks near the live bytes instead of twice them (measured: past the
    RAM a machine keeps at hand, every fresh page costs many times more).
    """
    if not core.backend.device_memory_is_host_ram:
        return [runs]
    k = max(1, SLEEP_GROUP // core.P)
    return [[(a, s0 + i, pages[i: i + k])] for a, s0, pages in runs for i in range(0, len(pages), k)]


def _release(core: Core, runs: list[Run], keep: set[Page]) -> None:
    """Give the (unmapped) pages of `runs` back to the driver, but those in `keep`."""
    for _arena, _s0, pages in runs:
        for p in pages:
            phys = p.phys
            if phys.closed or p in keep:
                continue  # released already (an alias slot), or mapped elsewhere still
            phys.close()  # unmapped: the memory goes back to the driver
            del core.pages[phys]
            core.n_released += 1


def sleep(core: Core, backup: bool) -> None:
    """Give every page back, keep every address (lock held; see the module docstring)."""
    if core.acquired:
        raise ValueError(
            f"cannot sleep: {len(core.acquired)} page(s) are lent by acquire_pages() (to growable "
            "buffers); sleep() those buffers (or release the pages) first (a buffer whose failed "
            "sleep or wake could not be undone is asleep yet holds some: wake() it, then sleep "
            "it again)"
        )
    t0 = time.perf_counter()
    P = core.P
    quiesce(core)
    core.reclaim(None, None, wait=True)
    for st in core.streams.values():
        st.prune()
    core.release_free(len(core.free_pages))
    runs = runs_of(core, MAPPED)
    offsets: dict[Page, int] = {}
    off = 0
    for _arena, _s0, pages in runs:
        for p in pages:
            if p not in offsets:  # an aliased page appears in two or three runs
                offsets[p] = off
                off += P
    nbytes = off
    data = host_array(nbytes) if backup and nbytes else None
    asleep = PoolSleep(data, offsets, nbytes)
    groups = _groups(core, runs)
    # A page mapped at several slots is released once all are unmapped (at the end).
    seen: set[Page] = set()
    aliased: set[Page] = set()
    for _a, _s, pages in runs:
        for p in pages:
            (aliased if p in seen else seen).add(p)
    unmapped: list[Run] = []
    try:
        for group in groups:
            if data is not None:
                staging(core).save(_device_runs(core, group, offsets), data, COPY_STREAM)
            for run in group:
                arena, s0, pages = run
                arena.res.unmap(s0 * P, len(pages) * P)
                for p in pages:
                    p.state = ASLEEP
                unmapped.append(run)
            if len(groups) > 1:
                _release(core, group, aliased)
        _release(core, runs, set())
    except BaseException as err:
        if not unmapped:
            raise  # only copies were made: nothing changed
        core.asleep = asleep
        core.n_asleep = len({p for r in unmapped for p in r[2]})
        try:
            wake_runs(core, unmapped, asleep)
        except BaseException as undo_err:  # (an interrupt too: the pool is asleep, recorded so)
            # Slots of now sleeping pages that the sleep did not reach (another mapping
            # of an aliased page): still mapped, not to be mapped again by wake().
            # (The undo noted the slots it left mapped itself, STALE: all among `gone`.)
            gone = {(a, s0 + i) for a, s0, pages in unmapped for i in range(len(pages))}
            for a, s0, pages in runs:
                for i, p in enumerate(pages):
                    if p.state is ASLEEP and (a, s0 + i) not in gone:
                        asleep.mapped[(a, s0 + i)] = KEPT
            logger.error(
                "sleep failed (%r) and mapping back failed too (%r): the pool stays asleep with "
                "its backup; wake() retries",
                err, undo_err, exc_info=True,
            )
            core.record_frees()  # the live blocks are asleep: freed, as far as the history goes
            _record(core, "segment_unmap", unmapped)  # what stays unmapped: wake() maps it back
            core.sleeps.slept(nbytes if backup else 0, t0)  # it went to sleep all the same
            raise
        core.asleep = None
        core.n_asleep = 0
        raise
    core.record_frees()  # before asleep is set (a free while asleep records nothing)
    core.asleep = asleep
    core.n_asleep = len(offsets)
    _record(core, "segment_unmap", runs)
    core.sleeps.slept(nbytes if backup else 0, t0)
    logger.info(
        "sleep: gave %d page(s) back, %d byte(s) backed up in %d run(s)",
        len(offsets), nbytes if backup else 0, len(runs),
    )


def forget_freed(core: Core) -> None:
    """Pages freed while asleep (touched by no live block): out of their slots, no driver call.

    Each lies wholly inside a free range (every byte of a slot is live or
    free): the range is cut around it and the slot returns to the unmapped
    extents, exactly as a reclaim would leave it.
    """
    sl = core.asleep
    assert sl is not None
    P = core.P
    if core.aliases:
        # An alias whose bytes were all freed while asleep: forgotten (its slot is unmapped
        # already), its bytes free again in the page's own slot, so that a page with no live
        # byte left is forgotten below instead of brought back (wake() restored it, and
        # under a limit that fits the live pages, failed for want of it).
        core.forget_idle_aliases({a.slots[s] for a, s in sl.mapped})
    for st in core.streams.values():
        for h in st.heaps:
            for b in list(h.by_start.values()):
                s0, s1 = whole_slots(b)
                if s1 <= s0:
                    continue
                a = b.arena
                cuts: list[tuple[int, int]] = []
                for s in range(s0, s1):
                    p = a.slots[s]
                    # (a KEPT slot is still mapped with a live page: left as it is, awake at wake)
                    if p is not None and p.state is ASLEEP and (a, s) not in sl.mapped:
                        if cuts and cuts[-1][1] == s:
                            cuts[-1] = (cuts[-1][0], s + 1)
                        else:
                            cuts.append((s, s + 1))
                if not cuts:
                    continue
                h.remove(b)
                lo = b.addr
                for u0, u1 in cuts:
                    cut = a.base + u0 * P
                    if cut > lo:
                        h.add(Block(a, lo, cut - lo, b.seq))
                    lo = a.base + u1 * P
                    for s in range(u0, u1):
                        p = a.slots[s]
                        assert p is not None
                        a.slots[s] = None
                        sl.offsets.pop(p, None)
                        if not p.phys.closed:  # a handle kept by a failed sleep: a free page
                            p.state = FREE
                            p.addr = None
                            p.stream = None
                            core.free_pages.append(p)
                    a.give(u0, u1 - u0)
                    a.mapped -= u1 - u0
                    core.mapped -= u1 - u0
                    core.n_asleep -= u1 - u0
                end = b.addr + b.size
                if end > lo:
                    h.add(Block(a, lo, end - lo, b.seq))
                if not a.mapped:
                    core.note_emptied(st)  # a retired stream left with nothing: forgotten at wake


def wake_runs(core: Core, runs: list[Run], sl: PoolSleep) -> None:
    """Map `runs` of sleeping pages back (new pages where released) and restore their bytes.

    All or nothing: on failure what was mapped is unmapped and what was
    created is released; the pages stay asleep. Where device memory is host
    RAM, runs go by pieces (``_groups``) and each piece's backup bytes are
    given back to the OS once restored (RAM peaks near the live bytes, not at
    twice them); a failure then first copies the restored pieces back into the
    backup before it unmaps them.
    """
    P = core.P
    made: list[tuple[Page, object]] = []  # (page, its released PhysicalAllocation)
    mapped: list[tuple[Arena, int, int]] = []
    groups = _groups(core, runs)
    dropped: list[Run] = []  # restored runs whose backup bytes went back to the OS
    try:
        for group in groups:
            for arena, s0, pages in group:
                for p in pages:
                    if p.phys.closed:
                        new = create(P, core.device, handle_type="posix_fd" if core.shareable else "none")
                        made.append((p, p.phys))
                        p.phys = new
                k = 0
                try:
                    for i, p in enumerate(pages):
                        arena.res.map(p.phys, (s0 + i) * P)
                        k += 1
                finally:
                    if k:
                        mapped.append((arena, s0, k))
                arena.res.set_access(s0 * P, len(pages) * P, "rw", core.peers)
            if sl.backup is not None:
                restore = [r for r in group if any(p in sl.offsets for p in r[2])]
                pieces = _device_runs(core, restore, sl.offsets)
                staging(core).load(pieces, sl.backup, COPY_STREAM)
                if len(groups) > 1:
                    dropped.extend(restore)
                    base = sl.backup.ctypes.data
                    for _addr, n, off in pieces:
                        discard(base + off, n)
    except BaseException as err:
        # The undo runs to its end even if interrupted (KeyboardInterrupt): each step
        # notes what it left, so that the record stays true and wake() can retry; the
        # first interrupt is raised once the undo is done.
        interrupt: list[BaseException] = []
        keep: set[tuple[Arena, int]] = set()  # restored runs left mapped: (arena, first slot)
        if dropped:
            assert sl.backup is not None
            try:
                staging(core).save(_device_runs(core, dropped, sl.offsets), sl.backup, COPY_STREAM)
            except BaseException as e:
                _note_interrupt(interrupt, e)
                # Their bytes are on the device only: they stay mapped with their pages
                # (access set, bytes restored), noted KEPT; the next wake() leaves them as
                # they are. (Unmapping them here lost those bytes.)
                logger.error(
                    "undo of a failed wake: copying restored pages back to the backup failed; "
                    "they stay mapped", exc_info=True,
                )
                keep = {(a, s0) for a, s0, _pages in dropped}
                kept = {p for _a, _s0, pages in dropped for p in pages}
                for a, s0, pages in dropped:
                    for i in range(len(pages)):
                        sl.mapped[(a, s0 + i)] = KEPT
                for p, _old in made:
                    if p in kept:
                        core.pages[p.phys] = p  # a live handle the pool owns again
                        core.n_created += 1
                made = [(p, old) for p, old in made if p not in kept]
        for arena, s0, k in reversed(mapped):
            if (arena, s0) not in keep:
                _unmap_back(core, arena, s0, k, sl, interrupt)
        for p, old in reversed(made):
            try:
                p.phys.close()
            except BaseException as e:
                _note_interrupt(interrupt, e)
                if p.phys.closed:  # released all the same (interrupted after the release)
                    p.phys = old  # type: ignore[assignment]
                    continue
                # The page keeps the handle (a sleeping page with a live handle, as a failed
                # sleep leaves some): the next wake() maps it, close() releases it. (Dropping
                # it left the release to its finalizer, a handle the pool no longer counted.)
                logger.error("undo of a failed wake: release failed; the page keeps it", exc_info=True)
                core.pages[p.phys] = p
                core.n_created += 1
                continue
            p.phys = old  # type: ignore[assignment]
        if interrupt and isinstance(err, Exception):
            raise interrupt[0] from err
        raise
    for _arena, _s0, pages in runs:
        for p in pages:
            p.state = MAPPED
            core.pages[p.phys] = p
    core.n_created += len(made)
    total = len(core.pages) * P
    if total > core.peak_total:
        core.peak_total = total


def _note_interrupt(interrupt: list[BaseException], e: BaseException) -> None:
    """An undo step failed: keep the first interrupt (not an ``Exception``) to raise at the end."""
    if not isinstance(e, Exception) and not interrupt:
        interrupt.append(e)


def _unmap_back(
    core: Core, arena: Arena, s0: int, k: int, sl: PoolSleep, interrupt: list[BaseException]
) -> None:
    """Undo of a failed wake: unmap slots ``[s0, s0 + k)``; those that stay mapped are noted STALE.

    One call for the run; if it fails (or is interrupted), one per slot still
    mapped (each page is its own mapping), so that only the slots that really
    stay mapped are noted: the next wake unmaps them first (see :class:`PoolSleep`).
    """
    P = core.P
    try:
        arena.res.unmap(s0 * P, k * P)
        return
    except BaseException as e:
        _note_interrupt(interrupt, e)
        logger.error("undo of a failed wake: unmap failed", exc_info=True)
    for s in range(s0, s0 + k):
        if arena.res.access_at(s * P) is None:
            continue  # not mapped (any more)
        try:
            arena.res.unmap(s * P, P)
        except BaseException as e:  # noqa: BLE001 - noted; wake() unmaps it first
            _note_interrupt(interrupt, e)
            if arena.res.access_at(s * P) is not None:
                sl.mapped[(arena, s)] = STALE
                logger.error("undo of a failed wake: slot %d of arena %#x stays mapped", s, arena.base)


def unmap_stale(core: Core, sl: PoolSleep) -> None:
    """Unmap the STALE slots (see :class:`PoolSleep`); on failure the record still says what is mapped."""
    P = core.P
    for (arena, s), how in list(sl.mapped.items()):
        if how is STALE:
            arena.res.unmap(s * P, P)
            del sl.mapped[(arena, s)]


def wake(core: Core) -> None:
    """Map every sleeping page back at its address and restore its bytes (lock held)."""
    sl = core.asleep
    if sl is None:
        return
    t0 = time.perf_counter()
    unmap_stale(core, sl)
    forget_freed(core)
    runs = runs_of(core, ASLEEP)
    if sl.mapped:  # KEPT: still mapped with the page's handle (see PoolSleep), left out of the runs
        runs = [
            (a, s0 + i, pages[i:j])
            for a, s0, pages in runs
            for i, j in _spans(len(pages), [k for k in range(len(pages)) if (a, s0 + k) in sl.mapped])
        ]
    need = len({p for _a, _s, pages in runs for p in pages if p.phys.closed})
    over = len(core.pages) + need - core.max_pages
    if over > 0 and core.free_pages:
        # Pages a failed sleep kept, freed while asleep: given back before they block the wake.
        core.release_free(over)
    what = f"wake needs {need} page(s) of {core.P} bytes for the live data"
    if len(core.pages) + need > core.max_pages:
        raise core.oom(
            need * core.P, need,
            f"the limit allows {core.max_pages - len(core.pages)} more (raise it with set_limit); "
            "the pool stays asleep, every byte kept",
            head=what,
        )
    try:
        wake_runs(core, runs, sl)
    except OutOfMemoryError as err:
        # The device's memory, not the limit (another process holds it): the pool's own error,
        # with the driver's as its cause. wake_runs left everything asleep as it was.
        raise core.oom(
            need * core.P, need,
            f"the device could not create them ({err.message}); the pool stays asleep, every "
            "byte kept: wake() again once memory is free",
            head=what,
        ) from err
    for (a, s), _how in sl.mapped.items():  # KEPT (unmap_stale removed the STALE): awake as they are
        p = a.slots[s]
        assert p is not None
        p.state = MAPPED
    _record(core, "segment_map", runs)
    core.record_allocs()
    n = len({p for r in runs for p in r[2]})
    core.asleep = None
    core.n_asleep = 0
    if core.emptied:
        core.drop_emptied(None)  # best effort, as after a reclaim
    core.sleeps.woke(n * core.P if sl.backup is not None else 0, t0)
    logger.info("wake: mapped %d page(s) back in %d run(s)", n, len(runs))


def _spans(n: int, cut: list[int]) -> list[tuple[int, int]]:
    """The ``[i, j)`` spans of ``range(n)`` between the indexes in `cut` (sorted), non-empty."""
    out = []
    i = 0
    for k in [*cut, n]:
        if k > i:
            out.append((i, k))
        i = k + 1
    return out


def _record(core: Core, action: str, runs: list[Run]) -> None:
    """History: the runs sleep unmapped (or wake mapped back), as segment events."""
    hist = core.history
    if hist is None:
        return
    P = core.P
    for arena, s0, pages in runs:
        hist.record(action, arena.base + s0 * P, len(pages) * P, arena.heap.stream.key)

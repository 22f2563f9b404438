"""GrowableBuffer: one virtual address range that grows by mapping pages, never by copying.

Design (the driver rules are numbered as in ``VMM_DESIGN.md``):

* The buffer reserves ``max_size`` bytes of address space once and maps one
  physical page (one ``cuMemCreate`` handle, rule 2) per page of capacity, in
  order, from offset 0. Page ``i`` is ``pages[i]`` at ``ptr + i * page_size``.
  Within ``max_size`` the pointer never changes.
* The buffer keeps one handle reference per page (the ``PhysicalAllocation``),
  so growth costs ``create`` + ``map`` per new page and ONE ``set_access`` for
  the whole new range (rules 3 and 9), and a move can remap every page without
  ``retain`` calls. With a pool the pages come from and go back to the pool.
* Shrinking waits for in-flight work first (rule 8: ``device.synchronize`` or
  the buffer's stream), then unmaps the trailing pages in one call (rule 4).
  Without a pool, the page handles are released just before that unmap, while
  still mapped (legal, rule 7), so that a failing release can be undone with
  ``retain``; with a pool, pages are unmapped first and then handed back, as
  the pool requires, and a failing hand-back is undone by remapping.
* A move (``allow_move=True`` past ``max_size``) reserves a new range of at
  least twice the old size, maps EVERY page there (all of them, at their
  offsets: cuda.core 1.2.2 remapped only the first chunk), sets access once,
  synchronizes, then unmaps and frees the old range. No byte is copied.

All-or-nothing. Every operation records an undo step after each step that
changed something; if a later step fails, the undo steps run newest first and
the original error is raised, leaving ``ptr``, ``size``, ``capacity``, the
contents and the backend's live counts exactly as they were. An injected fault
fires once, so the undo steps themselves run clean.

If an undo step of a growth in place fails (the driver failed twice in a
row: a map or access grant, then the unmap that undoes it), the buffer is
still as it was (``ptr``, ``size``, ``capacity``, contents): only pages past
its capacity stay mapped (``_State.tail``). Its next growth, move or sleep
unmaps them first (raising, with nothing changed, if that fails again), a
resize, reserve or shrink that maps nothing tries too (logging a failure),
and ``close()`` frees them. The original error is raised with a note.

Without a pool, a shrink releases the handles of the pages it drops, then
unmaps them; if that fails and taking a handle back fails too, the buffer is
still as it was: those pages keep their memory through their mappings
(``_State.released``), and a move, share or sleep takes their handles back
first (raising, with nothing changed, if that fails again).

A move maps the pages into a new range and unmaps the old one last. If
undoing it fails before that (unmapping or freeing the new range, giving back
the pages acquired for it), the buffer is as it was: the new range is closed
once more, and if that fails too it stays reserved (``_State.debris_res``,
with those pages when it still maps them) until the buffer's next growth,
move, shrink, sleep or ``close()``. The original error is raised with a note.

If an undo step of a shrink with a pool fails, or the old range of a move was
unmapped (its free failed) and mapping it back fails, the buffer cannot
promise its old state any more. It then stops undoing, keeps every
resource the operation had created, and becomes *unusable*: every call except
``close()`` and the plain properties raises :class:`~vmmpool.VmmError`
("unusable"), and ``close()`` frees everything it ever held, including
mappings left behind. The original error is raised (with a note naming the
undo failure) and the undo failure is logged on the ``vmmpool`` logger.

Sleep and wake are the exception: they have a backup, so a failed undo leaves
the buffer asleep with it (never unusable), recording what the reservation
really maps (``_State.settle``: slots *kept* with the buffer's page and bytes,
*stale* slots to unmap first, *spare* pages held); the next ``wake()`` starts
from that record, and ``close()`` frees it all.

Views. ``view()`` returns an :class:`~vmmpool._dlpack.ArrayView`, which keeps
the buffer alive, and the buffer tracks its live views in a weak set (a view
stays live while any array or DLPack capsule made from it does). The rule:

* a shrink that would unmap bytes under a live view raises ``BufferError``
  (shrinking only ``size`` while the pages stay mapped is allowed);
* a move raises ``BufferError`` while any view is live (its pointer would
  dangle); there is no forced move;
* ``close()`` with live views closes the buffer for further use at once but
  gives the memory back only when the last view goes.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from ._device import Device, DeviceLike
from ._dlpack import ArrayView
from ._errors import (
    AsleepError,
    ClosedError,
    ExportAsleepError,
    ExportClosedError,
    OutOfMemoryError,
    VmmError,
)
from ._logq import QueuedLogger
from ._options import Access, address_limit, check_int, event_handle, host_bytes, stream_key
from ._prefault import discard
from ._process import NoCopy
from ._resources import (
    AddressReservation,
    ClosesOnExit,
    OpLock,
    PhysicalAllocation,
    check_peers,
    create,
    peer_list,
    reserve,
    safety_finalizer,
)
from ._share import Lease, SharedMemoryHandle, check_shareable, not_shareable
from ._staging import SleepCounts, SleepStats, Staging, host_array

__all__ = ["GrowableBuffer", "PageSource"]

# Queued while this thread holds a pool's lock (see _logq): never a logging lock there.
_log = QueuedLogger("vmmpool")

#: Where device memory is host RAM, sleep copies, unmaps and gives back pieces of at most
#: this many bytes, one after the other (as ``PagePool.sleep``'s ``SLEEP_GROUP``).
SLEEP_PIECE = 64 << 20


class PageSource(Protocol):
    """What a page pool provides to a buffer (``vmmpool.PagePool`` implements it)."""

    page_size: int
    device: Device

    @property
    def peers(self) -> Iterable[int]: ...

    def acquire_pages(self, count: int, stream: int | None = None) -> list[PhysicalAllocation]:
        """Hand out `count` unmapped pages, all or none (``OutOfMemoryError``)."""

    def release_pages(self, pages: Sequence[PhysicalAllocation]) -> None:
        """Take back unmapped pages whose work has finished."""


class _Undo:
    """Undo steps of one operation, and what it created (kept if an undo step fails)."""

    __slots__ = ("steps", "reservations", "pages", "failed_step")

    def __init__(self) -> None:
        self.steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.reservations: list[AddressReservation] = []
        self.pages: list[PhysicalAllocation] = []
        #: The undo step that failed (for `failed`), or None.
        self.failed_step: Callable[..., Any] | None = None

    def push(self, fn: Callable[..., Any], *args: Any) -> None:
        self.steps.append((fn, args))

    def run(
        self,
        state: _State,
        err: BaseException,
        failed: Callable[[BaseException, BaseException, _Undo], None] | None = None,
    ) -> None:
        """Run the steps newest first; on a failure, stop and call `failed` (by default
        make the buffer unusable)."""
        while self.steps:
            fn, args = self.steps.pop()
            try:
                fn(*args)
            except Exception as undo_err:  # noqa: BLE001 - reported through `err`
                self.failed_step = fn
                (failed or state.make_unusable)(err, undo_err, self)
                return


class _State:
    """Everything the buffer owns; what its finalizer frees. Holds no reference to the buffer."""

    __slots__ = (
        "device",
        "page",
        "pool",
        "peers",
        "stream",
        "res",
        "pages",
        "size",
        "floor",
        "unusable",
        "debris_res",
        "debris_pages",
        "asleep",
        "backup",
        "kept",
        "stale",
        "spare",
        "staging",
        "sleeps",
        "shareable",
        "exported",
        "leases",
        "tail",
        "released",
    )

    def __init__(
        self,
        device: Device,
        page: int,
        pool: PageSource | None,
        peers: tuple[int, ...],
        stream: int | None,
        res: AddressReservation,
    ) -> None:
        self.device = device
        self.page = page
        self.pool = pool
        self.peers = peers
        self.stream = stream
        self.res = res
        self.pages: list[PhysicalAllocation] = []
        self.size = 0
        self.floor = 0  # pages reserve() asked to keep
        self.unusable: str | None = None
        self.debris_res: list[AddressReservation] = []
        self.debris_pages: list[PhysicalAllocation] = []
        # Sleep / wake (issue 18): pages to map back while asleep (None awake),
        # the host backup, the reusable pinned staging buffer, the numbers.
        self.asleep: int | None = None
        self.backup: np.ndarray | None = None
        # After a failed sleep or wake (see settle()): page indexes still mapped with the
        # buffer's page and bytes (kept), mapped with something to unmap first (stale: the
        # page to give back once unmapped, or None), and unmapped pages held (spare).
        self.kept: dict[int, PhysicalAllocation] = {}
        self.stale: dict[int, PhysicalAllocation | None] = {}
        self.spare: list[PhysicalAllocation] = []
        self.staging: Staging | None = None
        self.sleeps = SleepCounts()
        #: Pages are created exportable (shareable=True).
        self.shareable = False
        #: Pages handed to another process by share() whose receivers may still map them:
        #: a pool never reuses them, and the buffer does not sleep.
        self.exported: set[PhysicalAllocation] = set()
        #: Each share()'s lease and pages: once every receiver of a share is done (its
        #: handles and mappings closed, everywhere), its pages are no longer exported.
        self.leases: list[tuple[Lease, list[PhysicalAllocation]]] = []
        #: Slots past the capacity that a growth whose undo failed left mapped -> the
        #: page mapped there (never part of the buffer: unmapped by clear_tail()).
        self.tail: dict[int, PhysicalAllocation] = {}
        #: Page indexes whose handle a failed shrink released while they stayed mapped (no
        #: pool): their memory lives through the mapping; retain_released() takes them back.
        self.released: set[int] = set()

    def reap_leases(self) -> None:
        """Forget the shares whose receivers are all done (pages they alone exported included)."""
        if not self.leases:
            return
        live = [(lease, pages) for lease, pages in self.leases if not lease.ended()]
        if len(live) != len(self.leases):
            self.leases = live
            self.exported.intersection_update({p for _l, ps in live for p in ps})

    def close_leases(self) -> None:
        for lease, _pages in self.leases:
            lease.close()
        self.leases = []

    # ----------------------------------------------------------------- steps
    def sync(self) -> None:
        """Wait for in-flight work on the memory before unmapping it (rule 8)."""
        if self.stream is not None and event_handle(self.stream) != self.stream:
            # Handle 2 names each calling thread's own stream: synchronizing it waits for
            # this thread's work only. An event on the legacy stream waits for every one's.
            self.quiesce()
            return
        self.device.synchronize(self.stream)

    def acquire(self, undo: _Undo, count: int) -> list[PhysicalAllocation]:
        """`count` unmapped pages, from the pool or the driver; undo gives them back."""
        if self.pool is not None:
            pages = list(self.pool.acquire_pages(count, stream=self.stream))  # all or nothing
            undo.pages = pages
            undo.push(self.give_back, pages)
            return pages
        pages = undo.pages = []  # filled as created: undo releases exactly those
        undo.push(self.give_back, pages)
        kind = "posix_fd" if self.shareable else "none"
        for _ in range(count):
            pages.append(create(self.page, self.device, handle_type=kind))
        return pages

    def give_back(self, pages: Sequence[PhysicalAllocation]) -> None:
        """Return unmapped pages (without a pool, drop the handles; closing twice is a no-op).

        Pages shared with another process go back to a pool as discarded (the
        pool releases them and never reuses them: the receiver keeps them).
        """
        if self.pool is not None:
            if pages:
                try:
                    self.pool.page_size  # noqa: B018 - alive? (a weak proxy after _release)
                except ReferenceError:
                    return  # the pool was collected: closing it released its pages
                self.reap_leases()
                exported = self.exported
                if exported:
                    shared = [p for p in pages if p in exported]
                    kept = [p for p in pages if p not in exported]
                    if kept:
                        self.pool.release_pages(kept)
                    if shared:
                        self.pool._discard_pages(shared)  # type: ignore[attr-defined]
                        exported.difference_update(shared)
                else:
                    self.pool.release_pages(list(pages))
        else:
            for p in pages:
                p.close()
            if self.exported:
                self.exported.difference_update(pages)

    def map_pages(
        self, undo: _Undo, res: AddressReservation, first: int, pages: Sequence[PhysicalAllocation]
    ) -> None:
        """Map `pages` from page index `first` of `res`, then grant access once over them all."""
        g = self.page
        base = first * g
        done = [0]
        undo.push(self._unmap_done, res, base, done)
        for p in pages:
            res.map(p, base + done[0] * g)
            done[0] += 1
        if pages:
            res.set_access(base, len(pages) * g, Access.READWRITE, self.peers)

    def _unmap_done(self, res: AddressReservation, base: int, done: list[int]) -> None:
        if done[0]:
            res.unmap(base, done[0] * self.page)

    def remap(self, res: AddressReservation, first: int, pages: Sequence[PhysicalAllocation]) -> None:
        """Undo step: map `pages` back where they were (all or nothing)."""
        undo = _Undo()
        try:
            self.map_pages(undo, res, first, pages)
        except BaseException as err:
            undo.run(self, err)
            raise

    def retain_back(self, first: int, indices: list[int]) -> None:
        """Undo step: take back the handle references released for pages ``first + i``."""
        backend = self.device._backend
        while indices:
            i = first + indices[-1]
            handle = backend.retain(self.res.address + i * self.page)
            old = self.pages[i]
            new = self.pages[i] = PhysicalAllocation(self.device, handle, self.page, self.shareable)
            if old in self.exported:  # a share's page: the new object stands for it there too
                self.exported.discard(old)
                self.exported.add(new)
                for _lease, shared in self.leases:
                    shared[:] = [new if q is old else q for q in shared]
            self.released.discard(i)
            indices.pop()

    # ------------------------------------------------------------ operations
    def grow(self, count: int) -> None:
        """Map `count` more pages in place."""
        self.clear_leftovers()
        undo = _Undo()
        try:
            new = self.acquire(undo, count)
            self.map_pages(undo, self.res, len(self.pages), new)
        except BaseException as err:
            undo.run(self, err, self.grow_failed)
            raise
        self.pages.extend(new)

    def grow_failed(self, err: BaseException, undo_err: BaseException, undo: _Undo) -> None:
        """A growth's undo failed: the buffer is as it was; note what stays mapped past it.

        The slots the reservation still maps past the capacity go to `tail`
        with their pages (the growth mapped ``undo.pages`` in order from the
        capacity on); the other pages it acquired are given back (kept until
        ``close()`` if that fails too).
        """
        g = self.page
        n0 = len(self.pages)
        at = self.res.access_at
        loose = []
        for j, p in enumerate(undo.pages):
            if at((n0 + j) * g) is not None:
                self.tail[n0 + j] = p
            elif not p.closed:
                loose.append(p)
        self.give_back_or_keep(loose, "undo of a failed growth")
        n = len(self.tail)
        _undo_failed("growth", err, undo_err, f"{n} page(s) stay mapped past its capacity until "
                     "its next growth, move, sleep or close()")

    def clear_leftovers_quietly(self) -> None:
        """:meth:`clear_leftovers` where nothing else needs it to succeed (a resize that maps
        and unmaps nothing): a failure is logged."""
        if self.tail or self.debris_res or self.debris_pages:
            try:
                self.clear_leftovers()
            except Exception:  # noqa: BLE001 - the next growth, move, sleep or close() retries
                _log.warning("unmapping what a failed undo left mapped failed; retried later",
                             exc_info=True)

    def clear_leftovers(self) -> None:
        """Unmap what a failed undo left mapped outside the buffer's pages: the slots past the
        capacity a growth left (:meth:`clear_tail`) and the ranges a move had made
        (`debris_res`, :meth:`move_failed`; the pages acquired for them go back then).

        Raises what the unmap raises; what it did not unmap stays. Neither was ever
        handed out, so nothing can still use them: no wait.
        """
        self.clear_tail()
        self.clear_debris()

    def clear_debris(self) -> None:
        """Close the ranges a failed move left (`debris_res`: raises what closing raises, the
        rest staying), then give back the pages a failed undo kept (`debris_pages`, best
        effort: kept for ``close()`` if that fails)."""
        while self.debris_res:
            self.debris_res[-1].close()  # unmap (one call) and free
            self.debris_res.pop()
        pages, self.debris_pages = self.debris_pages, []
        self.give_back_or_keep(pages, "pages a failed undo kept")

    def give_back_or_keep(self, pages: Sequence[PhysicalAllocation], what: str) -> None:
        """:meth:`give_back` the open ones of `pages`; on a failure (logged) keep them in
        `debris_pages`: the next growth, move, resize, sleep or ``close()`` retries."""
        pages = [p for p in pages if not p.closed]
        if not pages:
            return
        try:
            self.give_back(pages)
        except Exception:  # noqa: BLE001 - retried later
            _log.warning("%s: giving pages back failed; retried later", what, exc_info=True)
            # without a pool give_back closes them one by one: keep those still open
            self.debris_pages.extend(p for p in pages if not p.closed)

    def clear_tail(self) -> None:
        """Unmap the slots a failed growth left mapped past the capacity, give their pages back.

        Raises what the unmap raises; what it did not unmap stays in `tail`.
        """
        if not self.tail:
            return
        g = self.page
        for first, count in _runs(sorted(self.tail)):
            self.res.unmap(first * g, count * g)  # never used by the buffer: no wait needed
            pages = [self.tail.pop(i) for i in range(first, first + count)]
            self.give_back_or_keep(pages, "pages a failed growth left mapped")

    def shrink(self, keep: int) -> None:
        """Unmap and give back every page from index `keep` on.

        A range a failed move left may still map those pages: it is closed first
        (raising, with nothing changed, if that fails again), so that no page goes
        back to a pool, or to the driver, while mapped there.
        """
        self.clear_debris()
        self.sync()
        self.give_piece(keep, len(self.pages) - keep, self.shrink_failed)
        del self.pages[keep:]
        if self.released:
            self.released = {i for i in self.released if i < keep}

    def shrink_failed(self, err: BaseException, undo_err: BaseException, first: int,
                      released: list[int]) -> None:
        """A shrink without a pool failed and taking back a handle it released failed too.

        Nothing was unmapped (the unmap is the shrink's last step), so the
        buffer is as it was: the pages ``first + i`` for `released` keep their
        memory through their mappings, with released handles, until
        :meth:`retain_released` (a move, share or sleep) or an unmap.
        """
        self.released.update(first + i for i in released)
        _undo_failed("shrink", err, undo_err, f"{len(released)} page(s) keep their memory through "
                     "their mappings, their handles released, until a move, share or sleep")

    def retain_released(self) -> None:
        """Take back the handles a failed shrink released (raises what retain raises)."""
        if self.released:
            left = sorted(self.released)
            try:
                self.retain_back(0, left)
            finally:
                self.released = set(left)

    def move(self, new_size: int, target: int) -> None:
        """Map every page (plus new ones up to `target`) into a new range of `new_size` bytes."""
        self.clear_leftovers()
        self.retain_released()
        old = self.res
        undo = _Undo()
        try:
            new = self.acquire(undo, target - len(self.pages))
            res = reserve(new_size, self.device)
            undo.reservations.append(res)
            undo.push(res.close)
            self.map_pages(undo, res, 0, self.pages + new)
            self.sync()  # nothing may still use the old addresses
            try:
                old.close()  # unmap (one call) and free
            except BaseException:
                # Unmapped, but the free failed: map the pages back. (mappings()
                # still lists the unmapped Mapping objects then; they are closed.)
                if not old.closed and self.pages and all(m.closed for m in old.mappings()):
                    undo.push(self.remap, old, 0, self.pages)
                raise
        except BaseException as err:
            undo.run(self, err, self.move_failed)
            raise
        self.res = res
        self.pages.extend(new)

    def move_failed(self, err: BaseException, undo_err: BaseException, undo: _Undo) -> None:
        """A move failed and undoing it failed too.

        If the old range had been unmapped (its free failed) and mapping it
        back failed, the buffer cannot be as it was: it becomes unusable.
        Otherwise the old range still maps every page (its unmap is the move's
        last step), so the buffer is as it was; the new range is closed here
        and the pages acquired for it given back. A range whose close fails
        again stays in `debris_res` (with the pages acquired for it in
        `debris_pages`, when it still maps them) until the next growth, move,
        shrink, sleep or ``close()`` (:meth:`clear_debris`); it may still map
        the buffer's pages too, which is harmless: nothing uses its addresses,
        and a shrink closes it before giving pages back.
        """
        if undo.failed_step == self.remap:
            self.make_unusable(err, undo_err, undo)
            return
        mapped = False
        for res in undo.reservations:
            if res.closed:
                continue
            try:
                res.close()
            except Exception:  # noqa: BLE001 - reported with `err`; retried later
                _log.warning("undo of a failed move: closing its new range failed again",
                             exc_info=True)
                self.debris_res.append(res)
                mapped = mapped or any(not m.closed for m in res.mappings())
        if mapped:
            self.debris_pages.extend(p for p in undo.pages if not p.closed)
        else:
            self.give_back_or_keep(undo.pages, "undo of a failed move")
        if self.debris_res:
            left = (f"its new range stays reserved{' and mapped' if mapped else ''} until the "
                    "buffer's next growth, move, shrink, sleep or close()")
        elif self.debris_pages:
            left = (f"{len(self.debris_pages)} page(s) acquired for it are given back at the "
                    "buffer's next growth, move, resize, sleep or close()")
        elif undo.reservations:
            left = "the move's new range was closed on a second try"
        else:
            left = "nothing of the move is left"
        _undo_failed("move", err, undo_err, left)

    def quiesce(self) -> None:
        """Wait for the work that may use the pages: an event on the buffer's stream, else a sync."""
        if self.stream is None:
            self.sync()  # no stream named: the device that owns the memory (rule 8)
            return
        backend = self.device._backend
        ev = backend.event_record(event_handle(self.stream))
        try:
            backend.event_wait(ev)
        finally:
            try:
                backend.event_destroy(ev)
            except BaseException as e:  # the wait is what counts; close() destroys it
                self._staging().stale.append(ev)  # (an interrupt too, or the event leaks)
                if not isinstance(e, Exception):
                    raise
                _log.warning("destroying a buffer's event failed; close() retries", exc_info=True)

    def _staging(self) -> Staging:
        if self.staging is None:
            self.staging = Staging(self.device._backend)
        return self.staging

    def sleep(self, backup: bool) -> None:
        """Copy the pages to host memory (with `backup`), unmap them, give them back.

        On a GPU in one piece (one copy, one unmap). Where device memory is host
        RAM (the host emulator) and there is a backup, by pieces of
        ``SLEEP_PIECE`` bytes, each copied, unmapped and given back before the
        next is copied, so that RAM peaks near the buffer's bytes, not twice
        them (as ``PagePool.sleep``). All or nothing: a failure maps new pages
        for the pieces given back and restores their bytes from the backup
        (:meth:`sleep_failed`); if that fails too, the buffer stays asleep
        with its backup, and :meth:`wake` retries.
        """
        t0 = time.perf_counter()
        self.clear_leftovers()
        self.retain_released()
        n = len(self.pages)
        g = self.page
        self.quiesce()
        data = host_array(n * g) if backup and n else None
        k = n
        if data is not None and self.device._backend.device_memory_is_host_ram:
            k = max(1, SLEEP_PIECE // g)
        done = 0  # pages given back
        try:
            while done < n:
                m = min(k, n - done)
                if data is not None:
                    self._staging().save(
                        [(self.res.address + done * g, m * g, done * g)], data, self.stream or 0
                    )
                self.sleep_piece(done, m)
                done += m
        except BaseException as err:
            try:
                self.sleep_failed(n, done, data, err)
            finally:
                if self.asleep is not None:  # left asleep (its undo failed): it went to sleep
                    self.sleeps.slept(data.nbytes if data is not None else 0, t0)
            raise
        self.pages = []
        self.asleep = n
        self.backup = data
        self.sleeps.slept(data.nbytes if data is not None else 0, t0)

    def give_piece(
        self,
        first: int,
        m: int,
        failed: Callable[[BaseException, BaseException, int, list[int]], None] | None = None,
    ) -> None:
        """Unmap pages ``[first, first + m)`` and give them back (all or nothing).

        Without a pool, `failed` (if given) handles an undo that fails: it gets the
        indexes (from `first`) whose handles stay released.
        """
        g = self.page
        pages = self.pages[first : first + m]
        undo = _Undo()
        released: list[int] = []
        on_fail = None
        if failed is not None and self.pool is None:
            def on_fail(e: BaseException, u: BaseException, _undo: _Undo) -> None:
                failed(e, u, first, released)
        try:
            if self.pool is None:
                # Release while still mapped (legal, rule 7) so that a failure
                # can be undone with retain; the unmap then frees the memory.
                undo.push(self.retain_back, first, released)
                for i, p in enumerate(pages):
                    p.close()
                    released.append(i)
                self.res.unmap(first * g, m * g)
            else:
                self.res.unmap(first * g, m * g)
                undo.push(self.remap, self.res, first, pages)
                self.give_back(pages)  # shared pages as discarded
        except BaseException as err:
            undo.run(self, err, on_fail)
            raise

    def sleep_piece(self, first: int, m: int) -> None:
        """Sleep's step: :meth:`give_piece`, whose undo, if it fails, leaves things as they are.

        A failed undo stops where it failed (never making the buffer unusable):
        :meth:`sleep_failed` then reads what is mapped from the reservation.
        """
        g = self.page
        pages = self.pages[first : first + m]
        if self.pool is None:
            released: list[int] = []
            try:
                for i, p in enumerate(pages):
                    p.close()
                    released.append(i)
                self.res.unmap(first * g, m * g)
            except BaseException:
                try:
                    self.retain_back(first, released)
                except Exception:  # noqa: BLE001 - the original error wins; sleep_failed settles
                    _log.error("undo of a failed sleep: retain failed", exc_info=True)
                raise
        else:
            self.res.unmap(first * g, m * g)
            try:
                self.give_back(pages)  # shared pages as discarded
            except BaseException:
                try:
                    for i, p in enumerate(pages):
                        self.res.map(p, (first + i) * g)
                    self.res.set_access(first * g, m * g, Access.READWRITE, self.peers)
                except Exception:  # noqa: BLE001 - the original error wins; sleep_failed settles
                    _log.error("undo of a failed sleep: mapping back failed", exc_info=True)
                raise

    def sleep_failed(self, n: int, done: int, data: np.ndarray | None, err: BaseException) -> None:
        """Undo of a failed sleep: pages ``[0, done)`` were given back, ``[done, n)`` are the
        buffer's (maybe unmapped, or with a released handle, after a failed undo step).

        Everything as it was: awake. Else the buffer is recorded asleep as it is
        (:meth:`settle`) and woken: new pages for what was given back, bytes
        from the backup (with ``backup=False`` those pages hold undefined
        bytes). If that wake fails too, the buffer stays asleep with its backup.
        """
        cand = {i: self.pages[i] for i in range(done, n)}
        if done:
            self.pages = self.pages[done:]  # what is still the buffer's, should settle fail
        self.settle(n, data, cand, set(cand), [], may_wake=True)
        if self.asleep is None:
            return
        try:
            self.wake(undo=True)
        except Exception as undo_err:  # noqa: BLE001 - reported through `err`
            _log.error(
                "sleep failed (%r) and waking back failed too (%r): the buffer stays asleep with "
                "its backup; wake() retries", err, undo_err,
            )
            if hasattr(err, "add_note"):
                err.add_note(f"vmmpool: waking back also failed ({undo_err!r}); the buffer is asleep")

    def settle(
        self,
        n: int,
        data: np.ndarray | None,
        cand: dict[int, PhysicalAllocation],
        trusted: set[int],
        spare: list[PhysicalAllocation],
        may_wake: bool,
    ) -> None:
        """After a failure: record the buffer as the reservation shows it.

        `cand`: the page the buffer holds for page index ``i`` (mapped there or
        not; never one given back); `trusted`: the indexes whose mapped page
        holds the buffer's bytes; `spare`: other unmapped pages it holds. A
        slot mapped with a live trusted page is *kept* (:meth:`wake` leaves it
        as it is), any other mapped slot is *stale* (wake unmaps it first), an
        unmapped candidate page is *spare* (the next wake maps it). With
        `may_wake` and every page mapped as before, the buffer is awake.
        """
        g = self.page
        at = self.res.access_at
        kept: dict[int, PhysicalAllocation] = {}
        stale: dict[int, PhysicalAllocation | None] = {}
        spare = list(spare)
        for i in range(n):
            p = cand.get(i)
            live = p is not None and not p.closed
            if at(i * g) is not None:
                if live and i in trusted:
                    kept[i] = p  # type: ignore[assignment]
                else:
                    stale[i] = p if live else None
            elif live:
                spare.append(p)  # type: ignore[arg-type]
        if may_wake and len(kept) == n and not spare and all(
            at(i * g) is Access.READWRITE for i in range(n)
        ):
            self.pages = [kept[i] for i in range(n)]
            return
        self.pages = []
        self.asleep = n
        self.backup = data
        self.kept = kept
        self.stale = stale
        self.spare = spare

    def wake(self, undo: bool = False) -> None:
        """Map new pages at the sleeping page indexes, set access, copy the backup back.

        Pages a failed sleep or wake left mapped are handled first: *stale*
        slots are unmapped, *kept* ones stay as they are (see :meth:`settle`);
        *spare* pages are mapped before new ones are taken. Where device
        memory is host RAM, the backup goes back by pieces of ``SLEEP_PIECE``
        bytes, each piece's backup bytes given back to the OS once restored
        (new pages take RAM only as they are written), so RAM peaks near the
        buffer's bytes. On failure (:meth:`wake_failed`) the buffer stays
        asleep with its backup, and ``wake()`` can be retried. `undo`: a
        failed sleep's undo (not counted as a wake).
        """
        n = self.asleep
        assert n is not None
        t0 = time.perf_counter()
        g = self.page
        data = self.backup
        kept = self.kept
        for i in sorted(self.stale):  # one call each: a failure leaves the record true
            self.res.unmap(i * g, g)
            p = self.stale.pop(i)
            if p is not None:
                self.spare.append(p)
        at = self.res.access_at
        need = [i for i in range(n) if i not in kept]
        fix = [i for i in kept if at(i * g) is not Access.READWRITE]
        new: dict[int, PhysicalAllocation] = {}
        taken: list[PhysicalAllocation] = []  # the pages this wake holds (spare ones first)
        restored: list[tuple[int, int]] = []  # pieces restored whose backup bytes went to the OS
        try:
            use = self.spare[: len(need)]
            del self.spare[: len(use)]
            taken.extend(use)
            if len(need) > len(use):
                more = _Undo()
                try:
                    self.acquire(more, len(need) - len(use))
                finally:
                    taken.extend(more.pages)
            new = dict(zip(need, taken, strict=True))
            for first, count in _runs(sorted(need + fix)):
                for i in range(first, first + count):
                    if i in new:
                        self.res.map(new[i], i * g)
                self.res.set_access(first * g, count * g, Access.READWRITE, self.peers)
            if data is not None and need:
                runs = _runs(need)
                if self.device._backend.device_memory_is_host_ram:
                    k = max(1, SLEEP_PIECE // g)
                    for first, count in runs:
                        for f in range(first, first + count, k):
                            m = min(k, first + count - f)
                            piece = [(self.res.address + f * g, m * g, f * g)]
                            self._staging().load(piece, data, self.stream or 0)
                            restored.append((f, m))
                            discard(data.ctypes.data + f * g, m * g)
                else:
                    pieces = [(self.res.address + f * g, c * g, f * g) for f, c in runs]
                    self._staging().load(pieces, data, self.stream or 0)
        except BaseException:
            self.wake_failed(n, data, new, taken, restored)
            raise
        if self.spare:  # more than this wake needed: given back (best effort)
            extra, self.spare = self.spare, []
            self.give_back_or_keep(extra, "wake's spare pages")
        self.pages = [kept[i] if i in kept else new[i] for i in range(n)]
        self.kept = {}
        self.asleep = None
        self.backup = None
        if not undo:
            self.sleeps.woke(data.nbytes if data is not None else 0, t0)

    def wake_failed(
        self,
        n: int,
        data: np.ndarray | None,
        new: dict[int, PhysicalAllocation],
        taken: list[PhysicalAllocation],
        restored: list[tuple[int, int]],
    ) -> None:
        """Undo of a failed wake; never raises: the buffer stays asleep with its backup.

        Restored pieces whose backup bytes were given back are copied back
        into the backup first; if that fails they stay mapped (kept: their
        bytes are on the device only). What the wake mapped is unmapped (a
        slot that will not unmap stays, stale) and its pages given back (a
        page that will not go back stays with the buffer, spare).
        """
        g = self.page
        trusted = set(self.kept)
        # Each step runs even if an earlier one was interrupted (KeyboardInterrupt): settle()
        # must record what is left, or the next wake() maps onto mapped slots. The first
        # interrupt is raised at the end (the caller then re-raises nothing else).
        interrupt: list[BaseException] = []

        def note(e: BaseException) -> None:
            if not isinstance(e, Exception) and not interrupt:
                interrupt.append(e)

        if restored:
            assert data is not None
            try:
                self._staging().save(
                    [(self.res.address + f * g, m * g, f * g) for f, m in restored], data, self.stream or 0
                )
            except BaseException as e:  # noqa: BLE001 - the original error wins
                note(e)
                _log.error("undo of a failed wake: copying restored pages back failed; they stay mapped",
                           exc_info=True)
                trusted.update(i for f, m in restored for i in range(f, f + m))
        at = self.res.access_at
        for first, count in _runs(sorted(i for i in new if at(i * g) is not None and i not in trusted)):
            try:
                self.res.unmap(first * g, count * g)
            except BaseException as e:  # noqa: BLE001 - one slot at a time; what stays mapped is stale
                note(e)
                _log.error("undo of a failed wake: unmap failed", exc_info=True)
                for i in range(first, first + count):
                    if at(i * g) is None:
                        continue
                    try:
                        self.res.unmap(i * g, g)
                    except BaseException as e2:  # noqa: BLE001 - settle() notes it stale
                        note(e2)
        mapped = {id(p) for i, p in new.items() if at(i * g) is not None}
        back = [p for p in taken if id(p) not in mapped]
        spare: list[PhysicalAllocation] = []
        if self.pool is None:
            for p in back:
                try:
                    p.close()
                except BaseException as e:  # noqa: BLE001 - the buffer keeps the handle
                    note(e)
                    if p.closed:
                        continue
                    _log.error("undo of a failed wake: release failed; the buffer keeps it", exc_info=True)
                    spare.append(p)
        elif back:
            try:
                self.give_back(back)
            except BaseException as e:  # noqa: BLE001 - the buffer keeps the pages
                note(e)
                _log.error("undo of a failed wake: giving pages back failed; the buffer keeps them",
                           exc_info=True)
                spare.extend(back)
        cand = {i: p for i, p in new.items() if id(p) in mapped}
        cand.update(self.kept)
        self.settle(n, data, cand, trusted, spare + self.spare, may_wake=False)
        if interrupt:
            raise interrupt[0]

    def make_unusable(self, err: BaseException, undo_err: BaseException, undo: _Undo) -> None:
        self.unusable = f"undoing a failed operation ({err!r}) also failed ({undo_err!r})"
        self.debris_res.extend(undo.reservations)
        self.debris_pages.extend(undo.pages)
        _log.error("GrowableBuffer is unusable: %s; close() it to free its memory", self.unusable)
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"vmmpool: undoing it also failed ({undo_err!r}); the buffer is unusable")

    def free(self) -> None:
        """Give everything back: synchronize, unmap and free ranges, return pages.

        Each step is idempotent, so calling this again after a failure resumes.
        """
        held = [
            *self.pages, *self.debris_pages, *self.kept.values(), *self.spare,
            *(p for p in self.stale.values() if p is not None), *self.tail.values(),
        ]
        if (
            self.res.closed and not self.debris_res and not held
            and not (self.staging is not None and self.staging.busy)
            and not self.leases
        ):
            return
        self.sync()
        for res in (self.res, *self.debris_res):
            res.close()
        self.debris_res.clear()
        self.give_back(held)
        self.pages = []
        self.debris_pages = []
        self.kept = {}
        self.stale = {}
        self.spare = []
        self.tail = {}
        self.released = set()
        self.size = 0
        self.asleep = None
        self.backup = None
        if self.staging is not None:
            self.staging.close()
        self.close_leases()


def _undo_failed(what: str, err: BaseException, undo_err: BaseException, detail: str) -> None:
    """Report an operation whose undo failed too, the buffer being as it was: log, note on `err`."""
    _log.error("%s failed (%r) and undoing it failed too (%r): the buffer is as it was; %s",
               what, err, undo_err, detail)
    if hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(f"vmmpool: undoing it also failed ({undo_err!r}); the buffer is as it was, {detail}")


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive numbers in sorted `indexes`."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _growth_oom(
    err: OutOfMemoryError, what: str, nbytes: int, have: int, target: int, page: int
) -> OutOfMemoryError:
    """The out-of-memory error of a growth, naming the user's request, not the failing page."""
    detail = err.message or str(err)
    out = OutOfMemoryError(
        nbytes,
        err.in_use,
        err.limit,
        cached=err.cached,
        message=(
            f"{what} {nbytes} bytes: growing from {have * page} to {target * page} bytes needs "
            f"{target - have} more page(s) of {page} bytes; {detail}"
        ),
        status=err.status,
    )
    if hasattr(out, "add_note"):  # Python >= 3.11: an undo's failure, noted on `err`
        for note in getattr(err, "__notes__", ()):
            out.add_note(note)
    return out


def _close_if_alive(ref: weakref.ReferenceType[GrowableBuffer]) -> None:
    """A close() deferred to the pool's next call (see GrowableBuffer.close), if the buffer lives."""
    buf = ref()
    if buf is not None:
        buf._close_after_operation()


def _release(state: _State) -> None:
    """The buffer's finalizer: free `state`, never blocking on a pool's lock.

    With a pool that can defer work (``PagePool._defer``), the release is
    queued for the pool's next call: the garbage collector may run this inside
    a locked section of that pool, or in the middle of a backend call. Without
    one it is done here.
    """
    if state.device._backend.forked:
        return  # a forked child releases nothing: the memory is the parent's
    defer = getattr(state.pool, "_defer", None) if state.pool is not None else None
    if defer is not None:
        # The queued release must not keep the pool alive: the pool's finalizer holds
        # its queue, so the pool of a buffer dropped before it was never collected
        # (nor closed). A pool collected first runs the release as it closes.
        state.pool = weakref.proxy(state.pool)
        defer(state.free)
    else:
        state.free()


class GrowableBuffer(ClosesOnExit, NoCopy):
    """Device memory that grows in place: one address range, pages mapped on demand.

    Parameters
    ----------
    max_size : int, optional
        Bytes of address space to reserve once (rounded up to the page size).
        The buffer grows up to this without its pointer changing. Default: the
        device's total memory, rounded up, so growth up to physical capacity
        never moves.
    device : Device-like, optional
        Where the memory lives; the pool's device with `pool`, else
        :func:`~vmmpool.default_device`.
    pool : PagePool, optional
        Take pages from, and give them back to, this pool (many buffers can
        share one pool). The page size is then ``pool.page_size`` and access is
        granted to ``pool.peers`` too. Without a pool, each page is a
        ``device.granularity``-sized :func:`~vmmpool.create` allocation.
    initial_size : int
        Bytes to map at construction (the size is set to it).
    stream : int or stream object, optional
        A CUDA stream (handle, or an object :func:`~vmmpool.stream_key`
        accepts) to synchronize before unmapping pages (rule 8); the whole
        owning device is synchronized when omitted. It must outlive the buffer.
    peers : iterable of int
        Other device ordinals to grant read-write access (CUDA only).
    shareable : bool
        Create pages exportable as POSIX file descriptors so that
        :meth:`share` works (on CUDA ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``;
        on the host emulator a memfd per page). With `pool`, the pool must be
        shareable; a buffer on a shareable pool is shareable. A device without
        POSIX fd handles raises ``ValueError`` here, before anything is created.

    Raises
    ------
    TypeError, ValueError
        Bad arguments (before any driver call).
    OutOfMemoryError, DriverError
        The reservation or the initial pages failed (nothing is left behind).

    Notes
    -----
    Capacity follows the size: :meth:`resize` maps or unmaps whole trailing
    pages so that capacity is the smallest page multiple holding the size,
    except that it never drops below what :meth:`reserve` asked for, until
    :meth:`shrink_to_fit`. Growth never copies, and within `max_size` the
    pointer never changes. Bytes beyond the size but inside a mapped page keep
    their value; bytes in newly mapped pages are undefined.

    A buffer is a context manager; :meth:`close` is idempotent. A buffer
    dropped without ``close()`` gives its memory back when garbage collected.
    Methods are thread-safe.

    Examples
    --------
    >>> dev = vmmpool.Device.emulated(capacity=64 << 20)
    >>> with GrowableBuffer(max_size=32 << 20, device=dev) as buf:
    ...     p = buf.resize(3 << 20)      # maps two 2 MiB pages
    ...     assert buf.resize(20 << 20) == p   # grows in place
    """

    def __init__(
        self,
        max_size: int | None = None,
        device: DeviceLike = None,
        pool: PageSource | None = None,
        initial_size: int = 0,
        *,
        stream: object = None,
        peers: Iterable[int] = (),
        shareable: bool = False,
    ) -> None:
        if not isinstance(shareable, bool):
            raise TypeError(f"shareable must be a bool, got {type(shareable).__name__}")
        peers = peer_list(peers)  # (before anything unpacks it)
        if pool is not None:
            if not callable(getattr(pool, "acquire_pages", None)):
                raise TypeError(f"pool must be a vmmpool.PagePool, got {type(pool).__name__}")
            if getattr(pool, "closed", False):  # every growth would raise: refused up front
                check = getattr(pool, "_check_process", None)
                if check is not None:
                    check()  # a forked child's pool: ForkedError (a ClosedError)
                raise ClosedError("PagePool")
            dev = pool.device
            if device is not None and Device(device) is not dev:
                # repr: two emulated devices both print as "host"
                raise ValueError(f"device {Device(device)!r} differs from the pool's device {dev!r}")
            page = check_int("pool.page_size", pool.page_size, minimum=1, multiple=dev.granularity)
            wanted = [*pool.peers, *peers]
        else:
            dev = Device(device)
            page = dev.granularity
            wanted = peers
        others = check_peers(dev, wanted)[1:]
        initial = check_int("initial_size", initial_size)
        if stream is not None:
            stream = stream_key(stream)
        if max_size is None:
            limit = max(-(-dev.total_memory // page) * page, page)
        else:
            most = address_limit(dev) // page * page  # the largest whole-page reservation
            limit = check_int("max_size", max_size, minimum=1, maximum=most)
            limit = -(-limit // page) * page
        if initial > limit:
            raise ValueError(f"initial_size must be <= max_size ({limit} bytes), got {initial}")
        if pool is not None:
            pool_shareable = bool(getattr(pool, "shareable", False))
            if shareable and not pool_shareable:
                raise ValueError(
                    "shareable=True needs a shareable pool: create it with "
                    "PagePool(..., shareable=True)"
                )
            shareable = pool_shareable
        elif shareable:
            check_shareable(dev)
        res = reserve(limit, dev)
        self._state = _State(dev, page, pool, others, stream, res)
        self._state.shareable = shareable
        self._lock = OpLock()
        self._views: weakref.WeakSet[ArrayView] = weakref.WeakSet()
        self._closed = False
        self._deferred = False
        self._fin = safety_finalizer(self, _release, self._state, backend=dev._backend)
        if initial:
            try:
                self.resize(initial)
            except BaseException:
                self._closed = True
                try:
                    self._state.free()
                    self._fin.detach()
                except Exception:  # noqa: BLE001 - keep the original error; the finalizer retries
                    pass
                raise

    # ----------------------------------------------------------------- facts
    def _owned(self) -> None:
        """Raise ForkedError in a forked child (before any lock: a parent thread may hold it)."""
        self._state.device._backend.check_process("GrowableBuffer")

    def _live(self) -> _State:
        self._owned()
        if self._closed:
            raise ClosedError("GrowableBuffer")
        return self._state

    def _usable(self) -> _State:
        st = self._live()
        if st.unusable is not None:
            raise VmmError(f"GrowableBuffer is unusable: {st.unusable}; close() it")
        return st

    def _awake(self, operation: str) -> _State:
        st = self._usable()
        if st.asleep is not None:
            raise AsleepError("GrowableBuffer", operation)
        return st

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def device(self) -> Device:
        """The device the memory lives on."""
        return self._state.device

    @property
    def pool(self) -> PageSource | None:
        """The pool pages come from, or ``None``."""
        return self._state.pool

    @property
    def page_size(self) -> int:
        """Bytes per page: the device's granularity, or the pool's page size."""
        return self._state.page

    @property
    def ptr(self) -> int:
        """Address of the first byte. Changes only when a resize with ``allow_move=True`` moves."""
        return self._live().res.address

    @property
    def address(self) -> int:
        """The same as :attr:`ptr`: every vmmpool object names its first byte ``address``."""
        return self._live().res.address

    @property
    def size(self) -> int:
        """Bytes in use (what :meth:`resize` set)."""
        return self._live().size

    @property
    def capacity(self) -> int:
        """Bytes mapped (a multiple of :attr:`page_size`, at least :attr:`size`).

        While asleep: the bytes :meth:`wake` maps back.
        """
        st = self._live()
        return (len(st.pages) if st.asleep is None else st.asleep) * st.page

    @property
    def max_size(self) -> int:
        """Bytes of address space reserved: the most the buffer grows to without moving."""
        return self._live().res.size

    # --------------------------------------------------------------- resizing
    def _pages_for(self, nbytes: int) -> int:
        return -(-nbytes // self._state.page)

    def _apply(self, st: _State, target: int, nbytes: int, allow_move: bool, what: str) -> None:
        """Bring the mapped pages to `target`, growing, moving or shrinking."""
        have = len(st.pages)
        if target <= have:
            st.clear_leftovers_quietly()  # (a growth or a move clears them first, raising on failure)
        if target > have:
            if target * st.page > st.res.size:
                if not allow_move:
                    raise ValueError(
                        f"{what} {nbytes} bytes exceeds max_size {st.res.size}; pass allow_move=True "
                        "to remap the buffer into a larger range (its pointer changes)"
                    )
                most = address_limit(st.device) // st.page * st.page  # largest whole-page range
                if target * st.page > most:
                    raise ValueError(
                        f"{what} {nbytes} bytes needs {target * st.page} bytes of address space, but "
                        f"the device addresses at most {most} bytes in one range (whole pages of "
                        f"{st.page} bytes)"
                    )
                views = list(self._views)
                if views:
                    raise BufferError(
                        f"cannot move the buffer while {len(views)} view(s) or DLPack export(s) of it "
                        "are alive (their pointers would dangle); drop them first"
                    )
                try:
                    # At least twice the old range, but never more than the device can address.
                    st.move(min(max(target * st.page, 2 * st.res.size), most), target)
                except OutOfMemoryError as err:
                    raise _growth_oom(err, what, nbytes, have, target, st.page) from err
            else:
                try:
                    st.grow(target - have)
                except OutOfMemoryError as err:
                    raise _growth_oom(err, what, nbytes, have, target, st.page) from err
        elif target < have:
            end = max((v.end for v in self._views), default=0)
            if target * st.page < end:
                raise BufferError(
                    f"cannot unmap bytes {target * st.page}..{have * st.page}: a live view or DLPack "
                    f"export uses bytes up to {end}; drop it first"
                )
            st.shrink(target)

    def resize(self, nbytes: int, *, allow_move: bool = False) -> int:
        """Set the size to `nbytes`, mapping or unmapping whole trailing pages.

        Parameters
        ----------
        nbytes : int
            New size in bytes (0 allowed).
        allow_move : bool
            Past :attr:`max_size`, reserve a larger range (at least twice the
            old one), remap every page there and free the old range; the data
            is not copied, but the pointer changes (returned). Refused while
            views are alive.

        Returns
        -------
        int
            The buffer's pointer (new if it moved).

        Raises
        ------
        TypeError, ValueError
            `nbytes` is not a non-negative int, or exceeds :attr:`max_size`
            without `allow_move`, or (with it) needs more address space than
            the device has in one range (before any driver call).
        BufferError
            Shrinking would unmap bytes a live view uses, or a move with live views.
        OutOfMemoryError, DriverError
            A driver call failed; the buffer is unchanged.
        ClosedError
            The buffer was closed.
        """
        self._owned()
        n = check_int("nbytes", nbytes)
        if not isinstance(allow_move, bool):
            raise TypeError(f"allow_move must be a bool, got {type(allow_move).__name__}")
        with self._lock:
            st = self._awake(f"resize({n})")
            self._apply(st, max(self._pages_for(n), st.floor), n, allow_move, "size")
            st.size = n
            return st.res.address

    def reserve(self, nbytes: int, *, allow_move: bool = False) -> int:
        """Map pages so that capacity is at least `nbytes`; the size does not change.

        The capacity then stays at least `nbytes` through later resizes, until
        :meth:`shrink_to_fit`.

        Parameters
        ----------
        nbytes : int
            Capacity wanted, in bytes.
        allow_move : bool
            As for :meth:`resize`.

        Returns
        -------
        int
            The buffer's pointer (new if it moved).
        """
        self._owned()
        n = check_int("nbytes", nbytes)
        if not isinstance(allow_move, bool):
            raise TypeError(f"allow_move must be a bool, got {type(allow_move).__name__}")
        with self._lock:
            st = self._awake(f"reserve({n})")
            want = self._pages_for(n)
            self._apply(st, max(want, len(st.pages)), n, allow_move, "reserve of")
            st.floor = max(st.floor, want)
            return st.res.address

    def shrink_to_fit(self) -> None:
        """Unmap and give back every page beyond the size; forget :meth:`reserve` requests.

        Raises
        ------
        BufferError
            A live view uses bytes in the pages that would go.
        """
        self._owned()
        with self._lock:
            st = self._awake("shrink_to_fit()")
            self._apply(st, self._pages_for(st.size), st.size, False, "size")
            st.floor = 0

    # ------------------------------------------------------------------- data
    def view(
        self, dtype: DTypeLike = "uint8", shape: int | Sequence[int] | None = None, offset: int = 0
    ) -> ArrayView:
        """A typed view of the buffer's bytes, exporting DLPack and the array interface.

        Parameters
        ----------
        dtype : dtype-like
            bool, int8..int64, uint8..uint64, float16/32/64 or complex64/128.
        shape : int or sequence of int, optional
            Shape in elements; default 1-D over every whole element from
            `offset` to :attr:`size`.
        offset : int
            Byte offset of the first element (a multiple of the item size).

        Returns
        -------
        ArrayView
            Keeps the buffer alive. While it (or an array or capsule made from
            it) lives, the buffer refuses to move and to unmap bytes under it.
            While the buffer is asleep the view exports nothing
            (:class:`~vmmpool.AsleepError`); it can be made all the same.

        Examples
        --------
        >>> a = numpy.from_dlpack(buf.view("float32"))   # host: shares the memory
        """
        self._owned()
        with self._lock:
            st = self._usable()
            v = ArrayView(self, st.device, st.res.address, st.size, dtype, shape, offset)
            self._views.add(v)
            return v

    # DLPack and NumPy on the buffer itself: a uint8 view of the current size.
    def __dlpack_device__(self) -> tuple[int, int]:
        """``(device_type, device_id)`` of the memory, as :meth:`ArrayView.__dlpack_device__`.

        Answered after :meth:`close` too (as :attr:`device` is, and as a view's is):
        it is where the memory was; :meth:`__dlpack__` is what refuses.
        """
        self._owned()
        return self._state.device.dlpack_device

    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """Export the buffer's bytes (``uint8``, its current :attr:`size`) as DLPack.

        ``numpy.from_dlpack(buf)`` (host), ``cupy.from_dlpack(buf)`` or
        ``torch.from_dlpack(buf)`` (GPU) is ``from_dlpack(buf.view())``: zero-copy,
        and the array keeps the memory alive and mapped like any view's. Arguments
        as :meth:`ArrayView.__dlpack__`; for another dtype or shape use :meth:`view`.
        After :meth:`close` it raises a :class:`~vmmpool.ClosedError` that is also a
        ``BufferError`` (the DLPack convention for "cannot export"), as a view of a
        closed buffer does; while asleep (:meth:`sleep`), an
        :class:`~vmmpool.AsleepError` that is also a ``BufferError``.
        """
        self._owned()  # a ForkedError stays one
        try:
            view = self.view()
        except ClosedError:
            raise ExportClosedError("GrowableBuffer") from None
        return view.__dlpack__(
            stream=stream, max_version=max_version, dl_device=dl_device, copy=copy
        )

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> Any:
        """``numpy.asarray(buf)``: a ``uint8`` array over the buffer's bytes (host emulator only).

        Shares the memory (no copy) unless ``copy=True`` or another `dtype` asks for one;
        the array keeps the memory mapped like any view. Memory on a CUDA device raises
        ``TypeError``: NumPy cannot read it; use ``cupy.from_dlpack(buf)`` or
        ``torch.from_dlpack(buf)``. While asleep it raises
        :class:`~vmmpool.AsleepError` (the bytes are not mapped: a copy would read
        them, an array over them would crash at its first touch).
        """
        import numpy as np

        st = self._live()
        if not st.device.is_host:
            raise TypeError(
                f"numpy.asarray(GrowableBuffer) needs host memory, but this buffer is on {st.device}: "
                "use cupy.from_dlpack(buf) or torch.from_dlpack(buf), or buf.read() for a host copy"
            )
        cast = dtype is not None and np.dtype(dtype) != np.uint8
        if cast and copy is False:
            raise ValueError(
                f"numpy.asarray(GrowableBuffer, dtype={np.dtype(dtype)}, copy=False): the bytes are "
                "uint8 and a cast copies; use buf.view(dtype) for a typed view without a copy"
            )
        with self._lock:  # no sleep() between the check and the copy
            if st.asleep is not None:
                # The bytes are not mapped: a copy would read them, an array over them
                # would crash at its first touch (a segmentation fault on the host).
                if copy or cast:
                    raise AsleepError("GrowableBuffer", "numpy.array() (a copy)")
                raise ExportAsleepError("GrowableBuffer", "numpy.asarray() (an array over its bytes)")
            arr = np.from_dlpack(self.view())
            if cast:
                return arr.astype(dtype)
            return arr.copy() if copy else arr

    def _range(self, offset: object, nbytes: int, size: int) -> int:
        off = check_int("offset", offset)
        if off + nbytes > size:
            raise ValueError(f"bytes [{off}, {off + nbytes}) must lie inside the size {size}")
        return off

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy host bytes (anything with the buffer protocol) into the buffer at `offset`.

        Strided input (a sliced or Fortran-order NumPy array) is copied in C order.
        """
        self._owned()
        mv = host_bytes(data)
        with self._lock:
            st = self._awake("write")
            off = self._range(offset, mv.nbytes, st.size)
            st.device.write(st.res.address + off, mv)

    def read(self, nbytes: int | None = None, offset: int = 0) -> bytearray:
        """Copy `nbytes` bytes at `offset` (default: to the end of the size) to a new ``bytearray``."""
        self._owned()
        with self._lock:
            st = self._awake("read")
            if nbytes is None:
                off = self._range(offset, 0, st.size)
                n = st.size - off
            else:  # (checked together: the error names the whole range asked for)
                n = check_int("nbytes", nbytes)
                off = self._range(offset, n, st.size)
            return st.device.read(st.res.address + off, n)

    # ---------------------------------------------------------------- sharing
    @property
    def shareable(self) -> bool:
        """Whether :meth:`share` works (``shareable=True``, or a shareable pool)."""
        return self._state.shareable

    def share(self) -> SharedMemoryHandle:
        """A picklable handle that maps this buffer's bytes in another process.

        Send it through :mod:`multiprocessing` (spawn or forkserver context,
        ``Queue``, ``Pipe`` or process arguments); ``handle.open()`` there maps
        the same pages read-write at an address of that process
        (:class:`~vmmpool.SharedMapping`). Writes are visible both ways.

        Returns
        -------
        SharedMemoryHandle
            Covers the :attr:`size` bytes the buffer has now
            (``handle.nbytes``), one POSIX file descriptor per page.

        Raises
        ------
        ValueError
            The buffer was not created shareable, or its size is 0.
        AsleepError
            The buffer is asleep (:meth:`sleep`): wake it first.
        ClosedError
            The buffer was closed.

        Notes
        -----
        Growth after sharing is not seen by that handle's receivers: they see
        ``handle.nbytes`` bytes; share again for the new size. A move
        (``allow_move=True``) keeps the same pages, so the memory stays shared.
        The receiver keeps every page it maps for as long as it maps it: when
        the owner shrinks, closes or exits, those pages are no longer the
        owner's (writes stop being visible both ways for them) but their bytes
        stay with the receiver; a pool takes such pages back as discarded and
        never reuses them, so no receiver sees another buffer's data. Once every
        handle and mapping of a share is closed, in every process, its pages
        are the buffer's alone again: they go back to a pool as ordinary pages,
        and the buffer can :meth:`sleep`.
        Nothing orders the two processes' work: synchronize before reading
        what the other side wrote.
        """
        self._owned()  # before the lock: a parent thread may have held it at a fork
        with self._lock:
            st = self._usable()
            if not st.shareable:
                raise not_shareable("this GrowableBuffer")
            if st.asleep is not None:
                raise AsleepError("GrowableBuffer", "share()")  # its pages were given back
            if st.size == 0:
                raise ValueError("cannot share a GrowableBuffer of size 0: resize() it first")
            st.retain_released()  # (handles a failed shrink released: exported below)
            pages = st.pages[: self._pages_for(st.size)]
            handle, lease = SharedMemoryHandle._make(
                st.device, "GrowableBuffer", pages, st.size, 0, st.page
            )
            st.reap_leases()  # one open descriptor per share still in use, not per share ever made
            st.leases.append((lease, list(pages)))  # pages return to normal once it is done
            st.exported.update(pages)
            return handle

    # ----------------------------------------------------------- sleep / wake
    @property
    def asleep(self) -> bool:
        """True between :meth:`sleep` and :meth:`wake`."""
        return self._state.asleep is not None

    def sleep(self, backup: bool = True) -> None:
        """Give the buffer's physical pages back, keeping its address range and size.

        Parameters
        ----------
        backup : bool
            Copy the mapped bytes (the whole capacity) to host memory first, so
            that :meth:`wake` restores them. ``False`` drops the contents.

        Raises
        ------
        ValueError
            Pages of the buffer were shared with another process (:meth:`share`)
            and a receiver still holds a handle or a mapping of them (once every
            one is closed, everywhere, the buffer sleeps again).
        OutOfMemoryError, DriverError
            A driver call failed; the buffer is as it was (awake, bytes intact).
            If undoing the failure fails too (the driver failed twice in a row),
            the buffer is asleep with its backup instead, and :meth:`wake`
            restores every byte (with ``backup=False``: the pages the sleep had
            given back hold undefined bytes once mapped again, as after a
            wake). It is never left unusable.
        ClosedError
            The buffer was closed, or its pool was (:meth:`wake` could never
            map the pages back); nothing changed.

        Notes
        -----
        The work that may use the pages is waited for first: an event on the
        buffer's `stream` (the whole device when it has none, as for a
        shrink). The capacity is copied in one run through a reusable pinned
        staging buffer, unmapped in one call, and the pages go back to the
        driver (or to the pool, whose own :meth:`~vmmpool.PagePool.sleep` or
        ``trim`` gives them to the driver). :attr:`ptr`, :attr:`size`,
        :attr:`capacity` and every view's pointer stay as they are; touching
        the memory while asleep is an error. While asleep, :meth:`resize`,
        :meth:`reserve`, :meth:`shrink_to_fit`, :meth:`read` and :meth:`write`
        raise :class:`~vmmpool.AsleepError`, and so do exports (DLPack, the
        array interfaces, ``numpy.asarray``: then also a ``BufferError``) from
        the buffer or any view of it, so no new array reaches the unmapped
        addresses; arrays exported before the sleep cannot be stopped (leave
        them alone until :meth:`wake`), and an export racing ``sleep()`` in
        another thread is one of those (their asleep check takes no lock; see
        :attr:`vmmpool.Allocation.asleep`). :meth:`view` and :meth:`close` work.
        Sleeping again is a no-op.
        """
        if not isinstance(backup, bool):
            raise TypeError(f"backup must be a bool, got {type(backup).__name__}")
        self._owned()  # before the lock: a parent thread may have held it at a fork
        with self._lock:
            st = self._usable()
            if st.asleep is not None:
                return
            if st.pool is not None and getattr(st.pool, "closed", False):
                # Its pages would go back to nothing, and wake() could never acquire new
                # ones: the backup would be unreachable (read() refuses while asleep).
                err = ClosedError("this GrowableBuffer's PagePool")
                if hasattr(err, "add_note"):  # Python >= 3.11
                    err.add_note("vmmpool: sleep() refused: wake() could never map its pages back")
                raise err
            st.reap_leases()
            shared = sum(1 for p in st.pages if p in st.exported) if st.exported else 0
            if shared:
                raise ValueError(
                    f"cannot sleep: {shared} page(s) of this buffer were shared with another process "
                    "(share()); the receivers keep them mapped, so sleeping would free nothing and "
                    "end the sharing"
                )
            st.sleep(backup)

    def wake(self) -> None:
        """Map pages at the same addresses again and copy the backup back (a no-op when awake).

        Raises
        ------
        OutOfMemoryError
            No memory for the pages (or the pool is full); the buffer stays
            asleep with its backup.
        AsleepError
            The buffer's pool is asleep: wake the pool first.
        DriverError
            A driver call failed; what wake did is undone, the buffer stays
            asleep with its backup and ``wake()`` can be called again. If the
            undo fails too, what it could not undo stays with the buffer
            (pages it could not give back, slots it could not unmap, restored
            pieces it could not copy back into the backup, which keep their
            bytes mapped) and the next ``wake()`` uses it; nothing is lost, and
            :meth:`close` frees it all.
        """
        self._owned()  # before the lock: a parent thread may have held it at a fork
        with self._lock:
            st = self._usable()
            if st.asleep is not None:
                st.wake()

    def sleep_stats(self) -> SleepStats:
        """The buffer's sleep and wake numbers (see :class:`~vmmpool.SleepStats`)."""
        self._owned()  # before the lock: a parent thread may have held it at a fork
        with self._lock:
            st = self._state
            staging = st.staging.nbytes if st.staging is not None else 0
            backup = st.backup.nbytes if st.backup is not None else 0
            return SleepStats.of(st.sleeps, st.asleep is not None, backup, staging)

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Give the memory back (idempotent).

        Synchronizes, unmaps and frees the range, and returns every page to the
        pool or the driver. If views (or arrays and DLPack capsules made from
        them) are still alive, the buffer is closed for use at once and the
        memory goes back when the last of them goes (from whichever thread
        drops it). If a step fails, the
        error propagates and calling ``close()`` again resumes where it stopped.
        """
        if self._fin.alive:
            self._owned()  # a forked child releases nothing
        if self._lock.owned():
            # A finalizer that interrupted an operation of this buffer in this thread: closed
            # for use now, freed when that operation ends (not under it).
            self._closed = True
            if self._fin.alive:
                self._lock.defer(self._close_after_operation)
            return
        held_here = getattr(self._state.pool, "_held_here", None)
        if held_here is not None and self._fin.alive and held_here():
            # A finalizer that interrupted this thread inside its pool's locked section (the
            # garbage collector runs at any allocation there): giving the pages back there
            # raised ReentryError (lost in __del__, the pages kept until the buffer died), and
            # waiting for this buffer's lock deadlocked with a thread that holds it while it
            # waits for the pool's (a resize). Closed for use now, freed by the pool's next
            # call (as the safety net of a collected buffer is).
            self._closed = True
            pool = self._state.pool
            if not pool.closed:  # type: ignore[union-attr]
                # Weakly: the pool's finalizer holds its queue, and the buffer holds the pool
                # (a strong reference kept both alive for good if dropped before the next call;
                # a buffer collected meanwhile is freed by its safety net).
                pool._defer(functools.partial(_close_if_alive, weakref.ref(self)))  # type: ignore[union-attr]
                return
            # The pool is closing under its lock (its queue runs there): a closed pool takes
            # pages back without its lock, but this buffer's may be held by a thread that
            # waits for the pool's. Closed now if that lock is free; else its safety net frees
            # it (deferring to the pool would run this again at once: a RecursionError).
            if self._lock._lock.acquire(False):
                try:
                    self._close_locked()
                finally:
                    self._lock._lock.release()
            return
        backend = self._state.device._backend
        if backend.in_call():
            # A finalizer inside a backend call of this thread: another thread may hold this
            # buffer's lock while it waits for the backend's (a resize about to map), so
            # waiting for ours here would deadlock. Closed for use now; the rest is done
            # after the call (the backend's next call runs it, as the safety net does).
            self._closed = True
            if self._fin.alive:
                backend.run_or_defer(self._close_after_operation)
            return
        with self._lock:
            self._close_locked()

    def _host_copy_stream(self) -> int | None:
        """The stream a host copy of a view waits for (``ArrayView.__dlpack__``; None: the device)."""
        return self._state.stream

    def _close_locked(self) -> None:
        """close() with this buffer's lock held."""
        self._closed = True
        if not self._fin.alive:
            return
        views = list(self._views)
        if views:
            if not self._deferred:
                self._deferred = True
                for v in views:
                    safety_finalizer(v, self._free_when_unused, backend=self._state.device._backend)
            return
        # Take over the release from the finalizer atomically (the last
        # view's finalizer may race with us); re-arm it if a step fails.
        if self._fin.detach() is None:
            return
        try:
            self._state.free()
        except BaseException:
            self._fin = safety_finalizer(self, _release, self._state, backend=self._state.device._backend)
            raise

    def _close_after_operation(self) -> None:
        """A close() that re-entered an operation, done as it ends; errors are logged (the
        finalizer that asked cannot see them) and the safety net stays armed."""
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - reported on the logger
            _log.warning("GrowableBuffer.close() requested by a finalizer failed: %r", err)

    def _free_when_unused(self) -> None:
        """After a deferred close: free once the last view is gone (runs as a finalizer).

        It may run from the garbage collector inside a locked section of this
        buffer or of its pool, in any thread: it takes no lock. Detaching the
        finalizer is atomic, so exactly one of this and ``close()`` frees.
        """
        if not any(True for _ in self._views) and self._fin.detach() is not None:
            _release(self._state)

    def __enter__(self) -> GrowableBuffer:
        self._live()
        return self

    def __repr__(self) -> str:
        if self._closed:
            return f"<GrowableBuffer on {self._state.device} closed>"
        st = self._state
        state = " unusable" if st.unusable else " asleep" if st.asleep is not None else ""
        if st.tail:  # (see _State.grow_failed)
            state += f", {len(st.tail)} page(s) a failed growth left mapped past the capacity"
        if st.released:  # (see _State.shrink_failed)
            state += f", {len(st.released)} page(s) whose handles a failed shrink released"
        if st.debris_res and not st.unusable:  # (see _State.move_failed)
            state += f", {len(st.debris_res)} range(s) a failed move left reserved"
        if st.debris_pages and not st.unusable:  # (see _State.clear_debris)
            state += f", {len(st.debris_pages)} page(s) a failed undo could not give back"
        pages = len(st.pages) if st.asleep is None else st.asleep
        return (
            f"<GrowableBuffer {st.size} bytes, capacity {pages * st.page}, "
            f"max_size {st.res.size} at {st.res.address:#x} on {st.device}{state}>"
        )

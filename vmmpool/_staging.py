"""Copies between device memory and a host backup in large runs (sleep / wake, issue 18).

A :class:`Staging` owns one reusable page-locked ("pinned") host buffer cut in
two halves, allocated on first use through the backend (``cuMemHostAlloc`` on
CUDA) and kept until :meth:`Staging.close`, so a second sleep pins nothing.
Each copy walks contiguous device ranges (whole runs of mapped pages, never
page by page) in pieces of at most one half: the device side of a piece is
queued on the stream (``cuMemcpyDtoHAsync`` / ``cuMemcpyHtoDAsync``), an event
is recorded after it, and the host side (a ``memmove`` between the half and
the backup) waits on that event only when it needs the half again, so one half
is copied by the device while the host drains the other. The backup itself is
ordinary (pageable) host memory: a NumPy array, dropped after wake.

A fresh backup takes a page fault per page its first copy writes, and those
faults, not the copies, were most of a sleep's time (measured on the host
emulator, where every copy is a memcpy). So ``save`` commits each piece of the
backup in one call (``MADV_POPULATE_WRITE``, :mod:`vmmpool._prefault`) before
it waits for the piece's event: on CUDA the commit overlaps the DMA in flight,
and the drain is then a plain memcpy.

A failure leaves nothing behind: the copies already queued are waited for (a
stream synchronize: the caller may unmap their pages next), pending events are
destroyed, and the caller decides what the partial copy means (a partial backup is simply discarded; a
partial restore is overwritten by the next try).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from dataclasses import dataclass

import numpy as np

from ._backends.base import Backend
from ._logq import QueuedLogger
from ._prefault import populate_write

__all__ = ["Staging", "STAGING_CHUNK", "SleepCounts", "SleepStats", "host_array"]

# Queued while this thread holds a pool's lock (see _logq): never a logging lock there.
_log = QueuedLogger("vmmpool")

#: Bytes of each half of the staging buffer, at most (the buffer is 2x this).
STAGING_CHUNK = 32 << 20


def host_array(nbytes: int) -> np.ndarray:
    """A fresh ``uint8`` array of `nbytes` of host memory for a backup.

    Memory of its own: a memory file (``memfd``) mapped once, its descriptor
    closed at once (the mapping keeps the file). :meth:`Staging.save` commits
    it piece by piece as it fills it; :func:`vmmpool._prefault.discard` gives
    pieces back early (a wake that has restored them). Measured on the host
    emulator's machine, pages given back this way (a hole in a file) are
    taken again at once by the next allocation, where anonymous memory given
    back with ``MADV_DONTNEED`` came back at the speed of brand-new memory (4x
    slower past 8 GiB held). Anonymous memory where memory files are missing.
    The memory goes back to the OS when the array is dropped.
    """
    if nbytes <= 0:
        return np.empty(0, dtype=np.uint8)
    mm: mmap.mmap | None = None
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            fd = memfd_create("vmmpool-backup", getattr(os, "MFD_CLOEXEC", 1))
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.ftruncate(fd, nbytes)
                mm = mmap.mmap(fd, nbytes)
            except OSError:
                mm = None
            finally:
                os.close(fd)
    if mm is None:
        mm = mmap.mmap(-1, nbytes)
    return np.frombuffer(mm, dtype=np.uint8)


class SleepCounts:
    """Sleep and wake numbers kept by a pool or a buffer."""

    __slots__ = ("n_sleeps", "n_wakes", "sleep_bytes", "wake_bytes", "sleep_seconds", "wake_seconds")

    def __init__(self) -> None:
        self.n_sleeps = 0
        self.n_wakes = 0
        self.sleep_bytes = 0
        self.wake_bytes = 0
        self.sleep_seconds = 0.0
        self.wake_seconds = 0.0

    def slept(self, nbytes: int, t0: float) -> None:
        """Count a sleep that began at ``time.perf_counter()`` `t0` and backed up `nbytes`
        (also one that failed and left its object asleep: it went to sleep)."""
        self.n_sleeps += 1
        self.sleep_bytes += nbytes
        self.sleep_seconds += time.perf_counter() - t0

    def woke(self, nbytes: int, t0: float) -> None:
        """Count a wake that began at `t0` and copied `nbytes` back."""
        self.n_wakes += 1
        self.wake_bytes += nbytes
        self.wake_seconds += time.perf_counter() - t0


@dataclass(frozen=True)
class SleepStats:
    """Sleep and wake numbers of a :class:`~vmmpool.GrowableBuffer` (``sleep_stats()``).

    :class:`~vmmpool.PoolStats` carries the same fields for a pool.

    Attributes
    ----------
    asleep : bool
        True between ``sleep()`` and ``wake()``.
    backup_bytes : int
        Bytes of host memory holding the sleeping contents (0 when awake, or
        asleep with ``backup=False``).
    staging_bytes : int
        Page-locked host bytes held for the copies (kept for the next sleep).
    n_sleeps, n_wakes : int
        Times it went to sleep and woke: a ``sleep()`` that failed and left
        it asleep (its undo failed too) counts as a sleep, so ``n_sleeps -
        n_wakes`` is 1 while asleep and 0 while awake.
    sleep_bytes, wake_bytes : int
        Bytes copied to host memory by all sleeps, and back by all wakes.
    sleep_seconds, wake_seconds : float
        Time spent in all sleeps and all wakes.
    """

    asleep: bool
    backup_bytes: int
    staging_bytes: int
    n_sleeps: int
    n_wakes: int
    sleep_bytes: int
    wake_bytes: int
    sleep_seconds: float
    wake_seconds: float

    @classmethod
    def of(
        cls, counts: SleepCounts, asleep: bool, backup_bytes: int, staging_bytes: int
    ) -> SleepStats:
        c = counts
        return cls(
            asleep, backup_bytes, staging_bytes, c.n_sleeps, c.n_wakes, c.sleep_bytes,
            c.wake_bytes, c.sleep_seconds, c.wake_seconds,
        )


class Staging:
    """A reusable pinned host buffer of two halves and the copies through it.

    Parameters
    ----------
    backend : Backend
        The backend of the device whose memory is copied.
    chunk : int
        Most bytes of one half (:data:`STAGING_CHUNK`); the buffer is sized to
        the largest copy asked for so far, up to this.
    """

    __slots__ = ("backend", "chunk", "address", "half", "stale")

    def __init__(self, backend: Backend, chunk: int = STAGING_CHUNK) -> None:
        self.backend = backend
        self.chunk = chunk
        self.address: int | None = None
        self.half = 0
        #: Events whose destroy failed (after a failure): destroyed again by :meth:`close`.
        self.stale: list[int] = []

    # ----------------------------------------------------------------- memory
    def _ensure(self, nbytes: int) -> tuple[int, int]:
        """The buffer's address and half size, (re)allocated to hold a copy of `nbytes`."""
        want = min(self.chunk, max(-(-nbytes // 2), 1))  # two halves: the copy pipelines
        want = -(-want // 4096) * 4096
        if self.address is not None and self.half >= want:
            return self.address, self.half
        if self.address is not None:
            self.close()
        self.address = self.backend.host_alloc(2 * want)
        self.half = want
        return self.address, want

    @property
    def busy(self) -> bool:
        """Whether :meth:`close` has something to free (the pinned buffer, stale events)."""
        return self.address is not None or bool(self.stale)

    def close(self) -> None:
        """Free the pinned buffer and the stale events (idempotent; a failure propagates and a
        retry frees what is left)."""
        while self.stale:
            self.backend.event_destroy(self.stale[-1])
            self.stale.pop()
        if self.address is not None:
            self.backend.host_free(self.address)
            self.address = None
            self.half = 0

    @property
    def nbytes(self) -> int:
        """Pinned bytes held now."""
        return 2 * self.half if self.address is not None else 0

    # ----------------------------------------------------------------- copies
    @staticmethod
    def _pieces(runs: list[tuple[int, int, int]], half: int) -> list[tuple[int, int, int]]:
        out = []
        for addr, n, off in runs:
            done = 0
            while done < n:
                k = min(half, n - done)
                out.append((addr + done, k, off + done))
                done += k
        return out

    @staticmethod
    def _check(runs: list[tuple[int, int, int]], host: np.ndarray) -> int:
        total = sum(n for _a, n, _o in runs)
        end = max((o + n for _a, n, o in runs), default=0)
        if host.nbytes < end or not host.flags.c_contiguous:
            raise ValueError(
                f"the host array must be contiguous and hold {end} bytes, got {host.nbytes} bytes"
            )
        return total

    def _drop(self, pending: list[tuple[int, int, int] | None]) -> None:
        for i, p in enumerate(pending):
            if p is not None:
                pending[i] = None
                try:
                    self.backend.event_destroy(p[0])
                except Exception:  # noqa: BLE001 - the original error wins
                    _log.warning("destroying a staging event failed; close() retries", exc_info=True)
                    self.stale.append(p[0])

    def save(self, runs: list[tuple[int, int, int]], out: np.ndarray, stream: int) -> None:
        """Copy device ranges ``runs`` (device address, bytes, offset in `out`) into `out`.

        Raises whatever the backend raises; `out` is then partly written, and
        no event is left behind.
        """
        total = self._check(runs, out)
        if not total:
            return
        base, half = self._ensure(total)
        b = self.backend
        host = out.ctypes.data
        pending: list[tuple[int, int, int] | None] = [None, None]  # (event, offset, bytes) per half
        queued = False
        try:
            for i, (src, n, off) in enumerate(self._pieces(runs, half)):
                h = i & 1
                stage = base + h * half
                p = pending[h]
                if p is not None:  # drain the half before it is written again
                    populate_write(host + p[1], p[2])  # while the device copies
                    b.event_wait(p[0])
                    ctypes.memmove(host + p[1], stage, p[2])
                    b.event_destroy(p[0])
                    pending[h] = None
                b.copy_dtoh_async(stage, src, n, stream)
                queued = True
                pending[h] = (b.event_record(stream), off, n)
            for h in ((i + 1) & 1, i & 1):  # oldest first
                p = pending[h]
                if p is not None:
                    populate_write(host + p[1], p[2])
                    b.event_wait(p[0])
                    ctypes.memmove(host + p[1], base + h * half, p[2])
                    b.event_destroy(p[0])
                    pending[h] = None
        except BaseException:
            if queued:
                self._wait_queued(stream)
            raise
        finally:
            self._drop(pending)

    def load(self, runs: list[tuple[int, int, int]], src: np.ndarray, stream: int) -> None:
        """Copy `src` into the device ranges ``runs`` (device address, bytes, offset in `src`).

        Returns once every copy is complete (its event waited on).
        """
        total = self._check(runs, src)
        if not total:
            return
        base, half = self._ensure(total)
        b = self.backend
        host = src.ctypes.data
        pending: list[tuple[int, int, int] | None] = [None, None]
        queued = False
        try:
            for i, (dst, n, off) in enumerate(self._pieces(runs, half)):
                h = i & 1
                stage = base + h * half
                p = pending[h]
                if p is not None:  # the device must be done reading the half
                    b.event_wait(p[0])
                    b.event_destroy(p[0])
                    pending[h] = None
                ctypes.memmove(stage, host + off, n)
                b.copy_htod_async(dst, stage, n, stream)
                queued = True
                pending[h] = (b.event_record(stream), 0, 0)
            for h in (0, 1):
                p = pending[h]
                if p is not None:
                    b.event_wait(p[0])
                    b.event_destroy(p[0])
                    pending[h] = None
        except BaseException:
            if queued:
                self._wait_queued(stream)
            raise
        finally:
            self._drop(pending)

    def _wait_queued(self, stream: int) -> None:
        """After a failure: wait for the copies already queued on `stream` (rule 8).

        The caller undoes what it did next: a failed wake unmaps and releases
        the pages a queued copy may still write, a failed save may free the
        staging buffer a copy still reads. Their events may be gone (or never
        recorded): synchronize the stream. Best effort; the original error wins.
        """
        try:
            self.backend.synchronize(stream)
        except Exception:  # noqa: BLE001 - the original error wins
            _log.warning("waiting for queued staging copies after a failure failed", exc_info=True)

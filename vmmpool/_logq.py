"""Logging that never calls the logging module while this thread holds a pool's lock.

A logging handler takes its own lock (``Handler.acquire``), and a logger whose
level cache was cleared takes the logging module's lock. Another thread may
hold either while the garbage collector runs, in it, a finalizer that frees an
allocation (``Allocation.free`` is safe from finalizers): that free waits for
the pool's lock. Had the pool's holder called the logger there, it would wait
for that thread's logging lock: a deadlock.

So code that may run there logs through a :class:`QueuedLogger` (the pool's
modules through :data:`pool_logger`): the record is made at once (its time,
thread, caller and ``exc_info`` are the call's; no lock taken) and queued,
with the marker :data:`LOG` in the ``pending`` of the pool whose lock is held,
which its holder already tests after it lets go of the lock (``Core.settle``
then calls :func:`flush`). The hot paths pay nothing: they test ``pending``
anyway. Records keep their order (one queue, one emitter at a time). Called
where no pool lock of this thread is held, it emits at once (after what is
queued). Records a forked child inherits are the parent's: dropped there.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import sys
import threading
import weakref
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._backends.base import Backend
    from ._pool._core import Core

__all__ = ["LOG", "QueuedLogger", "flush", "pending_records", "pool_logger", "register"]


class _LogMarker:
    """The marker :data:`LOG` (``Core.drain`` leaves it for ``Core.settle``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<log records queued>"


#: In ``Core.pending``: records were queued while this pool's lock was held.
LOG = _LogMarker()

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

#: Records made under a pool's lock and their loggers, oldest first (one order for all).
_records: collections.deque[tuple[logging.Logger, logging.LogRecord]] = collections.deque()
#: Held (never waited for) by the thread emitting `_records`.
_emitting = threading.Lock()
#: Every live pool's state: :func:`flush` looks for a lock this thread holds.
_cores: weakref.WeakSet[Core] = weakref.WeakSet()


def register(core: Core) -> None:
    """Note a pool's state (its lock is looked at by :func:`flush`; held weakly)."""
    _cores.add(core)


def _enabled(lg: logging.Logger, level: int) -> bool:
    """``lg.isEnabledFor(level)`` without its lock (taken on a cache miss)."""
    return not lg.disabled and lg.manager.disable < level and level >= lg.getEffectiveLevel()


def _log(
    lg: logging.Logger, level: int, msg: str, args: tuple[object, ...], exc_info: object, frame: FrameType
) -> None:
    """Make the record now (as ``Logger._log`` does, with `frame` as the caller); emit or queue it."""
    ei: ExcInfo | None = None
    if exc_info:
        if isinstance(exc_info, BaseException):
            ei = (type(exc_info), exc_info, exc_info.__traceback__)
        elif isinstance(exc_info, tuple):
            ei = exc_info
        else:
            ei = sys.exc_info()
    code = frame.f_code
    rec = lg.makeRecord(lg.name, level, code.co_filename, frame.f_lineno, msg, args, ei, code.co_name)
    _records.append((lg, rec))
    core = _held_core()
    if core is not None:
        core.pending.append(LOG)  # emitted once this thread lets go of that lock
    else:
        flush()


class QueuedLogger:
    """A logger's ``debug``/``info``/``warning``/``error``, safe with a pool's lock held.

    The record is made at once and emitted when this thread holds no pool's
    lock (at once if it holds none; see the module docstring).
    """

    __slots__ = ("logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.logger = logging.getLogger(name)

    def debug(self, msg: str, *args: object, exc_info: object = False) -> None:
        if _enabled(self.logger, logging.DEBUG):
            _log(self.logger, logging.DEBUG, msg, args, exc_info, sys._getframe(1))

    def info(self, msg: str, *args: object, exc_info: object = False) -> None:
        if _enabled(self.logger, logging.INFO):
            _log(self.logger, logging.INFO, msg, args, exc_info, sys._getframe(1))

    def warning(self, msg: str, *args: object, exc_info: object = False) -> None:
        if _enabled(self.logger, logging.WARNING):
            _log(self.logger, logging.WARNING, msg, args, exc_info, sys._getframe(1))

    def error(self, msg: str, *args: object, exc_info: object = False) -> None:
        if _enabled(self.logger, logging.ERROR):
            _log(self.logger, logging.ERROR, msg, args, exc_info, sys._getframe(1))


#: What the pool's modules log with (``vmmpool.pool``).
pool_logger = QueuedLogger("vmmpool.pool")


def _live_cores() -> list[Core]:
    for _ in range(3):
        try:
            return list(_cores)
        except RuntimeError:  # pragma: no cover - the set changed (a pool made meanwhile)
            continue
    return []  # pragma: no cover


def _held_core() -> Core | None:
    """A pool whose lock this thread holds, if any (a walk of the live pools: slow paths only)."""
    for core in _live_cores():
        if core.held_here():
            return core
    return None


def _scan() -> tuple[Core | None, Backend | None]:
    """One walk: a pool whose lock this thread holds, else a backend inside a call of it."""
    busy: Backend | None = None
    seen: set[int] = set()
    for core in _live_cores():
        if core.held_here():
            return core, None
        b = core.backend
        if busy is None and id(b) not in seen:  # pools of one device share their backend
            seen.add(id(b))
            if b.in_call():
                busy = b
    return None, busy


#: The thread emitting `_records` now (0: none).
_emitter = 0


def _emit_queued() -> None:
    while _records:
        try:
            lg, rec = _records.popleft()
        except IndexError:  # pragma: no cover - emptied by another thread
            break
        try:
            lg.handle(rec)
        except Exception:  # noqa: BLE001 - as logging does: a record never raises
            pass


def flush() -> None:
    """Emit the queued records, unless this thread holds a pool's lock; never blocks, never raises.

    Holding one (a finalizer ran here inside that pool's locked section), the
    records wait for that section's end (its ``pending`` gets :data:`LOG`);
    inside a backend call of this thread, for the call's end (a free from a
    finalizer may wait for the backend's lock). Another thread emitting takes
    these records too. A handler of the emitting thread whose work logged again
    has those records handled at once, inside its ``emit``, as the logging
    module does (its recursion guards then apply).
    """
    global _emitter
    try:
        while _records:
            core, busy = _scan()
            if core is not None:
                core.pending.append(LOG)
                return
            if busy is not None:
                busy.run_or_defer(flush)
                return
            me = threading.get_ident()
            if _emitter == me:
                # Inside a handler's emit on this thread: nested, as logging itself does.
                # Left queued, the outer loop handled each after the handler's guard was
                # off, and a handler whose work logs again never let the caller return.
                _emit_queued()
                return
            if not _emitting.acquire(False):
                return  # the emitting thread loops until the queue is empty
            _emitter = me
            try:
                _emit_queued()
            finally:
                _emitter = 0
                _emitting.release()
    except Exception:  # noqa: BLE001 - runs from finalizers: never raise
        pass


def pending_records() -> int:
    """Records queued and not emitted yet (tests)."""
    return len(_records)


def _after_fork_in_child() -> None:
    # The queued records are the parent's (it emits them); the lock may have been held.
    global _emitting, _emitter
    _records.clear()
    _emitting = threading.Lock()
    _emitter = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
# Records still queued at exit (a flush deferred to a backend call that never came): emitted
# before logging.shutdown() (registered earlier: atexit runs in reverse order).
atexit.register(flush)

"""Every object owns its process: fork and copy rules (issue 17).

Fork. The host emulator's physical memory is shared memory (memfds mapped
``MAP_SHARED``), so a child forked with a live pool or buffer sees the
parent's bytes through its own copy of the parent's bookkeeping. Left alone,
the child would hand out the parent's cached blocks (overwriting live data)
and, by merely dropping an inherited buffer or closing a pool, punch holes in
the shared memory (the parent then reads zeros). On CUDA a forked child
cannot use the parent's context at all. The rule: every object belongs to the
process that made its backend (``Backend.owner_pid``); in a forked child every
object refuses use with :class:`~vmmpool.ForkedError` and never releases
memory, not on ``close()``, not from a finalizer or the garbage collector,
not at exit.

How it stays free on hot paths: no ``os.getpid()`` anywhere. An
``os.register_at_fork(after_in_child=...)`` hook marks, once, every live
object registered with :func:`track` (backends and pool states): a backend
sets ``forked`` (checked by every backend call, which is never a hot path),
and a pool's state turns ``closed`` (which ``malloc``/``free`` test already)
with ``forked`` set to say why. Locks a parent thread may have held at the
moment of the fork are replaced in the child, so a refusal never hangs.

Copy. Objects that own memory or track lifetimes cannot be copied: a copy
would escape the tracking (``free()`` accepted under a live array, the
original's death closing the pool under the copy). :class:`NoCopy` refuses
``copy.copy``, ``copy.deepcopy`` and pickling with a ``TypeError``.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, NoReturn

__all__ = ["NoCopy", "track"]

#: Objects with a ``_forked()`` method, called once in a forked child.
_registry: weakref.WeakSet[Any] = weakref.WeakSet()


def track(obj: Any) -> None:
    """Call ``obj._forked()`` in every child forked while `obj` lives (it holds no reference)."""
    _registry.add(obj)


def _after_fork_in_child() -> None:
    # Runs in the child right after os.fork(), with one thread: no lock is needed,
    # and none may be taken (a parent thread may have held it at the fork).
    for obj in list(_registry):
        try:
            obj._forked()
        except Exception:  # noqa: BLE001 - a fork hook must never raise
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _refuse(obj: object, how: str) -> NoReturn:
    name = type(obj).__name__
    if how == "pickled" and callable(getattr(type(obj), "share", None)):
        # Pickling is how objects reach another process: say how memory gets there.
        advice = f"to use its memory in another process, send {name}.share()'s handle"
    elif how == "pickled":
        advice = f"use the {name} in the process that made it (or send its bytes)"
    else:
        advice = f"pass the {name} itself (or copy its bytes)"
    raise TypeError(
        f"{name} objects cannot be {how}: they own device memory or track its lifetime, and a "
        f"copy would escape that tracking; {advice}"
    )


class NoCopy:
    """Mixin: ``copy.copy``, ``copy.deepcopy`` and ``pickle`` raise ``TypeError``."""

    __slots__ = ()

    def __copy__(self) -> NoReturn:
        _refuse(self, "copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        _refuse(self, "deep-copied")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        _refuse(self, "pickled")

    def __reduce__(self) -> NoReturn:
        _refuse(self, "pickled")

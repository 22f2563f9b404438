"""Exceptions raised by vmmpool.

Every error vmmpool raises on purpose derives from :class:`VmmError`, and each
also derives from the built-in exception a Python user would expect
(``MemoryError`` for out-of-memory, ``RuntimeError`` for driver failures,
``ValueError`` for use after close, and for use in a forked child). All of them pickle and unpickle with their
attributes intact, so they cross process boundaries (multiprocessing, Ray).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "VmmError",
    "DriverError",
    "OutOfMemoryError",
    "DeviceUnavailableError",
    "ClosedError",
    "AsleepError",
    "ForkedError",
    "ERROR_CODES",
]

#: CUDA driver error names used by vmmpool and their ``CUresult`` values.
#: The host emulator reports contract violations with these same names and
#: numbers, so that code passing on the emulator does not break on a GPU.
ERROR_CODES: dict[str, int] = {
    "CUDA_ERROR_INVALID_VALUE": 1,
    "CUDA_ERROR_OUT_OF_MEMORY": 2,
    "CUDA_ERROR_NOT_INITIALIZED": 3,
    "CUDA_ERROR_NO_DEVICE": 100,
    "CUDA_ERROR_INVALID_DEVICE": 101,
    "CUDA_ERROR_INVALID_CONTEXT": 201,
    "CUDA_ERROR_INVALID_HANDLE": 400,
    "CUDA_ERROR_NOT_SUPPORTED": 801,
}


class VmmError(Exception):
    """Base class of every error vmmpool raises on purpose."""


class DriverError(VmmError, RuntimeError):
    """A driver call (or its emulation) failed.

    Parameters
    ----------
    name : str
        The driver's error name, for example ``"CUDA_ERROR_INVALID_VALUE"``.
    message : str
        What went wrong, in words.
    status : int, optional
        The numeric ``CUresult``; looked up from `name` when omitted.
    operation : str, optional
        The backend operation that failed (``"map"``, ``"create"``, ...).

    Attributes
    ----------
    name, message, status, operation
        As given.
    """

    def __init__(
        self, name: str, message: str, status: int | None = None, operation: str = ""
    ) -> None:
        self.name = name
        self.message = message
        self.status = ERROR_CODES.get(name, -1) if status is None else int(status)
        self.operation = operation
        prefix = f"{operation}: " if operation else ""
        super().__init__(f"{prefix}{name}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.message, self.status, self.operation))


class OutOfMemoryError(VmmError, MemoryError):
    """Physical memory ran out (in the driver, the emulator or a pool's limit).

    Parameters
    ----------
    requested : int
        Bytes asked for.
    in_use : int
        Bytes in use when the request failed: the pool's pages holding live
        data, or, for a driver failure, the physical bytes this process's
        backend holds on the device.
    limit : int
        The limit in force (pool limit or device capacity), in bytes.
    cached : int, optional
        Bytes held in caches that could not be used for this request.
    message : str, optional
        Extra detail; a default sentence is built from the numbers otherwise.
    status : int, optional
        The ``CUresult`` when the driver reported the failure.

    Attributes
    ----------
    requested, in_use, cached, limit, status
        As given. ``name`` is ``"CUDA_ERROR_OUT_OF_MEMORY"``.
    """

    name = "CUDA_ERROR_OUT_OF_MEMORY"

    def __init__(
        self,
        requested: int,
        in_use: int,
        limit: int,
        cached: int = 0,
        message: str = "",
        status: int | None = None,
    ) -> None:
        self.requested = int(requested)
        self.in_use = int(in_use)
        self.limit = int(limit)
        self.cached = int(cached)
        self.status = ERROR_CODES["CUDA_ERROR_OUT_OF_MEMORY"] if status is None else status
        self.message = message
        text = (
            f"out of memory: requested {self.requested} bytes, {self.in_use} in use, "
            f"{self.cached} cached, limit {self.limit}"
        )
        if message:
            text = f"{text} ({message})"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.requested, self.in_use, self.limit, self.cached, self.message, self.status),
        )


class VmmWarning(UserWarning):
    """Base class of every warning vmmpool issues: something was adjusted, not refused.

    For example, a :class:`~vmmpool.PagePool` limit above the device's memory is clamped
    to it, with this warning.
    """


class DeviceUnavailableError(VmmError, RuntimeError):
    """The requested device cannot be used here (no driver, no GPU, no VMM).

    The message always says how to fall back to the host emulator.
    """

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(
            f"device {device!r} is unavailable: {reason}. "
            "Use vmmpool.Device('host') for the host emulator, which runs the same "
            "code on Linux virtual memory without a GPU."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.device, self.reason))


class ClosedError(VmmError, ValueError):
    """An object was used after ``close()``.

    Parameters
    ----------
    what : str
        The kind of object, for example ``"AddressReservation"``.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} has been closed")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what,))


class ExportClosedError(ClosedError, BufferError):
    """A DLPack export (``__dlpack__``) or array interface was asked of closed memory.

    Raised by ``GrowableBuffer.__dlpack__`` after ``close()``, and by an
    :class:`~vmmpool.ArrayView` whose owner was closed (or, for a pool
    allocation, freed). It is both a :class:`ClosedError` (what vmmpool raises
    for any use after ``close()``) and the ``BufferError`` that the DLPack
    convention (array API standard) raises when memory cannot be exported, so
    ``except ClosedError`` and ``except BufferError`` both catch it.

    Parameters
    ----------
    what : str
        The closed object, for example ``"GrowableBuffer"``.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        Exception.__init__(self, f"{what} has been closed; it exports nothing more")


class ForkedError(ClosedError):
    """An object was used in a child process forked from the process that owns it.

    After ``os.fork()`` the child shares the parent's device memory (the host
    emulator's memory files are shared; a CUDA context cannot be used across
    a fork at all) but not its bookkeeping, so every vmmpool object refuses
    use in the child, and never releases memory there: not on ``close()``,
    not from a finalizer, not at exit. The parent's objects are unaffected.
    Create new objects (``Device.emulated()``, ``Device("host")``) in the child.

    Parameters
    ----------
    what : str
        The kind of object, for example ``"PagePool"``.
    owner_pid : int
        The process that owns it.
    pid : int
        The process that tried to use it (a child of `owner_pid`, or further down).

    Attributes
    ----------
    what, owner_pid, pid
        As given.
    """

    def __init__(self, what: str, owner_pid: int, pid: int) -> None:
        self.what = what
        self.owner_pid = int(owner_pid)
        self.pid = int(pid)
        Exception.__init__(
            self,
            f"{what} belongs to process {self.owner_pid}; this is process {self.pid}, forked "
            "from it: a forked child never uses or releases its parent's memory (create new "
            "objects in the child)",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what, self.owner_pid, self.pid))


class AsleepError(VmmError, RuntimeError):
    """An operation that needs physical memory was asked of a sleeping pool or buffer.

    Raised by :meth:`PagePool.malloc` (and ``acquire_pages``) while the pool is
    asleep, by a buffer's resize, read and write while it is asleep, and by a
    DLPack or array-interface export of asleep memory (then also a
    ``BufferError``). Call ``wake()`` first. Nothing changed.

    Parameters
    ----------
    what : str
        The object, for example ``"PagePool"``.
    operation : str
        What was asked, for example ``"malloc"``.
    """

    def __init__(self, what: str, operation: str) -> None:
        self.what = what
        self.operation = operation
        super().__init__(
            f"{what} is asleep (its pages were given back by sleep()): {operation} needs memory; "
            "call wake() first"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what, self.operation))


class ExportAsleepError(AsleepError, BufferError):
    """A DLPack export or array interface was asked of memory that is asleep.

    While a :class:`~vmmpool.GrowableBuffer` or a :class:`~vmmpool.PagePool`
    sleeps, its addresses are reserved but nothing is mapped there: an array
    made then would crash its process at the first touch (a segmentation fault
    on the host emulator, an illegal address on a GPU). So views export nothing
    new until ``wake()``; arrays exported before the sleep are not affected
    (they must not be touched until ``wake()``). Both an
    :class:`AsleepError` and the ``BufferError`` of the DLPack convention.
    """

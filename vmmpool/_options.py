"""Small string enums shared by every layer.

Each accepts its plain-string spelling (``"rw"``, ``"posix_fd"``) wherever the
enum is accepted; only the CUDA backend turns them into driver constants.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["Access", "HandleType", "check_int", "stream_key"]


class Access(str, enum.Enum):
    """Access a device has to a mapped range."""

    READWRITE = "rw"
    READ = "r"
    NONE = "none"

    @classmethod
    def parse(cls, value: Access | str) -> Access:
        """Return the member for `value` (a member or its string)."""
        if isinstance(value, Access):
            return value
        if not isinstance(value, str):
            raise TypeError(f"access must be 'rw', 'r' or 'none', got {type(value).__name__}")
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"access must be 'rw', 'r' or 'none', got {value!r}") from None


class HandleType(str, enum.Enum):
    """Shareable handle kind requested when physical memory is created."""

    NONE = "none"
    POSIX_FD = "posix_fd"

    @classmethod
    def parse(cls, value: HandleType | str) -> HandleType:
        """Return the member for `value` (a member or its string)."""
        if isinstance(value, HandleType):
            return value
        if not isinstance(value, str):
            raise TypeError(f"handle type must be 'none' or 'posix_fd', got {type(value).__name__}")
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"handle type must be 'none' or 'posix_fd', got {value!r}") from None


def check_int(name: str, value: object, *, minimum: int | None = 0, multiple: int = 1) -> int:
    """Validate an integer argument and return it as ``int``.

    Parameters
    ----------
    name : str
        The argument's name, used in the error message.
    value : object
        What the caller passed. ``bool`` is rejected; NumPy integers are accepted.
    minimum : int or None
        Smallest allowed value; ``None`` for no bound.
    multiple : int
        The value must be a multiple of this (for example the granularity).

    Raises
    ------
    TypeError
        If `value` is not an integer.
    ValueError
        If it is below `minimum` or not a multiple of `multiple`.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    n = value.__index__()
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    if multiple > 1 and n % multiple:
        raise ValueError(
            f"{name} must be a multiple of {multiple} bytes (the granularity), got {n} "
            f"(round up to {-(-n // multiple) * multiple})"
        )
    return int(n)


def stream_key(stream: object) -> int:
    """Normalize a stream to the integer key the pool files allocations under.

    Parameters
    ----------
    stream : None, int or stream object
        ``None`` is the default stream (key 0); an ``int`` is a ``CUstream``
        handle value; an object with ``__cuda_stream__()`` (returning
        ``(version, handle)``), ``.ptr`` (CuPy) or ``.cuda_stream`` (PyTorch)
        gives its handle.

    Returns
    -------
    int
        The handle value (``>= 0``).

    Raises
    ------
    TypeError
        For anything else (``bool`` included).
    ValueError
        For a negative handle.
    """
    if stream is None:
        return 0
    if type(stream) is int:
        if stream < 0:
            raise ValueError(f"stream handle must be >= 0, got {stream}")
        return stream
    if isinstance(stream, bool):
        raise TypeError("stream must be None, an int handle or a stream object, got bool")
    value: Any
    if hasattr(stream, "__index__"):
        value = stream
    elif hasattr(stream, "__cuda_stream__"):
        info = stream.__cuda_stream__()
        try:
            _version, value = info
        except (TypeError, ValueError):
            raise TypeError(
                f"__cuda_stream__() must return (version, handle), got {info!r}"
            ) from None
    elif hasattr(stream, "ptr"):
        value = stream.ptr
    elif hasattr(stream, "cuda_stream"):
        value = stream.cuda_stream
    else:
        raise TypeError(
            "stream must be None, an int handle, or an object with __cuda_stream__(), .ptr "
            f"or .cuda_stream, got {type(stream).__name__}"
        )
    try:
        key = int(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"stream handle must be an int, got {type(value).__name__} from {type(stream).__name__}"
        ) from None
    if key < 0:
        raise ValueError(f"stream handle must be >= 0, got {key}")
    return key

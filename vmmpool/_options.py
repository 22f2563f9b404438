"""Small string enums shared by every layer.

Each accepts its plain-string spelling (``"rw"``, ``"posix_fd"``) wherever the
enum is accepted; only the CUDA backend turns them into driver constants.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["Access", "HandleType", "ADDRESS_LIMIT", "address_limit", "check_int", "stream_key"]

#: The largest byte count or address any device can take (a 64-bit ``size_t``).
#: A backend may know a tighter bound (:func:`address_limit`).
ADDRESS_LIMIT = (1 << 64) - 1


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


def address_limit(device: object) -> int:
    """The largest size, offset or address `device` can take, in bytes (inclusive).

    Parameters
    ----------
    device : Device or backend
        A backend (its ``address_limit`` attribute is the exclusive bound
        ``Backend.address_limit``: values must lie below it), or anything with
        one under ``_backend`` (a :class:`~vmmpool.Device`).

    Returns
    -------
    int
        ``address_limit - 1``, capped at :data:`ADDRESS_LIMIT`; :data:`ADDRESS_LIMIT`
        when the device does not say.
    """
    backend = getattr(device, "_backend", device)
    lim = getattr(backend, "address_limit", None) if backend is not None else None
    if callable(lim):
        lim = lim()
    if isinstance(lim, int) and not isinstance(lim, bool) and lim > 1:
        return min(lim - 1, ADDRESS_LIMIT)
    return ADDRESS_LIMIT


def _bound(n: int) -> str:
    """``140737488355327 (2**47 - 1)``: a bound with its power-of-two form when it has one."""
    for k in range(1, 65):
        if n == 1 << k:
            return f"{n} (2**{k})"
        if n == (1 << k) - 1:
            return f"{n} (2**{k} - 1)"
    return str(n)


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = 0,
    maximum: int | None = ADDRESS_LIMIT,
    multiple: int = 1,
) -> int:
    """Validate an integer argument and return it as ``int``.

    Every public size, offset, alignment, address and limit goes through here,
    before anything changes.

    Parameters
    ----------
    name : str
        The argument's name, used in the error message.
    value : object
        What the caller passed. ``bool`` and ``float`` (even ``2.0 * MiB``) are
        rejected; Python and NumPy integers are accepted.
    minimum : int or None
        Smallest allowed value; ``None`` for no bound.
    maximum : int or None
        Largest allowed value; by default :data:`ADDRESS_LIMIT` (what a 64-bit
        device can address; pass :func:`address_limit` of the device for its
        own bound), ``None`` for no bound.
    multiple : int
        The value must be a multiple of this (for example the granularity).

    Raises
    ------
    TypeError
        If `value` is not an integer.
    ValueError
        If it is below `minimum`, above `maximum` or not a multiple of `multiple`.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        hint = " (floats are not accepted: pass an int)" if isinstance(value, float) else ""
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}){hint}")
    n = int(value.__index__())
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    if maximum is not None and n > maximum:
        raise ValueError(
            f"{name} must be <= {_bound(maximum)}, the largest the device can address, got {n}"
        )
    if multiple > 1 and n % multiple:
        raise ValueError(
            f"{name} must be a multiple of {multiple} bytes (the granularity), got {n} "
            f"(round up to {-(-n // multiple) * multiple})"
        )
    return n


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
        if not 0 <= stream <= ADDRESS_LIMIT:
            raise ValueError(f"stream handle must be >= 0 and fit 64 bits (a CUstream), got {stream}")
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
    if not 0 <= key <= ADDRESS_LIMIT:
        raise ValueError(f"stream handle must be >= 0 and fit 64 bits (a CUstream), got {key}")
    return key

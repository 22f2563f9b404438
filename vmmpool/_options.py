"""Small string enums shared by every layer.

Each accepts its plain-string spelling (``"rw"``, ``"posix_fd"``) wherever the
enum is accepted; only the CUDA backend turns them into driver constants.
"""

from __future__ import annotations

import enum
import itertools
import operator
import threading
import weakref
from typing import Any

__all__ = ["Access", "HandleType", "ADDRESS_LIMIT", "address_limit", "check_int", "stream_key"]

#: Most characters of a value that go into an error message (see :func:`brief`).
BRIEF_CHARS = 40

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
            raise ValueError(f"access must be 'rw', 'r' or 'none', got {brief(value)}") from None


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
            raise ValueError(f"handle type must be 'none' or 'posix_fd', got {brief(value)}") from None


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


def host_bytes(data: object) -> memoryview:
    """`data` (anything with the buffer protocol) as a flat byte view for a copy to the device.

    Strided input (a NumPy slice with a step, a Fortran-order array, a strided memoryview)
    is copied into C order first; what the buffer protocol cannot export is refused with a
    ``TypeError`` that names the type.
    """
    try:
        mv = memoryview(data)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:  # ValueError: NumPy's datetime64, for one
        raise TypeError(
            "data must be a bytes-like object (bytes, bytearray, a NumPy array, anything with "
            f"the buffer protocol), got {type(data).__name__} ({err})"
        ) from None
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())  # C order, as the source's own indexing reads it
    return mv.cast("B")


def check_iterable(name: str, value: object, what: str) -> list[Any]:
    """`value` (an iterable, not a str) as a list, or a ``TypeError`` that names the
    argument and what it holds (not "'int' object is not iterable")."""
    if not isinstance(value, (str, bytes)):
        try:
            return list(value)  # type: ignore[call-overload]
        except TypeError:
            pass
    raise TypeError(f"{name} must be an iterable of {what}, got {type(value).__name__}")


def brief(value: object, limit: int = BRIEF_CHARS) -> str:
    """A short, safe description of `value` for an error message (issue 17).

    Never the full ``repr()`` of what a caller or a file passed: a string or
    bytes shows at most `limit` characters and its length, an int beyond 64
    bits only its size in bits (Python refuses to print ints of more than 4300
    digits), a container only its type and length, any other object only its
    type (its ``__repr__`` is never called: it could be slow, huge or raise).

    Examples
    --------
    >>> brief("x" * 100)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (str of 100 characters)"
    >>> brief(1 << 100)
    'an int of 101 bits'
    >>> brief({i: i for i in range(300)})
    'a dict of 300 items'
    """
    t = type(value)
    if value is None or t is bool:
        return repr(value)
    if t is int:
        n = value.bit_length()  # type: ignore[attr-defined]
        return str(value) if n <= 64 else f"an int of {n} bits"
    if t is float:
        return repr(value)
    if t in (str, bytes, bytearray):
        n = len(value)  # type: ignore[arg-type]
        if n <= limit:
            return repr(value)
        unit = "characters" if t is str else "bytes"
        return f"{value[:limit]!r}... ({t.__name__} of {n} {unit})"  # type: ignore[index]
    if t in (dict, list, tuple, set, frozenset):
        n = len(value)  # type: ignore[arg-type]
        return f"a {t.__name__} of {n} item{'' if n == 1 else 's'}"
    if t.__module__ == "numpy" and getattr(value, "shape", None) == ():
        # A NumPy scalar (numpy.float64(4096.0)): its value is a Python number, safe to show.
        item = value.item()  # type: ignore[attr-defined]
        if type(item) in (int, float, bool):
            return f"{t.__name__}({brief(item, limit)})"
    return f"a {t.__name__}"


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
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({brief(value)}){hint}")
    try:
        n = int(value.__index__())
    except TypeError:
        # A NumPy array of ints (or numpy.bool) has __index__ but refuses it, with
        # NumPy's own message that names neither the argument nor what was expected.
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} ({brief(value)})"
        ) from None
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {brief(n)}")
    if maximum is not None and n > maximum:
        raise ValueError(
            f"{name} must be <= {_bound(maximum)}, the largest the device can address, "
            f"got {brief(n)}"
        )
    if multiple > 1 and n % multiple:
        raise ValueError(
            f"{name} must be a multiple of {multiple} bytes (the granularity), got {n} "
            f"(round up to {-(-n // multiple) * multiple})"
        )
    return n


def stream_key(stream: object) -> int:
    """Normalize a stream to the integer key the pool files allocations under.

    One rule for every form: the handle is an integer (an ``int`` or an object
    with ``__index__``, such as a NumPy integer), never a ``bool``, ``float``,
    ``str`` or ``bytes``, whether it is passed bare or comes from a stream
    object's protocol.

    Parameters
    ----------
    stream : None, int or stream object
        ``None`` is the default stream (key 0); an integer is a ``CUstream``
        handle value; an object with ``__cuda_stream__()`` (returning
        ``(version, handle)``), ``.ptr`` (CuPy) or ``.cuda_stream`` (PyTorch)
        gives its handle, which must be an integer too.

    Returns
    -------
    int
        The handle value (``>= 0``).

    Raises
    ------
    TypeError
        For anything else (``bool``, ``float``, ``str`` and ``bytes``
        included, bare or as a stream object's handle).
    ValueError
        For a negative handle, or one beyond 64 bits.
    """
    if stream is None:
        return 0
    if type(stream) is int:
        return _handle(stream, "")
    source = ""
    value: Any
    if _is_integer(stream):
        value = stream
    elif isinstance(stream, (bool, float, str, bytes, bytearray)):
        raise TypeError(
            "stream must be None, an int handle (a CUstream value) or a stream object, got "
            f"{type(stream).__name__} ({brief(stream)})"
        )
    elif hasattr(stream, "__cuda_stream__"):
        info = stream.__cuda_stream__()
        if not isinstance(info, (tuple, list)) or len(info) != 2:
            raise TypeError(
                f"__cuda_stream__() must return (version, handle), got {brief(info)} "
                f"from {type(stream).__name__}"
            )
        _version, value = info
        source = f" from {type(stream).__name__}.__cuda_stream__()"
    elif hasattr(stream, "ptr"):
        value = stream.ptr
        source = f" from {type(stream).__name__}.ptr"
    elif hasattr(stream, "cuda_stream"):
        value = stream.cuda_stream
        source = f" from {type(stream).__name__}.cuda_stream"
    else:
        raise TypeError(
            "stream must be None, an int handle, or an object with __cuda_stream__(), .ptr "
            f"or .cuda_stream, got {type(stream).__name__}"
        )
    if not _is_integer(value):
        raise TypeError(
            f"stream handle must be an int (a CUstream value), got {type(value).__name__} "
            f"({brief(value)}){source}"
        )
    return _handle(operator.index(value), source)


def _is_integer(value: object) -> bool:
    """An int or an object with ``__index__``, never a bool."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def _handle(key: int, source: str) -> int:
    if not 0 <= key <= ADDRESS_LIMIT:
        raise ValueError(
            f"stream handle must be >= 0 and fit 64 bits (a CUstream), got {brief(key)}{source}"
        )
    return key


#: ``CU_STREAM_LEGACY`` and ``CU_STREAM_PER_THREAD``: the special stream handles.
LEGACY = 1
PER_THREAD = 2
#: Pool keys of per-thread default streams start here (no 64-bit handle reaches it).
PER_THREAD_KEYS = 1 << 64
_thread_keys = itertools.count(PER_THREAD_KEYS)
_local = threading.local()


class _ThreadKey:
    """A thread's per-thread key, kept in its thread-local storage: dropped when the thread ends.

    Its stream is then gone for good (keys are never reused): the pools that filed it are told
    (``thread_exited(key)``, which must not block), so they retire it as :meth:`retire_stream`
    would. Nobody else can: ``retire_stream(2)`` names the caller's own stream.
    """

    __slots__ = ("key", "watchers")

    def __init__(self, key: int) -> None:
        self.key = key
        self.watchers: weakref.WeakSet[Any] = weakref.WeakSet()

    def __del__(self) -> None:
        for w in list(self.watchers):
            try:
                w.thread_exited(self.key)
            except Exception:  # noqa: BLE001 - a finalizer never raises
                pass


def pool_key(key: int) -> int:
    """The key a stream handle is filed under: the calling thread's own for handle 2."""
    if key != PER_THREAD:
        return key
    t: _ThreadKey | None = getattr(_local, "key", None)
    if t is None:
        t = _local.key = _ThreadKey(next(_thread_keys))
    return t.key


def watch_thread(key: int, watcher: Any) -> None:
    """Call ``watcher.thread_exited(key)`` when the thread of per-thread key `key` ends.

    Only from that thread (where :func:`pool_key` made the key); held weakly.
    """
    t: _ThreadKey | None = getattr(_local, "key", None)
    if t is not None and t.key == key:
        t.watchers.add(watcher)


def shown(key: int) -> int:
    """The handle a pool key stands for (2 for every per-thread key)."""
    return PER_THREAD if key >= PER_THREAD_KEYS else key


def event_handle(key: int) -> int:
    """Where events of the stream filed under `key` are recorded: the legacy default stream for
    the per-thread one (a thread cannot record on another thread's; see ``vmmpool._pool._streams``)."""
    return LEGACY if key >= PER_THREAD_KEYS or key == PER_THREAD else key

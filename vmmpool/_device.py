"""Devices: which backend a resource lives on.

``Device("cuda:0")`` / ``Device(0)`` select a CUDA device through the driver
backend; ``Device("host")`` selects the process-wide host emulator, and
:meth:`Device.emulated` makes a fresh, independent emulated device (its own
capacity and counters), which is what tests and notebooks use.
"""

from __future__ import annotations

import os
import threading
from typing import Union

from ._backends.base import Backend, BackendCounters
from ._backends.host import HostBackend
from ._options import address_limit, brief, check_int, host_bytes, stream_key

__all__ = ["Device", "DeviceLike", "devices", "default_device", "KDL_CPU", "KDL_CUDA"]

KDL_CPU = 1
KDL_CUDA = 2

DeviceLike = Union["Device", str, int, None]

# Re-entrant: building a backend allocates, so the garbage collector may run a finalizer
# there that asks for a Device (the nested call builds and publishes its own; the outer one
# then discards what it built: see _publish).
_lock = threading.RLock()
_cuda_devices: dict[int, Device] = {}
_host: Device | None = None


def _parse(spec: object) -> tuple[str, int]:
    if isinstance(spec, bool):
        raise TypeError(f"device must be 'host', 'cuda', 'cuda:N', an int or a Device, got {brief(spec)}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"device ordinal must be >= 0, got {spec}")
        return ("cuda", spec)
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "host":
            return ("host", 0)
        if s == "cuda":
            return ("cuda", 0)
        digits = s[5:] if s.startswith("cuda:") else s
        # ASCII digits only: str.isdigit() is also true for "²" or "٣".
        if digits and digits.isascii() and digits.isdigit():
            return ("cuda", int(digits))
        raise ValueError(
            f"device must be 'host', 'cuda' or 'cuda:N' with N in ASCII digits, got {brief(spec)}"
        )
    raise TypeError(
        f"device must be 'host', 'cuda', 'cuda:N', an int or a Device, got {type(spec).__name__}"
    )


class Device:
    """A device that VMM resources live on.

    Parameters
    ----------
    spec : Device, str, int or None
        ``"cuda:N"``, ``"cuda"`` (= ``"cuda:0"``), an ordinal ``N``, ``"host"``
        (the process-wide host emulator), a :class:`Device` (returned as is),
        or ``None`` for :func:`default_device`.

    Raises
    ------
    DeviceUnavailableError
        A CUDA device was asked for where there is no driver, no such GPU or
        no VMM support. The message says how to use the host device instead.

    Notes
    -----
    Devices are singletons per spec: ``Device("cuda:0") is Device(0)``. Each
    wraps one backend, which counts its live resources and calls (see
    :meth:`counters`).
    """

    _backend: Backend
    kind: str
    ordinal: int

    def __new__(cls, spec: DeviceLike = None) -> Device:
        if isinstance(spec, Device):
            return spec
        if spec is None:
            return default_device()
        kind, ordinal = _parse(spec)
        if kind == "host":
            return _host_device()
        with _lock:
            dev = _cuda_devices.get(ordinal)
            if dev is None:
                from ._backends import cuda as _cuda

                backend = _cuda.CudaBackend(ordinal)
                dev = _cuda_devices.get(ordinal)  # a finalizer in the constructor may have made it
                if dev is None:
                    dev = _cuda_devices[ordinal] = cls._from_backend(backend)
                else:
                    _discard(backend)
            return dev

    @classmethod
    def _from_backend(cls, backend: Backend) -> Device:
        self = object.__new__(cls)
        self._backend = backend
        self.kind = backend.info.kind
        self.ordinal = backend.info.ordinal
        return self

    @classmethod
    def emulated(
        cls,
        capacity: int | None = None,
        *,
        granularity: int = 2 << 20,
        recommended_granularity: int | None = None,
        name: str = "host emulator (Linux virtual memory)",
    ) -> Device:
        """Create a fresh, independent host-emulated device.

        Parameters
        ----------
        capacity : int, optional
            Physical bytes the device has (out-of-memory beyond it). Default:
            a quarter of the machine's RAM, at most 8 GiB.
        granularity : int
            Minimum mapping granularity in bytes (default 2 MiB, like current GPUs).
        recommended_granularity : int, optional
            Recommended granularity; defaults to `granularity`.
        name : str
            Name reported by :attr:`name`.

        Returns
        -------
        Device
            A device with its own memory, capacity and counters, unrelated to
            ``Device("host")``.

        Raises
        ------
        TypeError
            A size that is not an int (``bool`` and ``float`` included), or a
            `name` that is not a ``str``.
        ValueError
            A granularity that is not a power of two, a recommended granularity
            that is not a multiple of it, or a capacity that is not.
        """
        granularity = check_int("granularity", granularity, minimum=1)
        if granularity & (granularity - 1):
            raise ValueError(f"granularity must be a power of two, got {granularity}")
        if recommended_granularity is not None:
            recommended_granularity = check_int(
                "recommended_granularity", recommended_granularity, minimum=1, multiple=granularity
            )
        if capacity is not None:
            capacity = check_int(
                "capacity", capacity, multiple=granularity, maximum=address_limit(HostBackend)
            )
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__} ({brief(name)})")
        return cls._from_backend(
            HostBackend(capacity, granularity, recommended_granularity, name=name)
        )

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close an emulated device: give back its memory files (idempotent).

        An emulated device keeps memory files (memfds) open for its memory; a
        device dropped without ``close()`` closes them when it is garbage
        collected. After ``close()``, new reservations and allocations on it
        raise :class:`~vmmpool.ClosedError`; memory still allocated stays
        usable, and its file is closed as soon as it is released.

        Raises
        ------
        ValueError
            On ``Device("host")`` or a CUDA device: those are shared by the
            whole process and live as long as it does.
        """
        if not self.is_host or self is _host:
            raise ValueError(
                f"only a device made by Device.emulated() can be closed, not {self!r} "
                "(shared by the whole process)"
            )
        self._backend.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (an emulated device only)."""
        return bool(getattr(self._backend, "closed", False))

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.is_host and self is not _host:
            self.close()

    # --------------------------------------------------------------- facts
    @property
    def is_host(self) -> bool:
        """True for the host emulator."""
        return self.kind == "host"

    @property
    def name(self) -> str:
        """The device's name (the GPU's name, or the emulator's)."""
        return self._backend.info.name

    @property
    def granularity(self) -> int:
        """Minimum granularity in bytes: sizes and offsets are multiples of it."""
        return self._backend.info.granularity

    @property
    def recommended_granularity(self) -> int:
        """Granularity the driver recommends for performance, in bytes."""
        return self._backend.info.recommended_granularity

    @property
    def total_memory(self) -> int:
        """Total physical memory in bytes (a driver call)."""
        return self._backend.mem_info()[1]

    @property
    def free_memory(self) -> int:
        """Free physical memory in bytes (a driver call)."""
        return self._backend.mem_info()[0]

    @property
    def supports_vmm(self) -> bool:
        """Whether the device supports virtual memory management."""
        return self._backend.info.supports_vmm

    @property
    def supports_posix_fd(self) -> bool:
        """Whether physical memory can be exported as a POSIX file descriptor."""
        return self._backend.info.supports_posix_fd

    @property
    def dlpack_device(self) -> tuple[int, int]:
        """``(device_type, device_id)`` as DLPack spells it: (2, N) for CUDA, (1, 0) for host."""
        return (KDL_CPU, 0) if self.is_host else (KDL_CUDA, self.ordinal)

    @property
    def address_limit(self) -> int:
        """The largest size, offset or address this device can take, in bytes.

        Every public size, offset, alignment and limit is checked against it
        before anything changes.
        """
        return address_limit(self._backend)

    def round_up(self, nbytes: int) -> int:
        """Round `nbytes` up to a multiple of :attr:`granularity`."""
        g = self.granularity
        limit = self.address_limit
        n = check_int("nbytes", nbytes, maximum=limit - limit % g)
        return -(-n // g) * g

    def counters(self) -> BackendCounters:
        """Snapshot of the backend's live resources and calls per operation."""
        return self._backend.counters()

    def synchronize(self, stream: object = None) -> None:
        """Wait for `stream`, or for all work on this device with ``None``.

        Parameters
        ----------
        stream : None, int or stream object
            ``None`` for the whole device; otherwise what :func:`stream_key`
            accepts (a ``CUstream`` handle as an int >= 0, or an object with
            ``__cuda_stream__()``, ``.ptr`` or ``.cuda_stream``).

        Raises
        ------
        TypeError, ValueError
            Anything else (a string, a bool, a negative handle).
        """
        self._backend.synchronize(None if stream is None else stream_key(stream))

    def write(self, address: int, data: object) -> None:
        """Copy host bytes to device memory (synchronous; for tests, demos and debugging).

        Parameters
        ----------
        address : int
            Destination; must be mapped with write access.
        data : bytes-like
            Anything exposing the buffer protocol (bytes, bytearray, a NumPy array);
            strided input is copied in C order.
        """
        self._backend.check_process("Device")
        mv = host_bytes(data)
        if mv.nbytes:
            addr = check_int("address", address, minimum=1, maximum=self.address_limit)
            self._backend.check_transfer(addr, mv.nbytes, write=True)
            self._backend.write(addr, mv)

    def read(self, address: int, nbytes: int) -> bytearray:
        """Copy `nbytes` of device memory at `address` to a new ``bytearray`` (synchronous).

        The range is checked against what the device can address (and, on the
        host emulator, against its mappings) before the buffer is allocated.

        Raises
        ------
        ValueError
            If ``[address, address + nbytes)`` lies beyond the device's
            addressable range.
        DriverError
            ``CUDA_ERROR_INVALID_VALUE`` if the host emulator finds the range
            unmapped or without read access.
        """
        self._backend.check_process("Device")
        n = check_int("nbytes", nbytes)
        if not n:
            return bytearray()
        addr = check_int("address", address, minimum=1, maximum=self.address_limit)
        self._backend.check_transfer(addr, n, write=False)
        out = bytearray(n)
        self._backend.read(addr, memoryview(out))
        return out

    def __repr__(self) -> str:
        if self.is_host:
            tag = "" if self is _host else f", emulated at {id(self):#x}"
            return f"Device('host'{tag})"
        return f"Device('cuda:{self.ordinal}')"

    def __str__(self) -> str:
        return "host" if self.is_host else f"cuda:{self.ordinal}"

    def __copy__(self) -> Device:
        return self  # a device is an identity: its copy is itself

    def __deepcopy__(self, memo: object) -> Device:
        return self

    def __reduce__(self) -> tuple[object, ...]:
        if self.is_host and self is not _host:
            raise TypeError("an emulated Device cannot be pickled (its memory is process-local)")
        return (Device, (str(self),))


def _discard(backend: Backend) -> None:
    """Close a backend built for a device that a nested call (a finalizer) made meanwhile."""
    try:
        backend.close()
    except Exception:  # noqa: BLE001 - nothing was made on it; the device in use is the other
        pass


def _host_device() -> Device:
    global _host
    with _lock:
        if _host is None:
            backend = HostBackend()
            if _host is None:  # (a finalizer in the constructor may have made it)
                _host = Device._from_backend(backend)
            else:
                _discard(backend)
        return _host


def devices() -> list[Device]:
    """List the usable devices: every CUDA device first, then the host emulator.

    Returns
    -------
    list of Device
        CUDA devices (none where there is no driver or GPU) followed by
        ``Device("host")``.
    """
    from ._backends import cuda as _cuda

    out = [Device(i) for i in range(_cuda.device_count()) if _cuda.probe(i) is None]
    out.append(_host_device())
    return out


_default: Device | None = None


def default_device() -> Device:
    """``Device("cuda:0")`` where a usable GPU is present, else ``Device("host")``.

    Decided once per process.
    """
    global _default
    if _default is None:
        from ._backends import cuda as _cuda

        _default = Device(0) if _cuda.probe(0) is None else _host_device()
    return _default


def _forget_devices_in_child() -> None:
    """After ``os.fork()``, in the child: the process-wide devices are the parent's.

    Their backends refuse use in the child (``ForkedError``); forgetting them here
    lets ``Device("host")``, ``Device(0)`` and :func:`default_device` make the
    child's own. The module lock is replaced: a parent thread may have held it.
    """
    global _host, _default, _lock
    _lock = threading.RLock()
    _host = None
    _default = None
    _cuda_devices.clear()


os.register_at_fork(after_in_child=_forget_devices_in_child)

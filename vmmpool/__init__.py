"""vmmpool: CUDA virtual memory management from Python.

Reserve virtual address ranges, create physical memory, map it where you
want it, and let a page pool stitch scattered free pages into contiguous
ranges so that allocations fail only when memory is really gone. Every piece
runs on a GPU through the CUDA driver, and on any Linux machine through the
host emulator (``Device("host")``).
"""

from __future__ import annotations

import logging

from ._backends.base import BackendCounters
from ._buffer import GrowableBuffer
from ._device import Device, default_device, devices
from ._dlpack import ArrayView
from ._errors import (
    AsleepError,
    ClosedError,
    DeviceUnavailableError,
    DriverError,
    ExportAsleepError,
    ExportClosedError,
    ForkedError,
    OutOfMemoryError,
    VmmError,
    VmmWarning,
)
from ._options import Access, HandleType, stream_key
from ._pool import Allocation, AllocationInfo, PageInfo, PagePool, PoolStats
from ._resources import AddressReservation, Mapping, PhysicalAllocation, create, reserve
from ._share import SharedMapping, SharedMemoryHandle
from ._staging import SleepStats

__version__ = "0.1.0"

logging.getLogger("vmmpool").addHandler(logging.NullHandler())

__all__ = [
    "Access",
    "AddressReservation",
    "Allocation",
    "AllocationInfo",
    "ArrayView",
    "AsleepError",
    "BackendCounters",
    "ClosedError",
    "Device",
    "DeviceUnavailableError",
    "DriverError",
    "ExportAsleepError",
    "ExportClosedError",
    "ForkedError",
    "GrowableBuffer",
    "HandleType",
    "Mapping",
    "OutOfMemoryError",
    "PageInfo",
    "PagePool",
    "PhysicalAllocation",
    "PoolStats",
    "SharedMapping",
    "SharedMemoryHandle",
    "SleepStats",
    "VmmError",
    "VmmWarning",
    "__version__",
    "create",
    "default_device",
    "devices",
    "reserve",
    "stream_key",
]

#: Subpackages with a public API of their own (imported on demand: ``import vmmpool.replay``).
_SUBPACKAGES = ("cupy", "plot", "replay", "torch")


def __dir__() -> list[str]:
    """The public names only (issue 21): ``__all__`` and the public subpackages imported so far."""
    return sorted({*__all__, *(m for m in _SUBPACKAGES if m in globals())})


# Names this module used but does not offer.
del annotations, logging

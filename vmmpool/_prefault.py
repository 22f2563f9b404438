"""Commit fresh host pages in one system call before a large copy writes them.

A copy into memory nobody has touched yet (a new backup array, pages of a
memfd whose hole was punched) takes a page fault per page it writes, and on a
virtual machine each fault is dear. ``madvise(MADV_POPULATE_WRITE)`` (Linux
5.14+) commits the whole range in one call, the same pages the copy would have
committed, in a fraction of the time; the copy then runs at memory speed.

It is only advice: where the kernel lacks it, or the range cannot be committed
now, the call does nothing and the copy faults its pages in as before (it
changes no byte, and never decides whether the copy succeeds).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["populate_write", "discard", "MADV_POPULATE_WRITE"]

#: ``madvise`` advice: fault the range in, writable (Linux 5.14+, ``<linux/mman.h>``).
MADV_POPULATE_WRITE = 23
#: ``madvise`` advice: give the pages of private memory back (they read as zeros after).
MADV_DONTNEED = 4
#: ``madvise`` advice: punch the range out of a shared memory file (it reads as zeros after).
MADV_REMOVE = 9

_madvise = None
if sys.platform.startswith("linux"):  # pragma: no branch - the emulator is Linux only
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.restype = ctypes.c_int
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise
        _madvise = None

_PAGE = 4096
_supported = _madvise is not None


def populate_write(address: int, nbytes: int) -> bool:
    """Commit the pages of ``[address, address + nbytes)`` for writing, if the kernel can.

    The range is widened to whole pages (``madvise`` wants a page-aligned
    start). Returns True when the kernel committed the range, False when it
    did nothing (no support, or it refused: the later copy faults instead).
    """
    global _supported
    if not _supported or nbytes <= 0:
        return False
    start = address & ~(_PAGE - 1)
    assert _madvise is not None
    if _madvise(start, address + nbytes - start, MADV_POPULATE_WRITE) == 0:
        return True
    if ctypes.get_errno() == 22:  # EINVAL: a kernel older than 5.14; stop asking
        _supported = False
    return False


def discard(address: int, nbytes: int) -> bool:
    """Give the pages of ``[address, address + nbytes)`` back to the OS; the mapping stays.

    The range must be whole pages of a shared memory file's mapping (a hole
    is punched, ``MADV_REMOVE``) or of private anonymous memory
    (``MADV_DONTNEED``). Its bytes are gone: it reads as zeros after. Returns
    False where the kernel refused (the memory then stays until the mapping
    is dropped).
    """
    if _madvise is None or nbytes <= 0:
        return False
    if address % _PAGE or nbytes % _PAGE:
        raise ValueError(f"discard needs whole pages, got [{address:#x}, +{nbytes})")
    if _madvise(address, nbytes, MADV_REMOVE) == 0:
        return True
    return bool(_madvise(address, nbytes, MADV_DONTNEED) == 0)

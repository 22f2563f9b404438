"""Fresh host pages committed in one call before large copies (sleep / wake speed, issue 18)."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

import vmmpool
from vmmpool import GrowableBuffer, _prefault
from vmmpool import _staging as staging_module
from vmmpool._backends import host as host_backend
from vmmpool._prefault import discard, populate_write
from vmmpool._staging import Staging, host_array

P = 2 << 20
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident(address: int, nbytes: int) -> int:
    """Pages of ``[address, address + nbytes)`` in memory now (mincore)."""
    n = -(-nbytes // PAGE)
    vec = (ctypes.c_ubyte * n)()
    assert _libc.mincore(address, n * PAGE, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


def _kernel_populates() -> bool:
    mm = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    ok = populate_write(addr, PAGE)
    del addr
    mm.close()
    return ok


needs_populate = pytest.mark.skipif(
    not _kernel_populates(), reason="the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)"
)


@needs_populate
def test_populate_write_commits_fresh_anonymous_and_memfd_pages_and_keeps_their_bytes() -> None:
    mm = mmap.mmap(-1, 64 * PAGE)
    arr = np.frombuffer(mm, np.uint8)
    addr = arr.ctypes.data
    assert resident(addr, 64 * PAGE) == 0
    assert populate_write(addr + 100, 10 * PAGE)  # an unaligned start is widened to its page
    assert resident(addr, 64 * PAGE) == 11 and not arr.any()
    del arr
    mm.close()
    fd = os.memfd_create("prefault-test")
    try:
        os.ftruncate(fd, 16 * PAGE)
        os.pwrite(fd, b"kept", 3 * PAGE)
        mm = mmap.mmap(fd, 16 * PAGE)
        arr = np.frombuffer(mm, np.uint8)
        assert populate_write(arr.ctypes.data, 16 * PAGE)
        assert resident(arr.ctypes.data, 16 * PAGE) == 16
        assert arr[3 * PAGE: 3 * PAGE + 4].tobytes() == b"kept" and arr[: 3 * PAGE].sum() == 0
        del arr
        mm.close()
    finally:
        os.close(fd)
    assert not populate_write(addr, 0)


def test_populate_write_is_only_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without it (EINVAL) is asked once; the copy then faults its pages in as before."""
    calls = []

    def madvise(address: int, nbytes: int, advice: int) -> int:
        calls.append(advice)
        ctypes.set_errno(22)
        return -1

    monkeypatch.setattr(_prefault, "_madvise", madvise)
    monkeypatch.setattr(_prefault, "_supported", True)
    mm = mmap.mmap(-1, 4 * PAGE)
    arr = np.frombuffer(mm, np.uint8)
    assert not populate_write(arr.ctypes.data, 4 * PAGE)
    assert not populate_write(arr.ctypes.data, 4 * PAGE)
    assert calls == [_prefault.MADV_POPULATE_WRITE]
    arr[:] = 7  # the memory is as usable as ever
    assert arr.sum() == 7 * 4 * PAGE
    del arr
    mm.close()


@needs_populate
def test_save_commits_each_piece_of_a_fresh_backup_before_it_waits_for_the_piece(
    host: vmmpool.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the commit overlaps the DMA in flight; the drain is then a plain memcpy."""
    b = host._backend
    order: list[tuple[str, int, int]] = []
    real_wait = b.event_wait

    def spy(address: int, nbytes: int) -> bool:
        order.append(("populate", address, nbytes))
        return populate_write(address, nbytes)

    def wait(event: int) -> None:
        order.append(("wait", 0, 0))
        real_wait(event)

    monkeypatch.setattr(staging_module, "populate_write", spy)
    monkeypatch.setattr(b, "event_wait", wait)
    with GrowableBuffer(max_size=4 * P, device=host, initial_size=3 * P) as buf:
        data = np.random.default_rng(1).integers(0, 256, 3 * P, dtype=np.uint8)
        buf.write(data.tobytes())
        out = host_array(3 * P)
        assert resident(out.ctypes.data, 3 * P) == 0  # committed by save, not before
        st = Staging(b, chunk=P)
        st.save([(buf.ptr, 3 * P, 0)], out, 0)
        st.close()
        base = out.ctypes.data
        assert order == [
            step for i in (0, 1, 2) for step in (("populate", base + i * P, P), ("wait", 0, 0))
        ]
        assert resident(base, 3 * P) == 3 * P // PAGE
        assert np.array_equal(out, data)
    assert host_array(0).nbytes == 0


@needs_populate
def test_host_emulator_pinned_memory_is_resident_and_restores_commit_their_pages_in_one_call(
    host: vmmpool.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = host._backend
    h = b.host_alloc(16 * PAGE)
    try:
        assert resident(h, 16 * PAGE) == 16  # page-locked memory is resident, as on CUDA
    finally:
        b.host_free(h)
    asked: list[tuple[int, int]] = []

    def spy(address: int, nbytes: int) -> bool:
        asked.append((address, nbytes))
        return populate_write(address, nbytes)

    monkeypatch.setattr(host_backend, "populate_write", spy)
    with GrowableBuffer(max_size=4 * P, device=host, initial_size=2 * P) as buf:
        assert resident(buf.ptr, 2 * P) == 0  # fresh memfd pages: committed on first touch
        src = np.arange(2 * P, dtype=np.uint64).astype(np.uint8)
        st = Staging(b, chunk=P // 2)
        st.load([(buf.ptr, 2 * P, 0)], src, 0)
        st.close()
        assert asked == [(buf.ptr + i * (P // 2), P // 2) for i in range(4)]
        assert resident(buf.ptr, 2 * P) == 2 * P // PAGE
        assert bytes(buf.read(2 * P)) == src.tobytes()


def test_discard_gives_back_whole_pages_of_a_backup_and_keeps_the_rest() -> None:
    arr = host_array(4 * P)
    arr[:] = 9
    addr = arr.ctypes.data
    assert resident(addr, 4 * P) == 4 * P // PAGE
    assert discard(addr + P, 2 * P)  # a hole in the backup's memory file
    assert resident(addr, 4 * P) == 2 * P // PAGE
    assert not arr[P: 3 * P].any() and (arr[:P] == 9).all() and (arr[3 * P:] == 9).all()
    anon = np.frombuffer(mmap.mmap(-1, 4 * PAGE), np.uint8)
    anon[:] = 1
    assert discard(anon.ctypes.data, 2 * PAGE)  # private memory: MADV_DONTNEED
    assert anon.sum() == 2 * PAGE
    with pytest.raises(ValueError, match="whole pages"):
        discard(addr + 1, PAGE)
    assert not discard(addr, 0)

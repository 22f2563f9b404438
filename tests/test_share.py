"""Sharing memory with another process: handles, mappings, leases, fds and live counts.

In-process tests open a handle in the process that made it (the same memory at
a second address), which runs on every backend (the ``device`` fixture: host,
CUDA, and the real cuda.bindings on the stand-in driver). Cross-process tests
run a worker (``_share_worker.py``) per multiprocessing context (spawn,
forkserver) and channel (``Queue``, ``Pipe``), shared by the module's tests;
the exit-order tests start short-lived processes of their own.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing as mp
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from _share_worker import fd_count, receive_and_exit, serve
from conftest import StandinDriver
from fake_cuda_driver import FakeDriver, R

import vmmpool
from vmmpool import ClosedError, GrowableBuffer, PagePool, SharedMapping, SharedMemoryHandle
from vmmpool._backends import cuda as _cuda
from vmmpool._backends.cuda import CudaBackend

MiB = 1 << 20
TIMEOUT = 60


def _pattern(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _settle(expected: int, what: Callable[[], int], timeout: float = 5.0) -> int:
    """`what()` once it equals `expected`, or its last value after `timeout` seconds.

    The sender's multiprocessing resource sharer closes its copy of a descriptor
    just after the receiver has it: a moment later than the receiver's answer.
    """
    deadline = time.monotonic() + timeout
    got = what()
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        got = what()
    return got


# ------------------------------------------------------------------ in process
def test_buffer_share_opens_the_same_memory(device: vmmpool.Device) -> None:
    g = device.granularity
    data = _pattern(g + 100)
    with GrowableBuffer(max_size=8 * g, device=device, initial_size=g + 100, shareable=True) as buf:
        assert buf.shareable
        buf.write(data)
        with buf.share() as h:
            assert (h.nbytes, h.offset, h.page_size, h.n_pages) == (g + 100, 0, g, 2)
            assert (h.device_kind, h.source) == (device.kind, "GrowableBuffer")
            with h.open(device) as m:
                assert isinstance(m, SharedMapping)
                assert m.address != buf.address and m.nbytes == g + 100
                assert m.read() == data
                m.write(b"receiver", g - 4)  # across the page boundary
                assert buf.read(8, g - 4) == b"receiver"
                buf.write(b"owner", 7)
                assert m.read(5, 7) == b"owner"
        live = device.counters().live
    assert m.closed and h.closed
    assert live[2] == 2, "the buffer's two mappings remain after the receiver closed"


def test_pickled_handle_opens_in_process(device: vmmpool.Device) -> None:
    g = device.granularity
    with GrowableBuffer(max_size=4 * g, device=device, initial_size=g, shareable=True) as buf:
        buf.write(b"pickled")
        h = buf.share()
        h2 = pickle.loads(pickle.dumps(h))  # through multiprocessing.reduction (SCM_RIGHTS)
        assert isinstance(h2, SharedMemoryHandle) and h2.nbytes == g
        assert not set(h2._fds) & set(h._fds)
        h.close()
        with h2, h2.open(device) as m:
            assert m.read(7) == b"pickled"


def test_pool_allocation_share_on_every_backend(device: vmmpool.Device) -> None:
    g = device.granularity
    with PagePool(device, shareable=True) as pool:
        assert pool.shareable
        a = pool.malloc(1000)
        b = pool.malloc(g)  # starts 1024 bytes into the first page, ends in the second
        device.write(b.ptr, _pattern(g, 2))
        h = b.share()
        assert (h.n_pages, h.offset, h.nbytes, h.source) == (2, b.ptr % g, g, "Allocation")
        with h, h.open(device) as m:
            assert m.read() == _pattern(g, 2)
            m.write(b"\xff" * g)
            assert device.read(b.ptr, g) == b"\xff" * g
        a.free()
        b.free()
        assert pool.stats().live_allocations == 0  # the receiver was done: given back at once


def test_open_twice_and_views(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=8 * MiB, device=host, initial_size=3 * MiB, shareable=True) as buf:
        h = buf.share()
        m1, m2 = h.open(host), h.open(host)
        h.close()  # mappings outlive the handle
        assert m1.address != m2.address
        a1 = np.from_dlpack(m1.view("float32"))
        a2 = np.from_dlpack(m2.view("float32"))
        a1[:] = np.arange(a1.size, dtype=np.float32)
        assert np.array_equal(a2, a1)
        assert np.array_equal(np.from_dlpack(buf.view("float32")), a1)
        with pytest.raises(BufferError, match="view"):
            m1.close()
        del a1, a2
        m1.close()
        m2.close()
        m1.close()  # idempotent


def test_buffer_growth_after_share_is_not_seen(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=16 * MiB, device=host, initial_size=MiB, shareable=True) as buf:
        h = buf.share()
        buf.resize(6 * MiB)
        buf.write(b"late", 5 * MiB)
        assert h.nbytes == MiB
        with h, h.open(host) as m:
            assert m.nbytes == MiB
            with pytest.raises(ValueError, match="inside the shared 1048576 bytes"):
                m.read(4, 5 * MiB)
            with pytest.raises(ValueError, match="inside the shared"):
                m.write(b"xx", MiB - 1)
        with buf.share() as h2:  # sharing again covers the new size
            assert h2.nbytes == 6 * MiB and h2.n_pages == 3
            with h2.open(host) as m2:
                assert m2.read(4, 5 * MiB) == b"late"


def test_share_errors(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=4 * MiB, device=host, initial_size=MiB) as plain:
        assert not plain.shareable
        with pytest.raises(ValueError, match=r"shareable=True"):
            plain.share()
    with PagePool(host) as pool:
        a = pool.malloc(10)
        with pytest.raises(ValueError, match=r"PagePool\(\.\.\., shareable=True\)"):
            a.share()
        with pytest.raises(ValueError, match="shareable pool"):
            GrowableBuffer(max_size=4 * MiB, pool=pool, shareable=True)
    with pytest.raises(TypeError, match="shareable must be a bool"):
        PagePool(host, shareable=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shareable must be a bool"):
        GrowableBuffer(max_size=4 * MiB, device=host, shareable="yes")  # type: ignore[arg-type]
    with GrowableBuffer(max_size=4 * MiB, device=host, shareable=True) as empty:
        with pytest.raises(ValueError, match="size 0"):
            empty.share()
        empty.resize(10)
        h = empty.share()
        with pytest.raises(TypeError, match="cannot be copied"):
            copy.copy(h)
        with pytest.raises(TypeError, match="cannot be copied"):
            copy.deepcopy(h)
        m = h.open(host)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(m)
        with pytest.raises(TypeError, match="cannot be copied"):
            copy.copy(m)
        h.close()
        h.close()  # idempotent
        with pytest.raises(ClosedError):
            h.open(host)
        with pytest.raises(ClosedError):
            pickle.dumps(h)
        with pytest.raises(ClosedError):
            with h:
                pass
        m.close()
        with pytest.raises(ClosedError):
            m.read()
        with pytest.raises(ClosedError):
            m.view()
    with PagePool(host, shareable=True) as spool:
        b = spool.malloc(100)
        b.free()
        with pytest.raises(ValueError, match="was freed"):
            b.share()
    with pytest.raises(ClosedError):
        b.share()  # the pool is closed


def test_handle_of_another_granularity_is_refused(host: vmmpool.Device) -> None:
    small = vmmpool.Device.emulated(capacity=8 * MiB, granularity=64 << 10)
    with GrowableBuffer(max_size=MiB, device=small, initial_size=64 << 10, shareable=True) as buf:
        with buf.share() as h:
            with pytest.raises(ValueError, match=r"not a multiple of .* granularity"):
                h.open(host)


def test_freed_while_shared_is_never_reused(host: vmmpool.Device) -> None:
    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(1000)
        b = pool.malloc(5000)
        c = pool.malloc(1000)
        host.write(a.ptr, b"a" * 1000)
        host.write(b.ptr, _pattern(5000))
        host.write(c.ptr, b"c" * 1000)
        h = b.share()
        m = h.open(host)
        h.close()
        b.free()
        assert b.freed
        with pytest.raises(ValueError, match="already freed"):
            b.free()
        st = pool.stats()
        assert (st.live_allocations, st.requested_bytes) == (3, 7000), "b's bytes stay in use"
        lo, hi = b.ptr, b.ptr + 5000
        news = [pool.malloc(5000) for _ in range(8)]
        assert all(n.ptr + 5000 <= lo or n.ptr >= hi for n in news)
        for n in news:
            host.write(n.ptr, b"n" * 5000)
        assert m.read() == _pattern(5000)
        m.write(b"\x00" * 5000)  # the receiver's whole range: neighbours unchanged
        assert host.read(a.ptr, 1000) == b"a" * 1000 and host.read(c.ptr, 1000) == b"c" * 1000
        pool._check()
        m.close()
        st = pool.stats()  # the lease is done: b is given back here
        assert (st.live_allocations, st.requested_bytes) == (10, 2000 + 8 * 5000)
        pool._check()


def test_free_racing_share_never_frees_the_shared_bytes(
    host: vmmpool.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # free() in another thread while share() is between its check of the
    # allocation and the registration of its lease: free() found no lease and
    # freed the block, so the receiver's bytes went to the next malloc. Made
    # deterministic: free() starts inside the export and waits for the lock.
    import threading

    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(1000)
        keep = pool.malloc(1000)
        make = SharedMemoryHandle._make.__func__  # type: ignore[attr-defined]
        threads: list[threading.Thread] = []

        def racing_make(cls: type, *args: Any, **kwargs: Any) -> Any:
            t = threading.Thread(target=a.free)
            t.start()
            threads.append(t)
            time.sleep(0.3)  # free() has started and waits for the pool's lock
            return make(cls, *args, **kwargs)

        monkeypatch.setattr(SharedMemoryHandle, "_make", classmethod(racing_make))
        h = a.share()
        monkeypatch.undo()
        threads[0].join(10)
        assert a.freed
        with h.open(host) as m:
            m.write(_pattern(1000))
            st = pool.stats()
            assert (st.live_allocations, st.requested_bytes) == (2, 2000), "the shared bytes were freed"
            news = [pool.malloc(1000) for _ in range(4)]
            assert all(n.ptr + 1000 <= a.ptr or n.ptr >= a.ptr + 1000 for n in news)
            for n in news:
                host.write(n.ptr, b"n" * 1000)
            assert m.read() == _pattern(1000)
        h.close()
        assert pool.stats().requested_bytes == 1000 + 4 * 1000  # given back once the receiver is done
        keep.free()
        pool._check()


def test_dropped_while_shared_is_kept_until_the_receiver_is_done(host: vmmpool.Device) -> None:
    with PagePool(host, shareable=True) as pool:
        b = pool.malloc(3 * MiB)
        host.write(b.ptr, b"kept")
        m = b.share().open(host)  # the handle is garbage at once: the mapping holds the lease
        del b
        gc.collect()
        assert pool.stats().live_allocations == 1
        c = pool.malloc(3 * MiB)
        assert c.ptr != m.address
        assert m.read(4) == b"kept"
        m.close()
        gc.collect()
        assert pool.stats().live_allocations == 1  # only c
        c.free()


def test_freed_while_shared_comes_back_when_malloc_would_fail(host: vmmpool.Device) -> None:
    with PagePool(host, limit=8 * MiB, shareable=True) as pool:
        b = pool.malloc(6 * MiB)
        with b.share() as h:
            m = h.open(host)
        b.free()
        with pytest.raises(vmmpool.OutOfMemoryError):
            pool.malloc(6 * MiB)  # still leased: the bytes are not reusable
        m.close()
        c = pool.malloc(6 * MiB)  # the out-of-memory path looks at the leases first
        c.free()


def test_pool_close_while_shared_keeps_the_receivers_memory(host: vmmpool.Device) -> None:
    pool = PagePool(host, shareable=True)
    a = pool.malloc(3 * MiB)
    host.write(a.ptr + MiB, b"survives")
    h = a.share()
    m = h.open(host)
    pool.close()
    assert m.read(8, MiB) == b"survives"
    m.write(b"still writable", 0)
    assert m.read(14) == b"still writable"
    m.close()
    h.close()
    assert host.counters().live == (0, 0, 0)


def test_pooled_buffer_gives_shared_pages_back_as_discarded(host: vmmpool.Device) -> None:
    with PagePool(host, shareable=True) as pool:
        buf = GrowableBuffer(max_size=16 * MiB, pool=pool, initial_size=6 * MiB)
        assert buf.shareable  # a buffer on a shareable pool is shareable
        buf.write(_pattern(6 * MiB))
        h = buf.share()
        m = h.open(host)
        h.close()
        assert pool.stats().total_pages == 3
        buf.resize(2 * MiB)  # two shared pages go back: released, never reused
        st = pool.stats()
        assert (st.total_pages, st.acquired_pages, st.free_pages) == (1, 1, 0)
        buf.close()
        assert pool.stats().total_pages == 0
        other = GrowableBuffer(max_size=16 * MiB, pool=pool, initial_size=6 * MiB)
        other.write(b"\x00" * (6 * MiB))
        assert m.read() == _pattern(6 * MiB), "the receiver's pages were reused"
        other.close()
        pool._check()
        m.close()


def test_pooled_buffer_pages_whose_receivers_are_done_go_back_for_reuse(host: vmmpool.Device) -> None:
    # Once every handle and mapping of a share is closed, its pages are the buffer's again:
    # they return to the pool as ordinary free pages (reused), not as discarded ones.
    with PagePool(host, shareable=True) as pool:
        buf = GrowableBuffer(max_size=16 * MiB, pool=pool, initial_size=6 * MiB)
        h = buf.share()
        m = h.open(host)
        h.close()
        m.close()
        buf.resize(2 * MiB)
        st = pool.stats()
        assert (st.total_pages, st.acquired_pages, st.free_pages) == (3, 1, 2)
        buf.close()
        assert pool.stats().free_pages == 3
        pool._check()


def test_unpooled_buffer_closed_while_shared_keeps_the_receivers_memory(host: vmmpool.Device) -> None:
    buf = GrowableBuffer(max_size=16 * MiB, device=host, initial_size=4 * MiB, shareable=True)
    buf.write(b"owner's bytes")
    h = buf.share()
    m = h.open(host)
    buf.close()
    assert m.read(13) == b"owner's bytes"
    m.close()
    h.close()


def test_fd_count_returns_to_baseline_in_process(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=MiB * 8, device=host, initial_size=MiB, shareable=True) as warm:
        pickle.loads(pickle.dumps(warm.share())).close()  # starts the resource sharer once
    # Emulated devices dropped by earlier tests close their memory files when the
    # garbage collector reaches them: let that happen before counting.
    gc.collect()
    base = fd_count()
    with PagePool(host, shareable=True) as pool:
        bufs = [GrowableBuffer(max_size=8 * MiB, pool=pool, initial_size=5 * MiB) for _ in range(2)]
        a = pool.malloc(3 * MiB)
        hs = [b.share() for b in bufs] + [a.share()]
        copies = [pickle.loads(pickle.dumps(h)) for h in hs]
        maps = [c.open(host) for c in copies]
        assert fd_count() > base
        for x in (*hs, *copies, *maps, *bufs):
            x.close()
        a.free()
    assert _settle(base, fd_count) == base
    assert host.counters().live == (0, 0, 0)


def test_forked_child_cannot_use_the_mapping(host: vmmpool.Device) -> None:
    with GrowableBuffer(max_size=4 * MiB, device=host, initial_size=MiB, shareable=True) as buf:
        with buf.share() as h, h.open(host) as m:
            with warnings.catch_warnings():
                # Python >= 3.12 warns when forking a process with threads (the
                # resource sharer's); the child only calls the mapping and exits.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    m.read(1)
                except vmmpool.VmmError as exc:
                    code = 0 if "forked child" in str(exc) else 2
                m.close()  # a no-op in the child: never unmaps the parent's memory
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert m.read(1) is not None


# ---------------------------------------------------------- the CUDA backend
@pytest.fixture
def use_fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeDriver]:
    def install(**options: Any) -> FakeDriver:
        drv = FakeDriver(**options)
        monkeypatch.setattr(_cuda, "_driver", lambda: drv)
        return drv

    return install


def test_cuda_device_without_posix_fds_is_refused_up_front(use_fake: Callable[..., FakeDriver]) -> None:
    fake = use_fake(posix_fd_supported=False)
    b = CudaBackend(0)
    try:
        dev = vmmpool.Device._from_backend(b)
        with pytest.raises(ValueError, match="does not support POSIX file descriptor"):
            PagePool(dev, shareable=True)
        with pytest.raises(ValueError, match="does not support POSIX file descriptor"):
            GrowableBuffer(max_size=4 * MiB, device=dev, shareable=True)
        assert fake.calls["cuMemCreate"] == 0 and fake.calls["cuMemAddressReserve"] == 0
    finally:
        b.close()


def test_cuda_driver_refusing_the_handle_type_is_refused_up_front(
    use_fake: Callable[..., FakeDriver],
) -> None:
    fake = use_fake()
    b = CudaBackend(0)
    try:
        dev = vmmpool.Device._from_backend(b)
        assert dev.supports_posix_fd  # the attribute says yes ...
        fake.fail("cuMemCreate", R.CUDA_ERROR_NOT_PERMITTED)  # ... cuMemCreate says no
        with pytest.raises(ValueError, match="refused the handle type"):
            PagePool(dev, shareable=True)
        assert b.counters().live == (0, 0, 0)
    finally:
        b.close()


def test_cuda_pool_share_through_the_driver_calls(use_fake: Callable[..., FakeDriver]) -> None:
    fake = use_fake()
    b = CudaBackend(0)
    try:
        dev = vmmpool.Device._from_backend(b)
        with PagePool(dev, shareable=True) as pool:
            creates = fake.calls["cuMemCreate"]
            a = pool.malloc(3 * MiB)
            assert fake.calls["cuMemCreate"] == creates + 2
            dev.write(a.ptr, b"through the driver")
            with a.share() as h:
                assert fake.calls["cuMemExportToShareableHandle"] == 2
                with h.open(dev) as m:
                    assert fake.calls["cuMemImportFromShareableHandle"] == 2
                    assert m.read(18) == b"through the driver"
            a.free()
        host = vmmpool.Device.emulated(capacity=8 * MiB)
        with GrowableBuffer(max_size=4 * MiB, device=host, initial_size=MiB, shareable=True) as buf:
            with buf.share() as hh, pytest.raises(ValueError, match="lives on a host device"):
                hh.open(dev)
        assert b.counters().live == (0, 0, 0)
    finally:
        b.close()


# --------------------------------------------------------------- across processes
CHANNELS = [("spawn", "queue"), ("spawn", "pipe"), ("forkserver", "queue"), ("forkserver", "pipe")]


class Worker:
    """The other process, driven by commands (see ``_share_worker.py``)."""

    def __init__(self, method: str, channel: str) -> None:
        ctx = mp.get_context(method)
        self.channel = channel
        if channel == "pipe":
            self.conn, other = ctx.Pipe()
            args: tuple[Any, ...] = (other,)
        else:
            self.out_q, self.in_q = ctx.Queue(), ctx.Queue()
            args = (self.out_q, self.in_q)
        self.proc = ctx.Process(target=serve, args=args, daemon=True)
        self.proc.start()

    def call(self, *cmd: Any) -> Any:
        if self.channel == "pipe":
            self.conn.send(cmd)
            assert self.conn.poll(TIMEOUT), f"no answer to {cmd[0]!r}"
            status, value = self.conn.recv()
        else:
            self.out_q.put(cmd)
            status, value = self.in_q.get(timeout=TIMEOUT)
        assert status == "ok", f"{cmd[0]!r} failed in the worker: {value}"
        return value

    def stop(self) -> None:
        if self.proc.is_alive():
            self.call("exit")
        self.proc.join(TIMEOUT)


@pytest.fixture(scope="module", params=CHANNELS, ids=["-".join(c) for c in CHANNELS])
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    w = Worker(*request.param)
    # Warm up: the first share starts this process's resource sharer (a socket
    # and a thread that stay), so fd baselines are taken after it.
    dev = vmmpool.Device.emulated(capacity=8 * MiB)
    with GrowableBuffer(max_size=4 * MiB, device=dev, initial_size=MiB, shareable=True) as buf:
        h = buf.share()
        w.call("open", "warm", h)
        w.call("close", "warm")
        w.call("close_handle", "warm")
        h.close()
    yield w
    w.stop()


def test_writes_are_visible_both_ways(worker: Worker, host: vmmpool.Device) -> None:
    their_base = worker.call("state")
    assert their_base[1] == (0, 0, 0)
    our_base = fd_count()
    data = _pattern(3 * MiB + 100, 3)
    buf = GrowableBuffer(max_size=16 * MiB, device=host, initial_size=len(data), shareable=True)
    buf.write(data)
    h = buf.share()
    assert worker.call("open", "b", h) == (len(data), len(data))
    h.close()  # after the worker has it (a Queue pickles in a background thread)
    assert worker.call("read", "b", 64, 2 * MiB - 32) == data[2 * MiB - 32 : 2 * MiB + 32]
    worker.call("write", "b", b"written by the receiver", 2 * MiB - 8)
    assert buf.read(23, 2 * MiB - 8) == b"written by the receiver"
    buf.write(b"written by the owner", 5)
    assert worker.call("read", "b", 20, 5) == b"written by the owner"
    buf.resize(10 * MiB)  # growth after sharing: the receiver keeps the size it opened
    assert len(worker.call("read", "b", None, 0)) == len(data)
    state = worker.call("state")
    assert state[1] == (1, 2, 2) and state[0] > their_base[0]
    worker.call("close", "b")
    worker.call("close_handle", "b")
    assert worker.call("state") == their_base
    buf.close()
    assert _settle(our_base, fd_count) == our_base
    assert host.counters().live == (0, 0, 0)


def test_pool_allocation_is_kept_until_the_receiver_closes(worker: Worker, host: vmmpool.Device) -> None:
    their_base = worker.call("state")
    our_base = fd_count()
    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(1000)
        b = pool.malloc(5000)
        host.write(a.ptr, b"a" * 1000)
        host.write(b.ptr, _pattern(5000, 4))
        h = b.share()
        worker.call("open", "p", h)
        h.close()
        assert worker.call("read", "p", None, 0) == _pattern(5000, 4)
        b.free()
        later = [pool.malloc(5000) for _ in range(4)]
        assert all(x.ptr + 5000 <= b.ptr or x.ptr >= b.ptr + 5000 for x in later)
        worker.call("write", "p", b"b" * 5000, 0)
        assert host.read(a.ptr, 1000) == b"a" * 1000
        assert pool.stats().live_allocations == 6
        worker.call("close", "p")
        assert pool.stats().live_allocations == 6  # the worker still holds the handle
        worker.call("close_handle", "p")

        def live() -> int:
            return pool.stats().live_allocations

        assert _settle(5, live) == 5  # every receiver is done: b is given back
        assert worker.call("state") == their_base
    assert _settle(our_base, fd_count) == our_base


def _warm_up(method: str) -> None:
    """Start what multiprocessing keeps for the process's lifetime (their fds stay open)."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    if method == "forkserver":
        forkserver.ensure_running()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_receiver_exits_first(method: str, host: vmmpool.Device) -> None:
    ctx = mp.get_context(method)
    _warm_up(method)
    our_base = fd_count()
    conn, other = ctx.Pipe()
    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(3 * MiB)
        h = a.share()
        p = ctx.Process(target=receive_and_exit, args=(h, other), daemon=True)
        p.start()  # the handle travels as a process argument
        assert conn.poll(TIMEOUT)
        assert conn.recv() == b"from "
        h.close()
        assert host.read(a.ptr, 14) == b"from the child"
        a.free()
        assert pool.stats().live_allocations == 1  # the child still maps it
        conn.send("exit")
        p.join(TIMEOUT)
        assert p.exitcode == 0

        def live() -> int:
            return pool.stats().live_allocations

        assert _settle(0, live) == 0  # its exit closed its copies: the lease is done
        b = pool.malloc(3 * MiB)
        host.write(b.ptr, b"reused")
        b.free()
    assert host.counters().live == (0, 0, 0)
    p.close()  # its sentinel
    other.close()
    conn.close()
    assert _settle(our_base, fd_count) == our_base


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_owner_exits_first(method: str) -> None:
    host = vmmpool.Device("host")  # what open() picks by default for host memory
    before = host.counters().live
    _warm_up(method)
    owner = Worker(method, "pipe")
    try:
        data = _pattern(4 * MiB + 7, 5)
        h = owner.call("make", "x", len(data), data)
        our_base = fd_count() - h.n_pages - 1  # the handle's fds are ours now
        m1 = h.open()
        m1.write(b"receiver was here", 0)
        assert owner.call("owner_read", "x", 17, 0) == b"receiver was here"
        owner.stop()  # exits without closing anything
        assert owner.proc.exitcode == 0
        assert m1.read(7, 4 * MiB) == data[4 * MiB :]
        m2 = h.open()  # opening after the owner is gone works too
        m2.write(b"after", 100)
        assert m1.read(5, 100) == b"after"
        assert m2.read(17, 0) == b"receiver was here"
        h.close()
        m1.close()
        m2.close()
    finally:
        if owner.proc.is_alive():
            owner.proc.kill()
    assert host.counters().live == before
    assert _settle(our_base, fd_count) == our_base


def test_cuda_share_across_processes_on_the_standin(
    standin: StandinDriver, device: vmmpool.Device
) -> None:
    # The receiver loads the same stand-in libcuda.so.1 (LD_LIBRARY_PATH is inherited):
    # cuMemImportFromShareableHandle, reserve, map and set access in another process.
    g = device.granularity
    w = Worker("spawn", "pipe")
    try:
        with GrowableBuffer(max_size=8 * g, device=device, initial_size=g + 10, shareable=True) as buf:
            buf.write(_pattern(g + 10, 6))
            imports = standin.calls("cuMemImportFromShareableHandle")
            with buf.share() as h:
                assert w.call("open", "c", h) == (g + 10, g + 10)
            assert standin.calls("cuMemImportFromShareableHandle") == imports  # in the other process
            assert w.call("read", "c", None, 0) == _pattern(g + 10, 6)
            w.call("write", "c", b"from the other process", g - 12)
            assert buf.read(22, g - 12) == b"from the other process"
            assert w.call("state", "cuda:0")[1] == (1, 2, 2)
            w.call("close", "c")
            w.call("close_handle", "c")
            assert w.call("state", "cuda:0")[1] == (0, 0, 0)
    finally:
        w.stop()


@pytest.mark.parametrize("op", ["import_fd", "reserve", "map", "set_access"])
def test_open_failing_at_any_driver_call_leaves_nothing(host: vmmpool.Device, op: str) -> None:
    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(3 * MiB)
        h = a.share()
        nth = 2 if op in ("import_fd", "map") else 1  # the second page's call, where there is one
        fds = fd_count()
        live = host.counters().live
        host._backend.inject_fault(op, nth=nth, name="CUDA_ERROR_UNKNOWN")
        with pytest.raises(vmmpool.DriverError, match="CUDA_ERROR_UNKNOWN"):
            h.open(host)
        assert host.counters().live == live and fd_count() == fds
        with h.open(host) as m:  # the handle is intact
            m.write(b"ok")
        h.close()
        a.free()
        assert pool.stats().live_allocations == 0


def test_share_failing_at_an_export_leaves_nothing(host: vmmpool.Device) -> None:
    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(5 * MiB)  # three pages: three exports
        fds = fd_count()
        host._backend.inject_fault("export_fd", nth=3, name="CUDA_ERROR_UNKNOWN")
        with pytest.raises(vmmpool.DriverError, match="CUDA_ERROR_UNKNOWN"):
            a.share()
        assert fd_count() == fds and not pool._shares
        a.free()
        assert pool.stats().live_allocations == 0  # not leased: freed at once
    with GrowableBuffer(max_size=8 * MiB, device=host, initial_size=3 * MiB, shareable=True) as buf:
        fds = fd_count()
        host._backend.inject_fault("export_fd", nth=2, name="CUDA_ERROR_UNKNOWN")
        with pytest.raises(vmmpool.DriverError):
            buf.share()
        assert fd_count() == fds and not buf._state.exported


def test_readme_two_process_example_runs(tmp_path: Any) -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (script,) = re.findall(r"```py\n(# share_demo\.py\n.*?)```", (root / "README.md").read_text(), re.S)
    path = tmp_path / "share_demo.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["b'HELLO world'", "b'HELLO'"]


def test_repeated_buffer_shares_keep_one_descriptor_per_share_in_use(host: vmmpool.Device) -> None:
    buf = GrowableBuffer(max_size=4 * MiB, device=host, initial_size=2 * MiB, shareable=True)
    n0 = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        buf.share().close()  # a share nobody received: its lease ends at once
    assert len(buf._state.leases) <= 1
    assert len(os.listdir("/proc/self/fd")) <= n0 + 2
    buf.close()


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("nbytes", 4 * 2 * MiB, "must fit in its 1 page"),
        ("nbytes", -5, "must fit in its 1 page"),
        ("nbytes", 10.5, "nbytes must be an int"),
        ("offset", 3 * 2 * MiB, "offset must be in [0, page_size"),
        ("offset", -4096, "offset must be in [0, page_size"),
        ("page_size", 0, "page_size must be > 0"),
        ("device_kind", "weird", "device kind must be 'host' or 'cuda'"),
        ("source", "Something", "source must be one of"),
    ],
)
def test_a_malformed_received_handle_is_refused_and_its_descriptors_closed(
    host: vmmpool.Device, field: str, value: object, says: str
) -> None:
    """A handle's sizes come from the sender: beyond its pages, views reached unmapped memory."""
    from multiprocessing.reduction import ForkingPickler

    with GrowableBuffer(max_size=4 * MiB, device=host, initial_size=2 * MiB, shareable=True) as buf:
        with buf.share() as h:
            pickle.loads(ForkingPickler.dumps(h)).close()  # the resource sharer, once
            gc.collect()
            base = fd_count()
            setattr(h, field, value)
            with pytest.raises(ValueError, match="malformed SharedMemoryHandle") as info:
                pickle.loads(ForkingPickler.dumps(h))
            assert says in str(info.value)
            assert _settle(base, fd_count) == base


def _inheritable_fds(conn: Any) -> None:
    h = conn.recv()
    conn.send([os.get_inheritable(fd) for fd in h._fds])
    h.close()


def test_received_descriptors_are_not_inherited_by_programs_the_receiver_runs(host: vmmpool.Device) -> None:
    """SCM_RIGHTS descriptors arrive inheritable: an os.system() child held the lease and pages."""
    ctx = mp.get_context("spawn")
    conn, other = ctx.Pipe()
    with GrowableBuffer(max_size=4 * MiB, device=host, initial_size=3 * MiB, shareable=True) as buf:
        p = ctx.Process(target=_inheritable_fds, args=(other,), daemon=True)
        p.start()
        with buf.share() as h:
            assert not any(os.get_inheritable(fd) for fd in h._fds)
            conn.send(h)
            assert conn.poll(TIMEOUT)
            assert conn.recv() == [False, False, False]
        p.join(TIMEOUT)
    p.close()
    other.close()
    conn.close()


def test_acquire_pages_retries_once_a_finished_share_gives_memory_back(host: vmmpool.Device) -> None:
    with PagePool(host, limit=4 * MiB, shareable=True) as pool:
        a = pool.malloc(4 * MiB)
        h = a.share()
        a.free()  # leased: kept
        h.close()  # the last receiver is done; nothing looked yet
        pages = pool.acquire_pages(2)  # was OutOfMemoryError: reaped, then not retried
        assert pool.stats().n_ooms == 0
        pool.release_pages(pages)
        b = pool.malloc(4 * MiB)
        h = b.share()
        b.free()
        h.close()
        pool.malloc(4 * MiB).free()
        assert pool.stats().n_ooms == 0  # the attempt the reap superseded is not counted


def test_bytes_written_into_the_lease_do_not_hold_it(host: vmmpool.Device) -> None:
    with PagePool(host, shareable=True) as pool:
        a = pool.malloc(4096)
        h = a.share()
        os.write(h._fds[-1], b"x" * 1000)  # a receiver holds a writable end
        h.close()
        a.free()
        assert pool.stats().live_allocations == 0


def test_a_pickled_handle_received_twice_says_why(host: vmmpool.Device) -> None:
    # multiprocessing's resource sharer hands a descriptor out once: the second receipt of
    # the same bytes raised an EOFError with no message.
    g = host.granularity
    with GrowableBuffer(max_size=2 * g, device=host, initial_size=g, shareable=True) as buf:
        data = pickle.dumps(buf.share())
        before = fd_count()
        with pickle.loads(data):
            pass
        with pytest.raises(EOFError, match="a pickled handle can be received once"):
            pickle.loads(data)
        assert fd_count() <= before  # nothing received is left open (the sender closes its copies)

"""vmmpool.torch: PyTorch's pluggable-allocator callbacks, called through ctypes as PyTorch calls them.

No PyTorch is needed for the callbacks: each test turns the two addresses back
into C function pointers with the ABI PyTorch uses
(``void* alloc(size_t, int, cudaStream_t)``, ``void free(void*, size_t, int,
cudaStream_t)``) and calls them, so every call goes C -> ctypes thunk -> Python
exactly as it does under ``torch._C._cuda_customAllocator``. The MemPool helpers
are tested with and without a (stand-in) ``torch`` module; the real PyTorch run
is the ``cuda``-marked training test at the end (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import vmmpool
import vmmpool.torch as vt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)

MiB = 1 << 20


def c_functions(pool: vmmpool.PagePool) -> tuple[Any, Any]:
    """The pool's callbacks as C function pointers (what PyTorch holds)."""
    alloc_address, free_address = vt.callbacks(pool)
    return ALLOC(alloc_address), FREE(free_address)


def ordinal(dev: vmmpool.Device) -> int:
    return 0 if dev.is_host else dev.ordinal


@pytest.fixture
def pool(device: vmmpool.Device) -> Iterator[vmmpool.PagePool]:
    p = vmmpool.PagePool(device, limit=16 * device.granularity)
    yield p
    p.close()


def run_script(body: str, timeout: float = 180) -> str:
    """Run `body` in a fresh interpreter (a deadlock is a timeout, not a hung suite)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(body)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"deadlock: the script did not finish in {timeout} s\n{err.stdout!r}\n{err.stderr!r}")
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


# ----------------------------------------------------------------- the pair
def test_callbacks_are_one_pair_per_pool(pool: vmmpool.PagePool, device: vmmpool.Device) -> None:
    a1, f1 = vt.callbacks(pool)
    a2, f2 = vt.callbacks(pool)
    assert (a1, f1) == (a2, f2)
    assert a1 and f1 and a1 != f1
    other = vmmpool.PagePool(device, limit=4 * device.granularity)
    try:
        assert vt.callbacks(other)[0] not in (a1, f1)
    finally:
        other.close()


def test_callbacks_validate_the_pool(device: vmmpool.Device) -> None:
    with pytest.raises(TypeError, match=r"must be a vmmpool\.PagePool, got int"):
        vt.callbacks(3)  # type: ignore[arg-type]
    p = vmmpool.PagePool(device, limit=4 * device.granularity)
    p.close()
    with pytest.raises(vmmpool.ClosedError):
        vt.callbacks(p)


def test_alloc_shows_in_stats_and_free_releases(pool: vmmpool.PagePool, device: vmmpool.Device) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    p = alloc(3 * MiB + 100, d, None)
    assert p and p % 512 == 0
    s = pool.stats()
    # requested: what was asked; allocated: with the pool's 512-byte rounding
    assert (s.live_allocations, s.requested_bytes, s.allocated_bytes, s.n_malloc) == (
        1, 3 * MiB + 100, 3 * MiB + 512, 1
    )
    assert vt.outstanding(pool) == 1
    q = alloc(4096, d, None)
    assert q and not (p <= q < p + 3 * MiB + 100)
    assert pool.stats().live_allocations == 2
    free(p, 3 * MiB + 100, d, None)
    s = pool.stats()
    assert (s.live_allocations, s.requested_bytes, s.allocated_bytes, s.n_free) == (1, 4096, 4096, 1)
    free(q, 4096, d, None)
    s = pool.stats()
    assert (s.live_allocations, s.requested_bytes, s.allocated_bytes) == (0, 0, 0)
    assert vt.outstanding(pool) == 0
    pool._check()


def test_host_memory_is_usable(host: vmmpool.Device) -> None:
    """On the host emulator the pointer is real read-write memory (what a kernel would get)."""
    pool = vmmpool.PagePool(host, limit=8 * host.granularity)
    alloc, free = c_functions(pool)
    p = alloc(MiB, 0, None)
    ctypes.memset(p, 0xAB, MiB)
    assert ctypes.string_at(p + MiB - 4, 4) == b"\xab" * 4
    free(p, MiB, 0, None)
    pool.close()
    assert host.counters().live == (0, 0, 0)


def test_size_zero_is_null_and_free_of_null_is_a_no_op(
    pool: vmmpool.PagePool, device: vmmpool.Device
) -> None:
    alloc, free = c_functions(pool)
    assert alloc(0, ordinal(device), None) is None
    free(None, 0, ordinal(device), None)
    s = pool.stats()
    assert (s.n_malloc, s.n_free, s.live_allocations) == (0, 0, 0)


def test_over_limit_returns_null_and_logs(
    pool: vmmpool.PagePool, device: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    keep = alloc(4 * device.granularity, d, None)
    with caplog.at_level(logging.INFO, logger="vmmpool.torch"):
        assert alloc(pool.limit, d, None) is None
    msgs = [r.getMessage() for r in caplog.records if r.name == "vmmpool.torch"]
    assert any("returning NULL" in m and f"{pool.limit} bytes" in m for m in msgs), msgs
    assert pool.stats().live_allocations == 1  # nothing changed
    # The pool stays usable: what fits is served.
    p = alloc(device.granularity, d, None)
    assert p
    free(p, device.granularity, d, None)
    free(keep, 4 * device.granularity, d, None)
    assert pool.stats().live_allocations == 0


def test_no_exception_crosses_into_c(
    pool: vmmpool.PagePool, device: vmmpool.Device, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    alloc, free = c_functions(pool)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(vmmpool.PagePool, "malloc", broken)
    with caplog.at_level(logging.INFO, logger="vmmpool.torch"):
        assert alloc(4096, ordinal(device), None) is None
        free(0xDEAD000, 4096, ordinal(device), None)  # never handed out: logged, ignored
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info is not None and "boom" in str(errors[0].exc_info[1])
    assert any("not allocated by this allocator" in r.getMessage() for r in caplog.records)
    # ctypes prints "Exception ignored on calling ctypes callback function" when one escapes
    assert "Exception ignored" not in capfd.readouterr().err


def test_double_free_is_logged_and_ignored(
    pool: vmmpool.PagePool, device: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    p = alloc(8192, d, None)
    free(p, 8192, d, None)
    q = alloc(8192, d, None)  # may reuse the address: a second free of p must not free q
    with caplog.at_level(logging.WARNING, logger="vmmpool.torch"):
        if q != p:
            free(p, 8192, d, None)
            assert pool.stats().live_allocations == 1
            assert any("freed twice" in r.getMessage() for r in caplog.records)
    free(q, 8192, d, None)
    with caplog.at_level(logging.WARNING, logger="vmmpool.torch"):
        free(q, 8192, d, None)
    assert any("freed twice" in r.getMessage() for r in caplog.records)
    assert pool.stats().live_allocations == 0
    assert pool.stats().n_free == 2


def test_device_argument_must_name_the_pools_device(
    pool: vmmpool.PagePool, device: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    alloc, free = c_functions(pool)
    if device.is_host:
        p = alloc(4096, 7, None)  # the host emulator serves any ordinal
        assert p
        free(p, 4096, 7, None)
        assert pool.stats().live_allocations == 0
        return
    with caplog.at_level(logging.WARNING, logger="vmmpool.torch"):
        assert alloc(4096, device.ordinal + 1, None) is None
    assert any("returning NULL" in r.getMessage() for r in caplog.records)
    assert pool.stats().n_malloc == 0


def test_stream_argument_is_honoured(pool: vmmpool.PagePool, device: vmmpool.Device) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    # 1 and 2 (the legacy and per-thread default streams) are valid handles on a GPU too.
    p = alloc(MiB, d, 1)
    q = alloc(MiB, d, 2)
    pages = pool.snapshot()
    streams = {a.address: a.stream for info in pages for a in info.allocations}
    assert streams == {p: 1, q: 2}
    free(p, MiB, d, 1)
    # Freed on stream 1: stream 1 reuses it at once, stream 2 never gets it directly.
    r = alloc(MiB, d, 2)
    assert r != p
    s = alloc(MiB, d, 1)
    assert s == p
    for ptr, st in ((q, 2), (r, 2), (s, 1)):
        free(ptr, MiB, d, st)
    assert pool.stats().live_allocations == 0


def test_free_from_another_thread(pool: vmmpool.PagePool, device: vmmpool.Device) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    ptrs = [alloc(64 << 10, d, None) for _ in range(50)]
    assert all(ptrs)
    errors: list[BaseException] = []

    def worker(chunk: list[int]) -> None:
        try:
            for p in chunk:
                free(p, 64 << 10, d, None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(ptrs[i::4],)) for i in range(4)]
    for t in ts:
        t.start()
    for _ in range(50):  # the main thread keeps using the pool meanwhile
        pool.malloc(4096).free()
    for t in ts:
        t.join()
    assert not errors
    s = pool.stats()
    assert (s.live_allocations, s.n_free) == (0, 100)
    assert vt.outstanding(pool) == 0


def test_free_while_this_thread_holds_the_pool_lock_is_queued() -> None:
    """A free that runs while this thread holds the pool's lock (a garbage collection inside a
    locked section of the pool, or PyTorch calling back there) must not block: it is queued
    and the pool's next call frees it."""
    out = run_script("""
        import ctypes
        import vmmpool, vmmpool.torch as vt
        dev = vmmpool.Device.emulated(capacity=64 << 20)
        pool = vmmpool.PagePool(dev, limit=8 * dev.granularity)
        a, f = vt.callbacks(pool)
        ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(a)
        FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(f)
        p = ALLOC(1 << 20, 0, None)
        with pool._core.lock:
            FREE(p, 1 << 20, 0, None)  # would deadlock if it waited for the lock
            print("outstanding", vt.outstanding(pool))
        s = pool.stats()
        print("after", s.live_allocations, s.n_free)
        pool.close()
    """, timeout=60)
    assert "outstanding 0" in out and "after 0 1" in out, out


def test_callbacks_make_the_primary_context_current_on_a_new_thread(
    standin: Any, device: vmmpool.Device
) -> None:
    """On CUDA (the stand-in driver here) a callback on a thread with no current context makes the
    device's primary context current, even when the pool itself makes no driver call."""
    pool = vmmpool.PagePool(device, limit=8 * device.granularity)
    alloc, free = c_functions(pool)
    free(alloc(MiB, device.ordinal, None), MiB, device.ordinal, None)  # warm: cached now
    seen: list[int] = []

    def worker() -> None:
        before = standin.calls("cuCtxSetCurrent")
        p = alloc(MiB, device.ordinal, None)  # from the cache: the pool calls no driver function
        seen.append(standin.calls("cuCtxSetCurrent") - before)
        free(p, MiB, device.ordinal, None)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1]
    assert pool.stats().live_allocations == 0
    pool.close()


def test_thousand_pairs_leak_nothing_and_call_no_driver(
    pool: vmmpool.PagePool, device: vmmpool.Device
) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    sizes = [512, 4096, 100_000, MiB, 3 * MiB + 5]

    def rounds(n: int) -> None:
        held: list[tuple[int, int, int]] = []
        for i in range(n):
            size, stream = sizes[i % len(sizes)], i % 3  # valid handles on a GPU too
            p = alloc(size, d, stream)
            assert p, (i, size)
            held.append((p, size, stream))
            if len(held) > 3:
                q, sz, st = held.pop(0)
                free(q, sz, d, st)
        for q, sz, st in held:
            free(q, sz, d, st)

    rounds(1000)
    s = pool.stats()
    assert (s.live_allocations, s.requested_bytes, s.allocated_bytes) == (0, 0, 0)
    assert (s.n_malloc, s.n_free) == (1000, 1000)
    assert vt.outstanding(pool) == 0
    calls = dict(device.counters().calls)
    rounds(1000)  # the same pattern again: served from the cache, no driver call
    assert dict(device.counters().calls) == calls
    s = pool.stats()
    assert (s.live_allocations, s.n_malloc, s.n_free) == (0, 2000, 2000)
    pool._check()


# ----------------------------------------------------------------- lifetime
def test_callbacks_outlive_the_pool_object(device: vmmpool.Device, caplog: pytest.LogCaptureFixture) -> None:
    """PyTorch keeps the addresses and cached segments after every Python name is gone."""
    pool = vmmpool.PagePool(device, limit=8 * device.granularity)
    alloc_address, free_address = vt.callbacks(pool)
    d = ordinal(device)
    p = ALLOC(alloc_address)(2 * MiB, d, None)
    alive = weakref.ref(pool)
    del pool
    gc.collect()
    assert alive() is not None  # the memory handed out keeps the pool
    assert alive().stats().live_allocations == 1  # type: ignore[union-attr]
    FREE(free_address)(p, 2 * MiB, d, None)
    gc.collect()
    assert alive() is None  # nothing out: the pool was collected (and closed)
    # The pair is still callable: alloc answers NULL, free ignores.
    with caplog.at_level(logging.WARNING, logger="vmmpool.torch"):
        assert ALLOC(alloc_address)(4096, d, None) is None
        FREE(free_address)(p, 2 * MiB, d, None)
    assert any("is gone" in r.getMessage() for r in caplog.records)


def test_free_after_close_is_safe_and_releases(
    device: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    before = device.counters().live
    pool = vmmpool.PagePool(device, limit=8 * device.granularity)
    alloc, free = c_functions(pool)
    d = ordinal(device)
    p = alloc(MiB, d, None)
    q = alloc(3 * MiB, d, None)
    if device.is_host:
        ctypes.memset(q, 1, 3 * MiB)
    pool.close()
    # PyTorch still uses the memory: it stays mapped until freed.
    assert device.counters().live != before
    if device.is_host:
        ctypes.memset(q, 2, 3 * MiB)
        assert ctypes.string_at(q + 3 * MiB - 1, 1) == b"\x02"
    with caplog.at_level(logging.WARNING, logger="vmmpool.torch"):
        assert alloc(4096, d, None) is None  # closed: NULL
    assert any("closed" in r.getMessage() for r in caplog.records)
    free(p, MiB, d, None)
    free(q, 3 * MiB, d, None)
    gc.collect()
    assert device.counters().live == before
    assert vt.outstanding(pool) == 0
    free(q, 3 * MiB, d, None)  # again: ignored


@pytest.mark.slow
def test_gc_and_finalizer_frees_inside_every_pool_call() -> None:
    """Frees from __del__ of objects in cycles, collected inside every backend call (so
    inside the pool's locked slow paths) and from four threads at once: no deadlock, no leak."""
    out = run_script("""
        import ctypes, gc, threading
        import vmmpool, vmmpool.torch as vt
        from vmmpool._backends.base import OPERATIONS
        dev = vmmpool.Device.emulated(capacity=1 << 30)
        P = dev.granularity
        # Room for the cycles the collector has not reached yet (this is about locks, not limits).
        pool = vmmpool.PagePool(dev, limit=256 * P)
        a, f = vt.callbacks(pool)
        ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(a)
        FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(f)
        backend = dev._backend
        depth = [0]; collections = [0]
        def wrap(name):
            orig = getattr(backend, name)
            def call(*a, **k):
                if depth[0] == 0:
                    depth[0] += 1
                    try:
                        gc.collect(); collections[0] += 1
                    finally:
                        depth[0] -= 1
                return orig(*a, **k)
            return call
        for name in OPERATIONS:
            if hasattr(backend, name):
                setattr(backend, name, wrap(name))
        class Tensor:  # a cached segment whose owner dies in a cycle
            def __init__(self, size, stream):
                self.ptr = ALLOC(size, 0, stream); self.size = size; self.stream = stream
                assert self.ptr, size
                self.me = self
            def __del__(self):
                FREE(self.ptr, self.size, 0, self.stream)
        errors = []
        def work(t):
            try:
                for i in range(40):
                    Tensor((1 + i % 3) * P + 512 * t, t)
                    x = Tensor(4096 * (1 + i % 5), t)
                    del x
                    if i % 7 == 0:
                        pool.defragment()
            except Exception as e:
                errors.append(repr(e))
        gc.set_threshold(5, 1, 1)
        ts = [threading.Thread(target=work, args=(t,)) for t in range(3)]
        for t in ts: t.start()
        work(3)
        for t in ts: t.join()
        gc.set_threshold(700, 10, 10)
        assert not errors, errors
        gc.collect(); s = pool.stats()
        assert (s.live_allocations, vt.outstanding(pool)) == (0, 0), (s, vt.outstanding(pool))
        assert s.n_malloc == s.n_free == 4 * 80, s
        pool._check(); pool.close(); gc.collect()
        print("collections", collections[0], "live", dev.counters().live)
    """, timeout=300)
    assert "live (0, 0, 0)" in out, out
    n = int(out.split("collections")[1].split()[0])
    assert n > 50, out  # the collector really ran inside the backend calls


def test_forked_child_neither_allocates_nor_frees_the_parents_memory() -> None:
    out = run_script("""
        import ctypes, os
        import vmmpool, vmmpool.torch as vt
        dev = vmmpool.Device.emulated(capacity=64 << 20)
        pool = vmmpool.PagePool(dev, limit=8 * dev.granularity)
        a, f = vt.callbacks(pool)
        ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(a)
        FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(f)
        p = ALLOC(1 << 20, 0, None)
        pid = os.fork()
        if pid == 0:
            ok = ALLOC(4096, 0, None) is None
            FREE(p, 1 << 20, 0, None)
            ok = ok and vt.outstanding(pool) == 1
            try:  # the inherited pool is the parent's: ForkedError, not "closed"
                vt.callbacks(pool)
                ok = False
            except vmmpool.ForkedError:
                pass
            except vmmpool.ClosedError:
                ok = False
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        assert vt.outstanding(pool) == 1 and pool.stats().live_allocations == 1
        FREE(p, 1 << 20, 0, None)
        assert pool.stats().live_allocations == 0
        pool.close()
        print("live", dev.counters().live)
    """)
    assert "child 0" in out and "live (0, 0, 0)" in out, out


# ------------------------------------------------------------- torch helpers
def test_import_without_torch_and_helpers_name_the_extra() -> None:
    out = run_script("""
        import sys
        sys.modules["torch"] = None  # import torch raises ImportError
        import vmmpool, vmmpool.torch as vt
        dev = vmmpool.Device.emulated(capacity=64 << 20)
        pool = vmmpool.PagePool(dev)
        assert all(vt.callbacks(pool))
        for call in (lambda: vt.MemPool(pool), lambda: vt.use_pool(pool).__enter__()):
            try:
                call()
            except ImportError as e:
                print("ImportError:", e)
            else:
                raise AssertionError("no ImportError")
        pool.close()
    """)
    lines = [ln for ln in out.splitlines() if ln.startswith("ImportError:")]
    assert len(lines) == 2, out
    assert all("pip install 'vmmpool[torch]'" in ln for ln in lines), out


class FakeTorch(types.ModuleType):
    """Just what vmmpool.torch uses of torch: _C._cuda_customAllocator, cuda.MemPool, cuda.use_mem_pool.

    The allocator it makes calls the addresses through ctypes, as PyTorch's
    CUDAPluggableAllocator does.
    """

    def __init__(self) -> None:
        super().__init__("torch")
        self.__version__ = "fake"
        self.allocators: list[Any] = []
        self.used: list[tuple[Any, object]] = []
        self.current = 0  # torch.cuda.current_device()
        #: device -> {MemPool id: allocator or None}: where PyTorch registered each pool
        self.registered: dict[int, dict[int, Any]] = {}
        torch = self

        class Allocator:
            def __init__(self, alloc_address: int, free_address: int) -> None:
                self.alloc = ALLOC(alloc_address)
                self.free = FREE(free_address)
                torch.allocators.append(self)

        class MemPool:
            def __init__(self, allocator: Allocator) -> None:
                self.allocator = allocator
                # MemPool::MemPool registers on the current device
                torch.registered.setdefault(torch.current, {})[id(self)] = allocator

        class use_mem_pool:  # torch's spelling
            def __init__(self, mp: MemPool, device: object = None) -> None:
                self.mp, self.device = mp, device

            def __enter__(self) -> None:
                # beginAllocateToPool: one MemPool is entered once at a time, by any thread
                if any(mp is self.mp for mp, _ in torch.used):
                    raise RuntimeError("beginAllocateToPool: already recording to mempool_id")
                d = torch.current if self.device is None else self.device
                assert isinstance(d, int)
                # an id unknown on that device: a private pool with no allocator (plain cudaMalloc)
                torch.registered.setdefault(d, {}).setdefault(id(self.mp), None)
                torch.used.append((self.mp, self.device))

            def __exit__(self, *exc: object) -> None:
                torch.used.remove(next(u for u in torch.used if u[0] is self.mp))

        class device:
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> None:
                self.prev, torch.current = torch.current, self.index

            def __exit__(self, *exc: object) -> None:
                torch.current = self.prev

        def torch_device(spec: str) -> Any:  # torch.device("cuda:1") / torch.device("cuda")
            kind, _, index = spec.partition(":")
            return types.SimpleNamespace(type=kind, index=int(index) if index else None)

        self.device = torch_device
        self._C = types.SimpleNamespace(_cuda_customAllocator=Allocator)
        self.cuda = types.SimpleNamespace(
            MemPool=MemPool, use_mem_pool=use_mem_pool, device=device,
            current_device=lambda: torch.current,
        )


def test_mempool_and_use_pool_wiring(device: vmmpool.Device, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    pool: vmmpool.PagePool | None = vmmpool.PagePool(device, limit=8 * device.granularity)
    assert pool is not None
    try:
        if device.is_host:
            with pytest.raises(ValueError, match="needs a pool on a CUDA device"):
                vt.MemPool(pool)
            return
        mp = vt.MemPool(pool)
        mp2 = vt.MemPool(pool)
        assert mp is not mp2 and mp.allocator is mp2.allocator  # one torch allocator per pool
        (allocator,) = fake.allocators
        p = allocator.alloc(2 * MiB, device.ordinal, None)  # as PyTorch's raw_alloc would
        assert p and pool.stats().live_allocations == 1
        allocator.free(p, 2 * MiB, device.ordinal, None)
        assert pool.stats().live_allocations == 0
        with vt.use_pool(pool) as used:
            assert fake.used == [(used, device.ordinal)]
            # PyTorch refuses to enter one MemPool twice at once: a nested block gets another
            with vt.use_pool(pool) as inner:
                assert inner is not used and inner.allocator is used.allocator
        assert fake.used == []
        with vt.use_pool(pool) as again:
            assert again is inner  # the last one made, still referenced, no block inside: reused
        where = types.SimpleNamespace(index=device.ordinal)  # a torch.device
        with vt.use_pool(pool, device=where) as again:
            assert fake.used == [(again, device.ordinal)]
        with pytest.raises(ValueError, match=rf"must be the pool's device \(cuda:{device.ordinal}\), got 3"):
            with vt.use_pool(pool, device=3):
                pass
        assert fake.used == []
        # PyTorch's allocator object outlives the pool object and every MemPool wrapper.
        p = allocator.alloc(MiB, device.ordinal, None)
        alive = weakref.ref(pool)
        del pool, mp, mp2, used, again, inner
        gc.collect()
        assert alive() is not None  # the block PyTorch holds keeps the pool
        allocator.free(p, MiB, device.ordinal, None)
        gc.collect()
        assert alive() is None
        assert allocator.alloc(MiB, device.ordinal, None) is None  # callable, answers NULL
        pool = None
    finally:
        if pool is not None:
            pool.close()


def test_mempool_validates_before_building(monkeypatch: pytest.MonkeyPatch, host: vmmpool.Device) -> None:
    monkeypatch.setitem(sys.modules, "torch", FakeTorch())
    with pytest.raises(TypeError, match=r"must be a vmmpool\.PagePool"):
        vt.MemPool("cuda:0")  # type: ignore[arg-type]
    old = FakeTorch()
    old.cuda = types.SimpleNamespace(memory=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "torch", old)
    pool = vmmpool.PagePool(host, limit=4 * host.granularity)
    try:
        with pytest.raises(ImportError, match=r"has no torch\.cuda\.MemPool \(added in PyTorch 2\.5\)"):
            vt.MemPool(pool)
    finally:
        pool.close()


def test_mempool_refusing_a_host_pool_makes_no_pair(
    monkeypatch: pytest.MonkeyPatch, host: vmmpool.Device
) -> None:
    # The pair (two ctypes thunks kept for the life of the process) was made before the
    # host pool was refused: every refused call left one behind.
    monkeypatch.setitem(sys.modules, "torch", FakeTorch())
    pool = vmmpool.PagePool(host, limit=4 * host.granularity)
    pairs = len(vt._PAIRS)
    try:
        for _ in range(3):
            with pytest.raises(ValueError, match="needs a pool on a CUDA device"):
                vt.MemPool(pool)
            with pytest.raises(ValueError, match="needs a pool on a CUDA device"):
                with vt.use_pool(pool):
                    pass
        assert len(vt._PAIRS) == pairs
    finally:
        pool.close()


def test_mempool_is_registered_on_the_pools_device(
    standin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PyTorch registers a MemPool (and its allocator) on the device current when it is
    # made: built while cuda:0 was current, a pool on cuda:1 got nothing, and use_pool's
    # use_mem_pool(mp, 1) made a plain cudaMalloc private pool on cuda:1 for the same id.
    fake = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    pool = vmmpool.PagePool(vmmpool.Device(1), limit=8 * MiB)
    try:
        with vt.use_pool(pool) as mp:
            assert fake.current == 0  # the caller's current device is left alone
            assert fake.registered[1][id(mp)] is mp.allocator
            assert id(mp) not in fake.registered.get(0, {})
        for bad in (0, "cuda:0", types.SimpleNamespace(index=0), "cuda", "cpu"):  # "cuda": current (0)
            with pytest.raises(ValueError, match=r"must be the pool's device \(cuda:1\)"):
                with vt.use_pool(pool, device=bad):
                    pass
        with vt.use_pool(pool, device="cuda:1"):
            assert fake.used[0][1] == 1
    finally:
        pool.close()


def test_use_pool_in_two_threads_at_once(device: vmmpool.Device, monkeypatch: pytest.MonkeyPatch) -> None:
    # use_mem_pool routes one thread; two threads each in `with use_pool(pool)` got the same
    # MemPool, and PyTorch refused the second ("already recording to mempool_id").
    if device.is_host:
        pytest.skip("MemPool needs a CUDA pool")
    monkeypatch.setitem(sys.modules, "torch", FakeTorch())
    pool = vmmpool.PagePool(device, limit=8 * device.granularity)
    errors: list[BaseException] = []
    inside = threading.Barrier(2, timeout=10)

    def worker() -> None:
        try:
            with vt.use_pool(pool):
                inside.wait()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    try:
        assert not errors, errors
        assert vt._pair(pool).entered == {}
    finally:
        pool.close()


def test_mempool_refuses_torch_before_2_8(device: vmmpool.Device, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before 2.8 PyTorch frees a custom MemPool's segments with cudaFree outside its
    # use_mem_pool block (pytorch/pytorch#146431): cudaFree of vmmpool memory.
    pool = vmmpool.PagePool(device, limit=4 * device.granularity)
    try:
        for version, ok in (("2.5.1+cu124", False), ("2.7.0", False), ("2.8.0+cu128", True),
                            ("2.10.0a0+git1234", True), ("3.0", True)):
            fake = FakeTorch()
            fake.__version__ = version
            monkeypatch.setitem(sys.modules, "torch", fake)
            if device.is_host:
                continue  # refused as a host pool whatever the version (tested above)
            if ok:
                vt.MemPool(pool)
            else:
                wanted = r"needs PyTorch 2\.8 or later, got " + re.escape(version)
                with pytest.raises(ImportError, match=wanted):
                    vt.MemPool(pool)
    finally:
        pool.close()


def test_free_with_another_size_is_logged(
    pool: vmmpool.PagePool, device: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    alloc, free = c_functions(pool)
    d = ordinal(device)
    p = alloc(MiB, d, None)
    with caplog.at_level(logging.WARNING, logger="vmmpool.torch"):
        free(p, 12345, d, None)
    assert any("12345 bytes" in r.getMessage() and f"allocated as {MiB} bytes" in r.getMessage()
               for r in caplog.records), caplog.records
    assert pool.stats().live_allocations == 0


# ---------------------------------------------------------------------- GPU
def test_replay_has_a_torch_on_vmmpool_peer(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmpool import replay as R

    assert R.PEERS.index("torch-vmmpool") == R.PEERS.index("torch-expandable") + 1
    # MemPools with a custom allocator refuse expandable segments: never set for this peer.
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    argv, env = R.peer_command("torch-vmmpool", tmp_path / "t.pickle", 8 * MiB)
    assert argv[1:] == ["-m", "vmmpool.replay", "--peer", "torch-vmmpool",
                        str(tmp_path / "t.pickle"), "--limit", str(8 * MiB)]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env


def _torch_or_skip() -> Any:
    """torch, or skip; under VMMPOOL_REQUIRE_TORCH=1 (scripts/gpu_check.sh) a missing torch fails."""
    if os.environ.get("VMMPOOL_REQUIRE_TORCH", "") == "1":
        import torch

        return torch
    return pytest.importorskip("torch")


@pytest.mark.cuda
def test_torch_trains_on_the_pool(cuda: vmmpool.Device) -> None:
    """A small model trains a few steps with its tensors in a vmmpool MemPool (GPU only)."""
    torch = _torch_or_skip()
    known = vt._torch_version(torch)
    if known is not None and known < (2, 8):
        pytest.skip(f"vmmpool.torch.MemPool needs PyTorch 2.8 or later, found {torch.__version__}")
    torch.cuda.init()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_stats()
    pool = vmmpool.PagePool(cuda)
    torch.manual_seed(0)
    # use_mem_pool routes this thread only: backward on this thread too.
    with torch.autograd.set_multithreading_enabled(False), vt.use_pool(pool) as mp:
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
        ).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(64, 256, device="cuda")
        y = torch.randint(0, 10, (64,), device="cuda")
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        torch.cuda.synchronize()
    assert losses[-1] < losses[0], losses
    # Every parameter and gradient lives in memory the pool handed out.
    ranges = [(a.address, a.address + a.size) for p in pool.snapshot() for a in p.allocations]
    for prm in model.parameters():
        for t in (prm, prm.grad):
            assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), hex(t.data_ptr())
    del prm, t
    # PyTorch's accounting and the pool's agree: each segment PyTorch reserved since
    # `before` is one live allocation of the pool, of the same size.
    after = torch.cuda.memory_stats()
    s = pool.stats()
    segments = after["segment.all.current"] - before.get("segment.all.current", 0)
    reserved = after["reserved_bytes.all.current"] - before.get("reserved_bytes.all.current", 0)
    assert segments > 0 and reserved > 0
    assert (s.live_allocations, s.requested_bytes) == (segments, reserved), (s, segments, reserved)
    assert vt.outstanding(pool) == segments
    assert after["allocated_bytes.all.current"] - before.get("allocated_bytes.all.current", 0) <= reserved
    del model, opt, x, y, loss, mp
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert pool.stats().live_allocations == vt.outstanding(pool)
    pool.close()  # segments PyTorch still caches stay mapped until it frees them


def test_close_racing_alloc_never_hands_out_unmapped_memory(host: vmmpool.Device) -> None:
    # close() in another thread between the callback's malloc and its marking
    # the block held: close() saw an ordinary block and unmapped it, and the
    # callback handed PyTorch a dangling pointer (a segfault at its first use).
    # The interleaving is made deterministic: close() runs right after malloc.
    class ClosingPool(vmmpool.PagePool):
        def malloc(self, *args: Any, **kwargs: Any) -> Any:
            a = super().malloc(*args, **kwargs)
            self.close()
            return a

    before = host.counters().live
    pool = ClosingPool(host, limit=8 * host.granularity)
    alloc, free = c_functions(pool)
    p = alloc(MiB, 0, None)
    if p is not None:  # a pointer handed out must be mapped memory
        assert bytes(host.read(p, 4)) is not None
        free(p, MiB, 0, None)
    assert vt.outstanding(pool) == 0 and p is None
    gc.collect()
    assert host.counters().live == before


def test_snapshot_after_close_lists_no_page_pytorch_still_holds(
    host: vmmpool.Device, tmp_path: Any
) -> None:
    # close() keeps the arenas of blocks PyTorch holds mapped, but the pool owns
    # no page any more (stats() counts none): the snapshot listed them as cached,
    # and a dump's segments then disagreed with its history.
    from vmmpool import replay as R

    pool = vmmpool.PagePool(host, limit=8 * host.granularity)
    pool.record_history(context=None)
    alloc, free = c_functions(pool)
    p = alloc(3 * MiB, 0, None)
    pool.malloc(100)
    pool.close()
    assert pool.stats().total_pages == 0
    assert pool.snapshot() == []
    path = tmp_path / "held.pickle"
    pool.dump_snapshot(path)
    tr = R.load(str(path))
    assert tr.recorded_reserved[0] == (0, 0) and tr.recorded_reserved[-1][1] == 0, tr.recorded_reserved
    free(p, 3 * MiB, 0, None)
    gc.collect()
    assert pool.snapshot() == []


def test_last_free_after_close_while_the_lock_is_busy_releases_at_the_next_call(
    host: vmmpool.Device,
) -> None:
    # The last held block freed after close() while another thread held the
    # pool's lock: the free cannot wait, so the arena it kept mapped stayed
    # mapped until close() ran again or the pool was collected. Now the pool's
    # next call releases it.
    before = host.counters().live
    pool = vmmpool.PagePool(host, limit=8 * host.granularity)
    alloc, free = c_functions(pool)
    p = alloc(3 * MiB, 0, None)
    pool.close()
    assert host.counters().live != before
    with pool._core.lock:  # another thread is inside a call of the pool
        t = threading.Thread(target=free, args=(p, 3 * MiB, 0, None))
        t.start()
        t.join(10)
        assert not t.is_alive(), "the free waited for the pool's lock"
    assert vt.outstanding(pool) == 0
    pool.stats()  # the next call
    assert host.counters().live == before


def test_alloc_while_asleep_is_null_and_a_warning(
    host: vmmpool.Device, caplog: pytest.LogCaptureFixture
) -> None:
    # An asleep pool refuses malloc (AsleepError): an expected condition, logged
    # as misuse, not as a bug with a traceback at ERROR.
    pool = vmmpool.PagePool(host, limit=8 * host.granularity)
    alloc, free = c_functions(pool)
    p = alloc(MiB, 0, None)
    pool.sleep()
    with caplog.at_level(logging.INFO, logger="vmmpool.torch"):
        assert alloc(4096, 0, None) is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("asleep" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    free(p, MiB, 0, None)
    pool.wake()
    assert pool.stats().live_allocations == 0
    pool.close()

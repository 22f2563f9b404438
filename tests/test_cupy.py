"""vmmpool.cupy: the page pool as CuPy's allocator.

Without a GPU, CuPy still imports and `cupy.empty`, slicing and `del` work
with a custom allocator, which exercises the whole life cycle on the host
emulator. The GPU tests run real kernels.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

import vmmpool

cupy = pytest.importorskip("cupy")
vcupy = pytest.importorskip("vmmpool.cupy")

MiB = 1 << 20


@pytest.fixture(autouse=True)
def restore_cupy_allocator() -> Iterator[None]:
    previous = cupy.cuda.get_allocator()
    yield
    cupy.cuda.set_allocator(previous)


@pytest.fixture
def hostpool() -> Iterator[vcupy.MemoryPool]:
    dev = vmmpool.Device.emulated(capacity=32 * MiB)
    pool = vcupy.MemoryPool(dev)
    yield pool
    gc.collect()
    pool.close()
    assert dev.counters().live == (0, 0, 0)


def test_life_cycle_through_cupy_arrays(hostpool: vcupy.MemoryPool) -> None:
    with vcupy.using_pool(hostpool):
        a = cupy.empty((256, 1024), dtype=cupy.float32)  # 1 MiB
        stats = hostpool.stats()
        assert stats.n_malloc == 1
        assert stats.requested_bytes == MiB
        assert hostpool.used_bytes() >= MiB
        b = a[10:20]
        assert b.data.ptr == a.data.ptr + 10 * 1024 * 4
        ptr = a.data.ptr
        del a
        assert hostpool.stats().requested_bytes == MiB  # the slice keeps it alive
        del b
        assert hostpool.stats().requested_bytes == 0
        assert hostpool.used_bytes() == 0
        assert hostpool.n_free_blocks() >= 1 and hostpool.free_bytes() > 0
        c = cupy.empty((256, 1024), dtype=cupy.float32)
        assert c.data.ptr == ptr  # same-stream reuse from the cache
        assert hostpool.total_bytes() == hostpool.used_bytes() + hostpool.free_bytes()
        del c


def test_one_line_switch(hostpool: vcupy.MemoryPool) -> None:
    cupy.cuda.set_allocator(hostpool.malloc)
    x = cupy.empty(1000, dtype=cupy.int64)
    assert hostpool.stats().requested_bytes == 8000
    del x
    assert hostpool.stats().requested_bytes == 0


def test_limit_is_honoured_and_oom_is_cupys_error(hostpool: vcupy.MemoryPool) -> None:
    hostpool.set_limit(size=8 * MiB)
    assert hostpool.get_limit() == 8 * MiB
    with vcupy.using_pool(hostpool):
        keep = cupy.empty(6 * MiB, dtype=cupy.uint8)
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as info:
            cupy.empty(4 * MiB, dtype=cupy.uint8)
        assert isinstance(info.value, MemoryError)
        assert isinstance(info.value.__cause__, vmmpool.OutOfMemoryError)
        del keep
        ok = cupy.empty(4 * MiB, dtype=cupy.uint8)  # usable again
        del ok
    hostpool.set_limit(fraction=0.5)
    assert hostpool.get_limit() == 16 * MiB
    hostpool.set_limit()
    assert hostpool.get_limit() == 0
    with pytest.raises(ValueError, match="not both"):
        hostpool.set_limit(size=1, fraction=0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        hostpool.set_limit(fraction=1.5)


def test_a_limit_below_one_page_on_a_used_pool_refuses_every_allocation(
    hostpool: vcupy.MemoryPool,
) -> None:
    # Issue 17: this raised ValueError, yet get_limit() then said 1000.
    with vcupy.using_pool(hostpool):
        keep = cupy.empty(MiB, dtype=cupy.uint8)
        hostpool.set_limit(size=1000)
        assert hostpool.get_limit() == 1000
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError, match="limit set to: 1,000 bytes"):
            cupy.empty(100, dtype=cupy.uint8)
        assert hostpool.malloc(0).ptr == 0  # as CuPy: nothing to allocate, nothing refused
        hostpool.set_limit()
        assert hostpool.get_limit() == 0
        ok = cupy.empty(100, dtype=cupy.uint8)  # the limit is gone: usable again
        del ok, keep


def test_a_limit_below_one_page_before_first_use_raises_cupys_error() -> None:
    # Issue 17: accepted, then every malloc raised ValueError instead of CuPy's error.
    dev = vmmpool.Device.emulated(capacity=32 * MiB)
    pool = vcupy.MemoryPool(dev)
    pool.set_limit(size=1000)
    assert pool.get_limit() == 1000
    with vcupy.using_pool(pool):
        for _ in range(2):
            with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
                cupy.empty(1, dtype=cupy.uint8)
        pool.set_limit(size=4 * MiB)
        assert pool.get_limit() == 4 * MiB
        x = cupy.empty(3 * MiB, dtype=cupy.uint8)
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
            cupy.empty(2 * MiB, dtype=cupy.uint8)
        del x
    pool.close()
    assert dev.counters().live == (0, 0, 0)


def test_cupy_gpu_memory_limit_below_one_page_raises_cupys_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUPY_GPU_MEMORY_LIMIT", "1000")
    dev = vmmpool.Device.emulated(capacity=32 * MiB)
    pool = vcupy.MemoryPool(dev)
    with vcupy.using_pool(pool):
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
            cupy.empty(1, dtype=cupy.uint8)
    assert pool.get_limit() == 1000
    pool.close()


def test_a_failed_set_limit_keeps_the_old_limit(hostpool: vcupy.MemoryPool) -> None:
    hostpool.set_limit(size=16 * MiB)
    with vcupy.using_pool(hostpool):
        arrays = [cupy.empty(3 * MiB, dtype=cupy.uint8) for _ in range(3)]
        del arrays  # cached: lowering the limit must give these pages back
    dev = next(iter(hostpool.page_pools()))
    dev._backend.inject_fault("unmap", nth=1, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        hostpool.set_limit(size=2 * MiB)
    assert hostpool.get_limit() == 16 * MiB
    assert hostpool.stats().limit == 16 * MiB
    # Values refused before anything changes, even before the pool's first use.
    fresh = vcupy.MemoryPool(vmmpool.Device.emulated(capacity=32 * MiB))
    for bad in (1 << 64, -1):
        with pytest.raises(ValueError, match="size must be"):
            fresh.set_limit(size=bad)
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        fresh.set_limit(fraction=True)
    assert fresh.get_limit() == 0
    with pytest.raises(ValueError, match=r"got '9999999999.*\(str of 5000 characters\)"):
        vcupy.parse_limit("9" * 5000, 100)


@pytest.mark.parametrize(("env", "expected"), [("4194304", 4 * MiB), ("25%", 8 * MiB)])
def test_cupy_gpu_memory_limit_env(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: int
) -> None:
    monkeypatch.setenv("CUPY_GPU_MEMORY_LIMIT", env)
    dev = vmmpool.Device.emulated(capacity=32 * MiB)
    pool = vcupy.MemoryPool(dev)
    assert pool.get_limit() == expected
    with vcupy.using_pool(pool):
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
            cupy.empty(expected + 2 * MiB, dtype=cupy.uint8)
    pool.close()


def test_bad_env_limit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="percentage like '50%', got 'lots'"):
        vcupy.parse_limit("lots", 100)


def test_zero_bytes(hostpool: vcupy.MemoryPool) -> None:
    mp = hostpool.malloc(0)
    assert mp.ptr == 0
    assert hostpool.stats().n_malloc == 0


def test_free_all_blocks_returns_memory_to_the_driver(hostpool: vcupy.MemoryPool) -> None:
    with vcupy.using_pool(hostpool):
        arrays = [cupy.empty(3 * MiB, dtype=cupy.uint8) for _ in range(3)]
        del arrays
    assert hostpool.total_bytes() > 0
    hostpool.free_all_blocks()
    assert hostpool.total_bytes() == 0
    assert hostpool.n_free_blocks() == 0


def test_helpers_restore_the_previous_allocator(hostpool: vcupy.MemoryPool) -> None:
    before = cupy.cuda.get_allocator()
    with vcupy.using_pool(hostpool) as p:
        assert p is hostpool
        assert cupy.cuda.get_allocator() == hostpool.malloc
    assert cupy.cuda.get_allocator() is before
    installed = vcupy.set_allocator(hostpool)
    assert installed.pool is hostpool
    assert cupy.cuda.get_allocator() == hostpool.malloc
    installed.restore()
    assert cupy.cuda.get_allocator() is before
    with vcupy.set_allocator(hostpool) as p:
        assert p is hostpool
    assert cupy.cuda.get_allocator() is before
    with pytest.raises(TypeError, match=r"vmmpool\.cupy\.MemoryPool, got int"):
        vcupy.set_allocator(3)  # type: ignore[arg-type]


def test_default_pool_without_gpu_uses_host() -> None:
    if not vmmpool.default_device().is_host:
        pytest.skip("a GPU is present: the default pool follows CuPy's device")
    with pytest.warns(UserWarning, match="CuPy sees no GPU.*CuPy kernel on this memory"):
        pool = vcupy.MemoryPool()
    with vcupy.using_pool(pool):
        x = cupy.empty(10)
        assert pool.stats().requested_bytes == 80
        del x
    assert list(d.kind for d in pool.page_pools()) == ["host"]
    pool.close()


def test_import_without_cupy_says_what_to_install() -> None:
    code = "import sys; sys.modules['cupy'] = None\nimport vmmpool\nimport vmmpool.cupy\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "vmmpool.cupy needs CuPy" in out.stderr and "pip install" in out.stderr


# ---------------------------------------------------------------------- GPU
@pytest.fixture
def gpupool(cuda: vmmpool.Device) -> Iterator[vcupy.MemoryPool]:
    pool = vcupy.MemoryPool()
    yield pool
    cupy.cuda.Device(0).synchronize()
    gc.collect()
    pool.close()


@pytest.mark.cuda
def test_gpu_kernels_read_and_write_pool_memory(gpupool: vcupy.MemoryPool) -> None:
    rng = np.random.default_rng(0)
    with vcupy.using_pool(gpupool):
        for n in (1, 1000, 3 * MiB // 8, 5_000_001):
            h = rng.standard_normal(n)
            d = cupy.asarray(h)
            np.testing.assert_allclose(cupy.asnumpy(d * 2 + 1), h * 2 + 1)
            np.testing.assert_allclose(float(d.sum()), h.sum(), rtol=1e-9)
            del d
    assert gpupool.stats().n_malloc > 0


@pytest.mark.cuda
def test_gpu_fragmentation_where_cupys_pool_fails(gpupool: vcupy.MemoryPool) -> None:
    limit = 512 * MiB
    big, small = 64 * MiB, 1 * MiB

    def scenario(malloc: object) -> bool:
        blocks = [malloc(big) for _ in range(limit // big)]  # type: ignore[operator]
        del blocks  # cached in the pool
        smalls = [malloc(small) for _ in range(limit // small - 8)]  # type: ignore[operator]
        survivors = smalls[::20]  # ~5% pin every big segment
        del smalls
        try:
            malloc(limit // 2)  # type: ignore[operator]
            ok = True
        except cupy.cuda.memory.OutOfMemoryError:
            ok = False
        del survivors
        return ok

    ref = cupy.cuda.MemoryPool()
    ref.set_limit(size=limit)
    assert scenario(ref.malloc) is False  # the classic failure (cupy #536)
    ref.free_all_blocks()
    gpupool.set_limit(size=limit)
    assert scenario(gpupool.malloc) is True


@pytest.mark.cuda
def test_gpu_two_streams_with_reuse(gpupool: vcupy.MemoryPool) -> None:
    s1, s2 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    with vcupy.using_pool(gpupool):
        for i in range(20):
            with s1:
                a = cupy.full(1 << 20, i, dtype=cupy.float32)
                ra = a * 2
            with s2:
                b = cupy.full(1 << 20, -i, dtype=cupy.float32)
                rb = b * 3
            del a, b  # freed while kernels may still run: reused per stream
            s1.synchronize()
            s2.synchronize()
            assert float(ra[0]) == 2 * i and float(rb[-1]) == -3 * i


def test_explicit_host_pool_does_not_warn() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = vcupy.MemoryPool("host")
    pool.close()


def test_close_keeps_memory_of_live_cupy_arrays_mapped() -> None:
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = vcupy.MemoryPool(dev)
    with vcupy.using_pool(pool):
        x = cupy.empty(3 * MiB, dtype=cupy.uint8)
        y = cupy.empty(100, dtype=cupy.uint8)
    (pp,) = pool.page_pools().values()
    dev.write(x.data.ptr, memoryview(b"\x07" * 16))  # still mapped
    pool.close()
    assert pp.closed
    assert bytes(dev.read(x.data.ptr, 16)) == b"\x07" * 16  # not unmapped under x
    assert dev.counters().live[0] >= 1
    del x, y
    gc.collect()
    assert dev.counters().live == (0, 0, 0)


def test_close_racing_malloc_never_hands_out_unmapped_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # close() in another thread between the page pool's malloc and the shim's
    # marking the block held: close() saw an ordinary block and unmapped it, and
    # CuPy got a dangling pointer. Made deterministic: close() runs right after malloc.
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = vcupy.MemoryPool(dev)
    with vcupy.using_pool(pool):
        warm = cupy.empty(100, dtype=cupy.uint8)
    (pp,) = pool.page_pools().values()
    malloc = pp.malloc

    def closing_malloc(*args: object, **kwargs: object) -> object:
        a = malloc(*args, **kwargs)  # type: ignore[arg-type]
        pp.close()
        return a

    monkeypatch.setattr(pp, "malloc", closing_malloc)
    with vcupy.using_pool(pool), pytest.raises(vmmpool.ClosedError):
        cupy.empty(3 * MiB, dtype=cupy.uint8)
    del warm
    gc.collect()
    assert dev.counters().live == (0, 0, 0)


def test_bad_page_size_is_refused_at_construction() -> None:
    # Not at the first malloc, where the error would surface inside CuPy's call.
    with pytest.raises(ValueError, match="page_size must be a multiple"):
        vcupy.MemoryPool("host", page_size=3 << 20)
    with pytest.raises(TypeError, match="page_size"):
        vcupy.MemoryPool("host", page_size="2MiB")  # type: ignore[arg-type]
    pool = vcupy.MemoryPool("host", page_size=4 << 20)
    mem = pool.malloc(100)
    assert pool._pool().page_size == 4 << 20
    del mem
    pool.close()


def test_memory_pool_cannot_be_copied_or_pickled(hostpool: vcupy.MemoryPool) -> None:
    # A copy shared the page pools: closing it closed them under the original, whose
    # every later malloc then raised ClosedError. deepcopy and pickle failed on a lock.
    import copy
    import pickle

    with vcupy.using_pool(hostpool):
        a = cupy.empty(1024, dtype=cupy.uint8)
    for how, fn in (("copied", copy.copy), ("deep-copied", copy.deepcopy), ("pickled", pickle.dumps)):
        with pytest.raises(TypeError, match=f"MemoryPool objects cannot be {how}"):
            fn(hostpool)
    del a
    with vcupy.using_pool(hostpool):
        b = cupy.empty(1024, dtype=cupy.uint8)  # the pool is as it was
    assert hostpool.stats().n_malloc == 2
    del b


def test_set_limit_fraction_takes_any_real_number(hostpool: vcupy.MemoryPool) -> None:
    # numpy.float32(0.5) was refused as "fraction must be between 0 and 1, got 0.5".
    dev = hostpool._pinned
    assert dev is not None
    total = dev.total_memory
    for frac in (np.float32(0.5), np.float64(0.25), 1):
        hostpool.set_limit(fraction=frac)
        assert hostpool.get_limit() == int(total * float(frac))
    for bad in (float("nan"), -0.1, np.float32(1.5), "0.5", None.__class__):
        with pytest.raises(ValueError, match=r"fraction must be between 0 and 1 \(a real number\)"):
            hostpool.set_limit(fraction=bad)
    assert hostpool.get_limit() == total  # the last good limit (fraction 1) stays


def test_close_from_a_finalizer_inside_the_first_malloc_does_not_hang() -> None:
    # A user's __del__ closing the pool, collected while this thread made the device's page
    # pool inside malloc (the pool's plain lock held): close() waited for itself forever.
    import os
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent("""
        import gc, vmmpool, vmmpool.cupy as vc
        dev = vmmpool.Device.emulated(capacity=32 << 20)
        mp = vc.MemoryPool(dev)
        class Closer:
            def __init__(self):
                self.me = self
            def __del__(self):
                mp.close()
        real = vc.PagePool
        def hooked(*a, **k):  # the collector runs under the pool's lock
            vc.PagePool = real
            Closer()
            gc.collect()
            return real(*a, **k)
        vc.PagePool = hooked
        a = mp.malloc(1024)  # closed meanwhile: a fresh page pool serves it
        print("served", len(mp.page_pools()), a.mem.size)
        del a
        mp.malloc(1024)  # a new page pool: the pool works after close(), as CuPy expects
        mp.close()
        gc.collect()
        print("live", dev.counters().live)
    """)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: MemoryPool.close() from a finalizer inside malloc hung")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "served 1 1024" in out.stdout and "live (0, 0, 0)" in out.stdout, out.stdout


def test_a_cupy_stream_is_kept_while_the_pool_caches_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # malloc passed CuPy's current stream as its handle: CuPy destroys a Stream it no longer
    # references, and cached memory of that stream leaving it later recorded an event on the
    # destroyed handle (undefined behaviour on a GPU). The pool now holds the stream object
    # while it holds memory freed on it; the null stream stays 0.
    import weakref

    class FakeStream:  # what malloc reads of a cupy.cuda.Stream
        def __init__(self, ptr: int) -> None:
            self.ptr = ptr

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = vcupy.MemoryPool("host")
    page_pool = vmmpool.PagePool(dev, limit=8 * dev.granularity)
    pool._pinned = None  # follow "CuPy's current device" (0), served by this host pool
    pool._pools[0] = page_pool
    current: list[FakeStream] = [FakeStream(0x5000)]
    monkeypatch.setattr(vcupy._cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(vcupy._cupy.cuda, "get_current_stream", lambda *a: current[0])
    mem = pool.malloc(4096)
    assert mem.mem._owner.stream == 0x5000  # the handle, as before
    alive = weakref.ref(current[0])
    current[0] = FakeStream(0)  # the null stream is current now; the other is dropped
    del mem
    gc.collect()
    assert alive() is not None, "the pool must keep the stream while it caches its memory"
    null = pool.malloc(100)
    assert null.mem._owner.stream == 0
    del null
    page_pool.trim()  # the cached memory leaves the stream: the pool lets it go
    gc.collect()
    assert alive() is None
    pool.close()


def test_keep_cached_reaches_each_page_pool() -> None:
    with pytest.raises(TypeError, match="keep_cached must be a bool, got int"):
        vcupy.MemoryPool("host", keep_cached=1)  # type: ignore[arg-type]
    for keep in (False, True):
        pool = vcupy.MemoryPool("host", keep_cached=keep)
        mem = pool.malloc(100)
        assert pool._pool().keep_cached is keep
        del mem
        pool.close()


def test_a_failed_close_is_resumed_by_the_next_close() -> None:
    # close() dropped a page pool whose close() raised: a retry released nothing, and its
    # pages stayed live (outside any limit) until the garbage collector found it.
    dev = vmmpool.Device.emulated(capacity=32 * MiB)
    pool = vcupy.MemoryPool(dev)
    with vcupy.using_pool(pool):
        arrays = [cupy.empty(3 * MiB, dtype=cupy.uint8) for _ in range(2)]
        del arrays  # cached
    (pp,) = pool.page_pools().values()
    dev._backend.inject_fault("unmap", nth=1, name="CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(vmmpool.DriverError):
        pool.close()
    pool.close()  # resumes
    assert dev.counters().live == (0, 0, 0)
    del pp


def test_statistics_are_the_current_devices_as_cupys(monkeypatch: pytest.MonkeyPatch) -> None:
    # CuPy's MemoryPool answers used_bytes() ... free_all_blocks() for the current device;
    # these summed (and trimmed) every device.
    class NullStream:
        ptr = 0

    current = [0]
    monkeypatch.setattr(vcupy._cupy.cuda.runtime, "getDevice", lambda: current[0])
    monkeypatch.setattr(vcupy._cupy.cuda, "get_current_stream", lambda *a: NullStream())
    devs = [vmmpool.Device.emulated(capacity=64 * MiB) for _ in range(2)]
    pool = vcupy.MemoryPool("host")
    pool._pinned = None
    pool._pools = {0: vmmpool.PagePool(devs[0]), 1: vmmpool.PagePool(devs[1])}
    x = pool.malloc(4 * MiB)
    current[0] = 1
    y, z = pool.malloc(8 * MiB), pool.malloc(2 * MiB)
    del z
    current[0] = 0
    assert pool.used_bytes() == 4 * MiB
    assert pool.total_bytes() == pool.used_bytes() + pool.free_bytes() == 4 * MiB
    assert pool.n_free_blocks() == 0
    pool.free_all_blocks()
    assert pool._pools[1].stats().cached_bytes > 0  # another device's cache is left alone
    current[0] = 1
    assert pool.used_bytes() == 8 * MiB and pool.n_free_blocks() == 1
    current[0] = 2  # no pool there yet: nothing, and none is made
    assert (pool.used_bytes(), pool.free_bytes(), pool.total_bytes(), pool.n_free_blocks()) == (0,) * 4
    pool.free_all_blocks()
    assert sorted(pool._pools) == [0, 1]
    del x, y
    pool.close()
    assert [d.counters().live for d in devs] == [(0, 0, 0)] * 2


def test_statistics_while_another_thread_adds_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # used_bytes() iterated the page pools while a first malloc on another device added
    # one: "dictionary changed size during iteration".
    import threading

    class NullStream:
        ptr = 0

    local = threading.local()
    monkeypatch.setattr(vcupy._cupy.cuda.runtime, "getDevice", lambda: getattr(local, "dev", 0))
    monkeypatch.setattr(vcupy._cupy.cuda, "get_current_stream", lambda *a: NullStream())
    monkeypatch.setattr(vcupy, "Device", lambda key: vmmpool.Device.emulated(capacity=8 * MiB))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows in a few hundred tries
    pool = vcupy.MemoryPool("host")
    pool._pinned = None
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                pool.page_pools()
            except RuntimeError as err:  # pragma: no cover - the bug
                errors.append(err)

    t = threading.Thread(target=reader)
    t.start()
    keep = []
    try:
        for key in range(200):
            local.dev = key
            keep.append(pool.malloc(100))
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert not errors
    del keep
    pool.close()


def test_malloc_refuses_bad_sizes_before_a_limit_below_one_page(hostpool: vcupy.MemoryPool) -> None:
    # With a limit below one page, malloc(-1) said "Out of memory allocating -1 bytes" and
    # malloc("x") raised "Cannot specify ',' with 's'" while formatting CuPy's error.
    hostpool.set_limit(size=1000)
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        hostpool.malloc(-1)
    with pytest.raises(TypeError, match="nbytes must be an int, got str"):
        hostpool.malloc("x")  # type: ignore[arg-type]


def test_out_of_memory_reports_the_limit_as_set(hostpool: vcupy.MemoryPool) -> None:
    # With no limit CuPy says nothing of one; this said "limit set to: <device size>".
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as info:
        hostpool.malloc(64 * MiB)
    assert "limit set to" not in str(info.value)
    hostpool.set_limit(size=3 * MiB)  # in force: 2 MiB (whole pages); reported as set
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError, match="limit set to: 3,145,728 bytes"):
        hostpool.malloc(3 * MiB)


def test_a_limit_below_preallocate_before_the_first_malloc() -> None:
    # set_limit (or CUPY_GPU_MEMORY_LIMIT) below `preallocate` before the first malloc made
    # every malloc, inside CuPy's calls, raise ValueError; after it, the limit just applies.
    dev = vmmpool.Device.emulated(capacity=32 * MiB)
    pool = vcupy.MemoryPool(dev, preallocate=8 * MiB)
    pool.set_limit(size=4 * MiB)
    mem = pool.malloc(100)
    assert pool.stats().limit == 4 * MiB and pool.total_bytes() <= 4 * MiB
    del mem
    pool.close()
    with pytest.raises(ValueError, match="preallocate must not exceed the device's memory"):
        vcupy.MemoryPool(dev, preallocate=64 * MiB)
    assert dev.counters().live == (0, 0, 0)


def test_page_pool_closed_directly_is_replaced_by_the_next_malloc() -> None:
    # page_pools()[dev].close() left the shim handing every later malloc to the closed
    # page pool: ClosedError for good, where the shim's own close() makes fresh ones.
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = vcupy.MemoryPool(dev)
    with vcupy.using_pool(pool):
        x = cupy.empty(100, dtype=cupy.uint8)
        (pp,) = pool.page_pools().values()
        del x
        pp.close()
        y = cupy.empty(3 * MiB, dtype=cupy.uint8)
        (pp2,) = pool.page_pools().values()
        assert pp2 is not pp and not pp2.closed
        assert pp2.stats().live_allocations == 1
        dev.write(y.data.ptr, memoryview(b"\x05" * 8))
        assert bytes(dev.read(y.data.ptr, 8)) == b"\x05" * 8
        del y
    pool.close()
    gc.collect()
    assert dev.counters().live == (0, 0, 0)

"""Every object owns its process (issue 17 items 1 and 2): fork and copy.

Fork: the host emulator's memory is shared with a forked child (memfds mapped
``MAP_SHARED``), so a child that used or released its inherited objects would
overwrite or punch holes in the parent's live data. In the child every object
raises ForkedError (naming the owner and the child) and releases nothing: not
on close(), not from the garbage collector, not at interpreter exit. The
scenarios run in a subprocess (the child must be able to exit through a normal
interpreter shutdown), with a timeout (a lock a parent thread held at the fork
must not hang the child). On CUDA (the backend on a test double of the
driver) the child makes no driver call at all.

Copy: objects that own memory or track lifetimes refuse copy.copy,
copy.deepcopy and pickle with a TypeError.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fake_cuda_driver import FakeDriver

import vmmpool
from vmmpool import ForkedError
from vmmpool._backends import cuda as _cuda
from vmmpool._backends.cuda import CudaBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(code: str, timeout: float = 120) -> str:
    """Run `code` in a fresh interpreter; fail on a hang, a crash or an error."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hang: the script did not finish in {timeout} s\n{err.stdout!r}\n{err.stderr!r}")
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


# The parent's world: a pool with live, cached and viewed memory, buffers with and
# without the pool, and the three resource objects, each holding known bytes.
WORLD = """
import gc, json, os, signal, sys, threading
import numpy as np
import vmmpool
from vmmpool import ForkedError

dev = vmmpool.Device.emulated(capacity=128 << 20)
P = dev.granularity
pool = vmmpool.PagePool(dev, limit=32 * P)

def pat(seed, n):
    period = bytes((i * 7 + seed * 13 + 1) % 251 for i in range(251))
    return (period * (n // 251 + 1))[:n]

a = pool.malloc(3 * P + 100)            # live, spans pages
small = pool.malloc(1000)               # live, shares a page
pool.malloc(2 * P).free()               # cached blocks: a child's malloc would hand them out
pool.malloc(1000).free()
v = a.view("uint8")
arr = np.asarray(v)                     # a live array on the allocation
pbuf = vmmpool.GrowableBuffer(max_size=8 * P, pool=pool, initial_size=2 * P)
buf = vmmpool.GrowableBuffer(max_size=8 * P, device=dev, initial_size=2 * P)
res = vmmpool.reserve(2 * P, dev)
phys = vmmpool.create(P, dev)
m = res.map(phys, 0, access="rw")
phys2 = vmmpool.create(P, dev)          # not mapped
host = vmmpool.Device("host")
EXPECT = {
    "a": (lambda: dev.read(a.ptr, a.size), pat(1, 3 * P + 100)),
    "small": (lambda: dev.read(small.ptr, 1000), pat(2, 1000)),
    "pbuf": (lambda: pbuf.read(), pat(3, 2 * P)),
    "buf": (lambda: buf.read(), pat(4, 2 * P)),
    "mapping": (lambda: dev.read(m.address, P), pat(5, P)),
}
dev.write(a.ptr, pat(1, 3 * P + 100))
dev.write(small.ptr, pat(2, 1000))
pbuf.write(pat(3, 2 * P))
buf.write(pat(4, 2 * P))
dev.write(m.address, pat(5, P))
stats0 = pool.stats()
counters0 = dev.counters()

def verify(who):
    for name, (read, want) in EXPECT.items():
        got = bytes(read())
        assert got == want, f"after {who}: the parent's {name} bytes changed"
    assert bytes(arr[:64]) == pat(1, 64), f"after {who}: the parent's array changed"
    pool._check()
    assert pool.stats() == stats0, f"after {who}: {pool.stats()} != {stats0}"
    c = dev.counters()
    assert (c.live, c.physical_bytes) == (counters0.live, counters0.physical_bytes), (who, c)

def fork(child):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(60)  # a hang in the child fails the parent's wait, not the suite
        results = {}
        def attempt(name, fn, works=False):
            try:
                fn()
            except ForkedError as e:
                text = str(e)
                mine = f"process {os.getppid()};" in text and f"this is process {os.getpid()}" in text
                results[name] = "refused" if mine else "refused, but the message is: " + text
            except BaseException as e:
                results[name] = f"{type(e).__name__}: {e}"
            else:
                results[name] = "ok" if works else "ACCEPTED"
        try:
            child(attempt)
        except BaseException as e:
            results["child"] = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(results).encode())
        os.close(w)
        return True
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"
    results = json.loads(data)
    bad = {k: r for k, r in results.items() if r not in ("refused", "ok")}
    assert not bad, bad
    return False
"""

EVERY_USE = """
def every_use(attempt):
    attempt("malloc (a cached block)", lambda: pool.malloc(2 * P))
    attempt("malloc small", lambda: pool.malloc(1000))
    attempt("malloc new pages", lambda: pool.malloc(20 * P))
    attempt("Allocation.free", lambda: a.free())
    attempt("PagePool.free", lambda: pool.free(small))
    attempt("Allocation with-block", lambda: small.__exit__(None, None, None))
    attempt("Allocation.view", lambda: a.view())
    attempt("ArrayView.__dlpack__", lambda: v.__dlpack__())
    attempt("ArrayView.__array_interface__", lambda: v.__array_interface__)
    attempt("stats", pool.stats)
    attempt("snapshot", pool.snapshot)
    attempt("trim", pool.trim)
    attempt("defragment", pool.defragment)
    attempt("set_limit", lambda: pool.set_limit(8 * P))
    attempt("acquire_pages", lambda: pool.acquire_pages(1))
    attempt("release_pages", lambda: pool.release_pages([]))
    attempt("retire_stream", lambda: pool.retire_stream(3))
    attempt("record_history", lambda: pool.record_history())
    attempt("memory_stats", pool.memory_stats)
    attempt("reset_peak_memory_stats", pool.reset_peak_memory_stats)
    attempt("empty_cache", pool.empty_cache)
    attempt("memory_summary", pool.memory_summary)
    attempt("PagePool with-block", lambda: pool.__enter__())
    attempt("PagePool.close", pool.close)
    attempt("pooled buffer resize", lambda: pbuf.resize(4 * P))
    attempt("pooled buffer shrink", lambda: pbuf.resize(0))
    attempt("pooled buffer write", lambda: pbuf.write(b"child"))
    attempt("pooled buffer read", lambda: pbuf.read(4))
    attempt("pooled buffer view", lambda: pbuf.view())
    attempt("numpy.asarray(pooled buffer)", lambda: np.asarray(pbuf))
    attempt("numpy.from_dlpack(pooled buffer)", lambda: np.from_dlpack(pbuf))
    attempt("pooled buffer ptr", lambda: pbuf.ptr)
    attempt("pooled buffer close", pbuf.close)
    attempt("buffer shrink", lambda: buf.resize(0))
    attempt("buffer reserve", lambda: buf.reserve(6 * P))
    attempt("buffer shrink_to_fit", buf.shrink_to_fit)
    attempt("buffer close", buf.close)
    attempt("Device.write", lambda: dev.write(a.ptr, b"child"))
    attempt("Device.read", lambda: dev.read(a.ptr, 4))
    attempt("Device.synchronize", lambda: dev.synchronize())
    attempt("Device.total_memory", lambda: dev.total_memory)
    attempt("AddressReservation.map", lambda: res.map(phys2, P, access="rw"))
    attempt("AddressReservation.mappings", res.mappings)
    attempt("AddressReservation.unmap", lambda: res.unmap(0, P))
    attempt("AddressReservation.close", res.close)
    attempt("Mapping.set_access", lambda: m.set_access("r"))
    attempt("Mapping.close", m.close)
    attempt("PhysicalAllocation.close", phys2.close)
    attempt("PhysicalAllocation.export", phys2.export)
    attempt("create", lambda: vmmpool.create(P, dev))
    attempt("reserve", lambda: vmmpool.reserve(P, dev))
    attempt("new PagePool", lambda: vmmpool.PagePool(dev))
    attempt("new GrowableBuffer", lambda: vmmpool.GrowableBuffer(4 * P, device=dev))
    attempt("backend close", dev._backend.close)
    # Nothing above changed the child's view of the parent's objects either.
    attempt("still refused after all that", lambda: pool.malloc(100))
    # The child's own devices work: Device("host") is a new one in the child.
    d2 = vmmpool.Device.emulated(capacity=16 << 20)
    with vmmpool.PagePool(d2) as p2:
        x = p2.malloc(100)
        d2.write(x.ptr, b"own")
        assert bytes(d2.read(x.ptr, 3)) == b"own"
        x.free()
    attempt("old host device", lambda: vmmpool.create(host.granularity, host))
    assert vmmpool.Device("host") is not host
    vmmpool.create(host.granularity, "host").close()
    attempt("own devices", lambda: None, works=True)
"""


def test_forked_child_refuses_every_use_and_exits_without_releasing() -> None:
    """Every use raises ForkedError; then the child exits through interpreter shutdown."""
    out = run_script(WORLD + EVERY_USE + """
if fork(every_use):
    sys.exit(0)  # interpreter shutdown with every inherited object still alive
verify("a child that tried everything and exited")
# The parent's bookkeeping is intact: new blocks never overlap live ones.
c = pool.malloc(2 * P)
d = pool.malloc(1000)
dev.write(c.ptr, b"\\xff" * (2 * P))
dev.write(d.ptr, b"\\xee" * 1000)
for x in (a, small):
    assert not (c.ptr < x.ptr + x.size and x.ptr < c.ptr + c.size)
    assert not (d.ptr < x.ptr + x.size and x.ptr < d.ptr + d.size)
c.free(); d.free()
stats0, counters0 = pool.stats(), dev.counters()
verify("the parent's own mallocs")
del arr, v
a.free(); small.free()
pbuf.close(); buf.close(); m.close(); res.close(); phys.close(); phys2.close()
pool.close()
gc.collect()
assert dev.counters().live == (0, 0, 0), dev.counters()
print("OK")
""")
    assert out.strip().endswith("OK")


def test_forked_child_that_drops_everything_releases_nothing() -> None:
    """The child drops, collects and closes what it inherited (issue 17's hole punching)."""
    out = run_script(WORLD + """
def drop_everything(attempt):
    global a, small, v, arr, pbuf, buf, res, phys, phys2, m, pool
    for close in (pool.close, buf.close, pbuf.close, res.close, phys.close):
        try:  # refused; the parent's verify() below is what proves nothing was released
            close()
        except ForkedError:
            pass
    del a, small, v, arr, pbuf, buf, res, phys, phys2, m, pool
    gc.collect()
    attempt("dropped", lambda: None, works=True)

if fork(drop_everything):
    os._exit(0)
verify("a child that dropped everything")
print("OK")
""")
    assert out.strip().endswith("OK")


def test_forked_child_with_locks_held_by_a_parent_thread_does_not_hang() -> None:
    """A parent thread held the pool's, the backend's and a buffer's locks at the fork."""
    out = run_script(WORLD + """
held = threading.Event()
done = threading.Event()
def holder():
    with pool._core.lock, dev._backend._lock, buf._lock, res._state.lock:
        held.set()
        done.wait()
t = threading.Thread(target=holder)
t.start()
held.wait()

def locked(attempt):
    global v, arr, pbuf, buf
    attempt("malloc", lambda: pool.malloc(100))
    attempt("free", a.free)
    attempt("stats", pool.stats)
    attempt("PagePool.close", pool.close)
    attempt("buffer close", buf.close)
    attempt("buffer resize", lambda: buf.resize(0))
    attempt("buffer sleep", buf.sleep)  # issue 18's methods: refused before the lock too
    attempt("buffer wake", buf.wake)
    attempt("buffer sleep_stats", buf.sleep_stats)
    attempt("AddressReservation.close", res.close)
    attempt("AddressReservation.mappings", res.mappings)
    attempt("Device.read", lambda: dev.read(a.ptr, 4))
    del v, arr, pbuf, buf
    gc.collect()

if fork(locked):
    os._exit(0)
done.set()
t.join()
verify("a child forked while a thread held the locks")
print("OK")
""")
    assert out.strip().endswith("OK")


def test_fork_error_names_owner_and_child() -> None:
    err = ForkedError("PagePool", 100, 101)
    assert isinstance(err, vmmpool.ClosedError) and isinstance(err, vmmpool.VmmError)
    assert "PagePool belongs to process 100; this is process 101" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.what, back.owner_pid, back.pid, str(back)) == ("PagePool", 100, 101, str(err))


# ------------------------------------------------------------------- CUDA double
@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeDriver, CudaBackend]]:
    drv = FakeDriver()
    monkeypatch.setattr(_cuda, "_driver", lambda: drv)
    b = CudaBackend(0)
    yield drv, b
    gc.collect()
    assert b.counters().live == (0, 0, 0)
    assert drv.host.counters().live == (0, 0, 0), "driver resources leaked"
    b.close()
    assert drv.primary_refs == {0: 0, 1: 0}


def _in_child(fn: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run `fn` in a forked child (it must not return into pytest); return its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(r)
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"child": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    result: dict[str, object] = json.loads(data)
    return result


def test_forked_child_refuses_to_close_a_pool_that_holds_nothing(host: vmmpool.Device) -> None:
    """A pool open in the parent that holds no page or arena right now (its streams trimmed
    or retired and forgotten) is refused in the child like one that holds memory."""
    pool = vmmpool.PagePool(host, limit=8 * host.granularity)
    pool.malloc(100, stream=1).free()
    pool.trim()
    assert not pool._core.arenas and not pool._core.pages

    def child() -> dict[str, object]:
        try:
            pool.close()
        except vmmpool.ForkedError:
            return {"close": "refused"}
        return {"close": "accepted"}

    assert _in_child(child) == {"close": "refused"}
    pool.malloc(100).free()  # the parent's pool is untouched
    pool.close()


def test_forked_child_makes_no_cuda_driver_call(fake_backend: tuple[FakeDriver, CudaBackend]) -> None:
    """On CUDA a forked child cannot use the parent's context: it refuses and calls nothing.

    The child also drops every object it inherited and collects: no finalizer may
    call the driver either.
    """
    drv, backend = fake_backend
    dev = vmmpool.Device._from_backend(backend)
    P = dev.granularity
    pool = vmmpool.PagePool(dev, limit=16 * P)
    held: dict[str, object] = {"pool": pool}
    held["a"] = a = pool.malloc(P + 10)
    dev.write(a.ptr, b"parent")
    pool.malloc(2 * P).free()
    held["buf"] = vmmpool.GrowableBuffer(max_size=4 * P, device=dev, initial_size=P)
    held["pooled buf"] = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
    held["phys"] = vmmpool.create(P, dev)
    held["view"] = a.view()
    ptr = a.ptr
    del a, pool
    stats0 = held["pool"].stats()  # type: ignore[attr-defined]

    def child() -> dict[str, object]:
        before = dict(drv.calls)
        out: dict[str, object] = {}
        h: dict[str, Any] = held
        for name, fn in [
            ("malloc", lambda: h["pool"].malloc(2 * P)),
            ("free", h["a"].free),
            ("close", h["pool"].close),
            ("buffer close", h["buf"].close),
            ("pooled buffer close", h["pooled buf"].close),
            ("release", h["phys"].close),
            ("view", h["a"].view),
            ("read", lambda: dev.read(ptr, 6)),
            ("backend close", backend.close),
        ]:
            try:
                fn()
                out[name] = "ACCEPTED"
            except ForkedError:
                out[name] = "refused"
        held.clear()  # the child's copy: every inherited object dies here
        gc.collect()
        out["driver calls"] = {k: n - before.get(k, 0) for k, n in drv.calls.items() if n != before.get(k, 0)}
        return out

    got = _in_child(child)
    del child
    assert "driver calls" in got, got  # else the child failed: its error is in `got`
    assert got.pop("driver calls") == {}
    assert got == dict.fromkeys(got, "refused") and len(got) == 9
    h: dict[str, Any] = held
    assert bytes(dev.read(ptr, 6)) == b"parent"
    assert h["pool"].stats() == stats0
    h["pool"]._check()
    del h["view"]
    h["a"].free()
    h["buf"].close()
    h["pooled buf"].close()
    h["phys"].close()
    h["pool"].close()


# ------------------------------------------------------------------------ copy
def _objects(dev: vmmpool.Device) -> tuple[list[object], Callable[[], None]]:
    """One object of each kind that owns memory or tracks a lifetime, and their cleanup."""
    P = dev.granularity
    pool = vmmpool.PagePool(dev, limit=8 * P)
    a = pool.malloc(100)
    buf = vmmpool.GrowableBuffer(max_size=2 * P, device=dev, initial_size=P)
    res = vmmpool.reserve(P, dev)
    phys = vmmpool.create(P, dev)
    m = res.map(vmmpool.create(P, dev), 0)
    objs: list[object] = [a.view(), a, pool, buf, res, phys, m, buf.view()]

    def cleanup() -> None:
        objs.clear()
        a.free()
        pool.close()
        buf.close()
        m.allocation.close()
        res.close()
        phys.close()

    return objs, cleanup


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_lifetime_objects_refuse_copy_and_pickle(device: vmmpool.Device, how: str) -> None:
    fn = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how]
    done = {"copy": "copied", "deepcopy": "deep-copied", "pickle": "pickled"}[how]
    objs, cleanup = _objects(device)
    try:
        kinds = {type(o).__name__ for o in objs}
        assert kinds == {
            "ArrayView", "Allocation", "PagePool", "GrowableBuffer", "AddressReservation",
            "PhysicalAllocation", "Mapping",
        }
        for obj in objs:
            cls = type(obj).__name__
            with pytest.raises(TypeError, match=f"^{cls} objects cannot be {done}:") as err:
                fn(obj)
            if how == "pickle" and cls in ("Allocation", "GrowableBuffer"):
                # Pickling is how objects reach another process: the error says how memory does.
                assert f"send {cls}.share()'s handle" in str(err.value)
            if how != "copy":  # a shallow copy of a container does not copy its items
                with pytest.raises(TypeError, match=f"^{cls} objects cannot be {done}:"):
                    fn({"inside": [obj]})
    finally:
        cleanup()


def test_copy_cannot_escape_view_tracking(device: vmmpool.Device) -> None:
    """Issue 17 item 2: a copied view or allocation let free() / close() run under a live array."""
    P = device.granularity
    pool = vmmpool.PagePool(device, limit=8 * P)
    a = pool.malloc(4096)
    v = a.view()
    with pytest.raises(TypeError):
        copy.copy(v)
    with pytest.raises(TypeError):
        copy.copy(a)
    with pytest.raises(BufferError):
        a.free()  # the one view still counts
    del v
    a.free()
    with pytest.raises(TypeError):
        copy.copy(pool)
    pool.close()


def test_devices_copy_to_themselves(device: vmmpool.Device) -> None:
    assert copy.copy(device) is device and copy.deepcopy(device) is device
    arr = np.zeros(3)
    assert copy.deepcopy({"dev": device, "x": arr})["dev"] is device


def test_forked_child_refuses_share_with_locks_held_by_a_parent_thread() -> None:
    """Sharing (issue 18) after a fork (issue 17): refused or usable, never a hang.

    A parent thread held a shareable buffer's lock, a handle's and a mapping's
    at the fork. The child's share() of the buffer and every use of the
    inherited mapping raise ForkedError (the mapping's close() is a no-op); the
    inherited handle is the child's own copy of the descriptors, so the child
    may open and close it.
    """
    out = run_script(WORLD + """
spool = vmmpool.PagePool(dev, shareable=True)
sa = spool.malloc(1000)
dev.write(sa.ptr, pat(6, 1000))
sbuf = vmmpool.GrowableBuffer(max_size=8 * P, device=dev, initial_size=P, shareable=True)
sbuf.write(pat(7, P))
h = sa.share()
sm = h.open(dev)
counters0 = dev.counters()  # verify() counts these too
held = threading.Event()
done = threading.Event()
def holder():
    with sbuf._lock, h._lock, sm._lock:
        held.set()
        done.wait()
t = threading.Thread(target=holder)
t.start()
held.wait()

def locked(attempt):
    attempt("shareable buffer share", sbuf.share)
    attempt("Allocation.share", sa.share)
    attempt("SharedMapping.read", lambda: sm.read(4))
    attempt("SharedMapping.write", lambda: sm.write(b"child"))
    attempt("SharedMapping.view", sm.view)
    attempt("SharedMapping.address", lambda: sm.address)
    attempt("SharedMapping.close", sm.close, works=True)
    def own_mapping():
        with h.open(vmmpool.Device("host")) as m2:
            assert bytes(m2.read(1000)) == pat(6, 1000)
        h.close()
    attempt("SharedMemoryHandle.open", own_mapping, works=True)

if fork(locked):
    os._exit(0)
done.set()
t.join()
verify("a child forked while a thread held the sharing locks")
assert bytes(sm.read(1000)) == pat(6, 1000) and bytes(sbuf.read()) == pat(7, P)
sm.close(); h.close(); sa.free(); sbuf.close(); spool.close()
print("OK")
""")
    assert out.strip().endswith("OK")


def test_forked_child_refuses_with_other_locks_held_by_a_parent_thread() -> None:
    """The locks the fork hooks did not replace: a reservation's (``access_at`` took it
    without checking the process), ``vmmpool.torch``'s module lock (a pool the child
    makes must still get its callbacks) and a ``vmmpool.cupy.MemoryPool``'s."""
    out = run_script(WORLD + """
import vmmpool.torch as vt
try:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import vmmpool.cupy as vc
    cpool = vc.MemoryPool(device=dev)
    cpool.malloc(100)
    cpool_lock = cpool._lock._lock
except ImportError:
    cpool = None
    cpool_lock = threading.RLock()
counters0 = dev.counters()  # verify() counts the cupy pool's page too
held = threading.Event()
done = threading.Event()
def holder():
    with res._state.lock, vt._LOCK, cpool_lock:
        held.set()
        done.wait()
t = threading.Thread(target=holder)
t.start()
held.wait()

def locked(attempt):
    attempt("AddressReservation.access_at", lambda: res.access_at(0))
    def own_pool_callbacks():
        d2 = vmmpool.Device.emulated(capacity=16 << 20)
        with vmmpool.PagePool(d2) as p2:
            assert all(vt.callbacks(p2))
    attempt("torch callbacks of the child's own pool", own_pool_callbacks, works=True)
    if cpool is not None:
        attempt("cupy MemoryPool.close", cpool.close)
        attempt("cupy MemoryPool.malloc", lambda: cpool.malloc(100))

if fork(locked):
    os._exit(0)
done.set()
t.join()
verify("a child forked while a thread held the reservation, torch and cupy locks")
print("OK")
""")
    assert out.strip().endswith("OK")


def test_forked_child_garbage_collection_never_closes_descriptor_numbers_it_reused() -> None:
    """A child that closed its inherited descriptors and opened files of its own (a daemon,
    a worker that sanitises its descriptors) keeps them when the inherited device, share
    handle, lease and mapping are collected: their safety nets used to close by number."""
    out = run_script("""
import gc, os
import vmmpool
dev = vmmpool.Device.emulated(capacity=64 << 20)
P = dev.granularity
pool = vmmpool.PagePool(dev, shareable=True)
a = pool.malloc(P)
h = a.share()
m = h.open(dev)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.closerange(3, 4096)
    mine = [os.open(os.devnull, os.O_RDONLY) for _ in range(16)]
    del a, h, m, pool, dev
    gc.collect()
    lost = []
    for fd in mine:
        try:
            os.fstat(fd)
        except OSError:
            lost.append(fd)
    os._exit(0 if not lost else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child's own descriptors were closed"
# An untouched child still stops counting as a receiver when it drops its copies.
pid = os.fork()
if pid == 0:
    del h, m
    gc.collect()
    os._exit(0)
os.waitpid(pid, 0)
m.close(); h.close(); a.free()
assert pool.stats().allocated_bytes == 0, pool.stats()
pool.close()
print("OK")
""")
    assert out.strip().endswith("OK")


def test_memory_the_parent_releases_is_not_kept_by_a_forked_child() -> None:
    """The host emulator's memory files are shared with a forked child, whose inherited
    mappings keep a file alive: memory released by closing its file (a shareable page that
    was never exported, a chunk closed) stayed committed while the child lived. On a GPU a
    child holds none of its parent's memory."""
    out = run_script("""
import os, signal, time
import vmmpool
dev = vmmpool.Device.emulated(capacity=256 << 20)
P = dev.granularity
buf = vmmpool.GrowableBuffer(max_size=8 * P, device=dev, initial_size=8 * P, shareable=True)
buf.write(b"\\x01" * (8 * P))
fds = [p.fd for p in dev._backend._physical.values()]
assert len(fds) == 8
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, b"x")
    time.sleep(60)
    os._exit(0)
os.read(r, 1)
buf.close()
try:
    kept = sum(os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512 for fd in fds)
finally:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
assert kept == 0, f"{kept} bytes the parent released are still committed"
print("OK")
""")
    assert out.strip().endswith("OK")


def test_forked_child_collecting_the_emulated_device_keeps_its_own_descriptors() -> None:
    """The emulated device's safety net closed its memory files by number: a child that
    closed its inherited descriptors and reused the numbers lost its own files when it
    dropped the device (the test above keeps the device alive through its share)."""
    out = run_script("""
import gc, os, weakref
import vmmpool
dev = vmmpool.Device.emulated(capacity=64 << 20)
P = dev.granularity
pool = vmmpool.PagePool(dev, shareable=True)
a = pool.malloc(P)
b = pool.malloc(P)
wb = weakref.ref(dev._backend)
pid = os.fork()
if pid == 0:
    os.closerange(3, 4096)
    mine = [os.open(os.devnull, os.O_RDONLY) for _ in range(32)]
    del a, b, pool, dev
    gc.collect()
    lost = [fd for fd in mine if not os.path.exists(f"/proc/self/fd/{fd}")]
    os._exit(0 if not lost and wb() is None else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child's own descriptors were closed"
a.free(); b.free(); pool.close()
print("OK")
""")
    assert out.strip().endswith("OK")

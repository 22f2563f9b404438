"""Nothing the garbage collector runs may block on a lock the interrupted code holds.

Each scenario runs in a subprocess with a timeout: a deadlock is a hang, and a
hang must fail the test rather than the whole suite. The scenarios follow
issue 8 item 1: a pooled GrowableBuffer in a reference cycle, collected while
the pool mallocs and defragments (one thread and four), a closed buffer whose
last view sits in a cycle, and the cyclic GC forced inside every backend call
(so inside every locked slow path of the pool and of the buffers).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import gc, sys, threading, time
import vmmpool
dev = vmmpool.Device.emulated(capacity=256 << 20)
P = dev.granularity
"""


def run_script(body: str, timeout: float = 120) -> str:
    """Run PRELUDE + `body` in a fresh interpreter; fail on a hang or an error."""
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"deadlock: the script did not finish in {timeout} s\n{err.stdout!r}\n{err.stderr!r}")
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_buffer_in_cycle_collected_during_malloc_and_defragment() -> None:
    out = run_script("""
        pool = vmmpool.PagePool(dev, limit=64 * P)
        class Req:
            def __init__(self):
                self.kv = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
                self.cb = self.done
            def done(self):
                pass
        for i in range(1000):
            r = Req(); del r
            pool.malloc(2 * P, stream=i % 5).free(); pool.defragment()
        gc.collect()
        pool.stats()  # runs the releases the collector deferred
        s = pool.stats()
        assert s.acquired_pages == 0, s
        pool.close()
        print("live", dev.counters().live)
    """)
    assert "live (0, 0, 0)" in out


def test_buffer_in_cycle_four_threads() -> None:
    out = run_script("""
        pool = vmmpool.PagePool(dev, limit=64 * P)
        class Req:
            def __init__(self):
                self.kv = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
                self.cb = self.done
            def done(self):
                pass
        errors = []
        def work(t):
            try:
                for i in range(150):
                    r = Req(); del r
                    a = pool.malloc(2 * P, stream=t)
                    b = pool.malloc(4096, stream=t)
                    a.free(); del b
                    if i % 3 == 0:
                        pool.defragment()
            except Exception as e:  # an OOM would be a bug too: 4 threads need <= 16 pages
                errors.append(repr(e))
        ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        assert not errors, errors
        gc.collect(); pool.stats()
        assert pool.stats().acquired_pages == 0
        pool.close()
        print("live", dev.counters().live)
    """, timeout=240)
    assert "live (0, 0, 0)" in out


def test_closed_buffer_with_last_view_in_cycle() -> None:
    out = run_script("""
        pool = vmmpool.PagePool(dev, limit=64 * P)
        class Holder:
            def __init__(self, v):
                self.v = v
                self.me = self
        for i in range(300):
            buf = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
            h = Holder(buf.view("uint8"))
            buf.close()  # deferred: the view still uses the memory
            del buf, h
            pool.malloc(2 * P, stream=i % 3).free()
            pool.defragment()
        gc.collect(); pool.stats()
        assert pool.stats().acquired_pages == 0, pool.stats()
        pool.close()
        print("live", dev.counters().live)
    """)
    assert "live (0, 0, 0)" in out


def test_gc_forced_inside_every_backend_call() -> None:
    """gc.collect() runs at the start of every backend call, with garbage cycles waiting.

    The garbage holds pooled buffers, plain buffers, allocations of the pool,
    allocations of a second pool that is itself garbage, and closed buffers
    whose last view is in a cycle: every kind of finalizer the library has.
    """
    out = run_script("""
        from vmmpool._backends.base import OPERATIONS
        backend = dev._backend
        depth = [0]
        collections = [0]
        def wrap(name):
            orig = getattr(backend, name)
            def call(*a, **k):
                if depth[0] == 0:
                    depth[0] += 1
                    try:
                        gc.collect()
                        collections[0] += 1
                    finally:
                        depth[0] -= 1
                return orig(*a, **k)
            return call
        gc.disable()
        pool = vmmpool.PagePool(dev, limit=48 * P)
        class Cycle:
            def __init__(self, obj):
                self.obj = obj
                self.me = self
        def garbage():
            Cycle(vmmpool.GrowableBuffer(max_size=2 * P, pool=pool, initial_size=P))
            Cycle(vmmpool.GrowableBuffer(max_size=2 * P, device=dev, initial_size=P))
            Cycle(pool.malloc(3 * P))
            Cycle(pool.malloc(1000))
            other = vmmpool.PagePool(dev, limit=4 * P)
            Cycle((other, other.malloc(P)))
            b = vmmpool.GrowableBuffer(max_size=2 * P, pool=pool, initial_size=P)
            Cycle(b.view("uint8"))
            b.close()
        for name in OPERATIONS:
            if hasattr(backend, name):
                setattr(backend, name, wrap(name))
        buf = vmmpool.GrowableBuffer(max_size=8 * P, pool=pool)
        for i in range(40):
            garbage()
            a = pool.malloc((1 + i % 4) * P, stream=i % 3)
            s = pool.malloc(5000, stream=i % 2)
            a.free()
            if i % 2:
                pool.defragment()
            if i % 5 == 0:
                pool.trim()
            pages = pool.acquire_pages(2)
            pool.release_pages(pages)
            buf.resize((i % 8) * P)
            pool.set_limit((44 + i % 4) * P)
            s.free()
        buf.close()
        gc.enable(); gc.collect(); pool.stats()
        pool._check()
        assert pool.stats().acquired_pages == 0
        pool.close()
        gc.collect()
        print("collections", collections[0], "live", dev.counters().live)
    """, timeout=300)
    assert "live (0, 0, 0)" in out
    n = int(out.split()[1])
    assert n > 500, out  # the GC really ran inside the backend calls


def test_resource_finalizer_inside_a_backend_call_is_deferred_not_reentrant() -> None:
    """A reservation/allocation collected in the middle of a backend call of the same thread.

    The backend's lock is re-entrant: running the release there would change the backend's
    state under the interrupted call. It is queued and run by the backend's next call.
    """
    import gc as _gc

    import vmmpool

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    b = dev._backend
    g = dev.granularity

    class Cycle:
        def __init__(self) -> None:
            self.me = self
            self.res = vmmpool.reserve(g, dev)
            self.phys = vmmpool.create(g, dev)
            self.m = self.res.map(self.phys, 0, access="rw")

    seen: list[tuple[int, int, int, int]] = []
    orig = type(b).get_access

    def get_access_with_gc(self: object, address: int, device: int) -> object:
        with b._lock:  # as the backend holds it during its own work
            Cycle()  # garbage at once (a cycle)
            _gc.collect()
            seen.append((b._live_reservations, b._live_allocations, b._live_mappings, len(b._deferred)))
        return orig(self, address, device)  # type: ignore[arg-type]

    keep = vmmpool.reserve(g, dev)
    phys = vmmpool.create(g, dev)
    m = keep.map(phys, 0, access="rw")
    type(b).get_access = get_access_with_gc  # type: ignore[method-assign]
    try:
        m.get_access()
    finally:
        type(b).get_access = orig  # type: ignore[method-assign]
    # Inside the call nothing of the collected cycle was released: it was queued...
    (inside,) = seen
    assert inside[:3] == (2, 2, 2) and inside[3] >= 1
    # ...and the next call (the interrupted get_access itself, once out of the lock) released it.
    assert not b._deferred
    assert dev.counters().live == (1, 1, 1)
    phys.close()
    keep.close()
    assert dev.counters().live == (0, 0, 0)


def test_many_releases_deferred_inside_backend_calls_are_all_run() -> None:
    """With the GC running at nearly every allocation, many releases queue inside backend
    calls; they are all run (in one loop, not by recursion) and nothing leaks."""
    out = run_script("""
        from vmmpool import reserve, create
        dev = vmmpool.Device.emulated(capacity=2 << 30)  # room for garbage the GC has not reached
        gc.set_threshold(1, 1, 1)
        for i in range(300):
            r = reserve(4 << 20, dev); ph = create(2 << 20, dev); m = r.map(ph); del r, ph, m
        gc.set_threshold(700, 10, 10); gc.collect()
        print("live", dev.counters().live)
    """)
    assert "live (0, 0, 0)" in out


# Issue 17 item 4: a user's __del__ that frees an allocation (an object in a reference cycle).
USER_DEL = """
errors = []
class Owner:
    # a user's object in a reference cycle whose __del__ frees its allocation
    def __init__(self, a):
        self.a = a
        self.me = self
    def __del__(self):
        try:
            self.a.free()
        except Exception as e:
            errors.append(repr(e))
"""


def test_user_del_freeing_in_a_cycle_collected_inside_malloc() -> None:
    """The GC runs inside malloc's locked section (in its backend calls and, with a
    threshold of 1, nearly everywhere): the free is queued, never waited for, and
    done when malloc lets go of the lock. Before the fix this hung on the first cycle."""
    out = run_script(USER_DEL + textwrap.dedent("""
        pool = vmmpool.PagePool(dev, limit=64 * P)
        backend = dev._backend
        inside = [0]
        for name in ("create", "map", "set_access", "reserve", "unmap", "event_record",
                     "event_query"):
            orig = getattr(backend, name)
            def call(*a, _orig=orig, **k):
                if gc.collect():
                    inside[0] += 1
                return _orig(*a, **k)
            setattr(backend, name, call)
        gc.disable()
        checked = 0
        for i in range(60):
            Owner(pool.malloc(1000 + 64 * i, stream=i % 3))
            Owner(pool.malloc(2 * P, stream=i % 3))
            n = inside[0]
            keep = pool.malloc(3 * P, stream=3 + i % 4)  # slow path: GC inside its calls
            if inside[0] > n:  # the cycles were collected inside this malloc's locked section:
                core = pool._core  # their frees were done when it let go of the lock (no later call)
                assert core.n_live == 1 and not core.pending, (core.n_live, core.pending)
                checked += 1
            keep.free()
        assert checked > 10, checked
        gc.enable()
        gc.set_threshold(1, 1, 1)  # the GC runs at (nearly) every allocation, hot path too
        for i in range(300):
            Owner(pool.malloc(100 + i, stream=i % 2))
            pool.malloc(700 + i, stream=i % 2).free()
        gc.set_threshold(700, 10, 10)
        gc.collect()
        s = pool.stats()
        assert s.live_allocations == 0 and s.n_free == s.n_malloc, s
        pool._check()
        pool.close()
        print("errors", len(errors), errors[:3], "live", dev.counters().live)
    """), timeout=60)
    assert "errors 0 [] live (0, 0, 0)" in out, out


def test_user_del_calling_the_pool_inside_its_lock_raises_instead_of_hanging() -> None:
    """Only free() is deferred; any other pool call from such a finalizer raises at once."""
    out = run_script("""
        pool = vmmpool.PagePool(dev, limit=16 * P)
        seen = []
        class Asker:
            def __init__(self):
                self.me = self
            def __del__(self):
                try:
                    pool.stats()
                except Exception as e:
                    seen.append(type(e).__name__ + ": " + str(e)[:40])
        orig = dev._backend.map
        def m(*a, **k):
            gc.collect()
            return orig(*a, **k)
        dev._backend.map = m
        gc.disable()
        Asker()
        pool.malloc(P).free()
        dev._backend.map = orig
        gc.enable()
        print(seen)
        pool.close()
    """, timeout=60)
    assert "['ReentryError: PagePool called from a finalizer or sign']" in out, out


# The scene: thread A holds the backend's lock (a finalizer runs inside a backend call),
# thread B holds the pool's lock and waits for the backend's. setup() runs there, then the
# finalizer's free of `a`, then after() (if given), still inside A's call; returns B's
# allocation.
_BACKEND_SCENE = """
def scene(pool, a, setup, after=None):
    core = pool._core
    backend = dev._backend
    inside = threading.Event()
    done = []
    orig_enter = backend._enter
    def enter(op):  # B: inside the pool's lock, about to need the backend's
        if threading.current_thread() is not threading.main_thread():
            inside.set()
        return orig_enter(op)
    backend._enter = enter
    def b_thread():
        done.append(pool.malloc(4 * P))
    with backend._lock:  # A, as if inside a backend call
        t = threading.Thread(target=b_thread)
        t.start()
        assert inside.wait(10)
        time.sleep(0.05)
        assert core.lock.locked() and core.owner == t.ident
        setup()
        a.free()  # a user's __del__ would do this from the GC: must not wait
        if after is not None:
            after()
    t.join(10)
    assert not t.is_alive()
    backend._enter = orig_enter
    return done[0]
"""


def test_free_inside_a_backend_call_while_another_thread_holds_the_pool_lock() -> None:
    """Thread A is inside a backend call (it holds the backend's lock) when a finalizer of
    A frees an allocation; thread B holds the pool's lock and waits for the backend's lock
    (its malloc maps a page). Waiting for the pool's lock there would deadlock: the free is
    queued, and B does it when it lets go of the pool's lock."""
    out = run_script(_BACKEND_SCENE + """
pool = vmmpool.PagePool(dev, limit=32 * P)
a = pool.malloc(1000)
core = pool._core
def after():  # still inside A's backend call
    assert core.n_live == 1 and len(core.pending) == 1  # queued, not done yet
    for call in (lambda: pool.malloc(100), pool.stats):  # anything else raises at once
        try:
            call()
        except RuntimeError as e:
            print("reentry", type(e).__name__ == "ReentryError" and "driver call" in str(e))
b = scene(pool, a, lambda: None, after)
assert core.n_live == 1 and not core.pending, (core.n_live, core.pending)
try:
    a.free()
except ValueError as e:
    print("double", str(e).split()[-2:])
b.free()
pool._check()
pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "double ['already', 'freed']" in out and "live (0, 0, 0)" in out, out
    assert out.count("reentry True") == 2, out


def test_free_inside_a_backend_call_runs_no_queued_task_that_waits_for_the_pool() -> None:
    """Another thread dropped a pooled buffer meanwhile: its release is a task (it takes the
    pool's lock). The free ran the tasks first, and so waited for B: a deadlock."""
    out = run_script(_BACKEND_SCENE + """
pool = vmmpool.PagePool(dev, limit=32 * P)
a = pool.malloc(1000)
buf = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
def drop_buf():
    global buf
    del buf
    gc.collect()
def setup():  # another thread drops the buffer: its release is queued as a task
    c = threading.Thread(target=drop_buf)
    c.start()
    c.join()
    assert len(pool._core.tasks) == 1
b = scene(pool, a, setup)
assert pool._core.n_live == 1 and pool.stats().acquired_pages == 0  # the next call ran the task
b.free()
pool._check()
pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_free_of_a_shareable_pools_allocation_inside_a_backend_call() -> None:
    """On a shareable pool free() checks the leases under the pool's lock: it waited for B (a
    deadlock). It is deferred to the pool's next call instead."""
    out = run_script(_BACKEND_SCENE + """
pool = vmmpool.PagePool(dev, limit=32 * P, shareable=True)
a = pool.malloc(1000)
b = scene(pool, a, lambda: None)
assert a.freed
try:
    a.free()
except ValueError as e:
    print("double", str(e).split()[-2:])
assert pool.stats().live_allocations == 1  # the next call freed it
b.free()
pool._check()
pool.close()
# The queued free holds no pool: dropped before its next call, the pool is collected and closed.
pool = vmmpool.PagePool(dev, limit=32 * P, shareable=True)
a = pool.malloc(1000)
b = scene(pool, a, lambda: None)
assert len(pool._core.tasks) == 1
del a, b, pool  # no call of the pool after the free: it stays queued
gc.collect()
print("live", dev.counters().live)
""", timeout=60)
    assert "double ['already', 'freed']" in out and "live (0, 0, 0)" in out, out


def _driver_calls_inside_a_backend_call(dev: object, garbage: object) -> list[str]:
    """Run a gc.collect() inside a backend call (`garbage` made first); list the
    unmap/release/free_address calls made while that call held the backend's lock."""
    import gc as _gc

    import vmmpool

    b = dev._backend  # type: ignore[attr-defined]
    g = dev.granularity  # type: ignore[attr-defined]
    keep = vmmpool.reserve(g, dev)  # type: ignore[arg-type]
    phys = vmmpool.create(g, dev)  # type: ignore[arg-type]
    m = keep.map(phys, 0, access="rw")
    inside: list[str] = []
    cls = type(b)
    real = {name: getattr(cls, name) for name in ("release", "unmap", "free_address", "get_access")}

    def spy(name: str) -> object:
        def call(self: object, *a: object) -> object:
            if b.in_call():
                inside.append(name)
            return real[name](self, *a)
        return call

    def get_access_with_gc(self: object, address: int, device: int) -> object:
        with b._lock:  # as the backend holds it during its own work
            _gc.collect()
        return real["get_access"](self, address, device)

    for name in ("release", "unmap", "free_address"):
        setattr(cls, name, spy(name))
    cls.get_access = get_access_with_gc
    try:
        garbage()  # type: ignore[operator]
        m.get_access()
    finally:
        for name, fn in real.items():
            setattr(cls, name, fn)
    m.close()
    phys.close()
    keep.close()
    return inside


class _Cycle:
    def __init__(self, obj: object) -> None:
        self.obj = obj
        self.me = self


def test_a_pool_collected_inside_a_backend_call_closes_after_it() -> None:
    """Its close unmapped and released inside the interrupted call (the backend's state
    changed under it), as a resource's finalizer must not: done after the call."""
    import vmmpool

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity

    def garbage() -> None:
        pool = vmmpool.PagePool(dev, limit=8 * P)
        pool.malloc(3 * P).free()
        _Cycle(pool)

    assert _driver_calls_inside_a_backend_call(dev, garbage) == []
    assert dev.counters().live == (0, 0, 0)  # closed after the call


class _Owner:
    def __init__(self, a: object) -> None:
        self.a = a
        self.me = self

    def __del__(self) -> None:
        self.a.free()  # type: ignore[attr-defined]


def test_a_free_inside_a_backend_call_gives_pages_above_the_limit_back_later() -> None:
    """A free over a lowered limit gave the excess pages back there and then (unmap and
    release inside the interrupted call); the next operation does."""
    import vmmpool

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    pool = vmmpool.PagePool(dev, limit=8 * P)
    a = pool.malloc(6 * P)
    pool.set_limit(4 * P)  # `a` pins 6 pages: 2 over the limit until it is freed
    keep = [a]  # still referenced: its __del__-time free is a plain free()

    def garbage() -> None:
        _Owner(keep[0])

    assert _driver_calls_inside_a_backend_call(dev, garbage) == []
    assert a.freed
    pool.malloc(100).free()  # the next operation enforces the limit
    assert pool.stats().total_pages <= 4
    pool._check()
    pool.close()
    assert dev.counters().live == (0, 0, 0)


class _Closer:
    def __init__(self, buf: object) -> None:
        self.buf = buf
        self.me = self

    def __del__(self) -> None:
        self.buf.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("pooled", [True, False])
def test_a_buffer_closed_by_a_finalizer_inside_a_backend_call_is_freed_after_it(pooled: bool) -> None:
    """A user's __del__ closing a buffer: inside a backend call the pool raised ReentryError
    (lost in the __del__, the buffer said closed and its pages stayed acquired), and a buffer
    without a pool unmapped inside the call. The release is done after the call."""
    import sys

    import vmmpool

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    pool = vmmpool.PagePool(dev, limit=8 * P) if pooled else None
    buf = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, device=dev, initial_size=2 * P)
    errors: list[str] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: errors.append(repr(u.exc_value))
    try:
        inside = _driver_calls_inside_a_backend_call(dev, lambda: _Closer(buf))
    finally:
        sys.unraisablehook = hook
    assert errors == [] and inside == [] and buf.closed
    if pool is not None:
        assert pool.stats().acquired_pages == 0
        pool._check()
        pool.close()
    assert dev.counters().live == (0, 0, 0)


def test_the_last_view_of_a_closed_buffer_collected_inside_a_backend_call() -> None:
    """close() with a view alive frees when the view goes: a view collected inside a backend
    call unmapped and released the buffer's memory inside that call. Done after it."""
    import vmmpool

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    P = dev.granularity
    buf = vmmpool.GrowableBuffer(max_size=4 * P, device=dev, initial_size=2 * P)
    gc.disable()  # the cycle is collected inside the backend call, not before
    try:
        _Cycle(buf.view("uint8"))
        buf.close()  # deferred: a view is alive
        assert dev.counters().live != (0, 0, 0)
        inside = _driver_calls_inside_a_backend_call(dev, lambda: None)
    finally:
        gc.enable()
    assert inside == []
    assert dev.counters().live == (0, 0, 0)  # freed after the call


def test_pool_close_from_a_finalizer_inside_a_backend_call_is_done_after_it() -> None:
    """A user's __del__ that closes a pool while its thread is inside a driver call: closing
    calls the driver, so it returns at once and the pool closes at the backend's next call
    (it raised ReentryError, lost in __del__, and the pool stayed open)."""
    import vmmpool

    dev = vmmpool.Device.emulated(capacity=64 << 20)
    pool = vmmpool.PagePool(dev)
    pool.malloc(3 * dev.granularity).free()
    with dev._backend._lock:  # as inside a backend call
        pool.close()
        assert not pool._core.closed
    assert dev.counters().live == (0, 0, 0)  # the backend's next call closed it
    assert pool._core.closed


@pytest.mark.parametrize("pooled", [False, True])
def test_buffer_close_inside_a_backend_call_while_another_thread_resizes_it(pooled: bool) -> None:
    """Thread A is inside a backend call when a finalizer closes a buffer; thread B holds
    that buffer's lock (a resize) and waits for the backend's lock to map a page. close()
    waited for the buffer's lock: a deadlock. It marks the buffer closed and finishes after
    the call; B's resize completes, then the memory goes back."""
    out = run_script(f"""
pool = vmmpool.PagePool(dev, limit=32 * P) if {pooled} else None
buf = vmmpool.GrowableBuffer(max_size=8 * P, pool=pool, device=dev, initial_size=P)
backend = dev._backend
inside = threading.Event()
orig_enter = backend._enter
def enter(op):  # B: inside the buffer's lock, about to need the backend's
    if threading.current_thread() is not threading.main_thread():
        inside.set()
    return orig_enter(op)
backend._enter = enter
done = []
def b_thread():
    done.append(buf.resize(4 * P))
with backend._lock:  # A, as if inside a backend call
    t = threading.Thread(target=b_thread)
    t.start()
    assert inside.wait(10)
    time.sleep(0.05)
    buf.close()  # a user's __del__ would do this from the GC: must not wait
    print("closed", buf.closed)
t.join(10)
assert not t.is_alive()
backend._enter = orig_enter
print("resized", len(done))
dev.counters()  # the backend's next call runs what was deferred
gc.collect()
if pool is not None:
    pool._check()
    assert pool.stats().acquired_pages == 0
    pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "closed True" in out and "resized 1" in out and "live (0, 0, 0)" in out, out


def test_shared_mapping_closed_by_a_finalizer_inside_its_own_view() -> None:
    """A user's __del__ closing a SharedMapping, collected while this thread was inside the
    mapping's view() (its plain lock held): close() waited for that lock forever. It is done
    when the operation ends (here refused and logged: the new view is alive)."""
    out = run_script("""
import logging
import vmmpool._share as share_mod
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
buf = vmmpool.GrowableBuffer(max_size=4 * P, device=dev, initial_size=P, shareable=True)
h = buf.share()
m = h.open()
seen = []
class Closer:
    def __init__(self):
        self.me = self
    def __del__(self):
        m.close()
        seen.append("close returned")
real = share_mod.ArrayView
def hooked(*a, **k):  # the collector runs inside view(), under the mapping's lock
    share_mod.ArrayView = real
    Closer()
    gc.collect()
    return real(*a, **k)
share_mod.ArrayView = hooked
v = m.view("uint8")
print(seen, "closed", m.closed)
del v
gc.collect()
m.close()
print("closed", m.closed)
h.close()
buf.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "['close returned'] closed False" in out, out
    assert "SharedMapping.close() requested by a finalizer failed: BufferError" in out, out
    assert "closed True" in out and "live (0, 0, 0)" in out, out


def test_shared_mapping_closed_by_a_finalizer_inside_a_backend_call_unmaps_after_it() -> None:
    out = run_script("""
buf = vmmpool.GrowableBuffer(max_size=4 * P, device=dev, initial_size=P, shareable=True)
h = buf.share()
m = h.open()
where = m.device  # the receiver's device (the default host emulator, not `dev`)
backend = where._backend
live = where.counters().live
with backend._lock:  # as if a finalizer ran inside a backend call
    m.close()
    print("inside", m.closed)
freed = where.counters().live[0] == live[0] - 1  # the backend's next call runs the close
print("after", m.closed, freed)
h.close()
buf.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "inside False" in out and "after True True" in out and "live (0, 0, 0)" in out, out


def test_shared_memory_handle_closed_by_a_finalizer_inside_its_own_open() -> None:
    """A user's __del__ closing a SharedMemoryHandle, collected inside that handle's open()
    (its plain lock held): close() waited for the lock forever. It is done as open() ends."""
    out = run_script("""
import vmmpool._share as share_mod
buf = vmmpool.GrowableBuffer(max_size=4 * P, device=dev, initial_size=P, shareable=True)
h = buf.share()
class Closer:
    def __init__(self):
        self.me = self
    def __del__(self):
        h.close()
real = share_mod.reserve
def hooked(*a, **k):  # the collector runs inside open(), under the handle's lock
    share_mod.reserve = real
    Closer()
    gc.collect()
    return real(*a, **k)
share_mod.reserve = hooked
m = h.open()
print("opened", m.nbytes == P, "handle closed", h.closed)
m.write(b"x" * 8)
print("read", bytes(m.read(8)) == bytes(buf.read(8)))
m.close()
buf.close()
print("live", dev.counters().live, m.device.counters().live)
""", timeout=60)
    assert "opened True handle closed True" in out and "read True" in out, out
    assert "live (0, 0, 0) (0, 0, 0)" in out, out


def test_user_del_freeing_collected_right_after_a_locked_call_took_the_lock() -> None:
    """The collector can run between taking the lock and noting its owner (Section.__enter__
    asks the backend whether this thread is inside a call, which allocates): a ``__del__``
    freeing an allocation there must queue its free, not wait for its own thread. Swept:
    the collection is forced at every allocation of the first steps of ``stats()``."""
    out = run_script("""
        pool = vmmpool.PagePool(dev, limit=8 * P)
        class Cyc:
            def __init__(self, a):
                self.a = a
                self.me = self
            def __del__(self):
                self.a.free()
        for k in range(1, 120):
            gc.collect()
            gc.disable()
            Cyc(pool.malloc(100))
            stats = pool.stats
            gc.set_threshold(gc.get_count()[0] + k)
            gc.enable()
            try:
                stats()
            finally:
                gc.set_threshold(700, 10, 10)
        gc.collect()
        assert pool.stats().live_allocations == 0
        pool._check()
        pool.close()
        print("ok")
    """, timeout=60)
    assert "ok" in out


# A collection forced at one point of a pool's locked section: Core.stream() of a new stream
# (malloc runs it under the lock; any allocation there may run the garbage collector).
_GC_IN_POOL_LOCK = """
import vmmpool._pool._core as C
def collect_inside_the_pool_lock(pool, key):
    fired = []
    orig = C.Core.stream
    def stream(self, k):
        if not fired:
            fired.append(1)
            assert self.lock.locked() and not dev._backend.in_call()
            gc.collect()
        return orig(self, k)
    C.Core.stream = stream
    try:
        return pool.malloc(1000, stream=key)
    finally:
        C.Core.stream = orig
lost = []
sys.unraisablehook = lambda u: lost.append(repr(u.exc_value))
"""


def test_buffer_closed_by_a_finalizer_inside_its_pools_lock_is_freed_by_the_next_call() -> None:
    """A user's __del__ closing a pooled buffer (referenced elsewhere too), collected inside
    the pool's locked section: close() raised ReentryError (lost in __del__) and the buffer
    said closed while its page stayed acquired until it was collected."""
    out = run_script(_GC_IN_POOL_LOCK + """
pool = vmmpool.PagePool(dev, limit=32 * P)
class Owner:
    def __init__(self, buf):
        self.buf = buf
        self.me = self
    def __del__(self):
        self.buf.close()
keep = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
gc.disable()
Owner(keep)
a = collect_inside_the_pool_lock(pool, 7)
gc.enable()
assert not lost, lost
assert keep.closed
assert pool.stats().acquired_pages == 0  # the next call freed it
a.free()
pool._check()
pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_buffer_closed_inside_its_pools_lock_while_another_thread_resizes_it() -> None:
    """Thread A holds the pool's lock (not in a driver call) when a finalizer closes buffer X;
    thread B holds X's lock in a resize that waits for the pool's lock: close() waited for
    X's lock (a deadlock). It is deferred to the pool's next call instead."""
    out = run_script(_GC_IN_POOL_LOCK + """
pool = vmmpool.PagePool(dev, limit=32 * P)
X = vmmpool.GrowableBuffer(max_size=8 * P, pool=pool, initial_size=P)
started = []
class Owner:
    def __init__(self):
        self.me = self
    def __del__(self):
        B = threading.Thread(target=X.resize, args=(4 * P,))
        B.start()
        started.append(B)
        time.sleep(0.3)  # B holds X's lock and waits for the pool's
        X.close()
gc.disable()
Owner()
a = collect_inside_the_pool_lock(pool, 7)
gc.enable()
for t in started:
    t.join()
assert not lost, lost
assert X.closed
assert pool.stats().acquired_pages == 0
a.free()
pool._check()
pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_pool_closed_by_a_finalizer_inside_its_own_lock_closes_as_the_holder_lets_go() -> None:
    """A user's __del__ closing a pool, collected inside that pool's locked section (not in a
    driver call): close() raised ReentryError (lost in __del__) and the pool stayed open."""
    out = run_script(_GC_IN_POOL_LOCK + """
pool = vmmpool.PagePool(dev, limit=32 * P)
pool.malloc(3 * P).free()
class Owner:
    def __init__(self, pool):
        self.pool = pool
        self.me = self
    def __del__(self):
        self.pool.close()
gc.disable()
Owner(pool)
collect_inside_the_pool_lock(pool, 7)
gc.enable()
assert not lost, lost
assert pool.closed
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_pool_closed_by_a_finalizer_inside_its_own_lock_closes_its_leases_too() -> None:
    """The deferred close ran only the core's close: the leases' read ends stayed open and the
    pool's safety net armed, unlike a direct close()."""
    out = run_script(_GC_IN_POOL_LOCK + """
import os
pool = vmmpool.PagePool(dev, shareable=True)
a = pool.malloc(1000)
h = a.share()
def fds():
    return len(os.listdir("/proc/self/fd"))
class Owner:
    def __init__(self, pool):
        self.pool = pool
        self.me = self
    def __del__(self):
        self.pool.close()
before = fds()
gc.disable()
Owner(pool)
collect_inside_the_pool_lock(pool, 7)
gc.enable()
assert not lost, lost
assert pool.closed
print("leases", len(pool._shares.entries), "armed", pool._fin.alive, "fds closed", before - fds() >= 1)
""", timeout=60)
    assert "leases 0 armed False fds closed True" in out, out


def test_shareable_free_from_a_finalizer_inside_the_leases_lock() -> None:
    """Thread A is in Shares.done() (the leases' lock, from stats()) when a finalizer frees a
    shareable allocation: free() waited for the pool's lock, held by thread B's free() of a
    leased allocation, which waits for the leases' lock (a deadlock). Deferred instead."""
    out = run_script("""
from vmmpool import _share
pool = vmmpool.PagePool(dev, shareable=True)
a1 = pool.malloc(1000); h1 = a1.share()
b = pool.malloc(1000); hb = b.share()
started = []
class Req:
    def __init__(self, a):
        self.a = a
        self.me = self
    def __del__(self):
        t = threading.Thread(target=b.free)  # B: the pool's lock, then the leases'
        t.start()
        started.append(t)
        time.sleep(0.3)
        self.a.free()
gc.disable()
Req(pool.malloc(2000))
fired = []
orig = _share.Lease.ended
def ended(self):
    if not fired:
        fired.append(1)
        gc.collect()  # as an allocation in done()'s comprehension may
    return orig(self)
_share.Lease.ended = ended
pool.stats()
_share.Lease.ended = orig
gc.enable()
for t in started:
    t.join()
assert b.freed
assert pool.stats().live_allocations == 2  # a1, and b (leased); Req's was freed
h1.close(); hb.close(); a1.free()
pool.stats()
pool._check()
pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


@pytest.mark.parametrize("shareable", [False, True])
def test_free_from_a_signal_handler_between_taking_the_lock_and_noting_the_owner(shareable: bool) -> None:
    """A signal handler that frees, run right after a pool call's lock.acquire(False) and
    before it notes its owner: free() saw no owner and waited for its own thread (on a
    shareable pool, in the section where it looks at the leases). Forced: the handler runs
    from inside the lock's acquire (a wrapper lock) of a malloc."""
    out = run_script(f"""
import os, signal
pool = vmmpool.PagePool(dev, shareable={shareable})
""" + """
core = pool._core
victim = pool.malloc(100)
class Lock:
    def __init__(self):
        self.inner = threading.Lock()
        self.armed = False
    def acquire(self, blocking=True, timeout=-1):
        got = self.inner.acquire(blocking, timeout)
        if got and self.armed:
            self.armed = False
            assert core.owner == 0
            os.kill(os.getpid(), signal.SIGUSR1)  # its handler runs before acquire returns
        return got
    def release(self):
        self.inner.release()
    def locked(self):
        return self.inner.locked()
signal.signal(signal.SIGUSR1, lambda *a: victim.free())
core.lock = Lock()
core.lock.armed = True
a = pool.malloc(200)
assert victim.freed
core.lock = threading.Lock()
a.free()
assert pool.stats().live_allocations == 0
pool._check()
pool.close()
print("live", dev.counters().live)
""", timeout=30)
    assert "live (0, 0, 0)" in out, out


def test_buffer_closed_inside_its_pools_lock_is_not_kept_alive_by_the_pools_queue() -> None:
    """The deferred close held the buffer strongly in the pool's task queue, which the pool's
    finalizer holds, and the buffer holds the pool: dropped before the pool's next call,
    neither was ever collected (nor closed), and their pages stayed live."""
    out = run_script(_GC_IN_POOL_LOCK + """
import weakref
pool = vmmpool.PagePool(dev, limit=32 * P)
keep = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
class Owner:
    def __init__(self, buf):
        self.buf = buf
        self.me = self
    def __del__(self):
        self.buf.close()
gc.disable()
Owner(keep)
a = collect_inside_the_pool_lock(pool, 7)
gc.enable()
assert not lost, lost
assert keep.closed and pool._core.tasks
wp = weakref.ref(pool)
del keep, pool, a
gc.collect()
assert wp() is None, "the pool was kept alive by its own queue"
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_buffer_and_pool_closed_by_one_finalizer_inside_the_pools_lock() -> None:
    """A __del__ closing a pooled buffer, then its pool: the pool's close ran the buffer's
    deferred close under its lock, which deferred it to the (now closed) pool again, which
    ran it at once: a RecursionError (logged), and the buffer's page stayed mapped."""
    out = run_script(_GC_IN_POOL_LOCK + """
import logging
records = []
class H(logging.Handler):
    def emit(self, r):
        records.append(r.getMessage())
logging.getLogger("vmmpool").addHandler(H())
pool = vmmpool.PagePool(dev, limit=32 * P)
buf = vmmpool.GrowableBuffer(max_size=4 * P, pool=pool, initial_size=P)
class Owner:
    def __init__(self, buf, pool):
        self.buf, self.pool = buf, pool
        self.me = self
    def __del__(self):
        self.buf.close()
        self.pool.close()
gc.disable()
Owner(buf, pool)
try:
    collect_inside_the_pool_lock(pool, 7)
except vmmpool.ClosedError:
    pass
gc.enable()
assert not lost, lost
assert not records, records
assert pool.closed and buf.closed
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_a_record_logged_inside_the_pool_lock_never_waits_for_a_logging_lock() -> None:
    """Thread B holds its logging handler's lock when the collector runs a user's __del__
    that frees an allocation (it waits for the pool's lock); thread A, inside the pool's lock,
    refuses a request: Core.oom logged "out of memory" there and waited for B's handler lock
    (a deadlock). Records made under the lock are emitted after it is let go."""
    out = run_script("""
import logging
pool = vmmpool.PagePool(dev, limit=4 * P)
core = pool._core
b_in_handler = threading.Event()
a_in_lock = threading.Event()
class Handler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.seen = []
    def emit(self, record):
        self.seen.append((record.name, record.levelno, record.threadName, record.getMessage()))
        if threading.current_thread().name == "B" and not b_in_handler.is_set():
            b_in_handler.set()
            assert a_in_lock.wait(10)
            gc.collect()  # as any allocation while formatting may: runs Cyc.__del__
h = Handler()
logging.getLogger().addHandler(h)
logging.getLogger().setLevel(logging.INFO)
class Cyc:
    def __init__(self, a):
        self.a = a
        self.me = self
    def __del__(self):
        self.a.free()
orig = core.oom
def oom(*a, **k):  # A, inside the pool's lock, about to log its refusal
    if threading.current_thread().name == "A" and not a_in_lock.is_set():
        assert b_in_handler.wait(10)
        a_in_lock.set()
    return orig(*a, **k)
core.oom = oom
errors = []
def A():
    try:
        pool.malloc(8 * P)
    except vmmpool.OutOfMemoryError:
        pass
    except BaseException as e:
        errors.append(e)
def B():
    gc.disable()
    Cyc(pool.malloc(100))
    logging.getLogger("app").info("B logs something")
tb = threading.Thread(target=B, name="B")
tb.start()
ta = threading.Thread(target=A, name="A")
ta.start()
ta.join()
tb.join()
gc.enable()
assert not errors, errors
ooms = [s for s in h.seen if s[0] == "vmmpool.pool"]
assert ooms and all(s[1] == logging.INFO and s[2] == "A" for s in ooms), ooms
assert ooms[0][3].startswith("out of memory: "), ooms
assert pool.stats().live_allocations == 0
pool.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


def test_a_pool_logging_inside_a_finalizer_inside_another_pools_lock_waits_for_its_end() -> None:
    """A user's __del__, collected inside pool X's locked section, uses pool Y, which logs
    (a refusal): the record waits until X's lock is let go, then is emitted, in order."""
    out = run_script(_GC_IN_POOL_LOCK + """
import logging
X = vmmpool.PagePool(dev, limit=32 * P)
Y = vmmpool.PagePool(dev, limit=2 * P)
held = []
class Handler(logging.Handler):
    def emit(self, record):
        me = threading.get_ident()
        held.append((record.getMessage()[:14], any(
            p._core.owner == me and p._core.lock.locked() for p in (X, Y))))
logging.getLogger("vmmpool.pool").addHandler(Handler())
logging.getLogger("vmmpool.pool").setLevel(logging.INFO)
class User:
    def __init__(self):
        self.me = self
    def __del__(self):
        try:
            Y.malloc(4 * P)
        except vmmpool.OutOfMemoryError:
            pass
gc.disable()
User()
a = collect_inside_the_pool_lock(X, 7)
gc.enable()
assert not lost, lost
assert held and all(not h for _, h in held), held
assert held[0][0] == "out of memory:", held
a.free()
X.close()
Y.close()
print("live", dev.counters().live)
""", timeout=60)
    assert "live (0, 0, 0)" in out, out


@pytest.mark.parametrize("spec", ["host", "cuda:0"])
def test_a_device_asked_for_by_a_finalizer_inside_its_first_construction(spec: str) -> None:
    """The first Device("host") (or Device(0)) built its backend holding the module's lock
    (a plain Lock): a collection there running a __del__ that asks for that device waited
    for its own thread. The nested call's device is the one published; the outer call
    returns it and closes the backend it built (no context retained twice)."""
    out = run_script(f"""
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from vmmpool._backends import cuda, host
from fake_cuda_driver import FakeDriver
fake = FakeDriver()
cuda._driver = lambda: fake
spec = {spec!r}
cls = host.HostBackend if spec == "host" else cuda.CudaBackend
got = []
class Cyc:
    def __init__(self):
        self.me = self
    def __del__(self):
        got.append(vmmpool.Device(spec))
built = []
orig = cls.__init__
def init(self, *a, **k):
    cls.__init__ = orig
    built.append(self)
    gc.collect()  # as any allocation in the constructor may
    orig(self, *a, **k)
gc.disable()
Cyc()
cls.__init__ = init
d = vmmpool.Device(spec)
assert got and d is got[0] is vmmpool.Device(spec), (d, got)
assert d._backend is not built[0]
assert built[0].closed if spec == "host" else built[0]._closed
if spec != "host":
    assert fake.primary_refs[0] == 1, fake.primary_refs
    d._backend.close()
    assert fake.primary_refs[0] == 0, fake.primary_refs
print("ok")
""", timeout=30)
    assert "ok" in out, out


def test_callbacks_asked_for_by_a_finalizer_while_the_pair_is_made() -> None:
    """vmmpool.torch made a pool's pair (its ctypes thunks, which allocate) under a plain lock:
    a __del__ collected there that asked for the same pool's callbacks waited for its own
    thread. One pair per pool still: the nested call's is kept."""
    out = run_script("""
import vmmpool.torch as vt
pool = vmmpool.PagePool(dev, limit=8 * P)
got = []
class Asker:
    def __init__(self):
        self.me = self
    def __del__(self):
        got.append(vt.callbacks(pool))
real = vt._Pair.__init__
def init(self, *a, **k):
    vt._Pair.__init__ = real
    Asker()
    gc.collect()
    real(self, *a, **k)
n_pairs = len(vt._PAIRS)
gc.disable()
vt._Pair.__init__ = init
outer = vt.callbacks(pool)
gc.enable()
assert got == [outer], (got, outer)
assert vt.callbacks(pool) == outer
assert len(vt._PAIRS) == n_pairs + 1  # the pair the outer call made was dropped
pool.close()
print("done")
""", timeout=30)
    assert "done" in out, out


def test_a_handler_whose_work_logs_again_does_not_keep_the_caller_forever() -> None:
    """A handler with the usual recursion guard whose emit does pool work that logs: records
    queued during its emit were handled after it returned (the guard off), each making more,
    and the caller's malloc never returned. Handled inside the emit, as logging does."""
    out = run_script("""
import logging
pool = vmmpool.PagePool(dev, limit=8 * P)
logging.getLogger("vmmpool").setLevel(logging.DEBUG)
class Guarded(logging.Handler):
    def __init__(self):
        super().__init__()
        self.busy = False
        self.n = 0
    def emit(self, record):
        if self.busy:
            return  # the recursion guard
        self.busy = True
        try:
            self.n += 1
            if self.n > 1000:
                print("runaway"); sys.stdout.flush(); __import__("os")._exit(3)
            pool.malloc(P).free()
            pool.trim()
        finally:
            self.busy = False
h = Guarded()
logging.getLogger("vmmpool").addHandler(h)
a = pool.malloc(2 * P)
print("returned", 0 < h.n < 50)
""", timeout=60)
    assert "returned True" in out, out

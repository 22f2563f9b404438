"""A fault at every backend call index of every multi-step pool operation.

For each operation and each backend op, the 1st, 2nd, 3rd... call of that op
during the operation fails (alternately out-of-memory and another driver
error), until the operation completes without the fault firing. After every
failure: live allocations keep their pointers and bytes, the pool's in-use
accounting and limit are as before, its invariants hold, it serves a new
request, and once closed the backend's live resources are back where they
started. (Pages a failed reclaim already unmapped stay free pages, as the
pool's design allows: they are not counted as a change.)

Fork and threads (issue 17): some scenarios first fork a child that tries to
malloc, free and close, then drops everything it inherited (its refusals must
leave the parent's bytes and accounting as they were), or run the operation
while another thread reads and views the live allocations. Retired streams
(issue 17 item 8): a remap takes their pages and forgets them, retiring empty
streams forgets them (a failure to is quiet: the stream is kept), trim.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

import vmmpool
from vmmpool import PagePool

OPS = ("create", "release", "map", "unmap", "set_access", "reserve", "free_address", "synchronize")
P = 2 << 20

#: Faults that fired, per scenario (read by test_sweep_counts).
FIRED: dict[str, int] = {}


@dataclass
class World:
    dev: vmmpool.Device
    pool: PagePool
    live: list[vmmpool.Allocation] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def keep(self, a: vmmpool.Allocation, seed: int) -> None:
        n = min(a.size, 4096)
        b = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
        self.dev.write(a.ptr, b)
        self.live.append(a)
        self.data.append(b)

    def state(self) -> tuple[object, ...]:
        s = self.pool.stats()
        return (
            [(a.ptr, a.freed) for a in self.live],
            [bytes(self.dev.read(a.ptr, len(d))) for a, d in zip(self.live, self.data, strict=True)],
            s.limit, s.requested_bytes, s.allocated_bytes, s.live_allocations, s.acquired_pages,
        )


def sweep(name: str, setup: Callable[[World], None], action: Callable[[World], object]) -> int:
    fired_total = 0
    for op in OPS:
        nth = 1
        while True:
            dev = vmmpool.Device.emulated(capacity=64 << 20)
            base = dev.counters().live
            w = World(dev, PagePool(dev, limit=12 * P))
            setup(w)
            before = w.state()
            calls = dev.counters().calls.get(op, 0)
            err_name = "CUDA_ERROR_OUT_OF_MEMORY" if nth % 2 else "CUDA_ERROR_INVALID_VALUE"
            dev._backend.inject_fault(op, nth=nth, name=err_name)
            try:
                action(w)
            except (vmmpool.OutOfMemoryError, vmmpool.DriverError) as err:
                fired = dev.counters().calls.get(op, 0) - calls >= nth
                assert fired, f"{name}: {op} #{nth} failed without the fault: {err!r}"
                dev._backend.clear_faults()
                if not w.pool.closed:
                    assert w.state() == before, f"{name}: {op} #{nth} changed the pool"
                    w.pool._check()
                    w.pool.malloc(P).free()  # still usable
                    w.pool.malloc(100).free()
                fired_total += 1
                nth += 1
                done = False
            else:
                dev._backend.clear_faults()
                done = True
            for b in w.extra.get("buffers", []):  # type: ignore[attr-defined]
                b.close()
            if w.extra.get("pages"):
                w.pool.release_pages(w.extra["pages"])  # type: ignore[arg-type]
            w.pool.close()
            if w.pool.closed and (w.pool._core.arenas or w.pool._core.pages):
                w.pool.close()
            del w
            gc.collect()  # a pool the action dropped after a failed close: its finalizer resumes
            assert dev.counters().live == base, f"{name}: {op} #{nth}: leak"
            if done:
                break
    FIRED[name] = fired_total
    return fired_total


def _cached_on_other_streams(w: World) -> None:
    w.keep(w.pool.malloc(2 * P), 1)
    w.keep(w.pool.malloc(3000), 2)
    for s in (1, 2, 3):
        w.pool.malloc((s + 1) * P, stream=s).free()  # 9 cached pages on three streams
    w.pool.malloc(5000, stream=4).free()  # an empty small page


def _cached_at_the_limit(w: World) -> None:
    _cached_on_other_streams(w)
    held = []
    for _ in range(12):  # every page held (the rest cached): a new block must remap
        if w.pool.stats().total_pages >= 12:
            break
        held.append(w.pool.malloc(P, stream=5))
    for a in held:
        a.free()


def _cache_hit(w: World) -> None:
    w.keep(w.pool.malloc(P), 1)
    w.pool.malloc(3 * P).free()


def _free_pages(w: World) -> None:
    _cached_on_other_streams(w)
    w.pool.defragment()


def _retired_with_cache(w: World) -> None:
    """Streams 1-4 hold cached pages only and are retired (issue 17 item 8)."""
    _cached_on_other_streams(w)
    for s in (1, 2, 3, 4):
        w.pool.retire_stream(s)


def _retire_empty(w: World) -> None:
    """Retiring streams that hold nothing forgets them; a failure to is quiet (kept)."""
    for s in (1, 2, 3, 4):
        w.pool.retire_stream(s)
    w.pool._check()


def _tail_and_head_at_the_limit(w: World, large: int = 4, cached: int = 0) -> None:
    """Every page of the limit held: half-page blocks on 8 pages but for the second
    half of page 0 (a free tail) and the first half of page 2 (a free head)."""
    halves = [w.pool.malloc(P // 2) for _ in range(16)]
    w.keep(w.pool.malloc(large * P), 99)
    if cached:
        w.pool.malloc(P).free()  # a cached page of its own
    base = min(a.ptr for a in halves)
    for a in halves:
        i = (a.ptr - base) // (P // 2)
        if i in (1, 4):
            a.free()
        else:
            w.keep(a, i)
    assert w.pool.stats().total_pages == 12


def _aliased(w: World, n: int, remap: bool = False) -> vmmpool.Allocation:
    a = w.pool.malloc(n)
    s = w.pool.stats()
    assert w.pool._core.n_aliases == 2 and s.total_pages == 12, "no alias placement"
    assert (s.n_remaps > 0) == remap
    return a


def _forked_child(w: World) -> None:
    """A child tries malloc / free / close and drops everything; the parent sees no change."""
    before = w.state()
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        report = b"ok"
        try:
            os.close(r)
            tries = [lambda: w.pool.malloc(100), lambda: w.pool.malloc(3 * P), w.pool.close]
            tries += [a.free for a in w.live]
            tries += [b.close for b in w.extra.get("buffers", [])]  # type: ignore[attr-defined]
            for fn in tries:
                try:
                    fn()
                except vmmpool.ForkedError:
                    pass
                else:
                    report = b"a forked child's call was accepted"
            tries.clear()
            w.live.clear()
            w.extra.clear()
            w.pool = None  # type: ignore[assignment]
            gc.collect()
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            report = repr(err).encode()
        os.write(wfd, report)
        os._exit(0)
    os.close(wfd)
    got = os.read(r, 4096)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and got == b"ok", (status, got)
    assert w.state() == before, "a forked child changed the parent's pool"


def _with_readers(action: Callable[[World], object]) -> Callable[[World], object]:
    """Run `action` in a thread while this one views and reads every live allocation."""

    def run(w: World) -> object:
        done = threading.Event()
        result: dict[str, object] = {}

        def work() -> None:
            try:
                result["value"] = action(w)
            except BaseException as err:  # noqa: BLE001 - re-raised below
                result["error"] = err
            finally:
                done.set()

        t = threading.Thread(target=work)
        t.start()
        while not done.is_set():
            for a, d in zip(w.live, w.data, strict=True):
                v = a.view()
                assert bytes(w.dev.read(a.ptr, len(d))) == d, "a live allocation changed"
                del v
        t.join()
        err = result.get("error")
        if isinstance(err, BaseException):
            raise err
        return result.get("value")

    return run


SCENARIOS: dict[str, tuple[Callable[[World], None], Callable[[World], object]]] = {
    "malloc cache hit": (_cache_hit, lambda w: w.pool.malloc(3 * P)),
    "malloc new pages": (lambda w: None, lambda w: w.pool.malloc(3 * P)),
    "malloc new small page": (lambda w: None, lambda w: w.pool.malloc(1000)),
    "malloc free pages": (_free_pages, lambda w: w.pool.malloc(4 * P, stream=5)),
    "malloc remap from cached": (_cached_on_other_streams, lambda w: w.pool.malloc(6 * P, stream=5)),
    "malloc small remap": (_cached_at_the_limit, lambda w: w.pool.malloc(100, stream=6)),
    "malloc large remap at the limit": (_cached_at_the_limit, lambda w: w.pool.malloc(3 * P, stream=6)),
    "malloc remap from retired streams": (
        _retired_with_cache, lambda w: w.pool.malloc(6 * P, stream=5)),
    "retire_stream of empty streams": (_free_pages, _retire_empty),
    "trim with retired streams": (_retired_with_cache, lambda w: w.pool.trim()),
    "malloc across a tail and a head": (_tail_and_head_at_the_limit, lambda w: _aliased(w, 3 * P // 4)),
    "malloc across a tail, a remapped page and a head": (
        lambda w: _tail_and_head_at_the_limit(w, 3, 1), lambda w: _aliased(w, 7 * P // 4, remap=True)),
    "defragment": (_cached_on_other_streams, lambda w: w.pool.defragment()),
    "trim": (_cached_on_other_streams, lambda w: w.pool.trim()),
    "set_limit": (_cached_on_other_streams, lambda w: w.pool.set_limit(4 * P)),
    "acquire_pages": (_cached_on_other_streams, lambda w: w.extra.__setitem__(
        "pages", w.pool.acquire_pages(7))),
    "release_pages": (
        lambda w: (_cached_on_other_streams(w), w.extra.__setitem__("pages", w.pool.acquire_pages(2))),
        lambda w: (w.pool.release_pages(w.extra.pop("pages")),),  # type: ignore[arg-type]
    ),
    "close": (_cached_on_other_streams, lambda w: w.pool.close()),
    "preallocate": (lambda w: None, lambda w: PagePool(w.dev, limit=8 * P, preallocate=5 * P).close()),
    "malloc remap after a forked child": (
        lambda w: (_cached_at_the_limit(w), _forked_child(w)),
        lambda w: w.pool.malloc(3 * P, stream=6),
    ),
    "close after a forked child": (
        lambda w: (_cached_on_other_streams(w), w.extra.__setitem__(
            "buffers", [vmmpool.GrowableBuffer(max_size=4 * P, pool=w.pool, initial_size=P)]),
            _forked_child(w)),
        lambda w: w.pool.close(),
    ),
    "malloc remap with reader threads": (
        _cached_at_the_limit, _with_readers(lambda w: w.pool.malloc(3 * P, stream=6)),
    ),
    "buffer grow with a pool": (
        lambda w: (_cached_on_other_streams(w), w.extra.__setitem__(
            "buffers", [vmmpool.GrowableBuffer(max_size=8 * P, pool=w.pool, initial_size=P)])),
        lambda w: w.extra["buffers"][0].resize(7 * P),  # type: ignore[index]
    ),
    "buffer shrink with a pool": (
        lambda w: w.extra.__setitem__(
            "buffers", [vmmpool.GrowableBuffer(max_size=8 * P, pool=w.pool, initial_size=6 * P)]),
        lambda w: w.extra["buffers"][0].resize(P),  # type: ignore[index]
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_at_every_call_index(name: str) -> None:
    setup, action = SCENARIOS[name]
    n = sweep(name, setup, action)
    # no backend call: nothing to fail; or forgetting streams, whose failures are quiet
    if name not in ("malloc cache hit", "release_pages", "retire_stream of empty streams"):
        assert n > 0, f"{name}: no backend call to fail?"


def test_sweep_counts() -> None:
    """The sweep really covers every operation (runs after the parametrized cases)."""
    if len(FIRED) < len(SCENARIOS):
        pytest.skip("run with the whole module to count")
    total = sum(FIRED.values())
    print(f"fault cases fired: {total} over {len(FIRED)} operations: {FIRED}")
    # 99 cases over 17 operations on 2026-12-02 (fewer driver calls per operation since the
    # growth budget lets fresh pages come before remaps less often); each operation fires (above).
    # 126 over 19 on 2026-12-06, with the fork and reader-thread scenarios of issue 17; the two
    # alias placements of issue 20 add 8 (3 + 5).
    assert total >= 118


def test_map_out_of_memory_reclaims_cached_pages_and_retries() -> None:
    """Issue 8 item 7: a mapping failing for lack of resources gives cached mappings back first."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    with PagePool(dev, limit=12 * P) as pool:
        keep = pool.malloc(P)
        dev.write(keep.ptr, b"keep")
        pool.malloc(3 * P, stream=1).free()
        dev._backend.inject_fault("map", nth=1, name="CUDA_ERROR_OUT_OF_MEMORY")
        a = pool.malloc(4 * P, stream=2)  # not an error: the cache is reclaimed, then mapped
        s = pool.stats()
        assert s.reclaimable_pages == 0 and s.quarantined_pages == 0
        assert bytes(dev.read(keep.ptr, 4)) == b"keep"
        pool._check()
        a.free()
        keep.free()


def test_failed_undo_quarantines_only_what_stays_mapped() -> None:
    """Issue 8 item 7: the batched undo unmap fails; the per-page unmaps restore every page."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    with PagePool(dev, limit=12 * P) as pool:
        dev._backend.inject_fault("map", nth=3, name="CUDA_ERROR_INVALID_VALUE")
        dev._backend.inject_fault("unmap", nth=1, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError):
            pool.malloc(4 * P)
        dev._backend.clear_faults()
        s = pool.stats()
        assert s.quarantined_pages == 0, s
        assert s.free_pages == 4
        pool._check()
        pool.malloc(4 * P).free()


def test_an_alias_a_failed_undo_leaves_mapped_passes_the_check_without_access() -> None:
    """A placement across a page's free tail (an alias) fails at set_access and every unmap of
    its undo fails too: the alias slot stays mapped, lending no byte and with no access. That
    is a legitimate state: check() compares access only on slots that lend bytes."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    with PagePool(dev, limit=5 * P) as pool:
        blocks = [pool.malloc(P // 4) for _ in range(20)]  # five pages, all in use
        for i in (15, 4):
            blocks[i].free()
        be = dev._backend
        be.inject_fault("set_access", nth=1, name="CUDA_ERROR_INVALID_VALUE")
        for nth in (1, 2, 3):
            be.inject_fault("unmap", nth=nth, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError):
            pool.malloc(P // 2)
        be.clear_faults()
        core = pool._core
        stuck = [al for al in core.aliases if al.lo == al.hi]
        assert stuck, "no alias left mapped: the scenario changed"
        al = stuck[0]
        assert be.mapped_at(al.arena.base + al.slot * P)[3] is vmmpool.Access.NONE
        pool._check()
        for i, b in enumerate(blocks):
            if i not in (15, 4):
                b.free()
        pool._check()


def test_a_map_out_of_memory_retry_keeps_the_stream_it_serves() -> None:
    """place_in retries a map that ran out of memory after reclaiming every cached page: that
    reclaim empties the (retired) stream being served, whose fresh arena is empty until the
    retry maps it. The stream must stay: forgetting it freed that arena and the retry raised
    ClosedError ("AddressReservation has been closed") instead of mapping."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool = PagePool(dev, limit=16 * P, keep_cached=True)
    pool.malloc(100, stream=3).free()  # a cached small page: stream 3's only memory
    pool.retire_stream(3)
    dev._backend.inject_fault("map", nth=1, name="CUDA_ERROR_OUT_OF_MEMORY")
    a = pool.malloc(3 * P, stream=3)  # a fresh large arena; the first map fails
    dev._backend.clear_faults()
    dev.write(a.ptr, b"ok")
    pool._check()
    a.free()
    pool.close()
    assert dev.counters().live == base


def test_a_failed_request_frees_the_arena_it_reserved() -> None:
    """A request that reserved a fresh arena and then failed keeps no address space."""
    dev = vmmpool.Device.emulated(capacity=64 << 20)
    base = dev.counters().live
    pool = PagePool(dev, limit=16 * P)
    for s in range(1, 6):
        dev._backend.inject_fault("create", nth=1, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError):
            pool.malloc(3 * P, stream=s)
        dev._backend.clear_faults()
        assert dev.counters().live == base
        assert pool.stats().address_space_bytes == 0
    pool._check()
    pool.malloc(3 * P, stream=1).free()
    pool.close()
    assert dev.counters().live == base

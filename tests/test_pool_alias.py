"""A partly used page mapped again (an alias) at the limit.

At the limit, the free tail of a partly used page can become the first page of
a new block's range and a free head its last page (``Core.place_alias``). The
invariant becomes: every mapped byte is used by at most one live block, through
one of the page's mappings (two, or three when it lends its head and its
tail). These tests check it with real bytes on the host emulator (the same
memfd page mapped twice shows the same bytes).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

import vmmpool
from vmmpool import replay as R
from vmmpool._pool import PagePool, _core
from vmmpool._workloads import gpt2_inference, gpt_inference, resnet50, sweep
from vmmpool.replay._engine import run_replay

P = 64 << 10


def pattern(seed: int, n: int) -> bytes:
    return ((np.arange(n, dtype=np.uint32) * 7 + seed * 13 + 3) % 251).astype(np.uint8).tobytes()

def half_page_blocks_with_a_tail_and_a_head(
    pool: PagePool, dev: vmmpool.Device
) -> dict[int, vmmpool.Allocation]:
    """Four pages of half-page blocks, each written; the second half of page 0 (a free
    tail) and the first half of page 2 (a free head) freed. Returns the rest by half-page."""
    xs = [pool.malloc(P // 2) for _ in range(8)]
    base = min(x.ptr for x in xs)
    assert sorted((x.ptr - base) // (P // 2) for x in xs) == list(range(8))
    by_off = {(x.ptr - base) // (P // 2): x for x in xs}
    for i, x in by_off.items():
        dev.write(x.ptr, pattern(i, x.size))
    by_off.pop(1).free()
    by_off.pop(4).free()
    return by_off



@pytest.mark.parametrize(("limit", "request_pages", "new_pages"), [(4, 0.75, 0), (5, 1.75, 1)])
def test_a_block_across_a_free_tail_and_a_free_head(
    limit: int, request_pages: float, new_pages: int
) -> None:
    dev = vmmpool.Device.emulated(capacity=16 * P, granularity=P)
    with PagePool(dev, limit=limit * P) as pool:
        # Four pages of half-page blocks; free the second half of page 0 (a
        # free tail) and the first half of page 2 (a free head). Every page
        # still holds live data and no free range holds the request.
        xs = [pool.malloc(P // 2) for _ in range(8)]
        base = min(x.ptr for x in xs)
        assert sorted((x.ptr - base) // (P // 2) for x in xs) == list(range(8))
        for i, x in enumerate(xs):
            dev.write(x.ptr, pattern(i, x.size))
        by_off = {(x.ptr - base) // (P // 2): x for x in xs}
        by_off.pop(1).free()
        by_off.pop(4).free()
        s = pool.stats()
        assert s.pinned_pages == 4 and s.cached_bytes == P
        n = int(request_pages * P)
        c = pool.malloc(n)
        pool._check()
        s = pool.stats()
        assert s.total_pages == 4 + new_pages, "the block pinned more pages than its new ones"
        assert pool._core.n_aliases == 2 and s.n_syncs == 0
        snap = {p.index: p for p in pool.snapshot()}
        assert sum(p.state == "in_use" for p in snap.values()) == 4 + new_pages
        dev.write(c.ptr, pattern(99, n))
        for i, x in by_off.items():
            assert bytes(dev.read(x.ptr, x.size)) == pattern(i, x.size), f"block {i} changed"
        assert bytes(dev.read(c.ptr, n)) == pattern(99, n)
        # The aliases go once their bytes are free (at the next reclaim), and
        # the bytes they lent are free again in their pages' own slots.
        c.free()
        pool._check()
        assert len(pool._core.aliases) == 2  # free() makes no driver call
        pool.defragment()
        pool._check()
        assert not pool._core.aliases
        assert pool.stats().cached_bytes == P
        assert pool.malloc(P // 2).ptr in (base + P // 2, base + 2 * P)
        for x in by_off.values():
            x.free()
        pool.trim()
        pool._check()
    assert dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize("take", ["acquire_pages", "malloc on another stream"])
def test_an_aliased_page_no_live_block_touches_is_reclaimable_not_pinned(take: str) -> None:
    # Found by the stateful test (hypothesis): once every byte of a page that lends its
    # tail to an alias was free, in both mappings, stats() still counted it pinned (and
    # reclaimable 0), acquire_pages() at the limit refused with it, and trim() then gave
    # it back: an aliased page was never reclaimable, though a reclaim dissolves the
    # alias and unmaps it.
    dev = vmmpool.Device.emulated(capacity=16 * P, granularity=P)
    with PagePool(dev, limit=4 * P) as pool:
        by_off = half_page_blocks_with_a_tail_and_a_head(pool, dev)
        c = pool.malloc(3 * P // 4)  # across both: page 0 lends its tail, page 2 its head
        assert pool._core.n_aliases == 2 and pool.stats().pinned_pages == 4
        c.free()
        by_off.pop(0).free()  # page 0 holds nothing now, in either mapping
        pool._check()
        s = pool.stats()
        assert len(pool._core.aliases) == 2  # free() makes no driver call: still mapped twice
        assert (s.pinned_pages, s.reclaimable_pages, s.total_pages) == (3, 1, 4)
        assert s.largest_allocatable >= P
        # at the limit, the page is there for the taking: the reclaim dissolves its alias
        # (a request of another stream too, as a last resort: it failed before)
        if take == "acquire_pages":
            got = pool.acquire_pages(1)
        else:
            y = pool.malloc(P, stream=1)
            dev.write(y.ptr, pattern(50, P))
        pool._check()
        s = pool.stats()
        assert not pool._core.aliases
        assert (s.pinned_pages, s.total_pages) == (4, 4)
        for i, x in by_off.items():
            assert bytes(dev.read(x.ptr, x.size)) == pattern(i, x.size), f"block {i} changed"
        if take == "acquire_pages":
            pool.release_pages(got)
        else:
            assert bytes(dev.read(y.ptr, P)) == pattern(50, P)
            y.free()
        for x in by_off.values():
            x.free()
        pool.trim()
        pool._check()
    assert dev.counters().live == (0, 0, 0)


def test_a_request_at_the_limit_dissolves_free_aliases_first() -> None:
    # An alias whose bytes are all free keeps its pages' free tail and head
    # apart (an aliased page is not aliased again before the last resort). At
    # the limit, a request that fits nowhere else dissolves it (no defragment()
    # needed) and is placed across the tail and head it gave back.
    dev = vmmpool.Device.emulated(capacity=16 * P, granularity=P)
    with PagePool(dev, limit=4 * P) as pool:
        by_off = half_page_blocks_with_a_tail_and_a_head(pool, dev)
        c = pool.malloc(3 * P // 4)  # across both: two aliases
        core = pool._core
        assert len(core.aliases) == 2
        c.free()  # the aliases' bytes are all free; free() makes no driver call
        assert len(core.aliases) == 2
        pool._check()
        # A whole page's worth: the tail (P/2) and the head (P/2) of pages 0
        # and 2 hold it once the aliases are gone; before, only 3P/4 + P/4
        # were free in pieces and the request failed.
        d = pool.malloc(P)
        pool._check()
        assert core.n_aliases == 4 and len(core.aliases) == 2
        s = pool.stats()
        assert s.total_pages == 4 and s.n_syncs == 0
        dev.write(d.ptr, pattern(99, P))
        for i, x in by_off.items():
            assert bytes(dev.read(x.ptr, x.size)) == pattern(i, x.size), f"block {i} changed"
        assert bytes(dev.read(d.ptr, P)) == pattern(99, P)
        d.free()
        for x in by_off.values():
            x.free()
        pool.defragment()
        pool._check()
        assert not core.aliases
    assert dev.counters().live == (0, 0, 0)


def three_mappings(
    pool: PagePool, dev: vmmpool.Device
) -> tuple[int, dict[int, vmmpool.Allocation], vmmpool.Allocation, vmmpool.Allocation]:
    """Five pages of quarter-page blocks at a limit of five (each block's bytes a pattern
    of its index), then page 1 mapped three times: returns the base address, the blocks
    left by index, and the two blocks across aliases.

    A block across the tail of page 3 and the head of page 1 aliases both. A second one
    needs the tail of page 1 and the head of page 4: page 1 lends its head already, so
    only the last resort (after dissolving free aliases: none here) places it.
    """
    q = P // 4
    core = pool._core
    xs = [pool.malloc(q) for _ in range(20)]
    base = min(x.ptr for x in xs)
    assert sorted((x.ptr - base) // q for x in xs) == list(range(20))
    for x in xs:
        dev.write(x.ptr, pattern((x.ptr - base) // q, q))
    by_off = {(x.ptr - base) // q: x for x in xs}
    by_off.pop(15).free()  # the tail of page 3
    by_off.pop(4).free()  # the head of page 1
    c1 = pool.malloc(P // 2)
    assert core.n_aliases == 2 and len(core.aliases) == 2
    by_off.pop(7).free()  # the tail of page 1 (its head is lent)
    by_off.pop(16).free()  # the head of page 4
    c2 = pool.malloc(P // 2)
    assert core.n_aliases == 4 and len(core.aliases) == 4
    return base, by_off, c1, c2


def test_a_page_lends_its_head_and_its_tail_to_two_aliases_as_a_last_resort() -> None:
    # Page 1 mapped three times (three_mappings): every byte is used through one mapping.
    dev = vmmpool.Device.emulated(capacity=32 * P, granularity=P)
    q = P // 4
    with PagePool(dev, limit=5 * P) as pool:
        core = pool._core
        base, by_off, c1, c2 = three_mappings(pool, dev)
        pool._check()
        s = pool.stats()
        assert s.total_pages == 5 and s.pinned_pages == 5 and s.n_syncs == 0
        page1 = next(p for p in pool.snapshot() if p.address == base + P)
        assert len(page1.alias_addresses) == 2, page1
        assert page1.alias_address == page1.alias_addresses[0]
        assert {a.address for a in page1.allocations} == {by_off[5].ptr, by_off[6].ptr, c1.ptr, c2.ptr}
        # The PyTorch-format snapshot counts address space: page 1 in three segments, and
        # the blocks placed through both of its aliases are there.
        segs = pool.memory_snapshot()["segments"]
        assert sum(sg["total_size"] for sg in segs) == (5 + 4) * P  # 5 pages, 4 alias slots
        active = {
            b["address"]: b["size"] for sg in segs for b in sg["blocks"] if b["state"] == "active_allocated"
        }
        assert active.get(c1.ptr) == c1.size and active.get(c2.ptr) == c2.size
        assert sum(active.values()) == s.allocated_bytes
        dev.write(c1.ptr, pattern(101, P // 2))
        dev.write(c2.ptr, pattern(102, P // 2))

        def intact() -> None:
            for i, x in by_off.items():
                assert bytes(dev.read(x.ptr, q)) == pattern(i, q), f"block {i} changed"
            assert bytes(dev.read(c1.ptr, P // 2)) == pattern(101, P // 2)
            assert bytes(dev.read(c2.ptr, P // 2)) == pattern(102, P // 2)

        intact()
        # Sleep copies page 1 once (through its own slot) and gives it back
        # once; wake maps all three slots again.
        pool.sleep()
        pool._check()
        pool.wake()
        pool._check()
        intact()
        # Both aliases go once their bytes are free; page 1's head and tail
        # are free again in its own slot.
        c1.free()
        c2.free()
        pool.defragment()
        pool._check()
        assert not core.aliases
        assert not any(p.alias_addresses for p in pool.snapshot())
        for x in by_off.values():
            x.free()
        pool.trim()
        pool._check()
    assert dev.counters().live == (0, 0, 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_work_at_the_limit_keeps_every_live_byte(seed: int) -> None:
    # Random malloc / free at a limit a few pages above what is live: aliases
    # are made and dissolved; after every step the invariants hold and every
    # live block's bytes are intact (no byte is used by two blocks).
    rng = random.Random(seed)
    dev = vmmpool.Device.emulated(capacity=64 * P, granularity=P)
    limit = 20
    live: list[tuple[vmmpool.Allocation, int]] = []
    made = dissolved = 0
    with PagePool(dev, limit=limit * P) as pool:
        for step in range(600):
            core = pool._core
            before = len(core.aliases)
            if live and rng.random() < 0.4:
                a, _s = live.pop(rng.randrange(len(live)))
                a.free()
            else:
                n = rng.choice([rng.randint(P // 2, 5 * P // 2), rng.randint(1, P // 4)])
                try:
                    a = pool.malloc(n)
                except vmmpool.OutOfMemoryError:
                    for _ in range(2):  # make some room
                        if live:
                            live.pop(rng.randrange(len(live)))[0].free()
                    if rng.random() < 0.3:
                        pool.defragment()
                        dissolved += before - len(core.aliases)
                    continue
                dev.write(a.ptr, pattern(step, n))
                live.append((a, step))
            made = core.n_aliases
            if step % 3 == 0 or core.aliases:
                pool._check()
                for x, sd in live:
                    assert bytes(dev.read(x.ptr, x.size)) == pattern(sd, x.size)
            assert pool.stats().pinned_pages <= limit
        for a, _s in live:
            a.free()
        pool.defragment()
        pool._check()
        assert not pool._core.aliases
        assert pool.stats().n_syncs == 0
    assert made > 0, "no alias was made: the test does not reach the limit"
    assert dissolved > 0, "no alias was dissolved"
    assert dev.counters().live == (0, 0, 0)


def test_gpt2_shaped_inference_smallest_limit() -> None:
    # A small GPT-2-shaped inference (8 layers, d_model 512, bf16, batch 2, 256 + 16 tokens,
    # 112 MiB live): KV caches grow by concatenation, so every new cache is a few KiB
    # larger than the hole the last one left. Measured 2026-12-06: 1.0340 x peak live
    # without aliases (58 pages), 1.0162 with them (57).
    tr = gpt2_inference(layers=8, d_model=512, heads=8, batch=2, prompt=256, new_tokens=16)
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.ratio <= 1.02, f"{mn.ratio:.4f} x peak live"


def test_gpt2_small_shaped_inference_smallest_limit() -> None:
    # GPT-2-small shape (12 layers, d_model 768, bf16, batch 4, 128 + 32 tokens, 263 MiB
    # live, 131.4 pages): measured 2026-12-06, 134 pages (1.0196 x peak live) while the
    # aliases of freed KV caches stayed until the next reclaim; 133 (1.0120) once a request
    # at the limit dissolves them.
    tr = gpt2_inference(layers=12, d_model=768, heads=12)
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.pages <= 133, f"{mn.pages} pages, {mn.ratio:.4f} x peak live"


def test_gpt2_medium_shaped_inference_within_one_percent() -> None:
    # GPT-2-medium shape (24 layers, d_model 1024, bf16, batch 4, 128 + 32 tokens, 739 MiB
    # live): measured 2026-12-06, 1.0199 x peak live before aliases, 1.0172 with them, 1.0091
    # once a block of at most a page is split off at the start of a larger free range.
    tr = gpt2_inference()
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.ratio <= 1.01, f"{mn.ratio:.4f} x peak live"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stress_traces_default_held(seed: int) -> None:
    # The stress traces (every layer a different size; 110-300 pages live). Measured
    # 2026-12-06: default held 1.0456/1.0557/1.0584/1.0658 x peak live while every pool
    # kept 2 fixed pages and a slack of up to 8 pages as growth headroom; 1.0423/1.0422/
    # 1.0466/1.0476 since a pool without a limit keeps only its proportional headroom;
    # 2026-12-07, 1.0456/1.0455/1.0643/1.0567 since that headroom counts whole pages only.
    # The 1.05 these four seeds met before was tuning on them: on the 40 stress seeds of
    # `sweep(40)` the code before held above 1.05 x on 25 (mean 1.0588), now on 24 (mean
    # 1.0593; benchmarks/results/replay-sweep-host.json). Here: no seed beyond 1.07.
    layers, steps = {0: (24, 48), 1: (24, 48), 2: (12, 64), 3: (8, 24)}[seed]
    res = R.replay(gpt_inference(seed, layers, steps))
    assert res.completed and res.syncs == 0
    assert res.peak_held <= 1.07 * res.peak_live, f"{res.peak_held / res.peak_live:.4f} x peak live"


def test_sweep_draws_the_same_traces_and_rejects_a_bad_count() -> None:
    a, b = sweep(2), sweep(2)
    assert [f for f, _kw, _t in a] == ["gpt2", "resnet50", "stress"] * 2
    assert [(kw, t.events) for _f, kw, t in a] == [(kw, t.events) for _f, kw, t in b]
    assert [t.events for *_x, t in sweep(1, seed=5)] != [t.events for *_x, t in sweep(1)]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            sweep(bad)  # type: ignore[arg-type]


def test_small_pools_default_held_within_five_percent() -> None:
    # ResNet-50-shaped inference of 35-105 pages live: rounded up, 1.02 x the peak added a
    # page of headroom to every pool under 50 pages (default held 1.0562 at batch 32);
    # rounded down, 1.0466 (measured 2026-12-07). At batch 4 rounding down held 1.0441 only
    # by remapping on every pass (test_a_recurring_small_pool_settles): 1.0731 x.
    for kw, most in (({"batch": 4, "train": False}, 1.075), ({"batch": 32, "train": False}, 1.05)):
        res = R.replay(resnet50(**kw))  # type: ignore[arg-type]
        assert res.completed and res.syncs == 0
        assert res.peak_held <= most * res.peak_live, (kw, res.peak_held / res.peak_live)


def _repeated(tr: R.Trace, k: int) -> R.Trace:
    """`tr` with its events after the prelude (weights, never freed) run `k` times."""
    freed = {slot for is_free, slot, _n, _s in tr.events if is_free}
    i = 0
    while not tr.events[i][0] and tr.events[i][1] not in freed:
        i += 1
    body = tr.events[i:]
    return dataclasses.replace(tr, events=tr.events[:i] + body * k)


def test_a_recurring_small_pool_settles() -> None:
    # A pool without a limit rounds its 2% headroom down to whole pages; with the slack
    # capped at 1 page (2% of a pool under 50 pages), repeated ResNet-50-shaped inference at
    # batch 4 remapped on every pass, forever (18 remaps, 108 backend calls a pass), and three
    # streams taking a page each in turn remapped on every malloc. The slack grows to at least
    # 2 pages: both settle, as they did when the headroom rounded up.
    tr = resnet50(batch=4, train=False)
    five, ten = R.replay(_repeated(tr, 5)), R.replay(_repeated(tr, 10))
    assert five.completed and ten.completed
    assert (ten.backend_calls, ten.remaps) == (five.backend_calls, five.remaps)
    dev = vmmpool.Device.emulated(capacity=64 * P, granularity=P)
    with PagePool(dev) as pool:
        def rounds(n: int) -> None:
            for _ in range(n):
                for stream in (0x100, 0x200, 0x300):
                    pool.malloc(P, stream).free()

        rounds(20)
        before = dev.counters()
        rounds(20)
        assert sum((dev.counters() - before).values()) == 0
        assert pool.stats().total_pages == 3


def test_a_join_takes_the_cached_pages_it_leaves_only_at_the_limit() -> None:
    # A block joining two free ranges across unmapped slots may gather the cached pages of
    # what it leaves of the right range (else a request failed at the limit with them
    # cached: test_pool.py). Taken at every join, they made repeated ResNet-50-shaped
    # inference at batch 32 (fp32), which settles with 0 backend calls a pass, remap every
    # pass (228 calls). Only when no other page is left: it settles again.
    tr = resnet50(batch=32, image=224, train=False, dtype_bytes=4)
    four, six = R.replay(_repeated(tr, 4)), R.replay(_repeated(tr, 6))
    assert four.completed and six.completed
    assert (six.backend_calls, six.remaps) == (four.backend_calls, four.remaps)


def test_resnet50_traces_are_well_formed() -> None:
    # Every free names a live allocation; weights, running statistics and Adam's state
    # stay; everything else goes; the sizes are ResNet-50's (25.6 M parameters).
    for kw, lo, hi in (({"train": False}, 85, 95), ({"batch": 4, "image": 160}, 250, 280)):
        tr = resnet50(**kw)
        live: set[int] = set()
        for is_free, slot, _n, stream in tr.events:
            assert stream == 0
            if is_free:
                live.remove(slot)
            else:
                assert slot not in live
                live.add(slot)
        params = sum(tr.events[i][2] for i in range(tr.n_prelude))
        assert 51_000_000 < params < 53_000_000  # 25.6 M bf16 weights + fp32 bn tensors
        kept = len(live) - tr.n_prelude
        # Adam keeps two tensors per parameter: every prelude tensor but the 53 batch norms'
        # running mean and variance
        assert kept == (0 if kw.get("train") is False else 2 * (tr.n_prelude - 2 * 53)), kept
        assert lo << 20 <= tr.peak_live <= hi << 20, tr.peak_live >> 20


@pytest.mark.parametrize(
    ("kw", "pages"), [({"train": False}, 46), ({"batch": 4, "image": 160}, 137)]
)
def test_resnet50_shaped_smallest_limit(kw: dict[str, object], pages: int) -> None:
    # Measured 2026-12-06: inference at batch 8 (88 MiB, 44.4 pages live) completed at 47
    # pages (1.058: at 46 a 6.125-page activation found 5 free pages and free page tails, but
    # no free head to end an alias in), 46 (1.035) since a split near the limit leaves the
    # rest beside unmapped slots (Core.split_at_end); a training step at batch 4, 160 px
    # (266 MiB) at 137 pages (1.027).
    tr = resnet50(**kw)  # type: ignore[arg-type]
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.pages <= pages, f"{mn.pages} pages, {mn.ratio:.4f} x peak live"


@pytest.mark.parametrize(("limit", "at"), [(7, 3.75), (64, 2.0), (None, 2.0)])
def test_a_split_near_the_limit_leaves_the_rest_beside_unmapped_slots(
    limit: int | None, at: float
) -> None:
    # A free range [2, 5.25) pages whose start borders an unmapped slot and whose end a live
    # block: a 1.5-page block leaves one whole page free at either end. A pool holding every
    # page of its limit puts the block at the end (the rest [2, 3.75) can grow into slot 1 by
    # mapping); a pool that can still grow keeps the rule before (the block at the start).
    dev = vmmpool.Device.emulated(capacity=128 * P, granularity=P)
    with PagePool(dev, limit=None if limit is None else limit * P) as pool:
        x = pool.malloc(2 * P)
        base = x.ptr
        y = pool.malloc(13 * P // 4)
        z = pool.malloc(3 * P // 2)
        assert [(a.ptr - base) / P for a in (y, z)] == [2.0, 5.25]
        x.free()
        pool.trim()  # slots 0 and 1 unmapped
        y.free()
        assert pool.stats().total_pages == 5
        c = pool.malloc(3 * P // 2)
        pool._check()
        assert (c.ptr - base) / P == at
        assert pool.stats().total_pages == 5  # no page mapped: the best fit took it


@pytest.mark.parametrize(
    ("limit", "peers", "at"), [(4, 4, 1.1171875), (64, 4, 1.0), (None, 4, 1.0), (4, 2, 1.0)]
)
def test_a_split_near_the_limit_leaves_the_rest_beside_a_growing_block(
    limit: int | None, peers: int, at: float
) -> None:
    # Four quarter-page "KV caches" (page 0), then a free range [1, 1.375) pages between the
    # last of them and a live block. A cache one growth step longer (512 bytes) fits the
    # range: near the limit, with at least 4 live blocks of the cache's size, it goes at the
    # range's end, the rest beside the cache it replaces (Core.split_beside_growing);
    # otherwise at the start (the rule before).
    dev = vmmpool.Device.emulated(capacity=128 * P, granularity=P)
    with PagePool(dev, limit=None if limit is None else limit * P) as pool:
        # `peers` caches after a block of another size (page 0), the range, a live block
        first = [pool.malloc((4 - peers) * P // 4)] if peers < 4 else []
        cs = first + [pool.malloc(P // 4) for _ in range(peers)]
        base = cs[0].ptr
        x = pool.malloc(3 * P // 8)
        w = pool.malloc(5 * P // 8)
        assert (x.ptr - base) / P == 1.0 and pool.stats().total_pages == 2
        x.free()
        k = pool.malloc(P // 4 + 512)
        pool._check()
        assert (k.ptr - base) / P == at
        del w


class _WalkCount(dict):  # type: ignore[type-arg]
    """``Core.live`` that counts the walks over its newest blocks (``reversed``)."""

    walks = 0

    def __reversed__(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().__reversed__()


def test_a_split_near_the_limit_walks_the_live_blocks_only_beside_a_likely_growth() -> None:
    # Split near the limit, split_beside_growing (and fit_after_growing, for the same small
    # request) walks up to SLIDE_SCAN live blocks (about 9 us)
    # only when the request is at most SLIDE_GROWTH above a size malloc gave on its slow path:
    # a split of an unrelated size (a tenth of a page here) decides without the walk, and a cache
    # one growth step longer than the quarter-page caches still walks, and goes at the range's end.
    dev = vmmpool.Device.emulated(capacity=128 * P, granularity=P)
    with PagePool(dev, limit=4 * P) as pool:
        cs = [pool.malloc(P // 4) for _ in range(4)]
        base = cs[0].ptr
        x = pool.malloc(3 * P // 8)
        w = pool.malloc(5 * P // 8)
        x.free()
        core = pool._core
        core.live = _WalkCount(core.live)
        _WalkCount.walks = 0
        y = pool.malloc(P // 10)  # splits the free range [1, 1.375), its rest under a page
        assert (y.ptr - base) / P == 1.0
        assert _WalkCount.walks == 0
        y.free()
        k = pool.malloc(P // 4 + 512)
        # two walks: Core.fit_after_growing's (the range after the newest cache, [1, 1.375),
        # holds it) and split_beside_growing's (which end of that range)
        assert _WalkCount.walks == 2
        assert (k.ptr - base) / P == 1.1171875
        pool._check()
        del w, k


def test_a_cache_grown_at_the_limit_fits_where_its_predecessor_was() -> None:
    # The same at a limit of 2 pages, both held: the grown cache goes at the end of the free
    # range, so freeing the cache it replaces leaves [0.75, 1.117) pages, where the next,
    # longer one fits. With the block at the range's start (the rule before, here forced by
    # asking for more peers than there are) the rest [1.258, 1.375) stays beside the live
    # block, the freed cache leaves a quarter page, and the next request finds no room.
    for peers, fits in ((_core.SLIDE_PEERS, True), (5, False)):
        dev = vmmpool.Device.emulated(capacity=128 * P, granularity=P)
        with PagePool(dev, limit=2 * P) as pool, pytest.MonkeyPatch.context() as mp:
            mp.setattr(_core, "SLIDE_PEERS", peers)
            cs = [pool.malloc(P // 4) for _ in range(4)]
            x = pool.malloc(3 * P // 8)
            w = pool.malloc(5 * P // 8)
            x.free()
            k = pool.malloc(P // 4 + 512)
            cs[3].free()
            if fits:
                k2 = pool.malloc(P // 4 + 1024)
                assert (k2.ptr - cs[0].ptr) / P == 0.75
            else:
                with pytest.raises(vmmpool.OutOfMemoryError):
                    pool.malloc(P // 4 + 1024)
            pool._check()
            del k, w


def test_gpt2_shaped_caches_grow_beside_their_predecessors() -> None:
    # GPT-2-shaped inference, 6 layers, d_model 768, bf16, batch 4, 128 + 64 tokens (86.4
    # pages live, 87 at the whole-page floor). Measured 2026-12-07: 89 pages (1.0305 x peak
    # live) with every grown KV cache at the start of its free range, 88 (1.0189) since near
    # the limit it goes beside the cache it replaces (Core.split_beside_growing).
    tr = gpt2_inference(layers=6, d_model=768, heads=8, batch=4, prompt=128, new_tokens=64)
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.pages <= 88, f"{mn.pages} pages, {mn.ratio:.4f} x peak live"


@pytest.mark.parametrize(
    ("limit", "peers", "at"),
    [(12, 4, 10.5), (11, 4, 6.0), (64, 4, 6.0), (None, 4, 6.0), (12, 6, 6.0)],
)
def test_a_large_growing_block_near_the_limit_goes_after_the_newest_of_its_kind(
    limit: int | None, peers: int, at: float
) -> None:
    # Five 1.5-page "KV caches" (the last after a 1.25-page block), a free hole [6, 7.75)
    # pages between two of them, and half a page free after the newest, before unmapped
    # slots. A cache one growth step longer fits the hole (the best fit), but near the limit
    # (11 pages held, 10 pinned) it goes right after the newest cache, mapping the pages it
    # needs there (Core.fit_after_growing): 2, one created, one the hole's cached page. Not
    # when that would pin more than the limit (11: the best fit, and no out-of-memory
    # counted), far from the limit (64), without one, or with fewer peers than SLIDE_PEERS.
    dev = vmmpool.Device.emulated(capacity=128 * P, granularity=P)
    with PagePool(dev, limit=None if limit is None else limit * P) as pool, \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(_core, "SLIDE_PEERS", peers)
        cs = [pool.malloc(3 * P // 2) for _ in range(4)]
        base = cs[0].ptr
        hole = pool.malloc(7 * P // 4)
        g = pool.malloc(5 * P // 4)
        cs.append(pool.malloc(3 * P // 2))
        assert [(x.ptr - base) / P for x in (hole, g, cs[4])] == [6.0, 7.75, 9.0]
        assert pool.stats().total_pages == 11
        hole.free()
        k = pool.malloc(3 * P // 2 + 512)
        pool._check()
        s = pool.stats()
        assert (k.ptr - base) / P == at
        assert s.total_pages == (12 if at == 10.5 else 11)
        assert s.n_ooms == 0 and s.n_syncs == 0
        for x in cs:  # the newest last: the oldest is freed first
            x.free()
        del g, k


@pytest.mark.parametrize(("limit", "at"), [(15, 0.0), (None, 7.75)])
def test_a_ring_of_growing_blocks_wraps_round_into_mapped_bytes(limit: int | None, at: float) -> None:
    # The same five caches, now with a free range [0, 1.75) pages just before the oldest
    # (a ring that moved on) and a smaller hole [7.75, 9.375) that the best fit takes.
    # Near the limit the grown cache goes at the start of the range before the oldest
    # (Core.fit_after_growing wraps round, no page mapped); without a limit, in the hole.
    dev = vmmpool.Device.emulated(capacity=128 * P, granularity=P)
    with PagePool(dev, limit=None if limit is None else limit * P) as pool:
        z = pool.malloc(7 * P // 4)
        base = z.ptr
        cs = [pool.malloc(3 * P // 2) for _ in range(4)]
        y = pool.malloc(13 * P // 8)
        g = pool.malloc(5 * P // 4)
        cs.append(pool.malloc(3 * P // 2))
        assert [(x.ptr - base) / P for x in (cs[0], y, g, cs[4])] == [1.75, 7.75, 9.375, 10.625]
        z.free()
        y.free()
        held = pool.stats().total_pages
        k = pool.malloc(3 * P // 2 + 512)
        pool._check()
        assert (k.ptr - base) / P == at
        assert pool.stats().total_pages == held
        for x in cs:
            x.free()
        del g, k


def test_gpt2_shaped_caches_over_a_page_grow_in_a_ring() -> None:
    # GPT-2-shaped inference, 24 layers, d_model 768, fp32, batch 8, 64 + 64 tokens (474.6
    # pages live, 475 at the whole-page floor; KV caches of 0.75-1.5 pages). Measured
    # 2026-12-07: 482 pages (1.0156 x peak live) with every cache of more than a page in the
    # best-fitting hole (at 481 the next one fails with 9 pages of free bytes in 33 pieces),
    # 476 (1.0029) since near the limit it goes after the newest one (Core.fit_after_growing).
    # The ring wraps round into bytes still mapped: replayed at 484 pages it remapped 90
    # pages (162 with the best fit; 632 when the ring only moved on, mapping ahead of itself).
    tr = gpt2_inference(layers=24, d_model=768, heads=8, batch=8, prompt=64, new_tokens=64,
                        dtype_bytes=4)
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.pages <= 477, f"{mn.pages} pages, {mn.ratio:.4f} x peak live"
    res = R.replay(tr, None, 484 * (2 << 20))
    assert res.completed and res.syncs == 0
    assert res.remaps <= 120, res.remaps


@pytest.mark.parametrize(
    ("layers", "batch", "prompt", "before", "now"), [(6, 4, 128, 88, 87), (12, 1, 256, 127, 126)]
)
def test_gpt2_shaped_caches_of_at_most_a_page_grow_in_a_ring(
    layers: int, batch: int, prompt: int, before: int, now: int
) -> None:
    # GPT-2-shaped inference, d_model 768, bf16, 64 new tokens, KV caches of at most a page.
    # Measured 2026-12-07: `before` pages with the ring for caches of more than a page only
    # (their growth-side split, Core.split_beside_growing, alone), `now` (the whole-page
    # floor) since near the limit a small one goes after the newest one too.
    tr = gpt2_inference(layers=layers, d_model=768, heads=8, batch=batch, prompt=prompt,
                        new_tokens=64)
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.pages <= now < before, f"{mn.pages} pages, {mn.ratio:.4f} x peak live"


def test_growth_headroom_depends_on_a_limit_being_set() -> None:
    # Without a limit the budget is 1.02 x the peak in use (+ a slack of at most 2% of it, at
    # least 2 pages); with one it keeps 2 more pages and a slack floor of 8 (see _core.GROWTH).
    dev = vmmpool.Device.emulated(capacity=256 * P, granularity=P)
    for limit in (None, 200 * P):
        with PagePool(dev, limit=limit) as pool:
            a = pool.malloc(50 * P)
            core = pool._core
            fixed, floor = (2, 8) if limit is not None else (0, 2)
            assert core.budget() == 51 + fixed
            assert core.max_slack() == min(4, floor)
            pool.set_limit(None if limit is not None else 200 * P)  # the other way round
            fixed, floor = (2, 8) if limit is None else (0, 2)
            assert core.budget() == 51 + fixed
            assert core.max_slack() == min(4, floor)
            a.free()
    with PagePool(dev, limit=200 * P) as pool:  # slack built under a limit, then no limit:
        core = pool._core  # no more than the rule without a limit allows
        core.slack = 4
        pool.set_limit(None)
        assert core.slack == core.max_slack() <= 2


def test_growth_headroom_without_a_limit_counts_whole_pages() -> None:
    # Without a limit, 1.02 x the peak is rounded down to whole pages, never below the
    # peak's own pages: a 34.5-page peak gets 35 pages (rounded up, 1.02 x gave 36: 7% of
    # headroom on a small pool), a 100-page peak 102. A limit keeps the rounding up.
    dev = vmmpool.Device.emulated(capacity=256 * P, granularity=P)
    for size, free_budget, limited_budget in ((69 * P // 2, 35, 36 + 2), (100 * P, 102, 102 + 2)):
        for limit, want in ((None, free_budget), (200 * P, limited_budget)):
            with PagePool(dev, limit=limit) as pool:
                a = pool.malloc(size)
                assert pool._core.slack == 0
                assert pool._core.budget() == want, (size / P, limit)
                a.free()


def test_keep_cached_makes_a_loop_call_the_driver_only_while_it_warms_up() -> None:
    # ResNet-50-shaped inference at batch 8, 160 px, repeated: by default the pool keeps to its
    # growth budget by remapping cached pages in every pass (108 backend calls a pass, measured
    # 2026-12-07); keeping them, passes 3 and 4 make no call, for more memory held.
    from vmmpool.replay._trace import repeated

    tr = resnet50(batch=8, image=160, train=False)
    two, four = repeated(tr, 2), repeated(tr, 4)
    assert two is not None and four is not None

    def per_pass(keep: bool) -> tuple[float, float]:
        a = run_replay(two, None, None, {"keep_cached": keep})
        b = run_replay(four, None, None, {"keep_cached": keep})
        assert a.completed and b.completed and a.syncs == b.syncs == 0
        return (b.backend_calls - a.backend_calls) / 2, b.peak_held / b.peak_live

    calls, held = per_pass(False)
    assert calls > 0 and held <= 1.07
    kept_calls, kept_held = per_pass(True)
    assert kept_calls == 0 and kept_held >= held
    dev = vmmpool.Device.emulated(capacity=16 * P, granularity=P)
    # A 3-page free range between live blocks, then a 4-page request: kept, 4 new pages are
    # mapped (11 in all); by default (or at a limit of 8 pages) the 3 cached pages are remapped.
    for keep, limit, pages in ((True, None, 11), (True, 8 * P, 8), (False, None, 8)):
        with PagePool(dev, limit=limit, keep_cached=keep) as pool:
            assert pool.keep_cached is keep
            if keep:
                assert pool._core.budget() == (16 if limit is None else 8)  # the limit
            a, b, c = pool.malloc(2 * P), pool.malloc(3 * P), pool.malloc(2 * P)
            b.free()
            d = pool.malloc(4 * P)
            st = pool.stats()
            assert (st.total_pages, st.n_remaps > 0) == (pages, pages < 11), st
            for x in (a, c, d):
                x.free()
    with pytest.raises(TypeError, match="keep_cached must be a bool, got str"):
        PagePool(dev, keep_cached="yes")  # type: ignore[arg-type]


def test_keep_cached_with_preallocate_serves_from_the_preallocated_pages() -> None:
    # preallocate promises that a process allocating on the default stream never calls the
    # driver again; keep_cached must not make small blocks create pages beside them.
    for keep in (False, True):
        dev = vmmpool.Device.emulated(capacity=32 * P, granularity=P)
        with PagePool(dev, preallocate=4 * P, keep_cached=keep) as pool:
            before = dev.counters()
            for _ in range(2):
                xs = [pool.malloc(1000) for _ in range(3)] + [pool.malloc(P), pool.malloc(P // 3)]
                for x in xs:
                    x.free()
            assert dev.counters() - before == {}, keep
            assert pool.stats().total_pages == 4
            pool._check()


def test_memory_snapshot_says_whether_the_pool_keeps_cached_pages() -> None:
    dev = vmmpool.Device.emulated(capacity=16 * P, granularity=P)
    for keep in (False, True):
        with PagePool(dev, keep_cached=keep) as pool:
            settings = pool.memory_snapshot()["allocator_settings"]
            assert settings["keep_cached"] is keep and settings["page_size"] == P


def test_memory_snapshot_lists_blocks_placed_through_an_alias(tmp_path) -> None:
    # A block placed across an alias lies at the alias's addresses: the
    # snapshot's segments must hold it (PyTorch's viewer and the replay read
    # them), and agree with the history's segment_map events, which map the
    # alias's address space (the replay's recorded reserved bytes then start at
    # 0, not below).
    dev = vmmpool.Device.emulated(capacity=16 * P, granularity=P)
    with PagePool(dev, limit=4 * P) as pool:
        pool.record_history(context=None)
        xs = [pool.malloc(P // 2) for _ in range(8)]
        base = min(x.ptr for x in xs)
        by_off = {(x.ptr - base) // (P // 2): x for x in xs}
        by_off.pop(1).free()
        by_off.pop(4).free()
        c = pool.malloc(3 * P // 4)
        assert pool._core.n_aliases == 2
        snap = pool.memory_snapshot()
        active = {
            b["address"]: b["size"]
            for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"
        }
        assert active.get(c.ptr) == c.size, "the aliased block is missing from the segments"
        assert sum(active.values()) == pool.stats().allocated_bytes
        assert sum(p.alias_address is not None for p in pool.snapshot()) == 2
        path = tmp_path / "alias.pickle"
        pool.dump_snapshot(path)
        tr = R.load(str(path))
        assert tr.recorded_reserved[0] == (0, 0), tr.recorded_reserved
        assert min(r for _, r in tr.recorded_reserved) >= 0
        c.free()
        for x in by_off.values():
            x.free()


@pytest.mark.parametrize("nth", [3, 5, 8])
def test_a_failed_sleep_that_stays_asleep_with_an_alias_slot_still_mapped_wakes(
    nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sleep unmaps slot by slot (pieces of one page here); the nth unmap fails, and so
    # does the undo's first map: the pool stays asleep with its backup, and "wake()
    # retries". An aliased page whose own slot was unmapped is asleep, but a slot of it
    # the failed sleep did not reach is still mapped: wake mapped it again, which the
    # driver refuses, so the pool could never wake (its data kept but out of reach).
    from vmmpool._pool import _sleep

    monkeypatch.setattr(_sleep, "SLEEP_GROUP", P)
    dev = vmmpool.Device.emulated(capacity=32 * P, granularity=P)
    backend = dev._backend
    q = P // 4
    with PagePool(dev, limit=5 * P) as pool:
        _base, by_off, c1, c2 = three_mappings(pool, dev)  # page 1 is mapped three times
        dev.write(c1.ptr, pattern(101, P // 2))
        dev.write(c2.ptr, pattern(102, P // 2))
        backend.inject_fault("unmap", nth=nth, name="CUDA_ERROR_INVALID_VALUE")
        backend.inject_fault("map", nth=1, name="CUDA_ERROR_INVALID_VALUE")
        with pytest.raises(vmmpool.DriverError):
            pool.sleep()
        backend.clear_faults()
        assert pool.asleep
        pool._check()
        pool.wake()
        pool._check()
        for i, x in by_off.items():
            assert bytes(dev.read(x.ptr, q)) == pattern(i, q), f"block {i} changed"
        assert bytes(dev.read(c1.ptr, P // 2)) == pattern(101, P // 2)
        assert bytes(dev.read(c2.ptr, P // 2)) == pattern(102, P // 2)
        pool.sleep()  # and again, whole
        pool.wake()
        pool._check()
        assert bytes(dev.read(c2.ptr, P // 2)) == pattern(102, P // 2)
        for x in [*by_off.values(), c1, c2]:
            x.free()
        pool.defragment()
        pool._check()
    assert dev.counters().live == (0, 0, 0)


def test_a_small_block_needs_a_set_of_eight_to_be_taken_for_a_growing_cache() -> None:
    # ResNet-50-shaped training, batch 4, 224 px, bf16 (173.3 pages live, 174 at the
    # whole-page floor). Measured 2026-12-07: 176 pages before the ring for small blocks,
    # 177 with it (a 0.574-page request beside six activations of 0.5625 page was taken
    # for a grown cache), 176 again since a small block wants SLIDE_SMALL_SET (8) live
    # blocks of the set's sizes.
    tr = resnet50(batch=4, image=224, train=True, dtype_bytes=2)
    mn = R.min_limit(tr)
    assert mn.result.syncs == 0
    assert mn.pages <= 176, f"{mn.pages} pages, {mn.ratio:.4f} x peak live"

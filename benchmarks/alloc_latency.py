"""Allocation latency: malloc + free pairs over a recurring size mix.

Two patterns, after a warm-up:

* ``pairs``: each malloc is freed at once (sizes cycle through the mix);
* ``window``: eight allocations stay live; each step allocates the next size
  and frees the oldest (stream-ordered reuse with overlap).

Reports microseconds per malloc+free pair (best of several repeats) and, for
vmmpool, backend calls per pair (``device.counters()`` deltas: the target is
zero in the steady state). On a GPU, ``cupy.cuda.MemoryPool`` runs the same
patterns in the same process and the ratio is reported. The same patterns also
run through ``vmmpool.torch.callbacks`` called as C function pointers (what
PyTorch's pluggable allocator pays per segment on top of the pool: the ctypes
round trip into Python).

Usage: ``python benchmarks/alloc_latency.py [--device host|cuda:0] [--quick]``.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from _common import check_output, device_of, parser, positive_int, size, table, write_json

import vmmpool
from vmmpool._pool import PagePool

MiB = 1 << 20
#: The recurring size mix: small blocks (shared pages) and large ones (whole pages).
SIZES = [256, 4096, 1000, 65536, 300_000, 1 * MiB, 4 * MiB, 100, 16 * MiB + 1, 2 * MiB]
WINDOW = 8


def pattern_pairs(malloc: Callable[[int], Any], free: Callable[[Any], None], n: int) -> None:
    sizes = SIZES
    k = len(sizes)
    for i in range(n):
        free(malloc(sizes[i % k]))


def pattern_window(malloc: Callable[[int], Any], free: Callable[[Any], None], n: int) -> None:
    sizes = SIZES
    k = len(sizes)
    q: deque[Any] = deque(malloc(sizes[i % k]) for i in range(WINDOW))
    for i in range(n):
        q.append(malloc(sizes[(i + WINDOW) % k]))
        free(q.popleft())
    while q:
        free(q.popleft())


PATTERNS = {"pairs": pattern_pairs, "window": pattern_window}


def measure(
    malloc: Callable[[int], Any], free: Callable[[Any], None], pattern: str, n: int, repeats: int,
    counters: Callable[[], vmmpool.BackendCounters] | None = None,
) -> dict[str, Any]:
    run = PATTERNS[pattern]
    run(malloc, free, 5 * len(SIZES))  # warm-up: the caches reach their steady state
    best = float("inf")
    calls = None
    for _ in range(repeats):
        before = counters() if counters else None
        t = time.perf_counter()
        run(malloc, free, n)
        dt = time.perf_counter() - t
        if counters and before is not None:
            delta = counters() - before
            calls = sum(delta.values()) / n if calls is None else max(calls, sum(delta.values()) / n)
        best = min(best, dt)
    return {"us_per_pair": best / n * 1e6, "backend_calls_per_pair": calls, "pairs": n, "repeats": repeats}


def cupy_pool(device: vmmpool.Device, limit: int) -> tuple[Any, Callable[[int], Any], Callable[[Any], None]]:
    import cupy

    cupy.cuda.Device(device.ordinal).use()
    pool = cupy.cuda.MemoryPool()
    pool.set_limit(size=limit)

    def free(h: Any) -> None:
        del h  # the last reference returns the block to the pool

    return pool, pool.malloc, free


def torch_callbacks(pool: PagePool, device: vmmpool.Device, n: int, repeats: int) -> dict[str, Any]:
    """The patterns through ``vmmpool.torch.callbacks``, called through ctypes as PyTorch calls them."""
    import ctypes

    import vmmpool.torch as vt

    alloc_address, free_address = vt.callbacks(pool)
    c_alloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(alloc_address)
    c_free = ctypes.CFUNCTYPE(
        None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
    )(free_address)
    d = 0 if device.is_host else device.ordinal

    def malloc(nbytes: int) -> tuple[int, int]:
        return (c_alloc(nbytes, d, None), nbytes)

    def free(h: tuple[int, int]) -> None:
        c_free(h[0], h[1], d, None)

    return {
        f"vmmpool.torch.callbacks/{pat}": measure(malloc, free, pat, n, repeats, device.counters)
        for pat in PATTERNS
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=positive_int, default=None,
                   help="pairs per repeat (default 50000; 5000 --quick)")
    args = p.parse_args(argv)
    check_output(p, args.output)
    device = device_of(args.device, p)
    n = args.pairs or (5000 if args.quick else 50000)
    repeats = 3 if args.quick else 5
    limit = 1 << 30
    print(f"allocation latency on {device} ({device.name}); size mix "
          f"{', '.join(size(s) for s in SIZES)}; {n} pairs x {repeats} repeats")
    results: dict[str, dict[str, Any]] = {}
    with PagePool(device, limit=limit) as pool:
        for pat in PATTERNS:
            results[f"vmmpool.PagePool/{pat}"] = measure(
                pool.malloc, PagePool.free.__get__(pool), pat, n, repeats, device.counters,
            )
        stats = pool.stats()
    with PagePool(device, limit=limit) as tpool:
        results.update(torch_callbacks(tpool, device, n, repeats))
    cupy_error = None
    if not device.is_host:
        try:
            cpool, cmalloc, cfree = cupy_pool(device, limit)
            for pat in PATTERNS:
                results[f"cupy.cuda.MemoryPool/{pat}"] = measure(cmalloc, cfree, pat, n, repeats)
            cpool.free_all_blocks()
        except Exception as exc:  # noqa: BLE001 - a missing or broken peer is "n/a"
            cupy_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    rows = []
    for pat in PATTERNS:
        ours = results[f"vmmpool.PagePool/{pat}"]
        peer = results.get(f"cupy.cuda.MemoryPool/{pat}")
        rows.append([
            pat,
            f"{ours['us_per_pair']:.2f}",
            f"{ours['backend_calls_per_pair']:.4f}",
            "n/a" if peer is None else f"{peer['us_per_pair']:.2f}",
            "n/a" if peer is None else f"{ours['us_per_pair'] / peer['us_per_pair']:.2f}",
        ])
    print()
    print(table(["pattern", "vmmpool us/pair", "backend calls/pair", "cupy us/pair",
                 "vmmpool / cupy"], rows))
    for pat in PATTERNS:
        t = results[f"vmmpool.torch.callbacks/{pat}"]
        print(f"{pat}: through vmmpool.torch.callbacks (ctypes, as PyTorch calls them): "
              f"{t['us_per_pair']:.2f} us/pair, {t['backend_calls_per_pair']:.4f} backend calls/pair")
    if device.is_host:
        print("cupy: n/a on the host emulator (CuPy's pool needs a GPU)")
    elif cupy_error:
        print(f"cupy: n/a ({cupy_error})")
    print(f"pool after the run: {stats.total_pages} pages, {stats.n_page_creations} created, "
          f"{stats.n_remaps} remaps")
    path = write_json(
        "alloc_latency", device,
        {"sizes": SIZES, "window": WINDOW, "limit": limit, "results": results,
         "cupy_error": cupy_error if not device.is_host else "n/a on host",
         "pool_stats": stats.__dict__},
        args.output,
        quick=args.quick,
        save=args.save,
    )
    print(f"wrote {path}")
    zero = all(r["backend_calls_per_pair"] == 0 for k, r in results.items() if k.startswith("vmmpool"))
    print("target: zero backend calls per steady-state pair: " + ("met" if zero else "NOT met"))
    return 0 if zero else 1


if __name__ == "__main__":
    sys.exit(main())

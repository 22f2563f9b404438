"""CuPy's default pool versus vmmpool.cupy.MemoryPool, in the same process.

Two measurements per allocator:

* alloc: ``cupy.empty`` + ``del`` over a recurring mix of sizes (the
  allocation path alone; no kernel runs);
* workload: a loop of elementwise ops and reductions on varying shapes,
  synchronized, so allocation is mixed with real kernels.

Prints a table with time per op and the ratio vmmpool / CuPy, and writes JSON
to ``benchmarks/results/cupy_pool-cuda.json``. Targets: within 1.5x of CuPy's
pool on the allocation path, no measurable difference on the workload.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

SIZES = [512, 4096, 65536, 1 << 20, 3 << 20, 8 << 20, 24 << 20, 100_000, 777, 16 << 10]
SHAPES = [(1024,), (512, 512), (1000, 37), (2048, 1024), (333, 333), (4096, 256)]


def _time_alloc(cp: Any, rounds: int) -> float:
    arrays = []
    for s in SIZES:  # warm-up: fill the cache for every size
        arrays.append(cp.empty(s, dtype=cp.uint8))
    del arrays
    t0 = time.perf_counter()
    for _ in range(rounds):
        for s in SIZES:
            a = cp.empty(s, dtype=cp.uint8)
            del a
    return (time.perf_counter() - t0) / (rounds * len(SIZES))


def _time_workload(cp: Any, rounds: int) -> float:
    def step() -> None:
        for shape in SHAPES:
            x = cp.arange(int(cp.prod(cp.asarray(shape))), dtype=cp.float32).reshape(shape)
            y = cp.sin(x) * 2 + x
            z = y.sum(axis=-1)
            float(z.max())

    step()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        step()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / (rounds * len(SHAPES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0", help="a CUDA device (default cuda:0)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)

    import vmmpool

    if str(args.device).startswith("host"):
        print("cupy_pool: CuPy kernels need a GPU; the host device cannot run this benchmark.")
        return 0
    try:
        dev = vmmpool.Device(args.device)
    except vmmpool.DeviceUnavailableError as err:
        print(f"cupy_pool: no usable GPU here ({err.reason}); nothing to measure. Exiting 0.")
        return 0
    try:
        import cupy as cp
    except ImportError:
        print("cupy_pool: CuPy is not installed; nothing to measure. Exiting 0.")
        return 0
    import vmmpool.cupy as vcupy

    cp.cuda.Device(dev.ordinal).use()
    alloc_rounds = 200 if args.quick else 2000
    work_rounds = 20 if args.quick else 200

    results: dict[str, dict[str, float]] = {}
    default = cp.cuda.MemoryPool()
    with cp.cuda.using_allocator(default.malloc):
        results["cupy.MemoryPool"] = {
            "alloc_us": _time_alloc(cp, alloc_rounds) * 1e6,
            "workload_us": _time_workload(cp, work_rounds) * 1e6,
        }
    default.free_all_blocks()
    pool = vcupy.MemoryPool()  # follows CuPy's current device, as README recommends
    with vcupy.using_pool(pool):
        before = dev.counters()
        results["vmmpool.cupy.MemoryPool"] = {
            "alloc_us": _time_alloc(cp, alloc_rounds) * 1e6,
            "workload_us": _time_workload(cp, work_rounds) * 1e6,
        }
        calls = dev.counters() - before
    stats = pool.stats()
    cp.cuda.Device().synchronize()
    pool.close()

    ref, ours = results["cupy.MemoryPool"], results["vmmpool.cupy.MemoryPool"]
    print(f"device: {dev.name} ({dev})")
    print(f"{'allocator':28} {'alloc+del (us)':>15} {'workload op (us)':>17}")
    for name, r in results.items():
        print(f"{name:28} {r['alloc_us']:15.2f} {r['workload_us']:17.1f}")
    ratio_alloc = ours["alloc_us"] / ref["alloc_us"]
    ratio_work = ours["workload_us"] / ref["workload_us"]
    print(f"{'ratio vmmpool / cupy':28} {ratio_alloc:15.2f}x {ratio_work:16.2f}x")
    print(f"backend calls during vmmpool runs: {calls or 'none'}")

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "cupy_pool-cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "cupy_pool",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.name,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cupy": cp.__version__,
        "results": results,
        "ratio_alloc": ratio_alloc,
        "ratio_workload": ratio_work,
        "backend_calls": calls,
        "pool_stats": dataclasses.asdict(stats),
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

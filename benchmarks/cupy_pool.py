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

import dataclasses
import sys
import time
from typing import Any

from _common import check_output, parser, table, write_json

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
    p = parser(__doc__.splitlines()[0], "cuda:N (default: cuda:0; host has nothing to measure)")
    args = p.parse_args(argv)
    check_output(p, args.output)
    if args.device is None:
        args.device = "cuda:0"

    import vmmpool

    if str(args.device).startswith("host"):
        print("cupy_pool: CuPy kernels need a GPU; the host device cannot run this benchmark.")
        return 0
    try:
        dev = vmmpool.Device(args.device)
    except vmmpool.DeviceUnavailableError as err:
        print(f"cupy_pool: no usable GPU here ({err.reason}); nothing to measure. Exiting 0.")
        return 0
    except (ValueError, TypeError, vmmpool.VmmError) as err:
        p.error(f"--device: {err}")
    try:
        import cupy as cp
    except ImportError:
        print("cupy_pool: CuPy is not installed; nothing to measure. Exiting 0.")
        return 0
    import vmmpool.cupy as vcupy

    try:
        cp.cuda.Device(dev.ordinal).use()
    except Exception as err:  # noqa: BLE001 - CuPy without a usable runtime (too old a driver, say)
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        print(f"cupy_pool: CuPy cannot use {dev} ({reason}); nothing to measure. Exiting 0.")
        return 0
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
    ratio_alloc = ours["alloc_us"] / ref["alloc_us"]
    ratio_work = ours["workload_us"] / ref["workload_us"]
    print(f"device: {dev.name} ({dev})")
    rows = [[name, f"{r['alloc_us']:.2f}", f"{r['workload_us']:.1f}"] for name, r in results.items()]
    rows.append(["ratio vmmpool / cupy", f"{ratio_alloc:.2f}x", f"{ratio_work:.2f}x"])
    print(table(["allocator", "cupy.empty+del (us)", "workload op (us)"], rows))
    print(f"backend calls during vmmpool runs: {calls or 'none'}")
    print("targets: allocation path within 1.5x of CuPy's pool: "
          + ("met" if ratio_alloc <= 1.5 else "NOT met"))
    out = write_json(
        "cupy_pool",
        dev,
        {
            "cupy": cp.__version__,
            "results": results,
            "ratio_alloc": ratio_alloc,
            "ratio_workload": ratio_work,
            "backend_calls": calls,
            "pool_stats": dataclasses.asdict(stats),
        },
        args.output,
        quick=args.quick,
        save=args.save,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sleep and wake a pool full of live data: time and GB/s against live bytes, and the copy baseline.

For each size (256 MiB .. 8 GiB on the host) a fresh :class:`vmmpool.PagePool` is
filled with live allocations totalling that many bytes (64 MiB blocks plus a few
sub-page ones, every byte written), then:

* ``sleep``: :meth:`PagePool.sleep` (wait for the streams, copy every live page to a
  host array in runs through the pinned staging buffer, unmap, release every page);
  ``Device.free_memory`` is checked to rise by what the pool held;
* ``wake``: :meth:`PagePool.wake` (create, map at the same addresses, copy back);
  the bytes are checked (a sample of every allocation) and every address is unchanged.

The baseline is what a user does without VMM: copy every allocation out to host
memory (NumPy), free it and give the pages back (``trim``), then later allocate
afresh and copy the bytes back in. Its addresses change (every pointer, view and
registration made before is stale); the pool's do not.

Host notes: "device" memory is host memory here, so every copy is a host memcpy.
``sleep`` copies twice (device to the pinned staging buffer, staging to the backup:
the shape of the CUDA path, where the first copy is a DMA on the stream); the
baseline copies once. On the host the pool sleeps and wakes by 64 MiB pieces (RAM
peaks near the live bytes), but the baseline needs its live bytes twice in RAM
(device and copies); sizes that do not fit twice in the machine's available memory
(minus a margin) are skipped and listed as such. Run::

    python benchmarks/sleep.py --device host          # 256 MiB .. 8 GiB
    python benchmarks/sleep.py --device host --quick  # 256 and 512 MiB

It prints a table and writes ``benchmarks/results/sleep-<device kind>.json``.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import numpy as np
from _common import check_output, device_of, parser, positive_float, positive_int, size, table, write_json

import vmmpool

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 64 * MiB
#: Bytes of RAM kept free beyond what a size needs (the machine may be shared).
MARGIN = 4 * GiB


def available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _put(dev: vmmpool.Device, a: vmmpool.Allocation, data: np.ndarray) -> None:
    """Write `data` (uint8, ``a.size`` bytes) into `a`: through NumPy on the host, a copy on a GPU.

    NumPy takes host memory only: ``np.from_dlpack`` of a CUDA view fails (it crashed this
    benchmark on ``--device cuda:N`` before the first figure).
    """
    if dev.is_host:
        np.from_dlpack(a.view("uint8"))[:] = data
    else:
        dev.write(a.ptr, data)


def _get(dev: vmmpool.Device, a: vmmpool.Allocation) -> np.ndarray:
    """A host copy of `a`'s bytes (NumPy on the host, a device-to-host copy on a GPU)."""
    if dev.is_host:
        return np.from_dlpack(a.view("uint8")).copy()
    return np.frombuffer(dev.read(a.ptr, a.size), dtype=np.uint8)


def _gave_back(dev: vmmpool.Device, freed: int, held: int) -> bool:
    """Free memory rose by what the pool held (on a GPU the driver and other processes may
    move it by a few MiB, as tests/test_sleep.py allows)."""
    return freed == held if dev.is_host else freed >= held - (32 << 20)


def fill(dev: vmmpool.Device, pool: vmmpool.PagePool, nbytes: int) -> list[tuple[vmmpool.Allocation, int]]:
    """Live allocations of `nbytes` in all: 64 MiB blocks, a few sub-page ones; every byte written."""
    out = []
    left = nbytes
    small = [1000, 5000, 100_000, 700_000]
    for n in small:
        left -= n
    i = 0
    while left > 0:
        n = min(BLOCK, left)
        a = pool.malloc(n, stream=i % 2)
        out.append((a, i))
        left -= n
        i += 1
    for n in small:
        out.append((pool.malloc(n, stream=1), i))
        i += 1
    for a, seed in out:
        if dev.is_host:
            arr = np.from_dlpack(a.view("uint8"))
            arr[:] = seed % 251
            del arr
        else:
            _put(dev, a, np.full(a.size, seed % 251, dtype=np.uint8))
    return out


def check(dev: vmmpool.Device, live: list[tuple[vmmpool.Allocation, int]]) -> None:
    for a, seed in live:
        for off in (0, a.size // 2, a.size - 1):
            got = dev.read(a.ptr + off, 1)[0]
            assert got == seed % 251, f"byte {off} of the allocation at {a.ptr:#x} is {got}"


def run_pool(dev: vmmpool.Device, nbytes: int) -> dict[str, Any]:
    pool = vmmpool.PagePool(dev, limit=nbytes + 64 * MiB)
    live = fill(dev, pool, nbytes)
    ptrs = [a.ptr for a, _s in live]
    held = pool.stats().reserved_bytes
    free0 = dev.free_memory
    t = time.perf_counter()
    pool.sleep()
    t_sleep = time.perf_counter() - t
    freed = dev.free_memory - free0
    assert _gave_back(dev, freed, held), f"sleep gave back {freed} bytes, the pool held {held}"
    s = pool.stats()
    t = time.perf_counter()
    pool.wake()
    t_wake = time.perf_counter() - t
    assert [a.ptr for a, _s in live] == ptrs
    check(dev, live)
    for a, _s in live:
        a.free()
    pool.close()
    return {
        "live_bytes": nbytes,
        "pages": held // dev.granularity,
        "backup_bytes": s.backup_bytes,
        "freed_bytes": freed,
        "sleep_s": t_sleep,
        "wake_s": t_wake,
        "sleep_gbps": s.backup_bytes / t_sleep / 1e9,
        "wake_gbps": s.backup_bytes / t_wake / 1e9,
        "addresses_kept": True,
    }


def run_baseline(dev: vmmpool.Device, nbytes: int) -> dict[str, Any]:
    """Copy out + free + trim; then fresh allocations + copy in (addresses change)."""
    pool = vmmpool.PagePool(dev, limit=nbytes + 64 * MiB)
    live = fill(dev, pool, nbytes)
    held = pool.stats().reserved_bytes
    free0 = dev.free_memory
    t = time.perf_counter()
    saved = []
    for a, seed in live:
        saved.append((_get(dev, a), a.size, a.stream, seed))
        a.free()
    pool.trim()
    t_out = time.perf_counter() - t
    freed = dev.free_memory - free0
    assert _gave_back(dev, freed, held), f"trim gave back {freed} bytes, the pool held {held}"
    old = [a.ptr for a, _s in live]
    del live
    t = time.perf_counter()
    fresh = []
    for arr, n, stream, seed in saved:
        a = pool.malloc(n, stream=stream)
        _put(dev, a, arr)
        fresh.append((a, seed))
    t_in = time.perf_counter() - t
    moved = sum(1 for (a, _s), p in zip(fresh, old, strict=True) if a.ptr != p)
    del saved
    check(dev, fresh)
    for a, _s in fresh:
        a.free()
    pool.close()
    return {
        "live_bytes": nbytes,
        "out_s": t_out,
        "in_s": t_in,
        "out_gbps": nbytes / t_out / 1e9,
        "in_gbps": nbytes / t_in / 1e9,
        "allocations_moved": moved,
        "allocations": len(fresh),
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "host or cuda:N (default: host, an emulated device sized to the run)")
    p.add_argument("--max-gib", type=positive_float, default=8.0, help="largest live size (default 8)")
    p.add_argument("--min-gib", type=float, default=0.0, help="smallest live size (default: all)")
    p.add_argument("--repeats", type=positive_int, default=2,
                   help="runs per size; the best is kept (default 2)")
    args = p.parse_args(argv)
    check_output(p, args.output)
    sizes = [256 * MiB, 512 * MiB, GiB, 2 * GiB, 4 * GiB, 8 * GiB]
    sizes = [s for s in sizes if args.min_gib * GiB <= s <= args.max_gib * GiB]
    if not sizes:
        p.error(f"no size from 256 MiB to 8 GiB lies in [--min-gib {args.min_gib}, --max-gib {args.max_gib}]")
    if args.quick:
        sizes = sizes[:2]
    top = max(sizes)
    capacity = top + 128 * MiB  # set explicitly: the emulator's default is a quarter of RAM, at most 8 GiB
    host = args.device in (None, "host")
    dev = vmmpool.Device.emulated(capacity=capacity) if host else device_of(args.device, p)
    rows, pools, bases, skipped = [], [], [], []
    for n in sizes:
        need = 2 * n + 256 * MiB
        avail = available_ram()
        if dev.is_host and need + MARGIN > avail:
            skipped.append({"live_bytes": n, "needed_bytes": need, "available_bytes": avail})
            print(f"{size(n)}: skipped, needs {size(need)} of RAM (device + backup), {size(avail)} available")
            continue
        best_p: dict[str, Any] | None = None
        best_b: dict[str, Any] | None = None
        for _ in range(args.repeats):
            r = run_pool(dev, n)
            gc.collect()
            if best_p is None or r["sleep_s"] + r["wake_s"] < best_p["sleep_s"] + best_p["wake_s"]:
                best_p = r
            b = run_baseline(dev, n)
            gc.collect()
            if best_b is None or b["out_s"] + b["in_s"] < best_b["out_s"] + best_b["in_s"]:
                best_b = b
        assert best_p is not None and best_b is not None
        pools.append(best_p)
        bases.append(best_b)
        rows.append([
            size(n),
            f"{best_p['sleep_s']:.3f}", f"{best_p['sleep_gbps']:.2f}",
            f"{best_p['wake_s']:.3f}", f"{best_p['wake_gbps']:.2f}",
            f"{best_b['out_s']:.3f}", f"{best_b['in_s']:.3f}",
            f"{best_b['allocations_moved']}/{best_b['allocations']}",
        ])
        print(f"{size(n)}: sleep {best_p['sleep_s']:.3f} s, wake {best_p['wake_s']:.3f} s; "
              f"baseline out {best_b['out_s']:.3f} s, in {best_b['in_s']:.3f} s", flush=True)
    print()
    print(table(
        ["live", "sleep s", "GB/s", "wake s", "GB/s", "copy-out+free s", "alloc+copy-in s", "moved"],
        rows,
    ))
    path = write_json(
        "sleep",
        dev,
        {
            "capacity": capacity,
            "repeats": args.repeats,
            "pool": pools,
            "baseline": bases,
            "skipped": skipped,
            "load_average_after": os.getloadavg(),
            "available_ram_after": available_ram(),
            "notes": (
                "sleep = wait for streams + copy live pages to a host array through the pinned staging "
                "buffer + unmap + release; wake = create + map at the same addresses + copy back. "
                "baseline = copy every allocation out with NumPy + free + trim, then malloc afresh + "
                "copy in (addresses change: 'allocations_moved'). On the host emulator every copy is a "
                "host memcpy; sleep copies twice (staging, then backup), the baseline once."
            ),
        },
        args.output,
        quick=args.quick,
        save=args.save,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

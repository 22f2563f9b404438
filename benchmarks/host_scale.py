"""An 80 GiB device of 2 MiB pages: create, map, set_access, unmap, release 40,960 pages.

Times each phase over every page, one backend call per page, with the pages
mapped into one reservation in address order and in a shuffled order (the
order a defragmenting pool remaps in). Also records the file descriptors and
kernel mappings (VMAs) the process holds with every page mapped: the host
emulator must fit an 80 GiB device under 1,024 open files and the kernel's
default 65,530 mappings (issue 11).

On the host emulator (default) the device is ``Device.emulated`` with an
80 GiB capacity; nothing is touched, so no memory is committed. On
``--device cuda:N`` the same calls go to the driver, with as many pages as fit
in 90% of free memory. Run::

    python benchmarks/host_scale.py               # 40,960 pages
    python benchmarks/host_scale.py --quick       # 4,096 pages

It prints a table and writes ``benchmarks/results/host_scale-<device kind>.json``.
"""

from __future__ import annotations

import os
import random
import resource
import time
from typing import Any

from _common import check_output, device_of, parser, positive_int, table, write_json

import vmmpool
from vmmpool import Access

PHASES = ("create", "map", "set_access", "unmap", "release")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _vmas() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def run(dev: vmmpool.Device, pages: int, shuffled: bool, seed: int) -> dict[str, Any]:
    b = dev._backend
    g = dev.granularity
    order = list(range(pages))
    if shuffled:
        random.Random(seed).shuffle(order)
    before = dev.counters()
    fds0, vmas0 = _fds(), _vmas()
    base = b.reserve(pages * g)
    t: dict[str, float] = {}
    try:
        s = time.perf_counter()
        handles = [b.create(g) for _ in range(pages)]
        t["create"] = time.perf_counter() - s
        s = time.perf_counter()
        for i in order:
            b.map(base + i * g, g, handles[i])
        t["map"] = time.perf_counter() - s
        s = time.perf_counter()
        for i in order:
            b.set_access(base + i * g, g, Access.READWRITE, [dev.ordinal])
        t["set_access"] = time.perf_counter() - s
        held = {"fds": _fds() - fds0, "vmas": _vmas() - vmas0, "vmas_total": _vmas()}
        s = time.perf_counter()
        for i in order:
            b.unmap(base + i * g, g)
        t["unmap"] = time.perf_counter() - s
        s = time.perf_counter()
        for h in handles:
            b.release(h)
        t["release"] = time.perf_counter() - s
    finally:
        b.free_address(base, pages * g)
    after = dev.counters()
    assert after.live == before.live, f"leak: {before.live} -> {after.live}"
    return {
        "order": "shuffled" if shuffled else "in order",
        "pages": pages,
        "seconds": t,
        "us_per_page": {k: v / pages * 1e6 for k, v in t.items()},
        "total_seconds": sum(t.values()),
        "held_with_all_mapped": held,
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "host or cuda:N (default: host, an emulated device of --pages pages)")
    p.add_argument("--pages", type=positive_int, default=None, help="pages (default 40960; --quick 4096)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    check_output(p, args.output)
    pages = args.pages or (4096 if args.quick else 40960)
    g = 2 << 20
    if args.device in (None, "host"):
        dev = vmmpool.Device.emulated(capacity=pages * g)
    else:
        dev = device_of(args.device, p)
        pages = min(pages, int(dev.free_memory * 0.9) // dev.granularity)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    results = [run(dev, pages, shuffled, args.seed) for shuffled in (False, True)]
    headers = ["order", *[f"{ph} us/page" for ph in PHASES], "total s", "fds", "VMAs"]
    rows = [
        [
            r["order"],
            *[f"{r['us_per_page'][ph]:.1f}" for ph in PHASES],
            f"{r['total_seconds']:.2f}",
            r["held_with_all_mapped"]["fds"],
            r["held_with_all_mapped"]["vmas"],
        ]
        for r in results
    ]
    print(f"{pages} pages of {dev.granularity >> 20} MiB on {dev} ({pages * dev.granularity >> 30} GiB)")
    print(table(headers, rows))
    path = write_json(
        "host_scale",
        dev,
        {
            "pages": pages,
            "page_bytes": dev.granularity,
            "rlimit_nofile": list(nofile),
            "max_map_count": int(open("/proc/sys/vm/max_map_count").read()),
            "results": results,
            "note": "fds/VMAs: held by the process beyond those before the run, with every page mapped",
        },
        args.output,
        quick=args.quick,
        save=args.save,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

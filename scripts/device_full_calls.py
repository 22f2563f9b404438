"""Backend calls per slow-path request of a pool whose device is full below its limit.

Two pools share one host-emulated device of 16 pages: B holds 10, so A (limit
14 pages) fills the device at 6. A then serves 5-page requests on alternate
streams: each one remaps the other stream's cached pages. Before the pool
remembered the device's refusal, every such request also made a failing
``create`` (a slow ``cuMemCreate`` on a GPU); now only requests 1, 3, 6, 11,
20, ... do (see ``Core.create_pages``). Finally B closes and A grows again.
Host emulator only (run from the repository root)::

    PYTHONPATH=. python scripts/device_full_calls.py
"""

from __future__ import annotations

import vmmpool
from vmmpool._pool import PagePool

MiB = 1 << 20
N = 30


def main() -> None:
    dev = vmmpool.Device.emulated(16 * 2 * MiB)
    P = dev.granularity
    a = PagePool(dev, limit=14 * P)
    b = PagePool(dev, limit=14 * P)
    hog = [b.malloc(P) for _ in range(10)]
    keep = a.malloc(P, stream=9)  # live data in A
    dev.write(keep.ptr, b"x" * 4096)
    total: dict[str, int] = {}
    failed = 0
    for i in range(N):
        before, made = dev.counters(), a.stats().n_page_creations
        x = a.malloc(5 * P, stream=1 + i % 2)
        d = dev.counters() - before
        x.free()
        fails = d.get("create", 0) - (a.stats().n_page_creations - made)
        failed += fails
        print(f"request {i:2d}: {d}" + (f"  ({fails} failing create)" if fails else ""))
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    print(f"calls a request (mean over {N}):", {k: round(v / N, 2) for k, v in sorted(total.items())})
    print(f"failing creates: {failed}; pages A holds: {a.stats().total_pages}")
    for h in hog:
        h.free()
    b.close()
    i = N
    while True:
        before = dev.counters()
        x = a.malloc(5 * P, stream=1 + i % 2)
        d = dev.counters() - before
        x.free()
        if d.get("create"):
            print(f"B closed: A grew at request {i} to {a.stats().total_pages} pages: {d}")
            break
        i += 1
    assert bytes(dev.read(keep.ptr, 4096)) == b"x" * 4096
    keep.free()
    a.close()


if __name__ == "__main__":
    main()

"""PagePool under concurrent malloc / free / write / verify from several threads."""

from __future__ import annotations

import gc
import random
import threading

import numpy as np

import vmmpool
from vmmpool._pool import Allocation, PagePool

MiB = 1 << 20


def test_threads_malloc_free_write_verify() -> None:
    dev = vmmpool.Device.emulated(capacity=48 * 2 * MiB)
    pool = PagePool(dev, limit=40 * 2 * MiB)
    errors: list[BaseException] = []
    n_ooms = [0]
    lock = threading.Lock()
    start = threading.Barrier(6)

    def worker(tid: int) -> None:
        rnd = random.Random(tid)
        stream = tid % 3  # threads share streams too
        mine: list[tuple[Allocation, int, int]] = []
        try:
            start.wait()
            for i in range(400):
                if mine and (len(mine) > 12 or rnd.random() < 0.45):
                    a, tag, head = mine.pop(rnd.randrange(len(mine)))
                    got = np.frombuffer(dev.read(a.ptr, head), dtype=np.uint8)
                    if not (got == tag).all():
                        raise AssertionError(f"thread {tid}: bytes of {a!r} changed")
                    if rnd.random() < 0.1:
                        del a  # the garbage collector frees it
                    else:
                        a.free()
                    continue
                n = rnd.choice([0, 100, 4096, 70000, 1 * MiB, 2 * MiB + 1, 5 * MiB])
                try:
                    a = pool.malloc(n, stream=stream)
                except vmmpool.OutOfMemoryError:
                    with lock:
                        n_ooms[0] += 1
                    continue
                tag = (tid * 37 + i) % 251
                head = min(n, 4096)  # write and check the head only: cheap
                dev.write(a.ptr, bytes([tag]) * head)
                mine.append((a, tag, head))
                if i % 97 == 0:
                    pool.defragment()
            for a, _, _ in mine:
                a.free()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert not errors, errors
    s = pool.stats()
    assert s.live_allocations == 0 and s.requested_bytes == 0 and s.allocated_bytes == 0
    assert s.n_malloc == s.n_free and s.n_ooms == n_ooms[0]
    pool._check()
    pool.close()
    assert dev.counters().live == (0, 0, 0)

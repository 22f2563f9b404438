"""The host emulator at the size of a real GPU, and at the edge of the OS (issues 11 and 8).

An 80 GiB device of 40,960 live 2 MiB allocations, every one mapped, must fit
under the common soft limit of 1,024 open files and the kernel's default 65,530
mappings. Exhaustion of an OS resource (file descriptors, mappings, address
space) must surface as ``CUDA_ERROR_OUT_OF_MEMORY`` naming the cause, change
nothing and leak nothing. Sizes and addresses of 2**64 and above, or beyond
what the emulator can address, are rejected before any OS call.

The tests that lower a resource limit run in a subprocess of their own, so the
limit cannot reach the rest of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import vmmpool
from vmmpool import Access, Device, DriverError
from vmmpool._backends.host import ADDRESS_LIMIT, HostBackend

G = 2 << 20
INVALID = "CUDA_ERROR_INVALID_VALUE"

# Shared by the subprocess scripts: the number of open descriptors, and whether
# a range is fully covered by kernel mappings (a hole would let other mmaps in).
_PRELUDE = """
import json, os, resource, sys, random
import vmmpool
from vmmpool import Access, Device, OutOfMemoryError

def open_fds():
    # Counted with fstat, which needs no descriptor of its own.
    n = 0
    for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]):
        try:
            os.fstat(fd)
            n += 1
        except OSError:
            pass
    return n

def vma_count():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)

import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_vec = ctypes.create_string_buffer(1 << 16)

def covered(addr, size):
    # Whether kernel mappings cover the whole range (a hole would let other
    # mmaps in). mincore fails with ENOMEM on unmapped pages; it allocates
    # nothing, so it works at the mapping limit too.
    step = (1 << 16) * 4096
    for a in range(addr, addr + size, step):
        if libc.mincore(a, min(step, addr + size - a), _vec) != 0:
            return False
    return True

def fill_mappings():
    # Use up the process's kernel mappings (vm.max_map_count): cut one region
    # into alternating protections, then add shared pages (which never merge)
    # until the kernel refuses. Returns what to munmap afterwards.
    P, n = 4096, 70000
    area = libc.mmap(None, n * P, 3, 0x22 | 0x4000, -1, 0)
    for i in range(1, n, 2):
        if libc.mprotect(area + i * P, P, 1) != 0:
            break
    extra = []
    while True:
        a = libc.mmap(None, P, 3, 0x21, -1, 0)
        if a in (None, ctypes.c_void_p(-1).value):
            break
        extra.append(a)
    return [(area, n * P)] + [(a, P) for a in extra]

def headroom(regions, n):
    # Give back about n mappings: merge split pages of the region again.
    area = regions[0][0]
    for i in range(1, n + 1, 2):
        libc.mprotect(area + i * 4096, 4096, 3)

def unfill(regions):
    for a, n in regions:
        libc.munmap(a, n)
"""


def _run(body: str, timeout: float = 120) -> dict:
    """Run `body` (after the prelude) in a fresh interpreter; return the JSON it prints last."""
    code = _PRELUDE + textwrap.dedent(body)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(vmmpool.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------- scale
@pytest.mark.slow
def test_80_gib_device_of_40960_mapped_pages_under_1024_open_files() -> None:
    out = _run(
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        N, G = 40960, 2 << 20
        dev = Device.emulated(capacity=N * G)
        b = dev._backend
        fds0 = open_fds()
        base = b.reserve(N * G)
        handles = [b.create(G) for _ in range(N)]
        order = list(range(N))
        random.Random(7).shuffle(order)
        for i in order:
            b.map(base + i * G, G, handles[i])
        b.set_access(base, N * G, Access.READWRITE, [0])
        live_full = list(dev.counters().live)
        free_full = dev.free_memory
        fds_full, vmas_full = open_fds() - fds0, vma_count()
        # Every page is its own memory: a marker written to each of a few
        # pages reads back from that page only.
        probe = [0, 1, 511, 512, 20000, N - 1]
        for i in probe:
            dev.write(base + i * G + 4096, i.to_bytes(4, "little"))
        seen = [int.from_bytes(dev.read(base + i * G + 4096, 4), "little") for i in probe]
        for i in order:
            b.unmap(base + i * G, G)
        for h in handles:
            b.release(h)
        b.free_address(base, N * G)
        print(json.dumps(dict(live_full=live_full, free_full=free_full, fds=fds_full,
                              vmas=vmas_full, probe=probe, seen=seen,
                              live_end=list(dev.counters().live),
                              bytes_end=dev.counters().physical_bytes,
                              fds_end=open_fds() - fds0)))
        """,
        timeout=300,
    )
    assert out["live_full"] == [1, 40960, 40960]
    assert out["free_full"] == 0
    assert out["fds"] <= 81, f"{out['fds']} descriptors for 80 GiB (one per 1 GiB chunk expected)"
    assert out["vmas"] < 65530
    assert out["seen"] == out["probe"]
    assert out["live_end"] == [0, 0, 0] and out["bytes_end"] == 0
    assert out["fds_end"] <= 1  # at most one empty chunk is kept for the next create


def test_allocations_share_a_few_descriptors() -> None:
    dev = Device.emulated(capacity=1200 * G)
    b = dev._backend
    before = _fds()
    hs = [b.create(G) for _ in range(1200)]
    try:
        assert _fds() - before <= 3  # 1200 pages of 2 MiB in 1 GiB chunks
    finally:
        for h in hs:
            b.release(h)
    assert _fds() - before <= 1
    assert dev.counters().live == (0, 0, 0)


def test_adjacent_slots_of_one_chunk_are_distinct_memory_and_shared_across_mappings() -> None:
    dev = Device.emulated(capacity=16 * G)
    b = dev._backend
    base = b.reserve(4 * G)
    h1, h2 = b.create(G), b.create(G)
    b.map(base, G, h1)
    b.map(base + G, G, h2)
    b.map(base + 2 * G, G, h1)  # a second mapping of the same allocation
    b.set_access(base, 3 * G, Access.READWRITE, [0])
    dev.write(base + G - 8, b"h1-end!!")
    dev.write(base + G, b"h2-start")
    assert dev.read(base + 3 * G - 8, 8) == b"h1-end!!"
    assert dev.read(base + G, 8) == b"h2-start"
    assert dev.read(base + 2 * G + G - 16, 8) == bytes(8)
    b.unmap(base, 3 * G)
    b.release(h1)
    b.release(h2)
    b.free_address(base, 4 * G)
    assert dev.counters().live == (0, 0, 0)


def test_released_slot_gives_its_memory_back() -> None:
    backend = HostBackend(capacity=8 * G)
    dev = Device._from_backend(backend)
    base = backend.reserve(G)
    h = backend.create(G)
    backend.map(base, G, h)
    backend.set_access(base, G, Access.READWRITE, [0])
    dev.write(base, b"\xff" * G)
    chunk = backend._physical[h].chunk
    assert chunk is not None and os.fstat(chunk.fd).st_blocks * 512 >= G
    backend.unmap(base, G)
    backend.release(h)
    assert os.fstat(chunk.fd).st_blocks == 0  # the hole was punched
    h = backend.create(G)  # first fit: the same slot, now zeros
    assert backend._physical[h].chunk is chunk
    backend.map(base, G, h)
    backend.set_access(base, G, Access.READ, [0])
    assert dev.read(base, G) == bytes(G)
    backend.unmap(base, G)
    backend.release(h)
    backend.free_address(base, G)
    backend.close()
    assert backend._chunks == []


def test_exportable_and_imported_allocations_keep_a_memfd_of_their_own() -> None:
    dev = Device.emulated(capacity=8 * G)
    b = dev._backend
    plain = b.create(G)
    exp = b.create(G, exportable=True)
    fd = b.export_fd(exp)
    try:
        assert os.fstat(fd).st_size == G  # the fd shares exactly this allocation
        imp = b.import_fd(fd)
        base = b.reserve(2 * G)
        b.map(base, G, exp)
        b.map(base + G, G, imp)
        b.set_access(base, 2 * G, Access.READWRITE, [0])
        dev.write(base + 100, b"shared")
        assert dev.read(base + G + 100, 6) == b"shared"
        with pytest.raises(DriverError, match="exportable"):
            b.export_fd(plain)
        b.unmap(base, 2 * G)
        b.free_address(base, 2 * G)
        b.release(imp)
    finally:
        os.close(fd)
    b.release(exp)
    b.release(plain)
    assert dev.counters().live == (0, 0, 0)


def test_allocation_larger_than_a_chunk_gets_a_chunk_of_its_own() -> None:
    backend = HostBackend(capacity=16 * G, chunk_size=4 * G)
    a = backend.create(2 * G)
    big = backend.create(6 * G)
    b2 = backend.create(2 * G)
    assert backend._physical[big].chunk is not backend._physical[a].chunk
    assert backend._physical[b2].chunk is backend._physical[a].chunk  # first fit
    for h in (a, big, b2):
        backend.release(h)
    assert backend.counters().live == (0, 0, 0)


# ---------------------------------------------------------------- exhaustion
def test_descriptor_exhaustion_is_out_of_memory_and_leaks_nothing() -> None:
    out = _run(
        """
        G = 2 << 20
        dev = Device.emulated(capacity=64 * G)
        b = dev._backend
        # A chunk of one granule: every create needs a new memfd.
        tiny = Device._from_backend(type(b)(capacity=64 * G, chunk_size=G))
        t = tiny._backend
        kept = t.create(G)
        exp = b.create(G, exportable=True)
        shared = b.export_fd(exp)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 8, hard))
        fillers = []
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        results = []
        for what, call in [("create exportable", lambda: b.create(G, exportable=True)),
                           ("create in a new chunk", lambda: t.create(G)),
                           ("export_fd", lambda: b.export_fd(exp)),
                           ("import_fd", lambda: b.import_fd(shared))]:
            before = (dev.counters().live, tiny.counters().live, open_fds())
            try:
                call()
                results.append([what, "no error"])
            except OutOfMemoryError as e:
                results.append([what, e.name + " " + str(e)])
            except Exception as e:
                results.append([what, type(e).__name__ + " " + str(e)])
            after = (dev.counters().live, tiny.counters().live, open_fds())
            results[-1].append(before == after)
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # Still usable once descriptors are back.
        h1, h2 = b.create(G, exportable=True), t.create(G)
        h3 = b.import_fd(shared)
        os.close(shared)
        for h in (h1, h3, exp):
            b.release(h)
        t.release(h2); t.release(kept)
        print(json.dumps(dict(results=results, live=[list(dev.counters().live),
                                                    list(tiny.counters().live)])))
        """
    )
    assert len(out["results"]) == 4
    for what, message, unchanged in out["results"]:
        assert message.startswith("CUDA_ERROR_OUT_OF_MEMORY out of memory"), (what, message)
        assert "EMFILE" in message and "open-file limit" in message, (what, message)
        assert unchanged, f"{what}: the failed call changed counters or descriptors"
    assert out["live"] == [[0, 0, 0], [0, 0, 0]]


def test_mapping_count_exhaustion_is_out_of_memory_and_changes_nothing() -> None:
    out = _run(
        """
        G = 2 << 20
        dev = Device.emulated(capacity=64 * G)
        b = dev._backend
        base = b.reserve(8 * G)
        hs = [b.create(G) for _ in range(4)]
        b.map(base, G, hs[0])
        b.map(base + G, G, hs[1])       # adjacent slots: one kernel mapping
        b.set_access(base, 2 * G, Access.READWRITE, [0])
        dev.write(base, b"kept")
        regions = fill_mappings()
        vmas = vma_count()
        def attempt(name, fn):
            before = (dev.counters().live, covered(base, 8 * G))
            try:
                fn()
                res = "no error"
            except OutOfMemoryError as e:
                res = str(e)
            except Exception as e:
                res = type(e).__name__ + ": " + str(e)
            return [name, res, before == (dev.counters().live, covered(base, 8 * G))]
        results = [
            attempt("map", lambda: b.map(base + 4 * G, G, hs[2])),
            attempt("set_access", lambda: b.set_access(base, G, Access.READ, [0])),
            attempt("unmap part", lambda: b.unmap(base, G)),
            attempt("reserve", lambda: b.reserve(G)),
        ]
        access = b.get_access(base, 0).value
        # The kernel's protection is unchanged too: a direct store still works.
        ctypes.memmove(base + 4, b"!", 1)
        data = bytes(dev.read(base, 5))
        unfill(regions)
        # Usable again: the same calls succeed once mappings are available.
        b.map(base + 4 * G, G, hs[2])
        b.set_access(base, G, Access.READ, [0])
        b.unmap(base, 2 * G); b.unmap(base + 4 * G, G)
        for h in hs:
            b.release(h)
        b.free_address(base, 8 * G)
        print(json.dumps(dict(vmas=vmas, results=results, access=access, data=data.decode(),
                              live=list(dev.counters().live))))
        """
    )
    assert out["vmas"] >= 65000  # the limit really was reached
    for name, message, unchanged in out["results"]:
        assert message.startswith("out of memory"), (name, message)
        assert "ENOMEM" in message and "max_map_count" in message, (name, message)
        assert unchanged, f"{name}: the failed call changed the emulator or its mappings"
    assert out["access"] == "rw" and out["data"] == "kept!"
    assert out["live"] == [0, 0, 0]


def test_address_space_exhaustion_is_out_of_memory_and_changes_nothing() -> None:
    out = _run(
        """
        G = 2 << 20
        dev = Device.emulated(capacity=64 * G)
        b = dev._backend
        base = b.reserve(4 * G)
        h = b.create(G)
        with open("/proc/self/status") as f:
            vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize")][0]
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + G // 2, hard))
        res = []
        for name, fn in [("reserve", lambda: b.reserve(16 * G)), ("map", lambda: b.map(base, G, h))]:
            before = (dev.counters().live, covered(base, 4 * G))
            try:
                fn()
                res.append([name, "no error"])
            except OutOfMemoryError as e:
                res.append([name, str(e)])
            res[-1].append(before == (dev.counters().live, covered(base, 4 * G)))
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        b.map(base, G, h)
        b.unmap(base, G)
        b.release(h)
        b.free_address(base, 4 * G)
        print(json.dumps(dict(res=res, live=list(dev.counters().live))))
        """
    )
    for name, message, unchanged in out["res"]:
        assert message.startswith("out of memory") and "ENOMEM" in message, (name, message)
        assert unchanged, name
    assert out["live"] == [0, 0, 0]


def test_unmap_of_whole_mappings_succeeds_at_the_mapping_limit() -> None:
    # The undo of a failed multi-page map unmaps what it mapped: that must not
    # need a kernel mapping the failure may have exhausted.
    out = _run(
        """
        G = 2 << 20
        dev = Device.emulated(capacity=64 * G)
        b = dev._backend
        base = b.reserve(32 * G)
        hs = [b.create(G) for _ in range(16)]
        regions = fill_mappings()
        headroom(regions, 12)
        mapped, err = [], ""
        try:
            for i in range(16):         # every other page: each map splits the placeholder
                b.map(base + 2 * i * G, G, hs[i])
                mapped.append(base + 2 * i * G)
        except OutOfMemoryError as e:
            err = str(e)
        undo = "ok"
        try:
            for a in reversed(mapped):
                b.unmap(a, G)
        except Exception as e:
            undo = type(e).__name__ + ": " + str(e)
        live = list(dev.counters().live)
        intact = covered(base, 32 * G)
        unfill(regions)
        for h in hs:
            b.release(h)
        b.free_address(base, 32 * G)
        print(json.dumps(dict(mapped=len(mapped), err=err, undo=undo, live=live, intact=intact,
                              end=list(dev.counters().live))))
        """
    )
    assert 0 < out["mapped"] < 16, out
    assert out["err"].startswith("out of memory"), out
    assert out["undo"] == "ok", out["undo"]
    assert out["live"] == [1, 16, 0] and out["intact"]
    assert out["end"] == [0, 0, 0]


# ------------------------------------------------------------- 64-bit guards
@pytest.mark.parametrize(
    ("size", "alignment", "hint"),
    [
        (1 << 64, 0, 0),
        ((1 << 64) + G, 0, 0),
        (ADDRESS_LIMIT, 0, 0),
        (G, 1 << 64, 0),
        (G, 1 << 63, 0),
        (G, ADDRESS_LIMIT, 0),
        (G, 0, 1 << 64),
    ],
)
def test_reserve_beyond_the_address_range_is_rejected(size: int, alignment: int, hint: int) -> None:
    dev = Device.emulated(capacity=8 * G)
    before = dev.counters()
    with pytest.raises(DriverError, match=r"2\*\*47") as info:
        dev._backend.reserve(size, alignment, hint)
    assert info.value.name == INVALID
    # The public call is refused by the validation layer, before the backend.
    with pytest.raises(ValueError, match=r"2\*\*47"):
        vmmpool.reserve(size, dev, alignment=alignment, hint=hint)
    assert dev.counters().live == before.live == (0, 0, 0)


def test_create_and_map_beyond_the_address_range_are_rejected() -> None:
    dev = Device.emulated(capacity=8 * G)
    b = dev._backend
    for size in (1 << 64, (1 << 64) + G, 1 << 63, ADDRESS_LIMIT):
        with pytest.raises(DriverError, match=r"2\*\*47") as info:
            b.create(size)
        assert info.value.name == INVALID
    for address, size in [(1 << 64, G), ((1 << 64) - G, 2 * G), (ADDRESS_LIMIT - G, 2 * G)]:
        with pytest.raises(DriverError, match=r"2\*\*47"):
            b.map(address, size, 0x1000)
        with pytest.raises(DriverError, match=r"2\*\*47"):
            b.unmap(address, size)
        with pytest.raises(DriverError, match=r"2\*\*47"):
            b.set_access(address, size, Access.READWRITE, [0])
    for call in (lambda: b.get_access(1 << 64, 0), lambda: b.retain(1 << 64)):
        with pytest.raises(DriverError, match=r"2\*\*47"):
            call()
    with pytest.raises(DriverError, match="file descriptor"):
        b.import_fd(1 << 64)
    assert dev.counters().live == (0, 0, 0)


def test_read_checks_the_range_before_allocating() -> None:
    dev = Device.emulated(capacity=8 * G)
    res = vmmpool.reserve(2 * G, dev)
    try:
        with pytest.raises(ValueError, match=r"2\*\*47"):
            dev.read(res.address, 1 << 62)
        with pytest.raises(ValueError, match=r"2\*\*47"):
            dev.read(1 << 64, 16)
        # Inside the address range but beyond the reservation or unmapped: the
        # emulator says so before allocating the buffer.
        with pytest.raises(DriverError, match="not inside one reservation"):
            dev.read(res.address, 4 * G)  # past the 2 GiB reservation, below 2**47
        with pytest.raises(DriverError, match="not mapped"):
            dev.read(res.address, G)
    finally:
        res.close()
    assert dev.counters().live == (0, 0, 0)


def test_emulated_capacity_beyond_the_address_range_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"2\*\*47"):
        Device.emulated(capacity=1 << 64)
    with pytest.raises(ValueError, match=r"2\*\*47"):
        HostBackend(capacity=ADDRESS_LIMIT + G)


def test_address_limit_is_part_of_the_backend_interface(device: Device) -> None:
    b = device._backend
    assert 1 << 40 <= b.address_limit <= 1 << 64
    with pytest.raises(DriverError):
        b.check_value("reserve", "size", b.address_limit)
    b.check_value("reserve", "size", b.address_limit - 1)
    with pytest.raises(ValueError):
        b.check_transfer(b.address_limit - 1, 2)

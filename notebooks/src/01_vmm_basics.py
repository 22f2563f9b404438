# %% [markdown]
# # 1. VMM basics: virtual ranges, physical pages, mappings
#
# **What this shows.** CUDA's virtual memory management (the driver's `cuMem*` calls) splits "an
# address range" from "memory": `reserve` takes addresses, `create` takes physical memory, `map`
# backs addresses with memory, and `set_access` lets a device use it. With those four calls you can
# put the *same* memory at two addresses, or move memory to a new address without copying a byte.
#
# Each vmmpool call below is one CUDA driver call; every step prints the calls it made, by their
# CUDA names, so you can look each one up in the CUDA Driver API documentation ("Virtual Memory
# Management"):
#
# | step | vmmpool | CUDA driver call |
# |---|---|---|
# | 0 | `dev.granularity` | `cuMemGetAllocationGranularity(prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM)` |
# | 1 | `vmmpool.reserve(size, dev)` | `cuMemAddressReserve(size, alignment, addr_hint, 0)` |
# | 2 | `vmmpool.create(size, dev)` | `cuMemCreate(size, prop, 0)` |
# | 3 | `va.map(alloc, offset)` | `cuMemMap(va + offset, alloc.size, 0, handle, 0)` |
# | 3 | `va.set_access(offset, size, "rw")` | `cuMemSetAccess(va + offset, size, [CUmemAccessDesc], n)` |
# | 5 | `mapping.unmap()` | `cuMemUnmap(address, size)` |
# | end | `alloc.close()` | `cuMemRelease(handle)` |
# | end | `va.close()` | `cuMemAddressFree(va, size)` (after `cuMemUnmap` of what is still mapped) |
#
# Each step is also drawn: reservations (virtual ranges) on top, side by side, cut into slots of the
# granularity; physical allocations at the bottom; a line for each mapping, from the slot to the
# allocation that backs it. A hatched slot is mapped but not yet accessible.
#
# It runs on the host emulator (`Device.emulated`), which enforces the CUDA driver's rules on Linux
# virtual memory; swap in `vmmpool.Device("cuda:0")` on a GPU and every cell behaves the same.
# At the end, the same steps in raw `cuda.bindings` (run where a GPU is present).

# %%
import matplotlib.pyplot as plt

import vmmpool
from vmmpool.plot import mapping_diagram

#: vmmpool's backend operations and the CUDA driver call each one is
CUDA_NAME = {
    "reserve": "cuMemAddressReserve", "create": "cuMemCreate", "map": "cuMemMap",
    "set_access": "cuMemSetAccess", "get_access": "cuMemGetAccess", "unmap": "cuMemUnmap",
    "release": "cuMemRelease", "free_address": "cuMemAddressFree",
}


def driver_calls(before):
    """The driver calls made since `before` (a dev.counters() snapshot), by their CUDA names."""
    made = dev.counters() - before
    return ", ".join(f"{CUDA_NAME.get(op, op)} x{n}" for op, n in made.items()) or "none"


dev = vmmpool.Device.emulated(capacity=64 << 20)  # a fresh 64 MiB emulated device
g = dev.granularity
print("granularity:", g, "bytes;", "total:", dev.total_memory >> 20, "MiB")
print("live (reservations, allocations, mappings):", dev.counters().live, "expected (0, 0, 0)")

# %% [markdown]
# ## Step 0: the allocation properties and the granularity
# Every physical allocation is described by a `CUmemAllocationProp`:
#
# - `type = CU_MEM_ALLOCATION_TYPE_PINNED`: device memory that stays where it is (not migratable);
# - `location = {CU_MEM_LOCATION_TYPE_DEVICE, id = ordinal}`: which GPU holds it;
# - `requestedHandleTypes`: `CU_MEM_HANDLE_TYPE_NONE`, or `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` to
#   share it with another process (`vmmpool.create(..., handle_type="posix_fd")`);
# - `allocFlags.gpuDirectRDMACapable = 1` where the device supports GPUDirect RDMA on VMM memory
#   (vmmpool sets it when the device says so).
#
# `cuMemGetAllocationGranularity` tells, for those properties, the size every `cuMemCreate`,
# `cuMemMap` and offset must be a multiple of: 2 MiB on current GPUs. vmmpool asks once per device
# (`dev.granularity`); never hard-code it.

# %%
print("granularity (cuMemGetAllocationGranularity, MINIMUM):", g >> 20, "MiB")
print("3 MiB rounds up to", dev.round_up(3 << 20) >> 20, "MiB")

# %% [markdown]
# ## Step 1: reserve addresses (`cuMemAddressReserve`)
# A reservation is only addresses: nothing backs it until you map memory there. Its size is a
# multiple of the granularity; `addr_hint` is only a hint (the driver may place it elsewhere).

# %%
before = dev.counters()
va = vmmpool.reserve(4 * g, dev)
print(va)
print("driver calls:", driver_calls(before))
mapping_diagram([va], title="reserve(4 x 2 MiB): addresses only, no memory");

# %% [markdown]
# ## Step 2: create physical memory (`cuMemCreate`)
# `create` allocates physical memory that has no address yet: nothing can touch it. The driver
# returns a *handle*; the memory is freed when the handle is released and no mapping is left.

# %%
before = dev.counters()
a = vmmpool.create(g, dev)
b = vmmpool.create(g, dev)
print("driver calls:", driver_calls(before))
print("live:", dev.counters().live, "expected (1, 2, 0)")
mapping_diagram([va], [a, b], title="create: two physical allocations, not mapped");

# %% [markdown]
# ## Step 3: map (`cuMemMap`), then grant access (`cuMemSetAccess`)
# `cuMemMap` backs addresses with a *whole* allocation (its offset into the allocation must be 0)
# and grants no access: touching the memory now would fault (hatched). `cuMemSetAccess` gives a
# device read-write (or read) access; one call may cover several adjacent whole mappings.

# %%
before = dev.counters()
ma = va.map(a, 0)
mb = va.map(b, g)
print("map:", driver_calls(before))
print("after map, access:", ma.access.value, "expected none (mapping grants no access)")
fig, (top, bottom) = plt.subplots(2, figsize=(8, 5))
mapping_diagram([va], [a, b], ax=top, title="cuMemMap at offsets 0 and 2 MiB: no access yet")
before = dev.counters()
va.set_access(0, 2 * g, "rw")  # one driver call covers both adjacent mappings
print("set_access:", driver_calls(before))
mapping_diagram([va], [a, b], ax=bottom, title="cuMemSetAccess(rw) over both: one call")
fig.tight_layout()
print("after set_access:", ma.get_access().value, mb.get_access().value, "expected rw rw")
print("live:", dev.counters().live, "expected (1, 2, 2)")

# %% [markdown]
# ## Step 4: one memory, two addresses
# Reserve a second range and map `b` there too (`cuMemAddressReserve`, `cuMemMap`,
# `cuMemSetAccess`): both addresses show the same bytes.

# %%
before = dev.counters()
other = vmmpool.reserve(g, dev)
mb2 = other.map(b, 0, access="rw")  # map, then set access, in one vmmpool call
print("driver calls:", driver_calls(before))
dev.write(mb.address, b"written at the first address")
seen = bytes(dev.read(mb2.address, 28))
print(seen)
assert seen == b"written at the first address"
mapping_diagram([va, other], [a, b], title="allocation 1 mapped in two reservations");

# %% [markdown]
# ## Step 5: move memory without copying (`cuMemUnmap`, then `cuMemMap` elsewhere)
# Unmap `b` from offset `g` and map it at offset `3g`: its bytes appear at the new address. This is
# what the page pool does to defragment: scattered pages, new neighbours, no copy.

# %%
before = dev.counters()
mb.unmap()
moved = va.map(b, 3 * g, access="rw")
print("driver calls:", driver_calls(before))
print(hex(moved.address - va.address), bytes(dev.read(moved.address, 28)))
assert bytes(dev.read(moved.address, 28)) == b"written at the first address"
mapping_diagram([va, other], [a, b], title="unmap at 2 MiB, map at 6 MiB: same bytes, new address");

# %% [markdown]
# ## The order rules, enforced
# The driver's order, which vmmpool's objects make structural:
#
# 1. `cuMemAddressReserve` and `cuMemCreate` first (either order); sizes and map offsets are
#    multiples of the granularity.
# 2. `cuMemMap` only into an *unmapped* part of a reservation, always a whole allocation.
# 3. `cuMemSetAccess` after every `cuMemMap` (after a remap too): a mapping starts with no access.
# 4. `cuMemUnmap` only whole mappings (several adjacent ones in one call is fine), never a range
#    with never-mapped parts.
# 5. `cuMemRelease` may come right after `cuMemMap`: the memory lives until its last mapping goes.
# 6. `cuMemAddressFree` takes exactly one reservation's `(ptr, size)`, once nothing is mapped there.
# 7. The driver does not wait for running kernels: wait for the work that used memory before
#    unmapping it (vmmpool's pool and buffers do, with events).
#
# The emulator rejects what the CUDA driver rejects, and the Python layer catches most mistakes even
# earlier, with an error that states expected versus actual, before anything changes. Running out
# of memory is the driver's own `CUDA_ERROR_OUT_OF_MEMORY`.

# %%
for what, call in [
    ("unmap a never-mapped range", lambda: va.unmap(2 * g, g)),
    ("map at an odd offset", lambda: va.map(a, 4096)),
    ("map over a mapping", lambda: va.map(a, 0)),
    ("create 3 MiB", lambda: vmmpool.create(3 << 20, dev)),
    ("create more than the device", lambda: vmmpool.create(128 << 20, dev)),
]:
    try:
        call()
    except (vmmpool.DriverError, vmmpool.OutOfMemoryError) as err:
        print(f"{what:28} -> {err.name}")
    except ValueError as err:
        print(f"{what:28} -> ValueError: {err}")
print("live:", dev.counters().live, "expected (2, 2, 3): the failures changed nothing")
assert dev.counters().live == (2, 2, 3)

# %% [markdown]
# ## Lifetimes: release early (`cuMemRelease`), nothing leaks
# Releasing a handle right after mapping is the normal pattern: the memory lives until its last
# mapping goes. Closing a reservation unmaps whatever is still mapped (`cuMemUnmap`), then frees the
# range (`cuMemAddressFree`).

# %%
before = dev.counters()
a.close()
b.close()
print("release:", driver_calls(before))
print("handles released, still mapped -> live:", dev.counters().live, "expected (2, 2, 3)")
before = dev.counters()
va.close()
other.close()
print("close the reservations:", driver_calls(before))
print("after closing the reservations -> live:", dev.counters().live, "expected (0, 0, 0)")
assert dev.counters().live == (0, 0, 0)

# %% [markdown]
# ## The same in raw `cuda.bindings`
# Steps 0-5 and the lifetimes without vmmpool, in NVIDIA's Python bindings of the driver
# (`cuda.bindings.driver`, installed with vmmpool). Every call returns a tuple whose first item is a
# `CUresult`. This cell runs where a CUDA GPU is usable; elsewhere it is shown, not run (the host
# emulator is vmmpool's, not the driver's).

# %%
def raw_vmm_round_trip(ordinal=0):
    """Reserve, create, map, set access, write, move by remapping, read back, release: raw driver calls."""
    from cuda.bindings import driver as cu

    def check(result):
        err, *values = result
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(cu.cuGetErrorName(err)[1].decode())
        return values[0] if values else None

    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(ordinal))
    ctx = check(cu.cuDevicePrimaryCtxRetain(device))  # the context CuPy and PyTorch use
    check(cu.cuCtxSetCurrent(ctx))
    prop = cu.CUmemAllocationProp()  # step 0: the allocation properties
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    gran = check(cu.cuMemGetAllocationGranularity(
        prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    va = int(check(cu.cuMemAddressReserve(4 * gran, 0, 0, 0)))  # step 1: addresses only
    handle = check(cu.cuMemCreate(gran, prop, 0))  # step 2: memory, no address
    desc = cu.CUmemAccessDesc()  # who may access: this device, read-write
    desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = ordinal
    desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    check(cu.cuMemMap(va + gran, gran, 0, handle, 0))  # step 3: whole allocation, offset 0 in it
    check(cu.cuMemSetAccess(va + gran, gran, [desc], 1))  # ...then access (a mapping has none)
    data = b"moved, not copied"
    check(cu.cuMemcpyHtoD(va + gran, data, len(data)))
    check(cu.cuMemUnmap(va + gran, gran))  # step 5: unmap, map elsewhere, access again
    check(cu.cuMemMap(va + 3 * gran, gran, 0, handle, 0))
    check(cu.cuMemSetAccess(va + 3 * gran, gran, [desc], 1))
    check(cu.cuMemRelease(handle))  # released early: the mapping keeps the memory alive
    out = bytearray(len(data))
    check(cu.cuMemcpyDtoH(out, va + 3 * gran, len(data)))
    check(cu.cuMemUnmap(va + 3 * gran, gran))  # the last mapping goes: the memory is freed
    check(cu.cuMemAddressFree(va, 4 * gran))  # exactly the reserved (ptr, size)
    check(cu.cuDevicePrimaryCtxRelease(device))
    return gran, bytes(out)


try:
    gpu = vmmpool.Device("cuda:0")
except vmmpool.DeviceUnavailableError as err:
    print(f"not run here ({err.reason}); on a GPU it prints the granularity and b'moved, not copied'")
else:
    gran, got = raw_vmm_round_trip(gpu.ordinal)
    print("granularity:", gran, "bytes; read back at the new address:", got)
    assert got == b"moved, not copied"

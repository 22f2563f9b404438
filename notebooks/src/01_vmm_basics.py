# %% [markdown]
# # 1. VMM basics: virtual ranges, physical pages, mappings
#
# **What this shows.** CUDA's virtual memory management splits "an address range" from "memory":
# `reserve` takes addresses, `create` takes physical memory, `map` backs addresses with memory, and
# `set_access` lets a device use it. With those four calls you can put the *same* memory at two
# addresses, or move memory to a new address without copying a byte.
#
# Each step below is drawn: reservations (virtual ranges) on top, cut into slots of the granularity;
# physical allocations at the bottom; a line for each mapping. A hatched slot is mapped but not yet
# accessible.
#
# It runs on the host emulator (`Device.emulated`), which enforces the CUDA driver's rules on Linux
# virtual memory; swap in `vmmpool.Device("cuda:0")` on a GPU and every cell behaves the same.

# %%
import matplotlib.pyplot as plt

import vmmpool
from vmmpool.plot import mapping_diagram

dev = vmmpool.Device.emulated(capacity=64 << 20)  # a fresh 64 MiB emulated device
g = dev.granularity
print("granularity:", g, "bytes;", "total:", dev.total_memory >> 20, "MiB")
print("live (reservations, allocations, mappings):", dev.counters().live, "expected (0, 0, 0)")

# %% [markdown]
# ## Step 1: reserve addresses
# A reservation is only addresses: nothing backs it until you map memory there. Sizes and offsets
# are multiples of the granularity (2 MiB on current GPUs).

# %%
va = vmmpool.reserve(4 * g, dev)
print(va)
mapping_diagram([va], title="reserve(4 x 2 MiB): addresses only, no memory");

# %% [markdown]
# ## Step 2: create physical memory
# `create` allocates physical memory that has no address yet: nothing can touch it.

# %%
a = vmmpool.create(g, dev)
b = vmmpool.create(g, dev)
print("live:", dev.counters().live, "expected (1, 2, 0)")
mapping_diagram([va], [a, b], title="create: two physical allocations, not mapped");

# %% [markdown]
# ## Step 3: map, then grant access
# Mapping backs addresses with memory but grants no access (hatched). `set_access` over both
# adjacent mappings is one driver call.

# %%
ma = va.map(a, 0)
mb = va.map(b, g)
print("after map, access:", ma.access.value, "expected none (mapping grants no access)")
fig, (before, after) = plt.subplots(2, figsize=(8, 4.5))
mapping_diagram([va], [a, b], ax=before, title="map at offsets 0 and 2 MiB: no access yet")
va.set_access(0, 2 * g, "rw")  # one driver call covers both adjacent mappings
mapping_diagram([va], [a, b], ax=after, title="set_access(rw) over both")
fig.tight_layout()
print("after set_access:", ma.get_access().value, mb.get_access().value, "expected rw rw")
print("live:", dev.counters().live, "expected (1, 2, 2)")

# %% [markdown]
# ## Step 4: one memory, two addresses
# Map `b` a second time in another reservation: both addresses show the same bytes.

# %%
other = vmmpool.reserve(g, dev)
mb2 = other.map(b, 0, access="rw")
dev.write(mb.address, b"written at the first address")
seen = bytes(dev.read(mb2.address, 28))
print(seen)
assert seen == b"written at the first address"
mapping_diagram([va, other], [a, b], title="allocation 1 mapped in two reservations");

# %% [markdown]
# ## Step 5: move memory without copying
# Unmap `b` from offset `g` and map it at offset `3g`: its bytes appear at the new address. This is
# what the page pool does to defragment: scattered pages, new neighbours, no copy.

# %%
mb.unmap()
moved = va.map(b, 3 * g, access="rw")
print(hex(moved.address - va.address), bytes(dev.read(moved.address, 28)))
assert bytes(dev.read(moved.address, 28)) == b"written at the first address"
mapping_diagram([va, other], [a, b], title="unmap at 2 MiB, map at 6 MiB: same bytes, new address");

# %% [markdown]
# ## The driver's rules, enforced
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
# ## Lifetimes: release early, nothing leaks
# Releasing a handle right after mapping is the normal pattern: the memory lives until its last
# mapping goes. Closing a reservation unmaps whatever is still mapped, then frees the range.

# %%
a.close()
b.close()
print("handles released, still mapped -> live:", dev.counters().live, "expected (2, 2, 3)")
va.close()
other.close()
print("after closing the reservations -> live:", dev.counters().live, "expected (0, 0, 0)")
assert dev.counters().live == (0, 0, 0)

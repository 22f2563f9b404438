# %% [markdown]
# # 1. VMM basics: virtual ranges, physical pages, mappings
#
# **What this shows.** CUDA's virtual memory management splits "an address range" from "memory":
# `reserve` takes addresses, `create` takes physical memory, `map` backs addresses with memory, and
# `set_access` lets a device use it. With those four calls you can put the *same* memory at two
# addresses, or move memory to a new address without copying a byte.
#
# It runs on the host emulator (`Device.emulated`), which enforces the CUDA driver's rules on Linux
# virtual memory; swap in `vmmpool.Device("cuda:0")` on a GPU and every cell behaves the same.

# %%
import vmmpool

dev = vmmpool.Device.emulated(capacity=64 << 20)  # a fresh 64 MiB emulated device
g = dev.granularity
print("granularity:", g, "bytes;", "total:", dev.total_memory >> 20, "MiB")
print("live (reservations, allocations, mappings):", dev.counters().live, "expected (0, 0, 0)")

# %% [markdown]
# ## Reserve addresses, create memory, map, grant access
# A reservation is only addresses: nothing backs it until you map memory there. Sizes and offsets
# are multiples of the granularity (2 MiB on current GPUs).

# %%
va = vmmpool.reserve(4 * g, dev)
a = vmmpool.create(g, dev)
b = vmmpool.create(g, dev)
ma = va.map(a, 0)
mb = va.map(b, g)
print("after map, access:", ma.access.value, "expected none (mapping grants no access)")
va.set_access(0, 2 * g, "rw")  # one driver call covers both adjacent mappings
print("after set_access:", ma.get_access().value, mb.get_access().value, "expected rw rw")
print("live:", dev.counters().live, "expected (1, 2, 2)")

# %% [markdown]
# ## Write through one address, read through another
# Map `b` a second time in another reservation: both addresses show the same bytes.

# %%
other = vmmpool.reserve(g, dev)
mb2 = other.map(b, 0, access="rw")
dev.write(mb.address, b"written at the first address")
seen = bytes(dev.read(mb2.address, 28))
print(seen)
assert seen == b"written at the first address"

# %% [markdown]
# ## Move memory without copying
# Unmap `b` from offset `g` and map it at offset `3g`: its bytes appear at the new address.

# %%
mb.unmap()
moved = va.map(b, 3 * g, access="rw")
print(hex(moved.address - va.address), bytes(dev.read(moved.address, 28)))
assert bytes(dev.read(moved.address, 28)) == b"written at the first address"

# %% [markdown]
# ## The driver's rules, enforced
# The emulator rejects what the CUDA driver rejects, with the driver's error names, so code that
# passes here does not break on a GPU. The Python layer catches most mistakes even earlier, with a
# `ValueError` that states expected versus actual.

# %%
backend = dev._backend
for what, call in [
    ("unmap a never-mapped range", lambda: backend.unmap(va.address + 2 * g, g)),
    ("map at an odd address", lambda: backend.map(va.address + 4096, g, a.handle)),
    ("free part of a reservation", lambda: backend.free_address(va.address, g)),
]:
    try:
        call()
    except vmmpool.DriverError as err:
        print(f"{what:28} -> {err.name}")
try:
    vmmpool.create(3 << 20, dev)
except ValueError as err:
    print("create(3 MiB) ->", err)

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

# %% [markdown]
# # 5. Sleep and wake: give the memory back, keep every address
#
# **What this shows.** A process that switches a GPU between two jobs (an RL loop alternating
# training and inference, a server that pauses a model) wants to hand the memory of the idle job to
# the other one, and get it back later *without* its tensors moving: pointers captured by CUDA
# graphs, NCCL registrations and array views must stay valid. `PagePool.sleep()` copies the live
# bytes to host memory, unmaps and releases every physical page (the driver gets the memory back),
# and keeps every address reservation. `wake()` maps new pages at the same addresses and copies the
# bytes back.
#
# It runs on the host emulator (device memory is host memory there); on a GPU use
# `vmmpool.Device("cuda:0")`. We record device memory in use after every step and plot it at the end.

# %%
import numpy as np

import vmmpool
from vmmpool import GrowableBuffer, PagePool
from vmmpool.plot import memory_timeline

MiB = 1 << 20
dev = vmmpool.Device.emulated(capacity=256 * MiB)
pool = PagePool(dev, limit=192 * MiB)

steps, used, job_a, labels = [], [], [], []


def note(label):
    """Record device memory in use, and what job A's pool holds of it, after a step."""
    steps.append(len(steps))
    used.append(dev.total_memory - dev.free_memory)
    s = pool.stats()
    job_a.append(s.reserved_bytes)
    labels.append(label)
    print(f"{label:26s} device memory in use {used[-1] / MiB:6.1f} MiB, job A's pool holds "
          f"{job_a[-1] / MiB:6.1f} MiB (its live tensors: {s.allocated_bytes / MiB:5.1f} MiB)")


note("start")

# %% [markdown]
# ## Job A: weights and optimizer state
# Twelve 8 MiB "tensors" and a few small ones, filled with data, and a NumPy array over one of them
# (through DLPack, sharing the memory).

# %%
rng = np.random.default_rng(0)
tensors = [pool.malloc(8 * MiB, stream=i % 2) for i in range(12)] + [pool.malloc(3000) for _ in range(4)]
contents = []
for t in tensors:
    data = rng.integers(0, 256, min(t.size, 1 << 16), dtype=np.uint8).tobytes()
    dev.write(t.ptr, data)
    contents.append(data)
weights = np.from_dlpack(tensors[0].view("float32"))
weights[:4] = [1.5, 2.5, 3.5, 4.5]
contents[0] = bytes(dev.read(tensors[0].ptr, len(contents[0])))  # with the weights written
addresses = [t.address for t in tensors]
weights_ptr = weights.__array_interface__["data"][0]
note("job A allocated")
scratch = [pool.malloc(8 * MiB) for _ in range(4)]
for s in scratch:
    s.free()  # temporaries: their pages stay cached in the pool
note("job A temporaries freed")

# %% [markdown]
# ## Sleep: the driver gets every page back
# `sleep()` first waits for the work of every stream that used the memory (one event per stream,
# never a device synchronize), gives back the cached pages, then copies the pages live tensors touch
# to host memory in large runs and releases them. Every reservation stays.

# %%
free_before = dev.free_memory
pool.sleep()
s = pool.stats()
print("asleep:", pool.asleep, " pages held:", s.total_pages, "expected 0")
print(f"free memory rose by {(dev.free_memory - free_before) / MiB:.0f} MiB;"
      f" backup in host memory {s.backup_bytes / MiB:.1f} MiB")
print("driver allocations and mappings:", dev.counters().allocations, dev.counters().mappings, "expected 0 0")
print("live allocations of the pool:", s.live_allocations, "(their addresses are kept)")
assert dev.counters().allocations == 0 and dev.counters().mappings == 0
note("job A asleep")

# %% [markdown]
# ## Job B uses the same memory
# Another consumer, here a `GrowableBuffer` on the same device, takes most of the device while job A
# sleeps. While asleep, job A may still free tensors (bookkeeping only), but `malloc` says it must
# wake first.

# %%
other = GrowableBuffer(max_size=200 * MiB, device=dev)
for n in (64, 128, 192):
    other.resize(n * MiB)
    note(f"job B holds {n} MiB")
try:
    pool.malloc(MiB)
except vmmpool.AsleepError as err:
    print("malloc while asleep:", err)
tensors.pop(-1).free()  # frees work while asleep and need no memory
contents.pop(-1)
addresses.pop(-1)
other.close()
note("job B done")

# %% [markdown]
# ## Wake: same addresses, same bytes
# `wake()` creates pages, maps them where the old ones were, sets access once per run and copies the
# bytes back. The NumPy array made before the sleep is still valid: its pointer never changed.

# %%
pool.wake()
note("job A awake")
print("addresses unchanged:", [t.address for t in tensors] == addresses)
print("bytes restored:", all(bytes(dev.read(t.ptr, len(c))) == c for t, c in zip(tensors, contents)))
print("array pointer unchanged:", weights.__array_interface__["data"][0] == weights_ptr, " first weights:", weights[:4])
assert [t.address for t in tensors] == addresses
assert all(bytes(dev.read(t.ptr, len(c))) == c for t, c in zip(tensors, contents))
assert list(weights[:4]) == [1.5, 2.5, 3.5, 4.5]
s = pool.stats()
print(f"sleep copied {s.sleep_bytes / MiB:.1f} MiB in {s.sleep_seconds * 1e3:.1f} ms,"
      f" wake {s.wake_bytes / MiB:.1f} MiB in {s.wake_seconds * 1e3:.1f} ms")

# %% [markdown]
# ## A cache needs no backup
# Memory whose contents can be rebuilt (a KV cache) sleeps with `backup=False`: no copy at all, the
# addresses are kept and the memory is usable again after `wake()` (its bytes are undefined).

# %%
kv = PagePool(dev, limit=32 * MiB)
blocks = [kv.malloc(2 * MiB) for _ in range(8)]
kv.sleep(backup=False)
print("KV pool asleep, backup bytes:", kv.stats().backup_bytes, "expected 0")
note("KV cache asleep too")
kv.wake()
note("KV cache awake")
for b in blocks:
    b.free()
kv.close()

# %% [markdown]
# ## Device memory over time
# Job A's memory drops to zero while it sleeps (the pool keeps only address space), job B uses it,
# and job A gets it back at the same addresses. The filled area is the device memory job A's pool
# holds; its live tensors survive the sleep as addresses and a host backup.

# %%
ax = memory_timeline(
    {"allocated by job A's pool": (steps, job_a), "device memory in use (jobs A and B)": (steps, used)},
    title="sleep / wake on the host emulator", xlabel="step", unit=MiB,
)
for x, label in zip(steps, labels):
    if label in ("job A asleep", "job A awake"):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (x, max(used) / MiB * 0.62), fontsize=8, rotation=90, ha="right", va="top")

# %% [markdown]
# ## Clean up
# Nothing is left: no reservation, allocation, mapping, pinned staging buffer or event.

# %%
del weights
for t in tensors:
    t.free()
pool.close()
print("live after close:", dev.counters().live, "expected (0, 0, 0)")
print("pinned staging buffers:", dev._backend.live_host_allocations(), " events:", dev._backend.live_events())
assert dev.counters().live == (0, 0, 0)
assert dev._backend.live_host_allocations() == 0 and dev._backend.live_events() == 0

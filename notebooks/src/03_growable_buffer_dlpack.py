# %% [markdown]
# # 3. Growable buffers and DLPack: grow without moving, share without copying
#
# **What this shows.** A `GrowableBuffer` reserves a large virtual range once and maps physical pages
# only as it grows, so its pointer never moves and growth never copies: the cost of a growth step
# does not depend on how much the buffer already holds. Its views export DLPack, so NumPy (here),
# CuPy, PyTorch or JAX (on a GPU) use the memory in place.
#
# It runs on the host emulator (where "device" memory is host memory, so the copy below is a host
# copy); on a GPU use `vmmpool.Device("cuda:0")` and `cupy.from_dlpack`.

# %%
import time

import numpy as np

import vmmpool
from vmmpool import GrowableBuffer
from vmmpool.plot import growth_cost

dev = vmmpool.Device.emulated(capacity=512 << 20)
buf = GrowableBuffer(max_size=256 << 20, device=dev)
print("ptr:", hex(buf.ptr), "size:", buf.size, "capacity:", buf.capacity, "max_size:", buf.max_size >> 20, "MiB")

# %% [markdown]
# ## Grow step by step: the pointer stays put, each step maps only new pages
# Each 8 MiB step maps 4 new pages and sets access once over them. We count the backend (driver)
# calls each step makes: the same at every size.

# %%
ptr0 = buf.ptr
calls_per_step = []
for step in range(1, 17):
    before = dev.counters()
    buf.resize(step * (8 << 20))
    calls_per_step.append(dev.counters() - before)
    assert buf.ptr == ptr0
print("first step:", calls_per_step[0], " last step:", calls_per_step[-1])
assert all(c == calls_per_step[0] for c in calls_per_step)
print("pointer never moved:", buf.ptr == ptr0)

# %% [markdown]
# ## Growth cost against size: flat for mapping, linear for copying
# For each size we time one 2 MiB growth step many times (the median, so a noisy step does not
# decide) and compare with what a copying allocator does: allocate the larger buffer and copy the
# old contents over. Mapping cost is flat; copying grows with the size.

# %%
MiB = 1 << 20
sizes = [2 * MiB, 8 * MiB, 32 * MiB, 128 * MiB]
grow_s, copy_s = [], []
for size in sizes:
    times = []
    for _ in range(15):
        buf.resize(size)
        t0 = time.perf_counter()
        buf.resize(size + 2 * MiB)
        times.append(time.perf_counter() - t0)
    grow_s.append(float(np.median(times)))
    old = np.ones(size, dtype=np.uint8)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        new = np.empty(size + 2 * MiB, dtype=np.uint8)
        new[:size] = old
        times.append(time.perf_counter() - t0)
    copy_s.append(float(np.median(times)))
    del old, new
for size, g_s, c_s in zip(sizes, grow_s, copy_s):
    print(f"{size // MiB:4d} MiB: map a page {g_s * 1e6:8.1f} us   copy {c_s * 1e6:10.1f} us   ratio {c_s / g_s:7.0f}x")
assert grow_s[-1] < 4 * grow_s[0], "mapping a page should not cost more on a larger buffer"
assert copy_s[-1] > 8 * copy_s[0], "copying 64x more bytes should cost more"
growth_cost(sizes, {"GrowableBuffer (map a page)": grow_s, "copy into a larger buffer": copy_s},
            title="one 2 MiB growth step (median)");

# %% [markdown]
# ## Share the memory with NumPy through DLPack
# `buf.view(dtype, shape, offset)` makes a view; `np.from_dlpack` consumes it without copying, so
# writes show both ways.

# %%
a = np.from_dlpack(buf.view("float32", shape=(1024, 1024)))
a[:] = 1.5
a[0, :4] = [1, 2, 3, 4]
print(np.frombuffer(buf.read(16), dtype=np.float32), "expected [1. 2. 3. 4.]")
buf.write(np.float32(42).tobytes(), offset=4)
print(a[0, :4], "expected [ 1. 42.  3.  4.]")
assert a[0, 1] == 42

# %% [markdown]
# ## Views protect memory that is in use
# Shrinking below bytes a live array still uses would pull memory out from under it, so the buffer
# refuses. Once the array is gone, the shrink unmaps the trailing pages and gives them back.

# %%
try:
    buf.resize(1 << 20)
except BufferError as err:
    print("refused:", err)
del a
buf.resize(1 << 20)
print("after shrink: size", buf.size, "capacity", buf.capacity, "expected 1048576 2097152")

# %% [markdown]
# ## Past max_size: move by remapping, not copying
# Growing beyond the reservation needs a new address range. With `allow_move=True` every page is
# remapped there (no byte copied) and the new pointer is returned.

# %%
buf.write(b"survives the move")
new_ptr = buf.resize(300 << 20, allow_move=True)
print("moved:", new_ptr != ptr0, "contents:", bytes(buf.read(17)))
assert bytes(buf.read(17)) == b"survives the move"
buf.close()
print("live after close:", dev.counters().live, "expected (0, 0, 0)")
assert dev.counters().live == (0, 0, 0)

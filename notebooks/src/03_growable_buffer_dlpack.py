# %% [markdown]
# # 3. Growable buffers and DLPack: grow without moving, share without copying
#
# **What this shows.** A `GrowableBuffer` reserves a large virtual range once and maps physical pages
# only as it grows, so its pointer never moves and growth never copies: the cost of a growth step
# does not depend on how much the buffer already holds. Its views export DLPack, so NumPy (here),
# CuPy, PyTorch or JAX (on a GPU) use the memory in place.
#
# It runs on the host emulator; on a GPU use `vmmpool.Device("cuda:0")` and `cupy.from_dlpack`.

# %%
import time

import numpy as np

import vmmpool
from vmmpool import GrowableBuffer

dev = vmmpool.Device.emulated(capacity=512 << 20)
buf = GrowableBuffer(max_size=256 << 20, device=dev)
print("ptr:", hex(buf.ptr), "size:", buf.size, "capacity:", buf.capacity, "max_size:", buf.max_size >> 20, "MiB")

# %% [markdown]
# ## Grow step by step: the pointer stays put, each step maps only new pages
# Each 8 MiB step maps 4 new pages and sets access once over them. We time every step and count
# the backend (driver) calls it makes.

# %%
ptr0 = buf.ptr
rows = []
for step in range(1, 17):
    before = dev.counters()
    t0 = time.perf_counter()
    buf.resize(step * (8 << 20))
    dt = time.perf_counter() - t0
    rows.append((buf.size >> 20, dt * 1e6, dev.counters() - before))
    assert buf.ptr == ptr0
for size_mib, us, calls in rows[:3] + rows[-2:]:
    print(f"size {size_mib:4d} MiB  step {us:8.1f} us  calls {calls}")
print("expected per step: {'create': 4, 'map': 4, 'set_access': 1}; pointer never moved:", buf.ptr == ptr0)

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

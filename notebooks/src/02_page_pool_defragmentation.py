# %% [markdown]
# # 2. The page pool: defragmentation by remapping
#
# **What this shows.** A caching allocator fails a large request when its free memory is scattered
# between a few long-lived blocks. `PagePool` keeps physical memory as 2 MiB pages and, when no
# cached range is big enough, unmaps scattered free pages and maps them side by side into a fresh
# virtual range. The request fails only when live data plus the request really exceed the limit.
#
# The page maps below draw each physical page twice: on the lower row by creation order, on the
# upper row where it is mapped in the pool's address space, with a line between the two. Each live
# allocation has its own colour, the same in both pictures of a figure and never one of the state
# colours (a page two allocations share takes the colour of the lower one; colours are picked per
# figure); cached pages (mapped, free, reusable at once) are light blue, free (unmapped) pages grey.
#
# Runs on the host emulator; `PagePool("cuda:0", ...)` on a GPU behaves the same.

# %%
import matplotlib.pyplot as plt

import vmmpool
from vmmpool import PagePool
from vmmpool.plot import page_map as draw_page_map

dev = vmmpool.Device.emulated(capacity=64 << 20)
pool = PagePool(dev, limit=32 << 20)  # 16 pages of 2 MiB
MiB = 1 << 20


def page_map(pool):
    """One character per page: # wholly covered by one live block, s partly used (the page's
    kind is "small": several blocks, or part of one), c cached, . free."""
    mark = {"in_use": "#", "cached": "c", "free": ".", "acquired": "a", "quarantined": "x"}
    return "".join("s" if p.kind == "small" and p.state == "in_use" else mark[p.state]
                   for p in pool.snapshot())


print("limit:", pool.limit // MiB, "MiB;", "page size:", pool.page_size // MiB, "MiB")

# %% [markdown]
# ## Fill the pool, then keep a few blocks scattered through it
# Five rounds of a 4 MiB block and a block just over 2 MiB fill the 16 pages (blocks of a page or
# less would come from the small-block heap, apart from these). Then we free everything
# except three of the just-over-2 MiB blocks, which now sit between the free ranges and pin their pages.
# In the text maps, `#` is a page one live block covers wholly and `s` a page only partly used (here
# the ends of the blocks just over 2 MiB: none of these blocks is small), `c` cached and `.` free.

# %%
large, pins = [], []
for i in range(5):
    large.append(pool.malloc(4 * MiB))
    pins.append(pool.malloc(2 * MiB + 1))  # over a page: in the large-block heap
for j, a in enumerate(pins):
    dev.write(a.ptr, bytes([j]) * 1024)  # each survivor gets its own pattern
print("after fill:  ", page_map(pool))
keep = pins[::2]
fig, (top, bottom) = plt.subplots(2, figsize=(8, 5.5))
draw_page_map(pool, ax=top, title="after the fill: 16 pages in use")
for a in large + [a for a in pins if a not in keep]:
    a.free()
draw_page_map(pool, ax=bottom, title="after the frees: 3 survivors pin scattered pages")
fig.tight_layout()
s = pool.stats()
print("after frees: ", page_map(pool))
print(f"live: {s.requested_bytes / MiB:.1f} MiB requested ({s.allocated_bytes / MiB:.1f} MiB allocated),",
      f"cached: {s.cached_bytes // MiB} MiB in {s.cached_blocks} blocks,",
      f"largest allocatable: {s.largest_allocatable // MiB} MiB")

# %% [markdown]
# ## Ask for more than any cached range holds
# The largest cached range is 10 MiB, between two survivors, so no contiguous allocator over these
# pages could serve 20 MiB. The pool remaps: it unmaps cached pages wherever they are and maps them
# side by side in a fresh virtual range.

# %%
before_map = pool.snapshot()
before = dev.counters()
big = pool.malloc(20 * MiB)
calls = dev.counters() - before
fig, (top, bottom) = plt.subplots(2, figsize=(8, 5.5))
draw_page_map(before_map, ax=top, page_size=pool.page_size, title="before malloc(20 MiB)")
draw_page_map(pool, ax=bottom, title="after: scattered pages remapped side by side")
fig.tight_layout()
print("allocated", big.size // MiB, "MiB at", hex(big.ptr))
print("page map:    ", page_map(pool))
print("remaps:", pool.stats().n_remaps, "expected 1;", "backend calls:", calls)
assert pool.stats().n_remaps == 1
for j, a in zip(range(0, 5, 2), keep):
    assert bytes(dev.read(a.ptr, 1024)) == bytes([j]) * 1024
print("survivors' bytes intact: yes")

# %% [markdown]
# ## Out of memory means out of memory
# With the big block live, what is left is below another 20 MiB. The error says what was asked, in
# use, cached and the limit, then the sum the pool refused: the pages the block would newly pin plus
# the pages holding live data, against the limit's pages. The pool stays usable.

# %%
try:
    pool.malloc(20 * MiB)
except vmmpool.OutOfMemoryError as err:
    print(err)
big.free()
again = pool.malloc(20 * MiB)
print("after freeing, 20 MiB again: ok;", "OOMs counted:", pool.stats().n_ooms, "expected 1")
again.free()

# %% [markdown]
# ## The fast path makes no driver calls
# Freed memory stays mapped in the stream's cache; recurring sizes reuse it without the driver.
# (Blocks of at most a page come from the stream's small-block heap: the first 1000-byte request
# maps a page there, every later one reuses it.)

# %%
pool.malloc(1000).free()  # warm-up: a page for the small-block heap
before = dev.counters()
for _ in range(1000):
    a = pool.malloc(4 * MiB)
    b = pool.malloc(1000)
    a.free()
    b.free()
print("backend calls for 1000 malloc/free pairs:", dev.counters() - before, "expected {}")
assert dev.counters() - before == {}

# %% [markdown]
# ## Clean up
# `empty_cache()` (PyTorch's name; `trim()` is the same call) gives every page without live data
# back to the driver; `close()` releases everything.

# %%
for a in keep:
    a.free()
print("pages before empty_cache:", pool.stats().total_pages, "bytes given back:", pool.empty_cache() // MiB, "MiB")
pool.close()
print("live after close:", dev.counters().live, "expected (0, 0, 0)")
assert dev.counters().live == (0, 0, 0)

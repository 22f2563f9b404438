# %% [markdown]
# # 4. Reading a real workload: replay a PyTorch memory snapshot
#
# **What this shows.** PyTorch can record every allocation a program makes and save it as a
# *memory snapshot*; vmmpool replays such a snapshot through a `PagePool` and tells you how much
# memory the pool would have held for the same program, beside what PyTorch's own caching
# allocator reserved in the recorded run. No GPU and no torch are needed to replay: the snapshot
# is plain data, loaded through an unpickler that refuses every class.
#
# To record your own (PyTorch 2.1+):
#
# ```python
# torch.cuda.memory._record_memory_history(max_entries=100_000)
# ...  # run a training step or a few inference batches
# torch.cuda.memory._dump_snapshot("my_run.pickle")
# ```
#
# Give the path in `VMMPOOL_TRACE` (`VMMPOOL_TRACE=my_run.pickle jupyter lab`). Without it, this
# notebook builds a small synthetic snapshot itself (a training-like run: four 48 MiB weights live
# before recording, then six steps of twelve 1-16 MiB activations), and **the stored outputs below
# come from that synthetic snapshot**: recorded traces are not shipped with vmmpool. README's
# "Trace replay" table gives the figures for four public snapshots (BERT-large inference, LLaMA-7B,
# two cs336 runs) and where to fetch them; with one of them in `VMMPOOL_TRACE` every cell below runs
# unchanged on it.

# %%
import os
import pickle
import tempfile

import matplotlib.pyplot as plt

import vmmpool
from vmmpool import replay
from vmmpool.plot import memory_timeline

MiB, GiB = 1 << 20, 1 << 30


def small_snapshot(path):
    """A training-like snapshot: weights live before recording, then activations come and go."""
    P = 2 * MiB
    weights = [{"address": 0x7F0000000000 + i * 64 * MiB, "size": 48 * MiB, "requested_size": 48 * MiB,
                "state": "active_allocated"} for i in range(4)]
    segments = [{"device": 0, "address": w["address"], "total_size": 64 * MiB, "stream": 0,
                 "blocks": [w]} for w in weights]
    events, base, live = [], 0x7F1000000000, []
    events.append({"action": "segment_alloc", "addr": base, "size": 256 * MiB, "stream": 0})
    for step in range(6):
        at = base
        for k in range(12):  # forward: activations of 1-16 MiB
            size = (1 + (k * 5 + step) % 16) * MiB + 4096 * k
            events.append({"action": "alloc", "addr": at, "size": size, "stream": 0})
            live.append((at, size))
            at += -(-size // P) * P
        while live:  # backward: freed in reverse
            a, size = live.pop()
            events.append({"action": "free_requested", "addr": a, "size": size, "stream": 0})
    # The activations' segment is still reserved at the end, with nothing live in it.
    segments.append({"device": 0, "address": base, "total_size": 256 * MiB, "stream": 0,
                     "blocks": [{"address": base, "size": 256 * MiB, "state": "inactive"}]})
    with open(path, "wb") as f:
        pickle.dump({"segments": segments, "device_traces": [events]}, f)
    return path


path = os.environ.get("VMMPOOL_TRACE") or small_snapshot(os.path.join(tempfile.mkdtemp(), "small.pickle"))
trace = replay.load(path)
print(f"{trace.name}: {len(trace.events):,} events ({trace.n_prelude} blocks live before recording),"
      f" {len(trace.streams)} stream(s), peak live {trace.peak_live / GiB:.2f} GiB")
if trace.recorded_peak_reserved:
    print(f"PyTorch's recorded run: peak reserved {trace.recorded_peak_reserved / GiB:.2f} GiB "
          f"= {trace.recorded_peak_reserved / trace.peak_live:.3f} x peak live")

# %% [markdown]
# ## Replay with default settings
# `replay.replay` runs the trace through a fresh `PagePool` on a fresh host-emulated device (its
# memory is never touched, so a 50 GiB trace replays on a laptop) and reports the peaks: live
# bytes asked for, bytes in use with the pool's rounding, and bytes of pages held (what
# `memory_reserved()` would say), with the driver calls it made.

# %%
res = replay.replay(trace)
print(f"completed: {res.completed};  {res.events:,} events in {res.wall_s:.2f} s ({res.us_per_event:.0f} us/event)")
print(f"peak in use / peak live:     {res.in_use_ratio:.3f}")
print(f"peak pages held / peak live: {res.held_ratio:.3f}")
print(f"pages created {res.page_creations}, remaps {res.remaps}, device synchronizes {res.syncs}")

# %% [markdown]
# ## Allocated against reserved, over time
# The filled area is what the program had allocated; the lines are what each allocator held for
# it. The gap between them is memory held but unused: fragmentation and caching.

# %%
tl = replay.timeline(trace, samples=300)
memory_timeline(tl.series(), title=f"{trace.name}: allocated vs reserved", xlabel="event");

# %% [markdown]
# ## The smallest limit that completes
# A pool that defragments by remapping needs only slightly more than the peak of live bytes: the
# search below replays the trace under ever smaller limits (bisection over whole pages) and
# reports the smallest that completes.

# %%
m = replay.min_limit(trace)
print(f"smallest completing limit: {m.pages:,} pages = {m.limit / GiB:.3f} GiB "
      f"= {m.ratio:.4f} x peak live ({len(m.probes)} replays, {m.wall_s:.1f} s)")

# %% [markdown]
# ## Reading a pool's summary
# `pool.memory_summary()` is the table a PyTorch user knows from `torch.cuda.memory_summary()`,
# with PyTorch's words: *allocated* is live blocks with the pool's rounding (`memory_allocated()`),
# *requested* what the program asked for, *reserved* the physical memory held in pages
# (`memory_reserved()`); *address space* is virtual only. `pool.memory_stats()` gives the same
# figures under `torch.cuda.memory_stats()`'s keys. Here the trace runs up to its peak of live
# bytes and stops there.

# %%
peak_at, live, best = 0, 0, 0
for i, (is_free, _slot, nbytes, _stream) in enumerate(trace.events):
    live += -nbytes if is_free else nbytes
    if live > best:
        best, peak_at = live, i
dev = vmmpool.Device.emulated(capacity=replay.emulated_capacity(trace))
pool = vmmpool.PagePool(dev)
handles = [None] * trace.n_slots
for is_free, slot, nbytes, stream in trace.events[: peak_at + 1]:
    if is_free:
        handles[slot].free()
    else:
        handles[slot] = pool.malloc(nbytes, stream)
print(pool.memory_summary())
m = pool.memory_stats()
for key in ("allocated_bytes.all.current", "requested_bytes.all.current", "reserved_bytes.all.current",
            "reserved_bytes.all.peak", "num_alloc_retries", "num_ooms"):
    print(f"memory_stats()[{key!r}] = {m[key]:,}")
s = pool.stats()
assert s.requested_bytes == best == m["requested_bytes.all.current"]
assert s.allocated_bytes == m["allocated_bytes.all.current"] >= s.requested_bytes  # rounding only adds
pool.close()

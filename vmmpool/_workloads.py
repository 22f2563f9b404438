"""Synthetic allocation traces for benchmarks and tests (not public API).

:func:`gpt_inference` builds the allocation pattern of a small transformer's
inference on one stream: weights of 1-5 MiB (and a few KiB-sized norms and
biases) allocated first, then a prefill pass whose per-layer activations are
1-5 MiB and freed as the next layer runs, then decode steps in which every
layer's key and value caches grow by concatenation (a new, slightly larger
tensor is allocated, the old one freed) beside small per-token activations,
and now and then a long-lived small tensor (a mask, position ids, sampled
tokens). Peak live is a few hundred MiB: the kind of trace where the free
bytes of partly used 2 MiB pages decide the smallest limit.

Sizes are arbitrary byte counts (not page or 512-byte multiples), drawn from a
seeded ``random.Random``: the same arguments give the same trace.
"""

from __future__ import annotations

import random

from .replay import Trace

__all__ = ["gpt_inference"]

_MiB = 1 << 20


def gpt_inference(
    seed: int = 0,
    layers: int = 24,
    decode_steps: int = 48,
    *,
    weight_mib: tuple[float, float] = (1.0, 5.0),
    name: str | None = None,
) -> Trace:
    """A one-stream transformer inference trace (see the module docstring).

    Parameters
    ----------
    seed : int
        Seed of the sizes.
    layers : int
        Transformer blocks; peak live grows about 20 MiB per layer.
    decode_steps : int
        Tokens generated after the prefill (each grows every layer's caches).
    weight_mib : (float, float)
        Range of the weight and activation sizes, MiB.
    name : str, optional
        The trace's name (default: from the arguments).
    """
    rng = random.Random(seed)
    lo, hi = weight_mib
    events: list[tuple[bool, int, int, int]] = []
    sizes: list[int] = []

    def alloc(n: int) -> int:
        slot = len(sizes)
        sizes.append(n)
        events.append((False, slot, n, 0))
        return slot

    def free(slot: int) -> None:
        events.append((True, slot, sizes[slot], 0))

    def mib() -> int:
        return int(rng.uniform(lo, hi) * _MiB)

    def small() -> int:
        return rng.choice((2, 4, 8, 16, 24)) * 1024 + rng.randrange(0, 512)

    # Weights: per layer attention and MLP matrices, norms and biases (live to the end).
    for _ in range(layers):
        for _ in range(rng.randint(5, 7)):
            alloc(mib())
        for _ in range(rng.randint(3, 6)):
            alloc(small())
    alloc(int(1.5 * hi * _MiB))  # embedding (the largest tensor)
    n_prelude = len(sizes)

    # Per layer activation shapes recur at every pass; the caches start at the prompt.
    shapes = [[mib() for _ in range(rng.randint(3, 5))] for _ in range(layers)]
    kv_step = [rng.randrange(8, 64) * 1024 for _ in range(layers)]
    tok = [[small() for _ in range(rng.randint(3, 5))] for _ in range(layers)]
    keep: list[int] = []

    # Prefill: activations 1-5 MiB, each layer's freed once the next one ran.
    resid = alloc(mib())
    kv: list[tuple[int, int]] = []
    for li in range(layers):
        acts = [alloc(n) for n in shapes[li]]
        k = alloc(int(rng.uniform(lo, hi) * _MiB * 0.5))
        v = alloc(sizes[k])
        kv.append((k, v))
        new_resid = alloc(sizes[resid])
        free(resid)
        resid = new_resid
        for a in reversed(acts):
            free(a)
    keep.append(alloc(small()))
    free(resid)

    # Decode: caches grow by concatenation; per-token activations are small.
    for step in range(decode_steps):
        x = alloc(small())
        for li in range(layers):
            acts = [alloc(n) for n in tok[li]]
            k, v = kv[li]
            nk = alloc(sizes[k] + kv_step[li])
            free(k)
            nv = alloc(sizes[v] + kv_step[li])
            free(v)
            kv[li] = (nk, nv)
            for a in acts:
                free(a)
        logits = alloc(mib())
        free(x)
        free(logits)
        if step % 8 == 7:
            keep.append(alloc(small()))
    for k, v in kv:
        free(k)
        free(v)
    for s in keep:
        free(s)
    return Trace(
        name=name or f"synthetic gpt inference (seed {seed}, {layers} layers, {decode_steps} steps)",
        events=tuple(events),
        n_slots=len(sizes),
        n_prelude=n_prelude,
        streams=(0,),
        source="synthetic",
    )

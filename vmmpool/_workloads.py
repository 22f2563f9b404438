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
seeded ``random.Random``: the same arguments give the same trace. Its layers
all differ (a stress test: no two KV caches have the same size).

:func:`gpt2_inference` is the same program with the shapes of a real model
(GPT-2 medium by default: 24 identical layers, d_model 1024, bf16, 0.7 GB of
weights): every layer's tensors have the same sizes, as in PyTorch's
``generate`` with a KV cache grown by ``torch.cat``.

:func:`resnet50` is a convolutional network instead (ResNet-50's shapes, as
torchvision builds it): inference, or training steps with the saved
activations freed as backward reaches them, weight gradients made afresh each
step (``zero_grad(set_to_none=True)``) and Adam's two state tensors per
weight created in the first step between the temporaries: the pattern of a
small CNN run of a hundred MiB or so, where tensors range from a few hundred
bytes (batch-norm parameters) to 10-20 MiB (early activations).
"""

from __future__ import annotations

import random
from typing import Any

from .replay import Trace

__all__ = ["gpt2_inference", "gpt_inference", "resnet50", "sweep"]

_MiB = 1 << 20


class _Recorder:
    """Builds a one-stream trace: ``alloc`` returns a slot, ``free`` frees it, and with
    ``refs`` a tensor may have several users (``hold``/``drop``: freed by the last drop)."""

    def __init__(self) -> None:
        self.events: list[tuple[bool, int, int, int]] = []
        self.sizes: list[int] = []
        self.refs: dict[int, int] = {}

    def alloc(self, n: int) -> int:
        slot = len(self.sizes)
        self.sizes.append(max(1, n))
        self.events.append((False, slot, self.sizes[slot], 0))
        self.refs[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        del self.refs[slot]
        self.events.append((True, slot, self.sizes[slot], 0))

    def hold(self, slot: int) -> None:
        self.refs[slot] += 1

    def drop(self, slot: int) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self.free(slot)

    def trace(self, name: str, n_prelude: int) -> Trace:
        return Trace(
            name=name,
            events=tuple(self.events),
            n_slots=len(self.sizes),
            n_prelude=n_prelude,
            streams=(0,),
            source="synthetic",
        )


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
    rec = _Recorder()
    alloc, free, sizes = rec.alloc, rec.free, rec.sizes

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
    return rec.trace(
        name or f"synthetic gpt inference (seed {seed}, {layers} layers, {decode_steps} steps)",
        n_prelude,
    )


def gpt2_inference(
    layers: int = 24,
    d_model: int = 1024,
    heads: int = 16,
    vocab: int = 50257,
    batch: int = 4,
    prompt: int = 128,
    new_tokens: int = 32,
    dtype_bytes: int = 2,
    *,
    name: str | None = None,
) -> Trace:
    """A one-stream GPT-2-shaped inference trace: prefill, then `new_tokens` decode steps.

    Weights (embeddings, per layer the attention and MLP matrices, biases and
    norms) are live throughout. Prefill allocates each layer's activations
    (normed input, qkv, attention scores and probabilities, attention output,
    MLP hidden and activation, residual) and frees them as the next ones are
    made, keeping each layer's key and value cache. Each decode step makes the
    same activations for one token and grows every cache by concatenation (a
    new tensor one token longer, then the old one freed). Logits are those of
    the last position.
    """
    d = d_model
    b = dtype_bytes
    rec = _Recorder()
    alloc, free, sizes = rec.alloc, rec.free, rec.sizes

    alloc(vocab * d * b)  # token embedding (tied with the output projection)
    alloc(1024 * d * b)  # position embedding
    for _ in range(layers):
        for n in (d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d):
            alloc(n * b)
    alloc(d * b)
    alloc(d * b)  # final norm
    n_prelude = len(sizes)

    def layer(tokens: int, past: int, kv: list[int], li: int) -> None:
        bt = batch * tokens
        x = alloc(bt * d * b)  # normed input
        qkv = alloc(bt * 3 * d * b)
        free(x)
        total = past + tokens
        k = alloc(batch * total * d * b)  # cat(past_k, k)
        v = alloc(batch * total * d * b)
        if past:
            free(kv[2 * li])
            free(kv[2 * li + 1])
        kv[2 * li], kv[2 * li + 1] = k, v
        scores = alloc(batch * heads * tokens * total * b)
        probs = alloc(batch * heads * tokens * total * b)
        free(scores)
        att = alloc(bt * d * b)
        free(probs)
        free(qkv)
        proj = alloc(bt * d * b)
        free(att)
        h1 = alloc(bt * d * b)  # residual
        free(proj)
        x2 = alloc(bt * d * b)
        fc = alloc(bt * 4 * d * b)
        free(x2)
        act = alloc(bt * 4 * d * b)
        free(fc)
        out = alloc(bt * d * b)
        free(act)
        h2 = alloc(bt * d * b)
        free(out)
        free(h1)
        hs.append(h2)

    kv = [0] * (2 * layers)
    past = 0
    for tokens in [prompt] + [1] * new_tokens:
        ids = alloc(batch * tokens * 8)
        hs: list[int] = [alloc(batch * tokens * d * b)]  # embeddings
        for li in range(layers):
            layer(tokens, past, kv, li)
            free(hs.pop(0))
        final = alloc(batch * tokens * d * b)
        free(hs.pop())
        logits = alloc(batch * vocab * 4)  # last position, fp32
        free(final)
        free(logits)
        free(ids)
        past += tokens
    for slot in kv:
        free(slot)
    return rec.trace(
        name or (
            f"gpt2-shaped inference ({layers} layers, d {d_model}, batch {batch}, "
            f"{prompt}+{new_tokens} tokens)"
        ),
        n_prelude,
    )


def _resnet50_layers(image: int) -> list[tuple[str, int, int, int, int, int]]:
    """ResNet-50's convolutions in forward order: ``(role, c_in, c_out, kernel, h_out, stride)``.

    Roles: ``"stem"``, ``"c1"``, ``"c2"``, ``"c3"`` (a bottleneck's three convolutions), ``"down"``
    (its projection shortcut) and ``"fc"``.
    """
    layers: list[tuple[str, int, int, int, int, int]] = []
    h = (image + 1) // 2
    layers.append(("stem", 3, 64, 7, h, 2))
    h = (h + 1) // 2  # max pool
    c_in = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for b in range(blocks):
            stride = 2 if (b == 0 and i > 0) else 1
            h_out = (h + stride - 1) // stride
            layers.append(("c1", c_in, width, 1, h, 1))
            layers.append(("c2", width, width, 3, h_out, stride))
            layers.append(("c3", width, 4 * width, 1, h_out, 1))
            if b == 0:
                layers.append(("down", c_in, 4 * width, 1, h_out, stride))
            c_in = 4 * width
            h = h_out
    layers.append(("fc", 2048, 1000, 1, 1, 1))
    return layers


def resnet50(
    batch: int = 8,
    image: int = 224,
    steps: int = 3,
    *,
    train: bool = True,
    dtype_bytes: int = 2,
    name: str | None = None,
) -> Trace:
    """A one-stream ResNet-50-shaped trace: `steps` training steps (or inference passes).

    Weights (convolutions, batch-norm scale/shift and running statistics, the
    classifier) are allocated first and live throughout. Each convolution
    (with a workspace allocated and freed around a 3x3, 7x7 or strided one)
    is followed by batch norm (a new tensor) and an in-place ReLU; a
    bottleneck adds its shortcut to its output in place. A tensor is freed
    when its last user is done. In training, each convolution keeps its
    input and output, each batch norm its output, for backward, which walks
    the layers in reverse: the gradient of each layer's input is allocated,
    the layer's saved tensors and the gradient of its output freed, each
    weight's gradient allocated (all freed at the next ``zero_grad``), and
    Adam's two state tensors per weight are created in the first step's
    optimizer pass, between its temporaries.
    """
    b = dtype_bytes
    rec = _Recorder()
    alloc, hold, drop, sizes = rec.alloc, rec.hold, rec.drop, rec.sizes

    layers = _resnet50_layers(image)
    for role, c_in, c_out, k, _h, _s in layers:
        alloc(c_in * c_out * k * k * b)
        if role == "fc":
            alloc(c_out * b)
        else:
            for _ in range(4):  # bn weight, bias, running mean, running var (fp32)
                alloc(c_out * 4)
    n_prelude = len(sizes)
    adam: list[int] = []

    def act(c: int, h: int) -> int:
        return batch * c * h * h * b

    def conv_bn(src: int, c_out: int, k: int, h: int, stride: int, keep: list[int]) -> int:
        ws = alloc(min(act(c_out, h), 8 << 20)) if (k > 1 or stride > 1) else None
        conv = alloc(act(c_out, h))
        if ws is not None:
            drop(ws)
        bn = alloc(act(c_out, h))
        if train:
            for t in (src, conv, bn):
                hold(t)
                keep.append(t)
        drop(conv)
        return bn

    for _step in range(steps):
        saved: list[list[int]] = []  # per layer, in forward order: what its backward frees
        x = alloc(act(3, image))
        cur = x
        block_in = -1
        for li, (role, _c_in, c_out, k, h, stride) in enumerate(layers):
            keep: list[int] = []
            saved.append(keep)
            if role == "stem":
                bn = conv_bn(cur, c_out, k, h, stride, keep)
                drop(cur)
                cur = alloc(act(c_out, (h + 1) // 2))  # max pool
                if train:
                    hold(cur)
                    keep.append(cur)
                drop(bn)
            elif role == "c1":
                block_in = cur
                cur = conv_bn(block_in, c_out, k, h, stride, keep)
            elif role in ("c2", "c3"):
                nxt = conv_bn(cur, c_out, k, h, stride, keep)
                drop(cur)
                cur = nxt
                if role == "c3" and layers[li + 1][0] != "down":
                    drop(block_in)  # out = bn3 + block input, in place; ReLU in place
            elif role == "down":
                shortcut = conv_bn(block_in, c_out, k, h, stride, keep)
                drop(block_in)
                drop(shortcut)  # out = bn3 + projected input, in place
            if role == "fc":
                pooled = alloc(batch * 2048 * b)
                drop(cur)
                logits = alloc(batch * c_out * 4)
                if train:
                    hold(pooled)
                    keep.append(pooled)
                drop(pooled)
                cur = logits
        loss = alloc(4)
        drop(cur)
        if not train:
            drop(loss)
            continue
        grad = alloc(batch * 1000 * 4)
        drop(loss)
        grads: list[int] = []
        for (role, c_in, c_out, k, h, stride), keep in zip(reversed(layers), reversed(saved), strict=True):
            if role == "fc":
                grads += [alloc(c_in * c_out * b), alloc(c_out * b)]
                g_in = alloc(batch * c_in * b)
            else:
                g_bn = alloc(act(c_out, h))
                grads += [alloc(c_out * 4), alloc(c_out * 4)]
                h_in = image if role == "stem" else h * stride
                ws = alloc(min(act(c_in, h_in), 8 << 20)) if (k > 1 or stride > 1) else None
                g_in = alloc(act(c_in, h_in))
                grads.append(alloc(c_in * c_out * k * k * b))
                if ws is not None:
                    drop(ws)
                drop(g_bn)
            drop(grad)
            for t in keep:
                drop(t)
            grad = g_in
        drop(grad)
        for g in grads:  # Adam: its state is made at the first step, beside a temporary per weight
            if len(adam) < 2 * len(grads):
                adam += [alloc(sizes[g]), alloc(sizes[g])]
            drop(alloc(sizes[g]))
        for g in grads:  # zero_grad(set_to_none=True)
            drop(g)
    return rec.trace(
        name or (
            f"resnet50-shaped {'training' if train else 'inference'} (batch {batch}, {image}x{image}, "
            f"{steps} steps)"
        ),
        n_prelude,
    )


#: The families :func:`sweep` draws from.
SWEEP_FAMILIES = ("gpt2", "resnet50", "stress")


def sweep(n: int, seed: int = 11) -> list[tuple[str, dict[str, Any], Trace]]:
    """`n` generated traces of each family, their shapes drawn from a seeded generator.

    A placement rule tuned on a handful of rows can be tuned to those rows:
    a sweep judges it on many (the replay benchmark's ``--sweep``). The
    families: GPT-2-shaped inference (6-24 layers, d_model 512-1280, batch
    1-8, prompts of 64-256 tokens, 16-64 new ones, bf16 or fp32), ResNet-50-
    shaped inference or training (batch 2-32, 128-224 px, bf16 or fp32) and
    the stress test (seeds from 100, 8-24 layers, 24 or 48 decode steps).
    The same `n` and `seed` give the same traces.

    Returns
    -------
    list of (str, dict, Trace)
        ``(family, arguments, trace)``, the families interleaved.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rnd = random.Random(seed)
    out: list[tuple[str, dict[str, Any], Trace]] = []
    for i in range(n):
        g: dict[str, Any] = {
            "layers": rnd.choice([6, 12, 24]), "d_model": rnd.choice([512, 768, 1024, 1280]),
            "heads": 8, "batch": rnd.choice([1, 2, 4, 8]), "prompt": rnd.choice([64, 128, 256]),
            "new_tokens": rnd.choice([16, 32, 64]), "dtype_bytes": rnd.choice([2, 4]),
        }
        r: dict[str, Any] = {
            "batch": rnd.choice([2, 4, 8, 16, 32]), "image": rnd.choice([128, 160, 192, 224]),
            "train": rnd.random() < 0.5, "dtype_bytes": rnd.choice([2, 4]),
        }
        st: dict[str, Any] = {
            "seed": 100 + i, "layers": rnd.choice([8, 12, 24]), "decode_steps": rnd.choice([24, 48]),
        }
        out.append(("gpt2", g, gpt2_inference(**g)))
        out.append(("resnet50", r, resnet50(**r)))
        out.append(("stress", st, gpt_inference(**st)))
    return out

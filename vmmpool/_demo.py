"""``python -m vmmpool demo``: the fragmentation scenario, side by side.

The scenario (:func:`run_scenario`), for any allocator behind a small adapter:

1. *Warm-up* (a previous phase, as in a training loop): allocate the limit in
   64 MiB blocks, then free them all, so caches hold large free blocks.
2. *Fill*: allocate mixed sizes (60 % small, 256 B .. 256 KiB; 30 % medium,
   1 .. 8 MiB; 10 % large, 8 .. 48 MiB; log-uniform within each class) until
   eight requests in a row fail.
3. *Survivors*: keep a scattered ``live_fraction`` of the small blocks (at
   least one), chosen at random, write each its own byte pattern, and free
   every other allocation.
4. *Largest*: find the largest single allocation that still succeeds, write a
   pattern over all of it, and check that every survivor's bytes are intact.

``vmmpool.PagePool`` is compared with ``cupy.cuda.MemoryPool`` (with
``set_limit``) on a GPU when CuPy is installed; on the host emulator, with the
largest run of adjacent free pages in the pool's own page layout after step 3:
what any allocator that cannot remap (one contiguous range per allocation)
could have used.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._cli import Parser, UsageError, device_advice, fail
from ._device import Device, default_device
from ._errors import DeviceUnavailableError
from ._pool import PagePool
from ._sizes import size_arg

__all__ = [
    "ScenarioResult",
    "PagePoolAdapter",
    "CupyPoolAdapter",
    "run_scenario",
    "scenario_sizes",
    "contiguous_baseline",
    "format_size",
    "main",
    "bisect_largest",
]

MiB = 1 << 20
KiB = 1 << 10
#: Block size of the warm-up phase.
WARMUP_BLOCK = 64 * MiB
#: Requests up to this size are the scenario's "small blocks".
SMALL_MAX = 1 * MiB
#: The command's name in its messages.
PROG = "python -m vmmpool demo"


def format_size(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit, m in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= m:
            return f"{n / m:.1f} {unit}"
    return f"{int(n)} B"


def scenario_sizes(seed: int, total: int) -> list[int]:
    """The fill phase's request sizes: mixed, deterministic for `seed`, summing past `total`."""
    rng = random.Random(seed)
    out: list[int] = []
    acc = 0
    while acc < 2 * total + 64 * MiB:
        u = rng.random()
        if u < 0.6:
            lo, hi = 256, SMALL_MAX
        elif u < 0.9:
            lo, hi = SMALL_MAX + 1, 8 * MiB
        else:
            lo, hi = 8 * MiB, 48 * MiB
        n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        out.append(n)
        acc += n
    return out


def _pattern(i: int, n: int) -> bytes:
    import numpy as np

    return ((np.arange(n, dtype=np.uint32) * 7 + i * 31 + 1) % 251).astype(np.uint8).tobytes()


# --------------------------------------------------------------------- adapters
class PagePoolAdapter:
    """Runs the scenario on a :class:`~vmmpool.PagePool`."""

    name = "vmmpool.PagePool"

    def __init__(self, device: Device, limit: int) -> None:
        self.device = device
        self.pool = PagePool(device, limit=limit)
        self.oom_errors: tuple[type[BaseException], ...] = (MemoryError,)

    @property
    def limit(self) -> int:
        return self.pool.limit

    def malloc(self, n: int) -> Any:
        return self.pool.malloc(n)

    def free(self, h: Any) -> None:
        h.free()

    def ptr(self, h: Any) -> int:
        return int(h.ptr)

    def write(self, h: Any, offset: int, data: bytes) -> None:
        self.device.write(h.ptr + offset, data)

    def read(self, h: Any, offset: int, n: int) -> bytes:
        return bytes(self.device.read(h.ptr + offset, n))

    def largest(self, upper: int) -> tuple[int, Any]:
        """The pool says what it can give: confirm it, and that one page more fails."""
        n = self.pool.stats().largest_allocatable
        try:
            extra = self.pool.malloc(n + self.pool.page_size)
        except MemoryError:
            pass
        else:
            extra.free()
            raise AssertionError("largest_allocatable was not the largest allocation")
        h = self.pool.malloc(n) if n else None
        return n, h

    def details(self) -> dict[str, Any]:
        s = self.pool.stats()
        return {
            "pinned_pages": s.pinned_pages,
            "page_size": s.page_size,
            "n_remaps": s.n_remaps,
            "n_page_creations": s.n_page_creations,
            "n_reclaimed_pages": s.n_reclaimed_pages,
        }

    def close(self) -> None:
        self.pool.close()


class CupyPoolAdapter:
    """Runs the scenario on ``cupy.cuda.MemoryPool`` or ``MemoryAsyncPool`` (GPU only)."""

    def __init__(self, device: Device, limit: int, kind: str = "MemoryPool") -> None:
        import cupy

        self.cupy = cupy
        self.device = device
        self.name = f"cupy.cuda.{kind}"
        self._dev = cupy.cuda.Device(device.ordinal)
        self._dev.use()
        with self._dev:  # CuPy pools' set_limit applies to the current device
            self.pool = getattr(cupy.cuda, kind)()
            self.pool.set_limit(size=limit)
        self._limit = limit
        self.oom_errors = (cupy.cuda.memory.OutOfMemoryError, MemoryError)

    @property
    def limit(self) -> int:
        return self._limit

    def malloc(self, n: int) -> Any:
        with self._dev:
            return self.pool.malloc(n)

    def free(self, h: Any) -> None:
        del h  # the MemoryPointer's last reference returns it to the pool

    def ptr(self, h: Any) -> int:
        return int(h.ptr)

    def write(self, h: Any, offset: int, data: bytes) -> None:
        self.device.write(int(h.ptr) + offset, data)

    def read(self, h: Any, offset: int, n: int) -> bytes:
        return bytes(self.device.read(int(h.ptr) + offset, n))

    def largest(self, upper: int) -> tuple[int, Any]:
        return bisect_largest(self, upper)

    def details(self) -> dict[str, Any]:
        with self._dev:
            return {"used_bytes": int(self.pool.used_bytes()), "total_bytes": int(self.pool.total_bytes())}

    def close(self) -> None:
        with self._dev:
            self.pool.free_all_blocks()


def bisect_largest(adapter: Any, upper: int, step: int = 2 * MiB) -> tuple[int, Any]:
    """Largest ``k * step <= upper`` that `adapter` can allocate (binary search); held on return."""
    lo, hi = 0, upper // step + 1  # lo succeeds (0 bytes: trivially), hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            h = adapter.malloc(mid * step)
        except adapter.oom_errors:
            hi = mid
        else:
            adapter.free(h)
            del h
            lo = mid
    if lo == 0:
        return 0, None
    for k in range(lo, 0, -1):  # the pool may behave differently the second time
        try:
            return k * step, adapter.malloc(k * step)
        except adapter.oom_errors:
            continue
    return 0, None


# --------------------------------------------------------------------- scenario
@dataclass
class ScenarioResult:
    """What :func:`run_scenario` measured for one allocator."""

    allocator: str
    limit: int
    live_fraction: float
    survivors_from: str
    n_allocations: int
    filled_bytes: int
    survivors: int
    live_bytes: int
    largest: int
    verified: bool
    seconds: float
    baseline: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> int:
        """``limit - live``: what an allocator that could move memory would give."""
        return self.limit - self.live_bytes

    @property
    def fraction(self) -> float:
        """Largest allocation as a fraction of ``limit - live``."""
        return self.largest / self.available if self.available > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["fraction_of_limit_minus_live"] = self.fraction
        return d


def contiguous_baseline(pool: PagePool) -> int:
    """Bytes of the longest run of adjacent mapped pages that hold no live data.

    That is what an allocator that cannot remap could hand out as one range
    with the same page layout.
    """
    P = pool.page_size
    pages = sorted((p for p in pool.snapshot() if p.address is not None), key=lambda p: p.address or 0)
    best = run = 0
    prev_end = None
    for p in pages:
        assert p.address is not None
        if p.state == "cached":
            run = run + 1 if prev_end == p.address else 1
            best = max(best, run)
        else:
            run = 0
        prev_end = p.address + P if p.state == "cached" else None
    return best * P


def run_scenario(
    adapter: Any,
    *,
    live_fraction: float = 0.05,
    seed: int = 0,
    warmup: bool = True,
    baseline: Callable[[Any], int] | None = None,
    verify: bool = True,
    survivors_from: str = "small",
) -> ScenarioResult:
    """Run the fragmentation scenario (module docstring) on `adapter`.

    Parameters
    ----------
    adapter
        :class:`PagePoolAdapter`, :class:`CupyPoolAdapter` or anything with the
        same methods.
    live_fraction : float
        With ``survivors_from="small"``: the share of the small blocks that
        survive. With ``"bytes"``: survivors of any size are drawn at random
        until they hold this share of the limit.
    seed : int
        Seeds the sizes and the choice of survivors.
    warmup : bool
        Run step 1.
    baseline : callable, optional
        Called with the adapter after step 3; its result is stored in
        :attr:`ScenarioResult.baseline`.
    verify : bool
        Write and check the byte patterns.
    survivors_from : {"small", "bytes"}
        How survivors are chosen (see `live_fraction`).
    """
    if survivors_from not in ("small", "bytes"):
        raise ValueError(f"survivors_from must be 'small' or 'bytes', got {survivors_from!r}")
    t0 = time.perf_counter()
    limit = adapter.limit
    oom = adapter.oom_errors
    # Handles are only ever held in these lists (never in a lingering loop
    # variable), so that allocators that free on the last reference (CuPy,
    # PyTorch) see exactly the frees the scenario makes.
    if warmup:
        blocks: list[Any] = []
        for _ in range(limit // WARMUP_BLOCK + 1):
            try:
                blocks.append(adapter.malloc(min(WARMUP_BLOCK, limit)))
            except oom:
                break
        while blocks:
            adapter.free(blocks.pop())
    live: list[tuple[int, Any]] = []
    misses = 0
    filled = 0
    for n in scenario_sizes(seed, limit):
        try:
            live.append((n, adapter.malloc(n)))
        except oom:
            misses += 1
            if misses >= 8:
                break
            continue
        misses = 0
        filled += n
    n_alloc = len(live)
    rng = random.Random(seed + 1)
    if survivors_from == "small":
        small = [i for i, (n, _) in enumerate(live) if n <= SMALL_MAX]
        k = max(1, round(live_fraction * len(small))) if small else 0
        keep = set(rng.sample(small, k))
    else:  # any size, in random order, until live_fraction of the limit is live
        order = list(range(len(live)))
        rng.shuffle(order)
        keep = set()
        acc = 0
        for i in order:
            if acc >= live_fraction * limit:
                break
            if acc + live[i][0] <= live_fraction * limit * 1.05 or not keep:
                keep.add(i)
                acc += live[i][0]
    survivors: list[tuple[int, int, Any]] = [
        (i, live[i][0], live[i][1]) for i in sorted(keep)
    ]
    if verify:
        for j in range(len(survivors)):
            adapter.write(survivors[j][2], 0, _pattern(survivors[j][0], survivors[j][1]))
    for i in range(len(live) - 1, -1, -1):
        entry = live.pop()
        if i not in keep:
            adapter.free(entry[1])
        del entry
    live_bytes = sum(s[1] for s in survivors)
    base = baseline(adapter) if baseline is not None else None
    largest, big = adapter.largest(limit)
    ok = True
    if verify and big is not None:
        chunk = 64 * MiB
        fill = b"\xa5" * min(chunk, largest)
        for off in range(0, largest, chunk):
            adapter.write(big, off, fill[: min(chunk, largest - off)])
        ok = all(adapter.read(big, off, 1) == b"\xa5" for off in (0, largest - 1))
    if verify:
        for j in range(len(survivors)):
            i, n = survivors[j][0], survivors[j][1]
            if adapter.read(survivors[j][2], 0, n) != _pattern(i, n):
                ok = False
    if big is not None:
        adapter.free(big)
        del big
    details = adapter.details()
    survivors_n = len(survivors)
    while survivors:
        adapter.free(survivors.pop()[2])
    return ScenarioResult(
        allocator=adapter.name,
        limit=limit,
        live_fraction=live_fraction,
        survivors_from=survivors_from,
        n_allocations=n_alloc,
        filled_bytes=filled,
        survivors=survivors_n,
        live_bytes=live_bytes,
        largest=largest,
        verified=ok,
        seconds=time.perf_counter() - t0,
        baseline=base,
        details=details,
    )


# ------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=(
            "Fragment a memory limit with mixed-size allocations, keep a scattered few small "
            "blocks, and find the largest allocation that still succeeds: vmmpool.PagePool "
            "(which remaps free pages into one range) against an allocator that cannot."
        ),
    )
    p.add_argument("--device", default=None, help="host or cuda:N (default: cuda:0 if usable, else host)")
    p.add_argument(
        "--limit", type=size_arg, default=None,
        help="memory limit, e.g. 512MiB, 1.5GiB or 2GB (default 512MiB)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--live-fraction", type=float, default=0.05,
        help="share of the small blocks that survive (default 0.05)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up phase")
    return p


def _row(label: str, values: Sequence[str], width: int = 28, col: int = 28) -> str:
    return (label.ljust(width) + "".join(v.rjust(col) for v in values)).rstrip()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 when vmmpool passes, 1 otherwise (2 for bad options)."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return fail(PROG, f"{exc} (see --help)")
    if not 0 < args.live_fraction <= 1:
        return fail(PROG, f"--live-fraction must be in (0, 1], got {args.live_fraction}")
    try:
        device = default_device() if args.device is None else Device(args.device)
        free = device.free_memory
    except DeviceUnavailableError as exc:
        return fail(PROG, device_advice(exc))
    except (ValueError, TypeError) as exc:
        # A bad --device or a malformed VMMPOOL_HOST_CAPACITY.
        return fail(PROG, exc)
    limit = 512 * MiB if args.limit is None else args.limit
    limit -= limit % device.granularity
    if limit < 16 * device.granularity:
        return fail(PROG, f"--limit must be at least {format_size(16 * device.granularity)}")
    if limit > free:
        return fail(
            PROG,
            f"--limit {format_size(limit)}{' (the default)' if args.limit is None else ''} "
            f"is more than the {format_size(free)} free on "
            f"{device} ({format_size(device.total_memory)} total); pass a smaller --limit",
        )
    warmup = not args.no_warmup
    print(f"vmmpool demo: fragmentation on {device} ({device.name}), limit {format_size(limit)}, "
          f"seed {args.seed}")
    print(
        ("1. warm caches: allocate the limit in 64 MiB blocks and free them\n" if warmup else "")
        + "2. fill the limit with mixed sizes (256 B .. 48 MiB)\n"
        f"3. keep a scattered {args.live_fraction:.0%} of the small blocks, free the rest\n"
        "4. find the largest single allocation; check the survivors' bytes"
    )
    print()

    ad = PagePoolAdapter(device, limit)
    try:
        ours = run_scenario(
            ad, live_fraction=args.live_fraction, seed=args.seed, warmup=warmup,
            baseline=(lambda a: contiguous_baseline(a.pool)) if device.is_host else None,
        )
    finally:
        ad.close()
    P = ours.details["page_size"]
    pinned = ours.details["pinned_pages"]
    rounding = pinned * P - ours.live_bytes
    target = ours.limit - ours.live_bytes - rounding

    other_name: str
    other: ScenarioResult | None = None
    other_largest: int | None
    note = ""
    if device.is_host:
        other_name = "contiguous (same layout)"
        other_largest = ours.baseline
    else:
        other_name = "cupy.cuda.MemoryPool"
        try:
            import cupy  # noqa: F401
        except ImportError as exc:
            other_largest = None
            note = f"CuPy is not installed ({exc}); no comparison"
        else:
            try:
                cad = CupyPoolAdapter(device, limit)
                try:
                    other = run_scenario(
                        cad, live_fraction=args.live_fraction, seed=args.seed, warmup=warmup
                    )
                finally:
                    cad.close()
            except Exception as exc:  # noqa: BLE001 - a broken CuPy install is reported, not fatal
                other = None
                other_largest = None
                note = f"CuPy failed ({type(exc).__name__}: {exc}); no comparison".splitlines()[0]
            else:
                other_largest = other.largest

    def pct(x: int | None) -> str:
        return "n/a" if x is None else f"{x / ours.available:.1%}"

    print(_row("", ["vmmpool.PagePool", other_name]))
    print(_row("allocations in the fill", [str(ours.n_allocations),
                                           str(other.n_allocations) if other else "(same)"]))
    print(_row("survivors (live bytes)", [f"{ours.survivors} ({format_size(ours.live_bytes)})",
                                          f"{other.survivors} ({format_size(other.live_bytes)})"
                                          if other else "(same)"]))
    print(_row("largest single allocation", [format_size(ours.largest),
                                             "n/a" if other_largest is None else format_size(other_largest)]))
    print(_row("  of (limit - live)", [pct(ours.largest), pct(other_largest)]))
    print(_row("pages pinned by survivors", [f"{pinned} x {format_size(P)}", ""]))
    print(_row("remaps / pages created", [f"{ours.details['n_remaps']} / {ours.details['n_page_creations']}",
                                          ""]))
    print(_row("survivors' bytes intact", ["yes" if ours.verified else "NO",
                                           ("yes" if other.verified else "NO") if other else ""]))
    print(_row("time", [f"{ours.seconds:.2f} s", f"{other.seconds:.2f} s" if other else ""]))
    if note:
        print(note)
    print()
    ok = ours.verified and ours.largest >= 0.99 * target
    if other_largest:
        ratio = f"{ours.largest / other_largest:.1f}x"
        versus = f"; {ratio} the largest allocation of {other_name}"
    elif other_largest == 0:
        versus = f"; {other_name} could not allocate anything"
    else:
        versus = ""
    verdict = "PASS" if ok else "FAIL"
    print(
        f"verdict: {verdict}: vmmpool allocated {format_size(ours.largest)} in one piece, "
        f"{ours.largest / target:.1%} of limit - live - page rounding ({format_size(target)})"
        f"{versus}; survivors {'intact' if ours.verified else 'CORRUPTED'}."
    )
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

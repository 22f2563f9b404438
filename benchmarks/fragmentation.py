"""Fragmentation benchmark: the demo's scenario at several live fractions.

Runs the scenario of ``vmmpool._demo`` (warm caches, fill the limit with mixed
sizes, free all but scattered survivors, find the largest single allocation)
at several live fractions, with two ways of choosing survivors: ``small`` (the
demo's: that share of the small blocks) and ``bytes`` (any size, until that
share of the limit is live). Reports the largest allocation as a fraction of
``limit - live``, and of ``limit - live - page rounding`` (the most a
page-granular allocator can give: the target is 99 %).

Compared with, on the host emulator, the longest run of adjacent free pages in
the pool's own layout (what an allocator that cannot remap could use); on a
GPU, with ``cupy.cuda.MemoryPool``, ``cupy.cuda.MemoryAsyncPool`` (its limit is
soft, so this benchmark enforces it on the requests) and PyTorch's caching
allocator with and without ``expandable_segments`` (each in a subprocess, as
``PYTORCH_CUDA_ALLOC_CONF`` must be set before CUDA starts). A peer that is
missing or fails is reported as "n/a", never a crash.

Usage: ``python benchmarks/fragmentation.py [--device host|cuda:0] [--quick]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from _common import check_output, device_of, parser, positive_int, size, table, write_json

import vmmpool
from vmmpool._demo import (
    CupyPoolAdapter,
    PagePoolAdapter,
    ScenarioResult,
    bisect_largest,
    contiguous_baseline,
    run_scenario,
)
from vmmpool._sizes import positive_size_arg

MiB = 1 << 20


class LimitedCupyAsync(CupyPoolAdapter):
    """``MemoryAsyncPool`` with its soft limit enforced on the requests."""

    def __init__(self, device: vmmpool.Device, limit: int) -> None:
        super().__init__(device, limit, "MemoryAsyncPool")
        self._live: dict[int, int] = {}

    def malloc(self, n: int) -> Any:
        if sum(self._live.values()) + n > self._limit:
            raise MemoryError(f"MemoryAsyncPool soft limit {self._limit} reached")
        h = super().malloc(n)
        self._live[id(h)] = n
        return h

    def free(self, h: Any) -> None:
        self._live.pop(id(h), None)


class TorchAdapter:
    """PyTorch's caching allocator, limited with ``set_per_process_memory_fraction``."""

    def __init__(self, ordinal: int, limit: int) -> None:
        import torch

        self.torch = torch
        # PYTORCH_ALLOC_CONF is the current name; PYTORCH_CUDA_ALLOC_CONF the older alias.
        conf = os.environ.get("PYTORCH_ALLOC_CONF", "") + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        self.name = "torch" + (" (expandable_segments)" if "expandable_segments:True" in conf else "")
        self._dev = torch.device("cuda", ordinal)
        total = torch.cuda.get_device_properties(self._dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), self._dev)
        self._limit = limit
        self.oom_errors = (torch.cuda.OutOfMemoryError, MemoryError)

    @property
    def limit(self) -> int:
        return self._limit

    def malloc(self, n: int) -> Any:
        return self.torch.empty(n, dtype=self.torch.uint8, device=self._dev)

    def free(self, h: Any) -> None:
        del h

    def write(self, h: Any, offset: int, data: bytes) -> None:
        src = self.torch.frombuffer(bytearray(data), dtype=self.torch.uint8)
        h[offset : offset + len(data)].copy_(src)

    def read(self, h: Any, offset: int, n: int) -> bytes:
        return bytes(h[offset : offset + n].cpu().numpy().tobytes())

    def largest(self, upper: int) -> tuple[int, Any]:
        return bisect_largest(self, upper)

    def details(self) -> dict[str, Any]:
        return {
            "memory_reserved": int(self.torch.cuda.memory_reserved(self._dev)),
            "memory_allocated": int(self.torch.cuda.memory_allocated(self._dev)),
        }

    def close(self) -> None:
        self.torch.cuda.empty_cache()


def _result_dict(r: ScenarioResult | None, error: str | None = None) -> dict[str, Any]:
    if r is None:
        return {"available": False, "error": error}
    d = r.as_dict()
    d["available"] = True
    return d


def run_vmmpool(device: vmmpool.Device, limit: int, frac: float, seed: int, mode: str) -> dict[str, Any]:
    ad = PagePoolAdapter(device, limit)
    try:
        r = run_scenario(
            ad, live_fraction=frac, seed=seed, survivors_from=mode,
            baseline=(lambda a: contiguous_baseline(a.pool)) if device.is_host else None,
        )
    finally:
        ad.close()
    d = _result_dict(r)
    P = r.details["page_size"]
    rounding = r.details["pinned_pages"] * P - r.live_bytes
    d["target"] = r.limit - r.live_bytes - rounding
    d["fraction_of_target"] = r.largest / d["target"]
    return d


def run_peer(
    name: str, device: vmmpool.Device, limit: int, frac: float, seed: int, mode: str
) -> dict[str, Any]:
    """One CuPy peer scenario; any failure (not installed, driver error) becomes "n/a".

    The PyTorch peers run every scenario in one subprocess each: :func:`run_torch_subprocess`.
    """
    try:
        ad: Any
        if name == "cupy.cuda.MemoryPool":
            ad = CupyPoolAdapter(device, limit, "MemoryPool")
        elif name == "cupy.cuda.MemoryAsyncPool":
            ad = LimitedCupyAsync(device, limit)
        else:
            raise ValueError(name)
        try:
            return _result_dict(run_scenario(ad, live_fraction=frac, seed=seed, survivors_from=mode))
        finally:
            ad.close()
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
        return _result_dict(None, f"{type(exc).__name__}: {exc}".splitlines()[0])


Scenario = tuple[float, int, str]  # (live fraction, seed, survivors mode)


def run_torch_subprocess(
    name: str, device: vmmpool.Device, limit: int, scenarios: list[Scenario], timeout: float = 600
) -> dict[Scenario, dict[str, Any]]:
    """Every scenario through PyTorch's allocator, in ONE subprocess (``PYTORCH_ALLOC_CONF`` must
    be set before CUDA starts, so not in this process).

    One process per scenario paid PyTorch's import and CUDA start each time (48 of them in
    a full run, 8 with ``--quick``: more than the GPU check gives this benchmark). The
    allocator is emptied between scenarios (``empty_cache``), each of which frees everything
    it allocated. A scenario the worker did not report (it crashed or ran out of time) is
    "n/a" with the reason.
    """
    env = dict(os.environ)
    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):  # current name, older alias
        env.pop(var, None)
        if "expandable" in name:
            env[var] = "expandable_segments:True"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "torch",
        "--device", str(device), "--limit", str(limit), "--scenarios", json.dumps(scenarios),
    ]
    why = None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        stdout, rc = proc.stdout, proc.returncode
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
        rc, tail = None, f"timed out after {timeout:.0f} s"
    got: dict[Scenario, dict[str, Any]] = {}
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
            frac, seed, mode = rec["scenario"]
            got[(float(frac), int(seed), str(mode))] = rec["result"]
        except (ValueError, KeyError, TypeError):
            continue  # cut short
    if len(got) < len(scenarios):
        why = f"torch worker failed (rc {rc}): {tail}"
    return {sc: got.get(sc) or _result_dict(None, why) for sc in scenarios}


def torch_worker(ordinal: int, limit: int, scenarios: list[Scenario]) -> int:
    """Run `scenarios` on PyTorch's allocator; print one JSON line per scenario as it ends."""
    try:
        ad = TorchAdapter(ordinal, limit)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as n/a
        for sc in scenarios:
            res = _result_dict(None, f"{type(exc).__name__}: {exc}".splitlines()[0])
            print(json.dumps({"scenario": list(sc), "result": res}), flush=True)
        return 0
    for frac, seed, mode in scenarios:
        try:
            res = _result_dict(run_scenario(ad, live_fraction=frac, seed=seed, survivors_from=mode))
        except Exception as exc:  # noqa: BLE001 - this scenario is n/a, the next ones still run
            res = _result_dict(None, f"{type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            ad.close()
        print(json.dumps({"scenario": [frac, seed, mode], "result": res}), flush=True)
    return 0


MODES = {
    "small": "survivors: the given share of the fill's small blocks (<= 1 MiB), scattered",
    "bytes": "survivors: any size, drawn at random until they hold the given share of the limit",
}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--limit", type=positive_size_arg, default=None,
                   help="a size such as 512MiB or 1GiB (default 1 GiB; 256 MiB with --quick)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds per fraction (default 3; 1 with --quick)")
    p.add_argument("--worker", default=None, help=argparse_hidden())
    p.add_argument("--scenarios", default="[]", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker == "torch":  # no vmmpool device here: torch must be first to use CUDA
        ordinal = int(str(args.device).rsplit(":", 1)[-1]) if ":" in str(args.device) else 0
        scenarios = [(float(f), int(s), str(m)) for f, s, m in json.loads(args.scenarios)]
        return torch_worker(ordinal, args.limit, scenarios)
    check_output(p, args.output)
    device = device_of(args.device, p)
    limit = args.limit or ((256 if args.quick else 1024) * MiB)
    limit -= limit % device.granularity
    if limit < 16 * device.granularity:
        p.error(f"--limit must be at least {size(16 * device.granularity)} (16 pages), "
                f"got {size(args.limit)}")
    fractions = [0.05, 0.25] if args.quick else [0.01, 0.05, 0.10, 0.25]
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    peers = (
        ["contiguous (same layout)"] if device.is_host else
        ["cupy.cuda.MemoryPool", "cupy.cuda.MemoryAsyncPool", "torch", "torch (expandable_segments)"]
    )
    print(f"fragmentation on {device} ({device.name}), limit {size(limit)}, seeds {seeds}")
    # The PyTorch peers first, each in one subprocess for every scenario (see run_torch_subprocess).
    scenarios = [(frac, seed, mode) for mode in MODES for frac in fractions for seed in seeds]
    torch_results = {
        peer: run_torch_subprocess(peer, device, limit, scenarios)
        for peer in peers if peer.startswith("torch")
    }
    runs: list[dict[str, Any]] = []
    for mode in MODES:
        for frac in fractions:
            for seed in seeds:
                entry: dict[str, Any] = {"survivors_from": mode, "live_fraction": frac, "seed": seed}
                ours = run_vmmpool(device, limit, frac, seed, mode)
                entry["vmmpool.PagePool"] = ours
                for peer in peers:
                    if peer.startswith("contiguous"):
                        base = ours["baseline"]
                        entry[peer] = {
                            "available": True, "largest": base,
                            "fraction_of_limit_minus_live": base / (limit - ours["live_bytes"]),
                        }
                    elif peer in torch_results:
                        entry[peer] = torch_results[peer][(frac, seed, mode)]
                    else:
                        entry[peer] = run_peer(peer, device, limit, frac, seed, mode)
                runs.append(entry)
                print(f"  {mode} {frac:.0%} seed {seed}: vmmpool {size(ours['largest'])} "
                      f"({ours['fraction_of_limit_minus_live']:.1%} of limit - live)", flush=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    headers = ["live", "live bytes", "pinned pages", "vmmpool / (limit-live)",
               "vmmpool / target", *[f"{p} / (limit-live)" for p in peers]]
    summary = []
    for mode, title in MODES.items():
        rows = []
        for frac in fractions:
            group = [r for r in runs if r["live_fraction"] == frac and r["survivors_from"] == mode]
            ours_g = [r["vmmpool.PagePool"] for r in group]
            row: list[object] = [
                f"{frac:.0%}",
                size(mean([o["live_bytes"] for o in ours_g])),
                f"{mean([o['details']['pinned_pages'] for o in ours_g]):.1f}",
                f"{mean([o['fraction_of_limit_minus_live'] for o in ours_g]):.1%}",
                f"{min(o['fraction_of_target'] for o in ours_g):.1%}",
            ]
            srow: dict[str, Any] = {
                "survivors_from": mode,
                "live_fraction": frac,
                "live_bytes": mean([o["live_bytes"] for o in ours_g]),
                "vmmpool_fraction_of_limit_minus_live": mean(
                    [o["fraction_of_limit_minus_live"] for o in ours_g]
                ),
                "vmmpool_min_fraction_of_target": min(o["fraction_of_target"] for o in ours_g),
            }
            for peer in peers:
                got = [r[peer] for r in group if r[peer].get("available")]
                if got:
                    v = mean([g["fraction_of_limit_minus_live"] for g in got])
                    row.append(f"{v:.1%}")
                    srow[peer] = v
                else:
                    row.append("n/a")
                    srow[peer] = None
            rows.append(row)
            summary.append(srow)
        print()
        print(title)
        print(table(headers, rows))
    print()
    print("target: vmmpool's largest allocation >= 99% of (limit - live - page rounding) "
          "[column 'vmmpool / target', worst seed]")
    errors = {p: r[p]["error"] for r in runs for p in peers if not r[p].get("available")}
    for peer, err in errors.items():
        print(f"n/a: {peer}: {err}")
    path = write_json(
        "fragmentation", device,
        {"limit": limit, "fractions": fractions, "seeds": seeds, "modes": MODES, "compared": peers,
         "summary": summary, "runs": runs},
        args.output,
        quick=args.quick,
        save=args.save,
    )
    print(f"wrote {path}")
    ok = all(s["vmmpool_min_fraction_of_target"] >= 0.99 for s in summary)
    print("target " + ("met" if ok else "NOT met"))
    return 0 if ok else 1


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # pragma: no cover
        traceback.print_exc()
        sys.exit(130)

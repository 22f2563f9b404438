"""Trace replay benchmark: real allocation traces through PagePool (and, on a GPU, the peers).

Usage::

    python benchmarks/replay.py [TRACE...] [--synthetic] [--device D] [--json PATH] [--quick [--save]]
    python benchmarks/replay.py --sweep N [--device D] [--json PATH]

(``--output`` is another name for ``--json``, as in the other benchmarks.)

For each trace (a PyTorch memory snapshot pickle or an RMM CSV log): one
replay with default settings and a search of the smallest limit, in whole
pages, at which the replay completes (``vmmpool.replay.min_limit``), printed
beside the recorded PyTorch run's peak reserved and peak allocated. On a GPU
the same trace is replayed through PyTorch's caching allocator (default,
``expandable_segments:True``, and in a ``vmmpool.torch.MemPool``: "torch on
vmmpool") and ``cupy.cuda.MemoryPool``, each in its own
subprocess; without one they are listed as skipped, with the reason.

Writes ``benchmarks/results/replay-<device kind>.json`` (``replay-host.json``
on the host emulator) with the date, the machine and every figure. A trace
whose replay fails for a reason other than out of memory (an OS limit of the
emulator, say) is recorded with its error and the run goes on. Of several
traces, one that cannot be read (or is too large for the emulator) is named,
recorded under ``unreadable`` and skipped; the exit status is 2 then.

``--synthetic`` adds generated traces of 1-8 MiB tensors (``vmmpool._workloads``,
one stream): transformer inference (GPT-2-shaped models of 110-780 MiB live,
and a stress test whose layers all differ) and ResNet-50-shaped inference and
training (90-520 MiB live, tensors of a few hundred bytes to 12 MiB): the kind
of trace where the free bytes of partly used pages decide the smallest limit.

``--sweep N`` replays instead N traces of each generated family, their shapes
drawn from a seeded generator (``vmmpool._workloads.sweep``): a placement rule
is judged on many rows, not on the few it may have been tuned on. It prints
one summary row per family (rows, held and smallest limit over peak live:
mean and largest, rows held above 1.05, rows whose smallest limit is within
1% or at the whole-page floor, remaps, syncs, and the steady state of a loop:
rows still making backend calls in each pass, calls per pass, held after 4
passes; see ``steady_state``) and writes every row to
``benchmarks/results/replay-sweep-<device kind>.json``. A row whose replay fails
(out of memory, or an error as above) is written with its error, is left out of
the summary, and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import vmmpool
from vmmpool import replay as R
from vmmpool._workloads import SWEEP_FAMILIES, gpt2_inference, gpt_inference, resnet50, sweep
from vmmpool.replay._load import _load_devices
from vmmpool.replay._trace import repeated

#: The generated traces ``--synthetic`` adds: GPT-2-shaped inference (identical layers:
#: medium at batch 4 and 8, small, and a small 8-layer model) and the stress test with
#: every layer's sizes different, as (seed, layers, decode steps).
SYNTHETIC_GPT2: tuple[dict[str, int], ...] = (
    {},
    {"batch": 8, "prompt": 64, "new_tokens": 64},
    {"layers": 12, "d_model": 768, "heads": 12},
    {"layers": 8, "d_model": 512, "heads": 8, "batch": 2, "prompt": 256, "new_tokens": 16},
)
SYNTHETIC = ((0, 24, 48), (1, 24, 48), (2, 12, 64), (3, 8, 24))
#: ResNet-50-shaped rows: inference at batch 8 and 32, training steps at batch 4 (160 px) and 8.
SYNTHETIC_RESNET: tuple[dict[str, Any], ...] = (
    {"train": False},
    {"train": False, "batch": 32},
    {"batch": 4, "image": 160},
    {},
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="*", metavar="TRACE")
    p.add_argument("--synthetic", action="store_true",
                   help="also replay the generated transformer inference traces (1-5 MiB tensors)")
    p.add_argument(
        "--device", default=None,
        help="host, cuda or cuda:N (default: a fresh host-emulated device sized to each trace)",
    )
    p.add_argument("--json", "--output", dest="json", default=None, metavar="PATH",
                   help="JSON file (default: benchmarks/results/replay-<device kind>.json; with "
                        "--quick and no --save: <temporary directory>/vmmpool-benchmarks/)")
    p.add_argument("--quick", action="store_true",
                   help="no smallest-limit searches and no peers (a smoke test); its JSON goes to a "
                        "temporary directory unless --save")
    p.add_argument("--save", action="store_true",
                   help="with --quick: write the JSON to benchmarks/results/ all the same")
    p.add_argument("--no-peers", action="store_true", help="skip the GPU peer allocators")
    p.add_argument("--scale", type=float, action="append", default=None, metavar="F",
                   help="also replay each trace with every size times F (repeatable; e.g. 0.1 turns "
                        "10-160 MiB tensors into 1-16 MiB); the recorded figures do not apply there")
    p.add_argument("--sweep", type=int, default=None, metavar="N",
                   help="replay N generated traces of each family instead, and summarize")
    args = p.parse_args(argv)
    _common.check_output(p, args.json, "--json")
    if args.sweep is not None:
        if args.traces or args.synthetic or args.scale:
            p.error("--sweep replays only generated traces: give no TRACE, --synthetic or --scale")
        if args.sweep < 1:
            p.error(f"--sweep needs N >= 1, got {args.sweep}")
        if args.quick:
            p.error("--sweep has no --quick: give a smaller N")
    elif not args.traces and not args.synthetic:
        p.error("give at least one TRACE, --synthetic or --sweep N")
    # Bad input is one line and exit status 2 (argparse's own), before anything runs.
    try:
        device = None if args.device is None else vmmpool.Device(args.device)
    except vmmpool.DeviceUnavailableError as e:
        p.error(f"device {e.device!r} is unavailable: {e.reason}")
    except (ValueError, TypeError, vmmpool.VmmError) as e:
        p.error(str(e))
    jobs: list[tuple[str, R.Trace, bool]] = []
    unreadable: list[dict[str, Any]] = []
    for path in args.traces:
        try:
            # A PyTorch snapshot with events on several devices: one row per device.
            bases = _load_devices(path)
            mine = []
            for base in bases:
                if len(bases) > 1:
                    base = dataclasses.replace(base, name=f"{base.name} [device {base.device}]")
                mine.append((path, base, False))
                for f in args.scale or ():
                    mine.append((path, R.scaled(base, f), True))
            if device is None:
                for _path, tr, _s in mine:
                    R.emulated_capacity(tr)
        except (R.TraceError, ValueError, TypeError, vmmpool.VmmError) as e:
            if len(args.traces) == 1 and not args.synthetic:
                p.error(str(e))  # nothing else to replay: one line, exit 2
            unreadable.append({"trace": str(path), "error": " ".join(str(e).split())})
            print(f"{path}: not read: {unreadable[-1]['error']}", file=sys.stderr, flush=True)
            continue
        jobs.extend(mine)
    if unreadable and not jobs and not args.synthetic:
        return 2  # each was named above; nothing to replay
    if args.sweep is not None:
        return run_sweep(args.sweep, device, args.json)
    shown = device if device is not None else vmmpool.Device.emulated(2 << 20)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    skipped: dict[str, list[str]] = {}  # why the peers did not run -> the rows
    if args.synthetic:
        for kw in SYNTHETIC_GPT2:
            jobs.append(("", gpt2_inference(**kw), True))
        for seed, layers, steps in SYNTHETIC:
            jobs.append(("", gpt_inference(seed, layers, steps), True))
        for kw in SYNTHETIC_RESNET:
            jobs.append(("", resnet50(**kw), True))
    for path, tr, is_scaled in jobs:
        t0 = time.perf_counter()
        try:
            res = R.replay(tr, device)
            mn = R.min_limit(tr, device, default=res) if res.completed and not args.quick else None
        except (OSError, vmmpool.VmmError) as e:
            failures.append({
                "trace": tr.name, "events": len(tr.events), "peak_live": tr.peak_live,
                "recorded_peak_reserved": tr.recorded_peak_reserved,
                "recorded_peak_allocated": tr.recorded_peak_allocated,
                "error": f"{type(e).__name__}: {e}",
            })
            print(f"{tr.name}: replay failed: {type(e).__name__}: {e}", flush=True)
            continue
        why = (
            "--no-peers" if args.no_peers else "--quick" if args.quick
            else "a scaled or generated trace (the peers replay trace files)" if is_scaled
            else "the host emulator (the peers need a GPU)" if device is not None and device.is_host
            else None
        )
        if why is not None:
            skipped.setdefault(why, []).append(tr.name)
        peers = [] if why is not None else R.peer_replays(path, device=tr.device)
        rec = R.record(tr, res, mn, peers)
        rec["total_wall_s"] = time.perf_counter() - t0
        records.append(rec)
        print(f"{tr.name}: done in {rec['total_wall_s']:.1f} s", flush=True)
    print(R.format_table(records))
    for why, names in skipped.items():
        print(f"peer allocators not run on {len(names)} row(s): {why}")
    for f in failures:
        print(f"{f['trace']}: not replayed: {f['error']}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    payload = {
        "columns": dict(R.COLUMNS),
        "open_files_limit": [soft, hard],
        "traces": records,
        "failed": failures,
        "unreadable": unreadable,
        "peers_skipped": skipped,
    }
    out = _common.write_json(
        "replay", shown, R.json_safe(payload), args.json, quick=args.quick, save=args.save,
        device_facts=per_trace_device(device),
    )
    print(f"wrote {out}")
    return 2 if unreadable else 1 if failures else 0


def steady_state(
    family: str, kwargs: dict[str, Any], tr: R.Trace, device: vmmpool.Device | None
) -> dict[str, float]:
    """Backend calls and remaps per pass once a loop has run a while (passes 3 and 4).

    A pass is everything after the trace's prelude (an inference pass, which frees all it
    allocates; `repeated`), or for a training trace one more step (`resnet50(steps=...)`:
    the first step keeps the optimizer's state). A pool that kept every page would make 0
    calls there; this one trades calls for memory (its growth budget).
    """
    two, four = repeated(tr, 2), repeated(tr, 4)
    per = 2
    if two is None or four is None:
        if family != "resnet50":
            raise ValueError(f"{tr.name}: no pass to repeat")
        two, four = resnet50(**{**kwargs, "steps": 4}), resnet50(**{**kwargs, "steps": 6})
    a, b = R.replay(two, device), R.replay(four, device)
    return {
        "steady_calls_per_pass": (b.backend_calls - a.backend_calls) / per,
        "steady_remaps_per_pass": (b.remaps - a.remaps) / per,
        "steady_held_ratio": b.peak_held / b.peak_live,
    }


def per_trace_device(device: vmmpool.Device | None) -> dict[str, Any] | None:
    """The JSON's device facts without ``--device``: a fresh emulated device per trace."""
    if device is not None:
        return None
    return {
        "device": "host (emulated, one per trace)",
        "total_memory": None,
        "sized": "a fresh host-emulated device per trace: vmmpool.replay.emulated_capacity "
                 "(2 x peak live + 1 GiB, or + 8 pages per stream when more)",
    }


def run_sweep(n: int, device: vmmpool.Device | None, output: str | None) -> int:
    """``--sweep N``: replay :func:`vmmpool._workloads.sweep`'s traces, one summary row per family."""
    shown = device if device is not None else vmmpool.Device.emulated(2 << 20)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []  # a line per failed row, printed once, after the summary
    for family, kwargs, tr in sweep(n):
        try:
            res = R.replay(tr, device)
            if not res.completed:  # the device is too small: recorded, not summarized
                rows.append({"family": family, "args": kwargs, "trace": tr.name, "error": res.error})
                failed.append(f"{tr.name}: did not complete: {res.error}")
                continue
            mn = R.min_limit(tr, device, default=res)
            steady = steady_state(family, kwargs, tr, device)
        except (OSError, vmmpool.VmmError) as e:
            # As for a trace replayed one by one (an OS limit of the emulator, say): the
            # row is recorded with its error, not summarized, and the sweep goes on.
            error = f"{type(e).__name__}: {e}"
            rows.append({"family": family, "args": kwargs, "trace": tr.name, "error": error})
            failed.append(f"{tr.name}: replay failed: {error}")
            continue
        P = res.page_size
        rows.append({
            "family": family, "args": kwargs, "trace": tr.name, "peak_live": res.peak_live,
            "held_ratio": res.peak_held / res.peak_live, "min_limit_pages": mn.pages,
            "min_limit_ratio": mn.ratio, "floor_ratio": -(-res.peak_live // P) * P / res.peak_live,
            "remaps": res.remaps, "syncs": res.syncs, **steady,
        })
    summary = []
    for family in SWEEP_FAMILIES:
        done = [r for r in rows if r["family"] == family and "error" not in r]
        if not done:
            continue
        held = [r["held_ratio"] for r in done]
        mins = [r["min_limit_ratio"] for r in done]
        summary.append({
            "family": family, "rows": len(done),
            "held_mean": sum(held) / len(held), "held_max": max(held),
            "held_above_1.05": sum(h > 1.05 for h in held),
            "min_limit_mean": sum(mins) / len(mins), "min_limit_max": max(mins),
            "min_limit_within_1%": sum(m <= 1.01 for m in mins),
            "min_limit_at_floor": sum(abs(r["min_limit_ratio"] - r["floor_ratio"]) < 1e-9 for r in done),
            "remaps": sum(r["remaps"] for r in done), "syncs": sum(r["syncs"] for r in done),
            "steady_rows_calling": sum(r["steady_calls_per_pass"] > 0 for r in done),
            "steady_calls_per_pass_mean": sum(r["steady_calls_per_pass"] for r in done) / len(done),
            "steady_calls_per_pass_max": max(r["steady_calls_per_pass"] for r in done),
            "steady_held_mean": sum(r["steady_held_ratio"] for r in done) / len(done),
        })
    print(_common.table(
        ["family", "rows", "held mean", "held max", "held > 1.05", "min limit mean", "min limit max",
         "min <= 1.01", "min at floor", "remaps", "syncs", "rows calling per pass",
         "calls/pass mean", "calls/pass max", "held after 4 passes"],
        [[s["family"], s["rows"], f"{s['held_mean']:.4f}", f"{s['held_max']:.4f}", s["held_above_1.05"],
          f"{s['min_limit_mean']:.4f}", f"{s['min_limit_max']:.4f}", s["min_limit_within_1%"],
          s["min_limit_at_floor"], s["remaps"], s["syncs"], s["steady_rows_calling"],
          f"{s['steady_calls_per_pass_mean']:.1f}", f"{s['steady_calls_per_pass_max']:.0f}",
          f"{s['steady_held_mean']:.4f}"] for s in summary],
    ))
    for line in failed:
        print(line)
    out = _common.write_json("replay-sweep", shown, R.json_safe(
        {"n_per_family": n, "summary": summary, "rows": rows}), output,
        device_facts=per_trace_device(device))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

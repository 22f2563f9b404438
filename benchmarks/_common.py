"""Shared helpers of the benchmarks: options, machine facts, tables, JSON, timing.

Each benchmark prints a table and writes ``benchmarks/results/<name>-<kind>.json``
(``kind`` is the device kind: ``host`` or ``cuda``) with the date, the machine
(platform, Python, CPU count) and the device. A ``--quick`` run (a smoke test) writes
to a temporary directory instead, so it never replaces the committed figures, unless
``--save`` (or ``--output PATH``) says where it goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import vmmpool
from vmmpool._demo import format_size as size  # noqa: F401 - re-exported for the benchmarks

RESULTS = Path(__file__).resolve().parent / "results"


def parser(
    description: str,
    device_help: str = "host or cuda:N (default: vmmpool.default_device(): cuda:0 if usable, else host)",
) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes (`device_help`: what
    ``--device`` defaults to, where a benchmark picks its own default)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument(
        "--quick", action="store_true",
        help="a smaller, faster run (smoke test); its JSON goes to a temporary directory unless --save",
    )
    p.add_argument(
        "--save", action="store_true",
        help="with --quick: write the JSON to benchmarks/results/ all the same",
    )
    p.add_argument(
        "--output", default=None,
        help="JSON file to write (default: benchmarks/results/<name>-<device kind>.json; "
        "with --quick and no --save: <temporary directory>/vmmpool-benchmarks/<name>-<kind>-quick.json)",
    )
    return p


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a count of pairs, seeds, pages, repeats)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text[:40]!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a size in GiB)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text[:40]!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text[:40]!r}")
    return x


def device_of(spec: str | None, p: argparse.ArgumentParser | None = None) -> vmmpool.Device:
    """The device `spec` names (default: :func:`vmmpool.default_device`); with a parser, a bad
    or unusable ``--device`` is a usage error (one line, exit status 2), not a traceback."""
    try:
        return vmmpool.default_device() if spec is None else vmmpool.Device(spec)
    except vmmpool.DeviceUnavailableError as e:
        if p is None:
            raise
        p.error(f"device {e.device!r} is unavailable: {e.reason}; pass --device host for the host emulator")
    except (ValueError, TypeError, vmmpool.VmmError) as e:
        if p is None:
            raise
        p.error(f"--device: {e}")


def check_output(p: argparse.ArgumentParser, output: str | None, option: str = "--output") -> None:
    """Refuse an ``--output`` that cannot be written before the run, not after it (the
    figures of a long run were lost to a traceback at the end)."""
    if output and Path(output).is_dir():
        p.error(f"{option} {output!r} is a directory: give a file name")


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "vmmpool": vmmpool.__version__,
    }


def device_info(device: vmmpool.Device) -> dict[str, Any]:
    return {
        "device": str(device),
        "kind": device.kind,
        "name": device.name,
        "granularity": device.granularity,
        "total_memory": device.total_memory,
    }


def peer_versions() -> dict[str, str]:
    """Versions of the peers compared against, where importable ("n/a" otherwise)."""
    out = {}
    for mod in ("numpy", "cupy", "torch"):
        try:
            m = __import__(mod)
        except Exception:  # noqa: BLE001 - a broken peer install is "n/a", never a crash
            out[mod] = "n/a"
        else:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out


def result_path(name: str, device: vmmpool.Device, output: str | None = None, quick: bool = False,
                save: bool = False) -> Path:
    """Where a run's JSON goes: `output`; else the committed results, except for a quick run.

    A ``--quick`` run without ``--save`` goes to ``<tempdir>/vmmpool-benchmarks/``: its
    smaller figures must never replace the committed ones in ``benchmarks/results/``.
    """
    if output:
        return Path(output)
    if quick and not save:
        return Path(tempfile.gettempdir()) / "vmmpool-benchmarks" / f"{name}-{device.kind}-quick.json"
    return RESULTS / f"{name}-{device.kind}.json"


def write_json(
    name: str,
    device: vmmpool.Device,
    payload: dict[str, Any],
    output: str | None = None,
    *,
    quick: bool = False,
    save: bool = False,
    device_facts: dict[str, Any] | None = None,
) -> Path:
    """Write ``payload`` with machine and device facts (see :func:`result_path`); return the path.

    `device_facts` replace or add to the facts of `device` (a run on devices made per
    trace describes them, not the stand-in `device` that names the file).
    """
    path = result_path(name, device, output, quick, save)
    doc = {
        "benchmark": name,
        "machine": machine_info(),
        "device": {**device_info(device), **(device_facts or {})},
        "peers": peer_versions(),
        "quick": quick,
    }
    clash = sorted(k for k in payload if k in doc)
    if clash:  # a payload key replaced the machine facts (fragmentation's "peers" did)
        raise ValueError(f"payload keys {clash} would replace the facts write_json records")
    doc.update(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def best_of(repeats: int, fn: Callable[[], float]) -> float:
    """The smallest of `repeats` measurements (``fn`` returns seconds)."""
    return min(fn() for _ in range(repeats))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

"""Peer allocators (PyTorch's caching allocator, CuPy's pool) replaying the same trace on a
GPU, each in a subprocess (``python -m vmmpool.replay --peer NAME TRACE``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._options import brief
from ._load import load
from ._search import bisect_good
from ._trace import _cut

__all__ = [
    "PEERS", "PeerResult", "gpu_unavailable_reason", "parse_peer_output", "peer_command",
    "peer_replays",
]

_PEER_MARK = "VMMPOOL-PEER-RESULT "
#: The peers' limit search goes in steps of this many bytes.
_PEER_STEP = 2 << 20

#: The peer allocators :func:`peer_replays` runs, by name.
PEERS = ("torch", "torch-expandable", "torch-vmmpool", "cupy")


@dataclass
class PeerResult:
    """One peer allocator's replay (run on a GPU, in a subprocess).

    Attributes
    ----------
    peer : str
        ``torch``, ``torch-expandable``, ``torch-vmmpool`` (PyTorch's caching
        allocator in a :func:`vmmpool.torch.MemPool`: its peak reserved is the
        page pool's peak bytes of pages) or ``cupy``.
    completed : bool or None
        None when it could not run (see `skipped`).
    peak_reserved, peak_allocated : int or None
        The allocator's own peak reserved / allocated bytes.
    min_limit : int or None
        Smallest completing limit in bytes (2 MiB steps), when searched; None when
        not searched or when the peer did not complete even at its own peak reserved.
    wall_s : float or None
        Seconds of the default replay.
    skipped : str or None
        Why the peer did not run.
    """

    peer: str
    completed: bool | None = None
    peak_reserved: int | None = None
    peak_allocated: int | None = None
    min_limit: int | None = None
    wall_s: float | None = None
    skipped: str | None = None


def peer_command(
    peer: str, trace_path: str | os.PathLike[str], limit: int | None = None,
    device: int | None = None, max_bytes: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The subprocess command line and environment that replay through `peer`.

    `device` picks a PyTorch snapshot's device (see :func:`~vmmpool.replay.load`); the peer
    replays it on its own GPU 0. `max_bytes` is the largest trace file the peer reads
    (default :data:`~vmmpool.replay.MAX_TRACE_BYTES`).

    Returns
    -------
    (argv, env)
        ``env`` is the current environment with ``PYTORCH_CUDA_ALLOC_CONF``
        set (``expandable_segments:True`` for ``torch-expandable``, removed
        otherwise).
    """
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {brief(peer)}")
    argv = [sys.executable, "-m", "vmmpool.replay", "--peer", peer, os.fspath(trace_path)]
    if limit is not None:
        argv += ["--limit", str(int(limit))]
    if device is not None:
        argv += ["--snapshot-device", str(int(device))]
    if max_bytes is not None:
        argv += ["--max-trace-bytes", str(int(max_bytes))]
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if peer == "torch-expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return argv, env


def parse_peer_output(peer: str, stdout: str, returncode: int = 0) -> dict[str, Any]:
    """Read the result line a peer subprocess printed.

    Raises
    ------
    RuntimeError
        No result line (the subprocess crashed): the message quotes its tail.
    """
    for line in reversed(stdout.splitlines()):
        if line.startswith(_PEER_MARK):
            try:
                out = json.loads(line[len(_PEER_MARK):])
            except ValueError:  # cut short (the subprocess was killed while printing it)
                out = None
            if not isinstance(out, dict) or "completed" not in out:
                raise RuntimeError(f"{peer}: malformed result line {_cut(line)!r}")
            return out
    tail = stdout.strip().splitlines()[-3:]
    raise RuntimeError(f"{peer}: subprocess exited {returncode} without a result: {tail}")


def _peer_run(
    peer: str, path: str, limit: int | None, timeout: float, device: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    argv, env = peer_command(peer, path, limit, device, max_bytes)
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return parse_peer_output(peer, proc.stdout + proc.stderr, proc.returncode)


def gpu_unavailable_reason() -> str | None:
    """Why the peer replays cannot run here (None when a CUDA GPU is usable)."""
    from .._backends import cuda as _cuda

    return _cuda.probe(0)


def peer_replays(
    trace_path: str | os.PathLike[str],
    peers: Sequence[str] = PEERS,
    *,
    search: bool = True,
    timeout: float = 600.0,
    device: int | None = None,
    max_bytes: int | None = None,
) -> list[PeerResult]:
    """Replay a trace file through PyTorch's caching allocator (also on vmmpool) and CuPy's pool.

    Each replay runs in its own subprocess (so each starts with an empty
    allocator and, for PyTorch, its own ``PYTORCH_CUDA_ALLOC_CONF``); a limit
    is set with ``torch.cuda.set_per_process_memory_fraction`` or
    ``cupy.cuda.MemoryPool.set_limit`` (for ``torch-vmmpool``: the page
    pool's limit). `device` picks a PyTorch snapshot's device, as for
    :func:`~vmmpool.replay.load` (default: the first with events, else with
    segments); `max_bytes` bounds the file, as there (the peers read it with the
    same bound). With `search`, the smallest limit at which each completes is
    searched by bisection in 2 MiB steps between the peak live bytes and the
    peer's own peak reserved.

    Returns
    -------
    list of PeerResult
        One per peer; without a GPU (or the peer's package) each is skipped
        with the reason.

    Notes
    -----
    Needs a CUDA GPU; not verified on one in this project's CI.
    """
    reason = gpu_unavailable_reason()
    out = []
    path = os.fspath(trace_path)
    peak_live = load(path, device, max_bytes=max_bytes).peak_live if search and reason is None else 0
    for peer in peers:
        if reason is not None:
            out.append(PeerResult(peer, skipped=f"no CUDA GPU ({reason})"))
            continue
        mod = "cupy" if peer == "cupy" else "torch"
        try:
            __import__(mod)
        except ImportError:
            out.append(PeerResult(peer, skipped=f"{mod} is not installed"))
            continue
        try:
            r = _peer_run(peer, path, None, timeout, device, max_bytes)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            out.append(PeerResult(peer, skipped=str(e)))
            continue
        res = PeerResult(
            peer, completed=bool(r["completed"]), peak_reserved=r.get("peak_reserved"),
            peak_allocated=r.get("peak_allocated"), wall_s=r.get("wall_s"),
        )
        if search and res.completed and res.peak_reserved:
            step = _PEER_STEP

            def done(n: int, peer: str = peer) -> bool:
                try:
                    return bool(_peer_run(
                        peer, path, n * _PEER_STEP, timeout, device, max_bytes
                    )["completed"])
                except (RuntimeError, subprocess.TimeoutExpired):
                    return False

            bad = max(0, peak_live // step - 1)
            good = -(-int(res.peak_reserved) // step)
            # The upper bound must complete under a limit too (else the search would report
            # a limit no run completed at): min_limit stays None when it does not.
            if done(good):
                res.min_limit = bisect_good(bad, good, done) * step
        out.append(res)
    return out


def _torch_events(torch: Any, tr: Any, handles: list[Any]) -> tuple[bool, float]:  # pragma: no cover
    """Replay `tr` as PyTorch tensors on the current allocator: (completed, wall seconds)."""
    tstreams = {
        s: (torch.cuda.default_stream() if s == 0 else torch.cuda.Stream()) for s in tr.streams
    }
    torch.cuda.reset_peak_memory_stats()
    completed = True
    t0 = time.perf_counter()
    try:
        for is_free, slot, nbytes, s in tr.events:
            if is_free:
                handles[slot] = None
            else:
                with torch.cuda.stream(tstreams[s]):
                    handles[slot] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError:
        completed = False
    torch.cuda.synchronize()
    return completed, time.perf_counter() - t0


def _peer_main(
    peer: str, path: str, limit: int | None, device: int | None = None,
    max_bytes: int | None = None,
) -> int:  # pragma: no cover - GPU only
    """Inside the subprocess: replay through one peer, print one result line."""
    tr = load(path, device, max_bytes=max_bytes)
    handles: list[Any] = [None] * tr.n_slots
    completed = True
    if peer == "cupy":
        import cupy

        pool = cupy.cuda.MemoryPool()
        if limit is not None:
            pool.set_limit(size=limit)
        streams = {s: (cupy.cuda.Stream.null if s == 0 else cupy.cuda.Stream()) for s in tr.streams}
        peak_res = peak_used = 0
        t0 = time.perf_counter()
        try:
            for is_free, slot, nbytes, s in tr.events:
                if is_free:
                    handles[slot] = None
                else:
                    with streams[s]:
                        handles[slot] = pool.malloc(nbytes)
                    peak_res = max(peak_res, pool.total_bytes())
                    peak_used = max(peak_used, pool.used_bytes())
        except cupy.cuda.memory.OutOfMemoryError:
            completed = False
        wall = time.perf_counter() - t0
    elif peer == "torch-vmmpool":
        import torch

        from .. import torch as vt
        from .._device import Device
        from .._pool import PagePool

        torch.cuda.init()
        vpool = PagePool(Device(0), limit=limit)
        with vt.use_pool(vpool):
            completed, wall = _torch_events(torch, tr, handles)
        peak_res = vpool.stats().peak_reserved_bytes  # pages the page pool held
        peak_used = torch.cuda.max_memory_allocated()
    else:
        import torch

        torch.cuda.init()
        if limit is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), 0)
        completed, wall = _torch_events(torch, tr, handles)
        peak_res = torch.cuda.max_memory_reserved()
        peak_used = torch.cuda.max_memory_allocated()
    handles.clear()
    print(_PEER_MARK + json.dumps({
        "completed": completed, "peak_reserved": peak_res, "peak_allocated": peak_used,
        "wall_s": wall, "limit": limit,
    }), flush=True)
    return 0

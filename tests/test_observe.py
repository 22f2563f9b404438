"""Statistics in PyTorch's terms, memory_summary, history, and snapshots in PyTorch's format."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import vmmpool


def pool_of(device: vmmpool.Device, pages: int) -> vmmpool.PagePool:
    return vmmpool.PagePool(device, limit=pages * device.granularity)


def test_stats_speak_pytorch(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        a = pool.malloc(P + 1)  # P + 512 bytes over two pages
        b = pool.malloc(100)  # 512 bytes on a page of the small-block heap
        s = pool.stats()
        assert s.allocated_bytes == P + 101  # what was asked for
        assert s.in_use_bytes == P + 1024  # with rounding (512 bytes)
        assert s.reserved_bytes == s.total_pages * P == 3 * P  # physical pages held
        assert s.address_space_bytes >= s.reserved_bytes  # addresses, not memory
        assert s.peak_reserved_bytes == 3 * P and s.peak_allocated_bytes == P + 101
        text = repr(s)
        for words in ("allocated", "in use", "reserved", "cached", "limit 16.0 MiB", "peaks"):
            assert words in text
        assert len(text) < 600 and "\n" not in text
        a.free()
        b.free()
        s = pool.stats()
        assert s.allocated_bytes == 0 and s.reserved_bytes == 3 * P and s.cached_bytes == 3 * P


def test_memory_summary_is_a_table_of_the_stats(device: vmmpool.Device) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        a = pool.malloc(3 * P)
        text = pool.memory_summary()
        lines = text.splitlines()
        assert len({len(line) for line in lines}) == 1, "every row of the table has the same width"
        row = next(line for line in lines if "Reserved memory" in line)
        assert "6.00 MiB" in row
        assert any("mallocs" in line and " 1 " in line for line in lines)
        a.free()


def test_history_and_dump_snapshot_round_trip(device: vmmpool.Device, tmp_path: Path) -> None:
    P = device.granularity
    with pool_of(device, 8) as pool:
        early = pool.malloc(P)  # before recording: only in segments
        pool.record_history(True, stacks=True)
        a = pool.malloc(2 * P + 5, stream=3)
        b = pool.malloc(1000)
        b.free()
        path = tmp_path / "pool.pickle"
        pool.dump_snapshot(path)
        with open(path, "rb") as f:
            snap = pickle.load(f)
        assert set(snap) >= {"segments", "device_traces"}
        (trace,) = snap["device_traces"][-1:]
        actions = [(e["action"], e["addr"], e["size"], e["stream"]) for e in trace]
        assert actions == [
            ("alloc", a.ptr, 2 * P + 5, 3),
            ("alloc", b.ptr, 1000, 0),
            ("free_requested", b.ptr, 1000, 0),
            ("free_completed", b.ptr, 1000, 0),
        ]
        assert all(e["frames"] and "filename" in e["frames"][0] for e in trace)
        assert all(isinstance(e["time_us"], int) for e in trace)
        # segments: mapped runs of the address space; blocks tile each segment exactly
        active = {}
        for seg in snap["segments"]:
            assert sum(blk["size"] for blk in seg["blocks"]) == seg["total_size"]
            at = seg["address"]
            for blk in seg["blocks"]:
                assert blk["address"] == at
                at += blk["size"]
                if blk["state"] == "active_allocated":
                    active[blk["address"]] = (blk["size"], blk["requested_size"])
            assert seg["allocated_size"] == sum(
                blk["size"] for blk in seg["blocks"] if blk["state"] == "active_allocated"
            )
        assert active == {early.ptr: (P, P), a.ptr: (2 * P + 512, 2 * P + 5)}
        s = pool.stats()
        assert sum(seg["total_size"] for seg in snap["segments"]) == s.mapped_pages * P
        # plain data only: loads with an unpickler that refuses every class
        class Refuse(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> object:
                raise pickle.UnpicklingError(f"refused {module}.{name}")

        with open(path, "rb") as f:
            assert Refuse(f).load() == snap
        pool.record_history(False)
        assert pool.memory_snapshot()["device_traces"][-1] == []
        a.free()
        early.free()


def test_history_is_bounded_and_validated(device: vmmpool.Device) -> None:
    with pool_of(device, 4) as pool:
        pool.record_history(True, max_entries=3)
        for _ in range(5):
            pool.malloc(100).free()
        trace = pool.memory_snapshot()["device_traces"][-1]
        assert [e["action"] for e in trace] == ["alloc", "free_requested", "free_completed"]
        with pytest.raises(TypeError, match="enabled must be a bool"):
            pool.record_history("yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_entries"):
            pool.record_history(True, max_entries=0)

"""The other process of ``test_share.py``: a small command loop (importable by spawn/forkserver).

Commands come as tuples through a ``Pipe`` connection or a pair of queues; each
answer is ``("ok", value)`` or ``("err", "TypeName: message")``. The worker can
be a receiver (``open`` a handle, ``read``/``write``/``close`` it) or an owner
(``make`` a shareable buffer and answer with its handle).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import vmmpool


def fd_count() -> int:
    """Open descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


class _Channel:
    def __init__(self, a: Any, b: Any = None) -> None:
        self.a, self.b = a, b

    def recv(self) -> Any:
        return self.a.recv() if self.b is None else self.a.get()

    def send(self, obj: Any) -> None:
        if self.b is None:
            self.a.send(obj)
        else:
            self.b.put(obj)


def serve(a: Any, b: Any = None) -> None:
    """Run commands from `a` (a Connection, or the inbound Queue with `b` the outbound one)."""
    ch = _Channel(a, b)
    handles: dict[str, vmmpool.SharedMemoryHandle] = {}
    maps: dict[str, vmmpool.SharedMapping] = {}
    owned: dict[str, vmmpool.GrowableBuffer] = {}
    while True:
        cmd, *args = ch.recv()
        try:
            value: Any = None
            if cmd == "exit":
                ch.send(("ok", None))
                return
            elif cmd == "open":  # key, handle
                key, handle = args
                handles[key] = handle
                maps[key] = handle.open()
                value = (maps[key].nbytes, handle.nbytes)
            elif cmd == "close_handle":
                handles.pop(args[0]).close()
            elif cmd == "read":  # key, nbytes, offset
                value = bytes(maps[args[0]].read(args[1], args[2]))
            elif cmd == "write":  # key, data, offset
                maps[args[0]].write(args[1], args[2])
            elif cmd == "close":
                maps.pop(args[0]).close()
            elif cmd == "make":  # key, nbytes, data: a shareable buffer; answers its handle
                key, nbytes, data = args
                buf = vmmpool.GrowableBuffer(
                    max_size=8 * nbytes, device="host", initial_size=nbytes, shareable=True
                )
                buf.write(data)
                owned[key] = buf
                value = buf.share()
                handles[key] = value  # kept open until the test says so (Queue pickles later)
            elif cmd == "owner_read":
                value = bytes(owned[args[0]].read(args[1], args[2]))
            elif cmd == "state":  # fds and a device's live counters (default: the host's)
                gc.collect()
                value = (fd_count(), vmmpool.Device(args[0] if args else "host").counters().live)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            ch.send(("ok", value))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            ch.send(("err", f"{type(exc).__name__}: {exc}"))


def receive_and_exit(handle: vmmpool.SharedMemoryHandle, conn: Any) -> None:
    """Receiver given the handle as a process argument: open it, write, report, exit without closing."""
    m = handle.open()
    m.write(b"from the child", 0)
    conn.send(bytes(m.read(5)))
    conn.recv()  # wait for the go-ahead, then exit with the mapping still open

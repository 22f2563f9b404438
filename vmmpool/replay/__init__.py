"""Trace replay: run a recorded allocation trace through a :class:`PagePool`.

Two trace formats are read:

* PyTorch memory snapshots (``torch.cuda.memory._dump_snapshot`` pickles).
  torch is not needed: a snapshot is a pickled plain ``dict``, and it is
  loaded through an unpickler that refuses every class, so a file that
  references one (which could run code) is refused with an error naming it.
  Before anything is loaded, the pickle's opcodes are scanned and bounded
  (see :func:`scan_pickle`): a small hostile file cannot make the reader
  hang, crash or run out of memory.
* RMM ``logging_resource_adaptor`` CSV logs
  (``Thread,Time,Action,Pointer,Size,Stream``).

How a snapshot becomes a list of events
---------------------------------------
``device_traces[d]`` holds the events recorded after recording started.
``alloc`` events allocate their ``size`` (the requested bytes), frees happen
at ``free_requested`` (``free_completed`` is ignored: it only says when the
caching allocator could reuse the block). Blocks that were already live when
recording started appear only in ``segments``: the *prelude* allocates them
first, in address order, with their ``requested_size``. They are the
``active_allocated`` blocks of the final state that no traced ``alloc``
accounts for, plus the blocks the trace frees without having allocated them
(allocated before recording started, or by events dropped past ``max_entries``;
their size is the free's). A second free of an address, with no allocation of
it in between, is a :class:`TraceError`.

The recorded run's own peak reserved bytes come from the segment events:
the reserved bytes at the start are the final segments' ``total_size`` sum
minus the net change of ``segment_alloc``/``segment_map`` (added) and
``segment_free``/``segment_unmap`` (subtracted) events; the peak is the
largest running sum over the trace. Its peak allocated bytes are the largest
sum of live blocks with each request rounded up to 512 bytes (PyTorch's
rounding), prelude blocks counted at their block size.

Replay
------
:func:`replay` runs the events through a fresh :class:`PagePool` (by default
on a fresh host-emulated device sized to the trace: memfd pages are not
committed unless touched, and the replay never touches the memory) and
returns a :class:`ReplayResult`. :func:`min_limit` searches, over whole
pages, the smallest pool limit at which the replay completes.
:func:`peer_replays` (a GPU only) replays the same trace through PyTorch's
caching allocator and CuPy's ``MemoryPool``, each in its own subprocess.

The package's files name its parts: ``_trace`` (the :class:`Trace`), the readers
``_pickle_scan``, ``_snapshot``, ``_csv`` and ``_load``, ``_engine`` (the one event loop,
:func:`replay`), ``_timeline``, ``_search`` (:func:`min_limit`), ``_tables`` (output) and
``_peers`` (the peer subprocesses, run as ``python -m vmmpool.replay --peer NAME TRACE``).
"""

from __future__ import annotations

from ._csv import load_csv
from ._engine import ReplayResult, emulated_capacity, replay
from ._load import load
from ._peers import PEERS, PeerResult, gpu_unavailable_reason, parse_peer_output, peer_command, peer_replays
from ._pickle_scan import (
    MAX_PICKLE_DEPTH,
    MAX_PICKLE_INT_BITS,
    MAX_PICKLE_OTHER_KEYS,
    PICKLE_HASH_FLOOR,
    PICKLE_HASH_PER_BYTE,
    PICKLE_WEIGHT_FLOOR,
    PICKLE_WEIGHT_PER_BYTE,
    scan_pickle,
)
from ._search import MinLimit, min_limit
from ._snapshot import load_snapshot, snapshot_to_trace
from ._tables import COLUMNS, format_table, json_safe, record
from ._timeline import Timeline, timeline
from ._trace import MAX_TRACE_BYTES, Trace, TraceError, scaled

__all__ = [
    "COLUMNS",
    "MAX_TRACE_BYTES",
    "MinLimit",
    "PEERS",
    "PeerResult",
    "ReplayResult",
    "Timeline",
    "Trace",
    "TraceError",
    "load",
    "load_csv",
    "load_snapshot",
    "emulated_capacity",
    "parse_peer_output",
    "peer_command",
    "snapshot_to_trace",
    "min_limit",
    "format_table",
    "json_safe",
    "scaled",
    "scan_pickle",
    "peer_replays",
    "record",
    "replay",
    "timeline",
    "gpu_unavailable_reason",
    "MAX_PICKLE_DEPTH",
    "MAX_PICKLE_INT_BITS",
    "MAX_PICKLE_OTHER_KEYS",
    "PICKLE_HASH_FLOOR",
    "PICKLE_HASH_PER_BYTE",
    "PICKLE_WEIGHT_FLOOR",
    "PICKLE_WEIGHT_PER_BYTE",
]

del annotations  # from the __future__ import: not a name of this package

"""Bounds on an untrusted snapshot pickle, checked on its opcodes before it is loaded
(:func:`scan_pickle`)."""

from __future__ import annotations

import io
import pickletools
from typing import Any

from .._options import brief
from ._trace import TraceError, _cut

__all__ = [
    "scan_pickle", "MAX_PICKLE_DEPTH", "PICKLE_WEIGHT_PER_BYTE", "PICKLE_WEIGHT_FLOOR",
    "PICKLE_HASH_PER_BYTE", "PICKLE_HASH_FLOOR", "MAX_PICKLE_INT_BITS", "MAX_PICKLE_OTHER_KEYS",
]

# Bounds on an untrusted snapshot pickle, checked on its opcodes before it is loaded
# (issue 17). Real snapshots nest 7 deep and expand to 2-4 objects per byte: stacks are
# shared through the pickle's memo (one frames list of 111 frames by up to 579 events in
# the llama trace), and deeper stacks expand further; the bounds leave a wide margin.
#: Deepest nesting of containers accepted.
MAX_PICKLE_DEPTH = 64
#: Objects the loaded data may hold when expanded as a tree (memo references counted each
#: time they are used): at most this many per byte of the file, plus :data:`PICKLE_WEIGHT_FLOOR`.
#: Any walk over the loaded data then takes time linear in the file's size.
PICKLE_WEIGHT_PER_BYTE = 1024
PICKLE_WEIGHT_FLOOR = 1 << 20
#: Work of hashing the dict keys and set items while loading (a tuple's hash walks it, and is
#: not cached): at most this many objects per byte, plus :data:`PICKLE_HASH_FLOOR`. Real
#: snapshots' keys are strings, under one per 2 bytes.
PICKLE_HASH_PER_BYTE = 4
PICKLE_HASH_FLOOR = 1 << 20
#: Dict keys and set items that are not strings (numbers, tuples: objects an attacker can
#: make collide, as ``k * (2**61 - 1)`` all hash to 0, so that building one dict takes time
#: quadratic in its size; a string's hash is salted per process), counted with everything
#: inside them: at most this many in the whole file. Real snapshots' keys are all strings.
MAX_PICKLE_OTHER_KEYS = 1 << 12
#: Largest integer in a pickle, in bits (snapshot values fit 64; a bigger one is refused
#: by the reader with its field's name).
MAX_PICKLE_INT_BITS = 1 << 16
#: Pickle opcodes that build objects other than plain containers and scalars (they
#: could run code): refused.
_CODE_OPS = frozenset({
    "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX",
    "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER",
})
_STR_OPS = frozenset({"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_INT_OPS = frozenset({"INT", "LONG", "LONG1", "LONG4"})
#: Opcodes that push a number (its hash is an attacker's to choose).
_NUM_OPS = _INT_OPS | {"BININT", "BININT1", "BININT2", "FLOAT", "BINFLOAT"}
#: What the scan's stack holds for a string too long to keep, bytes, None, True, False or
#: (): a scalar whose hash no file chooses (salted, or one of a few values).
_OPAQUE: Any = object()
#: Kinds of container (what the unpickler hashes: dict keys, set items).
_LIST, _DICT, _SET, _TUPLE = 0, 1, 2, 3
_BUILDS = {"LIST": _LIST, "DICT": _DICT, "FROZENSET": _SET, "TUPLE": _TUPLE}
_EMPTIES = {"EMPTY_LIST": _LIST, "EMPTY_DICT": _DICT, "EMPTY_SET": _SET}
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
#: Opcodes that push one scalar.
_SCALAR_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE",
    "NEWTRUE", "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT",
    "BINFLOAT", "EMPTY_TUPLE",
})


def scan_pickle(data: bytes, name: str = "pickle") -> None:
    """Check an untrusted pickle's opcodes before it is loaded; raise if it is not safe.

    The scan reads the opcodes (``pickletools.genops``) without building any
    object and simulates the unpickler's stack with only the shape of what it
    would build: which containers hold which. It refuses

    * any opcode that names a class or calls code (``GLOBAL``, ``REDUCE``, ...);
    * containers nested deeper than :data:`MAX_PICKLE_DEPTH` (a deep tuple
      crashes the interpreter when hashed; deep values overflow the stack of
      every recursive function), and containers that contain themselves;
    * a container that, expanded as a tree, holds more than
      :data:`PICKLE_WEIGHT_PER_BYTE` objects per byte of the file (plus
      :data:`PICKLE_WEIGHT_FLOOR`): the memo lets a few hundred bytes refer to
      one list from many places, so that a walk over the loaded data takes
      exponentially long; within the bound, a walk is linear in the file's size;
    * dict keys and set items whose hashing, while loading, would walk more
      than :data:`PICKLE_HASH_PER_BYTE` objects per byte (plus
      :data:`PICKLE_HASH_FLOOR`): tuples built of shared tuples;
    * more than :data:`MAX_PICKLE_OTHER_KEYS` dict keys and set items that are
      not strings (numbers and tuples, counted with what they hold): such keys
      can be made to collide, and a dict of colliding keys takes quadratic time
      to build;
    * integers beyond :data:`MAX_PICKLE_INT_BITS` bits, memo indices beyond
      the number of opcodes read (the unpickler sizes its memo by the largest
      index), frames that run past the end of the file, and anything
      malformed or truncated.

    Every container built is checked, kept or not. The scan's own work is
    linear in the file's size.

    Parameters
    ----------
    data : bytes
        The whole file.
    name : str
        The file's name, for the messages.

    Raises
    ------
    TraceError
        One line naming the file, the byte offset and the reason; an untrusted
        value is never quoted whole.
    """
    size = len(data)
    # Stack items: a container node (int >= 0), a short string (kept to name the class
    # a STACK_GLOBAL refers to), _OPAQUE (another scalar whose hash no file chooses) or None
    # (a number).
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    kids: list[list[Any]] = []  # container node -> its items (stack items, as above)
    kinds = bytearray()  # container node -> _LIST, _DICT, _SET or _TUPLE
    # Container node -> a lower bound of its depth, kept as items arrive: a deep file is
    # refused as soon as it gets too deep (the exact walk after the scan decides the rest).
    low = bytearray()
    # Dict keys and set items that are not strings: None (a number) or a container node.
    others: list[Any] = []
    bio = io.BytesIO(data)
    pos = 0
    n_ops = 0

    other_keys = (
        f"{name}: refused: more than {MAX_PICKLE_OTHER_KEYS:,} dict keys or set items that "
        "are not strings (numbers, tuples: keys that can be made to collide, which makes "
        "loading take quadratic time; a snapshot's keys are strings)"
    )

    def to_mark() -> list[Any]:
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def above(items: list[Any]) -> int:
        """1 + the deepest of `items` (a lower bound)."""
        d = 0
        for i in items:
            if type(i) is int and low[i] > d:
                d = low[i]
        if d >= MAX_PICKLE_DEPTH:
            raise TraceError(
                f"{name}: refused at byte {pos}: containers nested more than "
                f"{MAX_PICKLE_DEPTH} deep (a snapshot nests about 7)"
            )
        return d + 1

    def keys(items: list[Any]) -> None:
        for k in items:
            if type(k) is not str and k is not _OPAQUE:
                others.append(k)
        if len(others) > MAX_PICKLE_OTHER_KEYS:
            raise TraceError(other_keys)

    def add(items: list[Any], op: str) -> None:
        top = stack[-1]
        if type(top) is not int:
            raise TraceError(f"{name}: malformed pickle: {op} at byte {pos} adds to a non-container")
        kids[top] += items
        kind = kinds[top]
        if kind == _DICT or kind == _SET:
            keys(items[::2] if kind == _DICT else items)
        d = above(items)
        if d > low[top]:
            low[top] = d

    try:
        for op, raw_arg, at in pickletools.genops(bio):
            arg: Any = raw_arg
            pos = at or 0
            n_ops += 1
            o = op.name
            # Most frequent first: memo reads are 70% of a snapshot's opcodes.
            if o in _GET_OPS:
                if arg not in memo:
                    raise TraceError(
                        f"{name}: malformed pickle: memo index {brief(arg)} read at byte {pos} "
                        "was never written"
                    )
                stack.append(memo[arg])
            elif o in _SCALAR_OPS:
                if o in _INT_OPS and arg.bit_length() > MAX_PICKLE_INT_BITS:
                    raise TraceError(
                        f"{name}: refused at byte {pos}: an integer of {arg.bit_length()} bits "
                        f"(at most {MAX_PICKLE_INT_BITS}; snapshot values fit 64)"
                    )
                if o in _STR_OPS:
                    stack.append(arg if len(arg) <= 100 else _OPAQUE)
                else:
                    stack.append(None if o in _NUM_OPS else _OPAQUE)
            elif o in _PUT_OPS:
                idx = len(memo) if o == "MEMOIZE" else arg
                if idx > n_ops:
                    raise TraceError(
                        f"{name}: refused at byte {pos}: memo index {brief(idx)} beyond the "
                        f"{n_ops} opcodes read so far"
                    )
                memo[idx] = stack[-1]
            elif o == "MARK":
                marks.append(len(stack))
            elif o in _EMPTIES:
                kids.append([])
                kinds.append(_EMPTIES[o])
                low.append(1)
                stack.append(len(kids) - 1)
            elif o in ("APPENDS", "SETITEMS", "ADDITEMS"):
                add(to_mark(), o)
            elif o == "APPEND":
                add([stack.pop()], o)
            elif o == "SETITEM":
                v = stack.pop()
                add([stack.pop(), v], o)
            elif o in _BUILDS or o in ("TUPLE1", "TUPLE2", "TUPLE3"):
                if o in _BUILDS:
                    items = to_mark()
                else:
                    k = int(o[-1])
                    if len(stack) < k:
                        raise IndexError(o)
                    items = stack[-k:]
                    del stack[-k:]
                low.append(above(items))
                kids.append(items)
                kind = _BUILDS.get(o, _TUPLE)
                kinds.append(kind)
                if kind == _DICT or kind == _SET:
                    keys(items[::2] if kind == _DICT else items)
                stack.append(len(kids) - 1)
            elif o == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    stack.pop()
            elif o == "POP_MARK":
                to_mark()
            elif o == "DUP":
                stack.append(stack[-1])
            elif o == "FRAME":
                if arg > size - bio.tell():
                    raise TraceError(
                        f"{name}: truncated pickle, stopped near byte {pos} of {size} (a frame "
                        f"of {brief(arg)} bytes runs past the end of the file)"
                    )
            elif o == "STOP":
                if len(stack) != 1 or marks:
                    raise TraceError(
                        f"{name}: malformed pickle: the stack at STOP (byte {pos}) holds "
                        f"{len(stack)} items, not 1"
                    )
            elif o in _CODE_OPS:
                if o in ("GLOBAL", "INST"):
                    what = "the class " + _cut(str(arg).replace(" ", "."), 100)
                elif o == "STACK_GLOBAL" and len(stack) >= 2 and all(
                    isinstance(x, str) for x in stack[-2:]
                ):
                    what = "the class " + _cut(f"{stack[-2]}.{stack[-1]}", 100)
                else:
                    what = f"a class or code (opcode {o})"
                raise TraceError(
                    f"{name}: refused at byte {pos}: the pickle references {what}; only plain "
                    "dicts, lists and scalars are loaded (a class could run code)"
                )
            elif o != "PROTO":  # pragma: no cover - every opcode of protocols 0-5 is handled
                raise TraceError(f"{name}: malformed pickle: unexpected opcode {o} at byte {pos}")
    except IndexError:
        raise TraceError(
            f"{name}: malformed pickle: the opcode at byte {pos} reads past the bottom of "
            "the stack"
        ) from None
    except TraceError:
        raise
    except ValueError as e:
        what = "truncated" if bio.tell() >= size else "malformed"
        text = str(e)
        if "Exceeds the limit" in text:
            text = "an integer of more than 4300 decimal digits"
        raise TraceError(
            f"{name}: {what} pickle, stopped near byte {bio.tell()} of {size} ({_cut(text)})"
        ) from None
    _check_shape(kids, kinds, name, size, others, other_keys)


def _check_shape(
    kids: list[list[Any]], kinds: bytearray, name: str, size: int, others: list[Any],
    other_keys: str,
) -> None:
    """Refuse deep, self-containing or exponentially shared containers, and costly hashing.

    One iterative depth-first walk over every container the unpickler would build,
    each visited once: linear in the number of containers and items.
    """
    max_weight = PICKLE_WEIGHT_PER_BYTE * size + PICKLE_WEIGHT_FLOOR
    max_hash = PICKLE_HASH_PER_BYTE * size + PICKLE_HASH_FLOOR
    n = len(kids)
    state = bytearray(n)  # 0 unseen, 1 on the walk's path, 2 done
    weight = [0] * n  # objects in the node's subtree, expanded as a tree
    depth = bytearray(n)  # containers on the longest path down from the node
    hashed = 0  # objects walked to hash dict keys and set items
    deep = (
        f"{name}: refused: containers nested more than {MAX_PICKLE_DEPTH} deep "
        "(a snapshot nests about 7)"
    )
    for start in range(n):
        if state[start]:
            continue
        path = [start]
        nexts = [0]
        state[start] = 1
        while path:
            cur = path[-1]
            i = nexts[-1]
            ch = kids[cur]
            while i < len(ch) and type(ch[i]) is not int:  # scalars: nothing below them
                i += 1
            if i < len(ch):
                nexts[-1] = i + 1
                c = ch[i]
                if state[c] == 1:
                    raise TraceError(f"{name}: refused: a container in the pickle contains itself")
                if state[c] == 0:
                    if len(path) >= MAX_PICKLE_DEPTH:
                        raise TraceError(deep)
                    state[c] = 1
                    path.append(c)
                    nexts.append(0)
                continue
            w = 1
            d = 0
            for c in ch:
                if type(c) is int:
                    w += weight[c]
                    if depth[c] > d:
                        d = depth[c]
                else:
                    w += 1
            if d >= MAX_PICKLE_DEPTH:  # reached on a short path, deep below: still too deep
                raise TraceError(deep)
            if w > max_weight:
                raise TraceError(
                    f"{name}: refused: the pickle refers to the same lists and dicts so often "
                    f"that it expands to more than {max_weight:,} objects "
                    f"({PICKLE_WEIGHT_PER_BYTE} per byte of its {size:,} bytes plus "
                    f"{PICKLE_WEIGHT_FLOOR:,}; a snapshot expands to about 4 per byte)"
                )
            kind = kinds[cur]
            if kind == _DICT or kind == _SET:
                keys = ch[::2] if kind == _DICT else ch
                hashed += sum(weight[k] if type(k) is int else 1 for k in keys)
                if hashed > max_hash:
                    raise TraceError(
                        f"{name}: refused: hashing the dict keys would walk more than "
                        f"{max_hash:,} objects (tuples built of shared tuples; "
                        f"{PICKLE_HASH_PER_BYTE} per byte of its {size:,} bytes plus "
                        f"{PICKLE_HASH_FLOOR:,})"
                    )
            weight[cur] = w
            depth[cur] = d + 1
            state[cur] = 2
            path.pop()
            nexts.pop()
    # Non-string keys with everything they hold (every container's weight is known now).
    if sum(1 if k is None else weight[k] for k in others) > MAX_PICKLE_OTHER_KEYS:
        raise TraceError(other_keys)

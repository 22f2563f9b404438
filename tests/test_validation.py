"""User-facing validation: bad input gets a clear error, raised before anything changes.

Issue 8, items 8 (CLI and view messages) and 9 (smaller validation gaps), and
the single bound every public size, offset, alignment and limit is checked
against (``check_int`` with the device's address limit).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import vmmpool
from vmmpool import ArrayView, Device, GrowableBuffer, PagePool, PhysicalAllocation
from vmmpool._options import ADDRESS_LIMIT, address_limit, check_int

MiB = 1 << 20


def _calls(dev: Device) -> dict[str, int]:
    return dict(dev.counters().calls)


# ------------------------------------------------------------------------ CLI
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "VMMPOOL_HOST_CAPACITY"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vmmpool", *args],
        capture_output=True, text=True, timeout=300, env=full_env,
    )


def _one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    # Issue 21: one error style for every command, argparse's own.
    assert re.match(r"python -m vmmpool( (info|demo|replay))?: error: ", lines[0]), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_demo_limit_above_the_device_is_one_line_exit_2() -> None:
    out = _cli("demo", "--device", "host", "--limit", "100G", env={"VMMPOOL_HOST_CAPACITY": "256M"})
    _one_line_error(out, "--limit 100.0 GiB", "free on host")


def test_cli_demo_limit_garbage_is_one_line_exit_2() -> None:
    out = _cli("demo", "--device", "host", "--limit", "lots")
    _one_line_error(out, "--limit", "'lots'")


#: Hide every GPU from a subprocess, so that its default device is the host emulator as on a
#: machine without one: CUDA_VISIBLE_DEVICES for the real driver, STANDIN_CUDA_DEVICES for the
#: stand-in driver (tests/standin_driver). Issue 17: `demo` without --device picked the GPU
#: wherever one was present, and a test of the host's setting then failed there.
_HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": "", "STANDIN_CUDA_DEVICES": "0"}


@pytest.mark.parametrize("command", [["info"], ["demo", "--device", "host"], ["demo"]])
@pytest.mark.parametrize("value", ["xyz", "1.5X", "²M", "-4G", "1M", "9" * 5000])
def test_cli_malformed_host_capacity_is_one_line_exit_2(command: list[str], value: str) -> None:
    out = _cli(*command, env={"VMMPOOL_HOST_CAPACITY": value, **_HIDE_GPUS})
    shown = repr(value) if len(value) <= 40 else "(str of 5000 characters)"
    _one_line_error(out, "VMMPOOL_HOST_CAPACITY", shown)
    assert len(out.stderr) < 300


def test_the_host_capacity_test_holds_where_a_gpu_is_visible(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The stand-in driver plays a visible GPU: there the default device is the GPU, and
    # _HIDE_GPUS makes it the host emulator again, so the test above tests the host's path.
    from standin_driver import build as standin_build

    reason = standin_build.unavailable_reason()
    if reason is not None:
        if os.environ.get("VMMPOOL_REQUIRE_STANDIN", "") == "1":
            pytest.fail(f"VMMPOOL_REQUIRE_STANDIN=1 but {reason}")
        pytest.skip(reason)
    lib = standin_build.build(tmp_path_factory.mktemp("standin-cuda"))
    gpu = {"LD_LIBRARY_PATH": str(lib.parent)}
    code = "import vmmpool; print(vmmpool.default_device())"
    for env, expected in ((gpu, "cuda:0"), ({**gpu, **_HIDE_GPUS}, "host")):
        full = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_CUDA_")}
        full.update(env)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env=full, check=False)
        assert out.stdout.strip() == expected, out.stderr[-2000:]
    out = _cli("demo", env={"VMMPOOL_HOST_CAPACITY": "xyz", **gpu, **_HIDE_GPUS})
    _one_line_error(out, "VMMPOOL_HOST_CAPACITY", "'xyz'")


def test_host_capacity_rejects_non_ascii_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmpool._backends.host import default_capacity

    monkeypatch.setenv("VMMPOOL_HOST_CAPACITY", "²G")
    with pytest.raises(ValueError, match="VMMPOOL_HOST_CAPACITY must be a size"):
        default_capacity()
    monkeypatch.setenv("VMMPOOL_HOST_CAPACITY", "64M")
    assert default_capacity() == 64 * MiB


def test_cli_unknown_option_is_one_line_exit_2() -> None:
    out = _cli("demo", "--frobnicate")
    _one_line_error(out, "unrecognized arguments")


# ---------------------------------------------------------------------- views
@pytest.fixture
def buf(host: Device) -> Iterator[GrowableBuffer]:
    b = GrowableBuffer(max_size=4 * MiB, device=host, initial_size=2 * MiB)
    yield b
    b.close()


def test_view_bad_dtype_says_what_was_expected_and_got(buf: GrowableBuffer) -> None:
    with pytest.raises(TypeError) as info:
        buf.view("foo")
    msg = str(info.value)
    assert "a NumPy dtype such as 'float32'" in msg
    assert "got str 'foo'" in msg


@pytest.mark.parametrize("where", ["buffer", "allocation"])
def test_view_dtype_none_is_rejected(host: Device, where: str) -> None:
    # NumPy would read None as float64: a view's element type is never guessed.
    with PagePool(host, limit=8 * MiB) as pool:
        owner: Any = (
            GrowableBuffer(max_size=2 * MiB, pool=pool, initial_size=MiB)
            if where == "buffer" else pool.malloc(MiB)
        )
        with pytest.raises(TypeError, match=r"dtype must be a NumPy dtype such as 'float32'.*None"):
            owner.view(dtype=None)
        with pytest.raises(TypeError, match="got None"):
            vmmpool._dlpack.dlpack_dtype(None)
        assert owner.view("float32").shape == (MiB // 4,)
        if where == "buffer":
            owner.close()
        else:
            owner.free()


@pytest.mark.parametrize(
    "bad", ["1.0", (1,), (1, 0, 0), [1, 0], (1.0, 0), (True, 0), (1, -1), ("1", "0"), 1]
)
def test_dlpack_max_version_must_be_a_tuple_of_two_ints(buf: GrowableBuffer, bad: Any) -> None:
    view = buf.view("float32")
    before = vmmpool._dlpack.export_stats()["exported"]
    with pytest.raises(TypeError, match=r"max_version must be a \(major, minor\) tuple of two ints"):
        view.__dlpack__(max_version=bad)
    assert vmmpool._dlpack.export_stats()["exported"] == before  # nothing exported
    assert "dltensor_versioned" in repr(view.__dlpack__(max_version=(1, 0)))
    assert "dltensor_versioned" not in repr(view.__dlpack__(max_version=(0, 8)))


def test_array_view_null_pointer_only_when_empty(host: Device) -> None:
    with pytest.raises(ValueError, match=r"ptr must be a device address \(not 0\) when nbytes > 0"):
        ArrayView(None, host, 0, 16)
    empty = ArrayView(None, host, 0, 0, "float32")
    assert empty.shape == (0,) and empty.ptr == 0
    assert np.from_dlpack(empty).shape == (0,)


def test_array_view_range_must_be_addressable(host: Device) -> None:
    with pytest.raises(ValueError, match="ptr must be <= "):
        ArrayView(None, host, 1 << 64, 0)
    with pytest.raises(ValueError, match="ptr \\+ nbytes must be <= "):
        ArrayView(None, host, host.address_limit - 4095, 8192)
    with pytest.raises(ValueError, match="shape entry must be <= "):
        ArrayView(None, host, 4096, 16, "uint8", shape=(1 << 64, 0))


# ------------------------------------------------------------------ resources
def test_get_access_bad_device_is_a_clear_error_not_a_driver_error(host: Device) -> None:
    with vmmpool.reserve(2 * MiB, host) as res:
        m = res.map(vmmpool.create(2 * MiB, host), access="rw")
        before = _calls(host)
        for bad in (True, 1.0, b"cuda:0", [0]):
            with pytest.raises(TypeError, match="device must be None, a Device, a device spec"):
                m.get_access(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="device must be >= 0, got -1"):
            m.get_access(-1)
        with pytest.raises(ValueError, match=r"host emulator has one device \(ordinal 0\), got 1"):
            m.get_access(1)
        assert _calls(host) == before  # rejected before any driver call
        assert m.get_access() is vmmpool.Access.READWRITE
        assert m.get_access(0) is vmmpool.Access.READWRITE
        assert m.get_access(host) is vmmpool.Access.READWRITE
        assert m.get_access("host") is vmmpool.Access.READWRITE


def _float_and_bool_cases(dev: Device) -> list[tuple[str, Callable[[], Any]]]:
    g = dev.granularity
    return [
        ("nbytes", lambda: vmmpool.reserve(2.0 * g, dev)),  # type: ignore[arg-type]
        ("nbytes", lambda: vmmpool.reserve(True, dev)),  # type: ignore[arg-type]
        ("alignment", lambda: vmmpool.reserve(g, dev, alignment=2.0 * g)),  # type: ignore[arg-type]
        ("hint", lambda: vmmpool.reserve(g, dev, hint=float(1 << 40))),  # type: ignore[arg-type]
        ("nbytes", lambda: vmmpool.create(2.0 * g, dev)),  # type: ignore[arg-type]
        ("granularity", lambda: Device.emulated(granularity=2.0 * MiB)),  # type: ignore[arg-type]
        ("granularity", lambda: Device.emulated(granularity=True)),  # type: ignore[arg-type]
        (
            "recommended_granularity",
            lambda: Device.emulated(recommended_granularity=2.0 * MiB),  # type: ignore[arg-type]
        ),
        (
            "recommended_granularity",
            lambda: Device.emulated(recommended_granularity=True),  # type: ignore[arg-type]
        ),
        ("capacity", lambda: Device.emulated(64.0 * MiB)),  # type: ignore[arg-type]
        ("max_size", lambda: GrowableBuffer(max_size=2.0 * g, device=dev)),  # type: ignore[arg-type]
        ("limit", lambda: PagePool(dev, limit=8.0 * g)),  # type: ignore[arg-type]
        ("nbytes", lambda: dev.round_up(1.5)),  # type: ignore[arg-type]
        ("size", lambda: PhysicalAllocation.from_fd(0, 2.0 * g, dev)),  # type: ignore[arg-type]
    ]


def test_float_and_bool_sizes_are_type_errors(host: Device) -> None:
    before = _calls(host)
    for name, call in _float_and_bool_cases(host):
        with pytest.raises(TypeError, match=f"^{name} must be an int, got (float|bool)"):
            call()
    assert _calls(host) == before


def test_emulated_granularity_must_be_a_power_of_two_and_rec_a_multiple() -> None:
    with pytest.raises(ValueError, match="granularity must be a power of two, got 3145728"):
        Device.emulated(granularity=3 * MiB)
    with pytest.raises(ValueError, match="recommended_granularity must be a multiple of 2097152"):
        Device.emulated(recommended_granularity=3 * MiB)
    dev = Device.emulated(8 * MiB, granularity=64 << 10, recommended_granularity=2 * MiB)
    assert (dev.granularity, dev.recommended_granularity) == (64 << 10, 2 * MiB)


@pytest.mark.parametrize("name", [123, None, b"gpu", ["x"]])
def test_emulated_name_must_be_a_str(name: Any) -> None:
    with pytest.raises(TypeError, match="name must be a str, got"):
        Device.emulated(name=name)
    assert Device.emulated(name="mine").name == "mine"


@pytest.mark.parametrize("spec", ["cuda:²", "²", "cuda:٣", "٣", "cuda:", "cuda:-1", "cuda:0x1"])
def test_device_spec_accepts_only_ascii_digits(spec: str) -> None:
    with pytest.raises(ValueError, match="N in ASCII digits, got"):
        Device(spec)


def test_device_spec_parses_ascii_ordinals() -> None:
    from vmmpool._device import _parse

    assert _parse("cuda:12") == ("cuda", 12)
    assert _parse(" CUDA:3 ") == ("cuda", 3)
    assert _parse("7") == ("cuda", 7)
    assert _parse("host") == ("host", 0)


class _PtrStream:
    ptr = 0


@pytest.mark.parametrize(
    ("bad", "error"),
    [("x", TypeError), (True, TypeError), (1.5, TypeError), (-1, ValueError), (b"0", TypeError)],
)
def test_synchronize_rejects_what_is_not_a_stream(host: Device, bad: Any, error: type) -> None:
    before = _calls(host)
    with pytest.raises(error, match="stream"):
        host.synchronize(bad)
    assert _calls(host) == before  # rejected before the backend
    host.synchronize()
    host.synchronize(0)
    host.synchronize(_PtrStream())
    assert _calls(host)["synchronize"] == before.get("synchronize", 0) + 3


def test_growable_buffer_pool_must_be_a_pool(host: Device) -> None:
    before = host.counters()
    for bad in ("notapool", 3, object()):
        with pytest.raises(TypeError, match=r"pool must be a vmmpool\.PagePool, got"):
            GrowableBuffer(max_size=4 * MiB, pool=bad)  # type: ignore[arg-type]
    assert host.counters() == before


# --------------------------------------------------------------------- from_fd
def _assert_rejected_fd(dev: Device, fd: int, size: int, match: str) -> None:
    before = dev.counters()
    with pytest.raises(ValueError, match=match):
        PhysicalAllocation.from_fd(fd, size, dev)
    assert dev.counters() == before  # nothing imported, no driver call


def test_from_fd_wrong_size_rejected_before_import(host: Device) -> None:
    g = host.granularity
    with vmmpool.create(g, host, handle_type="posix_fd") as a:
        fd = a.export()
        try:
            _assert_rejected_fd(host, fd, 2 * g, f"size must be the exported allocation's size, {g}")
            with PhysicalAllocation.from_fd(fd, g, host) as b:  # the right size works
                assert b.size == g and b.exportable
        finally:
            os.close(fd)


def test_from_fd_rejects_regular_files_dirs_pipes_and_closed_fds(host: Device) -> None:
    g = host.granularity
    with tempfile.NamedTemporaryFile() as named:
        named.truncate(g)
        named.flush()
        _assert_rejected_fd(host, named.fileno(), g, "a file with a name on a file system")
    with tempfile.TemporaryFile() as anon:  # unlinked, right size, but not a memfd
        anon.truncate(g)
        anon.flush()
        _assert_rejected_fd(host, anon.fileno(), g, "fd must be a memfd exported by")
    dfd = os.open(tempfile.gettempdir(), os.O_RDONLY)
    try:
        _assert_rejected_fd(host, dfd, g, "a directory")
    finally:
        os.close(dfd)
    r, w = os.pipe()
    try:
        _assert_rejected_fd(host, r, g, "a pipe")
    finally:
        os.close(r)
        os.close(w)
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)
    _assert_rejected_fd(host, closed, g, "fd must be an open file descriptor")
    before = host.counters()
    with pytest.raises(ValueError, match="fd must be >= 0"):
        PhysicalAllocation.from_fd(-1, g, host)
    with pytest.raises(TypeError, match="fd must be an int"):
        PhysicalAllocation.from_fd(3.0, g, host)  # type: ignore[arg-type]
    assert host.counters() == before


def test_from_fd_memfd_of_another_size_rejected(host: Device) -> None:
    g = host.granularity
    fd = os.memfd_create("not-an-export")
    try:
        os.ftruncate(fd, 2 * g)
        _assert_rejected_fd(host, fd, g, f"size must be the exported allocation's size, {2 * g}")
    finally:
        os.close(fd)


# --------------------------------------------------------------- address bound
def test_sizes_beyond_64_bits_rejected_before_any_driver_call(host: Device) -> None:
    g = host.granularity
    before = host.counters()
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("nbytes", lambda: vmmpool.reserve(1 << 64, host)),
        ("alignment", lambda: vmmpool.reserve(2 * g, host, alignment=1 << 64)),
        ("hint", lambda: vmmpool.reserve(2 * g, host, hint=1 << 64)),
        ("hint \\+ nbytes", lambda: vmmpool.reserve(4 * g, host, hint=host.address_limit + 1 - g)),
        ("nbytes", lambda: vmmpool.create(1 << 64, host)),
        ("max_size", lambda: GrowableBuffer(max_size=1 << 64, device=host)),
        ("limit", lambda: PagePool(host, limit=1 << 64)),
        ("nbytes", lambda: host.round_up(ADDRESS_LIMIT)),
        ("size", lambda: PhysicalAllocation.from_fd(0, 1 << 64, host)),
        ("capacity", lambda: Device.emulated(1 << 64)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name} must be <= "):
            call()
    # a hint off the granularity: refused up front (the driver may refuse it; the emulator rounded it)
    with pytest.raises(ValueError, match=f"^hint must be a multiple of {g}"):
        vmmpool.reserve(2 * g, host, hint=(1 << 40) + 12345)
    assert host.counters() == before


def test_device_address_limit_bounds_every_size(
    host: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend that can address 48 bits (Backend.address_limit is exclusive): the Python
    # layer uses its bound, inclusive.
    limit = (1 << 48) - 1
    monkeypatch.setattr(
        type(host._backend), "address_limit", property(lambda self: 1 << 48), raising=False
    )
    assert host.address_limit == limit == address_limit(host)
    g = host.granularity
    before = host.counters()
    for call in (
        lambda: vmmpool.reserve(1 << 48, host),
        lambda: vmmpool.create(1 << 48, host),
        lambda: vmmpool.reserve(2 * g, host, alignment=1 << 48),
        lambda: ArrayView(None, host, 1 << 48, 0),
    ):
        with pytest.raises(ValueError, match=f"must be <= {limit}"):
            call()
    assert host.counters() == before


def test_address_limit_defaults_and_check_int_bounds() -> None:
    class NoLimit:
        pass

    class MethodLimit:
        def address_limit(self) -> int:
            return 1 << 40

    assert address_limit(NoLimit()) == ADDRESS_LIMIT == (1 << 64) - 1
    assert address_limit(MethodLimit()) == (1 << 40) - 1  # the backend's bound is exclusive
    assert check_int("n", ADDRESS_LIMIT) == ADDRESS_LIMIT
    assert check_int("n", np.uint64(ADDRESS_LIMIT)) == ADDRESS_LIMIT
    with pytest.raises(ValueError, match="n must be <= 10"):
        check_int("n", 11, maximum=10)
    assert check_int("n", 1 << 70, maximum=None) == 1 << 70
    with pytest.raises(TypeError, match="floats are not accepted"):
        check_int("n", 2.0)


def test_stream_handles_beyond_64_bits_are_rejected() -> None:
    with pytest.raises(ValueError, match="fit 64 bits"):
        vmmpool.stream_key(1 << 64)
    with pytest.raises(ValueError, match="fit 64 bits"):
        vmmpool.stream_key(type("S", (), {"ptr": 1 << 200})())
    assert vmmpool.stream_key((1 << 64) - 1) == (1 << 64) - 1


class _Ptr:
    def __init__(self, ptr: object) -> None:
        self.ptr = ptr


class _Torch:
    def __init__(self, handle: object) -> None:
        self.cuda_stream = handle


class _Proto:
    def __init__(self, handle: object) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, object]:
        return (0, self.handle)


@pytest.mark.parametrize("handle", [3.9, True, "12", b"7", np.float64(2.0)])
@pytest.mark.parametrize("wrap", [lambda h: h, _Ptr, _Torch, _Proto], ids=["bare", "ptr", "torch", "proto"])
def test_stream_handles_follow_one_rule_integers_only(
    handle: object, wrap: Callable[[object], object]
) -> None:
    # Issue 17: a stream object's handle went through int() (3.9 -> 3, True -> 1, '12' -> 12)
    # while a bare float was refused.
    with pytest.raises(TypeError) as info:
        vmmpool.stream_key(wrap(handle))
    msg = str(info.value)
    assert "int" in msg and type(handle).__name__ in msg


@pytest.mark.parametrize("wrap", [lambda h: h, _Ptr, _Torch, _Proto], ids=["bare", "ptr", "torch", "proto"])
def test_stream_handles_accept_every_integer(wrap: Callable[[object], object]) -> None:
    for handle in (0, 7, np.uint64(9), np.int32(3), (1 << 64) - 1):
        assert vmmpool.stream_key(wrap(handle)) == int(handle)


def test_a_stream_objects_handle_none_is_refused() -> None:
    # None is the default stream only when passed bare (int(None) raised TypeError before too,
    # but named no attribute).
    with pytest.raises(TypeError, match=r"handle must be an int .*got NoneType .*from _Ptr\.ptr"):
        vmmpool.stream_key(_Ptr(None))


def test_error_messages_never_quote_a_huge_value_whole() -> None:
    # Issue 17: a 300k-key dict went whole into a message (2.9 million characters), and a
    # 5,000-digit int made the message itself fail ("Exceeds the limit (4300 digits)").
    huge = {i: i for i in range(300_000)}
    for bad in (huge, list(range(300_000)), "x" * 300_000):
        with pytest.raises(TypeError) as info:
            check_int("size", bad)
        assert len(str(info.value)) < 200, str(info.value)[:300]
        with pytest.raises(TypeError) as info:
            vmmpool.stream_key(_Ptr(bad))
        assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match=r"size must be <= .* got an int of 16610 bits") as exc:
        check_int("size", 10**5000)
    assert len(str(exc.value)) < 200
    with pytest.raises(ValueError, match="got an int of 16610 bits"):
        vmmpool.stream_key(10**5000)
    # The other validators that quote what they were given.
    long = "cuda:" + "x" * 300_000
    checks: list[tuple[type[Exception], Callable[[], object]]] = [
        (ValueError, lambda: Device(long)),
        (TypeError, lambda: Device(huge)),  # type: ignore[arg-type]
        (TypeError, lambda: Device.emulated(name=huge)),  # type: ignore[arg-type]
        (ValueError, lambda: vmmpool.Access.parse(long)),
        (ValueError, lambda: vmmpool.HandleType.parse(long)),
        (TypeError, lambda: ArrayView(None, Device("host"), 0, 0, "uint8", shape=huge)),  # type: ignore[arg-type]
        (TypeError, lambda: ArrayView(None, Device("host"), 0, 0, huge)),  # type: ignore[arg-type]
    ]
    for err, call in checks:
        with pytest.raises(err) as info:
            call()
        assert len(str(info.value)) < 400, str(info.value)[:500]


@pytest.mark.parametrize("limit", ["1e400", "nan", "9" * 5000])
def test_cli_demo_limit_huge_or_not_a_number_is_one_line_exit_2(limit: str) -> None:
    out = _cli("demo", "--device", "host", "--limit", limit)
    _one_line_error(out, "--limit")
    assert len(out.stderr) < 300


@pytest.mark.parametrize("command", [["info"], ["demo"], ["replay", "x.pickle"]])
def test_cli_a_huge_unknown_argument_is_cut_in_the_message(command: list[str]) -> None:
    out = _cli(*command, "--frobnicate" + "x" * 100_000, env=_HIDE_GPUS)
    _one_line_error(out, "unrecognized arguments", "characters)")
    assert len(out.stderr) < 500


def test_record_history_max_entries_is_bounded(host: Device) -> None:
    with PagePool(host, limit=8 * MiB) as pool:
        pool.record_history(max_entries=sys.maxsize)  # PyTorch's default: accepted
        for bad in (2**63, 10**5000):
            with pytest.raises(ValueError, match=r"max_entries must be <= 9223372036854775807"):
                pool.record_history(max_entries=bad)
        for kw in ({"enabled": "x" * 100_000}, {"context": "x" * 100_000}, {"stacks": "x" * 100_000}):
            with pytest.raises(ValueError) as info:
                pool.record_history(**kw)  # type: ignore[arg-type]
            assert len(str(info.value)) < 300
        pool.malloc(10).free()
        assert len(pool.memory_snapshot()["device_traces"][0]) >= 2  # the old history stays


def test_a_limit_below_one_page_is_rejected(host: Device) -> None:
    P = host.granularity
    for limit in (1, P - 1):
        with pytest.raises(ValueError, match="limit must be at least one page"):
            PagePool(host, limit=limit)
    with PagePool(host, limit=P) as pool:
        with pytest.raises(ValueError, match="limit must be at least one page"):
            pool.set_limit(3)
        assert pool.limit == P
    with pytest.raises(ValueError, match="larger than the device's memory"):
        PagePool(Device.emulated(capacity=4 * P), page_size=8 * P)


def test_max_size_beyond_the_device_names_max_size(host: Device) -> None:
    # It was refused by the reservation, as "nbytes must be <= ..." (no such argument).
    before = host.counters()
    for bad in (host.address_limit, host.address_limit + 1, (1 << 64) - 1):
        with pytest.raises(ValueError, match=r"^max_size must be <= "):
            GrowableBuffer(max_size=bad, device=host)
    assert host.counters() == before


def test_check_int_names_the_argument_when_index_is_refused() -> None:
    # A NumPy array (and numpy.bool) has __index__ but refuses it with NumPy's own message.
    for bad in (np.array([1, 2]), np.ones((2, 2), dtype=np.int64), np.True_):
        with pytest.raises(TypeError, match=r"^n must be an int, got "):
            check_int("n", bad)
    assert check_int("n", np.array(7)) == 7


def test_buffer_write_of_what_is_not_bytes_says_so(buf: GrowableBuffer) -> None:
    before = bytes(buf.read(16))
    for bad in ("text", 5, np.array(["2026-12-07"], dtype="datetime64[D]")):
        with pytest.raises(TypeError, match=r"^data must be a bytes-like object"):
            buf.write(bad)
    assert bytes(buf.read(16)) == before


def test_buffer_write_of_strided_arrays_copies_them_in_c_order(buf: GrowableBuffer) -> None:
    # Refused before ("casts are restricted to C-contiguous views"), though the docstring
    # promised anything with the buffer protocol.
    a = np.arange(40, dtype=np.uint16)
    for src in (a[::3], a.reshape(5, 8).T, memoryview(a.tobytes())[::2], np.asfortranarray(a.reshape(4, 10))):
        want = np.ascontiguousarray(src).tobytes() if isinstance(src, np.ndarray) else src.tobytes()
        buf.write(src, 8)
        assert bytes(buf.read(len(want), 8)) == want


def test_arguments_that_must_be_iterables_say_so(host: Device) -> None:
    # "'int' object is not iterable" named no argument.
    with pytest.raises(TypeError, match="peers must be an iterable of device ordinals"):
        PagePool(host, peers=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="peers must be an iterable of device ordinals"):
        PagePool(host, peers="01")  # type: ignore[arg-type]
    with PagePool(host) as pool:
        with pytest.raises(TypeError, match="pages must be an iterable of PhysicalAllocations"):
            pool.release_pages(None)  # type: ignore[arg-type]
    assert host.counters().live == (0, 0, 0)


def test_a_numpy_scalar_size_is_refused_with_its_value() -> None:
    # "got float64 (a float64)" named the type twice and hid the value the caller passed.
    with pytest.raises(TypeError, match=r"got float64 \(float64\(4096\.5\)\)"):
        check_int("nbytes", np.float64(4096.5))
    with pytest.raises(TypeError, match=r"got ndarray \(a ndarray\)"):
        check_int("nbytes", np.array([4096, 1]))  # an array shows no values

"""One grammar for every size a user types (issue 21): the parser, and each entry point
(``replay --limit``, ``demo --limit``, ``VMMPOOL_HOST_CAPACITY``, ``CUPY_GPU_MEMORY_LIMIT``,
the fragmentation benchmark's ``--limit``), and one error style for every CLI error."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vmmpool.replay as R
from vmmpool.__main__ import main
from vmmpool._demo import format_size
from vmmpool._sizes import MAX_CHARS, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
ROOT = Path(__file__).resolve().parents[1]

#: Every form of the grammar, with its value in bytes.
FORMS = [
    ("4096", 4096), ("4096B", 4096), ("4096 b", 4096), ("0", 0),
    ("512K", 512 * K), ("512k", 512 * K), ("64KiB", 64 * K), ("64kib", 64 * K), ("2KB", 2000),
    ("2kb", 2000),
    ("3M", 3 * M), ("3MiB", 3 * M), ("3MB", 3_000_000), ("3mB", 3_000_000), ("3mib", 3 * M),
    ("2G", 2 * G), ("2GiB", 2 * G), ("2GB", 2_000_000_000), ("2gib", 2 * G), ("2gb", 2_000_000_000),
    ("1T", T), ("1TiB", T), ("1TB", 10**12),
    ("1.5GiB", 3 * G // 2), ("1.5G", 3 * G // 2), ("1.5GB", 1_500_000_000), ("1.5 GB", 1_500_000_000),
    ("4 GiB", 4 * G), ("  4 GiB  ", 4 * G), ("4\tGiB", 4 * G), (".5M", M // 2), ("2.M", 2 * M),
    ("1_000_000", 10**6), ("1.3K", 1331),  # a fraction of a byte is rounded down
    ("18446744073709551615", 2**64 - 1),
]

#: Not sizes: what the message must say.
BAD = [
    ("", "expected a size"), ("lots", "expected a size"), ("1e9", "expected a size"),
    ("-4G", "expected a size"), ("+4G", "expected a size"), ("²M", "expected a size"),
    ("1.5X", "expected a size"), ("4 G B", "expected a size"), ("nan", "expected a size"),
    ("inf", "expected a size"), ("1..5G", "expected a size"), ("4EiB", "expected a size"),
    ("1 000", "expected a size"), ("_1", "expected a size"), ("4iB", "expected a size"),
    ("9" * 5000, "(str of 5000 characters)"), (" " * (MAX_CHARS + 1) + "1", "expected a size"),
    ("18446744073709551616", "below 2**64 bytes"), ("16777216TiB", "below 2**64 bytes"),
    ("99999999999999GB", "below 2**64 bytes"),
]


@pytest.mark.parametrize(("text", "expected"), FORMS)
def test_every_form_of_the_grammar(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "message"), BAD)
def test_what_is_not_a_size_is_one_short_clear_error(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert message in str(info.value) and len(str(info.value)) < 200
    assert "4096, 512MiB, 1.5GiB or 2GB" in str(info.value) or "2**64" in str(info.value)


def test_a_size_is_a_str() -> None:
    with pytest.raises(TypeError, match="a size must be a str, got int"):
        parse_size(4096)  # type: ignore[arg-type]


# --------------------------------------------------------------- replay --limit
#: The forms a limit takes (positive).
LIMITS = [(t, n) for t, n in FORMS if n > 0]


@pytest.mark.parametrize(("text", "expected"), LIMITS)
def test_replay_limit_takes_every_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: int
) -> None:
    trace = tmp_path / "t.pickle"
    trace.write_bytes(pickle.dumps({"segments": [], "device_traces": [[
        {"action": "alloc", "addr": 1 << 32, "size": 4096, "stream": 0},
        {"action": "free_completed", "addr": 1 << 32, "size": 4096, "stream": 0},
    ]]}))
    seen: list[Any] = []
    real = R.replay

    def spy(tr: Any, device: Any = None, limit: int | None = None, **kw: Any) -> Any:
        seen.append(limit)
        return real(tr, device, None, **kw)

    monkeypatch.setattr(R, "replay", spy)
    assert main(["replay", str(trace), "--limit", text]) == 0
    assert seen == [expected]


# ----------------------------------------------------------------- demo --limit
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "VMMPOOL_HOST_CAPACITY"}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "vmmpool", *args], capture_output=True, text=True,
                          timeout=300, env=full, check=False)


@pytest.mark.parametrize(("text", "expected"), [(t, n) for t, n in LIMITS if n > 64 * M])
def test_demo_limit_takes_every_form(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str, expected: int
) -> None:
    # The demo's check of the limit against the device's free memory quotes the value it parsed
    # (rounded down to whole 2 MiB granules); a 64 MiB device makes every form too big. (The
    # process's own host device may already exist, so VMMPOOL_HOST_CAPACITY cannot size it.)
    import vmmpool
    from vmmpool._demo import main as demo_main

    small = vmmpool.Device.emulated(capacity=64 * M)
    monkeypatch.setattr("vmmpool._demo.Device", lambda spec: small)
    assert demo_main(["--device", "host", "--limit", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m vmmpool demo: error: --limit "), err
    assert f"--limit {format_size(expected - expected % (2 * M))} is more than" in err, err


def test_demo_limit_gb_is_decimal_now() -> None:
    # Issue 21: the demo read "1.5GB" as 1.5 GiB; GB is decimal (1.4 GiB), GiB and G binary.
    out = _cli("demo", "--device", "host", "--limit", "1.5GB", env={"VMMPOOL_HOST_CAPACITY": "64M"})
    assert out.returncode == 2 and "--limit 1.4 GiB is more than" in out.stderr, out.stderr
    out = _cli("demo", "--device", "host", "--limit", "1.5 GiB", env={"VMMPOOL_HOST_CAPACITY": "64M"})
    assert out.returncode == 2 and "--limit 1.5 GiB is more than" in out.stderr, out.stderr


@pytest.mark.parametrize(("text", "message"), BAD)
@pytest.mark.parametrize("command", ["demo", "replay"])
def test_cli_limit_errors_are_one_line_in_argparse_style(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, text: str, message: str
) -> None:
    trace = [] if command == "demo" else [str(tmp_path / "never-read.pickle")]
    assert main([command, *trace, f"--limit={text}"]) == 2  # "--limit -4G" reads -4G as an option
    err = capsys.readouterr().err
    assert err.startswith(f"python -m vmmpool {command}: error: argument --limit: "), err
    assert message in err and len(err.splitlines()) == 1 and len(err) < 300, err


# ------------------------------------------------------- VMMPOOL_HOST_CAPACITY
@pytest.mark.parametrize(("text", "expected"), [(t, n) for t, n in FORMS if 2 * M <= n <= 1 << 47])
def test_host_capacity_takes_every_form(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: int
) -> None:
    from vmmpool._backends.host import default_capacity

    monkeypatch.setenv("VMMPOOL_HOST_CAPACITY", text)
    assert default_capacity() == expected - expected % (2 * M)


@pytest.mark.parametrize(("text", "message"), [*BAD[1:], ("1M", "from 2097152 bytes"), ("0", "from 2097152"),
                                               ("1PiB", "expected a size"), ("129TiB", "2**47")])
def test_host_capacity_errors(monkeypatch: pytest.MonkeyPatch, text: str, message: str) -> None:
    # BAD[0], the empty string, means "not set" here.
    from vmmpool._backends.host import default_capacity

    monkeypatch.setenv("VMMPOOL_HOST_CAPACITY", text)
    with pytest.raises(ValueError, match="VMMPOOL_HOST_CAPACITY must be a size from") as info:
        default_capacity()
    assert len(str(info.value)) < 250
    if "characters" in message:
        assert message in str(info.value)


@pytest.mark.parametrize(("text", "shown"), [("300 MB", "286 MiB total"), ("1.5GiB", "1,536 MiB total"),
                                             ("256m", "256 MiB total")])
def test_info_shows_the_host_capacity_of_every_form(text: str, shown: str) -> None:
    out = _cli("info", env={"VMMPOOL_HOST_CAPACITY": text, "CUDA_VISIBLE_DEVICES": "",
                            "STANDIN_CUDA_DEVICES": "0"})
    assert out.returncode == 0 and shown in out.stdout, (out.stdout, out.stderr)


# ------------------------------------------------------- CUPY_GPU_MEMORY_LIMIT
@pytest.mark.parametrize(("text", "expected"), [*FORMS, ("50%", 50), ("12.5%", 12), (" 100 % ", 100),
                                                ("0%", 0)])
def test_cupy_limit_takes_every_form(text: str, expected: int) -> None:
    pytest.importorskip("cupy")
    import vmmpool.cupy as vcupy
    assert vcupy.parse_limit(text, 100) == expected


@pytest.mark.parametrize("text", [b for b, _ in BAD] + ["101%", "-5%", "5K%", "%"])
def test_cupy_limit_errors(text: str) -> None:
    pytest.importorskip("cupy")
    import vmmpool.cupy as vcupy
    with pytest.raises(ValueError, match=r"memory limit must be a size such as .* or a percentage") as info:
        vcupy.parse_limit(text, 100)
    assert len(str(info.value)) < 250


# ------------------------------------------------------ the benchmarks' sizes
def test_fragmentation_benchmark_limit_uses_the_grammar() -> None:
    script = ROOT / "benchmarks" / "fragmentation.py"
    out = subprocess.run([sys.executable, str(script), "--limit", "1.5X"], capture_output=True,
                         text=True, timeout=120, check=False, cwd=ROOT)
    assert out.returncode == 2 and "expected a size such as 4096, 512MiB" in out.stderr, out.stderr


# ------------------------------------------------------------ CLI error style
def test_device_advice_is_for_the_cli(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmpool._errors import DeviceUnavailableError

    def unavailable(spec: object = None) -> Any:
        raise DeviceUnavailableError("cuda:0", "no GPU here")

    monkeypatch.setattr("vmmpool._demo.Device", unavailable)
    assert main(["demo", "--device", "cuda:0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "python -m vmmpool demo: error: device 'cuda:0' is unavailable: no GPU here; pass --device "
        "host for the host emulator, which runs the same code on Linux virtual memory without a GPU\n"
    )
    assert "vmmpool.Device(" not in err


@pytest.mark.parametrize(("argv", "prefix"), [
    (["frobnicate"], "python -m vmmpool: error: argument command: invalid choice"),
    (["info", "extra"], "python -m vmmpool info: error: unrecognized arguments: extra"),
    (["demo", "--frobnicate"], "python -m vmmpool demo: error: unrecognized arguments"),
    (["demo", "--live-fraction", "2"], "python -m vmmpool demo: error: --live-fraction must be in"),
    (["demo", "--seed", "x"], "python -m vmmpool demo: error: argument --seed: invalid int value"),
    (["replay"], "python -m vmmpool replay: error: the following arguments are required"),
])
def test_every_cli_error_is_one_line_in_argparse_style(
    capsys: pytest.CaptureFixture[str], argv: list[str], prefix: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err

"""Build the stand-in ``libcuda.so.1`` (``standin_cuda.c``) with the system C compiler.

``build(directory)`` compiles once into `directory` and returns the library's
path; :func:`unavailable_reason` says why it cannot be built here (no C
compiler, not Linux), or ``None``. Run as a script, it builds into the given
directory (default: a fresh temporary one) and prints the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("standin_cuda.c")
LIBRARY = "libcuda.so.1"


def compiler() -> str | None:
    """Return the C compiler to use (``$CC``, else ``cc``, ``gcc``, ``clang``), or ``None``."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def unavailable_reason() -> str | None:
    """Why the stand-in driver cannot be built on this machine, or ``None``."""
    if not sys.platform.startswith("linux"):
        return f"the stand-in CUDA driver needs Linux (memfd, mmap), this is {sys.platform}"
    if compiler() is None:
        return "no C compiler (cc, gcc or clang; or $CC) to build the stand-in CUDA driver"
    return None


def build(directory: str | os.PathLike[str]) -> Path:
    """Compile the stand-in into `directory` (once) and return the library path.

    Raises
    ------
    RuntimeError
        When the machine cannot build it (see :func:`unavailable_reason`) or the
        compiler fails; the message carries the compiler's output.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    out = Path(directory) / LIBRARY
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{LIBRARY}.{os.getpid()}")
    cmd = [
        str(compiler()),
        "-std=c11",
        "-O1",
        "-g",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-Wl,-soname," + LIBRARY,
        "-o",
        str(tmp),
        str(SOURCE),
        "-lpthread",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the stand-in CUDA driver failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1].startswith("-")):
        # ("--help" was taken for a directory name, and a library built into ./--help/)
        print(f"usage: python {sys.argv[0]} [DIRECTORY]\n\n{__doc__}", file=sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="standin-cuda-")
    print(build(target))

#!/usr/bin/env bash
# The GPU check: the whole test suite with CUDA tests REQUIRED (a "no GPU"
# skip becomes a failure: VMMPOOL_REQUIRE_CUDA=1), the demo on cuda:0, then
# every benchmark on cuda:0 beside its peers.
# Meant for a machine with an NVIDIA GPU and the packages preinstalled
# (cuda-bindings, cupy, numpy, pytest, hypothesis, torch); it installs
# nothing and uses the working tree through PYTHONPATH. Uses `python`, or
# `python3` where there is no `python` ($PYTHON overrides both).
#
# Time: everything runs under one budget (GPU_CHECK_BUDGET_S, default 570 s,
# so the check ends inside 10 minutes): the tests get at most 300 s, each
# benchmark a share of what is left; a benchmark that runs out of its share
# is rerun with --quick, and the summary says which mode produced it.
#
# Output under $OUT (default: ./gpu-check-out): env.txt, pytest.log,
# junit.xml, torch.log (vmmpool.torch: PyTorch on the pool, verbose), demo.log, bench-<name>.log, <name>-cuda.json, and summary.json:
# device, driver, versions, pass/fail/skip/error counts, every benchmark's
# figures, per-step status and seconds. Benchmark JSON is also written to
# benchmarks/results/ (files named *-cuda.json).
set -uo pipefail
# $VMMPOOL_TRACES names a directory from where the check was started: resolved
# before the cd below (a relative one was looked up under the repository and,
# not found there, its traces were skipped without a word).
if [ -n "${VMMPOOL_TRACES:-}" ]; then
  traces_dir=$VMMPOOL_TRACES
  VMMPOOL_TRACES=$(cd -- "$traces_dir" 2>/dev/null && pwd) || {
    echo "gpu_check: VMMPOOL_TRACES=$traces_dir is not a directory" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VMMPOOL_REQUIRE_CUDA=1
# tests/test_torch.py's training test fails (not skips) without torch here.
export VMMPOOL_REQUIRE_TORCH=1
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
START=$(date +%s)
status=0

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python
  elif command -v python3 >/dev/null 2>&1; then PY=python3
  else echo "gpu_check: neither python nor python3 found" >&2; exit 2
  fi
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap N: the smaller of N and the time left (at least 1)
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }

STEPS="$OUT/steps.tsv"   # name, rc, seconds, mode
: > "$STEPS"
step() {  # step NAME MODE SECONDS RC
  printf '%s\t%s\t%s\t%s\n' "$1" "$4" "$3" "$2" >> "$STEPS"
}

{
  date -u
  nvidia-smi 2>&1 | head -20
  "$PY" - <<'PY'
import sys
print("python", sys.version)
for name in ("numpy", "cupy", "torch", "cuda.bindings", "hypothesis", "pytest"):
    try:
        mod = __import__(name, fromlist=["_"])
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:  # report only
        print(name, "unavailable:", e)
PY
  "$PY" -m vmmpool info
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== tests (CUDA required) =="
t0=$(date +%s)
timeout "$(cap 300)" "$PY" -m pytest -ra -p no:cacheprovider --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
step tests full $(( $(date +%s) - t0 )) "$rc"
[ "$rc" -eq 0 ] || status=1

echo "== PyTorch on the pool (vmmpool.torch, verbose) =="
t0=$(date +%s)
timeout "$(cap 120)" "$PY" -m pytest -v -ra -p no:cacheprovider tests/test_torch.py \
  -o log_cli=true --log-cli-level=INFO 2>&1 | tee "$OUT/torch.log"
rc=${PIPESTATUS[0]}
step torch full $(( $(date +%s) - t0 )) "$rc"
[ "$rc" -eq 0 ] || status=1

echo "== demo on cuda:0 =="
t0=$(date +%s)
timeout "$(cap 60)" "$PY" -m vmmpool demo --device cuda:0 2>&1 | tee "$OUT/demo.log"
rc=${PIPESTATUS[0]}
step demo full $(( $(date +%s) - t0 )) "$rc"
[ "$rc" -eq 0 ] || status=1

benches=()
for bench in benchmarks/*.py; do
  case "$(basename "$bench")" in _*) continue ;; esac
  benches+=("$bench")
done
n=${#benches[@]}
for bench in "${benches[@]}"; do
  name=$(basename "$bench" .py)
  share=$(( $(left) / (n > 0 ? n : 1) ))
  [ "$share" -lt 5 ] && share=5
  # The replay benchmark takes traces: the generated ones, and the snapshots in
  # $VMMPOOL_TRACES (a directory of *.pickle, not part of the project) when set.
  extra=()
  if [ "$name" = replay ]; then
    extra=(--synthetic)
    if [ -n "${VMMPOOL_TRACES:-}" ]; then
      for t in "$VMMPOOL_TRACES"/*.pickle; do [ -f "$t" ] && extra+=("$t"); done
      [ "${#extra[@]}" -gt 1 ] || echo "gpu_check: no *.pickle in $VMMPOOL_TRACES" >&2
    fi
  fi
  echo "== benchmark $name on cuda:0 (at most ${share}s) =="
  t0=$(date +%s)
  mode=full
  timeout "$(cap "$share")" "$PY" "$bench" ${extra[@]+"${extra[@]}"} --device cuda:0 --output "$OUT/$name-cuda.json" 2>&1 | tee "$OUT/bench-$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] && [ "$(left)" -gt 10 ]; then
    echo "== benchmark $name: out of time, rerun with --quick =="
    mode=quick
    timeout "$(cap "$share")" "$PY" "$bench" ${extra[@]+"${extra[@]}"} --device cuda:0 --quick --output "$OUT/$name-cuda.json" 2>&1 | tee -a "$OUT/bench-$name.log"
    rc=${PIPESTATUS[0]}
  fi
  step "bench-$name" "$mode" $(( $(date +%s) - t0 )) "$rc"
  [ "$rc" -eq 0 ] || status=1
  [ -f "$OUT/$name-cuda.json" ] && cp "$OUT/$name-cuda.json" benchmarks/results/ 2>/dev/null
  n=$(( n - 1 ))
done

OUT="$OUT" STATUS="$status" "$PY" - <<'PY' || status=1
import json, os, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])
summary = {"status": "pass" if os.environ["STATUS"] == "0" else "fail"}

def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # report only
        return f"unavailable: {e}"

summary["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
versions = {"python": sys.version.split()[0]}
for name in ("vmmpool", "numpy", "cupy", "torch", "cuda.bindings", "pytest", "hypothesis"):
    try:
        mod = __import__(name, fromlist=["_"])
        versions[name] = str(getattr(mod, "__version__", "?"))
    except Exception as e:  # report only
        versions[name] = f"unavailable: {e}"
summary["versions"] = versions
try:
    import vmmpool
    from cuda.bindings import driver

    dev = vmmpool.Device(0)
    err, ver = driver.cuDriverGetVersion()
    summary["device"] = {"name": dev.name, "total_memory": dev.total_memory,
                         "granularity": dev.granularity, "supports_posix_fd": dev.supports_posix_fd}
    summary["driver_cuda_version"] = int(ver) if not int(err) else None
except Exception as e:  # report only
    summary["device"] = f"unavailable: {e}"

counts = {"tests": 0, "passed": 0, "failures": 0, "errors": 0, "skipped": 0}
junit = out / "junit.xml"
if junit.exists():
    root = ET.parse(junit).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None
    ]
else:
    counts["note"] = "no junit.xml (the test run did not finish)"
summary["tests"] = counts

steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, mode = line.split("\t")
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "mode": mode,
                  "timed_out": rc in ("124", "137")})
summary["steps"] = steps
summary["benchmarks"] = {
    p.name[: -len("-cuda.json")]: json.loads(p.read_text()) for p in sorted(out.glob("*-cuda.json"))
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("status", "tests", "steps")}, indent=2))
PY
echo "gpu_check status: $status (summary: $OUT/summary.json)"
exit $status

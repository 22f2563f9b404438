#!/usr/bin/env bash
# The GPU check: the GPU tests with CUDA REQUIRED (a "no GPU" skip becomes a
# failure: VMMPOOL_REQUIRE_CUDA=1), then the other tests, the demo on cuda:0,
# then every benchmark on cuda:0 beside its peers.
# Meant for a machine with an NVIDIA GPU and the packages preinstalled
# (cuda-bindings, cupy, numpy, pytest, hypothesis, torch); it installs
# nothing and uses the working tree through PYTHONPATH. Uses `python`, or
# `python3` where there is no `python` ($PYTHON overrides both).
#
# Time: everything runs under one budget (GPU_CHECK_BUDGET_S, default 570 s,
# so the check ends inside 10 minutes). Tests get at most 300 s: first the
# cuda-marked tests (at most 240 s), then the others (host emulator, what CI
# already runs) with what is left of the 300 s; they may not all run (mode
# "partial", not a failure). Tests run through scripts/gpu_tests.py: a test
# that crashes the interpreter or hangs (more than 180 s) is recorded and the
# rest still run. Benchmarks: every one with --quick first (each a share of
# the time left), then, while time is left, again in full (its JSON replaces
# the quick one only when the full run ends in time); the summary says which
# mode produced each.
#
# Settings: GPU_CHECK_DEVICE (default cuda:0) for the demo and benchmarks,
# GPU_CHECK_PYTEST_ARGS (extra pytest arguments for both test runs, split on spaces,
# e.g. "-k test_events").
# A dry run on a machine without a GPU: GPU_CHECK_DEVICE=host
# VMMPOOL_REQUIRE_CUDA=0 VMMPOOL_REQUIRE_TORCH=0 scripts/gpu_check.sh
#
# Output under $OUT (default: ./gpu-check-out): env.txt, pytest-cuda.log and
# pytest.log (with cuda-tests.json / rest-tests.json: counts and every test
# that failed, crashed or hung; junit-*.xml; hang-*.txt stacks),
# torch.log (vmmpool.torch: PyTorch on the pool, verbose), demo.log,
# bench-<name>.log, <name>-cuda.json, and summary.json: device, driver,
# versions, test counts, every benchmark's figures, per-step status, mode and
# seconds. Benchmark JSON is also written to benchmarks/results/ (files named
# *-cuda.json).
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
export VMMPOOL_REQUIRE_CUDA="${VMMPOOL_REQUIRE_CUDA-1}"
# tests/test_torch.py's training test fails (not skips) without torch here.
export VMMPOOL_REQUIRE_TORCH="${VMMPOOL_REQUIRE_TORCH-1}"
DEVICE="${GPU_CHECK_DEVICE:-cuda:0}"
read -r -a EXTRA_PYTEST <<< "${GPU_CHECK_PYTEST_ARGS:-}"
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

TESTS_START=$(date +%s)
echo "== tests on the GPU (cuda-marked; CUDA required) =="
t0=$(date +%s)
b=$(cap 240)
timeout $(( b + 60 )) "$PY" scripts/gpu_tests.py --out "$OUT" --name cuda --budget "$b" --per-test 180 -- \
  -v -ra -m cuda ${EXTRA_PYTEST[@]+"${EXTRA_PYTEST[@]}"} 2>&1 | tee "$OUT/pytest-cuda.log"
rc=${PIPESTATUS[0]}
step tests-cuda full $(( $(date +%s) - t0 )) "$rc"
[ "$rc" -eq 0 ] || status=1

echo "== the other tests (host emulator; partial if out of time) =="
t0=$(date +%s)
rest=$(( 300 - (t0 - TESTS_START) ))
if [ "$rest" -ge 30 ]; then
  b=$(cap "$rest")
  # The stand-in driver suite is CPU only (CI runs it) and takes over a minute.
  timeout $(( b + 60 )) "$PY" scripts/gpu_tests.py --out "$OUT" --name rest --budget "$b" --per-test 180 -- \
    -q -ra -m "not cuda" --ignore=tests/test_standin_suite.py ${EXTRA_PYTEST[@]+"${EXTRA_PYTEST[@]}"} \
    2>&1 | tee "$OUT/pytest.log"
  rc=${PIPESTATUS[0]}
  mode=full
  if [ "$rc" -eq 124 ]; then mode=partial; else [ "$rc" -eq 0 ] || status=1; fi
  step tests-rest "$mode" $(( $(date +%s) - t0 )) "$rc"
else
  echo "(no time left for them)"
  step tests-rest skipped 0 0
fi

echo "== PyTorch on the pool (vmmpool.torch, verbose) =="
t0=$(date +%s)
timeout "$(cap 120)" "$PY" -m pytest -v -ra -p no:cacheprovider tests/test_torch.py \
  -o log_cli=true --log-cli-level=INFO 2>&1 | tee "$OUT/torch.log"
rc=${PIPESTATUS[0]}
step torch full $(( $(date +%s) - t0 )) "$rc"
[ "$rc" -eq 0 ] || status=1

echo "== demo on $DEVICE =="
t0=$(date +%s)
timeout "$(cap 60)" "$PY" -m vmmpool demo --device "$DEVICE" 2>&1 | tee "$OUT/demo.log"
rc=${PIPESTATUS[0]}
step demo full $(( $(date +%s) - t0 )) "$rc"
[ "$rc" -eq 0 ] || status=1

# Cheapest first: each quick run gets a share of the time left, so the costly ones
# (fragmentation starts PyTorch twice; replay searches limits) get what the others left.
ORDER="alloc_latency cupy_pool host_scale sleep growth replay fragmentation"
benches=()
for name in $ORDER; do
  [ -f "benchmarks/$name.py" ] && benches+=("benchmarks/$name.py")
done
for bench in benchmarks/*.py; do
  case "$(basename "$bench")" in _*) continue ;; esac
  case " $ORDER " in *" $(basename "$bench" .py) "*) continue ;; esac
  benches+=("$bench")
done
# The arguments of benchmark $1 besides --device/--quick/--output.
bench_args() {
  BARGS=()
  if [ "$1" = replay ]; then
    # The generated traces, and the snapshots in $VMMPOOL_TRACES (a directory of
    # *.pickle, not part of the project) when set.
    BARGS=(--synthetic)
    if [ -n "${VMMPOOL_TRACES:-}" ]; then
      for t in "$VMMPOOL_TRACES"/*.pickle; do [ -f "$t" ] && BARGS+=("$t"); done
      [ "${#BARGS[@]}" -gt 1 ] || echo "gpu_check: no *.pickle in $VMMPOOL_TRACES" >&2
    fi
  fi
}
SUMMARY_RESERVE=20  # seconds kept for the summary at the end

# Pass 1: every benchmark with --quick (a result from each), a share of the time left each.
n=${#benches[@]}
for bench in "${benches[@]}"; do
  name=$(basename "$bench" .py)
  bench_args "$name"
  share=$(( ($(left) - SUMMARY_RESERVE) / (n > 0 ? n : 1) ))
  [ "$share" -lt 5 ] && share=5
  echo "== benchmark $name on $DEVICE, --quick (at most ${share}s) =="
  t0=$(date +%s)
  timeout "$(cap "$share")" "$PY" "$bench" ${BARGS[@]+"${BARGS[@]}"} --device "$DEVICE" --quick \
    --output "$OUT/$name-cuda.json" 2>&1 | tee "$OUT/bench-$name.log"
  rc=${PIPESTATUS[0]}
  step "bench-$name" quick $(( $(date +%s) - t0 )) "$rc"
  [ "$rc" -eq 0 ] || status=1
  n=$(( n - 1 ))
done

# Pass 2: full runs while time is left; a full run's JSON replaces the quick one only
# when it ends in time (a full run out of time is not a failure: the quick figures stand).
for bench in "${benches[@]}"; do
  name=$(basename "$bench" .py)
  avail=$(( $(left) - SUMMARY_RESERVE ))
  if [ "$avail" -lt 30 ]; then
    step "bench-$name-full" skipped 0 0
    continue
  fi
  bench_args "$name"
  echo "== benchmark $name on $DEVICE, full (at most ${avail}s) =="
  t0=$(date +%s)
  rm -f "$OUT/$name-cuda-full.json"
  timeout "$avail" "$PY" "$bench" ${BARGS[@]+"${BARGS[@]}"} --device "$DEVICE" \
    --output "$OUT/$name-cuda-full.json" 2>&1 | tee -a "$OUT/bench-$name.log"
  rc=${PIPESTATUS[0]}
  mode=full
  if [ "$rc" -eq 0 ]; then
    # (A benchmark with nothing to measure on this device exits 0 and writes nothing.)
    [ -f "$OUT/$name-cuda-full.json" ] && mv "$OUT/$name-cuda-full.json" "$OUT/$name-cuda.json"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    mode="full (out of time; quick figures kept)"
  else
    status=1
  fi
  step "bench-$name-full" "$mode" $(( $(date +%s) - t0 )) "$rc"
done
for bench in "${benches[@]}"; do
  name=$(basename "$bench" .py)
  [ -f "$OUT/$name-cuda.json" ] && cp "$OUT/$name-cuda.json" benchmarks/results/ 2>/dev/null
done

OUT="$OUT" STATUS="$status" "$PY" - <<'PY' || status=1
import json, os, subprocess, sys
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

tests = {}
for name in ("cuda", "rest"):
    path = out / f"{name}-tests.json"
    if not path.exists():
        tests[name] = {"note": f"no {path.name} (the run did not start or was killed)"}
        continue
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:  # report only
        tests[name] = {"note": f"{path.name} unreadable: {e}"}
        continue
    tests[name] = {k: doc.get(k) for k in ("counts", "not_passed", "timed_out", "running_at_deadline",
                                           "problems_outside_tests", "seconds")}
summary["tests"] = tests

steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, mode = line.split("\t")
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "mode": mode,
                  "timed_out": rc in ("124", "137")})
summary["steps"] = steps
benchmarks = {}
for p in sorted(out.glob("*-cuda.json")):
    try:
        benchmarks[p.name[: -len("-cuda.json")]] = json.loads(p.read_text())
    except ValueError as e:  # report only: a run killed while writing
        benchmarks[p.name[: -len("-cuda.json")]] = {"unreadable": str(e)}
summary["benchmarks"] = benchmarks
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("status", "tests", "steps")}, indent=2))
PY
echo "gpu_check status: $status (summary: $OUT/summary.json)"
exit $status

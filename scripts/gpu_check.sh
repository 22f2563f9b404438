#!/usr/bin/env bash
# The GPU check: the whole test suite with CUDA tests REQUIRED (a "no GPU"
# skip becomes a failure), then every benchmark on cuda:0 beside its peers.
# Meant for a machine with an NVIDIA GPU and the packages preinstalled
# (cuda-bindings, cupy, numpy, pytest, hypothesis, torch); it installs
# nothing and uses the working tree through PYTHONPATH.
#
# Logs and JSON go under $OUT (default: ./gpu-check-out); benchmark JSON is
# also written to benchmarks/results/ (files named *-cuda.json).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VMMPOOL_REQUIRE_CUDA=1
status=0

{
  date -u
  nvidia-smi 2>&1 | head -20
  python - <<'PY'
import sys, platform
print("python", sys.version)
for name in ("numpy", "cupy", "torch", "cuda.bindings", "hypothesis", "pytest"):
    try:
        mod = __import__(name, fromlist=["_"])
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:  # report only
        print(name, "unavailable:", e)
PY
  python -m vmmpool info
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== tests (CUDA required) =="
python -m pytest -ra -p no:cacheprovider --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== demo on cuda:0 =="
python -m vmmpool demo --device cuda:0 2>&1 | tee "$OUT/demo.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for bench in benchmarks/*.py; do
  case "$(basename "$bench")" in _*) continue ;; esac
  name=$(basename "$bench" .py)
  echo "== benchmark $name on cuda:0 =="
  python "$bench" --device cuda:0 2>&1 | tee "$OUT/bench-$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
cp benchmarks/results/*-cuda*.json "$OUT/" 2>/dev/null || true
echo "gpu_check status: $status"
exit $status

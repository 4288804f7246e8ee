#!/usr/bin/env bash
# The GPU check: build, CUDA tests, compute-sanitizer, GPU benchmark — one command.
#
#   bash bench/gpu_check.sh OUTDIR [extra args for python -m bench, e.g. --quick]
#   GPU_CHECK_SKIP="tune bench" bash bench/gpu_check.sh OUTDIR   # leave steps out (a re-check)
#   GPU_CHECK_PROFILE=1 bash bench/gpu_check.sh OUTDIR           # add Nsight Compute (profile_cases.py)
#                                                                # and the host's time per call (host_cost.py)
#   GPU_CHECK_BUDGET_S=560 bash bench/gpu_check.sh OUTDIR        # end within 560 s (benchmark cut short)
#   GPU_CHECK_TUNE_ARGS="--parts norm,fc" bash bench/gpu_check.sh OUTDIR  # a shorter tune
#   GPU_CHECK_TUNE_S=200 bash bench/gpu_check.sh OUTDIR          # the tune's time limit (150 s)
#
# Needs python3 with torch (CUDA), nvcc, cmake, ninja, pytest; no network. Writes into
# OUTDIR few files (a lent GPU machine returns at most 8): gpu_check.log (every step's
# output, in order), tests.xml, tune.json (bench/tune.py: the kernels' alternative
# strategies side by side), and the benchmark's JSON / markdown / PNG plots. Prints a
# short table last. Exit status: the number of failed steps.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [bench args]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
: > "$LOG"
declare -a SUMMARY
failed=0
step() {  # step NAME CMD...; GPU_CHECK_SKIP="tune bench" leaves out the steps named
  local name=$1; shift
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    SUMMARY+=("$(printf '%-10s skipped (GPU_CHECK_SKIP)' "$name")")
    return 0
  fi
  local t0=$SECONDS
  echo "===== $name: $*" >> "$LOG"
  "$@" >> "$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  echo "===== $name: rc=$rc after $((SECONDS - t0))s" >> "$LOG"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return $rc
}

# Wheels carried in .whl/ (no network there; e.g. Liger-Kernel for the benchmark's liger
# baseline: `pip download --no-deps liger-kernel==0.8.5 -d .whl` here, then carry .whl)
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/eagle3_wheels .whl/*.whl && export PYTHONPATH=/tmp/eagle3_wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# Build for this card's architecture only (EAGLE3_CUDA_ARCH_LIST overrides), with every core.
if [ -z "${EAGLE3_CUDA_ARCH_LIST:-}" ]; then
  EAGLE3_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
  export EAGLE3_CUDA_ARCH_LIST
fi
export MAX_JOBS=$(nproc) EAGLE3_WITH_CUDA=ON
step env bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; nvcc --version | tail -2; echo \"commit: \${EAGLE3_COMMIT:-\$(git rev-parse HEAD 2>/dev/null || echo unknown)}\""
if ! step build $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
  # the plain CMake build of the same CMakeLists.txt, copied where the package loads it from
  SUFFIX=$($PY -c 'import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])')
  step build-cmake bash -c "cmake -S . -B build/gpu -G Ninja -DPython3_EXECUTABLE=$(command -v $PY) -DEAGLE3_WITH_CUDA=ON && cmake --build build/gpu -j $MAX_JOBS && cp build/gpu/_C.so eagle3_ops/_C$SUFFIX" \
    && failed=$((failed - 1))  # the fallback stands in for the failed build
fi
step kernels $PY -c "import eagle3_ops; assert eagle3_ops.has_cuda_kernels(), 'built without CUDA kernels'; print('CUDA kernels loaded')"
# the C++ runtime the library links (a static libstdc++ copy once crashed every error
# message holding a number; see CMakeLists.txt)
step runtime bash -c "readelf -d eagle3_ops/_C*.so | grep -E 'NEEDED.*(stdc|gcc|gomp)'; \
  echo \"exported libstdc++ symbols: \$(nm -D --defined-only eagle3_ops/_C*.so | grep -c ' _ZNSt6locale')\"; \
  \${CXX:-g++} --version | head -1; \${CXX:-g++} -print-file-name=libstdc++.so"
command -v cuobjdump >/dev/null && step resources bash -c "cuobjdump --dump-resource-usage eagle3_ops/_C*.so | grep -E 'Function|REG' | paste - - | sed -E 's/Function ([^:]{0,90})[^:]*:/\\1/'"

XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
# The tensor-core fc kernels' graph tests and the wgmma kernel (the least tried code) in
# their own step, first: a failure there (a trap leaves the process's CUDA context
# unusable) cannot take the other tests' results with it. When they fail,
# bench/diagnose_wgmma.py shows where the wgmma kernel goes wrong (operand k orders,
# token / feature order, scales) for the next session to read off the log.
step tests-tc timeout 90 $PY -m pytest python_tests -m cuda -q -p no:cacheprovider $XDIST -k "(wgmma or tensor_cores) and not c2 and not mma-sk" \
  || { export EAGLE3_TUNE_NO_SPLIT_K=1; step diagnose timeout 40 $PY bench/diagnose_wgmma.py; }
# the split-k mma.sync fc kernel (clusters) in its own step; if it fails, the tune leaves it out
step tests-sk timeout 90 $PY -m pytest python_tests -m cuda -q -p no:cacheprovider $XDIST -k "splitk or mma-sk" \
  || export EAGLE3_TUNE_NO_MMA_SK=1
# the wgmma kernel in clusters of two (TMA multicast) in its own step;
# if it fails, the tune leaves its variants out (a trap would end the tune's process)
step tests-c2 timeout 60 $PY -m pytest python_tests -m cuda -q -p no:cacheprovider $XDIST -k "c2" \
  || export EAGLE3_TUNE_NO_CLUSTER=1
step tune timeout ${GPU_CHECK_TUNE_S:-150} $PY -m bench.tune --out "$OUT/tune.json" ${GPU_CHECK_TUNE_ARGS:-}
step tests timeout 150 $PY -m pytest python_tests -m cuda -q -p no:cacheprovider $XDIST -k "not wgmma and not tensor_cores and not splitk" --junitxml="$OUT/tests.xml"
# Nsight Compute on the cases the benchmark leaves unexplained (bench/profile_cases.py);
# about a minute, so only with GPU_CHECK_PROFILE=1
[ -n "${GPU_CHECK_PROFILE:-}" ] && command -v ncu >/dev/null && step profile timeout 120 ncu --profile-from-start off --nvtx --clock-control none \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
  --section WarpStateStats $PY bench/profile_cases.py
# the host's time per call of the fc and its parts (bench/host_cost.py), with the profile
[ -n "${GPU_CHECK_PROFILE:-}" ] && step host timeout 60 $PY bench/host_cost.py "$OUT/host_cost.json"
step memcheck timeout 70 compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitize_cases.py
step racecheck timeout 50 compute-sanitizer --tool racecheck --error-exitcode 1 $PY bench/sanitize_cases.py --one

# The benchmark last: it writes the rows measured so far when its time limit stops it.
# GPU_CHECK_BUDGET_S (the whole script's seconds, e.g. a lent machine's call limit) shortens
# that limit so the script ends, with the benchmark's partial rows written, inside it.
BENCH_S=280
if [ -n "${GPU_CHECK_BUDGET_S:-}" ]; then
  left=$((GPU_CHECK_BUDGET_S - SECONDS - 15))
  [ "$left" -lt "$BENCH_S" ] && BENCH_S=$(( left > 10 ? left : 10 ))
fi
step bench timeout $BENCH_S $PY -m bench --device cuda --out "$OUT" "$@"

echo
echo "== gpu_check summary"
printf '%s\n' "${SUMMARY[@]}"
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$LOG" | grep -E " in [0-9.]+s" | tail -4  # tests-tc, -sk, -c2, tests
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_cases:|diagnose_wgmma:" "$LOG"
sed -n '/^===== tune: /,/^===== tune: rc/p' "$LOG" | grep -E " copy [0-9]"
sed -n '/^| op | T | H | fastest/,/^===== tune: rc/p' "$LOG" | grep -E "^\|"  # the tune's per-case summary
md=$(ls "$OUT"/*.md 2>/dev/null | head -1)
[ -n "$md" ] && sed -n '/^## Summary/,/^## Every/p' "$md" | grep -E "^\|" | cut -c1-160
exit $failed

#!/usr/bin/env bash
# One full GPU session on a lent device machine (README, "Benchmarks"), in one call:
# build against that machine's torch, run the whole test suite (GPU tests included), the
# demo, the numerics report and the benchmark report; everything lands in $OUT (default ./gpu-out).
# A device call is limited to 10 minutes: split the work over two calls with STEPS, e.g.
#   STEPS="tests demo numerics" bash scripts/gpu_session.sh   then   STEPS=bench bash scripts/gpu_session.sh
# (each call builds first; BENCH_ARGS=--quick shortens the report).
#
# Wheels the machine lacks travel in .whl/ (git-ignored), fetched here beforehand with
#   bash scripts/gpu_session.sh --fetch-wheels
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  python3 -m pip download --no-deps $plat -d .whl "kernels==0.17.2" "transformers==5.22.2" liger-kernel \
    kernel-abi-check
  exit $?
fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
} 2>&1 | tee "$OUT/env.txt"
export ROTARY_KERNELS_CUDA_ARCHS=${ROTARY_KERNELS_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.txt"
STEPS=${STEPS:-tests demo numerics bench}
for step in $STEPS; do
  SECONDS=0
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tee "$OUT/tests.txt" | tail -15 ;;
    demo) python3 -m rotary_kernels.demo 2>&1 | tee "$OUT/demo.txt" ;;
    numerics) python3 benchmarks/numerics.py --out "$OUT/numerics-cuda" 2>&1 | tail -2 ;;
    bench) python3 benchmarks/bench.py --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tail -5 ;;
    *) echo "unknown step $step (tests, demo, numerics, bench)" ;;
  esac
  echo "step $step: ${SECONDS}s" | tee -a "$OUT/env.txt"
done

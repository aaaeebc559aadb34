#!/usr/bin/env bash
# One GPU session on a lent device machine (README, "Benchmarks"), in one call: build against
# that machine's torch, then the steps in STEPS (default: errors host tests demo bench numerics), each cut
# off so that the whole call ends within BUDGET seconds (default 560; a device call may run 600).
# Everything lands in $OUT (default ./gpu-out) as gpu-results.tgz, refreshed after each step
# (a device call brings back at most 8 files).
#   tests     the suite minus the CPU-only files and test_hub (the hub step runs it), on WORKERS (12)
#             processes (TEST_ARGS overrides the selection; the second session's 8 workers needed over 215 s)
#   hub       scripts/build_hub.py once (the arch variant with nvcc), then tests/test_hub.py on WORKERS
#             processes against that tree (ROTARY_KERNELS_HUB_TREE; as TEST_ARGS under the tests step,
#             every worker built its own tree, 12 nvcc builds at once: 5 tests ran in 218 s, 2026-11-28)
#   demo      python -m rotary_kernels.demo
#   bench     benchmarks/bench.py (BENCH_ARGS, default: the quick report on llama3-8b bf16, both table dtypes)
#   numerics  benchmarks/numerics.py
#   host      host time a call (back-to-back decode calls, wall clock) per backend, forward and
#             backward, a profile of the forward's Python, and benchmarks/triton_host_time.py: the
#             first run's Triton rows looked host-bound
#   ncu       Nsight Compute on benchmarks/ncu_cases.py (Triton and CUDA, bf16 and fp32 tables)
#   errors    whether an error raised in C++ (PyTorch's own, then the compiled ops') reaches Python or
#             kills the process (it did on the first two GPU sessions), with cuda-gdb's backtrace if it
#             dies, and the extension's libstdc++ stream symbols and link flags
#
# Wheels the machine lacks travel in .whl/ (git-ignored), fetched here beforehand with
#   bash scripts/gpu_session.sh --fetch-wheels
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  python3 -m pip download --no-deps $plat -d .whl "kernels==0.17.2" "transformers==5.22.2" liger-kernel \
    kernel-abi-check tomlkit
  exit $?
fi
deadline=$((SECONDS + ${BUDGET:-560}))
left() { local t=$((deadline - SECONDS)); [ "$t" -lt "$1" ] && echo "$((t > 1 ? t : 1))" || echo "$1"; }
OUT=${OUT:-$PWD/gpu-out}
RES=$(mktemp -d)
mkdir -p "$OUT"
pack() { tar czf "$OUT/gpu-results.tgz" -C "$RES" .; }
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import transformers, kernels; print('transformers', transformers.__version__, 'kernels', kernels.__version__)"
  nvcc --version | tail -2; nproc; date -u
} 2>&1 | tee "$RES/env.txt"
export ROTARY_KERNELS_CUDA_ARCHS=${ROTARY_KERNELS_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
SECONDS_BUILD=$SECONDS
timeout "$(left 200)" python3 -m pip install -q --no-build-isolation --no-deps -e . > "$RES/build.txt" 2>&1
echo "build: rc $? in $((SECONDS - SECONDS_BUILD))s" | tee -a "$RES/env.txt"
pack
python3 -c "from rotary_kernels import _compiled as c; import rotary_kernels as rk; print('ext', c.HAS_EXT, 'cuda ext', \
c.HAS_CUDA_EXT, c.IMPORT_ERROR, 'backends', rk.available_backends('cuda'))" 2>&1 | tee -a "$RES/env.txt"
cpu_only="--ignore=tests/test_cuda_sim.py --ignore=tests/test_codegen_cuda.py --ignore=tests/test_codegen_triton.py \
  --ignore=tests/test_cpu_isa.py --ignore=tests/test_distributed.py --ignore=tests/test_zoo.py --ignore=tests/test_bench.py \
  --ignore=tests/test_hub.py"
for step in ${STEPS:-errors host tests demo bench numerics}; do
  SECONDS_STEP=$SECONDS
  case $step in
    tests) timeout -s INT -k 20 "$(left 220)" python3 -m pytest -p no:cacheprovider -q -rfEs --tb=short -n ${WORKERS:-12} --timeout 200 \
             ${TEST_ARGS:-$cpu_only tests} > "$RES/tests.txt" 2>&1 ;;
    hub) { tree=$(mktemp -d)
           SECONDS_HUB=$SECONDS
           timeout "$(left 240)" python3 scripts/build_hub.py --out "$tree/build" --cuda-archs 9.0
           echo "build_hub: rc $? in $((SECONDS - SECONDS_HUB))s"
           ROTARY_KERNELS_HUB_TREE=$tree timeout -s INT -k 20 "$(left 300)" python3 -m pytest -p no:cacheprovider -q \
             -rfEs --tb=short -n ${WORKERS:-12} --timeout 250 tests/test_hub.py; } > "$RES/hub.txt" 2>&1 ;;
    demo) timeout "$(left 40)" python3 -m rotary_kernels.demo > "$RES/demo.txt" 2>&1 ;;
    bench) timeout "$(left 200)" python3 benchmarks/bench.py --out "$RES/bench" \
             ${BENCH_ARGS:---quick --shapes llama3-8b --dtypes bfloat16 --cos same,fp32} > "$RES/bench.txt" 2>&1 ;;
    numerics) timeout "$(left 60)" python3 benchmarks/numerics.py --out "$RES/numerics-cuda" > "$RES/numerics.txt" 2>&1 ;;
    errors) so=$(ls torch-ext/rotary_kernels/_rotary_kernels_C*.so 2>/dev/null | head -1)
            # What the extension carries of libstdc++ and how it was linked (the first two GPU
            # sessions crashed in the extension's own copy of ostream code; the CPU VM's build has none).
            { g++ --version | head -1
              python3 -c "import sysconfig; print('LDSHARED', sysconfig.get_config_var('LDSHARED'))"
              readelf -d "$so" | grep -E "NEEDED|FLAGS|SYMBOLIC"
              echo "libstdc++ stream code defined in the extension (none expected):"
              nm -C --defined-only "$so" | grep -E "std::(basic_ostream|basic_ios|ostream|locale|num_put|codecvt|ios_base)" | head -20
              echo "stream symbols it imports:"
              nm -DC --undefined-only "$so" | grep -E "ostream|ostringstream|ios_base|locale" | head -20
            } > "$RES/errors.txt" 2>&1
            for dev in cpu cuda; do
              for who in torch ops; do
                if [ $who = torch ]; then call="torch.ones(2, device='$dev') @ torch.ones(3, device='$dev')"
                else call="rotary_kernels._compiled.ops.rotary(torch.ones(3, 4, 16, device='$dev'), None, \
                  *[torch.ones(1, 3, 16, device='$dev')] * 2, torch.ones(3, 4, 16, device='$dev'), None, False, False)"; fi
                prog="import torch, rotary_kernels._compiled
try:
    $call
except RuntimeError as e:
    print('raised:', str(e).splitlines()[0][:100])"
                timeout "$(left 30)" python3 -X faulthandler -c "$prog" > "$RES/err.txt" 2>&1
                echo "$who error on $dev: rc $? $(head -c 300 "$RES/err.txt")"
                grep -q "^raised" "$RES/err.txt" && continue
                # Which copy of the unwinder each library binds to (one with its own copy of libgcc's
                # unwinder exported would explain a crash in our library's throws alone), and where it dies.
                LD_DEBUG=bindings timeout "$(left 30)" python3 -c "$prog" 2>&1 \
                  | grep -E "_Unwind_(RaiseException|Find_FDE|Backtrace)|__register_frame_info" | grep -v "to /.*libgcc_s" | head -20
                ! command -v cuda-gdb > /dev/null \
                  || timeout "$(left 90)" cuda-gdb -batch -ex run -ex bt --args python3 -c "$prog" 2>&1 | tail -40
              done
            done >> "$RES/errors.txt" 2>&1 ;;
    host) { timeout "$(left 60)" python3 - <<'PY'
import time, torch, rotary_kernels as rk
from rotary_kernels.demo import make_inputs
q, k, c, s = make_inputs(1, torch.bfloat16, torch.device("cuda"))
qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
for be in [b for b in rk.available_backends("cuda") if b != "reference"]:
    outs = rk.apply_rotary_transformers(qq, kk, c, s, backend=be)
    calls = {"fwd": lambda: rk.apply_rotary_transformers(q, k, c, s, backend=be),
             "bwd": lambda: torch.autograd.grad(outs, (qq, kk), outs, retain_graph=True)}
    for name, f in calls.items():
        for _ in range(100):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{be} decode-1 {name}: {(t1 - t0) / 2 * 1e3:.1f} us a call on the host, "
              f"{(time.perf_counter() - t0) / 2 * 1e3:.1f} us with the GPU", flush=True)
# Where a forward call's host time goes (the second session: cuda 36 us, triton 158 us a call, of
# which Triton's launcher 28 us): Python functions by own time.
import cProfile, pstats
for be in [b for b in rk.available_backends("cuda") if b != "reference"]:
    prof = cProfile.Profile()
    prof.runcall(lambda: [rk.apply_rotary_transformers(q, k, c, s, backend=be) for _ in range(500)])
    print(f"{be}: forward, 500 calls, by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
PY
            timeout "$(left 60)" python3 benchmarks/triton_host_time.py; } > "$RES/host.txt" 2>&1 ;;
    ncu) # Nsight Compute on the open questions' kernels (benchmarks/ncu_cases.py): Triton with bf16
         # against fp32 tables, CUDA with both; memory throughput, occupancy, stall reasons.
         NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
         # (--clock-control none: the clocks as a timed run has them. Firecracker machines give ncu
         # the counters; gVisor ones do not: then ncu.txt says so.)
         timeout "$(left 150)" "$NCU" --clock-control none --kernel-name regex:rotary --launch-count 8 \
           --section SpeedOfLight \
           --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
           python3 benchmarks/ncu_cases.py > "$RES/ncu.txt" 2>&1 ;;
    *) echo "unknown step $step (tests, hub, demo, bench, numerics, errors, host, ncu)"; false ;;
  esac
  rc=$?
  tail -${TAIL:-12} "$RES/$step.txt" 2>/dev/null
  echo "step $step: rc $rc in $((SECONDS - SECONDS_STEP))s" | tee -a "$RES/env.txt"
  pack
done

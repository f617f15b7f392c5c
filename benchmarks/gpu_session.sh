#!/usr/bin/env bash
# One call on a lent CUDA machine (no internet): install the carried wheels, run the GPU
# benchmark, then the digits settings sweep on the same GPU. Results land in $OUT.
#
#   carry: .whl (built by `bash benchmarks/gpu_wheels.sh`: this package's wheel, and wheels of diffusers, importlib_metadata,
#          omegaconf, pydantic(-core), annotated-types, typing-inspection, clean-fid, lpips for the machine's Python 3.12)
#          .sdcache (a SCOREDISTILL_CACHE holding the digits teacher, classifier, pairs)
#   run:   bash benchmarks/gpu_session.sh            (GPU_BENCH_BUDGET=540 seconds for the table; GPU_BENCH_ONLY picks
#          settings and their order, e.g. GPU_BENCH_ONLY="bf16 bare:bf16 bf16+per_call_casts bf16+cuda_graph bf16+compile+cudagraphs
#          bf16+compile"; GPU_BENCH_ARGS passes more options, e.g. --no-profile; CHECK=1 first runs
#          gpu_cuda_graph_check.py; SWEEP=1 SWEEP_TIMEOUT=250 adds the sweep)
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, diffusers, scoredistill; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

# 0. optional (CHECK=1): runtime.cuda_graph against the eager iteration, bit for bit (the check CPUs cannot run)
if [ "${CHECK:-0}" = 1 ]; then
    timeout "${CHECK_TIMEOUT:-150}" python3 benchmarks/gpu_cuda_graph_check.py --out "$OUT/cuda_graph_vs_eager.json" 2>&1 \
        | grep -v -e "Warning" -e "warn(" -e "^$" | tee "$OUT/gpu_cuda_graph_check.log"
fi

# 1. the GPU table (fp32, tf32, bf16, bf16+channels_last, bf16 at 4x batch, then bf16+compile without and with
#    CUDA graphs), CUDA's sync detector over two iterations, and a kernel profile. JSON after each setting. The
#    compiled rows run in child processes that gpu_dmd.py stops at its --budget (a row still compiling then is
#    recorded as stopped, and the rows done are kept); `timeout` is only a safety net.
#    The unfiltered output goes to gpu_dmd_raw.log (a row that dies can leave no message in the filtered log), and
#    faulthandler prints a crash's Python stack there.
BUDGET=${GPU_BENCH_BUDGET:-540}
timeout "$(( BUDGET + 20 ))" python3 -X faulthandler benchmarks/gpu_dmd.py --iters 20 --budget "$BUDGET" --out "$OUT/gpu_dmd_throughput.json" \
    --profile-out "$OUT/gpu_dmd_kernel_profile.txt" ${GPU_BENCH_ONLY:+--only $GPU_BENCH_ONLY} ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_dmd_raw.log" | grep -v -e "UserWarning" -e "warn_once" -e "^$" -e "This call originates" -e "File \"" -e "is_torch_version" -e "\^\^\^" \
    | tee "$OUT/gpu_dmd.log"

# 2. optional (SWEEP=1): digits settings on the GPU, ranked by FID against the train split. Measured once: 16
#    concurrent runs on an H200 did not finish 2,000 steps in 235 s (the small UNet is launch-bound), and the one
#    that ended (regression only) exited with an error whose log did not come back; logs are now kept.
[ "${SWEEP:-0}" = 1 ] || exit 0
cp -r .sdcache /tmp/sdcache
SCOREDISTILL_CACHE=/tmp/sdcache timeout "${SWEEP_TIMEOUT:-250}" python3 benchmarks/digits_sweep.py --out /tmp/sweep --parallel 16 \
    --timeout "$(( ${SWEEP_TIMEOUT:-250} - 15 ))" --set runtime.device=cuda 2>&1 | tee "$OUT/sweep.log"
cp /tmp/sweep/sweep.json /tmp/sweep/sweep.md "$OUT/" 2>/dev/null
tar czf "$OUT/sweep_logs.tgz" -C /tmp/sweep $(cd /tmp/sweep && ls *.log) 2>/dev/null  # every run's log, failures too
exit 0

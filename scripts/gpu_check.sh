#!/usr/bin/env bash
# One device-tool call that checks and times the GPU path; results under $OUT.
#   bash scripts/gpu_check.sh check     the GPU tests (graphs captured, Triton compiled) and the
#                                       single-request benchmark (exactness, plain, speculative table)
#   bash scripts/gpu_check.sh serving   batched serving at loads 1 and 8, and where the host's time goes
#   bash scripts/gpu_check.sh feature   the kernel, graph and feature-head tests, and the feature head's speculative table
#                                       (FEATURE_INT8=1: the head's weights in int8)
#   bash scripts/gpu_check.sh tp        tensor parallelism: the 8B shape split over the machine's GPUs
#                                       (WORLD, default 2; a kind with >= 2 GPUs) against one GPU
#   bash scripts/gpu_check.sh grammar   the graph tests alone (structured outputs among them)
# The graph tests check structured outputs, which need llguidance; the machine lacks it, so carry
# its wheel in build/wheels (carry: ["build/wheels"]), installed offline here.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"
if ! python3 -c 'import llguidance' 2>/dev/null; then
  if ls build/wheels/llguidance-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps build/wheels/llguidance-*.whl
  else
    echo "llguidance is missing and build/wheels holds no wheel of it: the structured-output graph test will fail" >&2
  fi
fi
case "${1:-check}" in
  check)
    python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_kernels.py tests/backends/test_graph_decoder.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    python3 scripts/gpu_bench.py --repeats "${REPEATS:-2}" --no-compile 2>&1 | tee "$OUT/gpu_bench.log" | tail -40
    ;;
  feature)
    python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_kernels.py tests/backends/test_graph_decoder.py tests/loop/test_feature_drafter.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    python3 scripts/gpu_bench.py --feature-only --no-exactness --repeats "${REPEATS:-3}" 2>&1 | tee "$OUT/gpu_feature.log" | tail -25
    ;;
  grammar)
    python3 -m pytest -q -p no:cacheprovider tests/backends/test_graph_decoder.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    ;;
  tp)
    python3 scripts/gpu_tensor_parallel.py --world "${WORLD:-2}" 2>&1 | tee "$OUT/gpu_tensor_parallel.log" | tail -8
    ;;
  serving)
    python3 scripts/gpu_serving.py --concurrency "${LOADS:-1,8}" 2>&1 | tee "$OUT/gpu_serving.log" | tail -20
    python3 scripts/gpu_host_gaps.py 2>&1 | tee "$OUT/gpu_host_gaps.log" | tail -8
    ;;
  *) echo "usage: gpu_check.sh check|serving|feature|grammar|tp" >&2; exit 2 ;;
esac

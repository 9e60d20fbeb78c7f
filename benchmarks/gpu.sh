#!/usr/bin/env bash
# The benchmark harness on one GPU (e.g. an H100), in about three minutes: the GPU-only
# tests (cuDNN attention = XLA attention), bf16 matmul peak, the B and L transformer train
# steps (bf16 compute, float32 master weights, cuDNN flash attention), L with XLA's
# attention, without remat and at batch 64, sampling, compile scaling and the tokenizer
# steps; writes benchmarks/BENCHMARKS_gpu.md and benchmarks/results_gpu.json (BENCHMARKS.md
# quotes them in its GPU section).
#
#   pip install -e '.[gpu]' && bash benchmarks/gpu.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
python -c 'import jax, sys; d = jax.devices()[0]; print(d.device_kind); sys.exit(0 if d.platform == "gpu" else "no GPU visible to JAX")'
# cuDNN's attention must compute what XLA's does before its speed means anything.
JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider tests/test_gpu.py
exec python -m benchmarks.run --out benchmarks/BENCHMARKS_gpu.md --json benchmarks/results_gpu.json "$@"

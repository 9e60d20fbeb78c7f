#!/usr/bin/env bash
# The benchmark harness on one GPU (e.g. an H100), in a few minutes: bf16 matmul peak,
# the B and L transformer train steps (bf16 compute, float32 master weights, cuDNN
# attention through jax.nn.dot_product_attention), sampling, compile scaling and the
# tokenizer steps; writes BENCHMARKS.md and benchmarks/results.json like the CPU run.
#
#   pip install -e '.[gpu]' && bash benchmarks/gpu.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
python -c 'import jax, sys; d = jax.devices()[0]; print(d.device_kind); sys.exit(0 if d.platform == "gpu" else "no GPU visible to JAX")'
exec python -m benchmarks.run --out BENCHMARKS.md --json benchmarks/results_gpu.json "$@"

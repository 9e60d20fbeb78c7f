#!/usr/bin/env bash
# mmgen on one host: one JAX process driving every local accelerator (all GPUs of a
# workstation or one DGX node, a single-host TPU VM, or the CPU).
#
#   launch/local.sh train --config configs/toy.py:tiny --workdir runs/toy
#   DRY_RUN=1 launch/local.sh train ...     # print the environment and command only
#
# Arguments are those of `python -m mmgen`. SIGTERM reaches the trainer directly
# (exec), which saves a checkpoint and exits; running the same command again resumes.
#
# Env: PYTHON (default python), PLATFORM (gpu | tpu | cpu; default: gpu when
# nvidia-smi lists a GPU, else whatever JAX finds), XLA_FLAGS_EXTRA (appended),
# MEM_FRACTION (GPU memory XLA preallocates, default 0.90 — what `mmgen plan`
# checks against), DRY_RUN=1.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 mmgen-subcommand [args...]" >&2
  exit 2
fi
python=${PYTHON:-python}
platform=${PLATFORM:-}
if [[ -z $platform ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    platform=gpu
  else
    platform=auto
  fi
fi

exports=()
case $platform in
  gpu)
    # The same GPU flags as launch/slurm_gpu.sbatch (a test keeps the two equal).
    xla_flags=(
      --xla_gpu_enable_latency_hiding_scheduler=true
      --xla_gpu_enable_triton_gemm=false
      --xla_gpu_all_reduce_combine_threshold_bytes=134217728
      --xla_gpu_all_gather_combine_threshold_bytes=134217728
      --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
      --xla_gpu_enable_pipelined_all_gather=true
      --xla_gpu_enable_pipelined_reduce_scatter=true
      --xla_gpu_enable_pipelined_all_reduce=true
    )
    exports+=("XLA_FLAGS=${xla_flags[*]}${XLA_FLAGS_EXTRA:+ $XLA_FLAGS_EXTRA}")
    exports+=("XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.90}")
    ;;
  tpu | auto)
    if [[ -n ${XLA_FLAGS_EXTRA:-} ]]; then exports+=("XLA_FLAGS=$XLA_FLAGS_EXTRA"); fi
    ;;
  cpu)
    exports+=("JAX_PLATFORMS=cpu")
    if [[ -n ${XLA_FLAGS_EXTRA:-} ]]; then exports+=("XLA_FLAGS=$XLA_FLAGS_EXTRA"); fi
    ;;
  *)
    echo "$0: PLATFORM=$platform must be gpu, tpu or cpu" >&2
    exit 2
    ;;
esac
exports+=("PYTHONUNBUFFERED=1")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "# one process on this host ($platform)"
  for kv in "${exports[@]}"; do printf 'export %s="%s"\n' "${kv%%=*}" "${kv#*=}"; done
  printf '%q ' "$python" -m mmgen "$@"
  printf '\n'
  exit 0
fi
for kv in "${exports[@]}"; do export "${kv?}"; done
exec "$python" -m mmgen "$@"

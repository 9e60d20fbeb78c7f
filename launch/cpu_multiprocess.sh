#!/usr/bin/env bash
# Run `python -m mmgen ARGS...` as N JAX processes on this machine: a coordinator on
# loopback, gloo collectives, DEVICES_PER_PROCESS fake CPU devices each. This is how
# the multi-host code path is exercised without a cluster (tests use it).
#
#   launch/cpu_multiprocess.sh 2 train --config configs/toy.py:tiny --workdir /tmp/mp
#
# Env: DEVICES_PER_PROCESS (default 2), PORT (default: a free one), PYTHON (default python).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES mmgen-subcommand [args...]" >&2
  exit 2
fi
n=$1; shift
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup TERM INT
for ((i = 0; i < n; i++)); do
  MMGEN_COORDINATOR="127.0.0.1:$port" MMGEN_NUM_PROCESSES="$n" MMGEN_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" \
    "$python" -m mmgen "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"

#!/usr/bin/env bash
# Run `python -m mmgen ARGS...` as N JAX processes on this machine: a coordinator on
# loopback, gloo collectives, DEVICES_PER_PROCESS fake CPU devices each. This is how
# the multi-host code path is exercised without a cluster (tests use it).
#
#   launch/cpu_multiprocess.sh 2 train --config configs/toy.py:tiny --workdir /tmp/mp
#
# Env: DEVICES_PER_PROCESS (default 2), PORT (default: a free one), PYTHON (default
# python), XLA_FLAGS_EXTRA (appended to each process's XLA_FLAGS), KILL_AFTER (default 30: seconds the survivors of a failed process get
# before SIGKILL), DRY_RUN=1 (print each process's command instead of running it).
#
# Signals: SIGTERM/SIGINT to this script are forwarded to every process, and the
# script then keeps waiting until all of them have exited (the trainer saves a
# checkpoint on SIGTERM, so returning earlier would let a caller read a half-written
# workdir). If one process fails, the others are stopped: they would otherwise wait
# forever in a collective for the dead one (SIGTERM, then SIGKILL after KILL_AFTER
# seconds, since a survivor may be stuck inside a collective). Exit status: 0 when every process exited
# 0 (a clean preemption save included), else the first failure's status.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES mmgen-subcommand [args...]" >&2
  exit 2
fi
n=$1
shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-2}
if [[ -n ${PORT:-} ]]; then
  port=$PORT
elif [[ ${DRY_RUN:-0} == 1 ]]; then
  port=12345
else
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    printf 'MMGEN_COORDINATOR=127.0.0.1:%s MMGEN_NUM_PROCESSES=%s MMGEN_PROCESS_ID=%s JAX_PLATFORMS=cpu' \
      "$port" "$n" "$i"
    printf ' XLA_FLAGS=%q %s -m mmgen' "--xla_force_host_platform_device_count=$devices${XLA_FLAGS_EXTRA:+ $XLA_FLAGS_EXTRA}" \
      "$python"
    printf ' %q' "$@"
    printf '\n'
  done
  exit 0
fi

pids=()
stopping=0
failed_at=""
forward() {
  stopping=1
  for p in "${pids[@]}"; do
    if [[ -n $p ]]; then kill -TERM "$p" 2>/dev/null || true; fi
  done
}
trap forward TERM INT

for ((i = 0; i < n; i++)); do
  MMGEN_COORDINATOR="127.0.0.1:$port" MMGEN_NUM_PROCESSES="$n" MMGEN_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices${XLA_FLAGS_EXTRA:+ $XLA_FLAGS_EXTRA}" \
    "$python" -m mmgen "$@" &
  pids+=($!)
done

# Reap every process. `wait PID` is interrupted by a forwarded signal, so poll until
# all are gone instead of trusting a single pass.
status=0
alive=$n
while ((alive > 0)); do
  alive=0
  for i in "${!pids[@]}"; do
    p=${pids[$i]}
    [[ -z $p ]] && continue
    if kill -0 "$p" 2>/dev/null; then
      alive=$((alive + 1))
      continue
    fi
    rc=0
    wait "$p" || rc=$?
    pids[i]=""
    if ((rc != 0 && status == 0)); then
      status=$rc
      if ((stopping == 0)); then
        echo "$0: process $i exited with status $rc; stopping the others" >&2
        forward
        failed_at=$SECONDS
      fi
    fi
  done
  if ((alive > 0)); then
    if [[ -n $failed_at ]] && ((SECONDS - failed_at >= ${KILL_AFTER:-30})); then
      for p in "${pids[@]}"; do
        if [[ -n $p ]]; then kill -KILL "$p" 2>/dev/null || true; fi
      done
    fi
    sleep 0.2
  fi
done
exit "$status"

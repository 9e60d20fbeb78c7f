#!/usr/bin/env bash
# mmgen on a Cloud TPU VM pod slice, or several slices joined over DCN (multi-slice).
# Run from your workstation; every command goes through `gcloud`.
#
#   TPU_NAME=mm ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 launch/tpu_pod.sh create
#   TPU_NAME=mm ZONE=us-east5-a launch/tpu_pod.sh setup        # copy this checkout, install
#   TPU_NAME=mm ZONE=us-east5-a launch/tpu_pod.sh run train --config configs/X.py:XL \
#       --workdir /mnt/shared/runs/x
#   TPU_NAME=mm ZONE=us-east5-a launch/tpu_pod.sh stop         # SIGTERM: checkpoint, exit
#   TPU_NAME=mm ZONE=us-east5-a launch/tpu_pod.sh delete
#
# `run` starts `python3 -m mmgen ARGS` on every worker of every slice at once
# (`ssh --worker=all`); each process calls `jax.distributed.initialize()`, which reads
# the slice's workers and, for multi-slice, the MEGASCALE_* settings the TPU runtime
# puts in the VM metadata. Multi-slice (NUM_SLICES > 1) creates one queued resource
# with NUM_SLICES nodes named $TPU_NAME-0, $TPU_NAME-1, ...; set the config's
# mesh.dcn_data to NUM_SLICES (data parallel across slices, FSDP inside each).
#
# The --workdir must be a directory every worker sees (a Filestore/NFS or gcsfuse
# mount, or a bucket: --workdir gs://bucket/runs/x, with gcsfs installed): all workers
# write checkpoint shards, worker 0 writes config and metrics.
#
# Env: TPU_NAME, ZONE (required); PROJECT; ACCELERATOR_TYPE (default v5p-32);
# RUNTIME_VERSION (default from the TPU generation); NUM_SLICES (default 1); SPOT=1
# (spot capacity); REPO_DIR (on the workers, default mmgen); DETACH=1 (run under
# nohup, logs in REPO_DIR/mmgen.log on each worker); LIBTPU_INIT_ARGS (passed to the
# workers); ALLOW_LOCAL_WORKDIR=1; DRY_RUN=1 (print every gcloud command, run none).
set -euo pipefail

usage() {
  echo "usage: TPU_NAME=... ZONE=... $0 {create|setup|run|stop|delete} [mmgen-subcommand args...]" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
action=$1
shift
: "${TPU_NAME:?set TPU_NAME (the TPU VM or queued resource name)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
accelerator=${ACCELERATOR_TYPE:-v5p-32}
slices=${NUM_SLICES:-1}
repo_dir=${REPO_DIR:-mmgen}
dry=${DRY_RUN:-0}
if [[ ! $slices =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NUM_SLICES=$slices must be a positive integer" >&2
  exit 2
fi

if [[ -n ${RUNTIME_VERSION:-} ]]; then
  runtime=$RUNTIME_VERSION
else
  case $accelerator in
    v4-*) runtime=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *)
      echo "$0: no default runtime for ACCELERATOR_TYPE=$accelerator; set RUNTIME_VERSION" >&2
      exit 2
      ;;
  esac
fi

common=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then common+=(--project="$PROJECT"); fi
capacity=()
if [[ ${SPOT:-0} == 1 ]]; then capacity=(--spot); fi

nodes=()
if ((slices == 1)); then
  nodes=("$TPU_NAME")
else
  for ((s = 0; s < slices; s++)); do nodes+=("$TPU_NAME-$s"); done
fi

# Print a command (DRY_RUN=1) or run it.
run() {
  if [[ $dry == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Run one command per slice at the same time (a multi-slice job starts together) and
# fail if any of them fails.
on_all_slices() {
  local pids=() status=0 node
  for node in "${nodes[@]}"; do
    if [[ $dry == 1 ]]; then
      "$@" "$node"
    else
      "$@" "$node" &
      pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || status=$?; done
  return "$status"
}

ssh_all_workers() {  # ssh_all_workers REMOTE_COMMAND NODE
  run gcloud compute tpus tpu-vm ssh "$2" "${common[@]}" --worker=all --command="$1"
}

case $action in
  create)
    if ((slices == 1)); then
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}" \
        --accelerator-type="$accelerator" --version="$runtime" "${capacity[@]}"
    else
      run gcloud compute tpus queued-resources create "$TPU_NAME" "${common[@]}" \
        --accelerator-type="$accelerator" --runtime-version="$runtime" \
        --node-count="$slices" --node-prefix="$TPU_NAME" "${capacity[@]}"
    fi
    ;;

  setup)
    # Ship the tracked files of this checkout (with local edits), then install.
    root=$(cd "$(dirname "$0")/.." && pwd)
    tarball=${TMPDIR:-/tmp}/mmgen-$TPU_NAME.tgz
    if [[ $dry == 1 ]]; then
      echo "(cd $root && git ls-files -z | tar --null -czf $tarball -T -)"
    else
      (cd "$root" && git ls-files -z | tar --null -czf "$tarball" -T -)
    fi
    install="mkdir -p $repo_dir && tar -xzf mmgen.tgz -C $repo_dir && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e $repo_dir"
    copy_and_install() {
      run gcloud compute tpus tpu-vm scp "$tarball" "$1:mmgen.tgz" "${common[@]}" --worker=all
      ssh_all_workers "$install" "$1"
    }
    on_all_slices copy_and_install
    ;;

  run)
    [[ $# -ge 1 ]] || usage
    workdir=""
    prev=""
    for arg in "$@"; do
      case $arg in
        --workdir=*) workdir=${arg#--workdir=} ;;
        *) if [[ $prev == --workdir ]]; then workdir=$arg; fi ;;
      esac
      prev=$arg
    done
    case $workdir in
      /tmp/* | /dev/shm/* | /var/tmp/*)
        if [[ ${ALLOW_LOCAL_WORKDIR:-0} != 1 ]]; then
          echo "$0: --workdir $workdir is local to each worker; use a mount every worker shares (NFS/Filestore, gcsfuse)" >&2
          exit 2
        fi
        ;;
    esac
    # MMGEN_DISTRIBUTED=1: call jax.distributed.initialize() (auto-detected from the
    # TPU metadata) even though a GCE TPU VM sets none of the cluster variables.
    env_vars="MMGEN_DISTRIBUTED=1 PYTHONUNBUFFERED=1 TPU_STDERR_LOG_LEVEL=2"
    if [[ -n ${LIBTPU_INIT_ARGS:-} ]]; then env_vars+=" LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS'"; fi
    mmgen_cmd="python3 -m mmgen$(printf ' %q' "$@")"
    if [[ ${DETACH:-0} == 1 ]]; then
      remote="cd $repo_dir && export $env_vars && nohup $mmgen_cmd > mmgen.log 2>&1 & echo \$! > ~/mmgen.pid"
    else
      remote="cd $repo_dir && export $env_vars && { $mmgen_cmd & echo \$! > ~/mmgen.pid; wait \$!; }"
    fi
    run_slice() { ssh_all_workers "$remote" "$1"; }
    on_all_slices run_slice
    ;;

  stop)
    # SIGTERM to every worker's trainer: each saves a checkpoint at the same step and exits.
    # shellcheck disable=SC2016  # expanded on the workers, not here
    stop_slice() { ssh_all_workers 'if [ -f ~/mmgen.pid ]; then kill -TERM "$(cat ~/mmgen.pid)"; fi' "$1"; }
    on_all_slices stop_slice
    ;;

  delete)
    if ((slices == 1)); then
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet
    else
      run gcloud compute tpus queued-resources delete "$TPU_NAME" "${common[@]}" --force --quiet
    fi
    ;;

  *) usage ;;
esac

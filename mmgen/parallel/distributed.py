"""Multi-host start-up through JAX's own multi-controller runtime.

``maybe_initialize()`` calls ``jax.distributed.initialize`` exactly when the job is
multi-process:
- explicit: ``MMGEN_COORDINATOR`` (host:port), ``MMGEN_NUM_PROCESSES`` and
  ``MMGEN_PROCESS_ID`` (what ``launch/cpu_multiprocess.sh`` sets for CPU processes,
  with gloo collectives);
- ``MMGEN_DISTRIBUTED=1``: always, with no arguments (TPU VM pods on GCE set none
  of the variables below; ``launch/tpu_pod.sh`` exports it);
- SLURM with more than one task (``SLURM_NTASKS`` > 1) or a TPU pod slice
  (``TPU_WORKER_HOSTNAMES`` with several hosts, or ``MEGASCALE_*`` for multi-slice):
  no arguments, JAX detects everything itself.
A single process does nothing. It must run before any other JAX call touches devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np

_initialized = False


def _is_cluster() -> bool:
    if os.environ.get("MMGEN_DISTRIBUTED") == "1":
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def maybe_initialize() -> bool:
    """Initialise ``jax.distributed`` when this is a multi-process job. Returns whether it did."""
    global _initialized
    if _initialized:
        return True
    coordinator = os.environ.get("MMGEN_COORDINATOR")
    if coordinator:
        num = int(os.environ["MMGEN_NUM_PROCESSES"])
        pid = int(os.environ["MMGEN_PROCESS_ID"])
        # Only affects the CPU backend (the tests' processes); asking for the backend
        # here would initialise it before the runtime, so set it unconditionally.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
        _initialized = True
    elif _is_cluster():
        jax.distributed.initialize()
        _initialized = True
    return _initialized


def is_writer() -> bool:
    """Whether this process writes files: every process computes (SPMD), process 0 writes."""
    return jax.process_index() == 0


def host_value(x):
    """``x`` as a host numpy array when it is a global array spread over several processes.

    Evaluation and sampling run on the training mesh in every process; their results
    are brought back whole to every process here (a replicated array's local copy, or an
    all-gather of the shards), so host code after them is the same everywhere. Anything
    this process can address already (one process, one device) is returned unchanged.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

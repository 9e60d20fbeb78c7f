"""Real multi-process runs: 2 CPU processes x 2 devices with gloo collectives."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mmgen.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py") + ":tiny"
COMMON = ["--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.log_every=1",
          "--config.checkpoint_every=100", "--config.tensorboard=False",
          "--config.schedule.name=constant"]  # the LR must not depend on total_steps here

pytestmark = pytest.mark.slow  # a multi-process JAX run


def test_two_processes_train_save_restore_and_resume_on_one(tmp_path, losses, launch):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    # 2 processes: train 6 steps, save; a second start restores (per-process data state) and goes on to 10.
    launch(2, 2, "train", "--config", TOY, "--workdir", multi, "--config.total_steps=6", *COMMON)
    assert Checkpointer(multi, read_only=True).latest_step() == 6
    data_files = set(os.listdir(os.path.join(multi, "checkpoints", "6", "data")))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files
    launch(2, 2, "train", "--config", TOY, "--workdir", multi, "--config.total_steps=10", *COMMON)
    # The same global batch and mesh shape on one process with 4 devices, straight through.
    launch(1, 4, "train", "--config", TOY, "--workdir", single, "--config.total_steps=14", *COMMON)
    a, b = losses(multi), losses(single)
    assert sorted(a) == list(range(1, 11))
    np.testing.assert_allclose([a[s] for s in range(1, 11)], [b[s] for s in range(1, 11)], rtol=1e-5, atol=1e-6)
    # Resume the 2-process run on ONE process (different process count, same global batch):
    # the trajectory continues exactly where the straight run goes.
    launch(1, 4, "train", "--config", TOY, "--workdir", multi, "--config.total_steps=14", *COMMON)
    a = losses(multi)
    assert sorted(a) == list(range(1, 15))
    np.testing.assert_allclose([a[s] for s in range(11, 15)], [b[s] for s in range(11, 15)], rtol=1e-5, atol=1e-6)


def test_workdir_only_some_processes_see_is_one_line_on_every_process(tmp_path):
    """A relative --workdir from two different working directories: two folders, as a node-local path
    on two hosts. Both processes stop before anything compiles, with the same line naming process 1."""
    import socket

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    procs = []
    for i in range(2):
        cwd = tmp_path / f"host{i}"
        cwd.mkdir()
        env = dict(os.environ, MMGEN_COORDINATOR=address, MMGEN_NUM_PROCESSES="2", MMGEN_PROCESS_ID=str(i),
                   JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", "mmgen", "train", "--config", TOY, "--workdir", "run",
                                       "--config.total_steps=2", *COMMON], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    host = socket.gethostname()
    for p, (_, err) in zip(procs, outs):
        lines = [line for line in err.splitlines() if line.startswith("mmgen train: error:")]
        assert p.returncode == 2 and lines == [
            f"mmgen train: error: --workdir run is not shared by every host: process 1 ({host}) of 2 cannot see "
            f"what process 0 ({host}) writes there; give every host the same filesystem (a network mount at the "
            f"same path, or a bucket: gs://...)"], err[-2000:]
    assert not (tmp_path / "host0" / "run").exists()  # process 0 removed its probe and the folder it made
    assert not (tmp_path / "host1" / "run").exists()

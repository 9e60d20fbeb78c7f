"""Real multi-process runs: 2 CPU processes x 2 devices with gloo collectives."""

from __future__ import annotations

import os

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

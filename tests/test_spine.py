"""The training spine: sharded training, resume, resharding, preemption, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import mmgen  # noqa: F401
from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.parallel import mesh as mesh_lib
from mmgen.train import loop
from mmgen.train.checkpoint import Checkpointer
from mmgen.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py")
FAMILY = get_family("toy")


def params(workdir, cfg, mesh=None):
    model = loop.load_state(FAMILY, cfg, workdir, mesh=mesh)
    return jax.device_get(jax.tree.map(lambda v: v, jax.tree.leaves(model.model)))


def cli(*args, env=None, timeout=240):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mmgen", *args], cwd=REPO, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def test_sharded_training_matches_one_device(tmp_path, toy_config, losses):
    assert jax.device_count() == 8
    sharded = toy_config("mesh.data=2", "mesh.fsdp=4", "total_steps=12")
    single = toy_config("mesh.data=1", "total_steps=12")
    loop.run(FAMILY, sharded, str(tmp_path / "mesh"))
    loop.run(FAMILY, single, str(tmp_path / "one"), devices=jax.devices()[:1])
    a, b = losses(tmp_path / "mesh"), losses(tmp_path / "one")
    assert sorted(a) == list(range(1, 13))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5, atol=1e-6)
    assert a[12] < a[1]  # it learns

    # Parameters really are sharded: embed -> fsdp (4 ways), biases over mlp stay whole.
    mesh = mesh_lib.make_mesh(sharded.mesh)
    model = loop.load_state(FAMILY, sharded, str(tmp_path / "mesh"), mesh=mesh)
    kernel = model.model.fc1.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", None)
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4
    # Adam moments inherit the parameter's layout.
    mu = jax.tree.leaves(model.optimizer.opt_state)
    assert any(getattr(x, "shape", None) == kernel.shape and x.sharding.spec == P("fsdp", None) for x in mu)


def test_init_is_directly_sharded(toy_config):
    cfg = toy_config("mesh.fsdp=8", "mesh.data=1", "model.hidden=64")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    graphdef, abstract = loop.abstract_state(FAMILY, cfg)
    from mmgen.parallel.sharding import state_shardings

    shardings = state_shardings(abstract, mesh, cfg.sharding_rules)
    state = loop.init_state(FAMILY, cfg, mesh, shardings)
    kernel = state["model"]["fc2"]["kernel"].get_value()  # (mlp, embed) = (64, 16)
    assert kernel.sharding.spec == P(None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (64, 2)


def test_resume_is_bit_exact(tmp_path, toy_config, losses):
    straight = toy_config("total_steps=16", "checkpoint_every=100", "mesh.data=2", "mesh.fsdp=4")
    loop.run(FAMILY, straight, str(tmp_path / "straight"))
    resumed = toy_config("total_steps=16", "checkpoint_every=100", "mesh.data=2", "mesh.fsdp=4")
    first = loop.run(FAMILY, resumed, str(tmp_path / "resumed"), stop_after=8)
    assert first["step"] == 8
    assert Checkpointer(str(tmp_path / "resumed"), read_only=True).latest_step() == 8
    loop.run(FAMILY, resumed, str(tmp_path / "resumed"))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 17))  # no duplicated or missing lines after resume
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bit-exact, not approximately
    for x, y in zip(params(tmp_path / "straight", straight), params(tmp_path / "resumed", resumed)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_reshards_fsdp8_to_data2(tmp_path, toy_config):
    cfg = toy_config("mesh.fsdp=8", "mesh.data=1", "total_steps=4", "model.hidden=64")
    loop.run(FAMILY, cfg, str(tmp_path))
    on_fsdp = loop.load_state(FAMILY, cfg, str(tmp_path), mesh=mesh_lib.make_mesh(cfg.mesh))
    mesh2 = mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 1}),
                               jax.devices()[:2])
    on_data = loop.load_state(FAMILY, cfg, str(tmp_path), mesh=mesh2)
    assert on_fsdp.model.fc1.kernel.get_value().sharding.spec == P("fsdp", None)
    assert on_data.model.fc1.kernel.get_value().sharding.mesh.shape["data"] == 2
    for x, y in zip(jax.tree.leaves(on_fsdp), jax.tree.leaves(on_data)):
        np.testing.assert_array_equal(jax.device_get(x), jax.device_get(y))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, toy_config, losses):
    cfg = toy_config("optimizer.name='sgd'", "optimizer.lr=1e12", "optimizer.grad_clip=0.0",
                     "schedule.name='constant'", "checkpoint_every=1", "total_steps=40")
    with pytest.raises(loop.TrainingDiverged, match="last good checkpoint"):
        loop.run(FAMILY, cfg, str(tmp_path))
    rows = losses(tmp_path)
    good = Checkpointer(str(tmp_path), read_only=True).latest_step()
    assert good is not None and good < 40
    assert np.isfinite(rows[good])
    model = loop.load_state(FAMILY, cfg, str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model.model))


@pytest.mark.slow
def test_sigterm_saves_current_step_and_half_written_save_is_ignored(tmp_path, losses):
    work = tmp_path / "w"
    args = ["train", "--config", TOY + ":tiny", "--workdir", str(work), "--config.total_steps=100000",
            "--config.checkpoint_every=1000000", "--config.log_every=1", "--config.tensorboard=False"]
    proc = subprocess.Popen([sys.executable, "-m", "mmgen", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(work)) < 20:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = Checkpointer(str(work), read_only=True).latest_step()
    logged = max(losses(work))
    assert stopped is not None and stopped >= 20 and stopped % 1000000 != 0
    assert logged == stopped  # the checkpoint is at the step where it stopped

    # A save killed half-way: orbax's temporary directory, partly written.
    junk = work / "checkpoints" / f"{stopped + 5}.orbax-checkpoint-tmp-1234"
    shutil.copytree(work / "checkpoints" / str(stopped), junk)
    for f in list(junk.rglob("*"))[:3]:
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    res = cli("train", "--workdir", str(work), f"--config.total_steps={stopped + 3}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert Checkpointer(str(work), read_only=True).latest_step() == stopped + 3
    assert not junk.exists()


@pytest.mark.parametrize("override, message", [
    ("--config.optimzer.lr=0.1", "config has no key 'optimzer.lr'; did you mean optimizer.lr"),
    ("--config.mesh.data=3", "mesh data=3"),
    ("--config.batch_size=12", "does not divide"),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, override, message):
    work = tmp_path / "w"
    work.mkdir()
    (work / "config.json").write_text('{"sentinel": 1}')
    res = cli("train", "--config", TOY + ":tiny", "--workdir", str(work), "--config.mesh.fsdp=8", override,
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert json.loads((work / "config.json").read_text()) == {"sentinel": 1}
    assert not (work / "checkpoints").exists()


def test_dataset_config_mistake_is_one_line_and_leaves_the_workdir_alone(tmp_path):
    # Found when the data is opened (the builder knows its fields), still before config.json is written.
    work = tmp_path / "w"
    work.mkdir()
    (work / "config.json").write_text('{"sentinel": 1}')
    res = cli("train", "--config", os.path.join(REPO, "configs", "tokenizer", "video.py") + ":tiny,gan=0",
              "--workdir", str(work), f"--config.dataset.data_dir={tmp_path / 'data'}",
              "--config.dataset.builder_overrides.bogus=1")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no field(s) ['bogus']" in lines[0], res.stderr
    assert json.loads((work / "config.json").read_text()) == {"sentinel": 1}
    assert not (work / "checkpoints").exists()


def test_unknown_variant_and_missing_config_are_clear(tmp_path):
    res = cli("train", "--config", TOY + ":huge", "--workdir", str(tmp_path / "w"))
    assert res.returncode == 2 and "has no variant 'huge'" in res.stderr and "tiny" in res.stderr
    res = cli("train", "--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "w").exists()


def test_override_types_and_mesh_fill(toy_config):
    cfg = toy_config("optimizer.lr=1", "mesh.data=-1", "mesh.fsdp=2")
    assert isinstance(cfg.optimizer.lr, float)
    with pytest.raises(UserError, match="at most one"):
        mesh_lib.mesh_shapes(config_lib.ml_collections.ConfigDict({"data": -1, "fsdp": -1}), 8)
    assert mesh_lib.mesh_shapes(cfg.mesh, 8) == ([4, 2, 1], [1, 1, 1])
    assert mesh_lib.mesh_shapes(config_lib.ml_collections.ConfigDict(
        {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2}), 8, num_slices=2) == ([1, 4, 1], [2, 1, 1])


def test_builder_overrides_take_new_keys_and_other_dicts_do_not():
    cfg = config_lib.ml_collections.ConfigDict({"dataset": {"name": "x", "builder_overrides": {}}})
    config_lib.apply_overrides(cfg, ["dataset.builder_overrides.num_train=40000",
                                     "dataset.builder_overrides.max_distractors=0"])
    assert cfg.dataset.builder_overrides.to_dict() == {"num_train": 40000, "max_distractors": 0}
    config_lib.apply_overrides(cfg, ["dataset.builder_overrides.num_train=8"])
    assert cfg.dataset.builder_overrides.num_train == 8
    for typo in ("dataset.nmae=y", "dataset.builder_overides.num_train=1", "dataset.name.extra=1"):
        with pytest.raises(UserError, match="config has no key"):
            config_lib.apply_overrides(cfg, [typo])


def test_frozen_part_is_loaded_not_trained_and_not_checkpointed(tmp_path, toy_config, losses):
    import dataclasses

    from flax import nnx

    def given_fc1(cfg, abstract):
        # What an adapter run does with its base workdir: values from elsewhere, in place.
        return jax.tree.map(lambda a: jax.device_put(np.full(a.shape, 0.5, a.dtype), a.sharding), abstract)

    frozen_family = dataclasses.replace(FAMILY, frozen=nnx.PathContains("fc1"), load_frozen=given_fc1)
    cfg = toy_config("mesh.fsdp=2", "mesh.data=-1", "total_steps=5")
    loop.run(frozen_family, cfg, str(tmp_path))
    saved = os.listdir(tmp_path / "checkpoints" / "5" / "state")
    meta = (tmp_path / "checkpoints" / "5" / "state" / "_METADATA").read_text() if "_METADATA" in saved else ""
    assert "fc2" in meta and "fc1" not in meta  # only the trained part is written
    model = loop.load_state(frozen_family, cfg, str(tmp_path))
    np.testing.assert_array_equal(np.asarray(model.model.fc1.kernel.get_value()), 0.5)
    assert losses(tmp_path)[5] < losses(tmp_path)[1]  # fc2 still trains


@pytest.mark.slow
def test_cli_stop_after_checkpoints_mid_schedule_and_resumes_to_the_end(tmp_path, losses):
    work = tmp_path / "w"
    args = ("--config", TOY + ":tiny", "--workdir", str(work), "--config.total_steps=6", "--config.log_every=1",
            "--config.checkpoint_every=100", "--config.tensorboard=False")
    res = cli("train", *args, "--stop-after", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert Checkpointer(str(work), read_only=True).latest_step() == 4
    assert max(losses(work)) == 4
    res = cli("train", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Checkpointer(str(work), read_only=True).latest_step() == 6


@pytest.mark.slow
def test_init_from_takes_the_model_weights_only(tmp_path, toy_config, losses):
    base = toy_config("mesh.data=2", "mesh.fsdp=4", "total_steps=20")
    loop.run(FAMILY, base, str(tmp_path / "base"))
    # lr 0: whatever the run starts from is what it ends with; on another mesh.
    tuned = toy_config("mesh.data=8", "total_steps=2", f"init_from={tmp_path / 'base'}", "optimizer.lr=0")
    loop.run(FAMILY, tuned, str(tmp_path / "tuned"))
    for x, y in zip(params(tmp_path / "base", base), params(tmp_path / "tuned", tuned)):
        np.testing.assert_array_equal(x, y)
    fresh = toy_config("mesh.data=8", "total_steps=2", "optimizer.lr=0")
    loop.run(FAMILY, fresh, str(tmp_path / "fresh"))
    a, b = losses(tmp_path / "tuned"), losses(tmp_path / "fresh")
    assert sorted(a) == [1, 2]  # the step count starts again
    trained = losses(tmp_path / "base")
    assert a[1] < b[1] and a[1] < trained[1]  # it starts from the trained weights, not from an init
    model = loop.load_state(FAMILY, tuned, str(tmp_path / "tuned"))
    assert int(model.optimizer.step.get_value()) == 2  # optimizer state is this run's own
    # Resuming the fine-tune reads its own checkpoint, not the source (which may be gone).
    shutil.rmtree(tmp_path / "base")
    longer = toy_config("mesh.data=8", "total_steps=3", f"init_from={tmp_path / 'base'}", "optimizer.lr=0")
    assert loop.run(FAMILY, longer, str(tmp_path / "tuned"))["step"] == 3


def test_init_from_mistakes_are_caught_before_anything_is_written(tmp_path, toy_config):
    base = toy_config("total_steps=2")
    loop.run(FAMILY, base, str(tmp_path / "base"))
    for override, message in [
        (f"init_from={tmp_path / 'nowhere'}", "no config.json there"),
        (f"init_from={tmp_path / 'base'}", "model variable fc1/bias is (32,) there and (64,) here"),
    ]:
        cfg = toy_config("total_steps=2", "model.hidden=64", override)
        with pytest.raises(UserError, match=re.escape(message)):
            loop.run(FAMILY, cfg, str(tmp_path / "w"))
        assert not (tmp_path / "w").exists()
    cfg = toy_config("total_steps=2", f"init_from={tmp_path / 'base'}", "init_from_step=7")
    with pytest.raises(UserError, match=r"no checkpoint at step 7 \(have \[2\]\)"):
        loop.run(FAMILY, cfg, str(tmp_path / "w"))

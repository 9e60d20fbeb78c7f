"""``mmgen.families.tokenizer.load(workdir, devices=...)``: where a frozen tokenizer's weights live.

The workdir is the tiny audio tokenizer with seeded random weights (placement, not
quality, is under test); the 8 devices are conftest's fake CPU devices.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from mmgen import config as config_lib
from mmgen.families import get_family
from mmgen.families.tokenizer import load
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import Checkpointer

AUDIO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tokenizer", "audio.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("audio_tokenizer"))
    cfg = config_lib.load_config(AUDIO + ":tiny,gan=0", ["async_checkpointing=False"])
    _, abstract = loop.abstract_state(get_family("tokenizer"), cfg)
    rng = np.random.default_rng(0)

    def value(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0) if not x.shape else jax.random.split(jax.random.key(0), x.shape)
        if np.issubdtype(x.dtype, np.floating):
            return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        return np.zeros(x.shape, x.dtype)

    workdir_lib.write_config(cfg, workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, jax.tree.map(value, abstract), force=True)
    ckpt.close()
    return workdir


def weight_devices(tok) -> set:
    return {d for leaf in jax.tree.leaves(nnx.state(tok.model, nnx.Param)) for d in leaf.sharding.device_set}


def test_default_load_puts_the_weights_on_every_device(workdir):
    assert weight_devices(load(workdir)) == set(jax.devices())


def test_one_device_holds_every_weight_and_encodes_there(workdir):
    device = jax.devices()[3]
    tok = load(workdir, devices=device)
    assert weight_devices(tok) == {device}
    x = np.random.default_rng(1).uniform(-0.5, 0.5, tok.input_shape).astype(np.float32)
    tokens, _ = tok.encode(x)
    assert tokens.sharding.device_set == {device}
    reference, _ = load(workdir).encode(x)  # the same weights laid out over all 8 devices
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(reference))


def test_a_device_subset_holds_a_full_copy_on_each_device(workdir):
    devices = jax.devices()[4:6]
    params = jax.tree.leaves(nnx.state(load(workdir, devices=devices).model, nnx.Param))
    assert {d for p in params for d in p.sharding.device_set} == set(devices)
    assert all(p.sharding.is_fully_replicated for p in params)


def test_a_mesh_lays_the_weights_out_by_the_sharding_rules(workdir):
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2, 1), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    params = jax.tree.leaves(nnx.state(load(workdir, devices=mesh).model, nnx.Param))
    assert {d for p in params for d in p.sharding.device_set} == set(jax.devices()[:2])
    assert any("fsdp" in str(p.sharding.spec) for p in params)  # conv_out / embed split over fsdp

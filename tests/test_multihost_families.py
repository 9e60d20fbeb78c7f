"""The real families through several processes with sharded parameters (gloo, fake CPU devices).

2 processes x 2 devices, ``mesh.fsdp=4``: every parameter is split over devices of both
processes, so evaluation and sampling must run on every process (SPMD) or they hang.
Each run evaluates at every step (samples written by process 0), checkpoints, and is
resumed on another process layout (1 process x 4 devices), where its losses must be
those of an uninterrupted run on that layout. Tiny shapes: these are the suite's most
expensive tests.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from mmgen import config as config_lib
from mmgen.data import pipeline
from mmgen.families import get_family
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"num_train": 8, "num_test": 4}
RUN = ["mesh.data=1", "mesh.fsdp=-1", "batch_size=4", "log_every=1", "checkpoint_every=2", "eval_batches=1",
       "tensorboard=False", "progress=False", "schedule.name='constant'", f"dataset.builder_overrides={DATA}",
       "async_checkpointing=False"]
VIDEO = ("tokenizer/video.py:tiny,gan=0", ["num_samples=2", "dataset.frames=5", "dataset.resolution=16",
                                          "model.base_channels=8", "model.channel_multipliers=(1,2)",
                                          "model.temporal_downsample=(True,)"])
# Two encoder blocks of one residual unit (hop 8 x 40 = 320 as in the preset): the codec's
# 4 blocks x 3 units took 2.5x longer to compile, and nothing here depends on its depth.
AUDIO = ("tokenizer/audio.py:tiny,gan=0", ["num_samples=2", "dataset.frames=5", "model.channels=4",
                                          "model.channel_multipliers=(2,4)", "model.strides=(8,40)",
                                          "model.dilations=(1,)"])

pytestmark = pytest.mark.slow


def flags(overrides):
    return [f"--config.{o}" for o in overrides]


@pytest.fixture(scope="module")
def tokenizer_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    d = config_lib.load_config(VIDEO[0], [f"dataset.data_dir={path}", f"dataset.builder_overrides={DATA}"]).dataset
    pipeline.open_dataset(d, "train")  # built once here, not raced by the processes
    return path


def run_tokenizer_across_layouts(launch, losses, spec, data_dir, root):
    name, extra = spec
    overrides = RUN + extra + [f"dataset.data_dir={data_dir}", "eval_every=1"]
    multi, straight = os.path.join(root, "multi"), os.path.join(root, "straight")
    launch(2, 2, "train", "--config", name, "--workdir", multi, *flags(overrides + ["total_steps=2"]))
    rows = read_metrics(multi)
    assert sorted(r["step"] for r in rows if "eval/loss" in r) == [1, 2]  # the eval rows every step, once
    assert workdir_lib.all_steps(multi) == [2]
    with open(os.path.join(multi, "checkpoints", "2", "data", "process_1-of-2.json")) as f:
        assert json.load(f)  # both processes' data positions
    # Resume on another layout (1 process x 4 devices): the pipeline seeks to example 8.
    launch(1, 4, "train", "--config", name, "--workdir", multi, *flags(overrides + ["total_steps=3"]))
    cfg = config_lib.load_config(name, overrides + ["total_steps=3", "eval_every=0"])
    loop.run(get_family("tokenizer"), cfg, straight, devices=jax.devices()[:4])
    a, b = losses(multi), losses(straight)
    assert sorted(a) == [1, 2, 3]
    # Equal up to float reassociation across layouts, which Adam's first updates amplify
    # (5.7e-4 seen at step 3); a wrong data position moves the loss by tens of percent.
    np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)], rtol=2e-3)
    return multi


def test_video_tokenizer_evaluates_on_every_process_and_resumes_on_another_layout(tokenizer_data, tmp_path, launch, losses):
    multi = run_tokenizer_across_layouts(launch, losses, VIDEO, tokenizer_data, str(tmp_path))
    assert sorted(os.listdir(os.path.join(multi, "samples"))) == ["index.html"] + [
        f"recon_00000{s}.{ext}" for s in (1, 2, 3) for ext in ("gallery.json", "mp4", "png")]  # 3: the resumed run's eval


def test_audio_tokenizer_evaluates_on_every_process_and_resumes_on_another_layout(tokenizer_data, tmp_path, launch, losses):
    multi = run_tokenizer_across_layouts(launch, losses, AUDIO, tokenizer_data, str(tmp_path))
    assert sorted(os.listdir(os.path.join(multi, "samples"))) == sorted(["index.html"] + [
        f"{kind}_00000{s}.{ext}" for s in (1, 2, 3) for kind, ext in (("orig", "wav"), ("recon", "wav"),
                                                                      ("recon", "gallery.json"))])


def test_generative_samples_on_every_process_resumes_and_its_checkpoint_samples_and_evaluates(
        tmp_path, data_dir, tokenizers, losses, launch):
    root = str(tmp_path)
    small_model = ["model.depth=1", "model.width=32", "model.mlp_dim=64", "model.num_heads=2",
                   "model.remat_policy='none'"]
    overrides = [o for o in RUN if not o.startswith("dataset.builder_overrides")] + small_model + [
        f"dataset.data_dir={data_dir}", "dataset.builder_overrides={'num_train': 16, 'num_test': 8}", "eval_every=1",
        f"tokenizers.video_workdir={tokenizers['video']}", f"tokenizers.audio_workdir={tokenizers['audio']}",
        "sampling.eval_tasks='frame_prediction'", "sampling.eval_num=1", "sampling.steps=2"]
    name = "generative/multitask.py:tiny"
    pipeline.open_dataset(config_lib.load_config(name, overrides).dataset, "train")
    multi, straight = os.path.join(root, "multi"), os.path.join(root, "straight")
    launch(2, 2, "train", "--config", name, "--workdir", multi, *flags(overrides + ["total_steps=2"]))
    assert sorted(r["step"] for r in read_metrics(multi) if "eval/accuracy" in r) == [1, 2]
    assert sorted(os.listdir(os.path.join(multi, "samples"))) == ["index.html"] + [
        f"step00000{s}_frame_prediction{suffix}" for s in (1, 2)
        for suffix in (".gallery.json", ".png", "_000.mp4", "_000_real.mp4", "_tokens.npz")]
    # The resume is about the data position and the losses (sampling on every process is shown
    # above): no eval there, which spares this process compiling the sampler.
    launch(1, 4, "train", "--config", name, "--workdir", multi, *flags(overrides + ["total_steps=3", "eval_every=0"]))
    cfg = config_lib.load_config(name, overrides + ["total_steps=3", "eval_every=0"])
    loop.run(get_family("generative"), cfg, straight, devices=jax.devices()[:4])
    a, b = losses(multi), losses(straight)
    np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)], rtol=2e-4)
    # The multi-process checkpoint samples with 2 processes (the model stays sharded over both)...
    out = os.path.join(root, "samples")
    res = launch(2, 2, "sample", "--workdir", multi, "--task", "audio_to_video", "--num", "2", "--out", out,
                 "--steps", "2")
    assert res.stdout.count("wrote 2 videos of audio_to_video") == 1  # process 0 reports (and writes)
    assert sorted(os.listdir(out)) == ["audio_to_video.gallery.json", "audio_to_video.png", "audio_to_video_000.mp4",
                                       "audio_to_video_000_real.mp4", "audio_to_video_001.mp4",
                                       "audio_to_video_001_real.mp4", "audio_to_video_tokens.npz", "index.html"]
    # ... and evaluates (FVD left out: ~13 s of I3D here; test_generative_eval.py and test_pretrained.py cover it).
    launch(1, 4, "eval", "--workdir", multi, "--num", "2", "--no-fvd")
    with open(os.path.join(multi, "eval.json")) as f:
        result = json.load(f)
    assert result["step"] == 3 and result["clips"] == 2 and result["token_accuracy"]
    # The height probes fit on the 16 distinct training clips, not on 1024 read round the split.
    assert {m: p["train_clips"] for m, p in result["height_probes"].items()} == {"video": 16, "audio": 16}

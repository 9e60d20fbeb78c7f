"""A user's own folder of videos, end to end, as the README walks through it: ``prepare`` holds
out a test split even for a handful of files, training runs through its first eval and
checkpoint, a dataset without the eval split stops before training in one line, and a
failing eval never loses the checkpoint of its step.

The folder holds generated mp4 files (moving colour fields with a tone); commands run
in-process through ``mmgen.commands.main``.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.data import media
from mmgen.families import get_family
from mmgen.train import loop
from mmgen.train.checkpoint import Checkpointer
from mmgen.train.metrics import read_metrics

TRAIN = ["--config.total_steps=2", "--config.eval_every=2", "--config.eval_batches=1", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.batch_size=8", "--config.model.base_channels=8",
         "--config.model.channel_multipliers=(1,2)", "--config.model.temporal_downsample=(True,)",
         "--config.dataset.resolution=16",
         "--config.async_checkpointing=False", "--config.tensorboard=False", "--config.progress=False"]


def _write_videos(folder, names, seconds=2.5, fps=8):
    os.makedirs(folder, exist_ok=True)
    t = np.arange(int(seconds * fps))
    for k, name in enumerate(names):
        rng = np.random.default_rng(k)
        field = rng.uniform(0, 255, (1, 6, 8, 3))
        video = np.stack([np.roll(np.kron(field, np.ones((1, 8, 8, 1)))[0], 3 * i, axis=1) for i in t]).astype(np.uint8)
        tone = 0.3 * np.sin(2 * np.pi * (300 + 50 * k) * np.arange(int(seconds * 16000)) / 16000)
        media.write_video(os.path.join(folder, name), video, fps=fps, audio=tone.astype(np.float32), sample_rate=16000)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_folder_of_a_few_videos_trains_through_its_first_eval_and_checkpoint(tmp_path, capsys):
    folder, data_dir, workdir = tmp_path / "my_videos", str(tmp_path / "tfds"), str(tmp_path / "vtok")
    _write_videos(folder, [f"take{i}.mp4" for i in range(4)])
    code, out, err = _run(capsys, "prepare", "--dataset", "video_folder/tiny", "--path", str(folder),
                          "--data-dir", data_dir)
    assert code == 0, err
    # 4 videos of 20 frames at 8 fps -> 2 clips of 9 each; the hash picks none below 0.1, so one is held out.
    assert "held out 1 of 4 videos as the test split (test_fraction 0.1 by a hash of the file path, at least one)" in out
    assert "test 2 examples" in out and "train 6 examples" in out
    code, out, err = _run(capsys, "train", "--config", "configs/tokenizer/video.py:tiny,gan=0", "--workdir", workdir,
                          "--config.dataset.name=video_folder/tiny", f"--config.dataset.data_dir={data_dir}", *TRAIN)
    assert code == 0, err
    rows = read_metrics(workdir)
    (evaluated,) = [r for r in rows if "eval/loss" in r]
    assert evaluated["step"] == 2 and np.isfinite(evaluated["eval/psnr"])
    assert Checkpointer(workdir, read_only=True).all_steps() == [2]
    assert os.path.exists(os.path.join(workdir, "samples", "recon_000002.mp4"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dataset"]["name"] == "video_folder/tiny"


def test_a_dataset_without_the_eval_split_stops_before_training_in_one_line(tmp_path, capsys):
    folder, data_dir, workdir = tmp_path / "one_video", str(tmp_path / "tfds"), tmp_path / "vtok"
    _write_videos(folder, ["only.mp4"])
    code, out, err = _run(capsys, "prepare", "--dataset", "video_folder/tiny", "--path", str(folder),
                          "--data-dir", data_dir)
    assert code == 0, err
    assert "no test split: only 1 usable video" in out
    code, out, err = _run(capsys, "train", "--config", "configs/tokenizer/video.py:tiny,gan=0", "--workdir",
                          str(workdir), "--config.dataset.name=video_folder/tiny", f"--config.dataset.data_dir={data_dir}",
                          *TRAIN)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("mmgen train: error: dataset video_folder/tiny in ") and "has no split 'test'" in line
    assert "--config.eval_every=0" in line
    assert not workdir.exists()  # stopped before anything was written


def test_a_failing_eval_keeps_the_checkpoint_written_at_its_step(tmp_path):
    def failing_eval(*args):
        raise RuntimeError("eval broke")

    family = dataclasses.replace(get_family("toy"), on_eval=failing_eval)
    cfg = config_lib.load_config("configs/toy.py:tiny", ["async_checkpointing=False", "tensorboard=False",
                                                         "progress=False", "total_steps=4", "checkpoint_every=2",
                                                         "eval_every=2"])
    with pytest.raises(RuntimeError, match="eval broke"):
        loop.run(family, cfg, str(tmp_path))
    assert Checkpointer(str(tmp_path), read_only=True).all_steps() == [2]  # the training up to the eval is kept
    resumed = loop.run(get_family("toy"), cfg, str(tmp_path))
    assert resumed["step"] == 4

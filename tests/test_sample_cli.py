"""Specification of ``python -m mmgen sample`` (mmgen/commands/sample.py, mmgen/generative/generator.py).

One tiny workdir for the whole file: numpy-initialised tokenizers and transformer
(the session's ``tokenizers``, tests/conftest.py), so nothing but sampling compiles.
"""

import os

import numpy as np
import pytest

import mmgen  # noqa: F401
from mmgen import commands as cli
from mmgen.data import media
from mmgen.families import generative as gen
from mmgen.generative import sampling


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir, tokenizers, generative_config, write_numpy_initialised):
    root = str(tmp_path_factory.mktemp("sample"))
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=["sampling.batch_size=2"])
    return write_numpy_initialised(gen.FAMILY, cfg, os.path.join(root, "generative"), seed=2, std=0.3)


def run(*argv):
    return cli.main(["sample", *map(str, argv)])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen sample: error: ") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_audio_video_writes_mp4s_with_sound_a_grid_and_tokens(workdir, tmp_path, capsys):
    out = tmp_path / "av"
    assert run("--workdir", workdir, "--task", "audio_video", "--num", 3, "--out", out, "--steps", 3) == 0
    assert f"wrote 3 videos of audio_video to {out}" in capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert names == ["audio_video.png", "audio_video_000.mp4", "audio_video_001.mp4", "audio_video_002.mp4",
                     "audio_video_tokens.npz"]
    clip = media.read_video(str(out / "audio_video_001.mp4"), sample_rate=16000)
    assert clip.video.shape == (9, 32, 32, 3) and clip.fps == 8.0
    assert clip.audio is not None and abs(len(clip.audio) - 18000) <= 1024
    tokens = np.load(out / "audio_video_tokens.npz")
    assert tokens["video_tokens"].shape == (3, 3, 8, 8) and tokens["audio_tokens"].shape == (3, 57, 4)
    assert 0 <= tokens["video_tokens"].min() and tokens["video_tokens"].max() < 1024
    assert 0 <= tokens["audio_tokens"].min() and tokens["audio_tokens"].max() < 256
    assert str(tokens["task"]) == "audio_video"
    assert not np.array_equal(tokens["video_tokens"][0], tokens["video_tokens"][1])  # samples differ


def test_prefix_condition_from_input_file_is_kept_and_compiled_once(workdir, tmp_path):
    """An odd-sized, short input is fitted to 9x32x32; in prefix mode its first latent frame is kept."""
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    path = str(tmp_path / "input.mp4")
    media.write_video(path, frames, fps=8.0)
    before = sampling._decode._cache_size()
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"fp{seed}"
        assert run("--workdir", workdir, "--task", "frame_prediction", "--num", 2, "--out", out, "--steps", 2,
                   "--input", path, "--seed", seed, "--config.conditioning=prefix") == 0
        outs.append(np.load(out / "frame_prediction_tokens.npz")["video_tokens"])
    assert sampling._decode._cache_size() == before + 1  # one compile for (task, shape)
    given = outs[0][0, 0]
    for tokens in outs:
        for sample in tokens:
            np.testing.assert_array_equal(sample[0], given)  # every sample keeps the input's frame 0
    assert not np.array_equal(outs[0][:, 1:], outs[1][:, 1:])  # the generated frames depend on the seed
    assert "frame_prediction.png" in os.listdir(tmp_path / "fp0")


def test_audio_only_task_writes_wav(workdir, tmp_path):
    out = tmp_path / "ac"
    assert run("--workdir", workdir, "--task", "audio_continuation", "--num", 1, "--out", out, "--steps", 2) == 0
    audio, rate = media.read_wav(str(out / "audio_continuation_000.wav"))
    assert rate == 16000 and len(audio) == 18000


def test_bad_task_and_bad_input_are_one_line_before_compiling(workdir, tmp_path, capsys):
    before = sampling._decode._cache_size()
    assert run("--workdir", workdir, "--task", "frame_predict", "--num", 1, "--out", tmp_path / "x") == 2
    assert "unknown task 'frame_predict'; valid tasks: class_conditional" in one_line_error(capsys)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    assert run("--workdir", workdir, "--task", "frame_prediction", "--out", tmp_path / "x", "--input", corrupt) == 2
    assert str(corrupt) in one_line_error(capsys)
    assert run("--workdir", workdir, "--task", "audio_to_video", "--out", tmp_path / "x",
               "--input", tmp_path / "missing.wav") == 2
    assert "missing.wav: no such file" in one_line_error(capsys)
    silent = str(tmp_path / "silent.mp4")
    media.write_video(silent, np.zeros((9, 32, 32, 3), np.uint8), fps=8.0)
    assert run("--workdir", workdir, "--task", "video_to_audio", "--out", tmp_path / "x", "--input", silent) == 0
    capsys.readouterr()
    assert run("--workdir", workdir, "--task", "audio_to_video", "--out", tmp_path / "x", "--input", silent) == 2
    assert "silent.mp4: has no audio stream" in one_line_error(capsys)
    assert run("--workdir", str(tmp_path), "--task", "audio_video", "--out", tmp_path / "x") == 2
    assert "is not a workdir (no config.json)" in one_line_error(capsys)
    assert sampling._decode._cache_size() == before + 1  # only the one valid run compiled
    assert not os.path.exists(tmp_path / "x" / "audio_to_video_000.mp4")


@pytest.mark.slow
def test_sample_works_on_an_adapter_workdir(workdir, tmp_path, capsys):
    """An adapter run on this workdir's transformer samples through the same command."""
    from mmgen import config as config_lib
    from mmgen.families import get_family
    from mmgen.train import loop

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load_config(
        os.path.join(root, "configs", "adapters", "flylora.py:tiny,tasks=frame_prediction,data_source=random_tokens"),
        ["batch_size=8", "total_steps=2", "log_every=1", "eval_every=0", "progress=False", "tensorboard=False",
         "async_checkpointing=False", f"base_workdir={workdir}"])
    adapter_dir = str(tmp_path / "adapter")
    loop.run(get_family("adapters"), cfg, adapter_dir)
    out = tmp_path / "fp"
    assert run("--workdir", adapter_dir, "--task", "frame_prediction", "--num", 2, "--out", out, "--steps", 2) == 0
    assert f"wrote 2 videos of frame_prediction to {out}" in capsys.readouterr().out
    clip = media.read_video(str(out / "frame_prediction_000.mp4"), sample_rate=16000)
    assert clip.video.shape == (9, 32, 32, 3)

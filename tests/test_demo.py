"""Specification of ``python -m mmgen demo``'s plumbing (mmgen/commands/demo.py, configs/generative/demo.py).

The demo itself trains three models (minutes); these tests check, without compiling
anything, that every stage's config is the tiny one with the demo's changes, that the
generative stage points at the tokenizer stages, and that overrides and mistakes
behave as the CLI promises.
"""

import os

import pytest

from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.commands import demo
from mmgen.errors import UserError
from mmgen.generative import tokens


def demo_config(arg=None, overrides=()):
    spec = "generative/demo.py" + (f":{arg}" if arg else "")  # the shipped config, found by name
    return config_lib.load_config(spec, overrides)


def test_stage_configs_are_the_tiny_ones_with_the_demo_changes(tmp_path):
    d = demo_config(overrides=["video_tokenizer.total_steps=7", "generative.batch_size=4"])
    data = str(tmp_path / "data")
    video = demo.stage_config(d, "video_tokenizer", data)
    audio = demo.stage_config(d, "audio_tokenizer", data)
    assert (video.family, video.modality, audio.modality) == ("tokenizer", "video", "audio")
    assert video.total_steps == 7 and video.batch_size == 8 and video.optimizer.b1 == 0.9
    assert video.model.base_channels == 16 and video.optimizer.b2 == 0.99  # the tiny config, b1 changed
    assert video.model.quantizer.kind == "vq" and video.model.quantizer.codebook_size == 1024  # 10 bits, as tiny
    assert video.loss.generator_weight == 0.0 and audio.loss.generator_weight == 0.0  # no GAN on a CPU
    # The codec 4x the tiny preset's width (C = 16): C = 4 and 8 do not carry the tone's pitch in the
    # demo's budget; at batch 4 its clips keep the tiny config's shape (16 kHz, hop 320).
    assert audio.model.channels == 16 and audio.model.quantizer.kind == "rvq" and audio.batch_size == 4
    assert audio.model.strides == (2, 4, 5, 8) and audio.dataset.sample_rate == 16000
    for cfg in (video, audio):  # one evaluation, at the last step
        assert cfg.eval_every >= cfg.total_steps > 0
        assert cfg.dataset.data_dir == data and cfg.dataset.name == "moving_shapes_av/tiny"
    # The demo's picture: one large shape on one colour, no distractors.
    assert video.dataset.builder_overrides.to_dict() == {"background": "plain", "max_distractors": 0,
                                                         "main_scale": 1.5, "num_train": 1000, "num_test": 200}
    generative = demo.stage_config(d, "generative", data, ["tokenizers.video_workdir='V'",
                                                          "tokenizers.audio_workdir='A'"])
    assert generative.batch_size == 4 and generative.total_steps == d.generative.total_steps
    assert (generative.tokenizers.video_workdir, generative.tokenizers.audio_workdir) == ("V", "A")
    # A few tasks trained (on cached tokens, so prefix conditioning); all 15 are still sampled.
    assert list(tokens.task_weights(generative)) == ["frame_prediction", "audio_to_video", "video_to_audio"]
    assert (generative.data_source, generative.conditioning) == ("token_cache", "prefix")


def test_video_tokenizer_learns_frames_first_then_starts_the_clip_stage_from_them(tmp_path):
    dirs, cfgs = demo.stage_configs(demo_config(), str(tmp_path), str(tmp_path / "data"))
    assert list(dirs) == ["video_tokenizer_frames", "video_tokenizer", "audio_tokenizer", "generative"]
    frames, clips = cfgs["video_tokenizer_frames"], cfgs["video_tokenizer"]
    assert frames.dataset.frames == 1 and clips.dataset.frames == 9
    assert clips.init_from == dirs["video_tokenizer_frames"] and not frames.init_from
    assert frames.model.to_dict() == clips.model.to_dict()  # the weights carry over only between equal models
    assert cfgs["generative"].tokenizers.video_workdir == dirs["video_tokenizer"]
    assert cfgs["generative"].token_cache == os.path.join(str(tmp_path), "token_cache")  # beside the stages
    # Without the frames stage the clip stage starts from scratch.
    dirs, cfgs = demo.stage_configs(demo_config(overrides=["video_tokenizer_frames.total_steps=0"]),
                                    str(tmp_path), str(tmp_path / "data"))
    assert "video_tokenizer_frames" not in dirs and not cfgs["video_tokenizer"].init_from


def test_fast_variant_is_a_few_steps_on_a_small_dataset():
    d = demo_config("fast")
    assert all(d[s].total_steps <= 3 for s in ("video_tokenizer_frames", "video_tokenizer", "audio_tokenizer",
                                               "generative"))
    overrides = d.dataset.builder_overrides.to_dict()
    assert (overrides["num_train"], overrides["num_test"], overrides["background"]) == (16, 8, "plain")


def test_bad_override_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["demo", "--workdir", str(tmp_path / "d"), "--config.video_tokenizer.total_stepz=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen demo: error: config has no key 'video_tokenizer.total_stepz'") and "\n" not in err
    assert not os.path.exists(tmp_path / "d")  # nothing written before the configs are checked
    with pytest.raises(UserError, match="no variant 'slow'"):
        demo_config("slow")

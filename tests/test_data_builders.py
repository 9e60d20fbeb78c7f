"""Specification of the TFDS builders: moving_shapes_av, video_folder, lookup by name."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmgen.data import media
from mmgen.data.builders import moving_shapes_av as msav
from mmgen.data.builders import sources, video_folder
from mmgen.errors import UserError

SMALL = {"frames": 5, "resolution": 16, "num_train": 16, "num_test": 8}


def _clip(seed, **kw):
    args = dict(frames=9, resolution=16, fps=8.0, sample_rate=16000)
    args.update(kw)
    return msav.generate_clip(np.random.default_rng(seed), **args)


# --------------------------------------------------------------------------------
# moving_shapes_av: the sound is tied to the picture
# --------------------------------------------------------------------------------


def test_height_to_pitch_is_monotone_two_octaves_and_inverted_exactly():
    assert msav.height_to_pitch(0.0) == pytest.approx(880.0)  # top of the frame: high
    assert msav.height_to_pitch(0.5) == pytest.approx(440.0)
    assert msav.height_to_pitch(1.0) == pytest.approx(220.0)  # bottom: low
    y = np.linspace(0, 1, 101)
    f = msav.height_to_pitch(y)
    assert np.all(np.diff(f) < 0)
    np.testing.assert_allclose(msav.pitch_to_height(f), y, atol=1e-12)


def test_same_seed_same_clip_and_other_seed_other_clip():
    a, b, c = _clip((0, 0, 3)), _clip((0, 0, 3)), _clip((0, 0, 4))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["video"], c["video"])


def _dominant_frequency(audio, centre, sample_rate, width=800):
    lo = int(np.clip(centre - width // 2, 0, len(audio) - width))
    window = audio[lo : lo + width] * np.hanning(width)
    spectrum = np.abs(np.fft.rfft(window, 1 << 16))
    freqs = np.fft.rfftfreq(1 << 16, 1 / sample_rate)
    band = (freqs > 150) & (freqs < 1000)
    return freqs[band][np.argmax(spectrum[band])]


def test_tone_pitch_follows_main_shape_height():
    errors = []
    for i in range(6):
        clip = _clip((1, 0, i))
        for k, pitch in enumerate(clip["pitch_hz"]):
            estimate = _dominant_frequency(clip["audio"], int(k / 8 * 16000), 16000)
            errors.append(abs(np.log2(estimate / pitch)))
        np.testing.assert_allclose(clip["pitch_hz"], msav.height_to_pitch(clip["main_y"]), rtol=1e-5)
    assert np.median(errors) < 0.03  # within 3% of an octave
    assert np.quantile(errors, 0.9) < 0.1


def test_clicks_sound_at_bounces_only():
    bounce_peak, quiet_peak, orbit_bounces = [], [], 0
    for i in range(30):
        clip = _clip((2, 0, i))
        motion = msav.CLASS_NAMES[clip["label"]].split("_")[1]
        if motion == "orbit":
            orbit_bounces += int(clip["bounce"].sum())
        # Peak of the high-passed sound (first difference) per frame: clicks are broadband
        # bursts; the tone's sample-to-sample change stays below 0.35 * 2 pi * 880 / 16000.
        per_frame = np.abs(np.diff(clip["audio"], append=0.0)).reshape(9, -1)[:, :-1].max(axis=1)
        bounce_peak += list(per_frame[clip["bounce"]])
        quiet_peak += list(per_frame[~clip["bounce"]])
    assert orbit_bounces == 0
    assert len(bounce_peak) >= 5
    assert np.median(bounce_peak) > 0.3 > np.quantile(quiet_peak, 0.95)


def test_plain_background_without_distractors_leaves_one_colour_and_the_main_shape():
    clip = _clip((0, 0, 7), background="plain", max_distractors=0, resolution=32)
    video = clip["video"].astype(int)
    corner = video[:, :2, :2].reshape(-1, 3)  # far from a shape of radius <= 0.2 at most of the times
    background = np.median(video.reshape(-1, 3), axis=0)
    assert (np.abs(corner - background).max(axis=1) <= 1).mean() > 0.9
    for frame, y in zip(video, clip["main_y"]):  # everything that is not background is the main shape
        rows = np.nonzero((np.abs(frame - background).max(axis=-1) > 8).any(axis=1))[0]
        assert rows.min() / 32 < y < (rows.max() + 1) / 32 and len(rows) == rows.max() - rows.min() + 1
        assert len(rows) <= 20  # one shape of radius <= 0.2 (a rotated square reaches 0.28), nothing else
    textured = _clip((0, 0, 7), resolution=32)["video"].astype(int)
    assert np.abs(textured - np.median(textured.reshape(-1, 3), axis=0)).max(axis=-1).mean() > 8
    with pytest.raises(ValueError, match="background must be"):
        msav.MovingShapesConfig(name="x", frames=3, resolution=8, num_train=1, num_test=1, background="noise")


def test_main_scale_scales_the_main_shape_and_leaves_the_data_alone_at_one():
    def shape_pixels(clip):  # per frame: pixels off the one background colour (plain, no distractors)
        video = clip["video"].astype(int)
        background = np.median(video.reshape(-1, 3), axis=0)
        return (np.abs(video - background).max(axis=-1) > 8).sum(axis=(1, 2)).mean()

    kw = dict(background="plain", max_distractors=0, resolution=32)
    ratios = [shape_pixels(_clip((0, 0, i), main_scale=1.5, **kw)) / shape_pixels(_clip((0, 0, i), **kw))
              for i in range(4)]
    assert 1.8 < np.mean(ratios) < 2.7  # area grows as the radius squared: 1.5^2 = 2.25
    same = _clip((0, 0, 3), **kw)
    assert np.array_equal(_clip((0, 0, 3), main_scale=1.0, **kw)["video"], same["video"])  # the default is unchanged
    with pytest.raises(ValueError, match="main_scale must be in"):
        msav.MovingShapesConfig(name="x", frames=3, resolution=8, num_train=1, num_test=1, main_scale=3.0)


def test_override_mistakes_are_user_errors():
    # A UserError is what the CLI prints as one line (exit 2); overrides now take any key from flags.
    with pytest.raises(UserError, match=r"background must be one of \('texture', 'plain'\), not 'noise'"):
        sources.make_config("moving_shapes_av", "tiny", {"background": "noise"})
    with pytest.raises(UserError, match=r"has no field\(s\) \['bogus'\]"):
        sources.make_config("moving_shapes_av", "tiny", {"bogus": 1})
    with pytest.raises(UserError, match="has no config 'huge'"):
        sources.make_config("moving_shapes_av", "huge")


def test_labels_cover_all_nine_families():
    labels = [_clip((3, 0, i), resolution=8, sample_rate=1000)["label"] for i in range(300)]
    assert len(msav.CLASS_NAMES) == 9
    assert np.bincount(labels, minlength=9).min() > 15


def test_builder_produces_declared_features_and_is_reproducible(tmp_path):
    for data_dir in (tmp_path / "a", tmp_path / "b"):
        sources.build("moving_shapes_av", str(data_dir), config="tiny", overrides=SMALL)
    name = "moving_shapes_av/" + sources.derived_config_name("tiny", SMALL)
    ds = tfds.data_source(name, data_dir=str(tmp_path / "a"), download=False)
    again = tfds.data_source(name, data_dir=str(tmp_path / "b"), download=False)
    assert len(ds["train"]) == 16 and len(ds["test"]) == 8
    audio_len = round(5 / 8 * 16000)
    for i in range(len(ds["train"])):
        ex = ds["train"][i]
        assert ex["video"].shape == (5, 16, 16, 3) and ex["video"].dtype == np.uint8
        assert ex["audio"].shape == (audio_len,) and ex["audio"].dtype == np.float32
        assert np.abs(ex["audio"]).max() <= 1.0 and np.abs(ex["audio"]).max() > 0.1
        assert 0 <= ex["label"] < 9 and bool(ex["has_audio"])
        assert ex["main_y"].shape == ex["pitch_hz"].shape == ex["bounce"].shape == (5,)
        other = again["train"][i]
        for key in ("video", "audio", "main_y"):
            np.testing.assert_array_equal(ex[key], other[key])
    meta = ds["train"].dataset_info.metadata
    assert meta["fps"] == 8.0 and meta["sample_rate"] == 16000
    assert ds["train"].dataset_info.features["label"].names == list(msav.CLASS_NAMES)


def test_train_and_test_splits_hold_different_clips(tmp_path):
    sources.build("moving_shapes_av", str(tmp_path), config="tiny", overrides=SMALL)
    src, _ = sources.open_split("moving_shapes_av/" + sources.derived_config_name("tiny", SMALL), "train", str(tmp_path))
    test, _ = sources.open_split("moving_shapes_av/" + sources.derived_config_name("tiny", SMALL), "test", str(tmp_path))
    train_hashes = {src[i]["video"].tobytes() for i in range(len(src))}
    assert not train_hashes & {test[i]["video"].tobytes() for i in range(len(test))}
    assert len(train_hashes) == 16


# --------------------------------------------------------------------------------
# video_folder: good files become clips, bad ones are skipped and reported
# --------------------------------------------------------------------------------


def _noise_video(t, h=24, w=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.cumsum(rng.integers(-6, 7, (t, h, w, 3)), axis=0) + 128, 0, 255).astype(np.uint8)


@pytest.fixture
def video_dir(tmp_path):
    root = tmp_path / "videos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    sound = 0.3 * np.sin(2 * np.pi * 330 * np.arange(40000) / 16000).astype(np.float32)
    media.write_video(root / "cats" / "purr.mp4", _noise_video(20), fps=8, audio=sound[: 20 * 2000])
    media.write_video(root / "dogs" / "run.mov", _noise_video(24, seed=1), fps=16)  # silent, 16 fps
    good = (root / "cats" / "purr.mp4").read_bytes()
    (root / "cats" / "cut.mp4").write_bytes(good[: len(good) // 2])
    (root / "dogs" / "empty.mp4").write_bytes(b"")
    (root / "dogs" / "readme.mp4").write_text("not a video\n")
    return root


def test_video_folder_builds_good_files_and_reports_bad_ones(video_dir, tmp_path, caplog):
    data_dir = str(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        builder = sources.build("video_folder", data_dir, config="tiny", path=str(video_dir))
    skipped = dict(builder.skipped)
    assert set(skipped) == {os.path.join("cats", "cut.mp4"), os.path.join("dogs", "empty.mp4"),
                            os.path.join("dogs", "readme.mp4")}
    assert "empty" in skipped[os.path.join("dogs", "empty.mp4")]
    assert sum("skipping" in r.message for r in caplog.records) == 3

    directory = sources.find_prepared("video_folder/tiny", data_dir)
    with open(os.path.join(directory, "metadata.json")) as f:
        assert json.load(f)["num_skipped"] == 3
    examples = []
    for split in builder.info.splits:
        src, info = sources.open_split("video_folder/tiny", split, data_dir)
        examples += [src[i] for i in range(len(src))]
    assert info.class_names == ["cats", "dogs"]
    # purr.mp4: 20 frames at 8 fps -> clips at 0 and 9; run.mov: 24 frames at 16 fps = 12 at 8 fps -> 1 clip.
    by_source = sorted((ex["source"].decode(), int(ex["start_frame"])) for ex in examples)
    assert by_source == [("cats/purr.mp4", 0), ("cats/purr.mp4", 9), ("dogs/run.mov", 0)]
    for ex in examples:
        assert ex["video"].shape == (9, 32, 32, 3) and ex["audio"].shape == (18000,)
        if ex["source"] == b"dogs/run.mov":
            assert ex["label"] == 1 and not ex["has_audio"] and not ex["audio"].any()
        else:
            assert ex["label"] == 0 and ex["has_audio"] and np.abs(ex["audio"]).max() > 0.2


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"")
    (root / "b.webm").write_text("text")
    data_dir = str(tmp_path / "data")
    with pytest.raises(video_folder.VideoFolderError, match="all 2 files were skipped"):
        sources.build("video_folder", data_dir, config="tiny", path=str(root))
    assert sources.find_prepared("video_folder/tiny", data_dir) is None
    leftovers = [d for _, dirs, _ in os.walk(data_dir) for d in dirs if d.startswith("incomplete") or d == "1.0.0"]
    assert leftovers == []
    with pytest.raises(sources.DatasetNotPreparedError):
        sources.open_split("video_folder/tiny", "train", data_dir)


_NO_TENSORFLOW = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorflow") is not None, reason="checks the build without TensorFlow"
)


@_NO_TENSORFLOW
def test_split_over_tfds_spill_size_builds_without_tensorflow(tmp_path, monkeypatch):
    # TFDS spills a split over MAX_MEM_BUFFER_SIZE (1 GB) to disk through tf.io.gfile; shrink it so
    # that 16 small clips cross it: the build must still succeed, in memory, and be readable.
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10_000)
    data_dir = str(tmp_path / "data")
    sources.build("moving_shapes_av", data_dir, config="tiny", overrides=SMALL)
    source, _ = sources.open_split(f"moving_shapes_av/{sources.derived_config_name('tiny', SMALL)}", "train", data_dir)
    assert len(source) == SMALL["num_train"]
    assert shuffle.MAX_MEM_BUFFER_SIZE == 10_000  # restored after the build


@_NO_TENSORFLOW
def test_split_over_memory_is_one_clear_line_and_leaves_nothing(tmp_path, monkeypatch):
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10_000)
    monkeypatch.setattr(sources, "_memory_bytes", lambda: 100_000)  # allows 50 kB: less than 16 clips
    data_dir = str(tmp_path / "data")
    with pytest.raises(UserError) as info:
        sources.build("moving_shapes_av", data_dir, config="tiny", overrides=SMALL)
    message = str(info.value)
    name = f"moving_shapes_av/{sources.derived_config_name('tiny', SMALL)}"
    assert name in message and "tensorflow" in message and "\n" not in message
    assert sources.find_prepared(name, data_dir) is None
    assert shuffle.MAX_MEM_BUFFER_SIZE == 10_000


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError) as info:
        sources.open_split("ucf101", "train", str(tmp_path))
    message = str(info.value)
    assert "ucf101" in message and str(tmp_path) in message and "\n" not in message
    assert "array_record" in message


# --------------------------------------------------------------------------------
# prepare: the entry point behind `python -m mmgen prepare`
# --------------------------------------------------------------------------------


def test_prepare_reports_where_and_what_was_skipped(video_dir, tmp_path, capsys):
    from mmgen.commands import prepare

    data_dir = str(tmp_path / "prepared")
    assert prepare.prepare("video_folder", data_dir, path=str(video_dir), config="tiny") == 0
    out = capsys.readouterr().out
    assert f"prepared video_folder/tiny in {data_dir}" in out
    assert "skipped 3 file(s)" in out and "empty.mp4: file is empty" in out
    assert prepare.prepare("video_folder/tiny", data_dir, path=str(video_dir)) == 0
    assert "already prepared" in capsys.readouterr().out


def test_prepare_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from mmgen.commands import prepare

    assert prepare.prepare("video_folder", str(tmp_path)) == 2
    assert prepare.prepare("video_folder", str(tmp_path), path=str(tmp_path / "nowhere")) == 2
    assert prepare.prepare("moving_shapes_av", str(tmp_path), config="huge") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("mmgen prepare: error: ") for line in err)
    assert "--path" in err[0] and "nowhere" in err[1] and "'huge'" in err[2]


def test_hold_out_keeps_a_stable_tenth_and_at_least_one_of_two_or_more_videos():
    many = [(f"clip_{i:03d}.mp4", "unlabeled") for i in range(400)]
    train, test = video_folder.hold_out(many, 0.1)
    assert 20 <= len(test) <= 60 and len(train) + len(test) == 400 and not set(train) & set(test)
    assert video_folder.hold_out(list(reversed(many)), 0.1)[1] == sorted(test, reverse=True)  # by name, not order
    few = [(f"take{i}.mp4", "unlabeled") for i in range(4)]
    train, test = video_folder.hold_out(few, 0.1)
    assert len(test) == 1 and len(train) == 3  # none hashes below 0.1: the smallest hash is held out
    assert test == [min(few, key=lambda f: video_folder._hash_fraction(f[0]))]
    assert video_folder.hold_out(few[:1], 0.1) == (few[:1], [])  # one video: nothing to hold out
    assert video_folder.hold_out(few, 0.0) == (few, [])  # test_fraction 0: asked for none
    # A train/ folder without test/ is split the same way; given test/ is kept as it is.
    assert video_folder.assign_splits({"train": few}, 0.1) == {"train": train, "test": test}
    assert video_folder.assign_splits({"train": few[:2], "test": few[2:]}, 0.1) == {"train": few[:2], "test": few[2:]}

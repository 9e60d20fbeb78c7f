"""Specification of mmgen.data.pipeline: batch contract, determinism, resumption, hosts."""

import io
import itertools
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P
from PIL import Image

from mmgen.data import pipeline
from mmgen.data.builders import sources

NUM_TRAIN, NUM_TEST = 24, 8


def _cfg(data_dir, **changes):
    cfg = pipeline.default_dataset_config()
    cfg.data_dir = data_dir
    cfg.builder_overrides = {"num_train": NUM_TRAIN, "num_test": NUM_TEST}
    for key, value in changes.items():
        target = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cfg


def _no_augment(cfg):
    cfg.augment.random_crop = cfg.augment.random_flip = cfg.augment.temporal_jitter = False
    return cfg


@pytest.fixture(scope="module")
def stored(data_dir):
    """The prepared train split as a list of examples (built on first use by the pipeline)."""
    it = pipeline.make_iterator(_cfg(data_dir), split="train", global_batch_size=4, seed=0, train=True)
    next(it)
    src, _ = sources.open_split(pipeline.dataset_name(_cfg(data_dir)), "train", data_dir)
    return [src[i] for i in range(len(src))]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_missing_moving_shapes_is_built_with_a_message(tmp_path, capsys):
    cfg = _cfg(str(tmp_path), **{"builder_overrides": {"num_train": 4, "num_test": 4}})
    batch = next(pipeline.make_iterator(cfg, split="test", global_batch_size=4, seed=0, train=False))
    assert "building it now" in capsys.readouterr().out
    assert batch["video"].shape == (4, 9, 32, 32, 3)
    assert sources.find_prepared(pipeline.dataset_name(cfg), str(tmp_path)) is not None


def test_batch_follows_the_conventions(data_dir, stored):
    cfg = _cfg(data_dir, extra_features="main_y,bounce")
    batch = next(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, train=True))
    assert batch["video"].shape == (8, 9, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert batch["audio"].shape == (8, 18000) and batch["audio"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["has_audio"].shape == (8,) and batch["has_audio"].dtype == np.bool_ and batch["has_audio"].all()
    assert batch["main_y"].shape == (8, 9) and batch["bounce"].dtype == np.bool_
    assert np.abs(batch["audio"]).max() <= 1.0


def test_same_seed_same_batches_other_seed_other_batches(data_dir, stored):
    cfg = _cfg(data_dir)
    first = _take(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=7, train=True), 4)
    second = _take(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=7, train=True), 4)
    other = _take(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=8, train=True), 4)
    _assert_same(first, second)
    assert not np.array_equal(first[0]["video"], other[0]["video"])


def test_resumed_iterator_yields_exactly_the_uninterrupted_batches(data_dir, stored):
    cfg = _cfg(data_dir)
    make = lambda: pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=3, train=True)
    uninterrupted = _take(make(), 7)  # 3 batches per epoch: crosses two epoch boundaries
    interrupted = make()
    _take(interrupted, 2)
    state = interrupted.get_state()
    json.loads(state)  # checkpointable as plain JSON bytes
    resumed = make()
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), uninterrupted[2:])


def _index_of(stored, video):
    matches = [i for i, ex in enumerate(stored) if np.array_equal(ex["video"], video)]
    assert len(matches) == 1
    return matches[0]


def test_processes_get_disjoint_slices_covering_each_epoch(data_dir, stored):
    cfg = _no_augment(_cfg(data_dir))
    seen = {}
    for process in (0, 1):
        it = pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=5, train=True,
                                    process_index=process, process_count=2, num_epochs=1)
        batches = list(it)
        assert len(batches) == NUM_TRAIN // 8 and batches[0]["video"].shape[0] == 4
        seen[process] = [_index_of(stored, v) for b in batches for v in b["video"]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_TRAIN))
    assert seen[0] + seen[1] != list(range(NUM_TRAIN))  # shuffled, not in storage order


def test_each_epoch_is_a_new_permutation_of_all_examples(data_dir, stored):
    cfg = _no_augment(_cfg(data_dir))
    it = pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=1, train=True, num_epochs=2)
    order = [_index_of(stored, v) for b in it for v in b["video"]]
    assert len(order) == 2 * NUM_TRAIN
    assert sorted(order[:NUM_TRAIN]) == sorted(order[NUM_TRAIN:]) == list(range(NUM_TRAIN))
    assert order[:NUM_TRAIN] != order[NUM_TRAIN:]


def test_eval_is_deterministic_unshuffled_and_unaugmented(data_dir, stored):
    cfg = _cfg(data_dir)
    a = list(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, train=False))
    b = list(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=99, train=False))
    _assert_same(a, b)
    assert len(a) == NUM_TRAIN // 8
    np.testing.assert_array_equal(a[0]["video"][3], stored[3]["video"])
    np.testing.assert_array_equal(a[0]["audio"][3], stored[3]["audio"])
    assert len(list(pipeline.make_iterator(cfg, split="test", global_batch_size=3, seed=0, train=False))) == 2


def test_one_clip_batches_keep_every_read_thread_busy_without_a_warning(data_dir, stored, caplog):
    """grain warns (and idles threads) when fewer reads may be in flight than it has threads:
    the token cache reads one clip per batch with 4 threads."""
    cfg = _cfg(data_dir)
    with caplog.at_level("WARNING"):
        clips = list(pipeline.make_iterator(cfg, split="test", global_batch_size=1, seed=0, train=False))
    assert len(clips) == NUM_TEST
    assert not [r for r in caplog.records if "prefetch_buffer_size" in r.getMessage()]


def test_flip_mirrors_video_and_x_coordinates(data_dir, stored):
    cfg = _no_augment(_cfg(data_dir, extra_features="main_x,main_y"))
    cfg.augment.random_flip = True
    batches = _take(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=2, train=True), 3)
    flips = 0
    for batch in batches:
        for video, x, y in zip(batch["video"], batch["main_x"], batch["main_y"]):
            flipped = video[:, :, ::-1]
            matches = [ex for ex in stored if np.array_equal(ex["video"], video) or np.array_equal(ex["video"], flipped)]
            assert len(matches) == 1
            ex = matches[0]
            if np.array_equal(ex["video"], flipped):
                flips += 1
                np.testing.assert_allclose(x, 1.0 - ex["main_x"], atol=1e-6)
            else:
                np.testing.assert_allclose(x, ex["main_x"], atol=1e-6)
            np.testing.assert_allclose(y, ex["main_y"], atol=1e-6)
    assert 0 < flips < 24


def test_random_crop_keeps_shape_and_remaps_heights(data_dir, stored):
    cfg = _no_augment(_cfg(data_dir, extra_features="main_y"))
    cfg.augment.random_crop, cfg.augment.min_crop_scale = True, 0.5
    batch = next(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=4, train=True))
    assert batch["video"].shape == (8, 9, 32, 32, 3)
    # Each height is a stored one seen through some square crop: y' = (32 y - top) / side.
    stored_heights = np.stack([ex["main_y"] for ex in stored])
    sides = []
    for y in batch["main_y"]:
        fits = [side for side in range(16, 33) for top in range(33 - side)
                if np.abs((stored_heights * 32 - top) / side - y).max(axis=1).min() < 1e-5]
        assert fits
        sides.append(max(fits))
    assert min(sides) < 32  # and at least one clip really was cropped


def test_temporal_window_and_frame_rate_keep_sound_aligned(data_dir, stored):
    cfg = _no_augment(_cfg(data_dir, frames=5, fps=4.0))  # every 2nd stored frame, 1.25 s
    batch = next(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, train=False))
    np.testing.assert_array_equal(batch["video"][0], stored[0]["video"][::2])
    np.testing.assert_array_equal(batch["audio"][0][:18000], stored[0]["audio"])
    assert batch["audio"].shape == (8, 20000) and not batch["audio"][0][18000:].any()  # past the end: silence

    cfg = _cfg(data_dir, frames=5, **{"augment.random_crop": False, "augment.random_flip": False})
    jittered = next(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, train=True))
    starts = set()
    for video, audio in zip(jittered["video"], jittered["audio"]):
        ex = next(e for e in stored if any(np.array_equal(e["video"][s : s + 5], video) for s in range(5)))
        start = next(s for s in range(5) if np.array_equal(ex["video"][s : s + 5], video))
        np.testing.assert_array_equal(audio, ex["audio"][start * 2000 : start * 2000 + 10000])
        starts.add(start)
    assert len(starts) > 1


def test_audio_is_resampled_to_the_configured_rate(data_dir, stored):
    cfg = _cfg(data_dir, sample_rate=8000)
    batch = next(pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, train=False))
    assert batch["audio"].shape == (8, 9000)
    spectrum = lambda a, sr: np.fft.rfftfreq(len(a), 1 / sr)[np.argmax(np.abs(np.fft.rfft(a[:2000])))]
    assert spectrum(batch["audio"][0], 8000) == pytest.approx(spectrum(stored[0]["audio"][::2], 8000), abs=8)


def test_to_global_batch_shards_over_data_and_fsdp(data_dir, stored):
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batch = next(pipeline.make_iterator(_cfg(data_dir), split="train", global_batch_size=8, seed=0, train=True))
    batch["source"] = np.array([b"x"] * 8)  # non-numeric entries stay on the host
    arrays = pipeline.to_global_batch(batch, mesh)
    assert set(arrays) == {"video", "audio", "label", "has_audio"}
    assert arrays["video"].sharding.spec == P(("data", "fsdp"), None, None, None, None)
    assert arrays["video"].addressable_shards[0].data.shape == (1, 9, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(arrays["audio"]), batch["audio"])


def test_unprepared_registered_dataset_is_one_clear_error(tmp_path):
    cfg = _cfg(str(tmp_path), name="ucf101", builder_overrides={})
    with pytest.raises(sources.DatasetNotPreparedError) as info:
        pipeline.make_iterator(cfg, split="train", global_batch_size=2, seed=0, train=True)
    assert "ucf101" in str(info.value) and "\n" not in str(info.value)


class RobotPushingFixture(tfds.core.GeneratorBasedBuilder):
    """Stands in for a registered TFDS video dataset (bair_robot_pushing_small's feature names).

    Frames are stored as PNG byte strings, exactly how ``tfds.features.Video`` stores
    them; the test then declares the feature as ``Video`` in features.json, which TFDS
    cannot decode without TensorFlow, so the pipeline's own decoder must take over.
    """

    VERSION = tfds.core.Version("2.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image_main": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_), length=6),
            "action": tfds.features.Tensor(shape=(6, 4), dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            frames = []
            for k in range(6):
                buf = io.BytesIO()
                Image.fromarray(np.full((20, 24, 3), 10 * i + k, np.uint8)).save(buf, format="PNG")
                frames.append(buf.getvalue())
            yield i, {"image_main": frames, "action": np.full((6, 4), i, np.float32)}


def test_registered_video_dataset_is_read_without_tensorflow(tmp_path):
    builder = RobotPushingFixture(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    features_json = os.path.join(builder.data_dir, "features.json")
    with open(features_json) as f:
        features = json.load(f)
    features["featuresDict"]["features"]["image_main"] = {
        "pythonClassName": "tensorflow_datasets.core.features.video_feature.Video",
        "video": {"shape": {"dimensions": ["6", "20", "24", "3"]}, "dtype": "uint8", "encodingFormat": "png"},
    }
    with open(features_json, "w") as f:
        json.dump(features, f)

    cfg = _no_augment(_cfg(str(tmp_path), name="robot_pushing_fixture", builder_overrides={},
                           frames=3, resolution=16, fps=4.0, source_fps=8.0))
    source, _ = pipeline.open_dataset(cfg, "train")
    assert type(source).__name__ == "EncodedExampleSource"
    batch = next(pipeline.make_iterator(cfg, split="train", global_batch_size=4, seed=0, train=False))
    assert batch["video"].shape == (4, 3, 16, 16, 3)
    assert not batch["has_audio"].any() and not batch["audio"].any() and not batch["label"].any()
    values = {int(v) for v in batch["video"][:, :, 8, 8, 0].reshape(-1)}
    assert values == {10 * i + k for i, k in itertools.product(range(4), (0, 2, 4))}


def test_asking_for_longer_clips_than_stored_is_a_clear_error(data_dir, stored):
    cfg = _cfg(data_dir, frames=17)
    with pytest.raises(ValueError, match="stores clips of 9 frames at 8 fps, too short for dataset.frames=17"):
        pipeline.make_iterator(cfg, split="train", global_batch_size=8, seed=0, train=True)

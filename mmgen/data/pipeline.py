"""Input pipeline: a grain ``DataLoader`` over a prepared TFDS dataset -> numpy batches.

``make_iterator(cfg.dataset, split=..., global_batch_size=..., seed=..., train=...)``
gives an iterator of host-local batches (``global_batch_size // process_count``
examples) following docs/CONVENTIONS.md::

    video      uint8   [B, T, R, R, 3]      T = dataset.frames, R = dataset.resolution
    audio      float32 [B, S] in [-1, 1]    S = round(T / fps * sample_rate)
    label      int32   [B]
    has_audio  bool    [B]
    (+ any ``dataset.extra_features``, e.g. moving_shapes_av's ``main_y`` [B, T])

Order of work, per example: read (ArrayRecord, random access) -> map the dataset's
feature names onto ours -> temporal window (a random start on the source frame grid
when ``augment.temporal_jitter`` and the stored clip is longer than needed; the
first frames otherwise; frames resampled from the stored rate to ``fps`` by
sample-and-hold; the sound cut with the same times and resampled to
``sample_rate``) -> spatial (training: a random square crop of
``[min_crop_scale, 1]`` times the short side, resized to R, and a random horizontal
flip; evaluation: centre square crop resized to R) -> batch (drop remainder).

Determinism and resumption. Epoch ``e`` visits the records in the permutation
``default_rng([seed, e]).permutation(N)``, truncated to a multiple of the process
count; global batch ``k`` is stream positions ``[k G, (k+1) G)``, process ``p`` holding
rows ``[p b, (p+1) b)`` of it (``EpochShuffleSampler``), so processes see disjoint slices
covering each epoch (a global shuffle, re-drawn every epoch) and a global batch is the
same, row for row, on any number of processes. Example ``i``'s augmentation draws from
``default_rng([seed, i])``. The
iterator is grain's ``DataLoaderIterator``: ``get_state()`` (bytes, stored in
checkpoints beside the model) and ``set_state()`` resume at exactly the next batch.
Same seed, same process layout and same ``num_workers`` -> same batches.

Elastic resume: with ``num_workers=0`` global batch ``k`` is stream positions
``[k G, (k+1) G)`` whatever the process count, so ``seek(iterator, examples, ...)`` puts
a fresh iterator of any process layout right after ``examples`` examples in constant
time (no batch is read). With worker processes each worker reads its own interleaved
slice, and a seek gives every worker its share of ``examples``.

If ``moving_shapes_av`` (or a ``video_folder`` with ``dataset.path`` set) is not
prepared in ``data_dir`` it is built first (it needs no download); any other dataset
must be prepared already (one clear error line says how).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from fractions import Fraction

import grain.python as grain
import jax
import ml_collections
import numpy as np
from absl import flags as absl_flags
from PIL import Image
from scipy import signal

from mmgen.data import media
from mmgen.data.builders import sources
from mmgen.errors import UserError
from mmgen.parallel.sharding import global_batch as to_global_batch  # noqa: F401  (re-exported)

# Feature names other datasets use for our modalities, tried in order when
# ``dataset.features.<ours>`` is empty.
FEATURE_ALIASES = {
    "video": ("video", "image_main", "frames", "rgb", "images", "image"),
    "audio": ("audio", "sound", "waveform", "audio_waveform"),
    "label": ("label", "label_id", "class", "action_label"),
    "has_audio": ("has_audio",),
}


def default_dataset_config() -> ml_collections.ConfigDict:
    """The ``dataset`` block of every training config (defaults: tiny moving_shapes_av)."""
    c = ml_collections.ConfigDict()
    c.name = "moving_shapes_av/tiny"  # any prepared TFDS name, "name" or "name/config"
    c.builder_config = ""  # config when ``name`` has none; "" = the only (or default) one
    c.builder_overrides = ml_collections.ConfigDict()  # our builders only: e.g. num_train=16
    c.data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    c.path = ""  # video_folder: the folder of videos (built automatically when set)
    c.auto_prepare = True  # build our datasets when missing
    c.frames = 9
    c.resolution = 32
    c.fps = 8.0
    c.sample_rate = 16000
    c.source_fps = 0.0  # stored frame rate when the dataset does not record it (0: = fps)
    c.source_sample_rate = 0  # stored audio rate when the dataset does not record it (0: = sample_rate)
    c.features = ml_collections.ConfigDict({"video": "", "audio": "", "label": ""})  # "" = auto
    c.extra_features = ""  # comma-separated extra features passed through, e.g. "main_y,bounce"
    c.augment = ml_collections.ConfigDict(
        {"random_crop": True, "min_crop_scale": 0.8, "random_flip": True, "temporal_jitter": True}
    )
    c.num_workers = 0  # grain worker processes; 0 = read and preprocess in this process
    c.prefetch = 2  # batches each worker prepares ahead
    c.read_threads = 4  # threads reading records
    return c


# --------------------------------------------------------------------------------
# Opening a dataset (building ours when missing)
# --------------------------------------------------------------------------------


def dataset_name(dataset_cfg) -> str:
    """Full TFDS name "ds/config" the config points at (overrides give a derived config)."""
    name = dataset_cfg.name
    overrides = builder_overrides(dataset_cfg)
    if "/" in name:
        base, config = name.split("/", 1)
    else:
        base, config = name, dataset_cfg.get("builder_config", "") or None
    if overrides:
        if base not in sources.OUR_BUILDERS:
            raise UserError(f"dataset.builder_overrides only apply to {sorted(sources.OUR_BUILDERS)}, not {base}")
        config = sources.derived_config_name(config or sources.OUR_BUILDERS[base].DEFAULT_BUILDER_CONFIG_NAME, overrides)
    elif config is None and base in sources.OUR_BUILDERS:
        config = sources.OUR_BUILDERS[base].DEFAULT_BUILDER_CONFIG_NAME
    return f"{base}/{config}" if config else base


def builder_overrides(dataset_cfg) -> dict:
    """``dataset.builder_overrides`` as a plain dict ({} when unset)."""
    overrides = dataset_cfg.get("builder_overrides", None)
    if overrides is None:
        return {}
    return overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)


def open_dataset(dataset_cfg, split: str):
    """(source, SourceInfo) for one split, preparing our datasets first when missing."""
    name, data_dir = dataset_name(dataset_cfg), os.path.expanduser(dataset_cfg.data_dir)
    base, _ = sources.split_name(name)
    buildable = base == "moving_shapes_av" or (base == "video_folder" and dataset_cfg.get("path", ""))
    if dataset_cfg.get("auto_prepare", True) and buildable and sources.find_prepared(name, data_dir) is None:
        if jax.process_index() != 0:
            # One builder per job: process 0 builds, the others wait for the finished dataset
            # (TFDS renames it into place only when complete). No collective, so any subset
            # of processes may open a split at any time.
            _wait_for_prepared(name, data_dir)
            return sources.open_split(name, split, data_dir)
        base_config = dataset_cfg.name.split("/", 1)[1] if "/" in dataset_cfg.name else dataset_cfg.get("builder_config", "")
        print(f"mmgen: {name} is not prepared in {data_dir}; building it now (no download needed)", flush=True)
        try:
            sources.build(base, data_dir, config=base_config or None, path=dataset_cfg.get("path", "") or None,
                          overrides=builder_overrides(dataset_cfg))
        except OSError:
            # Another process (same data_dir) may have finished the same build first.
            if sources.find_prepared(name, data_dir) is None:
                raise
    return sources.open_split(name, split, data_dir)


PREPARE_WAIT_S = 6 * 3600  # how long the other processes wait for process 0 to build a dataset


def _wait_for_prepared(name: str, data_dir: str, poll_s: float = 2.0) -> None:
    deadline = time.monotonic() + PREPARE_WAIT_S
    while sources.find_prepared(name, data_dir) is None:
        if time.monotonic() > deadline:
            raise UserError(f"{name} did not appear in {data_dir} within {PREPARE_WAIT_S} s while process 0 built it; "
                            f"prepare it first with `mmgen prepare --dataset {name} --data-dir {data_dir}`")
        time.sleep(poll_s)


def split_size(dataset_cfg, split: str) -> int:
    """Examples in ``split`` (preparing our datasets first when missing)."""
    _, info = open_dataset(dataset_cfg, split)
    return int(info.num_examples[split])


def eval_epochs(dataset_cfg, split: str, global_batch_size: int) -> int:
    """Passes over ``split`` that give an evaluation at least one whole batch: 1, or more
    (clips repeated) when the split holds fewer clips than a batch, e.g. a few held-out videos."""
    return max(1, -(-int(global_batch_size) // max(1, split_size(dataset_cfg, split))))


def check_eval_split(dataset_cfg, split: str, every: int) -> None:
    """Stop before training when the evals (every ``every`` steps) would find no ``split``.

    A dataset without it (a video folder with one usable video, or one prepared before
    held-out splits were carved) would otherwise fail at the first eval. Call it after
    the training split is open (our datasets are then built). One ``UserError`` line.
    """
    if not every:
        return
    name, data_dir = dataset_name(dataset_cfg), os.path.expanduser(dataset_cfg.data_dir)
    splits = sources.prepared_splits(name, data_dir)
    if splits is None or split in splits:
        return
    base = sources.split_name(name)[0]
    fix = (f"delete {sources.find_prepared(name, data_dir)} and prepare the folder again (a test split is held out "
           "of two or more videos), add a test/ folder, or " if base == "video_folder" else "prepare it, or ")
    raise UserError(f"dataset {name} in {data_dir} has no split {split!r} (it has {sorted(splits)}), which the "
                    f"evals every {every} steps read: {fix}set --config.eval_every=0 to train without evals "
                    f"(or --config.eval_split to one it has)")


# --------------------------------------------------------------------------------
# Per-example preprocessing
# --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Everything the per-example transform needs (picklable for grain workers)."""

    frames: int
    resolution: int
    fps: float
    sample_rate: int
    source_fps: float
    source_sample_rate: int
    video_key: str
    audio_key: str | None
    label_key: str | None
    has_audio_key: str | None
    extra_features: tuple[str, ...] = ()
    random_crop: bool = False
    min_crop_scale: float = 1.0
    random_flip: bool = False
    temporal_jitter: bool = False

    @property
    def num_samples(self) -> int:
        return round(self.frames / self.fps * self.sample_rate)


def _pick_key(ours: str, wanted: str, features: list[str], name: str, required: bool) -> str | None:
    if wanted:
        if wanted not in features:
            raise UserError(f"dataset.features.{ours}={wanted!r} is not a feature of {name}; it has {features}")
        return wanted
    for alias in FEATURE_ALIASES[ours]:
        if alias in features:
            return alias
    if required:
        raise UserError(f"dataset {name} has no {ours} feature among {features}; set dataset.features.{ours}")
    return None


def clip_spec(dataset_cfg, info: sources.SourceInfo, *, train: bool) -> ClipSpec:
    features = sorted(info.features)
    wanted = dataset_cfg.get("features", {}) or {}
    extras = dataset_cfg.get("extra_features", "") or ()
    if isinstance(extras, str):
        extras = tuple(e.strip() for e in extras.split(",") if e.strip())
    missing = [e for e in extras if e not in features]
    if missing:
        raise UserError(f"dataset.extra_features {missing} are not features of {info.name}; it has {features}")
    augment = dataset_cfg.get("augment", {}) or {}
    video_key = _pick_key("video", wanted.get("video", ""), features, info.name, required=True)
    source_fps = float(info.fps or dataset_cfg.get("source_fps", 0) or dataset_cfg.fps)
    stored = info.shapes.get(video_key)
    if stored and len(stored) == 4 and stored[0] > 0:
        needed = (int(dataset_cfg.frames) - 1) * source_fps / float(dataset_cfg.fps) + 1
        if stored[0] + 1e-6 < needed:
            raise UserError(
                f"dataset {info.name} stores clips of {stored[0]} frames at {source_fps:g} fps, too short for "
                f"dataset.frames={dataset_cfg.frames} at dataset.fps={dataset_cfg.fps:g}; choose a dataset config "
                f"with longer clips (e.g. moving_shapes_av/small or /default for 17 frames)"
            )
    return ClipSpec(
        frames=int(dataset_cfg.frames),
        resolution=int(dataset_cfg.resolution),
        fps=float(dataset_cfg.fps),
        sample_rate=int(dataset_cfg.sample_rate),
        source_fps=source_fps,
        source_sample_rate=int(info.sample_rate or dataset_cfg.get("source_sample_rate", 0) or dataset_cfg.sample_rate),
        video_key=video_key,
        audio_key=_pick_key("audio", wanted.get("audio", ""), features, info.name, required=False),
        label_key=_pick_key("label", wanted.get("label", ""), features, info.name, required=False),
        has_audio_key=_pick_key("has_audio", "", features, info.name, required=False),
        extra_features=tuple(extras),
        random_crop=train and bool(augment.get("random_crop", False)),
        min_crop_scale=float(augment.get("min_crop_scale", 1.0)),
        random_flip=train and bool(augment.get("random_flip", False)),
        temporal_jitter=train and bool(augment.get("temporal_jitter", False)),
    )


def _as_video(value) -> np.ndarray:
    """A dataset's video value (array or encoded frames) -> uint8 [T, H, W, 3]."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
        value = media.decode_images(list(value))
    video = np.asarray(value)
    if video.ndim == 3:
        video = video[..., None]
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    elif video.shape[-1] == 4:
        video = video[..., :3]
    if video.dtype != np.uint8:
        video = media.from_model(video.astype(np.float32) * 2.0 - 1.0) if video.max() <= 1.0 else video.clip(0, 255).astype(np.uint8)
    return video


def _as_mono(value) -> np.ndarray:
    audio = np.asarray(value, np.float32)
    if audio.ndim == 2:  # [S, C] or [C, S]
        audio = audio.mean(axis=1 if audio.shape[1] <= audio.shape[0] else 0)
    return audio.reshape(-1)


def _resample_audio(audio: np.ndarray, src_rate: int, rate: int) -> np.ndarray:
    if src_rate == rate:
        return audio
    ratio = Fraction(rate, src_rate).limit_denominator(1000)
    return signal.resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


def _fit(audio: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, np.float32)
    out[: min(length, len(audio))] = audio[:length]
    return out


def _crop_resize(video: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    """uint8 [T, h, w, 3] -> the square [top:top+side, left:left+side] of every frame, as
    [T, size, size, 3] (Pillow bilinear, antialiased when shrinking; no copy when it fits)."""
    if side == size:
        return video[:, top : top + side, left : left + side]
    box = (left, top, left + side, top + side)
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR, box=box)) for f in video])


def preprocess(example: dict, spec: ClipSpec, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """One stored example -> one clip of the batch contract (``rng`` None = evaluation)."""
    video = _as_video(example[spec.video_key])
    total = len(video)

    # Temporal window, on the stored frame grid so that pictures and sound stay aligned.
    span = spec.frames * spec.source_fps / spec.fps  # stored frames covered by one clip
    spare = int(np.floor(total - span + 1e-6))
    start = int(rng.integers(0, spare + 1)) if (rng is not None and spec.temporal_jitter and spare > 0) else 0
    times = start / spec.source_fps + np.arange(spec.frames) / spec.fps
    index = np.clip(np.floor(times * spec.source_fps + 1e-6).astype(int), 0, total - 1)
    video = video[index]

    if spec.audio_key is not None:
        audio = _as_mono(example[spec.audio_key])
        first = round(start / spec.source_fps * spec.source_sample_rate)
        count = round(spec.frames / spec.fps * spec.source_sample_rate)
        piece = _fit(audio[first : first + count], count)
        audio = _fit(_resample_audio(piece, spec.source_sample_rate, spec.sample_rate), spec.num_samples)
        has_audio = bool(example[spec.has_audio_key]) if spec.has_audio_key else True
    else:
        audio, has_audio = np.zeros(spec.num_samples, np.float32), False

    # Square crop (random in training), resized to the output resolution.
    _, h, w, _ = video.shape
    side = min(h, w)
    if rng is not None and spec.random_crop:
        side = max(1, round(side * rng.uniform(spec.min_crop_scale, 1.0)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    else:
        top, left = (h - side) // 2, (w - side) // 2
    video = _crop_resize(video, top, left, side, spec.resolution)
    flip = rng is not None and spec.random_flip and rng.random() < 0.5
    if flip:
        video = video[:, :, ::-1]

    out = {
        "video": np.ascontiguousarray(video),
        "audio": audio,
        "label": np.int32(example[spec.label_key] if spec.label_key else 0),
        "has_audio": np.bool_(has_audio),
    }
    for key in spec.extra_features:
        value = np.asarray(example[key])
        if value.ndim >= 1 and value.shape[0] == total:  # per-frame metadata follows the window
            value = value[index]
        # Normalised coordinates follow the crop and flip: names ending in _y / _x.
        if key.endswith("_y") and value.dtype.kind == "f":
            value = ((value * h - top) / side).astype(value.dtype)
        elif key.endswith("_x") and value.dtype.kind == "f":
            value = ((value * w - left) / side).astype(value.dtype)
            if flip:
                value = (1.0 - value).astype(value.dtype)
        out[key] = value
    return out


class _TrainPreprocess(grain.RandomMapTransform):
    def __init__(self, spec: ClipSpec):
        self.spec = spec

    def random_map(self, element, rng: np.random.Generator):
        return preprocess(element, self.spec, rng)


class _EvalPreprocess(grain.MapTransform):
    def __init__(self, spec: ClipSpec):
        self.spec = spec

    def map(self, element):
        return preprocess(element, self.spec, None)


# --------------------------------------------------------------------------------
# Sampling: global shuffle per epoch, strided over processes
# --------------------------------------------------------------------------------


class EpochShuffleSampler:
    """Global stream position -> record (grain ``Sampler``; see the module docstring).

    Each epoch holds ``num_records // process_count * process_count`` positions. Grain's
    ``DataLoader`` hands its ``j``-th index to process ``j % process_count``; with
    ``local_batch`` set (and epochs a whole number of global batches) index ``j`` is read
    as stream position ``g`` so that process ``p``'s ``c``-th record is position
    ``(c // b) G + p b + c % b``: global batch ``k`` is positions ``[k G, (k+1) G)`` in
    order, whatever the number of processes (``b`` = local batch, ``G`` = global batch).
    """

    def __init__(self, num_records: int, *, shuffle: bool, seed: int, num_epochs: int | None, process_count: int,
                 local_batch: int | None = None):
        self.num_records, self.shuffle, self.seed, self.num_epochs = num_records, shuffle, int(seed), num_epochs
        self.process_count = process_count
        self.per_epoch = num_records // process_count * process_count
        if self.per_epoch == 0:
            raise ValueError(f"{num_records} examples cannot be split over {process_count} processes")
        blocks = local_batch and self.per_epoch % (local_batch * process_count) == 0
        self.local_batch = local_batch if blocks else None
        self._cached_epoch, self._permutation = None, None

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.per_epoch

    def __repr__(self) -> str:
        return (f"EpochShuffleSampler(num_records={self.num_records}, shuffle={self.shuffle}, seed={self.seed}, "
                f"num_epochs={self.num_epochs}, per_epoch={self.per_epoch})")

    def record_key(self, index: int) -> int:
        epoch, position = divmod(index, self.per_epoch)
        if not self.shuffle:
            return position
        if self._cached_epoch != epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
            self._cached_epoch = epoch
        return int(self._permutation[position])

    def stream_position(self, index: int) -> int:
        """Grain's index -> position in the global stream (contiguous global batches, see above)."""
        if not self.local_batch:
            return index
        b, n = self.local_batch, self.process_count
        count, process = divmod(index, n)
        return (count // b) * b * n + process * b + count % b

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or index >= len(self):
            raise IndexError(f"position {index} is past the end ({len(self)})")
        position = self.stream_position(index)
        rng = np.random.default_rng([self.seed, position])
        return grain.RecordMetadata(index=index, record_key=self.record_key(position), rng=rng)


# --------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------


def seek(iterator, examples: int, *, global_batch_size: int, process_index: int, process_count: int) -> None:
    """Move a fresh ``make_iterator`` iterator to just after ``examples`` examples of the global stream.

    Constant time: grain's position state is written directly (per worker: the records it
    has read), so resuming at step 100k costs what resuming at step 1 costs.
    """
    if examples % global_batch_size:
        raise ValueError(f"{examples} examples is not a whole number of global batches of {global_batch_size}")
    state = json.loads(iterator.get_state().decode())
    workers = int(state["worker_count"])
    local_batch = global_batch_size // process_count
    batches = examples // global_batch_size  # batches this process has taken
    p, n = process_index, process_count
    if workers == 0:
        state["last_seen_indices"] = {"0": p + (batches * local_batch - 1) * n}
        state["last_worker_index"] = -1
    else:
        # Worker w of process p reads positions p + w n + k (W n), k = 0, 1, ...; batches
        # are taken from the workers in turn, so worker w has made ceil((batches - w) / W).
        made = [(batches - w + workers - 1) // workers if batches > w else 0 for w in range(workers)]
        state["last_seen_indices"] = {str(w): p + w * n + (made[w] * local_batch - 1) * workers * n
                                      for w in range(workers)}
        state["last_worker_index"] = batches % workers - 1
    iterator.set_state(json.dumps(state).encode())


def make_iterator(
    dataset_cfg,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    train: bool,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> grain.DataLoaderIterator:
    """Iterator of host-local numpy batch dicts with ``get_state()`` / ``set_state()``.

    Args:
      dataset_cfg: ``default_dataset_config()`` or a config's ``dataset`` block.
      split: "train", "test", ... (a split of the prepared dataset).
      global_batch_size: examples per step over all processes; each process gets
        ``global_batch_size // process_count``.
      seed: shuffling and augmentation seed.
      train: shuffle + augment (True) or fixed order + deterministic preprocessing.
      process_index, process_count: this host's slice (default: JAX's).
      num_epochs: passes over the split; None = forever when training, 1 otherwise.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    local_batch = global_batch_size // process_count
    if num_epochs is None and not train:
        num_epochs = 1
    source, info = open_dataset(dataset_cfg, split)
    spec = clip_spec(dataset_cfg, info, train=train)
    workers = int(dataset_cfg.get("num_workers", 0))
    read_threads = int(dataset_cfg.get("read_threads", 4))
    sampler = EpochShuffleSampler(len(source), shuffle=train, seed=seed, num_epochs=num_epochs,
                                  process_count=process_count, local_batch=local_batch if workers == 0 else None)
    operations = [
        _TrainPreprocess(spec) if train else _EvalPreprocess(spec),
        grain.Batch(batch_size=local_batch, drop_remainder=True),
    ]
    if int(dataset_cfg.get("num_workers", 0)) > 0 and not absl_flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; a program without absl.app has not parsed them.
        absl_flags.FLAGS.mark_as_parsed()
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=int(dataset_cfg.get("num_workers", 0)),
        worker_buffer_size=max(1, int(dataset_cfg.get("prefetch", 2))),
        shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True),
        # grain keeps at most prefetch_buffer_size reads in flight, so fewer than num_threads idles threads.
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, read_threads, 2 * local_batch)),
    )
    return iter(loader)

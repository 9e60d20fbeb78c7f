"""``video_folder``: a user's folder of videos as a TFDS dataset (ArrayRecord).

Layout read from ``path``::

    path/<class name>/**/<video>.{mp4,webm,avi,mov,mkv,m4v}   label = class name
    path/<video>                                             label "unlabeled"

or, when ``path/train`` exists, ``path/{train,test}/<class name>/...`` giving the
splits. Without a ``test`` folder the held-out split is carved from the videos:
each usable video goes to ``test`` when a hash of its relative path (CRC-32 mod
10^4 / 10^4) is below ``test_fraction`` (0.1), so the choice never changes and all
clips of one video stay in one split; when that picks none of two or more usable
videos, the one with the smallest hash is held out, so a small folder still has a
``test`` split for the evals. A folder with a single usable video has none
(``held_out`` says so; training then stops before its first step with one line).

Each video is decoded at the config's ``fps`` (sample-and-hold), scaled so its
shorter side is ``resolution`` and centre-cropped to a square, then cut into clips
of ``frames`` frames every ``stride`` frames. The sound is resampled to
``sample_rate`` mono and cut with the same times; a video without sound gives
silence and ``has_audio=False``.

A file that is empty, corrupt, truncated, not a video, or shorter than one clip is
skipped with a warning; the skipped files and their reasons are kept in
``builder.skipped`` and in the dataset's ``metadata.json`` (``skipped``). Files are
checked (``media.probe_video``: header, first frame, last keyframe interval) before
they are split, so bad files never leave a split empty; a file that passes the check
but fails to decode later is skipped too, and only if that empties a whole split does
the build stop (with a ``VideoFolderError`` naming the split). TFDS writes into
``incomplete.*`` and renames the folder only after every split is written, so a build
that fails leaves nothing that looks complete.
"""

from __future__ import annotations

import logging
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from mmgen.data import media
from mmgen.progress import progress

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
UNLABELED = "unlabeled"


class VideoFolderError(ValueError):
    """A folder that cannot become a dataset (missing, no usable video)."""


class VideoFolderConfig(tfds.core.BuilderConfig):
    """Clip geometry and splitting of a video folder."""

    def __init__(
        self,
        *,
        frames: int = 17,
        resolution: int = 128,
        fps: float = 8.0,
        sample_rate: int = 16000,
        stride: int | None = None,
        test_fraction: float = 0.1,
        max_clips_per_video: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault(
            "description",
            f"{frames} frames x {resolution}^2 at {fps:g} fps every {stride or frames} frames, {sample_rate} Hz audio",
        )
        super().__init__(**kwargs)
        self.frames, self.resolution, self.fps, self.sample_rate = frames, resolution, fps, sample_rate
        self.stride = stride or frames
        self.test_fraction = test_fraction
        self.max_clips_per_video = max_clips_per_video

    @property
    def num_samples(self) -> int:
        return round(self.frames / self.fps * self.sample_rate)


BUILDER_CONFIGS = (
    VideoFolderConfig(name="tiny", frames=9, resolution=32),
    VideoFolderConfig(name="small", frames=17, resolution=64),
    VideoFolderConfig(name="default", frames=17, resolution=128),
)


def find_videos(root: str) -> list[str]:
    """Relative paths of the files under ``root`` with a video extension, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def _class_of(relpath: str) -> str:
    parts = relpath.split(os.sep)
    return parts[0] if len(parts) > 1 else UNLABELED


def _hash_fraction(relpath: str) -> float:
    return (zlib.crc32(relpath.encode("utf-8")) % 10_000) / 10_000


def list_videos(root: str) -> dict[str, list[tuple[str, str]]]:
    """{"train" | "test" | "all": [(path relative to root, class name)]} for a folder."""
    if not os.path.isdir(root):
        raise VideoFolderError(f"video folder {root} does not exist or is not a directory")
    if os.path.isdir(os.path.join(root, "train")):
        groups = {}
        for split in ("train", "test"):
            split_root = os.path.join(root, split)
            if os.path.isdir(split_root):
                groups[split] = [(os.path.join(split, p), _class_of(p)) for p in find_videos(split_root)]
    else:
        groups = {"all": [(p, _class_of(p)) for p in find_videos(root)]}
    if not any(groups.values()):
        raise VideoFolderError(f"video folder {root} holds no files ending in {', '.join(VIDEO_EXTENSIONS)}")
    return groups


def hold_out(files: list[tuple[str, str]], test_fraction: float) -> tuple[list, list]:
    """(train, test) of one list of videos by the hash of their paths; at least one held
    out when there are two or more and ``test_fraction > 0``."""
    test = [f for f in files if _hash_fraction(f[0]) < test_fraction]
    if not test and len(files) >= 2 and test_fraction > 0:
        test = [min(files, key=lambda f: (_hash_fraction(f[0]), f[0]))]
    return [f for f in files if f not in test], test


def assign_splits(groups: dict[str, list], test_fraction: float) -> dict[str, list]:
    """Hash-split the "all" group (or a "train" group without "test") into train/test; drop empty splits."""
    if "all" in groups or not groups.get("test"):
        files = groups.get("all", groups.get("train", []))
        train, test = hold_out(files, test_fraction)
        groups = {"train": train, "test": test}
    return {name: files for name, files in groups.items() if files}


def cut_clips(clip: media.Clip, cfg: VideoFolderConfig) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Centre-cropped clips (start frame, video uint8 [T, R, R, 3], audio float32 [S])."""
    video, r = clip.video, cfg.resolution
    top, left = (video.shape[1] - r) // 2, (video.shape[2] - r) // 2
    video = video[:, top : top + r, left : left + r]
    out = []
    for start in range(0, len(video) - cfg.frames + 1, cfg.stride):
        audio = np.zeros(cfg.num_samples, np.float32)
        if clip.audio is not None:
            s0 = round(start / cfg.fps * cfg.sample_rate)
            piece = clip.audio[s0 : s0 + cfg.num_samples]
            audio[: len(piece)] = piece
        out.append((start, np.ascontiguousarray(video[start : start + cfg.frames]), audio))
        if cfg.max_clips_per_video and len(out) >= cfg.max_clips_per_video:
            break
    return out


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """A folder of videos cut into fixed-length clips (see module docstring).

    Build with ``VideoFolder(path=DIR, config="tiny", data_dir=OUT).download_and_prepare()``;
    read back with ``tfds.data_source("video_folder/tiny", data_dir=OUT)`` (no path needed).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def __init__(self, *, path: str | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # random access, no TensorFlow
        self._path = os.path.abspath(os.path.expanduser(path)) if path else None
        self._groups = None
        self.skipped: list[tuple[str, str]] = []
        self.num_clips: dict[str, int] = {}
        self.held_out: str = ""  # how the test split was made, in words
        super().__init__(**kwargs)

    def _videos(self) -> dict[str, list[tuple[str, str]]]:
        if self._groups is None:
            if self._path is None:
                raise VideoFolderError("video_folder needs the folder to read: pass path=DIR (--path DIR)")
            self._groups = list_videos(self._path)
        return self._groups

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if self._path is not None:
            names = sorted({label for files in self._videos().values() for _, label in files})
            label = tfds.features.ClassLabel(names=names)
        else:  # reading a prepared dataset: names come back from its files
            label = tfds.features.ClassLabel()
        raw = tfds.features.Encoding.BYTES
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(cfg.frames, cfg.resolution, cfg.resolution, 3), dtype=np.uint8, encoding=raw),
                "audio": tfds.features.Tensor(shape=(cfg.num_samples,), dtype=np.float32, encoding=raw),
                "label": label,
                "has_audio": tfds.features.Scalar(dtype=np.bool_),
                "source": tfds.features.Tensor(shape=(), dtype=np.str_),
                "start_frame": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(
                fps=cfg.fps, sample_rate=cfg.sample_rate, source_folder=self._path or "", skipped=[], num_skipped=0,
                held_out="",
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the videos are local
        cfg = self.builder_config
        self.skipped, self.num_clips = [], {}
        # Reject bad files before splitting, so that no split is left with only bad ones.
        groups = {}
        for group, files in self._videos().items():
            groups[group] = []
            for relpath, label in progress(files, desc=f"Checking {group} videos", unit="video", leave=False):
                try:
                    info = media.probe_video(os.path.join(self._path, relpath))
                except media.MediaError as e:
                    self._skip(relpath, str(e).split(": ", 1)[-1])
                    continue
                if info.duration * cfg.fps < cfg.frames - 1e-6:
                    self._skip(relpath, f"too short ({info.duration:.2f} s < {cfg.frames} frames at {cfg.fps:g} fps)")
                    continue
                groups[group].append((relpath, label))
        splits = assign_splits(groups, cfg.test_fraction)
        if not splits:
            raise VideoFolderError(f"no usable video in {self._path}: all {len(self.skipped)} files were skipped")
        if groups.get("test"):
            self.held_out = f"test split from {os.path.join(self._path, 'test')} ({len(splits['test'])} videos)"
        elif "test" in splits:
            total = sum(len(f) for f in splits.values())
            self.held_out = (f"held out {len(splits['test'])} of {total} videos as the test split "
                             f"(test_fraction {cfg.test_fraction:g} by a hash of the file path, at least one)")
        else:
            self.held_out = (f"no test split: only {sum(len(f) for f in splits.values())} usable video; add videos "
                             "(or a test/ folder) for the evals, or train with --config.eval_every=0")
        self.info.metadata["held_out"] = self.held_out
        return {split: self._generate_examples(split, files) for split, files in splits.items()}

    def _skip(self, relpath: str, reason: str):
        log.warning("video_folder: skipping %s: %s", relpath, reason)
        self.skipped.append((relpath, reason))
        self.info.metadata["skipped"] = [f"{p}: {r}" for p, r in self.skipped]
        self.info.metadata["num_skipped"] = len(self.skipped)

    def _generate_examples(self, split: str, files: list[tuple[str, str]]):
        cfg = self.builder_config
        count = 0
        for relpath, label in progress(files, desc=f"Decoding {split} videos", unit="video", leave=False):
            try:
                clip = media.read_video(
                    os.path.join(self._path, relpath), fps=cfg.fps, sample_rate=cfg.sample_rate,
                    resize_short_side=cfg.resolution,
                )
            except media.MediaError as e:
                self._skip(relpath, str(e).split(": ", 1)[-1])
                continue
            pieces = cut_clips(clip, cfg)
            if not pieces:
                self._skip(relpath, f"too short ({len(clip.video)} frames at {cfg.fps:g} fps < {cfg.frames})")
                continue
            for start, video, audio in pieces:
                count += 1
                yield f"{relpath}:{start}", {
                    "video": video,
                    "audio": audio,
                    "label": label,
                    "has_audio": clip.audio is not None,
                    "source": relpath,
                    "start_frame": start,
                }
        self.num_clips[split] = count
        if count == 0:
            raise VideoFolderError(
                f"no clip could be made for split '{split}' of {self._path}: all {len(files)} of its files were skipped"
            )

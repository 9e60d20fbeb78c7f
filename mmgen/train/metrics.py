"""Metrics to ``workdir/metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only process 0 writes. Every line has ``step``; training lines have ``loss``.
Pictures and sounds (``Picture``, ``Video``, ``Sound`` values in a metrics dict, e.g.
what a family's eval hook returns) go to TensorBoard only, as image, animated-GIF
image (what TensorBoard's image dashboard plays; tensorboardX's own ``add_video``
needs moviepy, so the GIF is encoded here with PIL) and audio (16-bit wav) summaries;
``write_media`` adds them to a workdir's TensorBoard outside a training run
(``mmgen eval``).
Reading tolerates damage: a torn last line (a run killed mid-write) is skipped
quietly, any other line that is not a JSON object with a ``step`` (binary junk, a
half-written line in the middle) is skipped with one warning; ``trim_metrics`` (on
resume) rewrites the file with the good lines up to the restored step only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math

import jax
import numpy as np

from mmgen import fs
from mmgen.data import media


class _StoreRecordWriter:
    """A tensorboardX record writer for a URL: the event file in memory, uploaded whole on each flush."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        fs.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _StoreWriterFactory:
    def open(self, path: str) -> _StoreRecordWriter:
        return _StoreRecordWriter(path)

    def directory_check(self, path: str) -> None:
        fs.makedirs(path)


def tensorboard_writer(logdir: str):
    """A tensorboardX ``SummaryWriter`` for ``logdir``, local or a URL (``gs://``).

    For a URL the event file goes through ``mmgen.fs``, the same filesystem as the rest of
    the workdir (registered as tensorboardX's writer for the scheme: its own ``gs://``
    writer needs ``google-cloud-storage``, and also uploads the whole file on every flush).
    """
    from tensorboardX import SummaryWriter
    from tensorboardX import record_writer

    if fs.is_url(logdir):
        scheme = logdir.split("://", 1)[0]
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _StoreWriterFactory):
            record_writer.register_writer_factory(scheme, _StoreWriterFactory())
    return SummaryWriter(logdir if fs.is_url(logdir) else fs.normalize(logdir))


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


@dataclasses.dataclass(frozen=True)
class Picture:
    """An image for TensorBoard: uint8 ``[H, W, 3]``."""

    image: np.ndarray


@dataclasses.dataclass(frozen=True)
class Video:
    """A clip for TensorBoard: uint8 ``[T, H, W, 3]`` at ``fps`` (shown as a looping GIF, zoomed by
    the whole factor ``VIDEO_MIN_SIDE // min(H, W)`` when that is above 1)."""

    frames: np.ndarray
    fps: float


@dataclasses.dataclass(frozen=True)
class Sound:
    """A sound for TensorBoard: float32 ``[S]`` mono in [-1, 1] at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int


MEDIA = (Picture, Video, Sound)
VIDEO_MIN_SIDE = 128  # a GIF's short side in TensorBoard, reached by whole-number nearest-neighbour zoom


def is_media(value) -> bool:
    return isinstance(value, MEDIA)


def scalars_only(metrics: dict) -> dict:
    """``metrics`` without its pictures and sounds (what checkpoints and metrics.jsonl keep)."""
    return {k: v for k, v in metrics.items() if not is_media(v)}


def media_summary(tag: str, value):
    """A tensorboardX ``Summary`` proto holding one picture, GIF or wav under ``tag``."""
    from tensorboardX.proto.summary_pb2 import Summary

    if isinstance(value, Sound):
        samples = np.asarray(value.samples, np.float32).reshape(-1)
        audio = Summary.Audio(sample_rate=float(value.sample_rate), num_channels=1, length_frames=len(samples),
                              encoded_audio_string=media.wav_bytes(samples, sample_rate=value.sample_rate),
                              content_type="audio/wav")
        return Summary(value=[Summary.Value(tag=tag, audio=audio)])
    if isinstance(value, Video):
        frames = np.asarray(value.frames)
        zoom = max(1, VIDEO_MIN_SIDE // min(frames.shape[1:3]))  # tiny clips: nearest-neighbour up to 128 px
        frames = np.repeat(np.repeat(frames, zoom, axis=1), zoom, axis=2)
        encoded = media.gif_bytes(frames, fps=value.fps)
    else:
        frames = np.asarray(value.image)[None]
        encoded = media.png_bytes(frames[0])
    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=encoded)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _add_media(tb, step: int, metrics: dict) -> None:
    for tag, value in metrics.items():
        if is_media(value):
            # The SummaryWriter's own event file, so scalars and pictures of a run sit together.
            tb._get_file_writer().add_summary(media_summary(tag, value), int(step))


def write_media(workdir: str, step: int, items: dict) -> None:
    """Add ``items`` (tag -> ``Picture``/``Video``/``Sound``) to ``workdir/tensorboard`` at ``step``
    (a new event file beside the training run's; process 0 only)."""
    if jax.process_index() != 0 or not items:
        return
    tb = tensorboard_writer(fs.join(workdir, "tensorboard"))
    try:
        _add_media(tb, step, items)
    finally:
        tb.close()


class MetricsWriter:
    """Process 0 appends rows to ``workdir/metrics.jsonl`` and scalars to ``workdir/tensorboard/``.

    Any workdir ``mmgen.fs`` knows: on a bucket (``gs://``) each row rewrites the
    metrics object (``fs.append_text``), and TensorBoard's event file goes through
    ``tensorboard_writer`` (``mmgen.fs`` too).
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = fs.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            fs.makedirs(workdir)
            if tensorboard:
                self._tb = tensorboard_writer(fs.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in scalars_only(metrics).items()})
        fs.append_text(self.path, json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            _add_media(self._tb, step, metrics)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


log = logging.getLogger(__name__)


def _parse(path: str) -> tuple[list[dict], list[int], bool]:
    """(good rows, 1-based numbers of bad lines, whether the file ends in a torn line)."""
    lines = fs.read_bytes(path).split(b"\n")
    torn = bool(lines) and lines[-1].strip() != b""  # no newline after the last line: cut mid-write
    rows, bad = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # JSON and UTF-8 errors alike
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif not (torn and number == len(lines)):
            bad.append(number)
    return rows, bad, torn


def read_metrics(workdir: str) -> list[dict]:
    """The good rows of ``workdir/metrics.jsonl`` ([] when there is none); damaged lines are skipped."""
    path = fs.join(workdir, "metrics.jsonl")
    if not fs.exists(path):
        return []
    rows, bad, _ = _parse(path)
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (line %s%s)", path, len(bad), bad[0],
                    f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    return rows


def trim_metrics(workdir: str, step: int) -> None:
    """On resume from ``step``: keep the good lines up to ``step``; drop later ones, junk and a torn end
    (atomically, so a crash here loses nothing). Process 0 only."""
    path = fs.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not fs.exists(path):
        return
    rows, bad, torn = _parse(path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) == len(rows) and not bad and not torn:
        return
    if bad:
        log.warning("%s: dropped %d unreadable line(s) (line %s%s)", path, len(bad), bad[0],
                    f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    fs.write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))

"""Metrics to ``workdir/metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only process 0 writes. Every line has ``step``; training lines have ``loss``.
Reading tolerates damage: a torn last line (a run killed mid-write) is skipped
quietly, any other line that is not a JSON object with a ``step`` (binary junk, a
half-written line in the middle) is skipped with one warning; ``trim_metrics`` (on
resume) rewrites the file with the good lines up to the restored step only.
"""

from __future__ import annotations

import io
import json
import logging
import math

import jax
import numpy as np

from mmgen import fs


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
        row.update({k: _plain(v) for k, v in metrics.items()})
        fs.append_text(self.path, json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
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

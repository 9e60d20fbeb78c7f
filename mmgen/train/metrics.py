"""Metrics to ``workdir/metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only process 0 writes. Every line has ``step``; training lines have ``loss``.
Reading tolerates damage: a torn last line (a run killed mid-write) is skipped
quietly, any other line that is not a JSON object with a ``step`` (binary junk, a
half-written line in the middle) is skipped with one warning; ``trim_metrics`` (on
resume) rewrites the file with the good lines up to the restored step only.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
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
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
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
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows, bad, _ = _parse(path)
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (line %s%s)", path, len(bad), bad[0],
                    f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    return rows


def trim_metrics(workdir: str, step: int) -> None:
    """On resume from ``step``: keep the good lines up to ``step``; drop later ones, junk and a torn end
    (atomically, so a crash here loses nothing). Process 0 only."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows, bad, torn = _parse(path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) == len(rows) and not bad and not torn:
        return
    if bad:
        log.warning("%s: dropped %d unreadable line(s) (line %s%s)", path, len(bad), bad[0],
                    f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, allow_nan=True) + "\n" for r in kept)
    os.replace(path + ".tmp", path)

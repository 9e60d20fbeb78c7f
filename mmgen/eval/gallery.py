"""A run's samples as one static web page, and as TensorBoard pictures and sounds.

Whatever writes samples into a folder (``mmgen sample --out D``, the training evals'
``workdir/samples``, ``mmgen eval``'s ``workdir/eval``) also writes, next to them, a
record ``<name>.gallery.json`` per group of samples and then rebuilds
``D/index.html`` from every record in the folder:

* a section per record (ordered by step, then name): the task and what it generates
  from what (``mmgen.generative.tasks``), the step, who wrote it, the group's metrics,
  its labelled PNG grid, and a row per sample with the generated mp4 (H.264 + AAC, so
  the sound plays with the picture; a ``.wav`` for audio-only tasks), the real clip its
  condition came from (``<name>_<i>_real.mp4``, when there is one), the condition in
  words and the sample's own metrics (PSNR in dB of the generated video against the real
  clip, SI-SNR in dB of the generated sound against the real one, where both exist);
* a last section with every other media or token file in the folder, so the page shows
  everything there is.

The page is plain HTML5 with relative links (``<video controls src="x.mp4">``): it opens
from ``file://`` without a server, and needs no script. Records are JSON so that a
later run appending to the same folder (a resumed training run, a second ``sample``)
rebuilds the whole page.

Record (``<name>.gallery.json``)::

    {"name": ..., "task": ..., "description": ..., "step": int | null, "source": ...,
     "grid": "x.png" | null, "tokens": "x_tokens.npz" | null, "metrics": {...},
     "samples": [{"file": "x_000.mp4", "real": "x_000_real.mp4" | null,
                  "condition": "...", "metrics": {...}}]}

Every file is written through ``_write`` (bytes or text, atomically: a temporary file
then a rename), only by process 0.
"""

from __future__ import annotations

import html
import json
import os
from urllib.parse import quote

import numpy as np

from mmgen import fs
from mmgen.data import media
from mmgen.eval import metrics as metrics_lib
from mmgen.generative import tasks as tasks_lib
from mmgen.parallel.distributed import is_writer
from mmgen.train import metrics as train_metrics

INDEX = "index.html"
RECORD_SUFFIX = ".gallery.json"
VIDEO_FILES = (".mp4", ".webm")
AUDIO_FILES = (".wav",)
IMAGE_FILES = (".png", ".gif", ".jpg")
OTHER_FILES = (".npz", ".npy")


def _write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` whole or not at all (``mmgen.fs``: local or a bucket)."""
    if isinstance(data, str):
        fs.write_text(path, data)
    else:
        fs.write_bytes(path, data)


def _number(value):
    """A JSON-safe float (NaN/Inf as None) of a numpy or Python number."""
    value = float(value)
    return value if np.isfinite(value) else None


# ------------------------------------------------------------------ records
def describe_condition(task: str, index: int, *, split: str | None = None, input_path: str | None = None,
                       label: int | None = None) -> str:
    """What sample ``index`` of ``task`` was generated from, in words."""
    t = tasks_lib.get_task(task)
    given = [m for m in t.modalities() if t.role(m).kind in ("condition", "partial")]
    if t.class_label:
        return f"class label {label if label is not None else index}"
    if not given:
        return "nothing (unconditional)"
    parts = []
    for m in given:
        role = t.role(m)
        parts.append(f"its {'sound' if m == 'audio' else 'video'}" if role.kind == "condition"
                     else f"part of its {'sound' if m == 'audio' else 'video'}")
    source = (f"input file {os.path.basename(input_path)}" if input_path
              else f"{split or 'test'} clip {index}")
    return f"{' and '.join(parts)} from {source}"


def sample_metrics(result, i: int, real=("video", "audio")) -> dict:
    """Sample ``i``'s distance to the real clip its condition came from (empty when there is none).

    ``psnr_vs_real``: PSNR (dB, uint8 frames, all of them) of the generated video;
    ``si_snr_vs_real``: SI-SNR (dB) of the generated sound; only for modalities the task
    generates and ``real`` names (the reference's modalities that are a real recording: an
    input file gives only the task's condition, the rest of its reference is filler).
    """
    ref = result.reference or {}
    t = tasks_lib.get_task(result.task)
    out = {}
    if (result.video is not None and ref.get("video") is not None and t.video.kind in ("target", "partial")
            and "video" in real):
        out["psnr_vs_real"] = _number(metrics_lib.psnr(ref["video"][i], result.video[i], 255.0))
    if (result.audio is not None and ref.get("audio") is not None and t.audio.kind in ("target", "partial")
            and "audio" in real):
        n = min(len(ref["audio"][i]), len(result.audio[i]))
        out["si_snr_vs_real"] = _number(metrics_lib.si_snr(ref["audio"][i][:n], result.audio[i][:n]))
    return out


def write_record(out_dir: str, name: str, *, task: str, samples: list[dict], step: int | None = None,
                 source: str = "", description: str = "", grid: str | None = None, tokens: str | None = None,
                 metrics: dict | None = None) -> str:
    """Write ``out_dir/<name>.gallery.json`` (file names relative to ``out_dir``); returns its path."""
    record = {"name": name, "task": task, "description": description, "step": step, "source": source,
              "grid": grid, "tokens": tokens, "metrics": metrics or {}, "samples": samples}
    path = fs.join(out_dir, name + RECORD_SUFFIX)
    if is_writer():
        _write(path, json.dumps(record, indent=1, default=_number))
    return path


def record_samples(out_dir: str, result, paths: dict, *, fps: float, sample_rate: int, step: int | None = None,
                   source: str = "", split: str | None = None, input_path: str | None = None,
                   metrics: dict | None = None) -> str:
    """Record ``Generator.save``'s files of ``result`` (``paths``), with the real clips beside them.

    A conditional task's real clips (``result.reference``: the clip a condition came
    from, picture with its sound) are written as ``<sample>_real.mp4`` (``.wav`` without
    picture); an ``input_path`` condition is the same for every sample and is named, not
    copied. Returns the record's path.
    """
    task = result.task
    t = tasks_lib.get_task(task)
    ref = result.reference or {}
    given = [m for m in t.modalities() if t.role(m).kind in ("condition", "partial")]
    samples = []
    for i, path in enumerate(paths["media"]):
        real = None
        if ref and not input_path:
            stem = os.path.splitext(path)[0]
            if ref.get("video") is not None:
                real = stem + "_real.mp4"
                if is_writer():
                    media.write_video(real, ref["video"][i], fps=fps, sample_rate=sample_rate,
                                      audio=ref["audio"][i] if ref.get("audio") is not None else None)
            elif ref.get("audio") is not None:
                real = stem + "_real.wav"
                if is_writer():
                    media.write_wav(real, ref["audio"][i], sample_rate=sample_rate)
        samples.append({"file": os.path.basename(path), "real": real and os.path.basename(real),
                        "condition": describe_condition(task, i, split=split, input_path=input_path,
                                                        label=int(result.labels[i])),
                        "metrics": sample_metrics(result, i, real=given if input_path else ("video", "audio"))})
    name = os.path.basename(paths["tokens"])[: -len("_tokens.npz")]
    return write_record(out_dir, name, task=task, samples=samples, step=step, source=source,
                        description=t.description, grid=paths["grid"] and os.path.basename(paths["grid"]),
                        tokens=os.path.basename(paths["tokens"]), metrics=metrics)


def read_records(out_dir: str) -> list[dict]:
    """Every ``*.gallery.json`` in ``out_dir``, ordered by step then name (unreadable ones skipped)."""
    records = []
    for name in fs.listdir(out_dir):
        if name.endswith(RECORD_SUFFIX):
            try:
                records.append(json.loads(fs.read_text(fs.join(out_dir, name))))
            except (OSError, ValueError):
                continue
    return sorted(records, key=lambda r: (r.get("step") is None, r.get("step") or 0, r.get("name", "")))


def write_reconstructions(out_dir: str, name: str, real: np.ndarray, recon: np.ndarray, *, modality: str,
                          fps: float, sample_rate: int, step: int | None = None, source: str = "",
                          split: str = "test", tag: str = "eval/reconstruction") -> dict:
    """A tokenizer's reconstructions of ``real`` clips: files, record and page, TensorBoard items.

    Video (``real`` uint8 ``[N, T, H, W, 3]``, ``recon`` float ``[-1, 1]``): ``<name>.png``,
    rows alternating ``clip i real`` / ``clip i reconstructed``, and ``<name>.mp4``, clip 0
    real | reconstructed side by side; TensorBoard ``tag`` (the grid) and ``tag/video``.
    Audio (``[N, S]`` in [-1, 1]): ``<name>.wav`` (clip 0 reconstructed) and
    ``orig_<step>.wav`` (clip 0 real); TensorBoard ``tag`` and ``tag/real``.
    Process 0 only writes; returns the TensorBoard items (tag -> ``Picture``/``Video``/``Sound``).
    """
    fs.makedirs(out_dir)
    condition = f"{split} clip 0 through the tokenizer"
    if modality == "video":
        recon = media.from_model(np.asarray(recon, np.float32))
        rows = np.stack([real, recon], axis=1).reshape(-1, *real.shape[1:])
        labels = [f"clip {i} {kind}" for i in range(len(real)) for kind in ("real", "reconstructed")]
        grid, clip = name + ".png", name + ".mp4"
        side = np.concatenate([real[0], recon[0]], axis=2)  # real | reconstructed
        if is_writer():
            media.save_png_grid(fs.join(out_dir, grid), rows, upscale=2, row_labels=labels,
                                title=f"reconstruction, step {step}")
            media.write_video(fs.join(out_dir, clip), side, fps=fps)
        samples = [{"file": clip, "real": None, "condition": condition + " (left: real, right: reconstructed)",
                    "metrics": {"psnr": _number(metrics_lib.psnr(real[0], recon[0], 255.0))}}]
        items = {tag: train_metrics.Picture(media.labelled_grid(rows, upscale=2, row_labels=labels,
                                                                 title="reconstruction")),
                 f"{tag}/video": train_metrics.Video(side, fps)}
    else:
        grid, clip = None, name + ".wav"
        original = f"orig_{step:06d}.wav" if step is not None else name + "_real.wav"
        if is_writer():
            media.write_wav(fs.join(out_dir, clip), recon[0], sample_rate=sample_rate)
            media.write_wav(fs.join(out_dir, original), real[0], sample_rate=sample_rate)
        n = min(len(real[0]), len(recon[0]))
        samples = [{"file": clip, "real": original, "condition": condition,
                    "metrics": {"si_snr": _number(metrics_lib.si_snr(real[0][:n], np.asarray(recon[0])[:n]))}}]
        items = {tag: train_metrics.Sound(np.asarray(recon[0], np.float32), sample_rate),
                 f"{tag}/real": train_metrics.Sound(np.asarray(real[0], np.float32), sample_rate)}
    write_record(out_dir, name, task="reconstruction", samples=samples, step=step, source=source,
                 description=f"{modality} tokenizer: encode, quantize, decode", grid=grid)
    write_index(out_dir)
    return items


# ------------------------------------------------------------------ the page
def _src(name: str) -> str:
    return html.escape(quote(name), quote=True)


def _player(name: str | None) -> str:
    """The HTML element that shows (or links) the file ``name``."""
    if not name:
        return ""
    ext = os.path.splitext(name)[1].lower()
    if ext in VIDEO_FILES:
        return f'<video controls preload="auto" src="{_src(name)}"></video>'
    if ext in AUDIO_FILES:
        return f'<audio controls preload="metadata" src="{_src(name)}"></audio>'
    if ext in IMAGE_FILES:
        return f'<img src="{_src(name)}" alt="{html.escape(name)}">'
    return f'<a href="{_src(name)}">{html.escape(name)}</a>'


def _format(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _metrics_text(metrics: dict) -> str:
    return ", ".join(f"{html.escape(str(k))} {_format(v)}" for k, v in metrics.items()) or "&ndash;"


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
section{margin-bottom:2em;border-top:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:4px 8px;text-align:left;vertical-align:top}
video{width:256px;max-width:100%;image-rendering:pixelated;background:#000}img{max-width:100%;image-rendering:pixelated}
.meta{color:#555}"""


def render_index(out_dir: str, title: str) -> str:
    """The page's HTML for the records and files now in ``out_dir``."""
    records = read_records(out_dir)
    named: set[str] = set()
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>"]
    for r in records:
        files = [r.get("grid"), r.get("tokens")] + [s.get(k) for s in r["samples"] for k in ("file", "real")]
        named.update(f for f in files if f)
        step = f" &middot; step {r['step']}" if r.get("step") is not None else ""
        source = f" &middot; {html.escape(r['source'])}" if r.get("source") else ""
        parts.append(f"<section id=\"{html.escape(r['name'], quote=True)}\"><h2>{html.escape(r['task'])}{step}</h2>"
                     f"<p class=\"meta\">{html.escape(r.get('description', ''))}{source}</p>")
        if r.get("metrics"):
            parts.append(f"<p>metrics: {_metrics_text(r['metrics'])}</p>")
        if r.get("grid"):
            parts.append(f"<p>{_player(r['grid'])}</p>")
        has_real = any(s.get("real") for s in r["samples"])
        parts.append("<table><tr><th>#</th><th>generated</th>" + ("<th>real</th>" if has_real else "")
                     + "<th>condition</th><th>metrics</th></tr>")
        for i, s in enumerate(r["samples"]):
            real = f"<td>{_player(s.get('real'))}</td>" if has_real else ""
            parts.append(f"<tr><td>{i}<br><a href=\"{_src(s['file'])}\">{html.escape(s['file'])}</a></td>"
                         f"<td>{_player(s['file'])}</td>{real}<td>{html.escape(s.get('condition', ''))}</td>"
                         f"<td>{_metrics_text(s.get('metrics', {}))}</td></tr>")
        parts.append("</table>")
        if r.get("tokens"):
            parts.append(f"<p>tokens: {_player(r['tokens'])}</p>")
        parts.append("</section>")
    others = [f for f in fs.listdir(out_dir)
              if f not in named and f.lower().endswith(VIDEO_FILES + AUDIO_FILES + IMAGE_FILES + OTHER_FILES)]
    if others:
        parts.append("<section id=\"other-files\"><h2>other files</h2><table>")
        parts += [f"<tr><td>{html.escape(f)}</td><td>{_player(f)}</td></tr>" for f in others]
        parts.append("</table></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_index(out_dir: str, title: str | None = None) -> str:
    """(Re)build ``out_dir/index.html`` from the folder's records and files; returns its path."""
    path = fs.join(out_dir, INDEX)
    if is_writer():
        _write(path, render_index(out_dir, title or f"samples: {fs.normalize(out_dir)}"))
    return path


# ------------------------------------------------------------------ TensorBoard
def sample_summaries(result, tag: str, grid_rows, *, fps: float, sample_rate: int) -> dict:
    """TensorBoard items of one task's samples: ``tag`` the labelled grid (``grid_rows``: the
    ``(rows, labels)`` of ``Generator.grid_rows``), ``tag/video`` and ``tag/audio`` the first sample."""
    items = {}
    if grid_rows is not None:
        rows, labels = grid_rows
        items[tag] = train_metrics.Picture(media.labelled_grid(rows, upscale=2, row_labels=labels,
                                                               title=result.task))
    if result.video is not None:
        items[f"{tag}/video"] = train_metrics.Video(result.video[0], fps)
    if result.audio is not None:
        items[f"{tag}/audio"] = train_metrics.Sound(result.audio[0], sample_rate)
    return items

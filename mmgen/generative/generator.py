"""Sampling from a generative model: condition clips -> tokens -> MaskGIT -> media files.

``Generator`` holds a generative model and its frozen tokenizers on one device (both
given by the caller; ``mmgen.families.generative.load_generator``, also ``mmgen.load_generator``,
builds one from a workdir or an export) and is shared by ``mmgen sample``, the trainer's
evaluation hook, ``mmgen eval``, ``mmgen demo`` and the Python API (``sample(task=..., inputs=...)``).

``sample_task`` draws ``num`` samples of one task: conditional tasks take their
condition from given clips (``read_input`` fits any video or sound file to the
config's clip: cut or padded to its length, centre-cropped and resized to its
resolution) or else from the first clips of a split (``read_split``);
``class_conditional`` cycles through the labels ``0, 1, ...``. Sampling is compiled
once per (task, batch shape) and runs ``cfg.sampling.batch_size`` clips at a time.

``save`` writes one ``<task>_<i>.mp4`` per sample (H.264 + AAC; the sound is the
generated one, or the given one for ``audio_to_video``; a video-only task gives a
silent mp4; an audio-only task a ``.wav``), ``<task>.png`` (rows: reference clip then
sample, for conditional tasks; samples alone otherwise; labelled with the task and each
row's clip and kind) and ``<task>_tokens.npz``
(the sampled tokens per modality, the task and the labels).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen import fs
from mmgen.data import media, pipeline
from mmgen.errors import UserError
from mmgen.generative import sampling
from mmgen.generative import tasks as tasks_lib
from mmgen.generative.tokens import clip_dataset_config, specs_of, tokenize_clips
from mmgen.parallel.distributed import host_value, is_writer
from mmgen.progress import progress as progress_bar
from mmgen.tokenizers.audio import audio_samples_for_video

GIVEN = ("condition", "partial")


@dataclasses.dataclass
class SampleResult:
    """Sampled clips of one task (numpy, ``n`` examples).

    ``tokens``: modality -> int32 tokens. ``video`` uint8 ``[n, T, H, W, 3]`` and
    ``audio`` float32 ``[n, S]``: the clip to show, i.e. the generated modality or, for a
    modality the task is given, the given one (None when the task lacks it).
    ``reference``: the clips the conditions came from (``video``/``audio``/``label``/
    extra features), or None for unconditional tasks.
    """

    task: str
    tokens: dict
    video: np.ndarray | None
    audio: np.ndarray | None
    labels: np.ndarray
    reference: dict | None


def conditioned_modalities(task: str) -> list[str]:
    t = tasks_lib.get_task(task)
    return [m for m in t.modalities() if t.role(m).kind in GIVEN]


def check_task(cfg, task: str) -> None:
    """Unknown task or one the model cannot do -> one-line ``UserError``."""
    if task not in tasks_lib.TASKS:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(tasks_lib.TASK_NAMES)}")
    have = list(specs_of(cfg))
    missing = [m for m in tasks_lib.get_task(task).modalities() if m not in have]
    if missing:
        raise UserError(f"task {task!r} needs {missing} but this model only has {have}")


def _fit_frames(video: np.ndarray, frames: int, resolution: int) -> np.ndarray:
    """uint8 [t, h, w, 3] -> [frames, R, R, 3]: centre square crop, resize, cut or hold the last frame."""
    from PIL import Image

    _, h, w, _ = video.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    box = (left, top, left + side, top + side)
    video = np.stack([np.asarray(Image.fromarray(f).resize((resolution, resolution), Image.BILINEAR, box=box))
                      for f in video[:frames]])
    if len(video) < frames:
        video = np.concatenate([video, np.repeat(video[-1:], frames - len(video), axis=0)])
    return video


def read_input(path: str, cfg, task: str, num: int) -> dict:
    """The condition clip of ``--input``, fitted to the config and repeated ``num`` times."""
    d = cfg.dataset
    frames, resolution, fps, rate = int(d.frames), int(d.resolution), float(d.fps), int(d.sample_rate)
    samples = audio_samples_for_video(frames, fps, rate)
    given = conditioned_modalities(task)
    try:
        if "video" in given:
            clip = media.read_video(path, fps=fps, sample_rate=rate, resize_short_side=resolution,
                                    with_audio="audio" in given)
            video, audio = _fit_frames(clip.video, frames, resolution), clip.audio
        else:
            video, audio = None, media.read_audio(path, sample_rate=rate)
    except media.MediaError as e:
        raise UserError(str(e)) from None
    if "audio" in given and (audio is None or len(audio) == 0):
        raise UserError(f"{path}: has no sound track, and task {task!r} is conditioned on sound")
    out = {"label": np.zeros((num,), np.int32)}
    if video is not None:
        out["video"] = np.repeat(video[None], num, axis=0)
    sound = np.zeros((samples,), np.float32)
    if audio is not None:
        sound[: min(samples, len(audio))] = audio[:samples]
    out["audio"] = np.repeat(sound[None], num, axis=0)
    return out


def read_split(cfg, split: str, num: int, extra_features: str = "") -> dict:
    """The first ``num`` clips of ``split`` (evaluation preprocessing; cycling when it is shorter), numpy."""
    dataset = clip_dataset_config(cfg, extra_features)
    dataset.read_threads = 1  # one clip at a time
    it = pipeline.make_iterator(dataset, split=split, global_batch_size=1, seed=0,
                                train=False, process_index=0, process_count=1, num_epochs=10_000)
    rows = []
    for batch in it:
        rows.append(batch)
        if len(rows) == num:
            break
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


class Generator:
    """A generative model and its tokenizers (modality -> ``LoadedTokenizer``).

    Where the model runs: a model this process holds whole is sampled on one local device
    (``device``, default the first); a model spread over several processes (a multi-host
    run's evaluation) stays on its mesh, every process runs the same sampling calls
    (SPMD) and gets the whole result back (``distributed.host_value``). Only process 0
    writes files (``save``).
    """

    def __init__(self, cfg, model, *, tokenizers: dict, device=None):
        self.cfg = cfg
        graphdef, state = nnx.split(model)
        if all(x.is_fully_addressable for x in jax.tree.leaves(state)):
            state = jax.device_put(state, device or jax.local_devices()[0])
        self.model = nnx.merge(graphdef, state)
        self.tokenizers = tokenizers
        d = cfg.dataset
        self.fps, self.sample_rate = float(d.fps), int(d.sample_rate)

    # ------------------------------------------------------------------ sampling
    def sample(self, task: str, inputs=None, num: int | None = None, *, seed: int = 0, split: str = "test",
               steps: int | None = None, guidance: float | None = None, temperature: float | None = None,
               progress: bool = False) -> SampleResult:
        """``num`` samples of ``task`` (the Python API's entry point; ``mmgen.load_generator``).

        ``inputs``, the condition of a conditional task: a video or sound file (every sample
        shares it, fitted to the config's clip as ``mmgen sample --input`` does), a dict of
        arrays already of the config's clip shape (``video`` uint8 ``[n, T, H, W, 3]``,
        ``audio`` float32 ``[n, S]``), or None for the first clips of ``split``. ``num``
        defaults to the dict's clip count, else 1. Unconditional tasks ignore ``inputs``.
        """
        check_task(self.cfg, task)
        clips = None
        if conditioned_modalities(task) and isinstance(inputs, (str, os.PathLike)):
            num = int(num or 1)
            clips = read_input(os.fspath(inputs), self.cfg, task, num)
        elif conditioned_modalities(task) and inputs is not None:
            clips = {k: np.asarray(v) for k, v in dict(inputs).items()}
            have = min(len(v) for v in clips.values())
            num = int(num or have)
            missing = [m for m in conditioned_modalities(task) if m not in clips]
            if missing or have < num:
                raise UserError(f"inputs for {task!r} need {conditioned_modalities(task)} with at least {num} clips; "
                                f"got {({k: list(v.shape) for k, v in clips.items()})}")
            clips.setdefault("label", np.zeros((have,), np.int32))
        if num is not None and int(num) < 1:
            raise UserError(f"num={num} must be at least 1")
        return self.sample_task(task, int(num or 1), seed=seed, clips=clips, split=split, steps=steps,
                                guidance=guidance, temperature=temperature, progress=progress)

    def sample_task(self, task: str, num: int, *, seed: int = 0, clips: dict | None = None, split: str = "test",
                    steps: int | None = None, guidance: float | None = None, temperature: float | None = None,
                    progress: bool = False) -> SampleResult:
        """``num`` samples of ``task``; conditions from ``clips`` or the first clips of ``split``."""
        check_task(self.cfg, task)
        s = self.cfg.sampling
        steps = int(s.steps if steps is None else steps)
        guidance = float(s.guidance if guidance is None else guidance)
        temperature = float(s.temperature if temperature is None else temperature)
        given = conditioned_modalities(task)
        if given and clips is None:
            clips = read_split(self.cfg, split, num)
        chunk = max(1, min(num, int(s.batch_size)))
        task_obj = tasks_lib.get_task(task)
        labels = np.arange(num, dtype=np.int32) % int(self.cfg.model.num_classes)
        commit = self.cfg.conditioning == "commit"
        pieces = []
        for c, lo in enumerate(progress_bar(range(0, num, chunk), desc=f"sample {task}", disable=not progress)):
            rows = np.minimum(np.arange(lo, lo + chunk), num - 1)  # the last chunk repeats its last row
            key = jax.random.fold_in(jax.random.key(seed), c)
            k_sample, k_region = jax.random.split(key)
            condition = {"label": jnp.asarray(labels[rows])}
            if given:
                ids = np.full((chunk,), task_obj.index, np.int32)
                sub = {m: self.tokenizers[m] for m in given}
                video = clips["video"][rows] if "video" in given else None
                audio = clips["audio"][rows] if "audio" in given else None
                toks = tokenize_clips(self.cfg, sub, video, audio, ids, k_region, 0, with_condition=commit)
                for m in given:
                    condition[m] = jnp.asarray(toks[f"{m}_condition" if commit else f"{m}_tokens"])
            tokens = sampling.sample(self.model, task, condition, k_sample, steps, guidance, temperature=temperature,
                                     choice_temperature=float(s.choice_temperature), schedule=s.schedule,
                                     mode=self.cfg.conditioning, batch_size=chunk, region_rng=k_region)
            pieces.append({m: np.asarray(host_value(t))[: min(chunk, num - lo)] for m, t in tokens.items()})
        tokens = {m: np.concatenate([p[m] for p in pieces]) for m in pieces[0]}
        video, audio = self.decode(tokens)
        if clips is not None and task_obj.video.kind == "condition":
            video = clips["video"][:num]
        if clips is not None and task_obj.audio.kind == "condition":
            audio = clips["audio"][:num]
        reference = None if clips is None else {k: v[:num] for k, v in clips.items()}
        return SampleResult(task, tokens, video, audio, labels, reference)

    def decode(self, tokens: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Tokens -> (uint8 video ``[n, T, H, W, 3]`` or None, float32 audio ``[n, S]`` or None)."""
        video = audio = None
        chunk = max(1, int(self.cfg.sampling.batch_size))
        if "video" in tokens:
            video = np.concatenate([media.from_model(np.asarray(self.tokenizers["video"].decode(tokens["video"][i:i + chunk])))
                                    for i in range(0, len(tokens["video"]), chunk)])
        if "audio" in tokens:
            d = self.cfg.dataset
            samples = audio_samples_for_video(int(d.frames), float(d.fps), int(d.sample_rate))
            audio = np.concatenate([np.asarray(self.tokenizers["audio"].decode(tokens["audio"][i:i + chunk]))
                                    for i in range(0, len(tokens["audio"]), chunk)])[:, :samples]
        return video, audio

    # ------------------------------------------------------------------ files
    @staticmethod
    def grid_rows(result: SampleResult) -> tuple[np.ndarray, list[str]] | None:
        """The grid's clips ``[rows, T, H, W, 3]`` and a label per row: ``clip i real`` then
        ``clip i generated`` per clip when conditioned, ``sample i`` otherwise (None without video)."""
        if result.video is None:
            return None
        rows, n = result.video, len(result.video)
        ref = (result.reference or {}).get("video")
        if ref is not None and tasks_lib.get_task(result.task).video.kind != "condition":
            rows = np.stack([ref[:n], result.video], axis=1).reshape(-1, *result.video.shape[1:])
            return rows, [f"clip {i} {kind}" for i in range(n) for kind in ("real", "generated")]
        what = "generated" if tasks_lib.get_task(result.task).video.kind != "condition" else "given"
        return rows, [f"sample {i} ({what} video)" for i in range(n)]

    @classmethod
    def save_grid(cls, result: SampleResult, path: str) -> str | None:
        """PNG of the sampled videos (rows: reference then sample per clip when conditioned),
        labelled: the task on top, each row's clip and kind (real / generated) in a left margin."""
        grid = cls.grid_rows(result)
        if grid is None:
            return None
        rows, labels = grid
        media.save_png_grid(path, rows, upscale=2, row_labels=labels, title=result.task)
        return path

    def save(self, result: SampleResult, out_dir: str, prefix: str | None = None) -> dict:
        """mp4 (or wav) per sample, a PNG grid and the tokens; returns {"media": [...], "grid": path, "tokens": path}."""
        prefix = prefix or result.task
        paths = {"media": [], "grid": None, "tokens": fs.join(out_dir, f"{prefix}_tokens.npz")}
        n = len(result.labels)
        writer = is_writer()
        if writer:
            fs.makedirs(out_dir)
        for i in range(n):
            if result.video is not None:
                path = fs.join(out_dir, f"{prefix}_{i:03d}.mp4")
                audio = result.audio[i] if result.audio is not None else None
                if writer:
                    media.write_video(path, result.video[i], fps=self.fps, audio=audio, sample_rate=self.sample_rate)
            else:
                path = fs.join(out_dir, f"{prefix}_{i:03d}.wav")
                if writer:
                    media.write_wav(path, result.audio[i], sample_rate=self.sample_rate)
            paths["media"].append(path)
        if result.video is not None:
            paths["grid"] = fs.join(out_dir, f"{prefix}.png")
            if writer:
                self.save_grid(result, paths["grid"])
        if writer:
            with fs.local_file(paths["tokens"]) as local:
                np.savez(local, task=result.task, labels=result.labels,
                         **{f"{m}_tokens": t for m, t in result.tokens.items()})
        return paths

"""The transformer's input on the host: token layout, tasks per batch, clips -> tokens.

Shared by training (``mmgen.families.generative``), sampling (``generator``) and
evaluation, so all three see the same tokens for the same clip:

* ``specs_of`` / ``task_weights``: the token layout and the trained tasks of a config;
* ``tokenize_clips``: clips (and their COMMIT condition clips) -> tokens through
  frozen tokenizers given by the caller;
* ``draw_tasks``: the tasks and the region key of global batch ``i``, drawn from
  ``default_rng([seed, i])`` so every host (and a resumed run) draws the same;
* ``TokenBatches`` (clips through tokenizers), ``RandomTokenBatches`` (benchmarks,
  ``plan``): resumable batch streams; ``token_cache.CachedTokenBatches`` shares their
  base ``IndexedBatches``;
* ``training_example``: a batch's masked inputs, targets and loss weights.

Batch (host-local numpy, ``b`` examples): ``task_id``, ``label`` int32 ``[b]``;
``has_audio`` bool ``[b]``; ``region_key`` uint32 ``[b, k]`` (one PRNG key's data,
the same on every row); ``<m>_tokens`` int32 ``[b, *spec.shape]`` and, for COMMIT,
``<m>_condition`` (same shape) for every modality ``m`` of the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmgen.data import pipeline
from mmgen.errors import UserError
from mmgen.generative import masking
from mmgen.generative import tasks as tasks_lib
from mmgen.generative.transformer import modality_specs
from mmgen.tokenizers import kinds
from mmgen.train import workdir as workdir_lib

DATA_SOURCES = ("tokenizers", "token_cache", "random_tokens")


def specs_of(cfg):
    """The model's ``ModalitySpec`` per modality (config mistakes as ``UserError``)."""
    try:
        return modality_specs(cfg.model)
    except ValueError as e:
        raise UserError(f"config.model: {e}") from None


def task_weights(cfg) -> dict[str, float]:
    """Tasks with a positive weight (``cfg.task_weights``), in registry order."""
    weights = {name: float(w) for name, w in cfg.task_weights.items()}
    unknown = sorted(set(weights) - set(tasks_lib.TASK_NAMES))
    if unknown:
        raise UserError(f"config.task_weights has unknown tasks {unknown}; valid: {', '.join(tasks_lib.TASK_NAMES)}")
    negative = [n for n, w in weights.items() if w < 0]
    if negative:
        raise UserError(f"config.task_weights for {negative} are negative; weights must be >= 0")
    positive = {n: weights[n] for n in tasks_lib.TASK_NAMES if weights.get(n, 0.0) > 0}
    if not positive:
        raise UserError("config.task_weights gives no task a positive weight")
    return positive


def tokenizer_workdir(cfg, modality: str) -> str:
    return str(cfg.tokenizers.get(f"{modality}_workdir", "") or "")


def read_tokenizer_config(workdir: str, modality: str):
    """The config of the ``modality`` tokenizer trained in ``workdir`` (``UserError`` otherwise)."""
    if not workdir_lib.has_config(workdir):
        raise UserError(f"config.tokenizers.{modality}_workdir={workdir!r} is not a tokenizer workdir (no config.json)")
    tcfg = workdir_lib.read_config(workdir)
    if tcfg.get("family") != "tokenizer" or tcfg.get("modality") != modality:
        raise UserError(f"config.tokenizers.{modality}_workdir={workdir!r} holds a {tcfg.get('family')!r} run "
                        f"for {tcfg.get('modality')!r}, not a {modality} tokenizer")
    return tcfg


def check_tokenizer_layout(cfg, modality: str, tokenizer_model) -> None:
    """The config's token layout must be what the tokenizer makes of the config's clips.

    The ``modality`` tokenizer's kind (``mmgen.tokenizers.kinds``) compares its tokens
    of one ``cfg.dataset`` clip with ``specs_of(cfg)[modality]``.
    """
    kinds.kind(modality).check_layout(tokenizer_model, cfg.dataset, specs_of(cfg)[modality])


def audio_padded_length(cfg, tokenizer) -> int:
    """Samples the audio condition is built on: a whole number of latent frames."""
    return int(cfg.model.audio_len) * int(tokenizer.model.hop_length)


@functools.partial(jax.jit, static_argnames=("grid", "temporal_factor", "start"))
def condition_video(video, global_task_ids, key, *, grid, temporal_factor, start):
    """COMMIT condition clips of rows ``start:start+b`` of a global batch (region drawn globally)."""
    region = tasks_lib.condition_region(global_task_ids, "video", grid, key)
    region = jax.lax.dynamic_slice_in_dim(region, start, video.shape[0], axis=0)
    ids = jax.lax.dynamic_slice_in_dim(global_task_ids, start, video.shape[0], axis=0)
    return tasks_lib.build_condition_video(video, ids, None, grid, temporal_factor=temporal_factor, region=region)


@functools.partial(jax.jit, static_argnames=("latent_len",))
def condition_audio(audio, task_ids, *, latent_len):
    return tasks_lib.build_condition_audio(audio, task_ids, latent_len)


def tokenize_clips(cfg, tokenizers: dict, video_u8, audio, global_task_ids, region_key, start: int = 0,
                   with_condition: bool = True) -> dict:
    """Tokens (and COMMIT condition tokens) of clips; numpy in, numpy out.

    ``video_u8`` uint8 ``[b, T, H, W, 3]``; ``audio`` float32 ``[b, S]``;
    ``global_task_ids`` int32 ``[B]`` of the whole global batch, of which these clips are
    rows ``start:start+b``; ``region_key`` a PRNG key (the dynamic boxes' draw).
    Returns ``{"<m>_tokens": ..., "<m>_condition": ...}`` for every tokenizer.
    """
    b = len(video_u8) if video_u8 is not None else len(audio)
    local_ids = np.asarray(global_task_ids)[start:start + b]
    out = {}
    if "video" in tokenizers:
        tok = tokenizers["video"]
        clip = jnp.asarray(np.asarray(video_u8), jnp.float32) / 127.5 - 1.0
        grid = tuple(int(n) for n in cfg.model.video_grid)
        parts = [clip]
        if with_condition:
            parts.append(condition_video(clip, jnp.asarray(global_task_ids, jnp.int32), region_key, grid=grid,
                                          temporal_factor=int(tok.model.temporal_factor), start=int(start)))
        tokens = np.asarray(tok.encode(jnp.concatenate(parts, axis=0))[0])
        out["video_tokens"] = tokens[:b]
        if with_condition:
            out["video_condition"] = tokens[b:]
    if "audio" in tokenizers:
        tok = tokenizers["audio"]
        length = audio_padded_length(cfg, tok)
        sound = np.zeros((b, length), np.float32)
        sound[:, : min(length, audio.shape[1])] = np.asarray(audio, np.float32)[:, :length]
        parts = [jnp.asarray(sound)]
        if with_condition:
            parts.append(condition_audio(parts[0], jnp.asarray(local_ids, jnp.int32), latent_len=int(cfg.model.audio_len)))
        tokens = np.asarray(tok.encode(jnp.concatenate(parts, axis=0))[0])
        out["audio_tokens"] = tokens[:b]
        if with_condition:
            out["audio_condition"] = tokens[b:]
    return out


@functools.cache
def key_shape() -> tuple[int, ...]:
    """Shape of one PRNG key's raw data under the configured implementation ((2,) for threefry)."""
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def draw_tasks(cfg, seed: int, index: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(task ids int32 [global_batch], region key data uint32) of global batch ``index``."""
    rng = np.random.default_rng([int(seed), int(index)])
    probs = tasks_lib.task_probabilities(task_weights(cfg))
    ids = rng.choice(len(tasks_lib.TASK_NAMES), size=global_batch, p=probs).astype(np.int32)
    key = rng.integers(0, 2**32, size=key_shape(), dtype=np.uint32)
    return ids, key


def host_task_fields(key_data: np.ndarray, ids: np.ndarray, start: int, local_batch: int) -> dict:
    """This host's ``task_id`` rows of a global batch's tasks and the batch's ``region_key`` per row."""
    return {"task_id": ids[start:start + local_batch],
            "region_key": np.broadcast_to(key_data, (local_batch, *key_data.shape)).copy()}


class TokenBatches:
    """Clips from the grain pipeline -> tasks, condition clips and tokens (see the module docstring)."""

    def __init__(self, cfg, clips, tokenizers: dict, *, seed: int, batch_size: int, process_index: int,
                 process_count: int):
        self.cfg, self.clips, self.tokenizers = cfg, clips, tokenizers
        self.seed, self.global_batch = int(seed), int(batch_size)
        self.local_batch = self.global_batch // process_count
        self.start = process_index * self.local_batch
        self.index = 0
        self.commit = cfg.conditioning == "commit"

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        clips = next(self.clips)
        ids, key_data = draw_tasks(self.cfg, self.seed, self.index, self.global_batch)
        b, start = self.local_batch, self.start
        out = tokenize_clips(self.cfg, self.tokenizers, clips.get("video"), clips.get("audio"), ids,
                             jax.random.wrap_key_data(jnp.asarray(key_data)), start, with_condition=self.commit)
        out.update(host_task_fields(key_data, ids, start, b), label=np.asarray(clips["label"], np.int32),
                   has_audio=np.asarray(clips["has_audio"], bool))
        self.index += 1
        return out

    def get_state(self) -> dict:
        state = self.clips.get_state()
        return {"index": self.index, "clips": state.decode() if isinstance(state, bytes) else state}

    def set_state(self, state: dict) -> None:
        clips = state["clips"]
        self.clips.set_state(clips.encode() if isinstance(clips, str) else clips)
        self.index = int(state["index"])

    def seek(self, examples: int) -> None:
        """Just after ``examples`` examples of the global stream, for any process layout."""
        pipeline.seek(self.clips, examples, global_batch_size=self.global_batch,
                      process_index=self.start // self.local_batch, process_count=self.global_batch // self.local_batch)
        self.index = examples // self.global_batch


class IndexedBatches:
    """A batch stream whose position is its batch index (``get_state`` / ``set_state``).

    Holds this host's slice of the global batch (rows ``start:start+local_batch``);
    ``num_batches`` ends the stream (evaluation), None never does (training).
    """

    def __init__(self, cfg, *, seed: int, batch_size: int, process_index: int, process_count: int,
                 num_batches: int | None = None):
        self.cfg, self.seed, self.global_batch = cfg, int(seed), int(batch_size)
        self.local_batch = self.global_batch // process_count
        self.start = process_index * self.local_batch
        self.process_index, self.num_batches = process_index, num_batches
        self.index = 0

    def __iter__(self):
        return self

    def _exhausted(self) -> bool:
        return self.num_batches is not None and self.index >= self.num_batches

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def seek(self, examples: int) -> None:
        """Just after ``examples`` examples of the global stream, for any process layout."""
        self.index = examples // self.global_batch


class RandomTokenBatches(IndexedBatches):
    """Uniform random tokens of the configured layout (no tokenizer, no files); resumable.

    Batch ``i`` is drawn whole from ``default_rng([seed, i, 1])`` and each host keeps its
    rows, so the global batch does not depend on the number of processes.
    """

    def __next__(self) -> dict:
        if self._exhausted():
            raise StopIteration
        ids, key_data = draw_tasks(self.cfg, self.seed, self.index, self.global_batch)
        rng = np.random.default_rng([self.seed, self.index, 1])
        n, b, start = self.global_batch, self.local_batch, self.start
        rows = slice(start, start + b)
        out = {}
        for m, spec in specs_of(self.cfg).items():
            out[f"{m}_tokens"] = rng.integers(0, spec.vocab, (n, *spec.shape), dtype=np.int32)[rows]
            if self.cfg.conditioning == "commit":
                out[f"{m}_condition"] = rng.integers(0, spec.vocab, (n, *spec.shape), dtype=np.int32)[rows]
        out.update(host_task_fields(key_data, ids, start, b),
                   label=rng.integers(0, int(self.cfg.model.num_classes), (n,), dtype=np.int32)[rows],
                   has_audio=np.ones((b,), bool))
        self.index += 1
        return out


def clip_dataset_config(cfg, extra_features: str = "") -> ml_collections.ConfigDict:
    """The dataset block for reading clips (``extra_features`` e.g. ``"main_y"`` for eval)."""
    d = ml_collections.ConfigDict(cfg.dataset.to_dict())
    d.extra_features = extra_features
    return d

def training_example(cfg, batch: dict, rng: jax.Array, *, cfg_dropout: float | None = None,
                     ratio: jax.Array | None = None) -> masking.MaskedExample:
    """The batch's masked inputs, targets and loss weights (``masking.make_training_example``)."""
    specs = specs_of(cfg)
    commit = cfg.conditioning == "commit"
    return masking.make_training_example(
        cfg.model,
        {m: batch[f"{m}_tokens"] for m in specs},
        batch["task_id"],
        rng,
        labels=batch["label"],
        condition_tokens={m: batch[f"{m}_condition"] for m in specs} if commit else None,
        has_audio=batch.get("has_audio"),
        region_rng=jax.random.wrap_key_data(batch["region_key"][0]),
        mode=cfg.conditioning,
        schedule=cfg.masking.schedule,
        loss_on=cfg.masking.loss_on,
        mask_count=cfg.masking.get("mask_count", "floor"),
        cfg_dropout=cfg.masking.cfg_dropout if cfg_dropout is None else cfg_dropout,
        ratio=ratio,
    )


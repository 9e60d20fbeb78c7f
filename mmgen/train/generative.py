"""Masked generative transformer training: MAGVIT's multi-task recipe with COMMIT, plus sound.

One update step (REFERENCE.md "Masked multi-task transformer"):

1. every example of the batch carries a task (drawn on the host with probability
   proportional to ``cfg.task_weights``), the tokens of its clip and, for COMMIT, the
   tokens of the task's condition clip (``tasks.build_condition_video`` /
   ``build_condition_audio`` tokenized by the same frozen tokenizers);
2. ``masking.make_training_example`` masks a ``cos(pi/2 u)`` fraction of each
   example's elements, shows condition tokens inside the condition region (COMMIT)
   or keeps the condition as real tokens (``conditioning=prefix``), and drops the
   condition with probability ``masking.cfg_dropout`` for classifier-free guidance;
3. factorised cross-entropy on the weighted elements, one AdamW step
   (b = (0.9, 0.96), weight decay 0.045, warm-up + cosine, clip 1.0: ``cfg.optimizer``).

Input (host side, ``make_data``). ``data_source="tokenizers"``: the grain clip
pipeline -> ``TokenBatches``, which draws the tasks of batch ``i`` from
``default_rng([seed, i])`` for the *global* batch and keeps this host's rows, builds the
condition clips with the condition region drawn for the global batch (so the train
step, which sees the global batch and the same ``region_key``, draws the same
dynamic boxes), and tokenizes clip + condition in one jitted call per modality.
``get_state`` / ``set_state`` carry the grain state and the batch index: resuming
gives the same batches. ``data_source="token_cache"``: the same tokenizers' tokens of
every clip computed once into ``cfg.token_cache`` (``mmgen.train.token_cache``: no
augmentation; COMMIT only for tasks whose condition is a whole modality).
``data_source="random_tokens"``: uniform random tokens of
the configured layout and no tokenizer (benchmarks, ``plan``).

Batch (host-local numpy, ``b`` examples): ``task_id``, ``label`` int32 ``[b]``;
``has_audio`` bool ``[b]``; ``region_key`` uint32 ``[b, k]`` (one PRNG key's data,
the same on every row); ``<m>_tokens`` int32 ``[b, *spec.shape]`` and, for COMMIT,
``<m>_condition`` (same shape) for every modality ``m`` of the model.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen.data import pipeline
from mmgen.errors import UserError
from mmgen.generative import masking
from mmgen.generative import tasks as tasks_lib
from mmgen.generative.transformer import (
    MaskedTransformer,
    flops_per_token,
    modality_specs,
    sequence_length,
)
from mmgen.train import optim
from mmgen.train.loop import Family

DATA_SOURCES = ("tokenizers", "token_cache", "random_tokens")


# ------------------------------------------------------------------------ config
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


def _read_tokenizer_config(workdir: str, modality: str):
    from mmgen import config as config_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"config.tokenizers.{modality}_workdir={workdir!r} is not a tokenizer workdir (no config.json)")
    tcfg = config_lib.from_json_file(path)
    if tcfg.get("family") != "tokenizer" or tcfg.get("modality") != modality:
        raise UserError(f"config.tokenizers.{modality}_workdir={workdir!r} holds a {tcfg.get('family')!r} run "
                        f"for {tcfg.get('modality')!r}, not a {modality} tokenizer")
    return tcfg


def check_tokenizer_layout(cfg, modality: str, tokenizer_model) -> None:
    """The config's token layout must be what the tokenizer makes of the config's clips."""
    spec = specs_of(cfg)[modality]
    d = cfg.dataset
    if modality == "video":
        shape = tokenizer_model.latent_shape((1, int(d.frames), int(d.resolution), int(d.resolution), 3))[1:]
        if tokenizer_model.quantizer.num_levels != 1:
            raise UserError("the video tokenizer must have one token per latent position (LFQ, FSQ or VQ, not RVQ)")
        if shape != spec.shape:
            raise UserError(f"the video tokenizer maps {d.frames}x{d.resolution}x{d.resolution} clips to "
                            f"{'x'.join(map(str, shape))} tokens but config.model.video_grid={tuple(spec.shape)}: "
                            f"set --config.model.video_grid={tuple(shape)}")
        if tokenizer_model.vocab_size != spec.vocab:
            raise UserError(f"the video tokenizer has {tokenizer_model.vocab_size} codes but "
                            f"config.model.video_vocab={spec.vocab}: set --config.model.video_vocab="
                            f"{tokenizer_model.vocab_size}")
    else:
        from mmgen.tokenizers.audio import audio_samples_for_video

        samples = audio_samples_for_video(int(d.frames), float(d.fps), int(d.sample_rate))
        if int(tokenizer_model.sample_rate) != int(d.sample_rate):
            raise UserError(f"the audio tokenizer runs at {tokenizer_model.sample_rate} Hz but "
                            f"config.dataset.sample_rate={d.sample_rate}")
        shape = tokenizer_model.latent_shape((1, samples))[1:]
        if shape != spec.shape:
            levels = shape[1] if len(shape) > 1 else 1
            raise UserError(f"the audio tokenizer maps {samples} samples to {'x'.join(map(str, shape))} tokens but "
                            f"the config says {'x'.join(map(str, spec.shape))}: set --config.model.audio_len={shape[0]} "
                            f"--config.model.audio_levels={levels}")
        if tokenizer_model.vocab_size != spec.vocab:
            raise UserError(f"the audio tokenizer has {tokenizer_model.vocab_size} codes per level but "
                            f"config.model.audio_vocab={spec.vocab}: set --config.model.audio_vocab="
                            f"{tokenizer_model.vocab_size}")


def validate(cfg) -> None:
    specs = specs_of(cfg)
    weights = task_weights(cfg)
    for name in weights:
        missing = [m for m in tasks_lib.get_task(name).modalities() if m not in specs]
        if missing:
            raise UserError(f"task {name!r} has weight {weights[name]:g} but needs {missing}, which the model does "
                            f"not have: set --config.task_weights.{name}=0")
    for value, choices, key in ((cfg.conditioning, masking.MODES, "conditioning"),
                                (cfg.masking.schedule, masking.SCHEDULES, "masking.schedule"),
                                (cfg.masking.loss_on, masking.LOSS_ON, "masking.loss_on"),
                                (cfg.sampling.schedule, masking.SCHEDULES, "sampling.schedule"),
                                (cfg.data_source, DATA_SOURCES, "data_source")):
        if value not in choices:
            raise UserError(f"config.{key}={value!r} is not one of {', '.join(choices)}")
    if cfg.data_source == "random_tokens":
        return
    from mmgen.train.tokenizer import build_tokenizer

    for m in ("video", "audio"):
        workdir = tokenizer_workdir(cfg, m)
        if m in specs and not workdir:
            raise UserError(f"config.tokenizers.{m}_workdir is empty but the model has {m} tokens: give the {m} "
                            f"tokenizer's workdir, or --config.data_source=random_tokens for a benchmark")
        if workdir and m not in specs:
            raise UserError(f"config.tokenizers.{m}_workdir is set but the model has no {m} tokens "
                            f"(use the variant option modalities=video+audio)")
        if workdir:
            tcfg = _read_tokenizer_config(workdir, m)
            model = nnx.eval_shape(lambda tcfg=tcfg: build_tokenizer(tcfg, nnx.Rngs(0)))
            check_tokenizer_layout(cfg, m, model)
    if cfg.data_source == "token_cache":
        from mmgen.train import token_cache

        token_cache.check_tasks(cfg, weights)
        for split in ("train", cfg.get("eval_split", "test")):
            token_cache.check(cfg, split)  # a stale cache is an error here, before anything compiles


# ------------------------------------------------------------------------ state
class GenerativeState(nnx.Module):
    """The transformer, its AdamW optimizer and (``ema_decay > 0``) an EMA copy for sampling."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.model = MaskedTransformer(cfg.model, rngs=rngs)
        self.optimizer = optim.make_optimizer(self.model, cfg.optimizer, cfg.schedule, cfg.total_steps)
        self.ema = nnx.data(nnx.clone(self.model) if cfg.get("ema_decay", 0.0) else None)


def create_state(cfg, rngs: nnx.Rngs) -> GenerativeState:
    return GenerativeState(cfg, rngs)


def inference_model(state: GenerativeState) -> MaskedTransformer:
    return state.ema if state.ema is not None else state.model


# ------------------------------------------------------------------------ step
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


def train_step(cfg, state: GenerativeState, batch, rng) -> dict:
    k_mask, k_dropout = jax.random.split(rng)
    # Masks are drawn for the whole batch (the condition boxes must match the host's
    # global draw), then the example is cut into ``cfg.grad_accum_steps`` micro-batches.
    example = training_example(cfg, batch, k_mask)
    steps = optim.grad_accum_steps(cfg)
    total_weight = jnp.maximum(sum(jnp.sum(w) for w in example.weights.values()), 1.0)

    def loss_fn(model, micro: masking.MaskedExample, rng):
        loss, metrics = masking.loss_fn(model, micro, label_smoothing=cfg.masking.label_smoothing, rng=rng,
                                        train=True)
        if steps > 1:
            # Each micro-batch's weighted mean, rescaled so that the mean over micro-batches
            # is the whole batch's weighted mean: accumulated = one-pass gradients.
            share = steps * jnp.maximum(metrics["weight"], 1.0) / total_weight
            loss = loss * share
            metrics = {**metrics, "loss": loss, "accuracy": metrics["accuracy"] * share,
                       "weight": metrics["weight"] * steps}
        return loss, (metrics, None)

    # Gradients only for what the optimizer trains (all weights here; adapters only under
    # the adapters family, so a frozen base costs no gradient memory).
    loss, metrics, _, grads = optim.accumulate_gradients(cfg, loss_fn, (state.model,), example, k_dropout,
                                                         wrt=state.optimizer.wrt)
    metrics = dict(metrics)
    metrics["grad_norm"] = optim.global_norm(grads)
    step = state.optimizer.step[...]
    state.optimizer.update(state.model, grads)
    if state.ema is not None:
        optim.ema_update(state.ema, state.model, cfg.ema_decay)
    metrics["loss"] = loss
    metrics["lr"] = optim.learning_rate(cfg.optimizer, cfg.schedule, cfg.total_steps, step)
    return metrics


def eval_step(cfg, state: GenerativeState, batch, rng) -> dict:
    """Loss and masked-token accuracy of the inference model (no CFG dropout)."""
    example = training_example(cfg, batch, rng, cfg_dropout=0.0)
    _, metrics = masking.loss_fn(inference_model(state), example, label_smoothing=cfg.masking.label_smoothing,
                                 train=False)
    return {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}


def tokens_per_example(cfg) -> float:
    return float(sequence_length(cfg.model))


def flops_per_example(cfg) -> float:
    return flops_per_token(cfg.model) * tokens_per_example(cfg)


# ------------------------------------------------------------------------ tokenizers
_LOADED_TOKENIZERS: dict = {}


def load_tokenizers(cfg, device=None) -> dict:
    """modality -> ``LoadedTokenizer`` for the model's modalities, its weights on one device.

    Host-side tokenization runs beside the training step on one local device (the
    first by default) instead of replicated over every device of the mesh. Tokenizers
    are frozen, so each (workdir, device) is loaded (newest checkpoint) and compiled once
    per process.
    """
    from mmgen import tokenizers as tokenizers_lib

    device = device or jax.local_devices()[0]
    out = {}
    for m in specs_of(cfg):
        workdir = tokenizer_workdir(cfg, m)
        if not workdir:
            raise UserError(f"config.tokenizers.{m}_workdir is empty: this run has no {m} tokenizer")
        _read_tokenizer_config(workdir, m)
        key = (os.path.abspath(workdir), device)
        if key not in _LOADED_TOKENIZERS:
            _LOADED_TOKENIZERS[key] = tokenizers_lib.load(workdir, devices=device)
        out[m] = _LOADED_TOKENIZERS[key]
        check_tokenizer_layout(cfg, m, out[m].model)
    return out


def audio_padded_length(cfg, tokenizer) -> int:
    """Samples the audio condition is built on: a whole number of latent frames."""
    return int(cfg.model.audio_len) * int(tokenizer.model.hop_length)


@functools.partial(jax.jit, static_argnames=("grid", "temporal_factor", "start"))
def _condition_video(video, global_task_ids, key, *, grid, temporal_factor, start):
    """COMMIT condition clips of rows ``start:start+b`` of a global batch (region drawn globally)."""
    region = tasks_lib.condition_region(global_task_ids, "video", grid, key)
    region = jax.lax.dynamic_slice_in_dim(region, start, video.shape[0], axis=0)
    ids = jax.lax.dynamic_slice_in_dim(global_task_ids, start, video.shape[0], axis=0)
    return tasks_lib.build_condition_video(video, ids, None, grid, temporal_factor=temporal_factor, region=region)


@functools.partial(jax.jit, static_argnames=("latent_len",))
def _condition_audio(audio, task_ids, *, latent_len):
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
            parts.append(_condition_video(clip, jnp.asarray(global_task_ids, jnp.int32), region_key, grid=grid,
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
            parts.append(_condition_audio(parts[0], jnp.asarray(local_ids, jnp.int32), latent_len=int(cfg.model.audio_len)))
        tokens = np.asarray(tok.encode(jnp.concatenate(parts, axis=0))[0])
        out["audio_tokens"] = tokens[:b]
        if with_condition:
            out["audio_condition"] = tokens[b:]
    return out


# ------------------------------------------------------------------------ data
@functools.cache
def _key_shape() -> tuple[int, ...]:
    """Shape of one PRNG key's raw data under the configured implementation ((2,) for threefry)."""
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def draw_tasks(cfg, seed: int, index: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(task ids int32 [global_batch], region key data uint32) of global batch ``index``."""
    rng = np.random.default_rng([int(seed), int(index)])
    probs = tasks_lib.task_probabilities(task_weights(cfg))
    ids = rng.choice(len(tasks_lib.TASK_NAMES), size=global_batch, p=probs).astype(np.int32)
    key = rng.integers(0, 2**32, size=_key_shape(), dtype=np.uint32)
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


class RandomTokenBatches(IndexedBatches):
    """Uniform random tokens of the configured layout (no tokenizer, no files); resumable."""

    def __next__(self) -> dict:
        if self._exhausted():
            raise StopIteration
        ids, key_data = draw_tasks(self.cfg, self.seed, self.index, self.global_batch)
        rng = np.random.default_rng([self.seed, self.index, self.process_index, 1])
        b, start = self.local_batch, self.start
        out = {}
        for m, spec in specs_of(self.cfg).items():
            out[f"{m}_tokens"] = rng.integers(0, spec.vocab, (b, *spec.shape), dtype=np.int32)
            if self.cfg.conditioning == "commit":
                out[f"{m}_condition"] = rng.integers(0, spec.vocab, (b, *spec.shape), dtype=np.int32)
        out.update(host_task_fields(key_data, ids, start, b),
                   label=rng.integers(0, int(self.cfg.model.num_classes), (b,), dtype=np.int32),
                   has_audio=np.ones((b,), bool))
        self.index += 1
        return out


def example_batch(cfg) -> dict:
    """One global batch's shapes (``plan`` compiles the step from the config alone)."""
    b = int(cfg.batch_size)
    out = {}
    for m, spec in specs_of(cfg).items():
        out[f"{m}_tokens"] = jax.ShapeDtypeStruct((b, *spec.shape), jnp.int32)
        if cfg.conditioning == "commit":
            out[f"{m}_condition"] = jax.ShapeDtypeStruct((b, *spec.shape), jnp.int32)
    out.update(task_id=jax.ShapeDtypeStruct((b,), jnp.int32), label=jax.ShapeDtypeStruct((b,), jnp.int32),
               has_audio=jax.ShapeDtypeStruct((b,), jnp.bool_),
               region_key=jax.ShapeDtypeStruct((b, *_key_shape()), jnp.uint32))
    return out


def clip_dataset_config(cfg, extra_features: str = "") -> ml_collections.ConfigDict:
    """The dataset block for reading clips (``extra_features`` e.g. ``"main_y"`` for eval)."""
    d = ml_collections.ConfigDict(cfg.dataset.to_dict())
    d.extra_features = extra_features
    return d


def make_data(cfg, *, split, train, seed, batch_size, process_index, process_count):
    if cfg.data_source == "random_tokens":
        # Evaluation batches come from their own stream (a different seed), a fixed number of them.
        return RandomTokenBatches(cfg, seed=seed if train else seed + 1, batch_size=batch_size,
                                  process_index=process_index, process_count=process_count,
                                  num_batches=None if train else int(cfg.get("eval_batches", 4)))
    if cfg.data_source == "token_cache":
        from mmgen.train import token_cache

        if process_count > 1:  # one process builds, the others wait for it
            from jax.experimental import multihost_utils

            if process_index == 0:
                token_cache.build(cfg, split)
            multihost_utils.sync_global_devices(f"token_cache_{split}")
        return token_cache.CachedTokenBatches(
            cfg, token_cache.load(cfg, split), seed=seed if train else seed + 1, batch_size=batch_size,
            process_index=process_index, process_count=process_count,
            num_batches=None if train else int(cfg.get("eval_batches", 4)))
    clips = pipeline.make_iterator(clip_dataset_config(cfg), split=split, global_batch_size=batch_size, seed=seed,
                                   train=train, process_index=process_index, process_count=process_count)
    return TokenBatches(cfg, clips, load_tokenizers(cfg), seed=seed if train else seed + 1, batch_size=batch_size,
                        process_index=process_index, process_count=process_count)


# ------------------------------------------------------------------------ evals
def on_eval(state: GenerativeState, cfg, workdir: str, step: int, mesh) -> dict:
    """A few samples of ``cfg.sampling.eval_tasks`` into ``workdir/samples`` (mp4 with sound + PNG)."""
    if jax.process_index() != 0 or cfg.data_source == "random_tokens" or not cfg.sampling.get("eval_tasks"):
        return {}
    from mmgen.generative.sample_cli import Generator

    generator = Generator(cfg, inference_model(state))
    out_dir = os.path.join(workdir, "samples")
    for task in [t for t in cfg.sampling.eval_tasks.split(",") if t]:
        if any(m not in specs_of(cfg) for m in tasks_lib.get_task(task).modalities()):
            continue  # e.g. an audio task in a video-only ablation
        result = generator.sample_task(task, int(cfg.sampling.eval_num), seed=step, split=cfg.eval_split)
        generator.save(result, out_dir, prefix=f"step{step:06d}_{task}")
    return {}


def read_config(workdir: str):
    """The generative run's config from ``workdir/config.json`` (``UserError`` otherwise)."""
    from mmgen import config as config_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir} is not a workdir (no config.json): train first or check the path")
    cfg = config_lib.from_json_file(path)
    if cfg.get("family") not in ("generative", "adapters"):
        raise UserError(f"{workdir} holds a {cfg.get('family')!r} run, not a generative (or adapter) one")
    return cfg


FAMILY = Family(
    name="generative",
    create_state=create_state,
    train_step=train_step,
    make_data=make_data,
    validate=validate,
    eval_step=eval_step,
    on_eval=on_eval,
    flops_per_example=flops_per_example,
    tokens_per_example=tokens_per_example,
    example_batch=example_batch,
)

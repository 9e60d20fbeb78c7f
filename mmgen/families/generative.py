"""The generative family: MAGVIT's multi-task recipe with COMMIT, plus sound.

One update step (MAGVIT and MaskGIT, section "Masked multi-task transformer" of
docs/ALGORITHMS.md):

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

Input (host side, ``make_data``; the batch streams live in ``mmgen.generative.tokens``).
``data_source="tokenizers"``: the grain clip pipeline -> ``TokenBatches``, which draws
the tasks of batch ``i`` for the *global* batch and keeps this host's rows, builds the
condition clips with the condition region drawn for the global batch (so the train
step, which sees the global batch and the same ``region_key``, draws the same dynamic
boxes), and tokenizes clip + condition in one jitted call per modality.
``data_source="token_cache"``: the same tokenizers' tokens of every clip computed once
into ``cfg.token_cache`` (``mmgen.generative.token_cache``: no augmentation; COMMIT only
for tasks whose condition is a whole modality). ``data_source="random_tokens"``:
uniform random tokens of the configured layout and no tokenizer (benchmarks, ``plan``).

``load_tokenizers`` and ``load_generator`` turn workdirs into models for sampling and
evaluation.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmgen import config as config_lib
from mmgen import fs
from mmgen import tokenizers as tokenizers_lib
from mmgen.data import pipeline
from mmgen.errors import UserError
from mmgen.eval import gallery
from mmgen.families import get_family
from mmgen.families import tokenizer as tokenizer_family
from mmgen.generative import masking, token_cache
from mmgen.generative import tasks as tasks_lib
from mmgen.generative.generator import Generator
from mmgen.generative.tokens import (
    DATA_SOURCES,
    RandomTokenBatches,
    TokenBatches,
    check_tokenizer_layout,
    clip_dataset_config,
    key_shape,
    read_tokenizer_config,
    specs_of,
    task_weights,
    tokenizer_workdir,
    training_example,
)
from mmgen.generative.transformer import (
    MaskedTransformer,
    flops_per_token,
    sequence_length,
)
from mmgen.parallel import mesh as mesh_lib
from mmgen.parallel import sharding as sharding_lib
from mmgen.train import export as export_lib
from mmgen.train import loop, optim
from mmgen.train import workdir as workdir_lib
from mmgen.train.loop import Family

# ------------------------------------------------------------------------ config

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
    config_lib.check_int_at_least("model.scan_unroll", cfg.model.get("scan_unroll", 1), 1,
                                  "layers per iteration of the layer loop; >= model.depth unrolls it")
    if cfg.data_source == "random_tokens":
        return
    for m in ("video", "audio"):
        workdir = tokenizer_workdir(cfg, m)
        if m in specs and not workdir:
            raise UserError(f"config.tokenizers.{m}_workdir is empty but the model has {m} tokens: give the {m} "
                            f"tokenizer's workdir, or --config.data_source=random_tokens for a benchmark")
        if workdir and m not in specs:
            raise UserError(f"config.tokenizers.{m}_workdir is set but the model has no {m} tokens "
                            f"(use the variant option modalities=video+audio)")
        if workdir:
            tcfg = read_tokenizer_config(workdir, m)
            model = nnx.eval_shape(lambda tcfg=tcfg: tokenizers_lib.build(tcfg, nnx.Rngs(0)))
            check_tokenizer_layout(cfg, m, model)
    if cfg.data_source == "token_cache":
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
    device = device or jax.local_devices()[0]
    out = {}
    for m in specs_of(cfg):
        workdir = tokenizer_workdir(cfg, m)
        if not workdir:
            raise UserError(f"config.tokenizers.{m}_workdir is empty: this run has no {m} tokenizer")
        read_tokenizer_config(workdir, m)
        key = (fs.normalize(workdir), device)
        if key not in _LOADED_TOKENIZERS:
            _LOADED_TOKENIZERS[key] = tokenizer_family.load(workdir, devices=device)
        out[m] = _LOADED_TOKENIZERS[key]
        check_tokenizer_layout(cfg, m, out[m].model)
    return out


# ------------------------------------------------------------------------ data


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
               region_key=jax.ShapeDtypeStruct((b, *key_shape()), jnp.uint32))
    return out


def make_data(cfg, *, split, train, seed, batch_size, process_index, process_count):
    if cfg.data_source == "random_tokens":
        # Evaluation batches come from their own stream (a different seed), a fixed number of them.
        return RandomTokenBatches(cfg, seed=seed if train else seed + 1, batch_size=batch_size,
                                  process_index=process_index, process_count=process_count,
                                  num_batches=None if train else int(cfg.get("eval_batches", 4)))
    if cfg.data_source == "token_cache":
        if process_count > 1:  # one process builds, the others wait for it
            from jax.experimental import multihost_utils

            if process_index == 0:
                token_cache.build(cfg, split, load_tokenizers)
            multihost_utils.sync_global_devices(f"token_cache_{split}")
        batches = token_cache.CachedTokenBatches(
            cfg, token_cache.load(cfg, split, load_tokenizers), seed=seed if train else seed + 1, batch_size=batch_size,
            process_index=process_index, process_count=process_count,
            num_batches=None if train else int(cfg.get("eval_batches", 4)))
    else:
        dataset = clip_dataset_config(cfg)
        # Evaluation reads the split once, or as often as one whole batch needs (a few held-out videos).
        epochs = None if train else pipeline.eval_epochs(dataset, split, batch_size)
        clips = pipeline.make_iterator(dataset, split=split, global_batch_size=batch_size, seed=seed, train=train,
                                       process_index=process_index, process_count=process_count, num_epochs=epochs)
        batches = TokenBatches(cfg, clips, load_tokenizers(cfg), seed=seed if train else seed + 1,
                               batch_size=batch_size, process_index=process_index, process_count=process_count)
    if train:  # the evals' split must be there before the first step, not at the first eval
        pipeline.check_eval_split(cfg.dataset, cfg.get("eval_split", "test"), int(cfg.get("eval_every", 0) or 0))
    return batches


# ------------------------------------------------------------------------ evals
def on_eval(state: GenerativeState, cfg, workdir: str, step: int, mesh) -> dict:
    """A few samples of ``cfg.sampling.eval_tasks`` into ``workdir/samples`` (mp4 with sound + PNG,
    the real clips, ``index.html``: ``mmgen.eval.gallery``); returns each task's labelled grid,
    first video and first sound for TensorBoard (tags ``samples/<task>``, ``.../video``, ``.../audio``).

    Every process samples (SPMD on the training mesh: the model may be sharded over all of
    them, with the same conditions everywhere); process 0 writes the files.
    """
    if cfg.data_source == "random_tokens" or not cfg.sampling.get("eval_tasks"):
        return {}
    generator = Generator(cfg, inference_model(state), tokenizers=load_tokenizers(cfg))
    out_dir = fs.join(workdir, "samples")
    pictures = {}
    for task in [t for t in cfg.sampling.eval_tasks.split(",") if t]:
        if any(m not in specs_of(cfg) for m in tasks_lib.get_task(task).modalities()):
            continue  # e.g. an audio task in a video-only ablation
        result = generator.sample_task(task, int(cfg.sampling.eval_num), seed=step, split=cfg.eval_split)
        paths = generator.save(result, out_dir, prefix=f"step{step:06d}_{task}")
        gallery.record_samples(out_dir, result, paths, fps=generator.fps, sample_rate=generator.sample_rate,
                               step=step, source="training eval", split=cfg.eval_split)
        pictures.update(gallery.sample_summaries(result, f"samples/{task}", generator.grid_rows(result),
                                                 fps=generator.fps, sample_rate=generator.sample_rate))
    if pictures:
        gallery.write_index(out_dir, title=f"samples of {fs.normalize(workdir)}")
    return pictures


def read_config(workdir: str):
    """The generative (or adapter) run's config from ``workdir/config.json`` (``UserError`` otherwise)."""
    return workdir_lib.read_config(workdir, ("generative", "adapters"), "a generative (or adapter) one")


def load_generator(workdir: str, overrides=(), step: int | None = None) -> Generator:
    """The inference model (EMA when kept) of a generative or adapter workdir and its tokenizers.

    One process: the model on the first local device. Several (``mmgen eval``/``sample``
    launched like the training run): the model laid out on the run's own mesh over every
    process, which all run the same sampling (the tokenizers sit on each process's first
    device). Only the inference weights are read (``loop.load_inference_model``);
    ``workdir`` may also be an export directory (``load_generator_export``).
    """
    if export_lib.is_export(workdir):
        return load_generator_export(workdir, overrides, step)
    cfg = read_config(workdir)
    config_lib.apply_overrides(cfg, overrides)
    device = jax.local_devices()[0]
    if jax.process_count() > 1:
        mesh = mesh_lib.make_mesh(cfg.mesh)
    else:
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), devices=[device])
    tokenizers = load_tokenizers(cfg, device)
    model, step = loop.load_inference_model(get_family(cfg.family), cfg, workdir, mesh=mesh, step=step)
    generator = Generator(cfg, model, tokenizers=tokenizers, device=device)
    generator.step = step  # the checkpoint loaded (an older one when the newest is damaged)
    return generator


def load_generator_export(path: str, overrides=(), step: int | None = None) -> Generator:
    """The ``Generator`` of an export directory (``mmgen export`` of a generative run), on one device.

    Its tokenizers are the exports beside it (``tokenizers/video``, ``tokenizers/audio``:
    the config names them relative to the export directory) or, when the config holds
    absolute workdirs, those.
    """
    cfg = workdir_lib.read_config(path, ("generative",), "a generative one (adapters: merge with --fold, then "
                                                         "train or export the folded run)")
    config_lib.apply_overrides(cfg, overrides)
    meta = export_lib.read_metadata(path)
    if step is not None and str(step) != meta.get("step"):
        raise UserError(f"{path} is an export of step {meta.get('step')}; it holds no step {step}")
    for m in ("video", "audio"):
        where = tokenizer_workdir(cfg, m)
        if where and not fs.is_url(where) and not os.path.isabs(where):  # relative to the export
            cfg.tokenizers[f"{m}_workdir"] = fs.join(fs.normalize(path), where)
    device = jax.local_devices()[0]
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), devices=[device])
    tokenizers = load_tokenizers(cfg, device)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MaskedTransformer(cfg.model, rngs=nnx.Rngs(int(cfg.seed)))))
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    target = loop.with_shardings(abstract, sharding_lib.state_shardings(abstract, mesh, rules))
    generator = Generator(cfg, nnx.merge(graphdef, export_lib.load_weights(path, target)), tokenizers=tokenizers,
                          device=device)
    generator.step = int(meta.get("step", 0))
    return generator


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

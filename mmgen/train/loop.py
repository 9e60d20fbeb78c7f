"""The one training loop every model family runs on.

Reads top to bottom like big_vision's ``train.py``: config checks, mesh, input,
state (initialised directly on devices), the jitted update step, checkpoint
restore, then the loop with logging, evals, checkpoints and preemption.

What keeps a run from getting stuck: every user mistake (config values, a workdir
that is not a writable directory, ``total_steps`` below the checkpoint's step) stops
it in one line before anything compiles or is written; one ``train`` at a time owns
the workdir (``workdir.WorkdirLock``); a resume takes the newest checkpoint that
restores and verifies, setting damaged ones aside (``Checkpointer.restore_newest``);
only finite states are saved or evaluated (a non-finite update stops the run naming
the newest checkpoint, which is finite); SIGTERM and a first Ctrl-C save at the
current step and stop, a second one stops at once.

A model family plugs in through ``Family``: it says how to build its state (an NNX
module holding models, optimizers, EMA copies) and how one update changes it; the
loop owns everything else (sharding, donation, RNG, resume, NaN guard, metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen import config as config_lib
from mmgen import fs
from mmgen.errors import UserError
from mmgen.parallel import mesh as mesh_lib
from mmgen.parallel import runtime
from mmgen.parallel import sharding as sharding_lib
from mmgen.progress import progress
from mmgen.train import optim
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import (Checkpointer, CheckpointDamaged, NonFiniteState, NoUsableCheckpoint,
                                    inspect_state)
from mmgen.train.metrics import MetricsWriter, scalars_only, trim_metrics

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss, gradients or weights became NaN/Inf; the last good checkpoint (finite) is left intact."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family gives the loop. Everything but the first three is optional.

    create_state(cfg, rngs) -> nnx.Module: models + optimizers (+ EMA); called under
        ``nnx.eval_shape`` for shapes and inside ``jit(out_shardings=...)`` for values.
    train_step(cfg, state, batch, rng) -> dict: mutates ``state`` in place, returns scalar
        metrics with at least ``loss``; traced once inside the loop's jit.
    make_data(cfg, *, split, train, seed, batch_size, process_index, process_count)
        -> iterator of host-local numpy batch dicts (``get_state``/``set_state`` to resume).
    validate(cfg): raise ``UserError`` for a bad config before anything compiles.
    eval_step(cfg, state, batch, rng) -> dict of scalar metrics, averaged over eval batches.
    on_eval(state, cfg, workdir, step, mesh) -> dict: host-side hook (samples, images); scalars go to
        metrics.jsonl and TensorBoard, ``mmgen.train.metrics`` ``Picture``/``Video``/``Sound``
        values to TensorBoard only.
    flops_per_example(cfg), tokens_per_example(cfg): for TFLOP/s, MFU and tokens/s.
    frozen: an nnx filter of variables that are not trained and not checkpointed
        (a frozen base model under adapters); ``load_frozen(cfg, abstract)`` returns
        their values (an ``nnx.State`` matching ``abstract``, sharded as it says),
        e.g. from another workdir. The run's checkpoints then hold the rest only.
    example_batch(cfg) -> dict of ShapeDtypeStruct: one global batch's shapes, so
        ``plan`` can compile the step without reading any data.
    """

    name: str
    create_state: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
    train_step: Callable[[ml_collections.ConfigDict, nnx.Module, dict, jax.Array], dict]
    make_data: Callable[..., Iterator[dict]]
    validate: Callable[[ml_collections.ConfigDict], None] | None = None
    eval_step: Callable[[ml_collections.ConfigDict, nnx.Module, dict, jax.Array], dict] | None = None
    on_eval: Callable[..., dict] | None = None
    flops_per_example: Callable[[ml_collections.ConfigDict], float] | None = None
    tokens_per_example: Callable[[ml_collections.ConfigDict], float] | None = None
    frozen: Any = None
    load_frozen: Callable[[ml_collections.ConfigDict, nnx.State], nnx.State] | None = None
    example_batch: Callable[[ml_collections.ConfigDict], dict] | None = None


# Dense bf16 peak per chip, FLOP/s (vendor figures) for MFU when cfg.peak_flops is unset.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12,
    "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
}


def device_peak_flops(cfg) -> float | None:
    if cfg.get("peak_flops"):
        return float(cfg.peak_flops)
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None


# ---------------------------------------------------------------- config checks
def validate(family: Family, cfg) -> None:
    config_lib.check_common_keys(cfg)
    if cfg.total_steps < 1:
        raise UserError(f"config.total_steps={cfg.total_steps} must be at least 1")
    for key, least in (("batch_size", 1), ("checkpoint_every", 1), ("log_every", 1), ("keep_checkpoints", 1),
                       ("eval_every", 0), ("eval_batches", 1)):
        config_lib.check_int_at_least(key, cfg.get(key, least), least, "0 = never" if least == 0 else "")
    profile_window(cfg)  # a bad profile block is one line too
    if cfg.batch_size % jax.process_count():
        raise UserError(f"config.batch_size={cfg.batch_size} does not divide over {jax.process_count()} processes")
    if family.validate is not None:
        family.validate(cfg)


def profile_window(cfg) -> tuple[int, int] | None:
    """``(first, last)`` step numbers (as logged, 1 = the first update) that ``cfg.profile`` traces, or None.

    ``profile.num_steps`` > 0 turns the profiler on for the updates ``start_step`` ..
    ``start_step + num_steps - 1``; start after the first step (compilation) to see the
    steady state. A config without a ``profile`` block never profiles.
    """
    profile = cfg.get("profile", None)
    if profile is None or not int(profile.get("num_steps", 0) or 0):
        return None
    start, num = profile.get("start_step", 1), profile.get("num_steps", 0)
    for key, value, least in (("start_step", start, 1), ("num_steps", num, 0)):
        config_lib.check_int_at_least(f"profile.{key}", value, least)
    return start, start + num - 1


class _Profiler:
    """A ``jax.profiler`` trace of the window ``profile_window`` gives, into ``workdir/profile``.

    ``run(n, step_fn, state, ...)`` runs update ``n``; inside the window it waits for the
    previous update before the trace starts, and for each update inside a
    ``StepTraceAnnotation`` (so a step's span in the viewer is its whole execution, not just
    its dispatch), and stops the trace after the last one. Every process writes its own trace file
    (``profile/plugins/profile/<run>/<host>.xplane.pb``, TensorBoard's profile plugin or XProf),
    and a Perfetto trace (``perfetto_trace.json.gz``, ui.perfetto.dev) unless ``profile.perfetto`` is off.
    """

    def __init__(self, cfg, workdir: str, start: int):
        self.window = profile_window(cfg)
        self.directory = fs.join(workdir, "profile")
        self.perfetto = bool(cfg.get("profile", {}).get("perfetto", True)) if self.window else False
        self.active = False
        if self.window and self.window[1] <= start:
            log.info("profile window (steps %d-%d) is before this run's start (step %d): not profiling",
                     *self.window, start)
            self.window = None

    def run(self, n: int, step_fn, *args):
        if self.window is None or not self.window[0] <= n <= self.window[1]:
            return step_fn(*args)
        if not self.active:
            jax.block_until_ready(args[0])  # the updates before the window stay out of it
            fs.makedirs(self.directory)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=self.perfetto)
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=n):
            out = jax.block_until_ready(step_fn(*args))
        if n == self.window[1]:
            self.stop()
            if jax.process_index() == 0:
                log.info("profile of steps %d-%d written to %s", *self.window, self.directory)
        return out

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def batch_mesh_axes(cfg, axis_sizes: dict) -> tuple[str, ...]:
    """The mesh axes the config's ``"batch"`` rule splits examples over (those the mesh has)."""
    return sharding_lib.batch_axes(cfg.sharding_rules, axis_sizes)


def check_batch_divides(cfg, mesh) -> None:
    """``batch_size`` splits over the mesh axes of the config's ``"batch"`` rule (and, with several
    processes, gives each process a slice of its own); one line otherwise."""
    axes = batch_mesh_axes(cfg, mesh.shape)
    batch_divides(cfg, int(np.prod([mesh.shape[a] for a in axes])), f"mesh {mesh_lib.describe(mesh)}", axes)
    if jax.process_count() > 1:
        check_process_slices(cfg, mesh)


def batch_divides(cfg, shards: int, where: str, axes: tuple[str, ...] | None = None) -> None:
    """``batch_size`` must split into ``grad_accum_steps`` micro-batches, each over ``shards`` devices
    (the mesh ``axes`` of the ``"batch"`` rule; default the config's)."""
    steps = optim.grad_accum_steps(cfg)
    if steps < 1:
        raise UserError(f"config.grad_accum_steps={steps} must be at least 1 (1 = no accumulation)")
    if cfg.batch_size % (shards * steps) == 0:
        return
    axes = sharding_lib.batch_axes(cfg.sharding_rules) if axes is None else axes
    over = f"{' x '.join(axes) or 'no mesh axis'} = {shards} shards"
    if steps == 1:
        raise UserError(
            f"config.batch_size={cfg.batch_size} does not divide over {over} "
            f"({where}); try {shards * max(1, round(cfg.batch_size / shards))}")
    unit = shards * steps
    raise UserError(
        f"config.batch_size={cfg.batch_size} does not split into grad_accum_steps={steps} micro-batches over "
        f"{over} ({where}): it must be a multiple of {unit}; try "
        f"{unit * max(1, round(cfg.batch_size / unit))}")


def check_process_slices(cfg, mesh) -> None:
    """Each process reads ``batch_size / process_count`` examples of its own; the batch sharding must
    give every process exactly such a slice, not shared with another (else the global batch would
    be assembled from rows the processes disagree on). One line otherwise."""
    sharding = sharding_lib.batch_sharding(mesh, 1, cfg.sharding_rules)
    rows: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((int(cfg.batch_size),)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(int(cfg.batch_size))))
    want = int(cfg.batch_size) // jax.process_count()
    seen: set = set()
    for process, own in sorted(rows.items()):
        if len(own) != want or own & seen:
            axes = batch_mesh_axes(cfg, mesh.shape)
            raise UserError(
                f"sharding_rules batch={axes or None} on mesh {mesh_lib.describe(mesh)} does not give each of the "
                f"{jax.process_count()} processes a batch slice of its own (process {process} holds {len(own)} of "
                f"{cfg.batch_size} examples, shared with another); split the batch over the axes that span the "
                f"processes (data, and fsdp when data is smaller than the process count)")
        seen |= own


# ---------------------------------------------------------------- state on devices
def abstract_state(family: Family, cfg):
    """(graphdef, abstract state) without allocating anything."""
    abstract = nnx.eval_shape(lambda: family.create_state(cfg, nnx.Rngs(cfg.seed)))
    return nnx.split(abstract)


def init_state(family: Family, cfg, mesh, shardings):
    """Initialise the state directly into its shardings: no full copy on any host."""

    def init():
        return nnx.state(family.create_state(cfg, nnx.Rngs(cfg.seed)))

    platform = next(iter(mesh.devices.flat)).platform
    return jax.jit(init, out_shardings=shardings, compiler_options=runtime.one_shot(platform))()


def split_frozen(family: Family, state):
    """(trained part, frozen part) of a state; the frozen part is empty without ``family.frozen``."""
    if family.frozen is None:
        return state, nnx.State({})
    frozen, trained = nnx.split_state(state, family.frozen, ...)
    return trained, frozen


def load_frozen(family: Family, cfg, abstract_frozen, frozen_shardings):
    if family.frozen is None:
        return nnx.State({})
    return family.load_frozen(cfg, with_shardings(abstract_frozen, frozen_shardings))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying the target shardings (for a resharding restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def make_train_step(family: Family, cfg, graphdef, shardings, batch_shardings, mesh, frozen_shardings=None):
    """``step(state, batch, rng[, frozen]) -> (state, metrics)``, state donated.

    With ``family.frozen`` (and ``frozen_shardings`` given; without them the state is whole,
    e.g. a family whose frozen part is empty) the step takes the frozen variables as a fourth argument
    (read-only: neither donated nor returned) and ``state`` is the trained rest.
    """
    replicated = sharding_lib.replicated(mesh)

    def step_fn(state, batch, rng, frozen=None):
        model = nnx.merge(graphdef, state if frozen is None else nnx.merge_state(state, frozen))
        # The mesh in context lets a step constrain layouts by name (``optim.accumulate_gradients``).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding_lib.axis_rules(cfg.sharding_rules):
            metrics = family.train_step(cfg, model, batch, rng)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return split_frozen(family, nnx.state(model))[0], metrics

    in_sh = (shardings, batch_shardings, replicated)
    if family.frozen is not None and frozen_shardings is not None:
        in_sh = in_sh + (frozen_shardings,)
    return jax.jit(step_fn, in_shardings=in_sh, out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(family: Family, cfg, graphdef, shardings, batch_shardings, mesh, frozen_shardings=None):
    def eval_fn(state, batch, rng, frozen=None):
        model = nnx.merge(graphdef, state if frozen is None else nnx.merge_state(state, frozen))
        # The same mesh and rules as the train step: activations are laid out alike.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding_lib.axis_rules(cfg.sharding_rules):
            metrics = family.eval_step(cfg, model, batch, rng)
        return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    in_sh = (shardings, batch_shardings, sharding_lib.replicated(mesh))
    if family.frozen is not None and frozen_shardings is not None:
        in_sh = in_sh + (frozen_shardings,)
    return jax.jit(eval_fn, in_shardings=in_sh, out_shardings=sharding_lib.replicated(mesh))


def global_batch(batch: dict, mesh, rules=None) -> dict:
    """A host-local batch as global arrays split by the ``"batch"`` rule of ``rules`` (a config's
    ``sharding_rules``; default the active ones, ``DEFAULT_RULES`` outside ``axis_rules``)."""
    return sharding_lib.global_batch(batch, mesh, rules)


def batch_shardings_for(batch: dict, mesh, rules=None) -> dict:
    """The shardings ``global_batch(batch, mesh, rules)`` gives each entry."""
    return {k: sharding_lib.batch_sharding(mesh, np.ndim(v), rules) for k, v in batch.items()
            if np.asarray(v).dtype.kind in "biuf"}


# ---------------------------------------------------------------- preemption
class _Preemption:
    """SIGTERM or Ctrl-C (SIGINT) sets a flag; the loop saves at the current step and exits cleanly.

    A second signal exits at once (status 128 + the signal: 130 for Ctrl-C) without
    saving; the checkpoints already written are complete and kept.
    Single process only: with several processes a local flag could stop them at
    different steps (and hang a collective), so there JAX's own preemption sync
    (``Checkpointer.reached_preemption``, the same step everywhere) decides alone.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if jax.process_count() > 1:
            return self
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"mmgen: {name} again: stopping now without saving; the newest checkpoint is kept",
                  file=sys.stderr, flush=True)
            workdir_lib.release_all_locks()
            os._exit(128 + signum)
        self.requested = True
        print(f"mmgen: {name}: saving at the current step, then stopping (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for k, v in metrics.items() if k in ("loss", "grad_norm"))


# ---------------------------------------------------------------- the loop
def run(family: Family, cfg: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
        devices=None) -> dict:
    """Train (or resume) ``family`` with ``cfg`` in ``workdir``. Returns the last metrics.

    ``stop_after``: stop (with a checkpoint) after this many steps of this call,
    as a preemption would. ``devices``: a subset of devices to use (default all).
    """
    # --- config and mesh: every user mistake is caught here, before compiling.
    runtime.set_flags()
    validate(family, cfg)
    workdir_lib.check_workdir(workdir)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    check_batch_divides(cfg, mesh)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    warm_source = check_warm_start(family, cfg, workdir)

    # --- input pipeline (host-local slices of the global batch); opening it checks the
    #     dataset config (builder fields and values, features), so a mistake there also
    #     stops before the workdir is touched
    pc, pi = jax.process_count(), jax.process_index()
    train_iter = family.make_data(cfg, split="train", train=True, seed=cfg.seed, batch_size=cfg.batch_size,
                                  process_index=pi, process_count=pc)
    # --- several hosts write one workdir: every process must see what process 0 writes there
    workdir_lib.check_shared(workdir)
    # --- one writer per workdir: a second train stops here in one line (readers take no lock)
    with workdir_lib.WorkdirLock(workdir):
        return _train(family, cfg, workdir, stop_after, mesh, rules, warm_source, train_iter)


def _train(family: Family, cfg, workdir: str, stop_after, mesh, rules, warm_source, train_iter) -> dict:
    """``run`` once the workdir is this run's: restore or initialise, compile, train."""
    pi = jax.process_index()
    newest = workdir_lib.latest_step(workdir)
    if newest is not None and newest > cfg.total_steps:
        raise UserError(f"config.total_steps={cfg.total_steps} is below step {newest} of the newest checkpoint in "
                        f"{workdir}: raise total_steps to train on, or train into a new workdir")
    if pi == 0:  # lines that are the same on every host print once
        log.info("mesh %s over %d devices in %d processes", mesh_lib.describe(mesh), jax.device_count(), jax.process_count())

    # --- state: abstract shapes -> shardings from logical names -> init or restore
    #     (a frozen part, e.g. a base model under adapters, is loaded, never saved)
    graphdef, abstract = abstract_state(family, cfg)
    abstract, abstract_frozen = split_frozen(family, abstract)
    shardings = sharding_lib.state_shardings(abstract, mesh, rules)
    frozen_shardings = sharding_lib.state_shardings(abstract_frozen, mesh, rules)
    workdir_lib.check_free_space(workdir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)),
                                 cfg.keep_checkpoints)
    ckpt = Checkpointer(workdir, keep_last=cfg.keep_checkpoints, keep_best=cfg.get("keep_best", 0),
                        best_metric=cfg.get("best_metric"), best_mode=cfg.get("best_mode", "min"),
                        async_save=cfg.get("async_checkpointing", True))
    if cfg.get("weights_only") and ckpt.latest_step() is not None:
        ckpt.close()
        raise UserError(f"{workdir} holds model weights only (written by adapters merge), not a training state to "
                        f"resume: fine-tune from it in a new workdir with --config.init_from={workdir}")
    try:  # the newest step that restores and verifies; damaged newer ones are moved aside
        found = ckpt.restore_newest(with_shardings(abstract, shardings), train_iter, set_aside=True)
    except NoUsableCheckpoint as e:
        ckpt.close()
        raise UserError(str(e)) from None
    start = found[0] if found else None
    if start is not None:
        state, data_restored = found[1:]
        if not data_restored:
            _fast_forward(train_iter, start, cfg.batch_size)
        trim_metrics(workdir, start)
        if pi == 0:
            log.info("resumed from step %d", start)
    else:
        trim_metrics(workdir, 0)  # lines of a run killed before its first checkpoint: it starts again
        warm = load_warm_start(cfg, *warm_source, mesh, rules) if warm_source else None
        full_shardings = nnx.merge_state(shardings, frozen_shardings) if family.frozen is not None else shardings
        state, start = split_frozen(family, init_state(family, cfg, mesh, full_shardings))[0], 0
        for part in WEIGHT_PARTS if warm is not None else ():
            if part in state and jax.tree.leaves(state[part]):
                state[part] = jax.tree.map(jnp.copy, warm)  # a copy each: the step donates its buffers
    if jax.process_index() == 0:  # once the checkpoints fit this config (a mismatch keeps the old one)
        workdir_lib.write_config(cfg, workdir)
    frozen = load_frozen(family, cfg, abstract_frozen, frozen_shardings)
    extra = () if family.frozen is None else (frozen,)

    # --- the update step, compiled on the first batch
    first = next(train_iter)
    batch_sh = batch_shardings_for(first, mesh, cfg.sharding_rules)
    train_step = make_train_step(family, cfg, graphdef, shardings, batch_sh, mesh, frozen_shardings)
    eval_step = (make_eval_step(family, cfg, graphdef, shardings, batch_sh, mesh, frozen_shardings)
                 if family.eval_step else None)
    base_rng = jax.random.key(cfg.seed)

    writer = MetricsWriter(workdir, tensorboard=cfg.get("tensorboard", True))
    flops = family.flops_per_example(cfg) if family.flops_per_example else None
    tokens = family.tokens_per_example(cfg) if family.tokens_per_example else None
    peak = device_peak_flops(cfg)
    last_metrics: dict = {}
    pending = None  # (step, device metrics) fetched one step later: no host sync per step
    t_last, steps_since = time.perf_counter(), 0
    bar = progress(total=cfg.total_steps, initial=start, desc=f"train {family.name}",
                   disable=pi != 0 or not cfg.get("progress", True), dynamic_ncols=True)

    def flush(pending, force_sync=True):
        nonlocal t_last, steps_since, last_metrics
        step, metrics = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not _finite(metrics):
            raise TrainingDiverged(f"non-finite loss/grad_norm at step {step}: {metrics}; {_diverged_advice(ckpt)}")
        now = time.perf_counter()
        dt = (now - t_last) / max(steps_since, 1)
        t_last, steps_since = now, 0
        metrics["step_time"] = dt
        metrics["examples_per_s"] = cfg.batch_size / dt
        if tokens:
            metrics["tokens_per_s"] = cfg.batch_size * tokens / dt
        if flops:
            per_device = cfg.batch_size * flops / dt / mesh.size
            metrics["tflops_per_device"] = per_device / 1e12
            if peak:
                metrics["mfu"] = per_device / peak
        last_metrics = metrics
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    step, batch = start, first
    stopped_early = False
    profiler = _Profiler(cfg, workdir, start)
    try:
        with _Preemption() as preempt:
            while step < cfg.total_steps:
                rng = jax.random.fold_in(base_rng, step)
                state, metrics = profiler.run(step + 1, train_step, state, global_batch(batch, mesh, cfg.sharding_rules),
                                              rng, *extra)
                step += 1
                steps_since += 1
                bar.update(1)
                if step == start + 1 and pi == 0:
                    log.info("first step (compile + run) took %.1fs", time.perf_counter() - t_last)
                    t_last, steps_since = time.perf_counter(), 0
                if pending is not None:
                    flush(pending)
                    pending = None
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    pending = (step, metrics)
                want_eval = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps)
                want_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.total_steps
                preempted = preempt.requested or ckpt.reached_preemption(step) or (
                    stop_after is not None and step - start >= stop_after)
                report = None
                if want_eval or want_ckpt or preempted:
                    # Never save or evaluate a state whose loss we have not checked, nor one
                    # whose own values are not all finite (the loss describes the weights
                    # before this step's update, the save writes them after it).
                    flush(pending or (step, metrics))
                    pending = None
                    report = _check_finite(ckpt, state, step)
                eval_metrics = {}
                if want_eval:
                    try:
                        eval_metrics = _evaluate(family, cfg, graphdef, state, extra, eval_step, mesh, workdir, step)
                    except Exception:
                        # An eval that fails never loses the training before it: save this step first.
                        ckpt.save(step, state, train_iter, metrics=last_metrics, force=True, report=report)
                        raise
                    writer.write(step, eval_metrics)  # pictures and sounds go to TensorBoard only
                    eval_metrics = scalars_only(eval_metrics)
                if want_ckpt or preempted:  # after the eval, so keep_best can rank by eval metrics
                    ckpt.save(step, state, train_iter, metrics={**last_metrics, **eval_metrics}, force=True,
                              report=report)
                if preempted:
                    stopped_early = step < cfg.total_steps
                    break
                batch = next(train_iter)
            if pending is not None:
                flush(pending)
    finally:
        profiler.stop()
        bar.close()
        ckpt.close()
        writer.close()
    if stopped_early and pi == 0:
        log.info("stopped at step %d (preemption); run again to resume", step)
    return {"step": step, **last_metrics}


def _diverged_advice(ckpt) -> str:
    """Where a diverged run can resume from, and what to change."""
    ckpt.wait()
    good = ckpt.latest_step()
    where = (f"the last good checkpoint (step {good}) is intact in {ckpt.directory} (every saved state is checked "
             f"finite)" if good is not None else f"no checkpoint was saved yet in {ckpt.directory}")
    return (f"{where}; to go on, lower optimizer.lr, set optimizer.grad_clip (e.g. 1.0), or train in float32 "
            f"instead of bfloat16, and run again")


def _check_finite(ckpt, state, step: int):
    """The state's ``inspect_state`` report; ``TrainingDiverged`` when any array holds NaN/Inf."""
    report = inspect_state(state)
    if not report.finite:
        error = NonFiniteState(step, report.nonfinite, len(report.fingerprints))
        raise TrainingDiverged(f"{error}: the update at step {step} diverged and nothing was saved at it; "
                               f"{_diverged_advice(ckpt)}")
    return report


def _evaluate(family, cfg, graphdef, state, extra, eval_step, mesh, workdir, step) -> dict:
    out: dict[str, float] = {}
    if eval_step is not None:
        it = family.make_data(cfg, split=cfg.get("eval_split", "test"), train=False, seed=cfg.seed,
                              batch_size=cfg.get("eval_batch_size", cfg.batch_size),
                              process_index=jax.process_index(), process_count=jax.process_count())
        sums: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(it):
            if i >= cfg.get("eval_batches", 4):
                break
            m = jax.device_get(eval_step(state, global_batch(batch, mesh, cfg.sharding_rules), jax.random.key(i),
                                         *extra))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        out.update({f"eval/{k}": v / max(n, 1) for k, v in sums.items()})
    if family.on_eval is not None:
        model = nnx.merge(graphdef, state, *extra)
        out.update(family.on_eval(model, cfg, workdir, step, mesh) or {})
    return out


def _fast_forward(iterator, steps: int, global_batch_size: int) -> None:
    """Re-position a pipeline whose saved state does not fit this process layout.

    ``seek(examples)`` (the families' pipelines) jumps straight to the global example count
    ``steps * batch_size``, in constant time whatever the step; other iterators are stepped.
    """
    if hasattr(iterator, "seek"):
        iterator.seek(steps * global_batch_size)
    elif hasattr(iterator, "skip_batches"):
        iterator.skip_batches(steps)
    else:
        for _ in range(steps):
            next(iterator)


# The state entries that are model weights: what a warm start copies (optimizer, step and data
# start fresh) and all a weights-only workdir holds.
WEIGHT_PARTS = ("model", "ema")


def weight_parts(abstract) -> tuple[str, ...]:
    return tuple(p for p in WEIGHT_PARTS if p in abstract and jax.tree.leaves(abstract[p]))


def check_warm_start(family: Family, cfg, workdir: str):
    """Check ``cfg.init_from`` before anything is written or compiled.

    Returns ``(abstract model state there, step)``, or None when there is nothing to
    warm-start: no ``init_from``, or ``workdir`` already has checkpoints (a resume).
    The other workdir's model must have the same variables and shapes as this one.
    """
    source = cfg.get("init_from", "")
    if not source:
        return None
    if workdir_lib.latest_step(workdir) is not None:
        return None
    if not workdir_lib.has_config(source):
        raise UserError(f"init_from={source!r}: no config.json there (not a training workdir)")
    other_cfg = workdir_lib.read_config(source)
    if other_cfg.get("family", "") != cfg.family:
        raise UserError(f"init_from={source!r} holds a {other_cfg.get('family')!r} run, not {cfg.family!r}")
    abstract = split_frozen(family, abstract_state(family, cfg)[1])[0]
    other = split_frozen(family, abstract_state(family, other_cfg)[1])[0]
    if "model" not in other or "model" not in abstract:
        raise UserError(f"init_from: the {family.name!r} state has no 'model' entry to warm-start")
    mine, theirs = dict(nnx.to_flat_state(abstract["model"])), dict(nnx.to_flat_state(other["model"]))
    for path in sorted(set(mine) | set(theirs), key=str):
        a, b = mine.get(path), theirs.get(path)
        if a is None or b is None or a.get_value().shape != b.get_value().shape:
            raise UserError(
                f"init_from={source!r}: model variable {'/'.join(str(k) for k in path)} is "
                f"{'missing' if b is None else b.get_value().shape} there and "
                f"{'missing' if a is None else a.get_value().shape} here; the model configs must match")
    if not workdir_lib.has_checkpoints(source):
        raise UserError(f"init_from={source!r}: no checkpoints there")
    steps = workdir_lib.all_steps(source)
    step = (max(steps) if steps else None) if cfg.get("init_from_step", -1) < 0 else int(cfg.init_from_step)
    if step is None or step not in steps:
        raise UserError(f"init_from={source!r}: no checkpoint {'at all' if step is None else f'at step {step}'}"
                        f" (have {steps})")
    return other, step


def load_warm_start(cfg, other, step, mesh, rules):
    """The model weights of ``cfg.init_from``'s checkpoint ``step``, sharded for this run.

    Fine-tuning from another run (e.g. a tokenizer trained on single frames, then on
    clips): only the model is taken (and copied into an EMA copy if this run keeps
    one); optimizer state, step and data position start fresh.
    """
    ckpt = Checkpointer(cfg.init_from, read_only=True)
    try:
        target = with_shardings(other, sharding_lib.state_shardings(other, mesh, rules))
        restored = ckpt.restore_parts(step, target, ("model",))
    except (CheckpointDamaged, ValueError) as e:
        raise UserError(f"init_from={cfg.init_from!r}: {e}; pick another with init_from_step") from None
    finally:
        ckpt.close()
    log.info("model weights from %s at step %d (optimizer and step start fresh)", cfg.init_from, step)
    return restored["model"]


# The state entries that hold the model to sample or evaluate with, in order of preference.
INFERENCE_PARTS = ("ema", "model")


def load_inference_model(family: Family, cfg, workdir: str, mesh=None, step: int | None = None):
    """``(model, step)``: the run's inference model, its state's ``ema`` entry where the run keeps
    one (else ``model``), reading only that entry's arrays from checkpoint ``step`` or the newest
    one that restores and verifies (``Checkpointer.restore_newest_weights``).

    Memory is the model's alone: no optimizer moments, discriminator or other copy is read
    (BENCHMARKS.md, "Inference loads"). An entry holding frozen variables that are never
    checkpointed (a base model under adapters), and weights-only workdirs, load through
    ``load_state_and_step`` instead.
    """
    runtime.set_flags()
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh if "mesh" in cfg else ml_collections.ConfigDict({"data": -1}))
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    whole = nnx.eval_shape(lambda: family.create_state(cfg, nnx.Rngs(cfg.seed)))
    part = next(p for p in INFERENCE_PARTS if getattr(whole, p, None) is not None)
    graphdef, abstract = nnx.split(getattr(whole, part))
    frozen = family.frozen is not None and jax.tree.leaves(nnx.split_state(abstract, family.frozen, ...)[0])
    if frozen or cfg.get("weights_only"):
        module, step = load_state_and_step(family, cfg, workdir, mesh, step)
        return getattr(module, part), step
    target = nnx.State({part: with_shardings(abstract, sharding_lib.state_shardings(abstract, mesh, rules))})
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        found = ckpt.restore_newest_weights(target, (part,), step)
    except (CheckpointDamaged, NoUsableCheckpoint) as e:
        raise UserError(str(e)) from None
    finally:
        ckpt.close()
    if found is None:
        raise UserError(f"no checkpoint in {workdir}/checkpoints: train first")
    step, weights = found
    return nnx.merge(graphdef, weights[part]), step


def load_state(family: Family, cfg, workdir: str, mesh=None, step: int | None = None):
    """Restore a trained state for sampling/eval on any mesh. Returns the NNX module."""
    return load_state_and_step(family, cfg, workdir, mesh, step)[0]


def load_state_and_step(family: Family, cfg, workdir: str, mesh=None, step: int | None = None):
    """``(module, step)``: checkpoint ``step``, or else the newest one that restores and verifies
    (a damaged newer one is named in a warning and left where it is: readers take no lock)."""
    runtime.set_flags()
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh if "mesh" in cfg else ml_collections.ConfigDict({"data": -1}))
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    graphdef, abstract = abstract_state(family, cfg)
    abstract, abstract_frozen = split_frozen(family, abstract)
    shardings = sharding_lib.state_shardings(abstract, mesh, rules)
    ckpt = Checkpointer(workdir, read_only=True)
    target = with_shardings(abstract, shardings)
    try:
        if cfg.get("weights_only"):
            # Weights only (adapters merge): the rest of the state (optimizer moments, counters)
            # is not on disk and not needed to sample or evaluate; it is zeros.
            step = ckpt.latest_step() if step is None else step
            if step is None:
                raise UserError(f"no checkpoint in {workdir}/checkpoints: train first")
            parts = weight_parts(abstract)
            weights = ckpt.restore_parts(step, target, parts)
            rest = nnx.State({k: v for k, v in abstract.items() if k not in parts})
            rest_shardings = nnx.State({k: v for k, v in shardings.items() if k not in parts})
            zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest),
                            out_shardings=rest_shardings)()
            state = nnx.merge_state(zeros, weights)
        elif step is None:
            found = ckpt.restore_newest(target)
            if found is None:
                raise UserError(f"no checkpoint in {workdir}/checkpoints: train first")
            step, state, _ = found
        else:
            state, _ = ckpt.restore(step, target)
    except (CheckpointDamaged, NoUsableCheckpoint) as e:
        raise UserError(str(e)) from None
    finally:
        ckpt.close()
    if family.frozen is not None:
        frozen = load_frozen(family, cfg, abstract_frozen, sharding_lib.state_shardings(abstract_frozen, mesh, rules))
        return nnx.merge(graphdef, state, frozen), step
    return nnx.merge(graphdef, state), step

"""Optimisers, learning-rate schedules and weight EMA from config.

``cfg.optimizer``: ``name`` (adamw | adam | lion | sgd), ``lr`` (peak), ``b1``,
``b2``, ``eps``, ``weight_decay``, ``grad_clip`` (global-norm, 0 = off).
``cfg.schedule``: ``name`` (constant | warmup_cosine | warmup_linear | warmup_rsqrt),
``warmup_steps``, ``end_lr_factor``. Defaults are MAGVIT's transformer recipe
(AdamW b=(0.9, 0.96), weight decay 0.045, clip 1.0, cosine after warm-up).

``cfg.grad_accum_steps``: ``accumulate_gradients`` sums the gradients of that many
micro-batches of the step's batch (one ``lax.scan``) before the single optimizer
update, so a global batch that does not fit in memory at once still trains as one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mmgen.errors import UserError
from mmgen.parallel import sharding as sharding_lib


def default_optimizer_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "name": "adamw", "lr": 1e-4, "b1": 0.9, "b2": 0.96, "eps": 1e-8, "weight_decay": 0.045, "grad_clip": 1.0})
    cfg.update(overrides)
    return cfg


def default_schedule_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"name": "warmup_cosine", "warmup_steps": 5000, "end_lr_factor": 0.0})
    cfg.update(overrides)
    return cfg


def make_schedule(opt_cfg, sched_cfg, total_steps: int) -> optax.Schedule:
    lr = float(opt_cfg.lr)
    warmup = int(min(sched_cfg.get("warmup_steps", 0), max(total_steps - 1, 0)))
    end = lr * float(sched_cfg.get("end_lr_factor", 0.0))
    name = sched_cfg.name
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "warmup_cosine":
        # Joined like warmup_linear (not optax.warmup_cosine_decay_schedule, which needs
        # warmup_steps >= 1 and a decay of >= 1 step): warmup_steps=0 starts at the peak and
        # total_steps=1 (a smoke test) trains its one step at the peak instead of crashing.
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)),
             optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), end / lr if lr else 0.0)], [warmup])
    if name == "warmup_linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)),
             optax.linear_schedule(lr, end, max(total_steps - warmup, 1))], [warmup])
    if name == "warmup_rsqrt":
        w = max(warmup, 1)
        return lambda step: lr * jnp.minimum((step + 1) / w, jnp.sqrt(w / jnp.maximum(step + 1, 1)))
    raise UserError(f"schedule.name={name!r} is not one of constant, warmup_cosine, warmup_linear, warmup_rsqrt")


def make_tx(opt_cfg, sched_cfg, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(opt_cfg, sched_cfg, total_steps)
    name = opt_cfg.name
    if name == "adamw":
        tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    elif name == "adam":
        tx = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
    elif name == "lion":
        tx = optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay)
    elif name == "sgd":
        tx = optax.sgd(schedule, momentum=opt_cfg.get("b1", 0.0) or None)
    else:
        raise UserError(f"optimizer.name={name!r} is not one of adamw, adam, lion, sgd")
    if opt_cfg.get("grad_clip", 0):
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), tx)
    return tx


def make_optimizer(model: nnx.Module, opt_cfg, sched_cfg, total_steps: int, wrt=nnx.Param) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the variables matching ``wrt`` (e.g. adapters only)."""
    return nnx.Optimizer(model, make_tx(opt_cfg, sched_cfg, total_steps), wrt=wrt)


def learning_rate(opt_cfg, sched_cfg, total_steps: int, step) -> jax.Array:
    return jnp.asarray(make_schedule(opt_cfg, sched_cfg, total_steps)(step), jnp.float32)


def ema_update(ema: nnx.Module, model: nnx.Module, decay: float, wrt=nnx.Param) -> None:
    """In place: ema <- decay * ema + (1 - decay) * model, over ``wrt`` variables."""
    new = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype),
                       nnx.state(ema, wrt), nnx.state(model, wrt))
    nnx.update(ema, new)


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


# ---------------------------------------------------------------- gradient accumulation
def grad_accum_steps(cfg) -> int:
    """``cfg.grad_accum_steps`` (1 = one pass over the whole batch; old workdirs lack the key)."""
    return int(cfg.get("grad_accum_steps", 1))


def split_micro_batches(tree, steps: int):
    """Leaves ``[B, ...] -> [steps, B / steps, ...]``; micro-batch ``i`` holds rows ``i, i + steps, ...``.

    Strided rather than contiguous rows: a device holding rows ``[d B / n, (d + 1) B / n)``
    of the batch holds ``B / (n steps)`` rows of every micro-batch, so each micro-batch
    stays spread over all data-parallel devices and the split moves no data.
    """

    def split(x):
        x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
        return sharding_lib.constrain(x, (None, "batch", *([None] * (x.ndim - 2))))

    return jax.tree.map(split, tree)


def merge_micro_batches(tree):
    """The inverse of ``split_micro_batches``: ``[steps, B / steps, ...] -> [B, ...]``."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def accumulate_gradients(cfg, loss_fn, modules: tuple, batch, rng, *, wrt=nnx.Param):
    """Loss, metrics and gradients of ``loss_fn`` over ``cfg.grad_accum_steps`` micro-batches of ``batch``.

    ``loss_fn(*modules, micro_batch, rng) -> (loss, (metrics, outputs))``: ``metrics`` a
    dict of scalars, ``outputs`` a pytree of per-example arrays (leading axis the
    micro-batch; ``None`` for none). Gradients are taken with respect to the ``wrt``
    variables of ``modules[0]``. Returns ``(loss, metrics, outputs, grads)``: loss,
    metrics and gradients are means over the micro-batches (summed in float32), the
    outputs reassembled to the full batch in its order. Variables the forward pass
    changes (RNG counters, EMA codebooks, LeCAM averages) run through the micro-batches
    in turn, as over consecutive smaller batches.

    With one step this is ``nnx.value_and_grad`` on the whole batch. With ``k`` the
    batch's leading axis is split by ``split_micro_batches`` and ``jax.lax.scan`` runs
    the micro-batches one after another, so activations are those of ``B / k``
    examples; the gradient sum (one float32 copy of the trained weights, sharded like
    them) is the only extra memory. ``rng`` (or None) is folded with the micro-batch index.
    The caller's optimizer then makes one update.
    """
    steps = grad_accum_steps(cfg)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    if steps == 1:
        (loss, (metrics, outputs)), grads = grad_fn(*modules, batch, rng)
        return loss, metrics, outputs, grads

    # NNX modules cannot be closed over inside a lax loop: split them into arrays. Weights
    # are constant over the micro-batches (closed over); everything else is carried.
    constant = nnx.Any(nnx.Param, wrt)
    graphdef, weights, mutable = nnx.split(modules, constant, ...)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)

    def one_micro_batch(mutable, micro, index):
        # Fresh variables (``tree.map`` rebuilds them) at this trace level around the
        # weights' arrays: NNX refuses variables made outside the loop.
        mods = nnx.merge(graphdef, *jax.tree.map(lambda v: v, (weights, mutable)))
        micro_rng = None if rng is None else jax.random.fold_in(rng, index)
        (loss, (metrics, outputs)), grads = grad_fn(*mods, micro, micro_rng)
        sums = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), (loss, metrics))
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return nnx.split(mods, constant, ...)[2], (sums, _constrain_like_params(grads, rules)), outputs

    def body(carry, xs):
        mutable, (sums, grad_sum) = carry
        mutable, (loss_metrics, grads), outputs = one_micro_batch(mutable, *xs)
        sums = jax.tree.map(jnp.add, sums, loss_metrics)
        grad_sum = _constrain_like_params(jax.tree.map(jnp.add, grad_sum, grads), rules)
        return (mutable, (sums, grad_sum)), outputs

    micro = split_micro_batches(batch, steps)
    first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)
    _, zeros, _ = jax.eval_shape(one_micro_batch, mutable, first, 0)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    zeros = (zeros[0], _constrain_like_params(zeros[1], rules))
    (mutable, (sums, grad_sum)), outputs = jax.lax.scan(body, (mutable, zeros), (micro, jnp.arange(steps)))
    nnx.update(modules, mutable)
    loss, metrics = jax.tree.map(lambda s: s / steps, sums)
    grad_dtypes = nnx.state(modules[0], wrt)
    grads = jax.tree.map(lambda g, p: (g / steps).astype(p.dtype), grad_sum, grad_dtypes)
    return loss, metrics, None if outputs is None else merge_micro_batches(outputs), grads


def _constrain_like_params(grads, rules):
    """Gradient sums laid out like their parameters (FSDP-sharded), from the logical names."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return grads

    def one(variable):
        names = sharding_lib.logical_axes(variable)
        value = variable.get_value()
        if names is None or len(names) != value.ndim:
            return variable
        spec = sharding_lib.logical_to_spec(names, value.shape, mesh, rules)
        return variable.replace(jax.lax.with_sharding_constraint(value, spec))

    return jax.tree.map(one, grads, is_leaf=lambda x: isinstance(x, nnx.Variable))

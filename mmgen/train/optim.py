"""Optimisers, learning-rate schedules and weight EMA from config.

``cfg.optimizer``: ``name`` (adamw | adam | lion | sgd), ``lr`` (peak), ``b1``,
``b2``, ``eps``, ``weight_decay``, ``grad_clip`` (global-norm, 0 = off).
``cfg.schedule``: ``name`` (constant | warmup_cosine | warmup_linear | warmup_rsqrt),
``warmup_steps``, ``end_lr_factor``. Defaults are MAGVIT's transformer recipe
(AdamW b=(0.9, 0.96), weight decay 0.045, clip 1.0, cosine after warm-up).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mmgen.errors import UserError


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

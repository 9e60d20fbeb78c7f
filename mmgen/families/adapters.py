"""Adapter fine-tuning of a trained generative workdir: the ``adapters`` family (LoRA / FlyLoRA).

    python -m mmgen train --config configs/adapters/flylora.py:tiny,tasks=frame_prediction \
        --workdir runs/fly_fp --config.base_workdir=runs/gen

A trained masked transformer (``cfg.base_workdir``, family ``generative``) is fine-tuned
on a task subset or a new dataset through low-rank adapters on its ``nnx.Linear``
layers (docs/ALGORITHMS.md "Adapters"): LoRA, ``y = W x + (alpha/r) B A x`` (Hu et al.,
2021), or FlyLoRA, ``y = W x + (alpha/r) B (A x * topk_mask)`` with a frozen sparse
random A (FlyLoRA, 2025). Everything but the adapters is the generative family's:
the same data, masking, loss and AdamW step (``generative.train_step``), with the
optimizer over ``adapter_filter`` only; FlyLoRA's load-balancing bias update
(``update_flylora_biases``) follows inside the same jitted step.

Where the weights live:

* the base parameters are the family's ``frozen`` part (``loop.Family.frozen``):
  ``load_frozen`` restores just them, onto the run's shardings, from the base
  workdir's checkpoint (its EMA copy when the base keeps one, the weights it samples
  from). They are never trained and never written: this workdir's checkpoints hold
  the adapter weights (LoRA's A, B; FlyLoRA's A, B, routing bias d and counts) and
  their optimizer state only;
* ``validate`` pins the base before anything compiles and records it in
  ``config.json``: ``base_workdir`` (absolute), ``base_step`` (``-1`` -> the newest
  checkpoint) and ``base_fingerprint`` (``adapters.base_fingerprint``: sha256 over the
  base parameters), and copies the base's ``model``, ``tokenizers`` and
  ``conditioning`` (``BASE_KEYS``) into the config, so the adapted model is exactly
  the base's. Every later load (resume, ``sample``, ``eval``, ``adapters merge``)
  restores that step and recomputes the fingerprint: a base workdir that lost the
  step (retrained, pruned) or whose weights differ is one ``UserError``.

Config keys besides the generative ones: ``base_workdir``, ``base_step``,
``base_fingerprint`` and ``adapter`` (``kind``, ``targets``, ``rank``, ``alpha``,
``seed``; LoRA's ``init``; FlyLoRA's ``k``, ``select``, ``bias_lr``; ``branches`` and
``branch_weights`` for a merged FlyLoRA workdir whose adapted layers are
``FlyLoRASum``s of ``branches`` task adapters, written by ``mmgen adapters merge``).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mmgen import fs
from mmgen.adapters import (
    adapter_filter,
    adapter_state,
    apply_adapters,
    base_fingerprint,
    frozen_filter,
    merge_flylora_adapters,
    update_flylora_biases,
)
from mmgen.adapters.flylora import SELECT_MODES
from mmgen.adapters.lora import LORA_INITS
from mmgen.adapters.surgery import ADAPTER_KINDS, adapter_module_paths, pre_surgery_path
from mmgen.errors import UserError
from mmgen.families import generative
from mmgen.generative.transformer import (
    MaskedTransformer,
    matmul_params_per_token,
    sequence_length,
)
from mmgen.train import optim
from mmgen.train import workdir as workdir_lib

# What the base workdir decides for the adapted model (copied into the config by ``validate``).
BASE_KEYS = ("model", "tokenizers", "conditioning")

# Keys an adapter run has and a generative run has not.
ADAPTER_KEYS = ("base_workdir", "base_step", "base_fingerprint", "adapter")


# ------------------------------------------------------------------------ the base workdir
def read_base_config(base_workdir: str):
    """The base run's config (``UserError`` if it is no generative workdir)."""
    if not base_workdir:
        raise UserError("config.base_workdir is empty: give the trained generative workdir to adapt "
                        "(--config.base_workdir=DIR)")
    if not fs.isdir(base_workdir):
        raise UserError(f"config.base_workdir={base_workdir!r} does not exist")
    if not workdir_lib.has_config(base_workdir):
        raise UserError(f"config.base_workdir={base_workdir!r} is not a workdir (no config.json)")
    base = workdir_lib.read_config(base_workdir)
    if base.get("family") != "generative":
        raise UserError(f"config.base_workdir={base_workdir!r} holds a {base.get('family')!r} run; adapters "
                        "need a generative (masked transformer) workdir")
    return base


def base_source(base_cfg) -> str:
    """Which copy of the base to adapt: its EMA when it keeps one (what it samples from)."""
    return "ema" if float(base_cfg.get("ema_decay", 0.0) or 0.0) > 0 else "model"


def check_base_step(cfg) -> int:
    """The pinned base step, still present in the base workdir (``UserError`` otherwise)."""
    step, steps = int(cfg.base_step), workdir_lib.all_steps(cfg.base_workdir)
    if step not in steps:
        raise UserError(
            f"the base workdir {cfg.base_workdir} no longer holds checkpoint step {step}, which these adapters "
            f"were trained on (it has {steps or 'none'}): it was retrained or pruned; restore that checkpoint "
            "or train new adapters")
    return step


def _normalised(value):
    """A config value as JSON sees it (tuples and lists compare equal)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def restore_base_params(cfg, targets: dict[tuple[str, ...], jax.ShapeDtypeStruct], *, host: bool) -> dict:
    """Restore base parameters from the pinned base checkpoint, nothing else.

    ``targets`` maps a parameter's path inside the base model (``("blocks",
    "layers", "attention", "query", "kernel")``) to its shape/dtype (with a sharding
    to restore onto, unless ``host``: then numpy arrays). Returns the same keys ->
    arrays; a parameter the checkpoint lacks or stores with another shape is a
    ``UserError``.
    """
    base_cfg = read_base_config(cfg.base_workdir)
    source = base_source(base_cfg)
    step = check_base_step(cfg)
    tree: dict = {}
    for path, target in targets.items():
        node = tree
        for part in (source, *path):
            node = node.setdefault(part, {})
        node["value"] = target
    if host:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
    item_dir = fs.path(fs.join(cfg.base_workdir, "checkpoints", str(step), "state"))
    restored = ocp.PyTreeCheckpointer().restore(
        item_dir, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True))
    out = {}
    for path, target in targets.items():
        node = restored
        for part in (source, *path, "value"):
            node = node[part]
        name = ".".join(path)
        if isinstance(node, jax.ShapeDtypeStruct):  # partial restore hands back targets it did not find
            raise UserError(f"the base checkpoint {item_dir} has no {source}.{name}: the base model does not "
                            "match config.model")
        if tuple(node.shape) != tuple(target.shape) or np.dtype(node.dtype) != np.dtype(target.dtype):
            raise UserError(f"the base checkpoint's {source}.{name} is {node.dtype}{list(node.shape)}, the adapted "
                            f"model expects {np.dtype(target.dtype)}{list(target.shape)}")
        out[path] = node
    return out


def _str_path(path) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


@functools.lru_cache(maxsize=8)
def _abstract_model(model_json: str, adapter_json: str | None):
    """(graphdef, abstract state) of the base architecture, adapted when ``adapter_json`` is given.

    Cached by the JSON of the configs: tracing the model's construction costs a
    fraction of a second and every load asks for it more than once.
    """
    cfg = ml_collections.ConfigDict({"model": json.loads(model_json)})
    if adapter_json is None:
        return nnx.split(nnx.eval_shape(lambda: MaskedTransformer(cfg.model, rngs=nnx.Rngs(0))))
    cfg.adapter = json.loads(adapter_json)
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))


def abstract_model(model_cfg, adapter_cfg=None):
    as_json = lambda c: json.dumps(_normalised(c), sort_keys=True)
    return _abstract_model(as_json(model_cfg), None if adapter_cfg is None else as_json(adapter_cfg))


def plain_model_fingerprint(model_cfg, values: dict[tuple[str, ...], jax.Array]) -> str:
    """``base_fingerprint`` of a ``MaskedTransformer`` whose parameters are ``values`` (by path)."""
    graphdef, state = abstract_model(model_cfg)
    flat = [(p, v.replace(values[_str_path(p)]) if _str_path(p) in values else v)
            for p, v in nnx.to_flat_state(state)]
    return base_fingerprint(nnx.merge(graphdef, nnx.from_flat_state(flat)))


def base_model_fingerprint(cfg) -> str:
    """Fingerprint of the pinned base, read onto the host (``validate``)."""
    _, state = abstract_model(cfg.model)
    targets = {_str_path(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
               for p, v in nnx.to_flat_state(nnx.filter_state(state, nnx.Param))}
    return plain_model_fingerprint(cfg.model, restore_base_params(cfg, targets, host=True))


# ------------------------------------------------------------------------ config checks
def adapter_settings(cfg) -> dict:
    """The ``apply_adapters`` settings of ``cfg.adapter`` (a plain dict)."""
    return {k: v for k, v in cfg.adapter.to_dict().items() if k not in ("branches", "branch_weights")}


def _check_adapter(cfg) -> None:
    a = cfg.adapter
    if a.kind not in ADAPTER_KINDS:
        raise UserError(f"config.adapter.kind={a.kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
    if int(a.rank) < 1:
        raise UserError(f"config.adapter.rank={a.rank} must be at least 1")
    if a.kind == "flylora":
        if not 1 <= int(a.k) <= int(a.rank):
            raise UserError(f"config.adapter.k={a.k} must be in 1..rank={a.rank} (ranks active per token)")
        if a.select not in SELECT_MODES:
            raise UserError(f"config.adapter.select={a.select!r} is not one of {', '.join(SELECT_MODES)}")
    elif a.get("init", "normal") not in LORA_INITS:
        raise UserError(f"config.adapter.init={a.init!r} is not one of {', '.join(LORA_INITS)}")
    branches = int(a.get("branches", 1))
    if branches < 1 or len(a.get("branch_weights", [1.0])) != branches:
        raise UserError(f"config.adapter.branches={branches} needs as many branch_weights, got "
                        f"{list(a.get('branch_weights', []))}")
    if branches > 1 and a.kind != "flylora":
        raise UserError("config.adapter.branches > 1 (summed task adapters) exists for FlyLoRA only; "
                        "LoRA adapters merge into one LoRA")


def pin_base(cfg) -> None:
    """Resolve the base in place: absolute path, step, fingerprint and the keys it decides."""
    cfg.base_workdir = fs.normalize(str(cfg.base_workdir)) if cfg.base_workdir else ""
    base_cfg = read_base_config(cfg.base_workdir)
    for key in BASE_KEYS:
        if key not in base_cfg:
            continue
        if key in cfg and _normalised(cfg[key]) != _normalised(base_cfg[key]):
            raise UserError(f"config.{key} differs from that of the base workdir {cfg.base_workdir}: the base was "
                            "retrained with another configuration, or this config names the wrong base")
        if key not in cfg:
            cfg[key] = base_cfg[key]
    if int(cfg.base_step) < 0:
        steps = workdir_lib.all_steps(cfg.base_workdir)
        if not steps:
            raise UserError(f"the base workdir {cfg.base_workdir} has no checkpoint yet: train it first")
        cfg.base_step = steps[-1]
    if not cfg.base_fingerprint:
        cfg.base_fingerprint = base_model_fingerprint(cfg)


def validate(cfg) -> None:
    """Adapter settings, then pin the base (see the module docstring), then the generative checks."""
    _check_adapter(cfg)
    pin_base(cfg)
    try:
        abstract_model(cfg.model, cfg.adapter)
    except ValueError as e:  # targets that match nothing, ranks that do not fit
        raise UserError(f"config.adapter: {e}") from None
    generative.validate(cfg)


# ------------------------------------------------------------------------ state
def build_model(cfg, rngs: nnx.Rngs) -> MaskedTransformer:
    """The base architecture with the configured adapters (and merged FlyLoRA branches)."""
    model = MaskedTransformer(cfg.model, rngs=rngs)
    apply_adapters(model, adapter_settings(cfg))
    branches = int(cfg.adapter.get("branches", 1))
    if branches > 1:  # placeholders: every branch's A, B and d come from the checkpoint
        model = merge_flylora_adapters(model, [adapter_state(model)] * branches,
                                       [float(w) for w in cfg.adapter.branch_weights])
    return model


class AdapterState(nnx.Module):
    """The adapted transformer and an AdamW over its adapter weights (the generative state's shape)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.model = build_model(cfg, rngs)
        self.optimizer = optim.make_optimizer(self.model, cfg.optimizer, cfg.schedule, cfg.total_steps,
                                              wrt=adapter_filter)
        self.ema = nnx.data(None)  # no EMA: generative.inference_model then samples from ``model``


def create_state(cfg, rngs: nnx.Rngs) -> AdapterState:
    return AdapterState(cfg, rngs)


def train_step(cfg, state: AdapterState, batch, rng) -> dict:
    """The generative step (adapter weights only), then FlyLoRA's routing-bias rule."""
    metrics = generative.train_step(cfg, state, batch, rng)
    update_flylora_biases(state.model)
    return metrics


def load_frozen(cfg, abstract: nnx.State) -> nnx.State:
    """The base parameters of the pinned base checkpoint onto ``abstract``'s shardings, verified."""
    adapter_paths = adapter_module_paths(nnx.merge(*abstract_model(cfg.model, cfg.adapter)))
    where, targets = [], {}
    for path, var in nnx.to_flat_state(abstract):
        if path[0] != "model":
            raise ValueError(f"frozen variable {path} outside the model")
        base_path = _str_path(pre_surgery_path(tuple(path[1:]), adapter_paths))
        targets[base_path] = var.get_value()
        where.append((path, var, base_path))
    values = restore_base_params(cfg, targets, host=False)
    found = plain_model_fingerprint(cfg.model, values)
    if found != cfg.base_fingerprint:
        raise UserError(
            f"the base workdir {cfg.base_workdir} (step {cfg.base_step}) has parameters with fingerprint "
            f"{found[:12]}, but these adapters were trained on {str(cfg.base_fingerprint)[:12]}: the base was "
            "retrained or replaced; use the original base or train new adapters")
    return nnx.from_flat_state([(path, var.replace(values[base_path])) for path, var, base_path in where])


def flops_per_example(cfg) -> float:
    """Forward + activation gradients of the frozen base (4 N per token, no weight gradients) + attention.

    The adapters' own FLOPs are below 1% of the base's and left out.
    """
    seq = sequence_length(cfg.model)
    return (4.0 * matmul_params_per_token(cfg.model) + 12.0 * int(cfg.model.depth) * seq * int(cfg.model.width)) * seq


# The generative family with the base frozen and the adapters trained: its data, eval
# step, sampling hook and token count as they are.
FAMILY = dataclasses.replace(
    generative.FAMILY,
    name="adapters",
    create_state=create_state,
    train_step=train_step,
    validate=validate,
    flops_per_example=flops_per_example,
    frozen=frozen_filter,
    load_frozen=load_frozen,
)

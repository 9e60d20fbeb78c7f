"""Adapter surgery: wrap a trained model's ``nnx.Linear`` layers in LoRA / FlyLoRA.

``apply_adapters(model, cfg)`` walks the model, and every ``nnx.Linear`` whose
dot-joined module path (``"blocks.attn.query"``, ``"layers.0.mlp_in"``) fully
matches one of the regexes in ``cfg.targets`` (``re.fullmatch``, as PEFT does for
regex targets) is replaced in place by an adapter wrapping it. Stacked (vmapped /
scanned) layers are wrapped as one module whose adapter weights carry the same stack
dims, so ``nnx.scan`` slices them with the layer.

Config keys (``ml_collections.ConfigDict`` or a plain dict):
  kind      "lora" | "flylora"
  targets   regex or list of regexes over module paths
  rank      r (default 32, FlyLoRA's paper default)
  alpha     scale numerator (default r for LoRA, i.e. scale 1; 2r for FlyLoRA)
  seed      adapter seed (default 0): LoRA's A keys and FlyLoRA's A seeds are derived
            from (seed, module path), so each layer's A is independent and the same
            config regenerates it whatever else is targeted
  init      LoRA A init, "normal" | "he_uniform" (default "normal")
  k, select, bias_lr   FlyLoRA's (defaults 8, "abs", 1e-3)

Filters for trainers and checkpoints:
  ``adapter_filter``        the trainable adapter weights (``AdapterParam``): use as
                            ``nnx.Optimizer(model, tx, wrt=adapter_filter)``;
  ``frozen_filter``         every other ``nnx.Param`` (the base model);
  ``adapter_state_filter``  everything an adapter checkpoint must hold (trainable
                            weights, FlyLoRA's A and routing bias d).
``base_fingerprint(model)`` hashes the base parameters under their original paths
(adapter wrapping is transparent), so an adapter checkpoint can refuse a different base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mmgen.adapters.flylora import FlyLoRA, FlyLoRAProjection, FlyLoRASum, RoutingBias
from mmgen.adapters.lora import LORA_INITS, AdapterParam, LoRA

ADAPTER_KINDS = ("lora", "flylora")
ADAPTER_MODULES = (LoRA, FlyLoRA, FlyLoRASum)

adapter_filter = AdapterParam
frozen_filter = nnx.All(nnx.Param, nnx.Not(AdapterParam))
adapter_state_filter = nnx.Any(AdapterParam, FlyLoRAProjection, RoutingBias)

_DEFAULTS = {"rank": 32, "alpha": None, "seed": 0, "init": "normal", "k": 8,
             "select": "abs", "bias_lr": 1e-3}


@dataclasses.dataclass(frozen=True)
class AdapterReport:
    """What ``apply_adapters`` did: the wrapped module paths and parameter counts.

    ``total_params`` counts every stored weight: all ``nnx.Param``s (base and adapter)
    plus FlyLoRA's frozen A; ``trainable_params`` counts the ``AdapterParam``s only.
    """

    kind: str
    replaced: tuple[str, ...]
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"{self.kind}: adapted {len(self.replaced)} layers; trainable "
                f"{self.trainable_params:,} of {self.total_params:,} parameters ({share:.3f}%)")


def path_name(path: Sequence[Any]) -> str:
    """``("blocks", "attn", "query") -> "blocks.attn.query"``."""
    return ".".join(str(p) for p in path)


def _cfg_get(cfg: Any, key: str) -> Any:
    if hasattr(cfg, "get"):
        return cfg.get(key, _DEFAULTS.get(key))
    return getattr(cfg, key, _DEFAULTS.get(key))


def get_submodule(model: nnx.Module, path: Sequence[Any]) -> Any:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def set_submodule(model: nnx.Module, path: Sequence[Any], value: Any) -> None:
    """Replace the module at ``path`` (attribute or list index) in place."""
    if not path:
        raise ValueError("cannot replace the root module in place")
    parent = get_submodule(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def _wrapped_base_ids(model: nnx.Module) -> set[int]:
    return {id(m.base) for _, m in nnx.iter_modules(model) if isinstance(m, ADAPTER_MODULES)}


def matching_linears(model: nnx.Module, targets: str | Sequence[str]) -> list[tuple[tuple, nnx.Linear]]:
    """``(path, layer)`` of every un-adapted ``nnx.Linear`` whose path fully matches a target."""
    patterns = [re.compile(t) for t in ([targets] if isinstance(targets, str) else list(targets))]
    wrapped = _wrapped_base_ids(model)
    found = []
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, nnx.Linear) or id(module) in wrapped or not path:
            continue
        if any(p.fullmatch(path_name(path)) for p in patterns):
            found.append((tuple(path), module))
    return found


def _module_seed(seed: int, path: tuple) -> int:
    """A 32-bit seed for one layer's adapter, from the run seed and the module path."""
    mixed = np.random.SeedSequence([int(seed), zlib.crc32(path_name(path).encode())])
    return int(mixed.generate_state(1)[0])


def make_adapter(base: nnx.Linear, cfg: Any, path: tuple = ()) -> LoRA | FlyLoRA:
    """The adapter ``cfg`` asks for around ``base`` (``path`` decorrelates seeds)."""
    kind = _cfg_get(cfg, "kind")
    rank = int(_cfg_get(cfg, "rank"))
    alpha = _cfg_get(cfg, "alpha")
    seed = _module_seed(_cfg_get(cfg, "seed"), path)
    if kind == "lora":
        init = _cfg_get(cfg, "init")
        if init not in LORA_INITS:
            raise ValueError(f"config.init={init!r} is not one of {LORA_INITS}")
        return LoRA(base, rank, float(rank if alpha is None else alpha),
                    rngs=nnx.Rngs(params=seed), init=init)
    if kind == "flylora":
        return FlyLoRA(base, rank, int(_cfg_get(cfg, "k")), alpha, seed=seed,
                       select=_cfg_get(cfg, "select"), bias_lr=float(_cfg_get(cfg, "bias_lr")))
    raise ValueError(f"config.kind={kind!r} is not one of {ADAPTER_KINDS}")


def count_params(model: nnx.Module, *filters) -> int:
    """Number of scalars in the variables of ``model`` selected by ``filters``."""
    state = nnx.state(model, nnx.Any(*filters) if len(filters) > 1 else filters[0])
    return int(sum(np.prod(np.shape(v.get_value())) for _, v in nnx.to_flat_state(state)))


def apply_adapters(model: nnx.Module, cfg: Any, *, verbose: bool = False) -> AdapterReport:
    """Wrap every ``nnx.Linear`` matching ``cfg.targets`` in place; return the report."""
    targets = _cfg_get(cfg, "targets")
    if not targets:
        raise ValueError("config.targets is empty: give a regex over module paths, e.g. '.*attn\\.(query|value)'")
    found = matching_linears(model, targets)
    if not found:
        names = [path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
        raise ValueError(f"config.targets={targets!r} matches no nnx.Linear; the linear layers are {names}")
    for path, base in found:
        set_submodule(model, path, make_adapter(base, cfg, path))
    report = AdapterReport(
        kind=_cfg_get(cfg, "kind"),
        replaced=tuple(path_name(p) for p, _ in found),
        trainable_params=count_params(model, adapter_filter),
        total_params=count_params(model, nnx.Param, FlyLoRAProjection),
    )
    if verbose:
        print(report)
    return report


def adapter_state(model: nnx.Module) -> nnx.State:
    """Everything an adapter checkpoint holds: A/B weights and FlyLoRA's routing bias."""
    return nnx.state(model, adapter_state_filter)


def adapter_module_paths(model: nnx.Module) -> set[tuple]:
    """Paths of the adapter modules (LoRA, FlyLoRA, FlyLoRASum) in ``model``."""
    return {tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, ADAPTER_MODULES)}


def pre_surgery_path(path: tuple, adapter_paths: set[tuple]) -> tuple:
    """A base parameter's path as it was before surgery (``adapter_paths`` from ``adapter_module_paths``).

    Drops the ``base`` step below an adapter (``query.base.kernel -> query.kernel``)
    and the ``branches.<i>`` steps of a ``FlyLoRASum``.
    """
    out, i = [], 0
    while i < len(path):
        if path[:i] in adapter_paths and path[i] in ("base", "branches"):
            i += 1 if path[i] == "base" else 2
            continue
        out.append(path[i])
        i += 1
    return tuple(out)


def _host_array(value: jax.Array) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


def base_fingerprint(model: nnx.Module) -> str:
    """sha256 (hex) over the sorted (path, dtype, shape, bytes) of the base parameters.

    Covers every ``nnx.Param`` that is not an ``AdapterParam``, under its pre-surgery
    path, so the same base gives the same hash with or without adapters applied.
    """
    adapter_paths = adapter_module_paths(model)
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model, frozen_filter)):
        entries.append((path_name(pre_surgery_path(tuple(path), adapter_paths)), var.get_value()))
    digest = hashlib.sha256()
    for name, value in sorted(entries, key=lambda e: e[0]):
        array = _host_array(value)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()

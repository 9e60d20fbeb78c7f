"""Folding and merging adapters (LoRA paper section 4.1; task arithmetic; FlyLoRA section 5).

* ``fold_lora(model)``: every LoRA becomes its base ``nnx.Linear`` with
  W' = W + (alpha / r) B A. ``nnx.Linear`` stores ``kernel [in, out]`` (x @ kernel),
  so the kernel gains ``(alpha / r) (B A)^T``; stacked kernels ``[*stack, in, out]``
  get one update per layer. The scale alpha / r is kept (several public ports dropped
  it when merging and produced wrong weights).
* ``merge_lora_adapters(model, states, weights)``: task arithmetic,
  W' = W + sum_i w_i (alpha / r) B_i A_i, each (A_i, B_i) read from an adapter state
  saved for the same adapted model; ``weights`` default to 1 (the plain sum of task
  vectors; pass 1/N for an average).
* ``merge_flylora_adapters(model, states, weights, shared_a=...)``: FlyLoRA cannot be
  folded (its gate depends on x). Two merges, as the FlyLoRA paper describes:
    - independent A's (default, ``shared_a=False``): every FlyLoRA becomes a
      ``FlyLoRASum`` holding one branch (A_i, B_i, d_i) per task, whose outputs add,
      ``base(x) + sum_i w_i (alpha / r) B_i (A_i x * mask_i)``; weights default to 1.
      The near-orthogonality of independent sparse random A_i's is what keeps the
      tasks from interfering.
    - shared A (``shared_a=True``; all tasks trained from the same seed): one FlyLoRA
      with that A, B = sum_i w_i B_i (weights default to 1/N, the average) and d the
      mean of the d_i. The A's must be bit-identical, else this raises.

All three work in place on a model that already has the adapters applied (the same
``apply_adapters`` config the adapters were trained with) and return the model.
States are what ``mmgen.adapters.surgery.adapter_state`` returns (or the same tree as
plain nested dicts, e.g. restored from a checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.adapters.flylora import FlyLoRA, FlyLoRASum
from mmgen.adapters.lora import LoRA
from mmgen.adapters.surgery import path_name, set_submodule


def lora_kernel_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``(alpha/r) (B A)^T`` in kernel layout: A ``[*stack, r, n]``, B ``[*stack, m, r]`` -> ``[*stack, n, m]``."""
    return scale * jnp.einsum("...mr,...rn->...nm", b.astype(jnp.float32), a.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


def _modules(model: nnx.Module, cls: type) -> list[tuple[tuple, Any]]:
    """``(path, module)`` of every ``cls`` module, excluding branches already inside a ``FlyLoRASum``."""
    inside_sum = {id(b) for _, m in nnx.iter_modules(model) if isinstance(m, FlyLoRASum) for b in m.branches}
    return [(tuple(p), m) for p, m in nnx.iter_modules(model)
            if type(m) is cls and id(m) not in inside_sum]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> nnx.Module:
    """Put ``new`` at ``path``; returns the (possibly new) root."""
    if not path:
        return new
    set_submodule(model, path, new)
    return model


def _add_to_kernel(base: nnx.Linear, delta: jax.Array) -> None:
    kernel = base.kernel[...]
    base.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _flat_values(state: Any) -> dict[tuple[str, ...], Any]:
    """``{path (str parts): array}`` of an ``nnx.State`` or nested dict of arrays/variables."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, nnx.Variable):
            out[prefix] = node.get_value()
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, prefix + (str(key),))
        else:
            out[prefix] = node

    walk(state, ())
    return out


def _take(flat: dict, path: tuple, name: str, expected_shape: tuple, which: int) -> jax.Array:
    key = tuple(str(p) for p in path) + (name,)
    if key not in flat:
        raise ValueError(f"adapter state {which} has no {'.'.join(key)}: was it trained with the same targets?")
    value = flat[key]
    if tuple(np.shape(value)) != tuple(expected_shape):
        raise ValueError(f"adapter state {which}: {'.'.join(key)} has shape {np.shape(value)}, "
                         f"the model expects {tuple(expected_shape)} (different rank or base?)")
    return jnp.asarray(value)


def _weights(weights: Sequence[float] | None, n: int, default: float) -> tuple[float, ...]:
    weights = (default,) * n if weights is None else tuple(float(w) for w in weights)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} merge weights for {n} adapter states")
    return weights


def fold_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA into its base kernel (exact up to float rounding); returns the plain model."""
    for path, lora in _modules(model, LoRA):
        _add_to_kernel(lora.base, lora_kernel_delta(lora.A[...], lora.B[...], lora.scale))
        model = _replace(model, path, lora.base)
    return model


def merge_lora_adapters(model: nnx.Module, states: Sequence[Any],
                        weights: Sequence[float] | None = None) -> nnx.Module:
    """Task arithmetic: fold ``sum_i w_i (alpha/r) B_i A_i`` into every LoRA's base; returns the plain model."""
    if not states:
        raise ValueError("merge_lora_adapters needs at least one adapter state")
    flats = [_flat_values(s) for s in states]
    weights = _weights(weights, len(states), 1.0)
    for path, lora in _modules(model, LoRA):
        delta = 0.0
        for i, (flat, w) in enumerate(zip(flats, weights)):
            a = _take(flat, path, "A", lora.A[...].shape, i)
            b = _take(flat, path, "B", lora.B[...].shape, i)
            delta = delta + w * lora_kernel_delta(a, b, lora.scale)
        _add_to_kernel(lora.base, delta)
        model = _replace(model, path, lora.base)
    return model


def merge_flylora_adapters(model: nnx.Module, states: Sequence[Any],
                           weights: Sequence[float] | None = None, *,
                           shared_a: bool = False) -> nnx.Module:
    """Merge FlyLoRA adapters of several tasks (see the module docstring for both modes)."""
    if not states:
        raise ValueError("merge_flylora_adapters needs at least one adapter state")
    flats = [_flat_values(s) for s in states]
    weights = _weights(weights, len(states), 1.0 / len(states) if shared_a else 1.0)
    for path, fly in _modules(model, FlyLoRA):
        parts = [(_take(f, path, "A", fly.A[...].shape, i), _take(f, path, "B", fly.B[...].shape, i),
                  _take(f, path, "d", fly.d[...].shape, i)) for i, f in enumerate(flats)]
        if shared_a:
            a0 = np.asarray(parts[0][0])
            if not all(np.array_equal(a0, np.asarray(a)) for a, _, _ in parts[1:]):
                raise ValueError(f"shared-A FlyLoRA merge: the adapters disagree on A at {path_name(path)}; "
                                 "they were trained from different seeds, merge them with shared_a=False")
            fly.A[...] = parts[0][0].astype(fly.A[...].dtype)
            fly.B[...] = sum(w * b for w, (_, b, _) in zip(weights, parts)).astype(fly.B[...].dtype)
            fly.d[...] = jnp.mean(jnp.stack([d for _, _, d in parts]), axis=0)
            fly.counts[...] = jnp.zeros_like(fly.counts[...])
            continue
        branches = []
        for a, b, d in parts:
            branch = FlyLoRA(fly.base, fly.rank, fly.k, fly.alpha, select=fly.select, bias_lr=fly.bias_lr,
                             deterministic=fly.deterministic, projection=a)
            branch.B[...] = b.astype(branch.B[...].dtype)
            branch.d[...] = d.astype(branch.d[...].dtype)
            branches.append(branch)
        model = _replace(model, path, FlyLoRASum(fly.base, branches, weights))
    return model

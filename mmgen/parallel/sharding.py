"""Logical axis names -> mesh ``PartitionSpec``s for NNX state and batches.

Every parameter is created with *logical* axis names (``embed``, ``mlp``, ``heads``,
``vocab``, ``conv_in``, ``conv_out``, ``codebook``, ``layers``, ...) recorded as
variable metadata, either through ``nnx.with_partitioning(init, names)`` for a
layer's ``kernel_init`` or ``logical_param(value, names)`` for a hand-made one.
A config's ``sharding_rules`` (a list of ``(logical, mesh_axis_or_None)`` pairs)
says which mesh axis each name is split over; changing the layout of a model is a
config change, never a code change (MaxText's logical axis rules).

A logical axis whose mesh axis does not divide the dimension stays replicated for
that parameter (e.g. a 3-channel conv input), so the same rules serve every size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Metadata keys flax has used for logical names across versions.
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")

# Batches are split over both data-parallel axes (pure DP and FSDP both shard data).
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("codebook", None),
    ("norm", None),
    ("layers", None),
)


def logical_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A parameter with its logical axis names attached (one name per dimension)."""
    if len(names) != np.ndim(value):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a {np.ndim(value)}-d value")
    return nnx.Param(value, out_sharding=tuple(names))


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names recorded on a variable, or None when it has none."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in _NAME_KEYS:
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def _rules_dict(rules) -> dict[str, Any]:
    out = {}
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out[logical] = mesh_axes
    return out


def _axis_size(mesh: Mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return int(np.prod([mesh.shape[a] for a in mesh_axes]))


def logical_to_spec(names, shape, mesh: Mesh, rules) -> P:
    """PartitionSpec for one array; a mesh axis is used at most once per array."""
    rules = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        mesh_axes = rules.get(name) if name is not None else None
        flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        flat = tuple(a for a in flat if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if not flat or dim % _axis_size(mesh, flat) != 0:
            spec.append(None)
            continue
        used.update(flat)
        spec.append(flat[0] if len(flat) == 1 else flat)
    return P(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """A NamedSharding for every leaf of an (abstract) NNX state, from its logical names.

    Variables without names (optimizer step counters, RNG counters, EMA statistics)
    are replicated; optimizer moments inherit the names of their parameter because
    ``nnx.Optimizer`` copies the parameter's metadata.
    """

    def one(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        names = logical_axes(variable)
        shape = getattr(value, "shape", ())
        if names is None or len(names) != len(shape):
            spec = P()
        else:
            spec = logical_to_spec(names, shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over ``data`` x ``fsdp``; everything else replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: dict, mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global ``jax.Array``s sharded on the batch axis (data x fsdp).

    Each process passes its own slice; non-numeric entries (e.g. strings) stay on the
    host and are left out.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out

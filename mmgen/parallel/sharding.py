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

Activations are laid out by the same rules (MaxText's activation constraints): a model
calls ``constrain(x, ("batch", "length", "activation_embed"))`` on its main activations, which maps
the names through the *active* rules to a ``PartitionSpec`` and applies
``jax.lax.with_sharding_constraint`` when a mesh is in context
(``jax.sharding.use_abstract_mesh``, which the train step enters) and does nothing
otherwise (one device, a model called outside the step). The active rules are the ones
an ``axis_rules(cfg.sharding_rules)`` block sets (the train step enters one around the
family's step), else ``DEFAULT_RULES``: models never see a mesh or a config's rules.

The batch is one more logical name: ``"batch"`` (default ``("data", "fsdp")``) says which
mesh axes split the examples, for the host batch (``batch_sharding``, ``global_batch``)
and for every activation alike (``batch_axes``). Activations name their other axes
``length`` (sequence positions, frames, samples), ``activation_embed`` (the
transformer's residual stream), ``channels`` (a convolution's output channels), all
whole by default, or reuse a weight's name where they should split like it (``heads``,
``mlp``, ``vocab``: on ``tensor``, Megatron's layout). So under FSDP the weights
(``embed`` / ``conv_out`` on ``fsdp``) are all-gathered to meet batch-split
activations, never the other way round. A mesh axis is used at most once per array.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Metadata keys flax has used for logical names across versions.
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Examples are split over both data-parallel axes (pure DP and FSDP both shard data).
    ("batch", ("data", "fsdp")),
    # Positions of a sequence (tokens, audio frames) and a clip's frames / pixels: whole.
    ("length", None),
    # The transformer's residual stream and a convolution's output channels (activations).
    ("activation_embed", None),
    ("channels", None),
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


_ACTIVE_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("mmgen_axis_rules", default=None)


def normalize_rules(rules) -> tuple[tuple[str, Any], ...]:
    """A config's rules (lists from a config file) as a tuple of ``(name, axes)`` pairs."""
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((str(logical), mesh_axes))
    return tuple(out)


@contextlib.contextmanager
def axis_rules(rules) -> Iterator[tuple]:
    """Make ``rules`` the active ones for ``constrain`` and ``batch_axes`` inside the block."""
    token = _ACTIVE_RULES.set(normalize_rules(rules))
    try:
        yield _ACTIVE_RULES.get()
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> tuple[tuple[str, Any], ...]:
    """The rules of the innermost ``axis_rules`` block, else ``DEFAULT_RULES``."""
    rules = _ACTIVE_RULES.get()
    return DEFAULT_RULES if rules is None else rules


def _flat(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def batch_axes(rules=None, mesh_axes=None) -> tuple[str, ...]:
    """Mesh axes the ``"batch"`` rule splits examples over (``rules`` or the active ones);
    with ``mesh_axes`` (a mesh's ``shape``, or any collection of axis names) only those it has."""
    axes = _flat(_rules_dict(active_rules() if rules is None else rules).get("batch"))
    return axes if mesh_axes is None else tuple(a for a in axes if a in mesh_axes)


def batch_split() -> int:
    """Devices the examples are split over in the mesh in context (``"batch"`` rule): 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return _axis_size(mesh, batch_axes(mesh_axes=mesh.shape))


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


def _claimed_axes(names, shape, mesh, rules, claim_undivided: bool):
    """Per dimension, left to right: the mesh axes its rule gives it (those of size > 1 that
    no earlier dimension claimed) and whether they divide it. Axes that do not divide their
    dimension are claimed only with ``claim_undivided``."""
    rules = _rules_dict(rules)
    used: set[str] = set()
    for name, dim in zip(names, shape):
        flat = _flat(rules.get(name)) if name is not None else ()
        flat = tuple(a for a in flat if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        divides = bool(flat) and dim % _axis_size(mesh, flat) == 0
        if divides or claim_undivided:
            used.update(flat)
        yield flat, divides


def _spec_entry(flat: tuple[str, ...]):
    return flat[0] if len(flat) == 1 else flat


def logical_to_spec(names, shape, mesh: Mesh, rules) -> P:
    """PartitionSpec for one array; a mesh axis is used at most once per array, and a
    dimension its axes do not divide is whole (leaving the axes to later dimensions)."""
    return P(*(_spec_entry(flat) if divides else None
               for flat, divides in _claimed_axes(names, shape, mesh, rules, claim_undivided=False)))


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


def activation_spec(names, shape, mesh, rules) -> P:
    """PartitionSpec of an activation named ``names`` (one per dimension, ``None`` = whole).

    Like ``logical_to_spec`` (each mesh axis at most once, claimed left to right), except
    that a dimension its mesh axes do not divide is left ``UNCONSTRAINED`` for the
    compiler to choose (it still claims the axes, so a later dimension cannot take
    them): a constraint never forces a tensor whole that could be split.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for an activation of shape {tuple(shape)}")
    return P(*(None if not flat else _spec_entry(flat) if divides else P.UNCONSTRAINED
               for flat, divides in _claimed_axes(names, shape, mesh, rules, claim_undivided=True)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` laid out by its logical ``names`` under the active rules and the mesh in context.

    The identity without a mesh in context (``jax.sharding.get_abstract_mesh()`` empty):
    a model runs unchanged on one device, in tests and outside the train step.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(names, x.shape, mesh, active_rules()))


def batch_sharding(mesh: Mesh, ndim: int = 1, rules=None) -> NamedSharding:
    """Leading (batch) axis over the ``"batch"`` rule's mesh axes; everything else replicated.

    ``rules``: a config's ``sharding_rules``; default the active ones (``DEFAULT_RULES``:
    ``data`` x ``fsdp``).
    """
    axes = batch_axes(rules, mesh.shape)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: dict, mesh: Mesh, rules=None) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global ``jax.Array``s sharded on the batch axis (``batch_sharding``).

    Each process passes its own slice; non-numeric entries (e.g. strings) stay on the
    host and are left out.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim, rules), value)
    return out

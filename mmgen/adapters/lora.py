"""LoRA: low-rank adapters around a frozen ``nnx.Linear`` (Hu et al., 2021).

    y = W x + b + (alpha / r) * B A x,    A [r, n] random,  B [m, r] zeros,

so a freshly wrapped layer computes exactly what the base layer computed, and only
A and B train. The wrapped layer is kept untouched as ``LoRA.base``: its kernel and
bias stay ordinary ``nnx.Param``s, the adapter weights are ``AdapterParam``s (a
subclass of ``nnx.Param``), so a trainer restricts training to the adapter with
``nnx.Optimizer(model, tx, wrt=AdapterParam)`` and
``nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))``
(``mmgen.adapters.surgery.adapter_filter`` is the same filter).

Stacked layers: a block created with ``nnx.vmap`` and run with ``nnx.scan`` holds a
kernel ``[*stack, n, m]`` (e.g. ``[layers, n, m]``). The adapter then holds
``A [*stack, r, n]`` and ``B [*stack, m, r]`` so the scan slices them together with
the layer, and inside the scan body everything is 2-d again. Logical axis names
mirror the wrapped kernel's: a kernel named ``(*stack_names, in_name, out_name)``
gives ``A: (*stack_names, None, in_name)`` and ``B: (*stack_names, out_name, None)``.

Initialisation of A (B is always zeros):
  * ``"normal"``: N(0, 1/r^2), i.e. std 1/r (the Gaussian option of public LoRA code);
  * ``"he_uniform"``: U(-sqrt(6/n), sqrt(6/n)) (He/Kaiming uniform with fan-in n).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from mmgen.parallel.sharding import logical_axes

LORA_INITS = ("normal", "he_uniform")


class AdapterParam(nnx.Param):
    """A trainable adapter weight (LoRA's A and B, FlyLoRA's B).

    Subclasses ``nnx.Param`` so it counts as a parameter everywhere (sharding,
    checkpoints, parameter counts) while being selectable on its own as the set of
    weights an adapter run trains.
    """


def base_kernel_layout(base: nnx.Linear) -> tuple[tuple[int, ...], int, int]:
    """``(stack_shape, in_features, out_features)`` of a plain or stacked ``nnx.Linear``.

    A plain layer's kernel is ``[n, m]`` (stack ``()``), a vmapped one ``[*stack, n, m]``.
    """
    shape = tuple(base.kernel.get_value().shape)
    if len(shape) < 2:
        raise ValueError(f"an nnx.Linear kernel must be at least 2-d, got shape {shape}")
    return shape[:-2], shape[-2], shape[-1]


def adapter_axis_names(base: nnx.Linear, trailing: Sequence[str | None]) -> tuple | None:
    """Logical names for an adapter variable, derived from the wrapped kernel's names.

    ``trailing`` names the adapter variable's own (non-stack) dims: ``"in"`` / ``"out"``
    stand for the kernel's input / output axis name, ``None`` for an unnamed dim (the
    rank). The kernel's leading (stack) names are prepended as they are, so an
    ``nnx.scan`` with ``transform_metadata`` removes the same ``layers`` entry from
    both. A kernel without names gives ``None`` (no names on the adapter either).
    """
    names = logical_axes(base.kernel)
    if names is None or len(names) < 2:
        return None
    lookup = {"in": names[-2], "out": names[-1], None: None}
    return tuple(names[:-2]) + tuple(lookup[t] for t in trailing)


def make_variable(cls: type[nnx.Variable], value, names: tuple | None) -> nnx.Variable:
    """A variable of type ``cls`` holding ``value``, with logical names when given."""
    if names is None:
        return cls(value)
    if len(names) != np.ndim(value):
        raise ValueError(f"{len(names)} logical names {names} for a {np.ndim(value)}-d adapter value")
    return cls(value, out_sharding=names)


def lora_a_init(key: jax.Array, shape: tuple[int, ...], rank: int, in_features: int, init: str,
                dtype=jnp.float32) -> jax.Array:
    """Random LoRA A of ``shape = (*stack, r, n)`` with the chosen initialisation."""
    if init == "normal":
        return jax.random.normal(key, shape, dtype) / rank
    if init == "he_uniform":
        bound = float(np.sqrt(6.0 / in_features))
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    raise ValueError(f"LoRA init={init!r} is not one of {LORA_INITS}")


class LoRA(nnx.Module):
    """``base(x) + (alpha / rank) * B A x`` around a frozen ``nnx.Linear``.

    Args:
      base: the layer to adapt; kernel ``[n, m]`` or stacked ``[*stack, n, m]``.
      rank: r, the adapter rank.
      alpha: the scale numerator; the update is multiplied by ``alpha / rank``.
      rngs: draws A (from ``rngs.params()``).
      init: ``"normal"`` (std 1/r) or ``"he_uniform"`` for A.

    Attributes:
      base: the wrapped layer, unchanged.
      A: ``AdapterParam [*stack, r, n]``.
      B: ``AdapterParam [*stack, m, r]``, zeros at creation.
      scale: ``alpha / rank`` (a python float, folded in at merge time too).
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 init: str = "normal"):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        stack, n, m = base_kernel_layout(base)
        param_dtype = base.param_dtype
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.init = init
        self.A = make_variable(
            AdapterParam,
            lora_a_init(rngs.params(), stack + (rank, n), rank, n, init, param_dtype),
            adapter_axis_names(base, (None, "in")),
        )
        self.B = make_variable(
            AdapterParam,
            jnp.zeros(stack + (m, rank), param_dtype),
            adapter_axis_names(base, ("out", None)),
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: jax.Array) -> jax.Array:
        """The adapter's contribution ``(alpha/r) B A x``: ``[..., n] -> [..., m]``."""
        x, a, b = nnx_dtypes.promote_dtype((x, self.A[...], self.B[...]), dtype=self.base.dtype)
        h = jnp.einsum("...n,rn->...r", x, a)
        return self.scale * jnp.einsum("...r,mr->...m", h, b)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., n] -> [..., m]``."""
        return self.base(x) + self.delta(x)

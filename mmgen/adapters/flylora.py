"""FlyLoRA: LoRA with a frozen sparse random A and top-k rank routing (FlyLoRA, 2025).

Per token x [n]:

    y    = A x                                   A [r, n] frozen, sparse random
    mask = top-k of the r components by  |y + d|  (select="abs", the paper's minimal code)
                                    or    y + d   (select="signed", its experiment code)
    out  = base(x) + (alpha / r) * B (y * mask)  B [m, r] zeros-initialised, trainable

A has p = round(n * k / r) nonzeros in every row (density k / r), drawn N(0, 1/r^2) at
random columns; it is regenerable from its integer seed (``sparse_projection``) and is
stored as a ``FlyLoRAProjection`` variable, which is not an ``nnx.Param`` and so is
never trained. Only B is an ``AdapterParam``.

The bias d [r] is a non-gradient load-balancing bias: it changes which ranks are
chosen, never the value passed on. In train mode (``deterministic=False``, as set by
``model.train()``) every forward pass adds the per-rank routing counts of its tokens
to a ``RoutingCount`` variable; after the optimizer step the trainer calls
``update_flylora_biases(model)`` (pure in-place NNX, fine inside a jitted step), which
applies  d_i += u * sign(mean(c) - c_i)  with u = ``bias_lr`` and resets the counts.
In eval mode (``model.eval()`` or ``train=False``) nothing is recorded, so the update
is a no-op. Counts add up over every forward pass between two updates (gradient
accumulation micro-batches together make the batch).

Stacked (vmapped, scanned) layers get the wrapped kernel's leading stack dims on A,
B, d and the counts, exactly as ``mmgen.adapters.lora`` describes; each layer of the
stack has its own A. Paper defaults: r = 32, k = 8, alpha = 2r, u in [1e-3, 1e-2].

FlyLoRA cannot be folded into W (the gate depends on x). Adapters trained on different
tasks are combined with ``FlyLoRASum`` (their outputs add) or, when they share A, by
averaging their B's (``mmgen.adapters.merge.merge_flylora_adapters``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from mmgen.adapters.lora import (
    AdapterParam,
    adapter_axis_names,
    base_kernel_layout,
    make_variable,
)

SELECT_MODES = ("abs", "signed")


class FlyLoRAProjection(nnx.Variable):
    """FlyLoRA's frozen sparse random A ``[*stack, r, n]`` (stored, never trained)."""


class RoutingBias(nnx.Variable):
    """FlyLoRA's load-balancing bias d ``[*stack, r]`` (updated by rule, not by gradient)."""


class RoutingCount(nnx.Variable):
    """Tokens routed to each rank since the last bias update, int32 ``[*stack, r]``."""


def nonzeros_per_row(in_features: int, rank: int, k: int) -> int:
    """p = round(n * k / r), kept within [1, n]."""
    return int(min(in_features, max(1, round(in_features * k / rank))))


def sparse_projection(seed: int, rank: int, in_features: int, k: int,
                      stack_shape: Sequence[int] = ()) -> np.ndarray:
    """FlyLoRA's A: float32 ``[*stack_shape, r, n]``, p nonzeros per row ~ N(0, 1/r^2).

    Drawn with numpy's PCG64 from ``seed`` alone, so the same (seed, shapes) always
    regenerate the same matrix on any host or backend.
    """
    stack_shape = tuple(int(s) for s in stack_shape)
    rows = int(np.prod(stack_shape, dtype=np.int64)) * rank
    p = nonzeros_per_row(in_features, rank, k)
    rng = np.random.default_rng(seed)
    columns = np.argsort(rng.random((rows, in_features)), axis=1)[:, :p]
    values = rng.standard_normal((rows, p)) / rank
    a = np.zeros((rows, in_features), np.float32)
    a[np.arange(rows)[:, None], columns] = values
    return a.reshape(stack_shape + (rank, in_features))


class FlyLoRA(nnx.Module):
    """FlyLoRA around a frozen ``nnx.Linear`` (formula in the module docstring).

    Args:
      base: the layer to adapt; kernel ``[n, m]`` or stacked ``[*stack, n, m]``.
      rank: r (paper default 32).
      k: ranks active per token (paper default 8).
      alpha: scale numerator, default 2r; the update is multiplied by ``alpha / r``.
      seed: integer seed of A; required unless ``projection`` is given.
      select: ``"abs"`` (top-k of |y + d|) or ``"signed"`` (top-k of y + d).
      bias_lr: u, the step of the load-balancing rule (1e-3 to 1e-2).
      deterministic: eval mode (no routing counts recorded); ``model.train()`` /
        ``model.eval()`` set it.
      projection: an explicit A ``[*stack, r, n]`` (e.g. a loaded adapter's) instead
        of drawing it from ``seed``.

    Attributes:
      base, A (``FlyLoRAProjection``), B (``AdapterParam [*stack, m, r]``),
      d (``RoutingBias [*stack, r]``), counts (``RoutingCount [*stack, r]``).
    """

    def __init__(self, base: nnx.Linear, rank: int = 32, k: int = 8, alpha: float | None = None,
                 *, seed: int | None = None, select: str = "abs", bias_lr: float = 1e-3,
                 deterministic: bool = False, projection: np.ndarray | jax.Array | None = None):
        if not 1 <= k <= rank:
            raise ValueError(f"FlyLoRA needs 1 <= k <= rank, got k={k}, rank={rank}")
        if select not in SELECT_MODES:
            raise ValueError(f"FlyLoRA select={select!r} is not one of {SELECT_MODES}")
        stack, n, m = base_kernel_layout(base)
        if projection is None:
            if seed is None:
                raise ValueError("FlyLoRA needs a seed to draw its frozen A (or an explicit projection)")
            projection = sparse_projection(seed, rank, n, k, stack)
        if tuple(np.shape(projection)) != stack + (rank, n):
            raise ValueError(f"FlyLoRA projection has shape {np.shape(projection)}, expected {stack + (rank, n)}")
        self.base = base
        self.rank = int(rank)
        self.k = int(k)
        self.alpha = float(2 * rank if alpha is None else alpha)
        self.seed = seed
        self.select = select
        self.bias_lr = float(bias_lr)
        self.deterministic = deterministic
        self.A = make_variable(FlyLoRAProjection, jnp.asarray(projection, base.param_dtype),
                               adapter_axis_names(base, (None, "in")))
        self.B = make_variable(AdapterParam, jnp.zeros(stack + (m, rank), base.param_dtype),
                               adapter_axis_names(base, ("out", None)))
        self.d = make_variable(RoutingBias, jnp.zeros(stack + (rank,), jnp.float32),
                               adapter_axis_names(base, (None,)))
        self.counts = make_variable(RoutingCount, jnp.zeros(stack + (rank,), jnp.int32),
                                    adapter_axis_names(base, (None,)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [..., n] -> (y [..., r], mask [..., r])``: y = A x, mask has exactly k ones."""
        x, a = nnx_dtypes.promote_dtype((x, self.A[...]), dtype=self.base.dtype)
        y = jnp.einsum("...n,rn->...r", x, a)
        score = y.astype(jnp.float32) + self.d[...]
        if self.select == "abs":
            score = jnp.abs(score)
        _, chosen = jax.lax.top_k(score, self.k)
        mask = jax.nn.one_hot(chosen, self.rank, dtype=y.dtype).sum(axis=-2)
        return y, mask

    def delta(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        """The adapter's contribution ``(alpha/r) B (y * mask)``: ``[..., n] -> [..., m]``.

        Records the routing counts when training (``train``, or by default
        ``not self.deterministic``).
        """
        y, mask = self.route(x)
        if (not self.deterministic) if train is None else train:
            routed = jax.lax.stop_gradient(mask).reshape(-1, self.rank).sum(axis=0)
            self.counts[...] = self.counts[...] + routed.astype(jnp.int32)
        b = self.B[...].astype(y.dtype)
        return self.scale * jnp.einsum("...r,mr->...m", y * mask, b)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        """``[..., n] -> [..., m]``."""
        return self.base(x) + self.delta(x, train=train)

    def update_routing_bias(self) -> None:
        """d_i += u * sign(mean(c) - c_i) over the recorded counts, then reset the counts."""
        c = self.counts[...].astype(jnp.float32)
        step = self.bias_lr * jnp.sign(jnp.mean(c, axis=-1, keepdims=True) - c)
        self.d[...] = self.d[...] + step
        self.counts[...] = jnp.zeros_like(self.counts[...])


class FlyLoRASum(nnx.Module):
    """Several FlyLoRA adapters on one base layer whose outputs add.

    ``base(x) + sum_i w_i * branches[i].delta(x)``: the merge of adapters trained on
    different tasks with independent A's (different seeds). Every branch must wrap
    this very ``base`` object (it is shared, not copied).
    """

    def __init__(self, base: nnx.Linear, branches: Sequence[FlyLoRA],
                 weights: Sequence[float] | None = None):
        if not branches:
            raise ValueError("FlyLoRASum needs at least one FlyLoRA branch")
        if any(b.base is not base for b in branches):
            raise ValueError("every FlyLoRASum branch must wrap the same base layer")
        weights = (1.0,) * len(branches) if weights is None else tuple(float(w) for w in weights)
        if len(weights) != len(branches):
            raise ValueError(f"{len(weights)} weights for {len(branches)} FlyLoRA branches")
        self.base = base
        self.branches = nnx.List(branches)
        self.weights = weights

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        """``[..., n] -> [..., m]``."""
        out = self.base(x)
        for w, branch in zip(self.weights, self.branches):
            out = out + w * branch.delta(x, train=train)
        return out


def update_flylora_biases(model: nnx.Module) -> None:
    """Apply the load-balancing rule to every FlyLoRA in ``model`` (in place).

    Call after the optimizer step, inside the same jitted train step; a model with no
    recorded counts (eval) is left unchanged.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, FlyLoRA):
            module.update_routing_bias()

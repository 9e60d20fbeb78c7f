"""Pre-norm bidirectional transformer blocks and a scanned stack of them.

The building blocks of the masked generative transformer (MaskGIT / MAGVIT,
"Masked multi-task transformer" in docs/ALGORITHMS.md): multi-head self-attention (no
causal mask: every token sees every other, except keys marked absent), a GELU MLP,
and pre-norm residual blocks

    x = x + Dropout(Attention(Norm(x)))
    x = x + Dropout(Mlp(Norm(x)))

Every projection is an ``nnx.Linear`` named ``query``/``key``/``value``/``out`` and
``mlp_in``/``mlp_out``, so adapters (LoRA, FlyLoRA) can wrap them by module path.
Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``norm``), and so do
the main activations: every block constrains its input and residual stream
``("batch", "length", "activation_embed")``, queries/keys/values and the attention output
``("batch", "length", "heads", "kv")`` and the MLP's hidden ``("batch", "length", "mlp")``
(``mmgen.parallel.sharding.constrain``: a no-op without a mesh in context). Under FSDP
the batch stays split over ``data`` x ``fsdp`` through every layer and the weights are
all-gathered to meet it; with ``tensor > 1`` heads and the MLP's hidden split over
``tensor`` (Megatron's layout), the residual stream does not. The
``TransformerStack`` creates its layers with ``nnx.vmap`` (parameters gain a leading
``layers`` axis) and runs them under ``nnx.scan`` with ``nnx.remat`` and a named
``jax.checkpoint_policies`` policy, so compile time does not grow with depth.
``scan_unroll`` (1 by default) puts that many layers in each iteration of the scan's loop;
``scan_unroll >= depth`` unrolls it. The parameters and the numbers are the same either way.
Unrolled, XLA no longer slices each layer's weights out of the stacks or writes each
layer's saved activations into stacks; on a 2-core CPU that made the w512 x 4 layers
train step at sequence 1026 1.20-1.34x faster in a process of its own (1.09x alternating
with the rolled step in one process), left the tiny transformer's step as it was,
and compiled a 24-layer one in 16 s instead of 9 (BENCHMARKS.md "Unrolling the layer scan").

Attention runs through ``attention(..., impl=)``, in one of four forms:

* ``"cudnn"``: cuDNN's fused (flash) attention through ``jax.nn.dot_product_attention(...,
  implementation="cudnn")``; the [T, S] scores never reach memory. NVIDIA GPUs, bf16/fp16.
* ``"dot_product_attention"``: the same call with XLA's implementation (JAX's default:
  ``implementation=None`` means XLA, not cuDNN), which materialises the scores and
  their softmax for every head; on one H200 this held the L transformer to 23% MFU.
* ``"heads_major"``: heads moved ahead of the sequence (``[B, N, T, H] @ [B, N, H, S]``
  scores), which XLA:CPU runs 1.7-2x faster than the other's ``BTNH,BSNH->BNTS`` einsum.

* ``"blockwise"``: the heads-major form one (batch, head) slice at a time with a custom
  backward that recomputes the attention weights from a saved log-sum-exp instead of
  keeping the ``[B, N, T, S]`` scores (``_blockwise_attention``); on XLA:CPU each slice's
  scores stay in cache, and a train step stores no ``[layers, B, N, T, S]`` stacks.

``"auto"`` (the default) takes ``blockwise`` on one CPU device (``heads_major`` on a
simulated multi-device CPU mesh), ``cudnn`` where cuDNN can run
the call (``auto_impl``), and XLA's ``dot_product_attention`` otherwise (BENCHMARKS.md).

Dropout is applied with explicit PRNG keys (one per layer, split by the stack) so
the forward pass stays a pure function of (params, inputs, key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from mmgen.nn.backend import cpu_forms, cudnn_kernels
from mmgen.parallel.sharding import constrain

# Logical names of the main activations (see the module docstring).
RESIDUAL = ("batch", "length", "activation_embed")
PER_HEAD = ("batch", "length", "heads", "kv")
HIDDEN = ("batch", "length", "mlp")

_INIT = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones


def _linear(features_in, features_out, names, *, dtype, param_dtype, rngs):
    """``nnx.Linear`` with logical names on the kernel (in, out) and bias (out)."""
    return nnx.Linear(
        features_in,
        features_out,
        kernel_init=nnx.with_partitioning(_INIT, names),
        bias_init=nnx.with_partitioning(_ZEROS, (names[1],)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def make_norm(kind: str, width: int, *, dtype, param_dtype, rngs) -> nnx.Module:
    """``rms`` (RMSNorm) or ``layer`` (LayerNorm) over the last axis, scale named ``norm``."""
    if kind == "rms":
        return nnx.RMSNorm(
            width,
            scale_init=nnx.with_partitioning(_ONES, ("norm",)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    if kind == "layer":
        return nnx.LayerNorm(
            width,
            scale_init=nnx.with_partitioning(_ONES, ("norm",)),
            bias_init=nnx.with_partitioning(_ZEROS, ("norm",)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    raise ValueError(f"norm={kind!r} is not a known normalisation; use 'rms' or 'layer'")


ATTENTION_IMPLS = ("auto", "cudnn", "dot_product_attention", "heads_major", "blockwise")

# (batch, head) slices per iteration of ``blockwise``: 1 keeps one head's
# [T, S] scores (4.2 MB at T = S = 1026 in float32) in a CPU's last-level cache.
BLOCKWISE_GROUPS = 1


def auto_impl(*, cpu: bool, cudnn: bool, dtype, head_dim: int, q_len: int, kv_len: int, masked: bool,
              devices: int = 1) -> str:
    """What ``impl="auto"`` runs. On CPU: ``blockwise`` on one device; across several (a
    simulated mesh) ``heads_major``, because ``blockwise`` loops over the batch axis, which
    the partitioner can only do by gathering a batch-split ``q, k, v`` onto every device.
    cuDNN's flash attention needs bf16/fp16, a head size that is a multiple of 8 and at most
    128 (256 on Hopper; 128 holds everywhere), and, when a mask is given (it becomes an
    additive bias), even query and key lengths for training."""
    if cpu:
        return "blockwise" if devices == 1 else "heads_major"
    fits = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128 and not (masked and (q_len % 2 or kv_len % 2)))
    return "cudnn" if cudnn and fits else "dot_product_attention"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              impl: str = "auto") -> jax.Array:
    """``softmax(q k^T / sqrt(H)) v`` per head: ``q [B, T, N, H]``, ``k, v [B, S, N, H]`` -> ``[B, T, N, H]``.

    ``mask`` (bool, broadcastable to ``[B, N, T, S]``, True = may attend) drops keys;
    every query must keep at least one. ``impl``: see the module docstring.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}; choose one of {ATTENTION_IMPLS}")
    if impl == "auto":
        impl = auto_impl(cpu=cpu_forms(), cudnn=cudnn_kernels(), dtype=q.dtype, head_dim=q.shape[-1],
                         q_len=q.shape[1], kv_len=k.shape[1], masked=mask is not None, devices=jax.device_count())
    if impl == "cudnn":
        if mask is not None:  # cuDNN takes the mask as a bias spanning both lengths (heads may stay 1)
            mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
            mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if impl == "blockwise":
        return _blockwise_attention(q, k, v, mask)
    q = jnp.swapaxes(q, 1, 2) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # [B, N, T, H]
    scores = jnp.matmul(q, jnp.transpose(k, (0, 2, 3, 1)))  # [B, N, T, S]
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.matmul(weights, jnp.swapaxes(v, 1, 2)), 1, 2)


def _blockwise_attention(q, k, v, mask):
    """``heads_major`` attention one (batch, head) slice at a time, with a recomputing backward.

    Heads go ahead of the sequence as in ``heads_major`` and the ``B * N`` slices run
    ``BLOCKWISE_GROUPS`` at a time (``jax.lax.map``), so each slice's ``[T, S]`` scores
    are made, used and dropped while they sit in cache. The backward pass keeps only
    ``q, k, v``, the output ``o`` and the per-query log-sum-exp ``lse`` (never the scores)
    and recomputes ``P = exp(q k^T - lse)`` slice by slice:
    ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * o))``, ``dQ = dS K``, ``dK = dS^T Q``
    (FlashAttention's backward, without its tiling of the key axis). Meant for one device:
    the loop runs over the batch axis, so a batch split over a mesh is gathered first.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    group = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * n, x.shape[1], h)  # [B*N, len, H]
    qg = group(q * jnp.asarray(h**-0.5, q.dtype))
    kt = jnp.swapaxes(group(k), 1, 2)  # [B*N, H, S]: the score matmul's natural operand
    vg = group(v)
    if mask is None:
        mask = jnp.ones((b * n, 1, s), bool)
    else:
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (b, n, mask.shape[2], s)).reshape(b * n, mask.shape[2], s)
    out = _blockwise(qg, kt, vg, mask)
    return jnp.swapaxes(out.reshape(b, n, t, h), 1, 2)


def _slice_scores(q, kt, mask):
    """float32 scores ``q k^T`` of one slice, ``-inf``-like where ``mask`` drops a key."""
    scores = jnp.matmul(q, kt).astype(jnp.float32)
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def _slice_forward(args):
    q, kt, v, mask = args
    scores = _slice_scores(q, kt, mask)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.matmul((e / total).astype(v.dtype), v)
    return out, (top + jnp.log(total))[..., 0]


@jax.custom_vjp
def _blockwise(q, kt, v, mask):
    return jax.lax.map(_slice_forward, (q, kt, v, mask), batch_size=BLOCKWISE_GROUPS)[0]


def _blockwise_fwd(q, kt, v, mask):
    out, lse = jax.lax.map(_slice_forward, (q, kt, v, mask), batch_size=BLOCKWISE_GROUPS)
    return out, (q, kt, v, mask, out, lse)


def _blockwise_bwd(res, d_out):
    q, kt, v, mask, out, lse = res
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B*N, T]

    def slice_backward(args):
        q, kt, v, mask, d_out, lse, delta = args
        p = jnp.exp(_slice_scores(q, kt, mask) - lse[:, None])  # [T, S]
        dv = jnp.matmul(p.astype(v.dtype).T, d_out)
        dp = jnp.matmul(d_out, v.T).astype(jnp.float32)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        return jnp.matmul(ds, kt.T), jnp.matmul(q.T, ds), dv  # dq [T, H], dk^T [H, S], dv [S, H]

    dq, dkt, dv = jax.lax.map(slice_backward, (q, kt, v, mask, d_out, lse, delta), batch_size=BLOCKWISE_GROUPS)
    return dq, dkt, dv, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention, ``[B, S, D] -> [B, S, D]``.

    ``key_mask`` (bool ``[B, S]``, True = may be attended to) removes absent tokens
    from every query's view (the caller keeps at least one key valid per example).
    """

    def __init__(self, width: int, num_heads: int, *, impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl={impl!r}; choose one of {ATTENTION_IMPLS}")
        self.num_heads = num_heads
        self.impl = impl
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = _linear(width, width, ("embed", "heads"), **kw)
        self.key = _linear(width, width, ("embed", "heads"), **kw)
        self.value = _linear(width, width, ("embed", "heads"), **kw)
        self.out = _linear(width, width, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        split = lambda t: constrain(rearrange(t, "b s (n h) -> b s n h", n=self.num_heads), PER_HEAD)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        y = constrain(attention(q, k, v, mask, impl=self.impl), PER_HEAD)
        return constrain(self.out(rearrange(y, "b s n h -> b s (n h)")), RESIDUAL)


class Mlp(nnx.Module):
    """``mlp_out(gelu(mlp_in(x)))``, ``[B, S, D] -> [B, S, F] -> [B, S, D]``."""

    def __init__(self, width: int, mlp_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_in = _linear(width, mlp_dim, ("embed", "mlp"), **kw)
        self.mlp_out = _linear(mlp_dim, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = constrain(jax.nn.gelu(self.mlp_in(x)), HIDDEN)
        return constrain(self.mlp_out(hidden), RESIDUAL)


class TransformerBlock(nnx.Module):
    """One pre-norm block: attention then MLP, each ``x + Dropout(f(Norm(x)))``."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        norm: str = "layer",
        dropout_rate: float = 0.0,
        attention_impl: str = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = make_norm(norm, width, **kw)
        self.attention = SelfAttention(width, num_heads, impl=attention_impl, **kw)
        self.mlp_norm = make_norm(norm, width, **kw)
        self.mlp = Mlp(width, mlp_dim, **kw)
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        k_attn, k_mlp = (None, None) if rng is None else tuple(jax.random.split(rng))
        x = constrain(x, RESIDUAL)
        x = x + dropout(self.attention(self.attention_norm(x), key_mask), self.dropout_rate, k_attn)
        x = constrain(x, RESIDUAL)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, k_mlp)
        return constrain(x, RESIDUAL)


# Entries of jax.checkpoint_policies that build a policy from arguments rather than being one.
_POLICY_FACTORIES = (
    "offload_dot_with_no_batch_dims",
    "save_and_offload_only_these_names",
    "save_any_names_but_these",
    "save_anything_except_these_names",
    "save_from_both_policies",
    "save_only_these_names",
)


def checkpoint_policy(name: str):
    """A ``jax.checkpoint_policies`` policy by name; ``"none"`` means no rematerialisation.

    ``nothing_saveable`` recomputes the whole layer in the backward pass (least
    memory); ``dots_with_no_batch_dims_saveable`` keeps the weight matmuls (faster).
    """
    if name == "none":
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_") or name in _POLICY_FACTORIES:
        known = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_") and n not in _POLICY_FACTORIES)
        raise ValueError(f"remat_policy={name!r} is not a jax.checkpoint_policies policy; use 'none' or one of {known}")
    return policy


class TransformerStack(nnx.Module):
    """``depth`` identical blocks with stacked parameters (leading ``layers`` axis).

    Created with ``nnx.vmap`` over split RNGs, applied with ``nnx.scan`` (``scan_unroll``
    layers per loop iteration); each layer is wrapped in ``nnx.remat(policy=...)`` unless
    ``remat_policy == "none"``.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        norm: str = "layer",
        dropout_rate: float = 0.0,
        remat_policy: str = "nothing_saveable",
        attention_impl: str = "auto",
        scan_unroll: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        checkpoint_policy(remat_policy)  # fail at construction, not inside jit
        if int(scan_unroll) < 1:
            raise ValueError(f"scan_unroll={scan_unroll} must be at least 1 (layers per iteration of the layer loop)")
        self.depth = depth
        self.remat_policy = remat_policy
        self.scan_unroll = min(int(scan_unroll), depth)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create_layers(rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(
                width,
                num_heads,
                mlp_dim,
                norm=norm,
                dropout_rate=dropout_rate,
                attention_impl=attention_impl,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.layers = create_layers(rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """``[B, S, D] -> [B, S, D]``; ``rng`` (optional) drives dropout in every layer."""
        layer_keys = None if rng is None else jax.random.split(rng, self.depth)

        def apply_layer(x, layer, key):
            return layer(x, key_mask, key)

        policy = checkpoint_policy(self.remat_policy)
        if self.remat_policy != "none":
            apply_layer = nnx.remat(apply_layer, policy=policy, prevent_cse=False)

        scan = nnx.scan(
            lambda x, layer, key: (apply_layer(x, layer, key), None),
            in_axes=(nnx.Carry, 0, None if layer_keys is None else 0),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"},
            unroll=self.scan_unroll,
        )
        x, _ = scan(x, self.layers, layer_keys)
        return x

"""Latent quantizers for the video and audio tokenizers: LFQ, FSQ, VQ and RVQ.

Every quantizer maps encoder outputs ``z: float [..., dim]`` (any leading dims) to

* ``z_q``: the quantized latent, same shape and dtype as ``z``, with straight-through
  gradients ``z + stop_grad(q - z)`` (all maths in float32 even when ``z`` is bf16);
* ``indices``: ``int32 [...]`` (``[..., num_levels]`` for RVQ);
* ``aux``: a dict of float32 scalars; ``aux["loss"]`` is the weighted sum of the
  quantizer's own losses (add it to the tokenizer loss), the rest are metrics
  (``commit_loss``, ``entropy_loss``, ``codebook_loss``, ``perplexity``, ``usage``).

and back with ``indices_to_codes(indices) -> z_q [..., dim]`` (float32).

Formulas follow the papers and, where they leave room, the authors' released code:

* **LFQ** (MAGVIT-v2, Yu et al. 2023): ``q_i = sign(z_i)`` in {-1, 1}^K, index
  ``sum_i 2^i [z_i > 0]`` -- channel 0 is the least significant bit by default
  (``bit_order="lsb_first"``; ``"msb_first"`` gives the opposite order used by one
  public library). Commitment ``0.25 * mean (z - sg(q))^2``; entropy penalty (weight
  0.1) ``mean_tokens H(p(.|z)) - H(mean_tokens p(.|z))`` with
  ``p(c|z) = softmax_c(2 <z, c> / tau)``, ``tau = 0.01``. The K bits are split into G
  groups whose entropies are summed, so K = 18 never materialises ``[tokens, 2^18]``
  (the per-token term is exact under this factorisation because ``p(c|z)`` is a
  product over bits; the codebook term becomes the sum of per-group entropies, an
  upper bound of the joint one, as in Open-MAGVIT2's factorised codebook).
* **FSQ** (Mentzer et al. 2023): bounded ``tanh`` with shift, ``round_ste``, mixed-radix
  index (channel 0 least significant); the shift is the paper's published code's
  ``tan(offset / half_l)`` by default, finite for every level count >= 2.
* **VQ** (van den Oord et al. 2017; EMA variant of Razavi et al. 2019): nearest code in
  float32, codebook loss + 0.25 commitment, optional EMA codebook (decay 0.99) with
  Laplace smoothing, dead-code restart from random encoder outputs of the batch.
* **RVQ** (SoundStream, Zeghidour et al. 2021): VQ levels on successive residuals,
  quantizer dropout (a random depth 1..N per training example, as the paper's
  "for each input example, we sample n_q uniformly at random in [1; N_q]"; per batch
  as an option), ``num_levels_used`` for variable bitrate at inference.

Batch statistics (the entropy's ``mean_tokens``, EMA counts, usage) use ``jnp.mean``
/ sums over all tokens; under ``jax.jit`` over a sharded batch these reductions are
global over every device, so no ``pmean`` is needed (see docs/CONVENTIONS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen.parallel.sharding import logical_param

KINDS = ("lfq", "fsq", "vq", "rvq")
_F32 = jnp.float32
_LOG_FLOOR = 1e-30  # keeps log(0) finite (and its gradient) in entropies
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on TPUs too (their default is bf16 passes)


# --------------------------------------------------------------------------- configs


def default_quantizer_config(kind: str) -> ml_collections.ConfigDict:
    """Every field of a ``kind`` quantizer with the paper's default value."""
    if kind == "lfq":
        fields = dict(
            num_bits=18,  # K; MAGVIT-v2 vocabulary 2^18 (demos use 10-14)
            bit_order="lsb_first",  # channel 0 = least significant bit; or "msb_first"
            commitment_weight=0.25,
            entropy_weight=0.1,
            temperature=0.01,  # tau in softmax(2<z, c> / tau)
            diversity_weight=1.0,  # weight of the codebook-entropy term inside L_ent
            entropy_groups=2,  # G groups of K/G bits (2 x 2^9 for K = 18)
            entropy_max_tokens=0,  # >0: entropy on a random subset of this many tokens
            entropy_anneal_factor=0.0,  # r in w * (1 + r * max(0, 1 - step / S)); 0 = off
            entropy_anneal_steps=2000,  # S
        )
    elif kind == "fsq":
        fields = dict(
            levels=(8, 5, 5, 5),
            eps=1e-3,
            shift="tan",  # the paper's code: tan(offset / half_l); "atanh": bound(0) = 0, needs every L >= 3
        )
    elif kind in ("vq", "rvq"):
        fields = dict(
            codebook_size=1024,
            code_dim=256,
            commitment_weight=0.25,
            codebook_weight=1.0,  # unused with the EMA codebook (no gradient to it)
            use_ema=kind == "rvq",  # SoundStream trains its RVQ codebooks by EMA
            ema_decay=0.99,
            ema_epsilon=1e-5,  # Laplace smoothing of the EMA counts
            dead_code_threshold=2.0,  # EMA count below which a code is restarted (0 = off)
            dead_code_unused_steps=100,  # restart after this many unused train calls (0 = off)
            init_scale=1.0,  # stddev of the normal codebook initialisation
        )
        if kind == "rvq":
            # SoundStream: a depth per example; "batch": one depth for the whole batch
            fields.update(num_quantizers=8, quantizer_dropout=1.0, quantizer_dropout_scope="example")
    else:
        raise ValueError(f"unknown quantizer kind {kind!r}; choose one of {KINDS}")
    return ml_collections.ConfigDict(dict(kind=kind, **fields))


def build_quantizer(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Quantizer:
    """The quantizer ``cfg.kind`` names, with ``cfg``'s fields over the defaults."""
    kind = cfg.get("kind")
    defaults = default_quantizer_config(kind)
    unknown = sorted(set(cfg.keys()) - set(defaults.keys()))
    if unknown:
        raise ValueError(
            f"quantizer config has unknown field(s) {unknown} for kind {kind!r}; "
            f"known fields: {sorted(defaults.keys())}"
        )
    c = {**defaults.to_dict(), **{k: cfg[k] for k in cfg.keys()}}
    c.pop("kind")
    if kind == "lfq":
        return LookupFreeQuantizer(**c, rngs=rngs)
    if kind == "fsq":
        return FiniteScalarQuantizer(**c)
    if kind == "vq":
        return VectorQuantizer(**c, rngs=rngs)
    return ResidualVectorQuantizer(**c, rngs=rngs)


# --------------------------------------------------------------------------- shared


def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """``z + stop_grad(q - z)``: the value of ``q`` with the gradient of ``z``."""
    return z + jax.lax.stop_gradient(q - z)


def code_statistics(indices: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
    """Perplexity and usage of the codes in ``indices`` (int, any shape).

    ``usage`` is the fraction of the ``vocab_size`` codes that occur at least once;
    ``perplexity`` is ``exp(H)`` of the empirical code distribution. Counting runs of
    the sorted indices costs O(tokens) memory whatever the vocabulary (2^18 for LFQ).
    """
    flat = jax.lax.stop_gradient(indices).reshape(-1)
    n = flat.shape[0]
    s = jnp.sort(flat)
    new_code = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
    run = jnp.cumsum(new_code) - 1
    counts = jax.ops.segment_sum(jnp.ones((n,), _F32), run, num_segments=n)
    p = counts / n
    entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, _LOG_FLOOR)))
    return {
        "perplexity": jnp.exp(entropy),
        "usage": jnp.sum(new_code).astype(_F32) / vocab_size,
    }


def runtime_stream(rngs: nnx.Rngs) -> nnx.RngStream:
    """A private stream for random choices at call time (token subsets, restarts, dropout).

    Forked from the ``quantizer`` stream of ``rngs``, else ``default``, else ``params``.
    """
    for name in ("quantizer", "default", "params"):
        try:
            return rngs[name].fork()
        except KeyError:
            continue
    raise ValueError("quantizers need an nnx.Rngs with a 'quantizer', 'default' or 'params' stream")


class Quantizer(nnx.Module):
    """Common interface of all quantizers (see the module docstring).

    Attributes:
      dim: channels the encoder must output (LFQ: K bits; FSQ: len(levels); VQ/RVQ: code dim).
      vocab_size: codes per token (per level for RVQ).
      num_levels: 1, or the RVQ depth (then indices carry a trailing level axis).
    """

    dim: int
    vocab_size: int
    num_levels: int = 1

    def _check_input(self, z: jax.Array) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects a last dimension of {self.dim} channels, "
                f"got input of shape {z.shape}"
            )


# --------------------------------------------------------------------------- LFQ


def _bit_weights(num_bits: int, bit_order: str) -> np.ndarray:
    if bit_order not in ("lsb_first", "msb_first"):
        raise ValueError(f"bit_order={bit_order!r} must be 'lsb_first' or 'msb_first'")
    if not 1 <= num_bits <= 30:
        raise ValueError(f"LFQ num_bits={num_bits} must be in 1..30 (int32 indices)")
    w = 2 ** np.arange(num_bits, dtype=np.int64)
    return (w if bit_order == "lsb_first" else w[::-1]).astype(np.int32)


def lfq_bits_to_indices(bits: jax.Array, bit_order: str = "lsb_first") -> jax.Array:
    """``bool [..., K] -> int32 [...]``: ``sum_i 2^i bits_i`` (lsb_first) or reversed."""
    w = _bit_weights(bits.shape[-1], bit_order)
    return jnp.sum(bits.astype(jnp.int32) * w, axis=-1).astype(jnp.int32)


def lfq_indices_to_bits(indices: jax.Array, num_bits: int, bit_order: str = "lsb_first") -> jax.Array:
    """``int [...] -> bool [..., K]``, the inverse of ``lfq_bits_to_indices``."""
    w = _bit_weights(num_bits, bit_order)
    return (indices[..., None].astype(jnp.int32) & w) != 0


def _sign_codebook(num_bits: int) -> jax.Array:
    """All of {-1, 1}^b as ``float32 [2^b, b]`` (row j has bit i of j on channel i)."""
    bits = (np.arange(2**num_bits)[:, None] >> np.arange(num_bits)) & 1
    return jnp.asarray(2.0 * bits - 1.0, _F32)


def lfq_entropy_loss(
    z: jax.Array,
    *,
    temperature: float = 0.01,
    num_groups: int = 1,
    diversity_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAGVIT-v2 entropy penalty of LFQ latents, factorised into bit groups.

    With the K channels split into ``num_groups`` groups of ``b = K / G`` bits and
    ``p_g(c|z) = softmax_c(2 <z_g, c> / tau)`` over ``c`` in {-1, 1}^b (float32):

        per_sample = sum_g mean_tokens H(p_g(.|z))
        codebook   = sum_g H(mean_tokens p_g(.|z))
        loss       = per_sample - diversity_weight * codebook

    ``G = 1`` is the dense formula over all 2^K codes. Memory is ``tokens x G x 2^b``.

    Args:
      z: float ``[..., K]``; every leading position is a token of the batch mean.
    Returns:
      ``(loss, per_sample_entropy, codebook_entropy)``, float32 scalars.
    """
    k = z.shape[-1]
    if k % num_groups:
        raise ValueError(f"LFQ entropy_groups={num_groups} must divide num_bits={k}")
    b = k // num_groups
    zg = z.astype(_F32).reshape(-1, num_groups, b)
    logits = 2.0 * jnp.einsum("ngb,cb->ngc", zg, _sign_codebook(b), precision=_HIGHEST) / temperature
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    per_sample = -jnp.sum(jnp.mean(jnp.sum(p * log_p, axis=-1), axis=0))
    avg_p = jnp.mean(p, axis=0)  # [G, 2^b]; global over a sharded batch under jit
    codebook = -jnp.sum(avg_p * jnp.log(jnp.maximum(avg_p, _LOG_FLOOR)))
    return per_sample - diversity_weight * codebook, per_sample, codebook


def annealed_entropy_weight(weight: float, step, factor: float, steps: int) -> jax.Array:
    """``w * (1 + r * max(0, 1 - step / S))``; plain ``w`` when ``step`` is None."""
    if step is None or factor == 0.0:
        return jnp.asarray(weight, _F32)
    ramp = jnp.maximum(0.0, 1.0 - jnp.asarray(step, _F32) / steps)
    return weight * (1.0 + factor * ramp)


class LookupFreeQuantizer(Quantizer):
    """LFQ: per-channel sign quantizer with the MAGVIT-v2 entropy penalty.

    ``z: [..., K] -> z_q: [..., K]`` in {-1, 1}, ``indices: int32 [...]`` in ``[0, 2^K)``.
    """

    def __init__(
        self,
        num_bits: int = 18,
        *,
        bit_order: str = "lsb_first",
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        temperature: float = 0.01,
        diversity_weight: float = 1.0,
        entropy_groups: int = 2,
        entropy_max_tokens: int = 0,
        entropy_anneal_factor: float = 0.0,
        entropy_anneal_steps: int = 2000,
        rngs: nnx.Rngs,
    ):
        _bit_weights(num_bits, bit_order)  # validates both
        if num_bits % entropy_groups:
            raise ValueError(
                f"LFQ entropy_groups={entropy_groups} must divide num_bits={num_bits}"
            )
        self.dim = num_bits
        self.vocab_size = 2**num_bits
        self.num_levels = 1
        self.bit_order = bit_order
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.temperature = temperature
        self.diversity_weight = diversity_weight
        self.entropy_groups = entropy_groups
        self.entropy_max_tokens = entropy_max_tokens
        self.entropy_anneal_factor = entropy_anneal_factor
        self.entropy_anneal_steps = entropy_anneal_steps
        self.rngs = runtime_stream(rngs)

    def __call__(self, z: jax.Array, *, train: bool, step=None):
        self._check_input(z)
        z32 = z.astype(_F32)
        bits = z32 > 0
        q = jnp.where(bits, 1.0, -1.0).astype(_F32)
        indices = lfq_bits_to_indices(bits, self.bit_order)
        commit = jnp.mean((z32 - jax.lax.stop_gradient(q)) ** 2)

        tokens = z32.reshape(-1, self.dim)
        m = self.entropy_max_tokens
        if train and 0 < m < tokens.shape[0]:
            pick = jax.random.choice(self.rngs(), tokens.shape[0], (m,), replace=False)
            tokens = tokens[pick]
        entropy, per_sample, codebook = lfq_entropy_loss(
            tokens,
            temperature=self.temperature,
            num_groups=self.entropy_groups,
            diversity_weight=self.diversity_weight,
        )
        w_ent = annealed_entropy_weight(
            self.entropy_weight, step, self.entropy_anneal_factor, self.entropy_anneal_steps
        )
        aux = {
            "loss": self.commitment_weight * commit + w_ent * entropy,
            "commit_loss": commit,
            "entropy_loss": entropy,
            "per_sample_entropy": per_sample,
            "codebook_entropy": codebook,
            "entropy_weight": w_ent,
            **code_statistics(indices, self.vocab_size),
        }
        return straight_through(z32, q).astype(z.dtype), indices, aux

    def indices_to_codes(self, indices: jax.Array) -> jax.Array:
        """``int [...] -> float32 [..., K]`` in {-1, 1}."""
        bits = lfq_indices_to_bits(indices, self.dim, self.bit_order)
        return jnp.where(bits, 1.0, -1.0).astype(_F32)


# --------------------------------------------------------------------------- FSQ


def round_ste(x: jax.Array) -> jax.Array:
    """Round to the nearest integer with an identity (straight-through) gradient."""
    return straight_through(x, jnp.round(x))


FSQ_SHIFTS = ("tan", "atanh")


class FiniteScalarQuantizer(Quantizer):
    """FSQ: channel i is bounded and rounded to ``levels[i]`` values in [-1, 1].

    ``bound(z) = tanh(z + shift) * half_l - offset`` with ``half_l = (L-1)(1-eps)/2``,
    ``offset = 0.5`` for even L else 0, and

    * ``shift="tan"`` (default; the code published with the paper, Mentzer et al. 2023,
      appendix A.1): ``shift = tan(offset / half_l)``. Finite for every ``L >= 2``;
      for ``L = 2`` (``half_l < 0.5``) the bounded value lies in ``(-1, 0)`` and the
      codes are ``{-1, 0}``;
    * ``shift="atanh"``: ``shift = atanh(offset / half_l)``, which puts ``bound(0)``
      exactly at 0 for even L; undefined (NaN) for ``L = 2``, which it rejects.

    Both agree for odd L (shift 0); for even ``L >= 4`` the shifts differ by about
    ``(offset/half_l)^5 / 15`` (3.2e-4 for L = 4, 4e-6 for L = 8). ``q = round_ste(bound(z)) / (L // 2)``; index
    ``sum_i digit_i prod_{j<i} L_j`` with ``digit_i = round(bound(z_i)) + L_i // 2`` in
    ``[0, L_i)``. ``z: [..., len(levels)] -> indices: int32 [...]`` in
    ``[0, prod(levels))``. FSQ has no losses: ``aux["loss"]`` is 0.
    """

    def __init__(self, levels: Sequence[int] = (8, 5, 5, 5), *, eps: float = 1e-3, shift: str = "tan"):
        levels = tuple(int(l) for l in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels={levels} must all be >= 2")
        if shift not in FSQ_SHIFTS:
            raise ValueError(f"FSQ shift={shift!r} must be one of {FSQ_SHIFTS}")
        if shift == "atanh" and min(levels) < 3:
            raise ValueError(
                f"FSQ levels={levels} with shift='atanh': atanh(offset / half_l) is undefined for a level "
                "count of 2 (half_l < 0.5); use shift='tan' (the paper's code) or levels >= 3"
            )
        self.levels = levels
        self.eps = eps
        self.shift = shift
        self.dim = len(levels)
        self.vocab_size = int(np.prod(levels))
        self.num_levels = 1
        if self.vocab_size >= 2**31:
            raise ValueError(f"FSQ levels={levels} give more codes than int32 indices hold")

    def _constants(self):
        L = np.asarray(self.levels, np.float64)
        half_l = (L - 1) * (1 - self.eps) / 2
        offset = np.where(self.levels_even, 0.5, 0.0)
        shift = np.tan(offset / half_l) if self.shift == "tan" else np.arctanh(offset / half_l)
        half_width = np.asarray(self.levels, np.int32) // 2
        basis = np.cumprod([1] + list(self.levels[:-1])).astype(np.int32)
        f = lambda a: jnp.asarray(a, _F32)
        return f(half_l), f(offset), f(shift), jnp.asarray(half_width), jnp.asarray(basis)

    @property
    def levels_even(self) -> np.ndarray:
        return np.asarray(self.levels) % 2 == 0

    def bound(self, z: jax.Array) -> jax.Array:
        half_l, offset, shift, _, _ = self._constants()
        return jnp.tanh(z.astype(_F32) + shift) * half_l - offset

    def __call__(self, z: jax.Array, *, train: bool, step=None):
        self._check_input(z)
        _, _, _, half_width, basis = self._constants()
        bounded = self.bound(z)
        q = round_ste(bounded) / half_width.astype(_F32)
        digits = jnp.round(jax.lax.stop_gradient(bounded)).astype(jnp.int32) + half_width
        indices = jnp.sum(digits * basis, axis=-1).astype(jnp.int32)
        aux = {"loss": jnp.zeros((), _F32), **code_statistics(indices, self.vocab_size)}
        return q.astype(z.dtype), indices, aux

    def indices_to_codes(self, indices: jax.Array) -> jax.Array:
        """``int [...] -> float32 [..., len(levels)]``."""
        _, _, _, half_width, basis = self._constants()
        levels = jnp.asarray(self.levels, jnp.int32)
        digits = (indices[..., None].astype(jnp.int32) // basis) % levels
        return ((digits - half_width) / half_width).astype(_F32)


# --------------------------------------------------------------------------- VQ


class QuantizerState(nnx.Variable):
    """Quantizer state updated in place by the forward pass when ``train=True``.

    Never a ``Param``: no gradient and no optimizer touches it. A trainer that keeps a
    weight-EMA copy of a model copies these from the live model as they are
    (``nnx.state(model, QuantizerState)``).
    """


class EMACodebook(QuantizerState):
    """A codebook learned by exponential moving averages instead of gradients."""


class EMAClusterSize(QuantizerState):
    """EMA of how many batch vectors each code was assigned, ``[codebook_size]``."""


class EMAEmbedSum(QuantizerState):
    """EMA of the sum of the batch vectors assigned to each code, ``[codebook_size, dim]``."""


class UnusedSteps(QuantizerState):
    """Consecutive training calls in which each code was not assigned, int32 ``[codebook_size]``."""



def nearest_code(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """``x: [N, D], codebook: [V, D] -> int32 [N]``: argmin of squared L2 distances (float32)."""
    x = x.astype(_F32)
    codebook = codebook.astype(_F32)
    dist = (
        jnp.sum(x * x, axis=-1, keepdims=True)
        - 2.0 * jnp.dot(x, codebook.T, precision=_HIGHEST)
        + jnp.sum(codebook * codebook, axis=-1)[None, :]
    )
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


class VectorQuantizer(Quantizer):
    """VQ: nearest-code quantizer with codebook + commitment losses or an EMA codebook.

    ``z: [..., code_dim] -> indices: int32 [...]`` in ``[0, codebook_size)``.

    * Gradient codebook (``use_ema=False``): the codebook is an ``nnx.Param`` with logical
      names ``("codebook", None)``; ``loss = codebook_weight * mean (sg(z) - q)^2 +
      commitment_weight * mean (z - sg(q))^2`` (VQ-VAE, 1.0 and 0.25).
    * EMA codebook (``use_ema=True``, Razavi et al. 2019 / SoundStream): the codebook is
      an ``EMACodebook`` variable (same logical names), with ``N_c <- d N_c + (1-d) n_c``,
      ``m_c <- d m_c + (1-d) sum_{z -> c} z``, Laplace-smoothed
      ``N'_c = (N_c + eps) / (sum N + V eps) * sum N`` and ``e_c = m_c / N'_c``; only the
      commitment loss remains. The counts start at 1 and the sums at the initial codes.
    * Dead-code restart: after the update, a code whose EMA count is below
      ``dead_code_threshold`` (EMA mode only) or that went unassigned for
      ``dead_code_unused_steps`` training calls is replaced by a random encoder output of
      the batch (its EMA count reset to the threshold). With counts starting at 1 and the
      default threshold 2, the first EMA step initialises the codebook from data.

    All state changes happen only when ``train=True``.
    """

    def __init__(
        self,
        codebook_size: int = 1024,
        code_dim: int = 256,
        *,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        dead_code_threshold: float = 2.0,
        dead_code_unused_steps: int = 100,
        init_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.dim = code_dim
        self.vocab_size = codebook_size
        self.num_levels = 1
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_unused_steps = dead_code_unused_steps
        init = init_scale * jax.random.normal(rngs.params(), (codebook_size, code_dim), _F32)
        if use_ema:
            self.codebook = EMACodebook(init, out_sharding=("codebook", None))
            self.ema_cluster_size = EMAClusterSize(
                jnp.ones((codebook_size,), _F32), out_sharding=("codebook",)
            )
            self.ema_embed_sum = EMAEmbedSum(init, out_sharding=("codebook", None))
        else:
            self.codebook = logical_param(init, ("codebook", None))
        self.unused_steps = UnusedSteps(
            jnp.zeros((codebook_size,), jnp.int32), out_sharding=("codebook",)
        )
        self.rngs = runtime_stream(rngs)

    @property
    def _restarts(self) -> bool:
        return (self.use_ema and self.dead_code_threshold > 0) or self.dead_code_unused_steps > 0

    def quantize_flat(self, x: jax.Array, *, train: bool, active=None) -> dict[str, jax.Array]:
        """Quantize ``x: float32 [N, D]`` and, when training, update the codebook state.

        ``active`` (default: everything) says which vectors take part: a bool scalar
        gates the whole call, a bool ``[N]`` each vector (RVQ's quantizer dropout passes
        False for the levels it switched off, per batch or per example). Inactive
        vectors add nothing to the losses (``mean_{N, D}(active * err)``) or to the
        codebook state, and restarts draw from active vectors only. Returns ``q``
        (``[N, D]``, differentiable w.r.t. a gradient codebook), ``indices`` (``[N]``),
        ``commit_loss``, ``codebook_loss`` and ``restarted`` (fraction of codes replaced).
        """
        codebook = self.codebook[...]
        indices = nearest_code(jax.lax.stop_gradient(x), jax.lax.stop_gradient(codebook))
        q = jnp.take(codebook, indices, axis=0)
        commit_err = (x - jax.lax.stop_gradient(q)) ** 2
        codebook_err = (jax.lax.stop_gradient(x) - q) ** 2
        if active is not None:
            w = jnp.asarray(active).astype(_F32)
            w = w[:, None] if w.ndim == 1 else w
            commit_err, codebook_err = w * commit_err, w * codebook_err
        out = {
            "q": q,
            "indices": indices,
            "commit_loss": jnp.mean(commit_err),
            "codebook_loss": jnp.mean(codebook_err),
            "restarted": jnp.zeros((), _F32),
        }
        if train:
            out["restarted"] = self._update_state(jax.lax.stop_gradient(x), indices, active)
        return out

    def _update_state(self, x: jax.Array, indices: jax.Array, active) -> jax.Array:
        v = self.vocab_size
        per_vector = active is not None and jnp.ndim(active) == 1
        if per_vector:
            token_w = jnp.asarray(active).astype(_F32)
            gate = jnp.any(jnp.asarray(active))
        else:
            token_w = jnp.ones(indices.shape, _F32)
            gate = jnp.asarray(True) if active is None else jnp.asarray(active)
        counts = jax.ops.segment_sum(token_w, indices, num_segments=v)
        old_unused = self.unused_steps[...]
        unused = jnp.where(counts > 0, 0, old_unused + 1)
        codebook = jax.lax.stop_gradient(self.codebook[...])

        if self.use_ema:
            d = self.ema_decay
            size = d * self.ema_cluster_size[...] + (1 - d) * counts
            embed_sum = d * self.ema_embed_sum[...] + (1 - d) * jax.ops.segment_sum(
                x * token_w[:, None] if per_vector else x, indices, num_segments=v
            )
            total = jnp.sum(size)
            smoothed = (size + self.ema_epsilon) / (total + v * self.ema_epsilon) * total
            codebook = embed_sum / smoothed[:, None]

        restarted = jnp.zeros((), _F32)
        if self._restarts:
            dead = jnp.zeros((v,), bool)
            if self.use_ema and self.dead_code_threshold > 0:
                dead = dead | (size < self.dead_code_threshold)
            if self.dead_code_unused_steps > 0:
                dead = dead | (unused >= self.dead_code_unused_steps)
            dead = dead & gate
            if per_vector:  # a random active vector of the batch
                pick = jax.random.categorical(self.rngs(), jnp.where(active, 0.0, -jnp.inf), shape=(v,))
            else:
                pick = jax.random.randint(self.rngs(), (v,), 0, x.shape[0])
            fresh = jnp.take(x, pick, axis=0)
            codebook = jnp.where(dead[:, None], fresh, codebook)
            unused = jnp.where(dead, 0, unused)
            if self.use_ema:
                reset = max(self.dead_code_threshold, 1.0)
                size = jnp.where(dead, reset, size)
                embed_sum = jnp.where(dead[:, None], fresh * reset, embed_sum)
            restarted = jnp.mean(dead.astype(_F32))

        self.unused_steps[...] = jnp.where(gate, unused, old_unused)
        if self.use_ema:
            self.ema_cluster_size[...] = jnp.where(gate, size, self.ema_cluster_size[...])
            self.ema_embed_sum[...] = jnp.where(gate, embed_sum, self.ema_embed_sum[...])
        if self.use_ema or self._restarts:
            self.codebook[...] = jnp.where(gate, codebook, self.codebook[...])
        return restarted

    def _level_loss(self, out: dict[str, jax.Array]) -> jax.Array:
        loss = self.commitment_weight * out["commit_loss"]
        if not self.use_ema:
            loss = loss + self.codebook_weight * out["codebook_loss"]
        return loss

    def __call__(self, z: jax.Array, *, train: bool, step=None):
        self._check_input(z)
        z32 = z.astype(_F32)
        out = self.quantize_flat(z32.reshape(-1, self.dim), train=train)
        indices = out["indices"].reshape(z.shape[:-1])
        aux = {
            "loss": self._level_loss(out),
            "commit_loss": out["commit_loss"],
            "codebook_loss": out["codebook_loss"],
            "restarted_codes": out["restarted"],
            **code_statistics(indices, self.vocab_size),
        }
        z_q = straight_through(z32, out["q"].reshape(z32.shape))
        return z_q.astype(z.dtype), indices, aux

    def indices_to_codes(self, indices: jax.Array) -> jax.Array:
        """``int [...] -> float32 [..., code_dim]``."""
        return jnp.take(self.codebook[...].astype(_F32), indices, axis=0)


# --------------------------------------------------------------------------- RVQ


DROPOUT_SCOPES = ("example", "batch")


class ResidualVectorQuantizer(Quantizer):
    """RVQ: ``num_quantizers`` VQ levels, level l quantizing what levels < l left over.

    ``z: [B, ..., code_dim] -> indices: int32 [B, ..., n]`` (n = ``num_quantizers``, or
    ``num_levels_used``), ``z_q = sum_l q_l``. Quantizer dropout (SoundStream): with
    probability ``quantizer_dropout`` a training example uses a random depth ``n_q``
    uniform in ``1..N`` (``quantizer_dropout_scope="example"``, the default and the
    paper's "for each input example, we sample n_q"; ``"batch"``: one draw for the
    whole batch, mmgen's earlier behaviour). Axis 0 of ``z`` is the example axis. The
    deeper levels of an example still compute indices (returned) but contribute
    nothing to its ``z_q``, to the losses or to their codebook updates; a level's
    losses are ``mean_{tokens, channels}(active * err)``. ``aux["levels_used"]`` is the
    mean depth over the examples. Each level has its own codebook (``codebook_size``
    codes) and options.
    """

    def __init__(
        self,
        num_quantizers: int = 8,
        codebook_size: int = 1024,
        code_dim: int = 256,
        *,
        quantizer_dropout: float = 1.0,
        quantizer_dropout_scope: str = "example",
        rngs: nnx.Rngs,
        **vq_options,
    ):
        if num_quantizers < 1:
            raise ValueError(f"RVQ num_quantizers={num_quantizers} must be >= 1")
        if quantizer_dropout_scope not in DROPOUT_SCOPES:
            raise ValueError(f"RVQ quantizer_dropout_scope={quantizer_dropout_scope!r} must be one of {DROPOUT_SCOPES}")
        self.dim = code_dim
        self.vocab_size = codebook_size
        self.num_levels = num_quantizers
        self.quantizer_dropout = quantizer_dropout
        self.quantizer_dropout_scope = quantizer_dropout_scope
        self.quantizers = nnx.List(
            [
                VectorQuantizer(codebook_size, code_dim, rngs=rngs, **vq_options)
                for _ in range(num_quantizers)
            ]
        )
        self.rngs = runtime_stream(rngs)

    def dropout_depths(self, key: jax.Array, batch: int) -> jax.Array:
        """int32 ``[batch]``: the depth of each example under quantizer dropout.

        ``n_q ~ U{1..N}`` with probability ``quantizer_dropout``, else ``N``; one draw per
        example (``scope="example"``) or one for the batch (``"batch"``).
        """
        n = self.num_levels
        shape = (batch,) if self.quantizer_dropout_scope == "example" else ()
        k_depth, k_apply = jax.random.split(key)
        depth = jax.random.randint(k_depth, shape, 1, n + 1)
        apply = jax.random.uniform(k_apply, shape) < self.quantizer_dropout
        return jnp.broadcast_to(jnp.where(apply, depth, n), (batch,)).astype(jnp.int32)

    def _depth(self, train: bool, num_levels_used: int | None, batch: int):
        """(levels computed, depth per example ``[batch]``, whether every example shares it)."""
        n = self.num_levels
        if num_levels_used is not None:
            if not 1 <= int(num_levels_used) <= n:
                raise ValueError(f"num_levels_used={num_levels_used} must be in 1..{n}")
            return int(num_levels_used), jnp.full((batch,), int(num_levels_used), jnp.int32), True
        if train and self.quantizer_dropout > 0:
            shared = self.quantizer_dropout_scope == "batch"
            return n, self.dropout_depths(self.rngs(), batch), shared
        return n, jnp.full((batch,), n, jnp.int32), True

    def __call__(self, z: jax.Array, *, train: bool, step=None, num_levels_used: int | None = None):
        """``num_levels_used`` (python int) quantizes with only the first levels (bitrate)."""
        self._check_input(z)
        z32 = z.astype(_F32)
        residual = z32.reshape(-1, self.dim)
        batch = z.shape[0] if z.ndim >= 2 else 1
        computed, depth, shared = self._depth(train, num_levels_used, batch)
        # depth of every vector: its example's (the example axis leads)
        vector_depth = depth[0] if shared else jnp.repeat(depth, residual.shape[0] // batch)
        total = jnp.zeros_like(residual)
        indices, sums = [], {"loss": 0.0, "commit_loss": 0.0, "codebook_loss": 0.0}
        usage, perplexity, restarted = [], [], []
        for level in range(computed):
            vq = self.quantizers[level]
            active = level < vector_depth  # bool scalar, or bool [N] per vector
            out = vq.quantize_flat(residual, train=train, active=active)
            on = active.astype(_F32)
            total = total + (on if shared else on[:, None]) * out["q"]
            residual = residual - jax.lax.stop_gradient(out["q"])
            sums["loss"] = sums["loss"] + vq._level_loss(out)
            sums["commit_loss"] = sums["commit_loss"] + out["commit_loss"]
            sums["codebook_loss"] = sums["codebook_loss"] + out["codebook_loss"]
            stats = code_statistics(out["indices"], self.vocab_size)
            usage.append(stats["usage"])
            perplexity.append(stats["perplexity"])
            restarted.append(out["restarted"])
            indices.append(out["indices"])
        indices = jnp.stack(indices, axis=-1).reshape(*z.shape[:-1], computed)
        aux = {
            **{k: jnp.asarray(v, _F32) for k, v in sums.items()},
            "usage": jnp.mean(jnp.stack(usage)),  # mean over the levels computed
            "perplexity": jnp.mean(jnp.stack(perplexity)),
            "restarted_codes": jnp.mean(jnp.stack(restarted)),
            "levels_used": jnp.mean(depth.astype(_F32)),
        }
        z_q = straight_through(z32, total.reshape(z32.shape))
        return z_q.astype(z.dtype), indices, aux

    def indices_to_codes(self, indices: jax.Array) -> jax.Array:
        """``int [..., n] -> float32 [..., code_dim]``: sum of the first n levels' codes."""
        n = indices.shape[-1]
        if not 1 <= n <= self.num_levels:
            raise ValueError(f"RVQ indices have {n} levels; this quantizer has {self.num_levels}")
        return sum(self.quantizers[l].indices_to_codes(indices[..., l]) for l in range(n))

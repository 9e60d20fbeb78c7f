"""The masked multi-task, multi-modal transformer (MAGVIT / MaskGIT, with audio).

One bidirectional transformer reads the sequence (docs/ALGORITHMS.md, "Masked multi-task
transformer")

    [task token][condition token: class label or UNCOND][video tokens][audio tokens]

and predicts, at every video and audio position, a distribution over that
modality's vocabulary. ``[MASK]`` is one extra id per modality (``id == vocab``).

Token contract (docs/CONVENTIONS.md): video ``int32 [B, T', H', W']`` with ``video_vocab``
ids; audio ``int32 [B, T_a]`` or, for RVQ with ``L = audio_levels > 1``,
``int32 [B, T_a, L]`` with ``audio_vocab`` ids per level.

Choices this module makes:

* **Factorised vocabularies.** With ``groups = G > 1`` an id of a ``V = v**G`` vocabulary
  (an LFQ code of ``K`` bits, ``v = 2**(K/G)``) is read as ``G`` base-``v`` digits,
  digit ``g = (id // v**g) % v`` (group 0 holds the least significant bits, matching
  LFQ's channel-0-is-bit-0 order). The embedding is the sum of the ``G`` digit
  embeddings and the head is ``G`` independent ``v``-way softmaxes. ``G = 1`` is the
  plain table and softmax through the same code.
* **Logits layout.** ``logits[m].shape == tokens[m].shape + (G, v)`` for every
  modality: video ``[B, T', H', W', G, v]``, audio ``[B, T_a, G, v]`` or
  ``[B, T_a, L, G, v]``. ``token_log_prob`` is the one way to score a token.
* **RVQ audio: per-level heads on one position per frame.** A frame is one sequence
  position whose embedding is the sum over levels of that level's token embedding
  (or that level's ``[MASK]`` embedding), and whose head predicts all ``L`` levels.
  Every (frame, level) element is masked and decoded on its own, so MaskGIT may
  reveal coarse levels before fine ones; the sequence stays ``T_a`` long instead of
  ``T_a * L`` (VideoPoet's flattened coarse-to-fine order costs ``L`` times the
  audio positions for a small gain in an autoregressive model).
* **Positions.** Learned factorised ``t + h + w`` embeddings for video, a learned 1D
  embedding for audio, plus one learned vector per modality.
* **Absent modalities.** A modality left out of ``tokens`` is not in the sequence
  (sampling a video-only task). Within a batch of mixed tasks, ``present[m]``
  (bool ``[B]``) removes an absent modality from every query's view instead, which
  gives the same logits for the other modalities.

The blocks are ``mmgen.nn.attention`` pre-norm blocks (scanned, rematerialised).
Activations are constrained by logical name (``mmgen.parallel.sharding.constrain``):
embeddings and the sequence ``("batch", "length", "activation_embed")``, each head's logits
``("batch", "length", "vocab")``, so the batch stays split over the rules' batch axes
from the embedding lookup to the loss. Embedding tables and the small position and
modality tables are gathered whole where they are read (``_whole``): a lookup into a
table split over ``fsdp`` along ``embed`` would otherwise hand its ``embed`` split to
the batch-split activations, a layout change XLA can only make by replicating them.
Compute runs in ``cfg.dtype`` (bf16 by default), parameters are ``cfg.param_dtype``
(float32), logits are returned in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen.generative.tasks import TASK_NAMES
from mmgen.nn.attention import RESIDUAL, TransformerStack, make_norm
from mmgen.parallel.sharding import constrain

MODALITIES = ("video", "audio")

_EMBED_INIT = nnx.initializers.normal(stddev=0.02)


def _whole(table: jax.Array, dtype=None) -> jax.Array:
    """A (small) parameter table gathered onto every device, in ``dtype``, to be read by activations."""
    table = table if dtype is None else table.astype(dtype)
    return constrain(table, (None,) * table.ndim)


def _lookup(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
    """``embed(ids)`` from the whole table (``_whole``): rows for batch-split ids."""
    return jnp.take(_whole(embed.embedding[...], embed.dtype), ids, axis=0)


# ----------------------------------------------------------------------------
# Config presets.
# ----------------------------------------------------------------------------

# (depth, width, mlp_dim, num_heads, dropout). B and L are MAGVIT's / MaskGIT's sizes;
# XL (20 x 2048 x 8192, 16 heads): 1.03e9 parameters with the default token layout
# (B: 93M, L: 313M, counted by `param_count`).
_SIZES = {
    "tiny": (2, 128, 512, 4, 0.0),
    "B": (12, 768, 3072, 12, 0.1),
    "L": (24, 1024, 4096, 16, 0.1),
    "XL": (20, 2048, 8192, 16, 0.1),
}


def model_config(size: str = "B") -> ml_collections.ConfigDict:
    """Transformer hyper-parameters and token layout for a named size.

    ``tiny`` runs on a CPU in seconds (and shrinks the token layout to match); the
    others use MAGVIT-v2's layout (17 x 128^2 -> 5 x 16 x 16 latents, 18-bit LFQ
    split in 2 groups of 512) and VideoPoet's audio (106 frames x 4 RVQ levels of
    1024). Trainers override the token layout from their tokenizers.
    """
    if size not in _SIZES:
        raise ValueError(f"model size {size!r} is unknown; choose one of {', '.join(_SIZES)}")
    depth, width, mlp_dim, num_heads, dropout_rate = _SIZES[size]
    cfg = ml_collections.ConfigDict()
    cfg.size = size
    cfg.depth = depth
    cfg.width = width
    cfg.mlp_dim = mlp_dim
    cfg.num_heads = num_heads
    cfg.dropout = dropout_rate
    cfg.norm = "layer"  # "layer" | "rms"
    cfg.dtype = "float32" if size == "tiny" else "bfloat16"
    cfg.param_dtype = "float32"
    cfg.remat_policy = "nothing_saveable"  # a jax.checkpoint_policies name, or "none"
    cfg.attention_impl = "auto"  # mmgen.nn.attention.ATTENTION_IMPLS: auto = blockwise on CPU, cuDNN on GPU
    cfg.scan_unroll = 1  # layers per iteration of the layer loop; >= depth unrolls it (faster steps, longer compiles)
    cfg.num_classes = 10 if size == "tiny" else 101  # UCF-101
    if size == "tiny":
        cfg.video_grid = (3, 4, 4)
        cfg.video_vocab = 1024
        cfg.video_vocab_groups = 1
        cfg.audio_len = 16
        cfg.audio_levels = 1
        cfg.audio_vocab = 1024
    else:
        cfg.video_grid = (5, 16, 16)
        cfg.video_vocab = 2**18
        cfg.video_vocab_groups = 2
        cfg.audio_len = 106
        cfg.audio_levels = 4
        cfg.audio_vocab = 1024
    cfg.audio_vocab_groups = 1
    return cfg


# ----------------------------------------------------------------------------
# Token layout of each modality.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """Shape and vocabulary of one modality's tokens (batch axis excluded).

    ``shape`` is the token array shape: ``(T', H', W')`` for video, ``(T_a,)`` or
    ``(T_a, L)`` for audio. ``levels > 1`` means the last axis holds RVQ levels that
    share one sequence position. ``mask_id == vocab``.
    """

    name: str
    shape: tuple[int, ...]
    vocab: int
    groups: int = 1
    levels: int = 1

    @property
    def mask_id(self) -> int:
        return self.vocab

    @property
    def group_vocab(self) -> int:
        return int(round(self.vocab ** (1.0 / self.groups)))

    @property
    def grid(self) -> tuple[int, ...]:
        """Sequence-position grid: ``shape`` without the level axis."""
        return self.shape[:-1] if self.levels > 1 else self.shape

    @property
    def num_positions(self) -> int:
        return int(np.prod(self.grid))

    @property
    def head_size(self) -> int:
        return self.levels * self.groups * self.group_vocab


def modality_specs(cfg) -> dict[str, ModalitySpec]:
    """The modalities a config enables, in sequence order (``audio_len = 0``: no audio)."""
    specs = {}
    if cfg.get("video_grid"):
        specs["video"] = ModalitySpec(
            "video", tuple(int(n) for n in cfg.video_grid), int(cfg.video_vocab), int(cfg.get("video_vocab_groups", 1))
        )
    if cfg.get("audio_len", 0):
        levels = int(cfg.get("audio_levels", 1))
        shape = (int(cfg.audio_len),) + ((levels,) if levels > 1 else ())
        specs["audio"] = ModalitySpec(
            "audio", shape, int(cfg.audio_vocab), int(cfg.get("audio_vocab_groups", 1)), levels
        )
    for spec in specs.values():
        if spec.group_vocab**spec.groups != spec.vocab:
            raise ValueError(
                f"{spec.name}_vocab={spec.vocab} cannot be split into {spec.groups} equal groups "
                f"({spec.name}_vocab_groups); it must be v**groups, e.g. 2**18 with 2 groups of 512"
            )
    if not specs:
        raise ValueError("the config enables no modality: set video_grid and/or audio_len > 0")
    return specs


def group_digits(tokens: jax.Array, spec: ModalitySpec) -> jax.Array:
    """Ids ``[...]`` -> base-``v`` digits ``[..., G]`` (group 0 = least significant)."""
    v = spec.group_vocab
    powers = jnp.asarray([v**g for g in range(spec.groups)], jnp.int32)
    return (tokens[..., None] // powers) % v


def combine_digits(digits: jax.Array, spec: ModalitySpec) -> jax.Array:
    """Digits ``[..., G]`` -> ids ``[...]``; the inverse of ``group_digits``."""
    v = spec.group_vocab
    powers = jnp.asarray([v**g for g in range(spec.groups)], jnp.int32)
    return jnp.sum(digits * powers, axis=-1).astype(jnp.int32)


def token_log_prob(logits: jax.Array, tokens: jax.Array, spec: ModalitySpec) -> jax.Array:
    """``log p(token)`` under the factorised head: the sum of its group log-probs.

    ``logits [..., G, v]``, ``tokens [...]`` -> ``[...]`` float32. Mask ids give
    meaningless values; callers weight them out.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    digits = group_digits(jnp.minimum(tokens, spec.vocab - 1), spec)
    return jnp.take_along_axis(logp, digits[..., None], axis=-1)[..., 0].sum(axis=-1)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


class TokenEmbedding(nnx.Module):
    """Factorised token embedding of one modality, ``[B, *shape] -> [B, P, D]``.

    ``embedding(id) = sum_g E[level, g, digit_g(id)]``; a ``[MASK]`` element uses its
    level's mask vector instead; RVQ levels of one position are summed.
    """

    def __init__(self, spec: ModalitySpec, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.table = nnx.Embed(
            spec.head_size,
            width,
            embedding_init=nnx.with_partitioning(_EMBED_INIT, ("vocab", "embed")),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.mask_embedding = nnx.Param(
            _EMBED_INIT(rngs.params(), (spec.levels, width), param_dtype), out_sharding=(None, "embed")
        )
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        spec = self.spec
        per_level = tokens if spec.levels > 1 else tokens[..., None]  # [B, *grid, L]
        is_mask = per_level == spec.mask_id
        digits = group_digits(jnp.where(is_mask, 0, per_level), spec)  # [B, *grid, L, G]
        level = jnp.arange(spec.levels)[:, None]
        group = jnp.arange(spec.groups)[None, :]
        rows = (level * spec.groups + group) * spec.group_vocab + digits
        embedded = _lookup(self.table, rows).sum(axis=-2)  # [B, *grid, L, D]
        mask_vectors = _whole(self.mask_embedding[...], embedded.dtype)
        embedded = jnp.where(is_mask[..., None], mask_vectors, embedded).sum(axis=-2)
        return constrain(embedded.reshape(embedded.shape[0], spec.num_positions, -1), RESIDUAL)


class TokenHead(nnx.Module):
    """``[B, P, D] -> [B, *shape, G, v]`` float32 logits (one linear layer per modality)."""

    def __init__(self, spec: ModalitySpec, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.head = nnx.Linear(
            width,
            spec.head_size,
            kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), ("embed", "vocab")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        logits = constrain(self.head(x).astype(jnp.float32), ("batch", "length", "vocab"))
        return logits.reshape(x.shape[0], *spec.shape, spec.groups, spec.group_vocab)


class PositionEmbedding(nnx.Module):
    """Learned positions ``[P, D]``: factorised ``t + h + w`` for a 3D grid, 1D otherwise."""

    def __init__(self, grid: tuple[int, ...], width: int, *, param_dtype, rngs: nnx.Rngs):
        self.axes = nnx.List(
            [
                nnx.Param(_EMBED_INIT(rngs.params(), (n, width), param_dtype), out_sharding=(None, "embed"))
                for n in grid
            ]
        )
        self.grid = grid

    def __call__(self) -> jax.Array:
        total = 0.0
        for axis, table in enumerate(self.axes):
            shape = [1] * len(self.grid) + [table.shape[-1]]
            shape[axis] = self.grid[axis]
            total = total + _whole(table[...]).reshape(shape)
        return total.reshape(-1, total.shape[-1])


class MaskedTransformer(nnx.Module):
    """Bidirectional transformer over [task][condition][video][audio] tokens.

    ``model(tokens, task_ids, cond, *, train=False, present=None, rng=None)``:

    * ``tokens``: dict modality -> int32 tokens (``ModalitySpec.shape`` after ``B``),
      ``[MASK] = vocab``; a modality may be left out (it is then not in the sequence).
    * ``task_ids``: int32 ``[B]`` (``mmgen.generative.tasks.task_id``).
    * ``cond``: dict; ``cond["label"]`` int32 ``[B]`` in ``[0, num_classes]`` where
      ``num_classes`` is the UNCOND token (also used when the key is missing).
    * ``present``: optional dict modality -> bool ``[B]``; False hides that modality
      of that example from attention (an absent modality in a mixed-task batch).
    * ``rng``: dropout key, required when ``train`` and ``cfg.dropout > 0``.

    Returns dict modality -> float32 logits ``tokens[m].shape + (G, v)``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        # Frozen (hashable) so the graph definition can be a static jit argument.
        self.cfg = ml_collections.FrozenConfigDict(cfg)
        self.spec_items = tuple(modality_specs(cfg).items())  # a tuple: hashable graph metadata
        self.num_classes = int(cfg.num_classes)
        dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.dtype = dtype
        self.dropout_rate = float(cfg.dropout)
        width = int(cfg.width)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        specs = self.specs

        table_init = nnx.with_partitioning(_EMBED_INIT, (None, "embed"))
        self.task_embedding = nnx.Embed(len(TASK_NAMES), width, embedding_init=table_init, **kw)
        self.label_embedding = nnx.Embed(self.num_classes + 1, width, embedding_init=table_init, **kw)
        self.modality_embedding = nnx.Param(
            _EMBED_INIT(rngs.params(), (len(MODALITIES), width), param_dtype), out_sharding=(None, "embed")
        )
        self.token_embeddings = nnx.Dict(
            {m: TokenEmbedding(s, width, **kw) for m, s in specs.items()}
        )
        self.positions = nnx.Dict(
            {m: PositionEmbedding(s.grid, width, param_dtype=param_dtype, rngs=rngs) for m, s in specs.items()}
        )
        self.blocks = TransformerStack(
            int(cfg.depth),
            width,
            int(cfg.num_heads),
            int(cfg.mlp_dim),
            norm=cfg.norm,
            dropout_rate=self.dropout_rate,
            remat_policy=cfg.remat_policy,
            attention_impl=cfg.get("attention_impl", "auto"),
            scan_unroll=int(cfg.get("scan_unroll", 1)),
            **kw,
        )
        self.final_norm = make_norm(cfg.norm, width, **kw)
        self.heads = nnx.Dict({m: TokenHead(s, width, **kw) for m, s in specs.items()})

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        """Token layout of each modality the model reads, in sequence order."""
        return dict(self.spec_items)

    @property
    def uncond_label(self) -> int:
        return self.num_classes

    def __call__(self, tokens, task_ids, cond=None, *, train: bool = False, present=None, rng=None):
        cond = cond or {}
        unknown = set(tokens) - set(self.specs)
        if unknown:
            raise ValueError(f"tokens for {sorted(unknown)} but this model has modalities {list(self.specs)}")
        if train and self.dropout_rate > 0 and rng is None:
            raise ValueError("train=True with cfg.dropout > 0 needs a dropout rng")
        batch = task_ids.shape[0]
        labels = cond.get("label")
        if labels is None:
            labels = jnp.full((batch,), self.uncond_label, jnp.int32)

        pieces = [_lookup(self.task_embedding, task_ids)[:, None], _lookup(self.label_embedding, labels)[:, None]]
        visible = [jnp.ones((batch, 2), bool)]
        order = [m for m in MODALITIES if m in tokens]
        for m in order:
            spec = self.specs[m]
            if tuple(tokens[m].shape[1:]) != spec.shape:
                raise ValueError(f"{m} tokens have shape {tuple(tokens[m].shape)}; the model expects [B, {spec.shape}]")
            x = self.token_embeddings[m](tokens[m])
            x = x + self.positions[m]().astype(x.dtype)
            x = x + _whole(self.modality_embedding[...], x.dtype)[MODALITIES.index(m)]
            pieces.append(x)
            is_present = jnp.ones((batch,), bool) if present is None or m not in present else present[m]
            visible.append(jnp.broadcast_to(is_present[:, None], (batch, spec.num_positions)))
        x = constrain(jnp.concatenate(pieces, axis=1).astype(self.dtype), RESIDUAL)  # [B, S, D]
        key_mask = None if present is None else jnp.concatenate(visible, axis=1)

        x = self.blocks(x, key_mask, rng if train else None)
        x = constrain(self.final_norm(x), RESIDUAL)

        logits, start = {}, 2
        for m in order:
            n = self.specs[m].num_positions
            logits[m] = self.heads[m](x[:, start : start + n])
            start += n
        return logits


# ----------------------------------------------------------------------------
# Size and cost.
# ----------------------------------------------------------------------------


def sequence_length(cfg) -> int:
    """Task token + condition token + every video and audio position."""
    return 2 + sum(s.num_positions for s in modality_specs(cfg).values())


def matmul_param_count(cfg) -> int:
    """Parameters that take part in matmuls: transformer blocks and output heads."""
    width, mlp = int(cfg.width), int(cfg.mlp_dim)
    per_layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    heads = sum((width + 1) * s.head_size for s in modality_specs(cfg).values())
    return int(cfg.depth) * per_layer + heads


def param_count(cfg) -> int:
    """Every parameter: matmuls, norms, embeddings and positions (analytic, no allocation)."""
    width = int(cfg.width)
    norms_per_layer = 2 * (2 if cfg.norm == "layer" else 1) * width
    final_norm = (2 if cfg.norm == "layer" else 1) * width
    specs = modality_specs(cfg)
    embeddings = (len(TASK_NAMES) + int(cfg.num_classes) + 1 + len(MODALITIES)) * width
    for s in specs.values():
        embeddings += (s.head_size + s.levels + sum(s.grid)) * width
    return matmul_param_count(cfg) + int(cfg.depth) * norms_per_layer + final_norm + embeddings


def matmul_params_per_token(cfg) -> float:
    """Matmul parameters one sequence position's forward pass uses, averaged over the sequence.

    Every position goes through every block, but a modality's head runs only on that
    modality's positions (not on the task and condition tokens, nor the other
    modality's), so the heads count ``sum_m head_params_m * positions_m / seq_len``.
    """
    width = int(cfg.width)
    specs = modality_specs(cfg).values()
    heads = sum((width + 1) * s.head_size for s in specs)
    head_uses = sum((width + 1) * s.head_size * s.num_positions for s in specs)
    return matmul_param_count(cfg) - heads + head_uses / sequence_length(cfg)


def flops_per_token(cfg, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), docs/ALGORITHMS.md "Scale".

    ``6 * matmul_params_per_token + 12 * depth * seq_len * width``: the dense part counts
    the block matmuls and each modality's head on its own positions (embedding lookups
    do no FLOPs), the second term is the attention score and value matmuls
    (``12 * layers * seq^2 * width`` per sequence). Times ``sequence_length(cfg)`` it is
    the training FLOPs of one example (``compiled.cost_analysis()`` agrees within a few
    percent: norms, softmaxes and the loss are left out).
    """
    seq_len = sequence_length(cfg) if seq_len is None else int(seq_len)
    return 6.0 * matmul_params_per_token(cfg) + 12.0 * int(cfg.depth) * seq_len * int(cfg.width)

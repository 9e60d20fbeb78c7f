"""MAGVIT-v2-style causal 3D CNN video tokenizer (Yu et al. 2023, "Language Model
Beats Diffusion"), following docs/ALGORITHMS.md "Video tokenizer".

``video float32 [-1, 1] [B, T, H, W, 3]`` -> ``tokens int32 [B, T', H', W']`` (a
trailing level axis for RVQ) -> ``video [B, T, H, W, 3]`` in [-1, 1], with
``T = 1 + n * 2^(temporal downsamplings)`` and ``T' = 1 + n`` (17 x 128^2 -> 5 x 16^2
for the B/L presets).

* Encoder: causal conv-in; one level per channel multiplier, each ``num_res_blocks``
  residual blocks (GroupNorm, swish, 3x3x3 causal conv, twice) followed -- in every
  level but the last -- by a strided causal conv that halves H and W and, where
  ``temporal_downsample`` says so (MAGVIT-v2 defers it to the later levels), T; then a
  GroupNorm without affine and a 1x1x1 conv to the quantizer's ``dim``.
* Quantizer: any of ``mmgen.tokenizers.quantizers`` (LFQ by default), run in float32.
* Decoder, the mirror: conv-in and residual blocks at the deepest width, then per
  level an adaptive GroupNorm whose scale and bias are predicted from the quantized
  latent, residual blocks, and depth-to-space upsampling that drops the extra leading
  frame (5 -> 9 -> 17); GroupNorm, swish, conv-out, clamp to [-1, 1].

Every convolution is causal in time and every GroupNorm keeps per-frame statistics,
so latent frame ``j`` depends on input frames ``<= 4j`` only and frame 0 is encoded on
its own: an image is a 1-frame video (joint image/video tokenizer).

Activations (the clip, every convolution's output, each residual block's, the latent)
are constrained ``("batch", "length", None, None, "channels")`` by logical name
(``mmgen.nn.conv.constrain_channels_last``), so under FSDP the batch stays split over
``data`` x ``fsdp`` from the clip to the reconstruction and the kernels are gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmgen.errors import UserError
from mmgen.nn.conv import AdaptiveGroupNorm, CausalConv3d, DepthToSpace3d, GroupNorm, constrain_channels_last
from mmgen.tokenizers.quantizers import build_quantizer, default_quantizer_config


def model_config(size: str = "B") -> ml_collections.ConfigDict:
    """Model-size presets: ``tiny`` (CPU tests/demo, 9x32x32 -> 3x8x8), ``B``, ``L``.

    B and L: channel multipliers (1, 2, 2, 4), spatial /8 and temporal /4 (17x128x128
    -> 5x16x16), LFQ with K = 18 bits (vocabulary 2^18) and entropy in 2 groups of 9 bits.
    L uses MAGVIT-v2's 128 base channels and 4 residual blocks per level.
    """
    presets = {
        # base_channels, channel_multipliers, num_res_blocks, temporal_downsample, groups, lfq bits
        "tiny": (16, (1, 2, 2), 1, (True, True), 8, 10),
        "B": (64, (1, 2, 2, 4), 2, (False, True, True), 32, 18),
        "L": (128, (1, 2, 2, 4), 4, (False, True, True), 32, 18),
    }
    if size not in presets:
        raise UserError(f"video tokenizer size {size!r} is unknown; choose one of {sorted(presets)}")
    base, mults, blocks, temporal, groups, bits = presets[size]
    upsample_kernel = 1 if size == "tiny" else 3  # tiny: 9x cheaper decoder upsampling on CPU
    quantizer = default_quantizer_config("lfq")
    quantizer.num_bits = bits
    quantizer.entropy_groups = 2
    return ml_collections.ConfigDict(
        dict(
            size=size,
            in_channels=3,
            base_channels=base,
            channel_multipliers=mults,
            num_res_blocks=blocks,
            # One entry per downsampling step (levels - 1): also halve T there?
            temporal_downsample=temporal,
            num_groups=groups,
            temporal_padding="constant",  # causal front padding: zeros, or "edge" (repeat frame 0)
            # Kernel of the conv before each depth-to-space: 3 (MAGVIT-v2), or 1, 9x cheaper,
            # leaving the spatial mixing to the residual blocks that follow (tiny, on CPU).
            upsample_kernel=upsample_kernel,
            remat=False,  # nnx.remat on residual blocks (memory for compute)
            dtype="float32",  # activations; "bfloat16" on accelerators
            param_dtype="float32",
            quantizer=quantizer,
        )
    )


class ResidualBlock(nnx.Module):
    """``x + conv(swish(GN(conv(swish(GN(x))))))``, 3x3x3 causal convs; 1x1x1 skip if widths differ.

    ``[B, T, H, W, C_in] -> [B, T, H, W, C_out]``.
    """

    def __init__(self, features_in: int, features_out: int, *, num_groups: int, temporal_padding: str,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(features_in, num_groups, **kw)
        self.conv1 = CausalConv3d(features_in, features_out, 3, temporal_padding=temporal_padding, **kw)
        self.norm2 = GroupNorm(features_out, num_groups, **kw)
        self.conv2 = CausalConv3d(features_out, features_out, 3, temporal_padding=temporal_padding, **kw)
        self.skip = (
            CausalConv3d(features_in, features_out, 1, use_bias=False, **kw) if features_in != features_out else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.norm1.swish(x))
        h = self.conv2(self.norm2.swish(h))
        return constrain_channels_last((x if self.skip is None else self.skip(x)) + h)


def _run_block(block: ResidualBlock, x: jax.Array, remat: bool) -> jax.Array:
    return nnx.remat(ResidualBlock.__call__)(block, x) if remat else block(x)


class Encoder(nnx.Module):
    """``video [B, T, H, W, C] -> latent [B, T', H', W', dim]`` (before the quantizer)."""

    def __init__(self, cfg: ml_collections.ConfigDict, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block_kw = dict(num_groups=cfg.num_groups, temporal_padding=cfg.temporal_padding, **kw)
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        self.remat = bool(cfg.remat)
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], 3, temporal_padding=cfg.temporal_padding, **kw)
        blocks, downsamples = [], []
        width = widths[0]
        for level, level_width in enumerate(widths):
            level_blocks = []
            for _ in range(cfg.num_res_blocks):
                level_blocks.append(ResidualBlock(width, level_width, **block_kw))
                width = level_width
            blocks.append(nnx.List(level_blocks))
            if level < len(widths) - 1:
                stride = (2 if cfg.temporal_downsample[level] else 1, 2, 2)
                downsamples.append(
                    CausalConv3d(width, width, 3, stride, temporal_padding=cfg.temporal_padding, **kw)
                )
        self.blocks = nnx.List(blocks)
        self.downsamples = nnx.List(downsamples)
        self.norm_out = GroupNorm(width, cfg.num_groups, use_affine=False, **kw)
        self.conv_out = CausalConv3d(width, dim, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level, level_blocks in enumerate(self.blocks):
            for block in level_blocks:
                x = _run_block(block, x, self.remat)
            if level < len(self.downsamples):
                x = self.downsamples[level](x)
        return self.conv_out(self.norm_out(x))


class Decoder(nnx.Module):
    """``quantized latent [B, T', H', W', dim] -> video [B, T, H, W, C]`` (unclamped)."""

    def __init__(self, cfg: ml_collections.ConfigDict, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block_kw = dict(num_groups=cfg.num_groups, temporal_padding=cfg.temporal_padding, **kw)
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        self.remat = bool(cfg.remat)
        width = widths[-1]
        self.conv_in = CausalConv3d(dim, width, 3, temporal_padding=cfg.temporal_padding, **kw)
        self.mid_blocks = nnx.List([ResidualBlock(width, width, **block_kw) for _ in range(cfg.num_res_blocks)])
        norms, blocks, upsamples = [], [], []
        for level in reversed(range(len(widths))):
            norms.append(AdaptiveGroupNorm(width, dim, cfg.num_groups, **kw))
            level_blocks = []
            for _ in range(cfg.num_res_blocks):
                level_blocks.append(ResidualBlock(width, widths[level], **block_kw))
                width = widths[level]
            blocks.append(nnx.List(level_blocks))
            if level > 0:
                factors = (2 if cfg.temporal_downsample[level - 1] else 1, 2, 2)
                upsamples.append(DepthToSpace3d(width, width, factors, cfg.get("upsample_kernel", 3), **kw))
        self.level_norms = nnx.List(norms)
        self.blocks = nnx.List(blocks)
        self.upsamples = nnx.List(upsamples)
        self.norm_out = GroupNorm(width, cfg.num_groups, **kw)
        self.conv_out = CausalConv3d(width, cfg.in_channels, 3, temporal_padding=cfg.temporal_padding, **kw)

    def __call__(self, z_q: jax.Array) -> jax.Array:
        x = self.conv_in(z_q)
        for block in self.mid_blocks:
            x = _run_block(block, x, self.remat)
        for i, level_blocks in enumerate(self.blocks):
            x = self.level_norms[i](x, z_q)
            for block in level_blocks:
                x = _run_block(block, x, self.remat)
            if i < len(self.upsamples):
                x = self.upsamples[i](x)
        return self.conv_out(self.norm_out.swish(x))


class VideoTokenizer(nnx.Module):
    """Causal video tokenizer: ``encode``, ``decode``, ``__call__`` for training.

    Attributes:
      quantizer: the ``Quantizer`` ``cfg.quantizer`` builds (float32).
      vocab_size: codes per token (per level for RVQ).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        levels = len(cfg.channel_multipliers)
        if len(cfg.temporal_downsample) != levels - 1:
            raise UserError(
                f"video tokenizer temporal_downsample={tuple(cfg.temporal_downsample)} needs one entry per "
                f"downsampling step: {levels - 1} for channel_multipliers={tuple(cfg.channel_multipliers)}"
            )
        for width in (cfg.base_channels * m for m in cfg.channel_multipliers):
            if width % cfg.num_groups:
                raise UserError(
                    f"video tokenizer num_groups={cfg.num_groups} must divide every level width "
                    f"(base_channels * channel_multipliers = {width})"
                )
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temporal_downsample)
        self.spatial_factor = 2 ** (levels - 1)
        self.quantizer = build_quantizer(cfg.quantizer, rngs=rngs)
        dim = self.quantizer.dim
        self.encoder = Encoder(cfg, dim, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dim, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ shapes

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    def check_video_shape(self, shape) -> None:
        """Raise a ``UserError`` (a ``ValueError``) naming the bad size and a valid one."""
        if len(shape) != 5 or shape[-1] != self.cfg.in_channels:
            raise UserError(
                f"video tokenizer expects video [B, T, H, W, {self.cfg.in_channels}], got shape {tuple(shape)}"
            )
        _, t, h, w, _ = shape
        ft, fs = self.temporal_factor, self.spatial_factor
        if t < 1 or (t - 1) % ft:
            valid = 1 + ft * max(1, round((t - 1) / ft))
            raise UserError(
                f"video frames={t} must be 1 + {ft}n for the causal tokenizer "
                f"(temporal_downsample={tuple(self.cfg.temporal_downsample)}); try {valid}"
            )
        for name, size in (("height", h), ("width", w)):
            if size < fs or size % fs:
                valid = fs * max(1, round(size / fs))
                raise UserError(
                    f"video {name}={size} must be a multiple of {fs} (channel_multipliers="
                    f"{tuple(self.cfg.channel_multipliers)} downsample {len(self.cfg.channel_multipliers) - 1} "
                    f"times by 2); try {valid}"
                )

    def latent_shape(self, input_shape) -> tuple[int, ...]:
        """``(B, T, H, W, 3) -> (B, T', H', W')`` token shape (``+ (levels,)`` for RVQ)."""
        self.check_video_shape(input_shape)
        b, t, h, w, _ = input_shape
        shape = (b, 1 + (t - 1) // self.temporal_factor, h // self.spatial_factor, w // self.spatial_factor)
        return shape + ((self.quantizer.num_levels,) if self.quantizer.num_levels > 1 else ())

    # ------------------------------------------------------------------ model

    def encode_latent(self, video: jax.Array) -> jax.Array:
        """``video [B, T, H, W, 3]`` in [-1, 1] -> continuous latent float32 ``[B, T', H', W', dim]``."""
        self.check_video_shape(video.shape)
        video = constrain_channels_last(video.astype(self.dtype))
        return constrain_channels_last(self.encoder(video).astype(jnp.float32))

    def quantize(self, z: jax.Array, *, train: bool = False, step=None):
        """``z [..., dim]`` -> ``(z_q float32, tokens int32, aux)``."""
        return self.quantizer(z.astype(jnp.float32), train=train, step=step)

    def decode_latent(self, z_q: jax.Array) -> jax.Array:
        """Quantized latent ``[B, T', H', W', dim]`` -> video ``[B, T, H, W, 3]`` clamped to [-1, 1]."""
        video = self.decoder(constrain_channels_last(z_q.astype(self.dtype))).astype(jnp.float32)
        return constrain_channels_last(jnp.clip(video, -1.0, 1.0))

    def encode(self, video: jax.Array, *, train: bool = False, step=None):
        """``video [B, T, H, W, 3]`` in [-1, 1] -> ``(tokens int32 [B, T', H', W'], aux)``."""
        _, tokens, aux = self.quantize(self.encode_latent(video), train=train, step=step)
        return tokens, aux

    def decode(self, tokens: jax.Array) -> jax.Array:
        """``tokens int32 [B, T', H', W']`` -> video float32 ``[B, T, H, W, 3]`` in [-1, 1]."""
        return self.decode_latent(self.quantizer.indices_to_codes(tokens))

    def __call__(self, video: jax.Array, *, train: bool = False, step=None):
        """Training forward: ``video -> (reconstruction, tokens, aux)``; ``aux["loss"]`` is the quantizer loss."""
        z_q, tokens, aux = self.quantize(self.encode_latent(video), train=train, step=step)
        return self.decode_latent(z_q), tokens, aux

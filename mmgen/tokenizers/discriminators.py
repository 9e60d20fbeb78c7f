"""3D StyleGAN-style discriminator for the video tokenizer's adversarial loss.

MAGVIT / MAGVIT-v2 (Yu et al. 2023) inflate StyleGAN2's residual discriminator
(Karras et al. 2020) to 3D, following docs/ALGORITHMS.md "Video tokenizer":

    conv-in 3x3x3, leaky ReLU
    per level i (channels base * multipliers[i]):
        h = lrelu(conv3(x)); h = blur_pool(h); h = lrelu(conv3(h))      (C_in -> C_out)
        skip = conv1(blur_pool(x))                                     (no bias)
        x = (h + skip) / sqrt(2)
    conv 3x3x3, leaky ReLU, flatten, dense + leaky ReLU, dense -> one logit per clip

Blur-pool (binomial [1, 3, 3, 1] low-pass, stride 2) halves H and W at every level
and T where ``temporal_downsample`` says so. Convolutions are ordinary ("SAME")
3D convolutions: the discriminator sees whole clips and need not be causal.
``video [B, T, H, W, 3]`` in [-1, 1] -> ``logits float32 [B]``. The final dense layer
flattens, so the clip shape is part of the config (``frames``, ``height``, ``width``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmgen.errors import UserError
from mmgen.nn.conv import BlurPool3d, constrain_channels_last, conv3d, default_kernel_init
from mmgen.parallel.sharding import constrain

_CONV_NAMES = (None, None, None, "conv_in", "conv_out")


def discriminator_config(size: str = "B") -> ml_collections.ConfigDict:
    """Presets matching ``mmgen.tokenizers.video.model_config``'s sizes and clip shapes."""
    presets = {
        # frames, height, width, base_channels, channel_multipliers, temporal_downsample
        "tiny": (9, 32, 32, 16, (1, 2, 2), (True, True, True)),
        "B": (17, 128, 128, 64, (2, 4, 4, 4, 4), (True, True, True, True, True)),
        "L": (17, 128, 128, 128, (2, 4, 4, 4, 4), (True, True, True, True, True)),
    }
    if size not in presets:
        raise UserError(f"discriminator size {size!r} is unknown; choose one of {sorted(presets)}")
    frames, height, width, base, mults, temporal = presets[size]
    return ml_collections.ConfigDict(
        dict(
            frames=frames,
            height=height,
            width=width,
            in_channels=3,
            base_channels=base,
            channel_multipliers=mults,
            temporal_downsample=temporal,  # one entry per level: blur-pool time too?
            negative_slope=0.2,  # leaky ReLU (StyleGAN)
            blur_taps=(1.0, 3.0, 3.0, 1.0),
            dtype="float32",
            param_dtype="float32",
        )
    )


def _conv(features_in, features_out, kernel, *, use_bias=True, dtype, param_dtype, rngs):
    return nnx.Conv(
        features_in,
        features_out,
        (kernel,) * 3,
        padding="SAME",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(default_kernel_init, _CONV_NAMES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        conv_general_dilated=conv3d,
        rngs=rngs,
    )


class DiscriminatorBlock(nnx.Module):
    """Residual downsampling block: ``[B, T, H, W, C_in] -> [B, T', H/2, W/2, C_out]``."""

    def __init__(self, features_in: int, features_out: int, *, downsample_time: bool, negative_slope: float,
                 blur_taps, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(features_in, features_in, 3, **kw)
        self.conv2 = _conv(features_in, features_out, 3, **kw)
        self.skip = _conv(features_in, features_out, 1, use_bias=False, **kw)
        self.blur = BlurPool3d(blur_taps, downsample_time=downsample_time)
        self.negative_slope = negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        act = lambda v: constrain_channels_last(jax.nn.leaky_relu(v, self.negative_slope))
        h = act(self.conv1(x))
        h = act(self.conv2(self.blur(h)))
        return constrain_channels_last((h + self.skip(self.blur(x))) / math.sqrt(2.0))


class StyleGANDiscriminator3D(nnx.Module):
    """``video [B, T, H, W, 3]`` in [-1, 1] -> ``logits float32 [B]`` (real > 0 > fake)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if len(cfg.temporal_downsample) != len(cfg.channel_multipliers):
            raise UserError(
                f"discriminator temporal_downsample={tuple(cfg.temporal_downsample)} needs one entry per "
                f"level of channel_multipliers={tuple(cfg.channel_multipliers)}"
            )
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        kw = dict(dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        self.conv_in = _conv(cfg.in_channels, widths[0], 3, **kw)
        blocks = []
        t, h, w = cfg.frames, cfg.height, cfg.width
        width = widths[0]
        for level_width, temporal in zip(widths, cfg.temporal_downsample):
            blocks.append(
                DiscriminatorBlock(width, level_width, downsample_time=bool(temporal),
                                   negative_slope=cfg.negative_slope, blur_taps=cfg.blur_taps, **kw)
            )
            width = level_width
            t = -(-t // 2) if temporal else t
            h, w = -(-h // 2), -(-w // 2)
        self.blocks = nnx.List(blocks)
        self.conv_out = _conv(width, width, 3, **kw)
        self.dense = nnx.Linear(
            t * h * w * width, width, dtype=self.dtype, param_dtype=kw["param_dtype"], rngs=rngs,
            kernel_init=nnx.with_partitioning(default_kernel_init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
        )
        self.logit = nnx.Linear(
            width, 1, dtype=self.dtype, param_dtype=kw["param_dtype"], rngs=rngs,
            kernel_init=nnx.with_partitioning(default_kernel_init, ("mlp", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
        )

    def __call__(self, video: jax.Array) -> jax.Array:
        cfg = self.cfg
        expected = (cfg.frames, cfg.height, cfg.width, cfg.in_channels)
        if tuple(video.shape[1:]) != expected:
            raise UserError(
                f"discriminator was configured for clips [B, {', '.join(map(str, expected))}] "
                f"(config frames/height/width), got {tuple(video.shape)}"
            )
        act = lambda v: jax.nn.leaky_relu(v, cfg.negative_slope)
        # Activations stay split over the batch (the rules' "batch" axes) and the kernels
        # are gathered to them; the flattened features too, which the dense kernel
        # (named "embed" along them) would otherwise pull onto its own split.
        x = act(self.conv_in(constrain_channels_last(video.astype(self.dtype))))
        x = constrain_channels_last(x)
        for block in self.blocks:
            x = block(x)
        x = constrain_channels_last(act(self.conv_out(x)))
        x = constrain(act(self.dense(constrain(x.reshape(x.shape[0], -1), ("batch", None)))), ("batch", "mlp"))
        return self.logit(x)[:, 0].astype(jnp.float32)

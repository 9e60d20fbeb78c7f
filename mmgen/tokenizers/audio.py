"""SoundStream-style causal audio tokenizer, STFT discriminator and audio losses.

Follows Zeghidour et al. 2021 ("SoundStream: An End-to-End Neural Audio Codec") as
restated in docs/ALGORITHMS.md "Audio tokenizer"; padding of strided causal convs
as in EnCodec (Defossez et al. 2022).

``audio float32 [B, S]`` in [-1, 1] -> ``tokens int32 [B, T_a, levels]`` (RVQ) or
``[B, T_a]`` (LFQ/FSQ/VQ) -> ``audio [B, T_a * hop]`` in [-1, 1].

* Encoder: causal conv-in (kernel 7, ``C`` channels); per stride ``s`` in
  ``strides = (2, 4, 5, 8)`` an encoder block of three residual units (ELU, causal
  conv kernel 7 with dilation 1, 3, 9, ELU, 1x1 conv, skip) followed by ELU and a
  strided causal conv (kernel ``2s``, stride ``s``) to ``C * multiplier`` channels
  (SoundStream doubles per block: 2C, 4C, 8C, 16C); then ELU and a causal conv
  (kernel 3, SoundStream) to the quantizer's ``dim``.
* Quantizer: any of ``mmgen.tokenizers.quantizers`` chosen by ``cfg.quantizer.kind``:
  RVQ (SoundStream; EMA codebooks, quantizer dropout, ``num_levels_used`` at
  inference for a lower bitrate) by default, or LFQ.
* Decoder, the mirror: causal conv (kernel 7) to ``16C``, per stride in reverse
  order ELU + causal transposed conv (kernel ``2s``, stride ``s``) and three residual
  units, then ELU, causal conv (kernel 7) to one channel and ``tanh`` (or a clip).

Causality. Stride-1 convs use ``mmgen.nn.conv.CausalConv1d`` (front padding
``(k - 1) * dilation``). A strided conv here pads ``k - s`` at the front (EnCodec),
so output ``t`` sees inputs ``< (t + 1) s``: latent frame ``t`` depends on samples
``< (t + 1) * hop`` only, i.e. exactly the samples up to the end of its own hop.
(``CausalConv1d``'s ``k - 1`` front padding would make frame ``t`` stop at sample
``t * hop`` and leave the last ``hop - 1`` samples of every clip unencoded.) The
transposed conv keeps the first ``T s`` outputs of the full transposed convolution
(drops ``k - s`` at the end), so output sample ``n`` depends on latent frames
``<= n // hop`` only. On CPU the strided, dilated and transposed convolutions (codec
and discriminator) take ``mmgen.nn.conv``'s phase forms, the same sums computed as
stride-1 convolutions (``conv``, ``causal_conv_transpose1d``); elsewhere XLA's own.

Lengths and padding. ``hop = prod(strides)`` (320 -> 50 latent frames per second at
16 kHz). A clip of ``S`` samples is right-padded with zeros to a multiple of ``hop``,
giving ``T_a = ceil(S / hop)`` latent frames (``latent_shape``); ``decode`` returns
``T_a * hop`` samples and ``__call__`` crops its reconstruction back to ``S``.

Alignment with the video tokenizer (``audio_frames_for_video``):

* 17 frames at 8 fps = 2.125 s = 34000 samples at 16 kHz -> ceil(106.25) = 107 audio
  latent frames next to 5 video latent frames. (VideoPoet reports 106: it drops the
  last partial hop instead of padding it.)
* tiny demo data: 9 frames at 8 fps = 1.125 s = 18000 samples -> ceil(56.25) = 57
  audio latent frames next to 3 video latent frames.

Losses (``audio_reconstruction_loss``): multi-scale mel distance (SoundStream Eq. 2,
``mmgen.nn.spectral.multiscale_mel_distance``) + multi-resolution STFT loss
(Parallel WaveGAN) + optional waveform L1, weights in ``cfg.loss``. Adversarial part:
``STFTDiscriminator`` (2D convs on log-magnitude STFTs at several FFT sizes, as
EnCodec's MS-STFT discriminator, a SoundStream STFT discriminator per resolution)
returning logits and intermediate features, and ``feature_matching_loss``
(SoundStream Eq. 4).

Activations are constrained by logical name (``mmgen.nn.conv.constrain_channels_last``):
``("batch", "length", "channels")`` for waveforms and latents, ``("batch", "length",
None, "channels")`` for the discriminator's STFT images, so under FSDP the batch stays
split and the kernels are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen.errors import UserError
from mmgen.nn.backend import cpu_forms
from mmgen.nn.conv import CausalConv1d, causal_conv_transpose1d, constrain_channels_last, conv
from mmgen.nn.spectral import (
    magnitude,
    multiscale_mel_distance,
    multiscale_stft_loss,
    stft,
)
from mmgen.tokenizers.quantizers import (
    ResidualVectorQuantizer,
    build_quantizer,
    default_quantizer_config,
)

_CONV1D_NAMES = (None, "conv_in", "conv_out")
_CONV2D_NAMES = (None, None, "conv_in", "conv_out")
_BIAS_NAMES = ("conv_out",)


# --------------------------------------------------------------------------- configs


def model_config(size: str = "B") -> ml_collections.ConfigDict:
    """Audio tokenizer presets: ``tiny`` (CPU tests/demo) and ``B`` (SoundStream).

    Both keep strides (2, 4, 5, 8): hop 320, 50 latent frames per second at 16 kHz.
    B: SoundStream's C = 32 with channels 64/128/256/512, RVQ 4 levels x 1024 codes of
    dim 128 (VideoPoet's 4 x 1024). tiny: C = 4 (8/16/32/64), RVQ 4 x 256 of dim 16,
    smaller FFTs in the discriminator (``discriminator_config``). The config also carries
    the reconstruction-loss weights (``loss``) the trainer uses.
    """
    presets = {
        # channels, levels, codebook size, code dim
        "tiny": (4, 4, 256, 16),
        "B": (32, 4, 1024, 128),
    }
    if size not in presets:
        raise UserError(f"audio tokenizer size {size!r} is unknown; choose one of {sorted(presets)}")
    channels, levels, codes, code_dim = presets[size]
    quantizer = default_quantizer_config("rvq")
    quantizer.num_quantizers = levels
    quantizer.codebook_size = codes
    quantizer.code_dim = code_dim
    cfg = ml_collections.ConfigDict(
        dict(
            size=size,
            sample_rate=16000,
            channels=channels,  # C
            channel_multipliers=(2, 4, 8, 16),  # encoder block widths C * m (one per stride)
            strides=(2, 4, 5, 8),  # hop = prod = 320
            dilations=(1, 3, 9),  # the three residual units of a block
            kernel_size=7,  # conv-in, residual units, conv-out
            latent_kernel_size=3,  # encoder's last conv to quantizer.dim
            output_activation="tanh",  # or "clip"
            # The decoder's last conv starts this many times smaller than LeCun-normal, so the
            # first output is near silence instead of loud noise (docstring of Decoder).
            output_init_scale=0.01,
            dtype="float32",  # activations; "bfloat16" on accelerators
            param_dtype="float32",
            quantizer=quantizer,
        )
    )
    cfg.loss = ml_collections.ConfigDict(
        dict(
            sample_rate=cfg.get_ref("sample_rate"),
            mel_weight=1.0,
            mel_fft_sizes=(2048, 1024, 512, 256, 128, 64),  # SoundStream s = 2^11 .. 2^6
            n_mels=64,
            mel_linear_weight=1.0,  # linear-mel L1 inside the mel distance (SoundStream)
            mel_log_weight=1.0,  # log-mel L1 inside the mel distance
            stft_weight=1.0,
            stft_fft_sizes=(1024, 2048, 512),  # Parallel WaveGAN resolutions
            stft_hop_sizes=(120, 240, 50),
            stft_win_lengths=(600, 1200, 240),
            waveform_l1_weight=0.0,
        )
    )
    return cfg


def discriminator_config(size: str = "B") -> ml_collections.ConfigDict:
    """``STFTDiscriminator`` presets matching ``model_config``'s sizes (the config's top-level ``discriminator``).

    B: FFT sizes 2048/1024/512 with 32 channels; tiny: 512/256/128 with 8.
    """
    presets = {
        # fft sizes, channels
        "tiny": ((512, 256, 128), 8),
        "B": ((2048, 1024, 512), 32),
    }
    if size not in presets:
        raise UserError(f"audio discriminator size {size!r} is unknown; choose one of {sorted(presets)}")
    fft_sizes, channels = presets[size]
    return ml_collections.ConfigDict(
        dict(
            fft_sizes=fft_sizes,  # one 2D-conv discriminator per resolution
            hop_divisor=4,  # hop = n_fft // 4
            channels=channels,
            time_dilations=(1, 2, 4),  # one frequency-strided block per entry
            kernel_size=(3, 9),  # (time, frequency)
            negative_slope=0.2,  # LeakyReLU
            log_eps=1e-5,
            dtype="float32",
            param_dtype="float32",
        )
    )


# --------------------------------------------------------------------------- lengths


def audio_samples_for_video(frames: int, fps: float, sample_rate: int) -> int:
    """Samples of audio that last as long as ``frames`` video frames (rounded)."""
    return int(round(frames * sample_rate / fps))


def audio_frames_for_video(frames: int, fps: float, sample_rate: int = 16000, hop: int = 320) -> int:
    """Audio latent frames next to a ``frames``-frame video clip: ``ceil(samples / hop)``.

    17 frames at 8 fps (34000 samples) -> 107; 9 frames at 8 fps (18000 samples) -> 57.
    """
    return -(-audio_samples_for_video(frames, fps, sample_rate) // hop)


# --------------------------------------------------------------------------- layers


class _StridedCausalConv1d(nnx.Module):
    """Strided causal conv ``[B, S, C_in] -> [B, S / s, C_out]`` (``S`` a multiple of ``s``).

    Front padding ``k - s`` (EnCodec): output ``t`` sees inputs ``[t s + s - k, t s + s)``,
    the end of its own stride window and nothing later.
    """

    def __init__(self, features_in: int, features_out: int, kernel: int, stride: int, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        if kernel < stride:
            raise ValueError(f"strided causal conv kernel {kernel} < stride {stride}")
        self.front = kernel - stride
        self.conv = nnx.Conv(
            features_in, features_out, (kernel,), (stride,), padding=((self.front, 0),),
            dtype=dtype, param_dtype=param_dtype, conv_general_dilated=conv,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _CONV1D_NAMES),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), _BIAS_NAMES),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return constrain_channels_last(self.conv(x))


class _CausalConvTranspose1d(nnx.Module):
    """Causal transposed conv ``[B, T, C_in] -> [B, T s, C_out]`` (kernel ``k >= s``).

    The full transposed convolution has ``(T - 1) s + k`` outputs; keeping the first
    ``T s`` (dropping ``k - s`` at the end, EnCodec) makes output ``n`` depend on inputs
    ``<= n // s`` only.
    """

    def __init__(self, features_in: int, features_out: int, kernel: int, stride: int, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        if kernel < stride:
            raise ValueError(f"causal transposed conv kernel {kernel} < stride {stride}")
        self.stride = stride
        self.conv = nnx.ConvTranspose(
            features_in, features_out, (kernel,), (stride,), padding="VALID",
            dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _CONV1D_NAMES),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), _BIAS_NAMES),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if not cpu_forms("phases"):
            return constrain_channels_last(self.conv(x)[:, : x.shape[1] * self.stride])
        # On CPU the same sum as one stride-1 conv to stride x C_out channels (faster
        # forward and gradients: mmgen.nn.conv.causal_conv_transpose1d).
        dtype = self.conv.dtype or x.dtype
        y = causal_conv_transpose1d(x.astype(dtype), self.conv.kernel[...].astype(dtype), self.stride, impl="phases",
                                    precision=self.conv.precision)
        if self.conv.bias is not None:
            y = y + self.conv.bias[...].astype(dtype)
        return constrain_channels_last(y)


class ResidualUnit(nnx.Module):
    """``x + conv1x1(ELU(conv_k,d(ELU(x))))``, causal, ``[B, S, C] -> [B, S, C]``."""

    def __init__(self, channels: int, dilation: int, kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dilated = CausalConv1d(channels, channels, kernel, dilation=dilation, **kw)
        self.pointwise = CausalConv1d(channels, channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return constrain_channels_last(x + self.pointwise(jax.nn.elu(self.dilated(jax.nn.elu(x)))))


class EncoderBlock(nnx.Module):
    """Residual units (dilations 1, 3, 9) at ``C_in``, then ELU + strided conv to ``C_out``.

    ``[B, S, C_in] -> [B, S / stride, C_out]``.
    """

    def __init__(self, features_in: int, features_out: int, stride: int, dilations: Sequence[int],
                 kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.units = nnx.List([ResidualUnit(features_in, d, kernel, **kw) for d in dilations])
        self.down = _StridedCausalConv1d(features_in, features_out, 2 * stride, stride, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for unit in self.units:
            x = unit(x)
        return self.down(jax.nn.elu(x))


class DecoderBlock(nnx.Module):
    """ELU + causal transposed conv ``C_in -> C_out`` (x ``stride`` in time), then residual units.

    ``[B, T, C_in] -> [B, T * stride, C_out]``.
    """

    def __init__(self, features_in: int, features_out: int, stride: int, dilations: Sequence[int],
                 kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = _CausalConvTranspose1d(features_in, features_out, 2 * stride, stride, **kw)
        self.units = nnx.List([ResidualUnit(features_out, d, kernel, **kw) for d in dilations])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.up(jax.nn.elu(x))
        for unit in self.units:
            x = unit(x)
        return x


class Encoder(nnx.Module):
    """``[B, S, 1] -> [B, S / hop, dim]`` (``S`` a multiple of ``hop``)."""

    def __init__(self, cfg: ml_collections.ConfigDict, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [cfg.channels] + [cfg.channels * m for m in cfg.channel_multipliers]
        self.conv_in = CausalConv1d(1, widths[0], cfg.kernel_size, **kw)
        self.blocks = nnx.List([
            EncoderBlock(widths[i], widths[i + 1], s, cfg.dilations, cfg.kernel_size, **kw)
            for i, s in enumerate(cfg.strides)
        ])
        self.conv_out = CausalConv1d(widths[-1], dim, cfg.latent_kernel_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(jax.nn.elu(x))


class Decoder(nnx.Module):
    """``[B, T, dim] -> [B, T * hop, 1]`` (before the output activation).

    The last conv is initialised ``cfg.output_init_scale`` (0.01) times LeCun-normal.
    With the plain initialisation a fresh decoder emits broadband noise louder than the
    data (RMS 0.37 against 0.21 on moving_shapes_av), the spectral losses' quickest fix
    is to shrink it, and the codec stayed in that quiet state (output RMS 0.03, no pitch)
    for hundreds of steps in every variant tried (docs/RESULTS.md "Audio tokenizer");
    starting near silence, the C = 16 codec places the tone's pitch within 50 steps of
    one batch (C = 4 learns it too, more slowly).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [cfg.channels] + [cfg.channels * m for m in cfg.channel_multipliers]
        self.conv_in = CausalConv1d(dim, widths[-1], cfg.kernel_size, **kw)
        n = len(cfg.strides)
        self.blocks = nnx.List([
            DecoderBlock(widths[i + 1], widths[i], cfg.strides[i], cfg.dilations, cfg.kernel_size, **kw)
            for i in reversed(range(n))
        ])
        scale = float(cfg.get("output_init_scale", 1.0))
        out_init = nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")
        self.conv_out = CausalConv1d(widths[0], 1, cfg.kernel_size, kernel_init=out_init, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(jax.nn.elu(x))


# --------------------------------------------------------------------------- tokenizer


class AudioTokenizer(nnx.Module):
    """Causal SoundStream-style audio tokenizer: ``encode``, ``decode``, ``__call__``.

    Attributes:
      quantizer: the ``Quantizer`` ``cfg.quantizer`` builds (float32 maths).
      hop_length: samples per latent frame, ``prod(cfg.strides)``.
      frame_rate: latent frames per second, ``sample_rate / hop_length``.
      vocab_size: codes per token (per level for RVQ); num_levels: RVQ depth or 1.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if len(cfg.channel_multipliers) != len(cfg.strides):
            raise UserError(
                f"audio tokenizer channel_multipliers={tuple(cfg.channel_multipliers)} needs one entry per "
                f"stride in strides={tuple(cfg.strides)}"
            )
        if cfg.output_activation not in ("tanh", "clip"):
            raise UserError(f"audio tokenizer output_activation={cfg.output_activation!r}; use 'tanh' or 'clip'")
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.sample_rate = int(cfg.sample_rate)
        self.hop_length = int(np.prod(cfg.strides))
        self.quantizer = build_quantizer(cfg.quantizer, rngs=rngs)
        self.has_levels = isinstance(self.quantizer, ResidualVectorQuantizer)
        dim = self.quantizer.dim
        self.encoder = Encoder(cfg, dim, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dim, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ shapes

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    @property
    def num_levels(self) -> int:
        return self.quantizer.num_levels

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def num_latent_frames(self, num_samples: int) -> int:
        """``ceil(S / hop)``: the clip is right-padded with zeros to a multiple of ``hop``."""
        return -(-int(num_samples) // self.hop_length)

    def check_audio_shape(self, shape) -> None:
        if len(shape) != 2 or shape[1] < 1:
            raise UserError(f"audio tokenizer expects mono audio [B, S] with S >= 1, got shape {tuple(shape)}")

    def latent_shape(self, input_shape) -> tuple[int, ...]:
        """``(B, S) -> (B, ceil(S / hop))`` token shape (``+ (levels,)`` for RVQ)."""
        self.check_audio_shape(input_shape)
        b, s = input_shape
        shape = (b, self.num_latent_frames(s))
        return shape + ((self.num_levels,) if self.has_levels else ())

    # ------------------------------------------------------------------ model

    def encode_latent(self, audio: jax.Array) -> jax.Array:
        """``audio [B, S]`` -> continuous latent float32 ``[B, ceil(S / hop), dim]``."""
        self.check_audio_shape(audio.shape)
        pad = (-audio.shape[1]) % self.hop_length
        x = constrain_channels_last(jnp.pad(audio.astype(self.dtype), ((0, 0), (0, pad)))[..., None])
        return constrain_channels_last(self.encoder(x).astype(jnp.float32))

    def quantize(self, z: jax.Array, *, train: bool = False, step=None, num_levels_used: int | None = None):
        """``z [B, T, dim]`` -> ``(z_q float32, tokens int32, aux)``; ``num_levels_used`` for RVQ only."""
        return self.quantizer(z.astype(jnp.float32), train=train, step=step, **self._levels(num_levels_used))

    def _levels(self, num_levels_used: int | None) -> dict:
        if num_levels_used is None:
            return {}
        if not self.has_levels:
            raise UserError("num_levels_used applies to an RVQ audio tokenizer only")
        return {"num_levels_used": num_levels_used}

    def decode_latent(self, z_q: jax.Array) -> jax.Array:
        """Quantized latent ``[B, T, dim]`` -> audio float32 ``[B, T * hop]`` in [-1, 1]."""
        y = self.decoder(constrain_channels_last(z_q.astype(self.dtype)))[..., 0].astype(jnp.float32)
        return jnp.tanh(y) if self.cfg.output_activation == "tanh" else jnp.clip(y, -1.0, 1.0)

    def encode(self, audio: jax.Array, *, train: bool = False, step=None, num_levels_used: int | None = None):
        """``audio [B, S]`` -> ``(tokens int32 [B, T_a(, levels)], aux)``, ``T_a = ceil(S / hop)``."""
        self._levels(num_levels_used)  # a bad request fails before the encoder runs
        _, tokens, aux = self.quantize(self.encode_latent(audio), train=train, step=step,
                                       num_levels_used=num_levels_used)
        return tokens, aux

    def decode(self, tokens: jax.Array) -> jax.Array:
        """``tokens int32 [B, T_a(, n)]`` -> audio float32 ``[B, T_a * hop]`` in [-1, 1].

        RVQ tokens may carry fewer levels than the quantizer (a lower bitrate).
        """
        return self.decode_latent(self.quantizer.indices_to_codes(tokens))

    def __call__(self, audio: jax.Array, *, train: bool = False, step=None):
        """Training forward: ``audio [B, S] -> (recon [B, S], tokens, aux)``.

        ``aux["loss"]`` is the quantizer's loss; under quantizer dropout
        ``aux["levels_used"]`` is the RVQ depth this call used.
        """
        z_q, tokens, aux = self.quantize(self.encode_latent(audio), train=train, step=step)
        return self.decode_latent(z_q)[:, : audio.shape[1]], tokens, aux


# --------------------------------------------------------------------------- discriminator


class _STFTResolutionDiscriminator(nnx.Module):
    """2D conv discriminator on one log-magnitude STFT ``[B, frames, bins, 1]``.

    conv (3, 9); per time dilation ``d`` a conv (3, 9) with stride (1, 2) over
    frequency and dilation (d, 1) over time; conv (3, 3); conv (3, 3) to one logit.
    LeakyReLU after every conv but the last. Returns the logit map
    ``[B, frames', bins']`` and the activations after each hidden conv.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
        kt, kf = cfg.kernel_size
        c = cfg.channels

        def layer(cin, cout, kernel, strides=(1, 1), dilation=(1, 1)):
            return nnx.Conv(
                cin, cout, kernel, strides, padding="SAME", kernel_dilation=dilation,
                dtype=dtype, param_dtype=param_dtype, conv_general_dilated=conv,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _CONV2D_NAMES),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), _BIAS_NAMES),
                rngs=rngs,
            )

        layers = [layer(1, c, (kt, kf))]
        layers += [layer(c, c, (kt, kf), (1, 2), (d, 1)) for d in cfg.time_dilations]
        layers += [layer(c, c, (3, 3))]
        self.hidden = nnx.List(layers)
        self.to_logit = layer(c, 1, (3, 3))
        self.negative_slope = cfg.negative_slope

    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        features = []
        for layer in self.hidden:
            x = constrain_channels_last(jax.nn.leaky_relu(layer(x), self.negative_slope))
            features.append(x)
        return self.to_logit(x)[..., 0].astype(jnp.float32), features


class STFTDiscriminator(nnx.Module):
    """Multi-resolution STFT discriminator for waveforms ``[B, S]``.

    For each ``n_fft`` in ``cfg.fft_sizes`` (hop ``n_fft // hop_divisor``, Hann window
    ``n_fft``): ``log(|STFT| + eps)`` as a one-channel image ``[B, frames, n_fft/2 + 1]``
    goes through its own ``_STFTResolutionDiscriminator``.

    ``__call__(audio) -> (logits, features)``: ``logits[r]`` float32
    ``[B, 1 + S // hop_r, ceil((n_fft_r / 2 + 1) / 2^len(time_dilations))]``,
    ``features[r]`` the list of hidden activations of resolution ``r``.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.fft_sizes = tuple(int(n) for n in cfg.fft_sizes)
        self.resolutions = nnx.List([
            _STFTResolutionDiscriminator(cfg, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in self.fft_sizes
        ])

    def log_magnitude(self, audio: jax.Array, n_fft: int) -> jax.Array:
        """``audio [B, S]`` -> ``log(|STFT| + eps)`` float32 ``[B, 1 + S // hop, n_fft // 2 + 1]``."""
        spec = stft(audio.astype(jnp.float32), n_fft, n_fft // self.cfg.hop_divisor)
        return jnp.log(magnitude(spec) + self.cfg.log_eps)

    def __call__(self, audio: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        logits, features = [], []
        for n_fft, disc in zip(self.fft_sizes, self.resolutions):
            image = constrain_channels_last(self.log_magnitude(audio, n_fft)[..., None].astype(self.dtype))
            logit, feats = disc(image)
            logits.append(logit)
            features.append(feats)
        return logits, features


# --------------------------------------------------------------------------- losses


def feature_matching_loss(real_features, fake_features, *, relative: bool = False) -> jax.Array:
    """SoundStream Eq. 4: mean over discriminators k and layers l of ``mean |D_k^l(x) - D_k^l(G(x))|``.

    ``real_features`` / ``fake_features``: nested lists (resolution, layer) of arrays of
    matching shapes; the real side is a stop-gradient target. ``relative=True`` divides
    each layer's L1 by ``mean |D_k^l(x)|`` (EnCodec's normalisation). Float32 scalar.
    """
    terms = []
    for real_layers, fake_layers in zip(real_features, fake_features, strict=True):
        for real, fake in zip(real_layers, fake_layers, strict=True):
            real = jax.lax.stop_gradient(real.astype(jnp.float32))
            l1 = jnp.mean(jnp.abs(real - fake.astype(jnp.float32)))
            if relative:
                l1 = l1 / (jnp.mean(jnp.abs(real)) + 1e-8)
            terms.append(l1)
    if not terms:
        raise ValueError("feature_matching_loss got no features")
    return jnp.mean(jnp.stack(terms))


def audio_reconstruction_loss(x: jax.Array, y: jax.Array, cfg: ml_collections.ConfigDict):
    """Weighted spectral (+ waveform) reconstruction loss of ``y`` against reference ``x``.

    ``loss = mel_weight * multiscale_mel_distance + stft_weight * multiscale_stft_loss
    + waveform_l1_weight * mean |x - y|`` with the sizes in ``cfg`` (the ``loss`` part
    of ``model_config``). ``x, y: float [B, S]``. Returns ``(loss, parts)``: float32
    scalar and a dict of the unweighted terms for logging.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"reconstruction {y.shape} and reference {x.shape} differ in shape")
    parts = {}
    loss = jnp.zeros((), jnp.float32)
    if cfg.mel_weight:
        parts["mel_loss"] = multiscale_mel_distance(
            x, y, int(cfg.sample_rate), fft_sizes=tuple(cfg.mel_fft_sizes), n_mels=cfg.n_mels,
            linear_weight=cfg.mel_linear_weight, log_weight=cfg.mel_log_weight,
        )
        loss = loss + cfg.mel_weight * parts["mel_loss"]
    if cfg.stft_weight:
        parts["stft_loss"] = multiscale_stft_loss(
            x, y, tuple(cfg.stft_fft_sizes), tuple(cfg.stft_hop_sizes), tuple(cfg.stft_win_lengths)
        )
        loss = loss + cfg.stft_weight * parts["stft_loss"]
    if cfg.waveform_l1_weight:
        parts["waveform_l1"] = jnp.mean(jnp.abs(x - y))
        loss = loss + cfg.waveform_l1_weight * parts["waveform_l1"]
    return loss, parts

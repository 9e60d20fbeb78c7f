"""Convolution layers shared by the video and audio tokenizers (channels-last).

* ``CausalConv3d`` / ``CausalConv1d``: MAGVIT-v2's causal convolution. The time axis is
  padded by ``(k_t - 1) * dilation`` frames at the front only, so output frame ``t``
  sees input frames ``<= t`` and frame 0 is computed on its own (an image is a
  1-frame video). Spatial axes use "SAME" padding (total ``max(k - s, 0)``), so a
  size divisible by the stride is divided exactly. With stride ``s_t`` in time,
  ``T = 1 + s_t * n`` frames become ``1 + n``.
* ``GroupNorm``: statistics per sample *and per frame* (over the spatial axes and the
  channels of a group), never over time, which would leak future frames into the
  past and break causality. Computed in float32.
* ``DepthToSpace3d``: MAGVIT-v2 decoder upsampling: a causal conv to
  ``C * f_t * f_h * f_w`` channels, rearranged into time and space; the first
  ``f_t - 1`` frames are dropped so ``1 + n`` latent frames become ``1 + f_t * n``
  (5 -> 9 -> 17).
* ``BlurPool3d``: StyleGAN's anti-aliased downsampling (binomial ``[1, 3, 3, 1]``
  low-pass, then stride 2) for the discriminator; a fixed filter, no parameters.
* CPU kernel forms (``impl="auto"`` asks ``mmgen.nn.backend.cpu_forms``; GPU/TPU keep
  XLA's op): ``conv3d`` by mmgen's hand-written kernels (``mmgen.nn.cpu_kernels``), or
  where they do not apply as per-tap 2D convs (weight gradient summed over batch chunks
  for small frames), ``conv`` / ``causal_conv_transpose1d`` (strided, dilated and
  transposed convs as stride-1 convs of a rearranged input), the blur-pool as strided
  slices. Each gives the same values and gradients as XLA's op (tests/test_conv.py).

Kernels carry logical names ``(None, ..., "conv_in", "conv_out")``, biases
``("conv_out",)``, norm scales/biases ``("norm",)``. Activations are constrained by
name too (``constrain_channels_last``): ``("batch", "length", None, None, "channels")``
for ``[B, T, H, W, C]``, ``("batch", "length", "channels")`` for ``[B, S, C]``. With the
default rules the batch takes ``data`` x ``fsdp`` and the channels stay whole: under
FSDP every convolution gathers its kernel (split over ``fsdp`` along ``conv_out``) to
the batch-split activations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.nn import cpu_kernels
from mmgen.nn.backend import cpu_forms
from mmgen.parallel.sharding import batch_split, constrain, logical_param

_TEMPORAL_PADDING = ("constant", "edge")
# LeCun scaling with an untruncated normal: same variance as flax's default, and far
# cheaper to compile than truncated_normal's inverse-erf (one compile per kernel shape).
default_kernel_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def channels_last_names(ndim: int) -> tuple[str | None, ...]:
    """Logical names of a channels-last activation ``[B, T, (space...), C]`` with ``ndim`` axes."""
    if ndim < 3:
        raise ValueError(f"a channels-last activation has at least 3 axes [B, T, C], got {ndim}")
    return ("batch", "length") + (None,) * (ndim - 3) + ("channels",)


def constrain_channels_last(x: jax.Array) -> jax.Array:
    """``x [B, T, ..., C]`` laid out by ``channels_last_names`` (a no-op without a mesh in context)."""
    return constrain(x, channels_last_names(x.ndim))


# --------------------------------------------------------------------------- strided / dilated convs
CONV_IMPLS = ("auto", "xla", "phases", "kernel")


def _channels_last_numbers(ndim: int) -> tuple[str, str, str] | None:
    """``("NWC", "WIO", "NWC")`` and its 2D/3D versions; None beyond 3 spatial axes."""
    space = {3: "W", 4: "HW", 5: "DHW"}.get(ndim)
    return None if space is None else ("N" + space + "C", space + "IO", "N" + space + "C")


def _phase_conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], dilations: tuple[int, ...],
                precision, keep_dilation: bool = False) -> jax.Array:
    """``VALID`` conv of a padded channels-last ``x [N, *S, C]`` with ``w [*K, C, O]``, done
    as one stride-1, undilated convolution (see ``conv``); each axis has a stride or a
    dilation, not both. ``keep_dilation``: rewrite the strides only and leave the
    dilation to XLA's stride-1 convolution."""
    n_space = x.ndim - 2
    for a, d in enumerate(dilations):
        if d == 1 or keep_dilation:
            continue
        # Dilation d: output o = d j + r reads x[d (j + k) + r], i.e. phase r of x
        # convolved with the undilated kernel. The d phases go into the batch.
        length, taps = x.shape[1 + a], w.shape[a]
        out_len = length - d * (taps - 1)
        padded = -(-length // d) * d
        x = jnp.pad(x, [(0, 0)] * (1 + a) + [(0, padded - length)] + [(0, 0)] * (n_space - a))
        shape = x.shape
        x = x.reshape(shape[: 1 + a] + (padded // d, d) + shape[2 + a :])
        x = jnp.moveaxis(x, 2 + a, 1).reshape((shape[0] * d,) + shape[1 : 1 + a] + (padded // d,) + shape[2 + a :])
        y = _phase_conv(x, w, strides, dilations[:a] + (1,) + dilations[a + 1 :], precision)
        y = jnp.moveaxis(y.reshape((shape[0], d) + y.shape[1:]), 1, 2 + a)
        y = y.reshape(y.shape[: 1 + a] + (y.shape[1 + a] * d,) + y.shape[3 + a :])
        return jax.lax.slice_in_dim(y, 0, out_len, axis=1 + a)
    if any(s != 1 for s in strides):
        # Stride s: output o reads x[s (o + q) + r] w[s q + r], so with x's axis split
        # into (L / s, s) and the s phases merged into the channels (space-to-depth), it
        # is a stride-1 conv with ceil(K / s) taps of s * C channels (zero taps appended).
        n, c_in, c_out = x.shape[0], x.shape[-1], w.shape[-1]
        x_shape, w_shape = [n], []
        for a, s in enumerate(strides):
            length, taps = x.shape[1 + a], w.shape[a]
            q = -(-taps // s)
            out_len = (length - taps) // s + 1
            new_len = s * (out_len - 1 + q)
            x = jax.lax.slice_in_dim(x, 0, min(length, new_len), axis=1 + a)
            x = jnp.pad(x, [(0, 0)] * (1 + a) + [(0, max(new_len - length, 0))] + [(0, 0)] * (n_space - a))
            w = jnp.pad(w, [(0, 0)] * a + [(0, s * q - taps)] + [(0, 0)] * (n_space + 1 - a))
            x_shape += [new_len // s, s]
            w_shape += [q, s]
        x = x.reshape(x_shape + [c_in])
        w = w.reshape(w_shape + [c_in, c_out])
        # Move every phase axis next to the channels, then merge them.
        x = jnp.transpose(x, [0] + [1 + 2 * a for a in range(n_space)] + [2 + 2 * a for a in range(n_space)]
                          + [1 + 2 * n_space])
        w = jnp.transpose(w, [2 * a for a in range(n_space)] + [1 + 2 * a for a in range(n_space)]
                          + [2 * n_space, 2 * n_space + 1])
        phases = int(np.prod(strides))
        x = x.reshape(x.shape[: 1 + n_space] + (phases * c_in,))
        w = w.reshape(w.shape[:n_space] + (phases * c_in, c_out))
    return jax.lax.conv_general_dilated(x, w, (1,) * n_space, "VALID", precision=precision,
                                        rhs_dilation=dilations if keep_dilation else None,
                                        dimension_numbers=_channels_last_numbers(x.ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dilated_phase_conv(x, w, strides, dilations, precision):
    """``_phase_conv`` of a dilated conv, with the weight gradient of the ``keep_dilation``
    form: XLA:CPU's weight-gradient convolution of the space-to-batch form ran up to 7x
    slower than that of the dilated stride-1 convolution (BENCHMARKS.md), while its
    forward and input gradient ran up to 2x faster."""
    return _phase_conv(x, w, strides, dilations, precision)


def _dilated_phase_conv_fwd(x, w, strides, dilations, precision):
    return _phase_conv(x, w, strides, dilations, precision), (x, w)


def _dilated_phase_conv_bwd(strides, dilations, precision, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda v: _phase_conv(v, w, strides, dilations, precision), x)[1](dy)[0]
    dw = jax.vjp(lambda v: _phase_conv(x, v, strides, dilations, precision, keep_dilation=True), w)[1](dy)[0]
    return dx, dw


_dilated_phase_conv.defvjp(_dilated_phase_conv_fwd, _dilated_phase_conv_bwd)


def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
         feature_group_count=1, precision=None, *, impl="auto", **kwargs):
    """Channels-last strided or dilated convolution, a drop-in ``lax.conv_general_dilated``.

    ``impl="phases"`` computes a stride-``s`` or dilation-``d`` convolution as one
    stride-1, undilated ``VALID`` convolution of a rearranged input (after the padding):

    * dilation ``d`` along an axis (space-to-batch): ``y[d j + r] = sum_k x[d (j + k) + r] w[k]``,
      so the ``d`` phases ``x[d m + r]`` are convolved with the undilated kernel as
      ``d`` times the batch and interleaved again;
    * stride ``s`` along an axis (space-to-depth): ``y[o] = sum_{q, r} x[s (o + q) + r] w[s q + r]``,
      so ``x``'s axis split into ``(L / s, s)`` with the ``s`` phases moved into the
      channels is convolved (stride 1) with ``ceil(K / s)`` taps of ``s * C_in`` channels
      (the kernel padded with zero taps to ``s * ceil(K / s)``).

    The same sums in another order. XLA:CPU hands stride-1 convolutions and their
    input gradients (a stride-1 conv of the padded cotangent) to its fast kernels, but
    runs the input gradient of a strided conv (a conv with ``lhs_dilation``) and dilated
    convs in a generic loop at a fraction of the rate (BENCHMARKS.md), so ``"auto"``
    takes ``"phases"`` on CPU and XLA's op elsewhere. Calls with ``lhs_dilation``,
    feature groups, an axis both strided and dilated, or a layout other than
    channels-last always go to XLA.

    ``impl="kernel"``: mmgen's CPU kernels (``mmgen.nn.cpu_kernels``) on the call as a 3D
    convolution with unit leading axes: the forward, the weight gradient and (stride 1)
    the input gradient; a strided convolution's input gradient is the phases form's.
    ``"auto"`` takes it on CPU for float32, ungrouped calls of a batch on one device with
    the kernels built, unless ``without_cpu_forms("conv_kernels")``; ``"phases"``
    otherwise.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl={impl!r}; expected one of {CONV_IMPLS}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    n_space = lhs.ndim - 2
    strides = tuple(int(s) for s in window_strides)
    dilations = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1,) * n_space
    channels_last = _channels_last_numbers(lhs.ndim) if 1 <= n_space <= 3 else None
    unsupported = (channels_last is None or kwargs or feature_group_count != 1
                   or any(d != 1 for d in (lhs_dilation or ()))
                   or any(s != 1 and d != 1 for s, d in zip(strides, dilations))
                   or (dimension_numbers is not None
                       and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                       != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, channels_last)))
    # Asked only where the kernels could run (so a GPU or TPU host never builds them).
    wanted = impl == "kernel" or (impl == "auto" and cpu_forms("conv_kernels"))
    kernels = wanted and not unsupported and _kernels_apply(lhs, rhs, padding, feature_group_count)
    if impl == "auto":
        impl = "kernel" if kernels else "phases" if cpu_forms("phases") else "xla"
    if impl == "kernel":
        if not kernels:
            raise ValueError("conv impl='kernel' takes float32, ungrouped, channels-last convolutions (no axis both "
                             "strided and dilated, no lhs_dilation) of a batch on one device, with mmgen's CPU "
                             "kernels built (mmgen.nn.cpu_kernels.available())")
        if isinstance(padding, str):
            dilated_kernel = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:n_space], dilations))
            padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], dilated_kernel, strides, padding)
        # As a 3D convolution with unit leading axes.
        unit = 3 - n_space
        x5 = lhs.reshape(lhs.shape[:1] + (1,) * unit + lhs.shape[1:])
        w5 = rhs.reshape((1,) * unit + rhs.shape)
        pads = ((0, 0),) * unit + tuple(tuple(int(p) for p in pair) for pair in padding)
        y = _kernel_conv(x5, w5, (1,) * unit + strides, (1,) * unit + dilations, pads, precision, n_space)
        return y.reshape(y.shape[:1] + y.shape[1 + unit :])
    if (impl == "xla" or unsupported or all(s == 1 for s in strides) and all(d == 1 for d in dilations)):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation,
                                            dimension_numbers=dimension_numbers or channels_last,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        dilated_kernel = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:n_space], dilations))
        padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], dilated_kernel, strides, padding)
    if any(p < 0 for pair in padding for p in pair):
        return conv(lhs, rhs, window_strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                    precision=precision, impl="xla")
    x = jnp.pad(lhs, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
    if any(d != 1 for d in dilations):
        return _dilated_phase_conv(x, rhs, strides, dilations, precision)
    return _phase_conv(x, rhs, strides, dilations, precision)


def causal_conv_transpose1d(x: jax.Array, kernel: jax.Array, stride: int, *, impl: str = "auto",
                            precision=None) -> jax.Array:
    """The first ``T s`` outputs of the full transposed convolution (``padding="VALID"``,
    kernel not flipped, as ``nnx.ConvTranspose``): ``x [B, T, C_in]``, ``kernel [K, C_in, C_out]``
    (``K >= s``) -> ``[B, T s, C_out]``; output ``n`` depends on inputs ``<= n // s``.

    ``y[s j + r] = sum_q x[j - q] kernel[K - 1 - r - s q]``: ``impl="phases"`` computes all
    ``s`` phases ``r`` as one causal stride-1 convolution of ``x`` with ``ceil(K / s)`` taps
    and ``s * C_out`` output channels, then moves the phases into time (depth-to-space),
    so forward, input and weight gradient are stride-1 convolutions. ``"xla"`` is
    ``lax.conv_transpose`` (a convolution with ``lhs_dilation``, which XLA:CPU runs in a
    generic loop, its weight gradient at 2-3 GFLOP/s: BENCHMARKS.md); ``"auto"`` takes
    ``"phases"`` on CPU, its stride-1 convolution by ``conv``'s ``"auto"`` (the CPU
    kernels where they apply). ``"kernel"``: the phases form with the CPU kernels' stride-1
    convolution; ``"phases"``: with XLA's.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"causal_conv_transpose1d impl={impl!r}; expected one of {CONV_IMPLS}")
    taps, c_in, c_out = kernel.shape
    if taps < stride:
        raise ValueError(f"causal transposed conv kernel {taps} < stride {stride}")
    # The phases form's stride-1 convolution: XLA's for "phases", the CPU kernel's for
    # "kernel", whichever conv's "auto" takes for "auto".
    inner = {"phases": "xla", "kernel": "kernel"}.get(impl, "auto")
    if impl == "auto":
        impl = "phases" if cpu_forms("phases") else "xla"
    b, t, _ = x.shape
    if impl == "xla":
        y = jax.lax.conv_transpose(x, kernel, (stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
                                   precision=precision)
        return y[:, : t * stride]
    q = -(-taps // stride)
    # w_pad[s p + u] = kernel[s p + u - (s q - K)]; phase r takes u = s - 1 - r.
    w = jnp.pad(kernel, ((stride * q - taps, 0), (0, 0), (0, 0))).reshape(q, stride, c_in, c_out)[:, ::-1]
    w = jnp.transpose(w, (0, 2, 1, 3)).reshape(q, c_in, stride * c_out)
    y = conv(x, w, (1,), ((q - 1, 0),), dimension_numbers=("NWC", "WIO", "NWC"), precision=precision, impl=inner)
    return y.reshape(b, t * stride, c_out)


WEIGHT_GRAD_CHUNK = 4  # samples per weight-gradient convolution (at least; at most 16 chunks)
# taps_chunked chunks the weight gradient of frames up to this many pixels (16 x 16: measured
# 1.3-2.2x faster there, while 32 x 32 frames ran 1.5-2x slower chunked; BENCHMARKS.md).
WEIGHT_GRAD_CHUNK_MAX_PIXELS = 256


def _conv2d_nhwc(x, w, strides, padding, groups, precision):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def chunked_conv2d(x, w, strides, padding, groups=1, precision=None):
    """``NHWC`` / ``HWIO`` 2D convolution whose weight gradient is summed over chunks of the batch.

    ``dw = sum_c dw(x[c], dy[c])`` over chunks ``c`` of ``max(WEIGHT_GRAD_CHUNK, ceil(N / 16))``
    samples, each XLA's weight-gradient convolution; values and the input gradient are
    XLA's. XLA:CPU's weight-gradient convolution can slow down far more than linearly
    with the batch: for 40 frames of 16 x 16 the chunked sum was 2.2x faster, for a
    pre-padded 72 x 34 x 34 batch 10x; for 72 frames of 32 x 32 (padding inside the
    conv) it was 1.5x slower (BENCHMARKS.md). ``padding``: explicit pairs.
    """
    return _conv2d_nhwc(x, w, strides, padding, groups, precision)


def _chunked_conv2d_fwd(x, w, strides, padding, groups, precision):
    return _conv2d_nhwc(x, w, strides, padding, groups, precision), (x, w)


def _chunked_conv2d_bwd(strides, padding, groups, precision, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda v: _conv2d_nhwc(v, w, strides, padding, groups, precision), x)[1](dy)[0]
    n = x.shape[0]
    chunk = max(WEIGHT_GRAD_CHUNK, -(-n // 16))
    dw = None
    for start in range(0, n, chunk):
        xc, dyc = x[start : start + chunk], dy[start : start + chunk]
        part = jax.vjp(lambda v, xc=xc: _conv2d_nhwc(xc, v, strides, padding, groups, precision), w)[1](dyc)[0]
        dw = part if dw is None else dw + part
    return dx, dw


chunked_conv2d.defvjp(_chunked_conv2d_fwd, _chunked_conv2d_bwd)


# --------------------------------------------------------------------------- 3D conv
CONV3D_IMPLS = ("auto", "xla", "taps", "taps_chunked", "kernel", "taps_phases", "stacked")
_CHANNELS_LAST_3D = ("NDHWC", "DHWIO", "NDHWC")


def conv3d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
           feature_group_count=1, precision=None, *, impl="auto", **kwargs):
    """Channels-last 3D convolution, a drop-in ``lax.conv_general_dilated`` for ``nnx.Conv``.

    ``impl="taps"`` computes it as one 2D convolution per temporal tap over the frames
    the tap reads (``sum_dt conv2d(x[:, dt::s_t], k[dt])``), the same sum in a
    different order. XLA:CPU runs 3D convolutions several times slower than 2D ones
    (measured 4.4x for a 3x3x3 16->16 conv on 9x32x32 clips, fwd+bwd: BENCHMARKS.md),
    so ``"auto"`` takes the taps form on CPU and leaves GPU/TPU (cuDNN / the TPU
    convolution unit) to XLA's 3D convolution (``"xla"``). ``impl="taps_chunked"`` is
    taps through ``chunked_conv2d`` (XLA's forward and input gradient, the weight gradient
    summed over chunks of the batch) for frames of at most ``WEIGHT_GRAD_CHUNK_MAX_PIXELS``
    pixels whose batch is not split over devices (``batch_split() == 1``), plain taps
    otherwise; ``"auto"`` takes it on CPU unless
    ``without_cpu_forms("chunked_weight_grad")``. ``impl="taps_phases"`` does
    the taps with each spatially strided 2D convolution computed by
    ``conv(impl="phases")``; ``impl="stacked"`` as one 2D convolution of the taps' frames
    stacked along the channels (kernel ``[k_h, k_w, k_t C_in, C_out]``). Neither beat
    plain taps at the tiny video tokenizer's shapes (BENCHMARKS.md), so ``"auto"`` takes
    neither. Dilated or non channels-last calls always go to XLA.

    ``impl="kernel"``: the convolution, its weight gradient and (stride 1) its input
    gradient by mmgen's CPU kernels (``mmgen.nn.cpu_kernels``, 2-9x XLA's rate at the video
    tokenizer's shapes: BENCHMARKS.md "Hand-written CPU kernels"); a strided convolution's input
    gradient is the taps form's. ``"auto"`` takes it on CPU for float32, ungrouped
    convolutions of a batch on one device when the kernels are built, unless
    ``without_cpu_forms("conv_kernels")``, and ``"taps_chunked"`` otherwise.
    """
    if impl not in CONV3D_IMPLS:
        raise ValueError(f"conv3d impl={impl!r}; expected one of {CONV3D_IMPLS}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    xla = functools.partial(jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers or _CHANNELS_LAST_3D,
                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    if impl == "auto":
        if not cpu_forms():
            impl = "xla"
        elif cpu_forms("conv_kernels") and _kernels_apply(lhs, rhs, padding, feature_group_count):
            impl = "kernel"
        else:
            impl = "taps_chunked" if cpu_forms("chunked_weight_grad") else "taps"
    channels_last = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST_3D)
    dilated = any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
    if (impl == "xla" or lhs.ndim != 5 or dilated or kwargs
            or (dimension_numbers is not None and
                jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != channels_last)):
        return xla()
    if impl == "kernel" and not _kernels_apply(lhs, rhs, padding, feature_group_count):
        raise ValueError("conv3d impl='kernel' takes float32, ungrouped convolutions with no negative padding of "
                         "a batch on one device, with mmgen's CPU kernels built (mmgen.nn.cpu_kernels.available())")
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
    if impl == "kernel":
        return _kernel_conv(lhs, rhs, tuple(window_strides), (1, 1, 1), tuple(tuple(p) for p in padding),
                            precision, 3)
    (t_front, t_back), spatial_padding = padding[0], tuple(tuple(p) for p in padding[1:])
    x = jnp.pad(lhs, ((0, 0), (t_front, t_back), (0, 0), (0, 0), (0, 0)))
    if impl == "stacked" and feature_group_count == 1:
        # One 2D conv over the taps' frames stacked along the channels: kernel
        # [k_h, k_w, (k_t, C_in), C_out].
        b, t, h, w, c = x.shape
        taps, stride_t = rhs.shape[0], window_strides[0]
        frames_out = (t - taps) // stride_t + 1
        tap_frames = [x[:, dt : dt + stride_t * (frames_out - 1) + 1 : stride_t].reshape(b * frames_out, h, w, c)
                      for dt in range(taps)]
        kernel = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(rhs.shape[1], rhs.shape[2], taps * c, rhs.shape[4])
        out = conv(jnp.concatenate(tap_frames, axis=-1), kernel, tuple(window_strides[1:]), spatial_padding,
                   dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision, impl="xla")
        return out.reshape((b, frames_out) + out.shape[1:])
    # A batch split over devices is not chunked: each chunk would be a slice across the
    # split, moved between devices (an 8-device step of the tiny tokenizer compiled in 15-33 s
    # instead of ~5 s: BENCHMARKS.md "Chunks of a batch split over devices").
    chunked = (impl == "taps_chunked" and x.shape[2] * x.shape[3] <= WEIGHT_GRAD_CHUNK_MAX_PIXELS
               and batch_split() == 1)
    form = "phases" if impl == "taps_phases" else "chunked" if chunked else "plain"
    return _taps(x, rhs, tuple(window_strides), spatial_padding, feature_group_count, precision, form)


def _taps(x, rhs, window_strides, spatial_padding, groups, precision, form):
    """``sum_dt conv2d(x[:, dt::s_t], rhs[dt])`` over the temporal taps of a time-padded
    ``x [B, T, H, W, C]``; each 2D conv plain (``_conv2d_nhwc``), ``"chunked"``
    (``chunked_conv2d``) or ``"phases"`` (``conv(impl="phases")``)."""
    b, t, h, w, c = x.shape
    taps, stride_t = rhs.shape[0], window_strides[0]
    frames_out = (t - taps) // stride_t + 1
    out = None
    for dt in range(taps):
        frames = x[:, dt : dt + stride_t * (frames_out - 1) + 1 : stride_t].reshape(b * frames_out, h, w, c)
        if form == "phases":
            y = conv(frames, rhs[dt], window_strides[1:], spatial_padding,
                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                     precision=precision, impl="phases")
        elif form == "chunked":
            y = chunked_conv2d(frames, rhs[dt], window_strides[1:], spatial_padding, groups, precision)
        else:
            y = _conv2d_nhwc(frames, rhs[dt], window_strides[1:], spatial_padding, groups, precision)
        out = y if out is None else out + y
    return out.reshape((b, frames_out) + out.shape[1:])


def _kernels_take(*arrays) -> bool:
    """mmgen's CPU kernels take float32 operands of a batch on one device (a kernel is one
    opaque call, which the partitioner cannot split), once they are built."""
    return all(a.dtype == jnp.float32 for a in arrays) and batch_split() == 1 and cpu_kernels.available()


def _kernels_apply(lhs, rhs, padding, groups) -> bool:
    """The convolution kernels take ungrouped convolutions with no negative padding (and
    what ``_kernels_take`` asks of every kernel)."""
    return (groups == 1 and (isinstance(padding, str) or all(p >= 0 for pair in padding for p in pair))
            and _kernels_take(lhs, rhs))


def _kernel_input_grad(dy, rhs, dilations, padding):
    """The input gradient of a stride-1 convolution with ``dilations`` and ``padding`` (a pair
    per axis): the kernel's convolution of ``dy`` padded by ``(K - 1) d - low`` in front and
    ``(K - 1) d - high`` behind (negative: cropped), with the kernel flipped in space-time and
    its channels swapped. Only the unpadded input's positions are computed."""
    widths = tuple(((k - 1) * d - lo, (k - 1) * d - hi) for k, d, (lo, hi) in zip(rhs.shape[:3], dilations, padding))
    return cpu_kernels.conv(dy, jnp.swapaxes(rhs[::-1, ::-1, ::-1], 3, 4), dilations=dilations, padding=widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _kernel_conv(lhs, rhs, strides, dilations, padding, precision, n_space):
    """The channels-last convolution of ``lhs [N, T, H, W, C]`` with ``padding`` (three pairs)
    by ``cpu_kernels.conv``, its weight gradient by ``cpu_kernels.conv_weight_grad``, and its
    input gradient by ``cpu_kernels.conv`` of the output gradient where every stride is 1.
    A strided convolution's input gradient (the kernel's form would multiply zeros) is the
    taps form's for a 3D convolution (``n_space`` 3), the phases form's for a 1D or 2D one
    (given as 3D with unit leading axes). The padding is never written out."""
    return cpu_kernels.conv(lhs, rhs, strides, dilations, padding)


def _kernel_conv_fwd(lhs, rhs, strides, dilations, padding, precision, n_space):
    return cpu_kernels.conv(lhs, rhs, strides, dilations, padding), (lhs, rhs)


def _kernel_conv_bwd(strides, dilations, padding, precision, n_space, residuals, dy):
    lhs, rhs = residuals
    dw = cpu_kernels.conv_weight_grad(lhs, dy, rhs.shape[:3], strides, dilations, padding)
    if all(s == 1 for s in strides):
        return _kernel_input_grad(dy, rhs, dilations, padding), dw
    if n_space == 3:
        def strided(v):
            time_padded = jnp.pad(v, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
            return _taps(time_padded, rhs, strides, padding[1:], 1, precision, "plain")
    else:
        def strided(v):
            keep = slice(3 - n_space, 3)
            y = conv(v.reshape(v.shape[:1] + v.shape[4 - n_space :]), rhs.reshape(rhs.shape[3 - n_space :]),
                     strides[keep], padding[keep], rhs_dilation=dilations[keep], precision=precision, impl="phases")
            return y.reshape(dy.shape)
    return jax.vjp(strided, lhs)[1](dy)[0], dw


_kernel_conv.defvjp(_kernel_conv_fwd, _kernel_conv_bwd)


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected 3 values (time, height, width), got {value}")
    return value


def _same_padding(kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """'SAME' padding: a size divisible by ``stride`` is divided exactly."""
    total = max((kernel - 1) * dilation + 1 - stride, 0)
    return (total // 2, total - total // 2)


def _pad_time_front(x: jax.Array, frames: int, mode: str, axis: int = 1) -> jax.Array:
    if frames == 0:
        return x
    if mode not in _TEMPORAL_PADDING:
        raise ValueError(f"temporal_padding={mode!r}; expected one of {_TEMPORAL_PADDING}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (frames, 0)
    return jnp.pad(x, widths, mode=mode)


class CausalConv3d(nnx.Module):
    """Causal 3D convolution: ``[B, T, H, W, C_in] -> [B, T', H', W', C_out]``.

    ``T' = (T - 1) // s_t + 1``, ``H' = ceil(H / s_h)``, ``W' = ceil(W / s_w)``.
    ``temporal_padding``: ``"constant"`` (zeros, MAGVIT-v2) or ``"edge"`` (repeat frame 0).
    """

    def __init__(
        self,
        features_in: int,
        features_out: int,
        kernel: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        *,
        use_bias: bool = True,
        temporal_padding: str = "constant",
        kernel_init=default_kernel_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if temporal_padding not in _TEMPORAL_PADDING:
            raise ValueError(f"temporal_padding={temporal_padding!r}; expected one of {_TEMPORAL_PADDING}")
        self.kernel_size = _triple(kernel)
        self.stride = _triple(stride)
        self.temporal_padding = temporal_padding
        kt, kh, kw = self.kernel_size
        _, sh, sw = self.stride
        # Zero temporal padding is the convolution's own (the CPU kernels never write it out);
        # "edge" padding repeats frame 0 before the convolution.
        front = kt - 1 if temporal_padding == "constant" else 0
        self.conv = nnx.Conv(
            features_in,
            features_out,
            self.kernel_size,
            self.stride,
            padding=((front, 0), _same_padding(kh, sh), _same_padding(kw, sw)),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(kernel_init, (None, None, None, "conv_in", "conv_out")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
            conv_general_dilated=conv3d,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.temporal_padding == "edge":
            x = _pad_time_front(x, self.kernel_size[0] - 1, "edge")
        return constrain_channels_last(self.conv(x))


class CausalConv1d(nnx.Module):
    """Causal 1D convolution: ``[B, S, C_in] -> [B, ceil(S / stride), C_out]``.

    The front is padded by ``(kernel - 1) * dilation`` (zeros), so output ``s`` sees
    input samples ``<= s * stride``.
    """

    def __init__(
        self,
        features_in: int,
        features_out: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        *,
        use_bias: bool = True,
        kernel_init=default_kernel_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel_size = int(kernel)
        self.stride = int(stride)
        self.dilation = int(dilation)
        self.conv = nnx.Conv(
            features_in,
            features_out,
            (self.kernel_size,),
            (self.stride,),
            padding=((0, 0),),
            kernel_dilation=(self.dilation,),
            use_bias=use_bias,
            conv_general_dilated=conv,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(kernel_init, (None, "conv_in", "conv_out")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        front = (self.kernel_size - 1) * self.dilation
        # Pad the back so the strided output length is ceil(S / stride) like "SAME".
        length = x.shape[1]
        back = (-length) % self.stride
        x = jnp.pad(x, ((0, 0), (front, back), (0, 0)))
        return constrain_channels_last(self.conv(x))


def _group_mean(v: jax.Array, num_groups: int, reduce_axes: tuple[int, ...]) -> jax.Array:
    """Mean over ``reduce_axes`` and each group's channels, broadcastable against ``v``.

    Reduced per channel first (the channel axis stays innermost, which XLA:CPU reduces
    fast), then averaged over the few channels of each group.
    """
    per_channel = jnp.mean(v, axis=reduce_axes, keepdims=True)
    shape = per_channel.shape
    grouped = per_channel.reshape(*shape[:-1], num_groups, shape[-1] // num_groups)
    return jnp.broadcast_to(jnp.mean(grouped, axis=-1, keepdims=True), grouped.shape).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _group_normalize(x, num_groups, reduce_axes, epsilon):
    return _group_normalize_fwd(x, num_groups, reduce_axes, epsilon)[0]


def _group_normalize_fwd(x, num_groups, reduce_axes, epsilon):
    centred = x - _group_mean(x, num_groups, reduce_axes)
    inv_std = jax.lax.rsqrt(_group_mean(jnp.square(centred), num_groups, reduce_axes) + epsilon)
    y = centred * inv_std
    return y, (y, inv_std)


def _group_normalize_bwd(num_groups, reduce_axes, epsilon, residuals, dy):
    # The normalisation's closed-form gradient: inv_std * (dy - E[dy] - y E[dy y]), the
    # expectations over each group; 2-3x faster on CPU than differentiating the forward.
    y, inv_std = residuals
    mean = functools.partial(_group_mean, num_groups=num_groups, reduce_axes=reduce_axes)
    return (inv_std * (dy - mean(dy) - y * mean(dy * y)),)


_group_normalize.defvjp(_group_normalize_fwd, _group_normalize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_group_norm_swish(x, scale, bias, num_groups, slab_dims, epsilon):
    return cpu_kernels.group_norm_swish(x, scale, bias, num_groups, slab_dims, epsilon)[0]


def _kernel_group_norm_swish_fwd(x, scale, bias, num_groups, slab_dims, epsilon):
    y, mean, inv_std = cpu_kernels.group_norm_swish(x, scale, bias, num_groups, slab_dims, epsilon)
    return y, (x, scale, bias, mean, inv_std)


def _kernel_group_norm_swish_bwd(num_groups, slab_dims, epsilon, residuals, dy):
    x, scale, bias, mean, inv_std = residuals
    return cpu_kernels.group_norm_swish_grad(x, dy, scale, bias, mean, inv_std, num_groups, slab_dims)


_kernel_group_norm_swish.defvjp(_kernel_group_norm_swish_fwd, _kernel_group_norm_swish_bwd)


class GroupNorm(nnx.Module):
    """Group normalisation per sample and per frame, in float32.

    ``x [..., C]``: the mean and variance are taken over ``reduce_axes`` (default the
    spatial axes ``(-3, -2)`` of ``[B, T, H, W, C]``) and the ``C / num_groups``
    channels of each group; all other axes (batch, time) keep separate statistics.
    ``use_affine=False`` gives the plain normalisation MAGVIT-v2 puts before the
    quantizer.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        *,
        reduce_axes: Sequence[int] = (-3, -2),
        use_affine: bool = True,
        epsilon: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: {num_features} channels do not split into {num_groups} groups")
        self.num_features = num_features
        self.num_groups = num_groups
        self.reduce_axes = tuple(int(a) for a in reduce_axes)
        if any(a >= -1 for a in self.reduce_axes):
            raise ValueError(f"reduce_axes={self.reduce_axes} must be negative and exclude the channel axis")
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_affine = use_affine
        if use_affine:
            self.scale = logical_param(jnp.ones((num_features,), param_dtype), ("norm",))
            self.bias = logical_param(jnp.zeros((num_features,), param_dtype), ("norm",))

    def normalize(self, x: jax.Array) -> jax.Array:
        """Normalised ``x`` in float32, without the affine transform."""
        return _group_normalize(x.astype(jnp.float32), self.num_groups, self.reduce_axes, self.epsilon)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.normalize(x)
        if self.use_affine:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)

    def swish(self, x: jax.Array) -> jax.Array:
        """``nnx.swish(self(x))``. On CPU, for float32 with the affine transform over the axes
        just before the channels, one fused kernel forward and one backward
        (``mmgen.nn.cpu_kernels.group_norm_swish``: each frame read once forward, twice
        backward, where XLA's forms make 5-8 passes), unless
        ``without_cpu_forms("conv_kernels")``; the same values and gradients."""
        slab_dims = len(self.reduce_axes) + 1
        fused = (cpu_forms("conv_kernels") and self.use_affine and self.dtype == jnp.float32
                 and sorted(self.reduce_axes) == list(range(-slab_dims, -1))
                 and _kernels_take(x, self.scale[...], self.bias[...]))
        if not fused:
            return nnx.swish(self(x))
        return _kernel_group_norm_swish(x, self.scale[...], self.bias[...], self.num_groups, slab_dims,
                                        float(self.epsilon))


def causal_upsample_time(cond: jax.Array, frames: int) -> jax.Array:
    """Nearest, causal resampling of ``[B, T_c, ...]`` to ``frames = 1 + r (T_c - 1)``.

    Output frame ``t`` takes latent frame ``ceil(t / r)``: frame 0 from latent 0, frames
    ``1..r`` from latent 1, and so on, the same grouping the causal encoder uses.
    """
    t_c = cond.shape[1]
    if t_c == frames:
        return cond
    if t_c == 1 or (frames - 1) % (t_c - 1):
        raise ValueError(f"cannot causally resample {t_c} frames to {frames}")
    rate = (frames - 1) // (t_c - 1)
    index = (np.arange(frames) + rate - 1) // rate
    return jnp.take(cond, jnp.asarray(index), axis=1)


class AdaptiveGroupNorm(nnx.Module):
    """GroupNorm whose scale and bias are predicted from a conditioning latent.

    MAGVIT-v2 decoder: ``y = GN(x) * (1 + gamma(c)) + beta(c)`` with ``gamma``, ``beta``
    1x1x1 convolutions of the quantized latent ``c [B, T_c, H_c, W_c, D]``, computed at
    the latent resolution and resampled (nearest; causally in time) to ``x``'s
    ``[B, T, H, W, C]``. Zero-initialised, so it starts as a plain GroupNorm.
    """

    def __init__(
        self,
        num_features: int,
        cond_features: int,
        num_groups: int = 32,
        *,
        epsilon: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm = GroupNorm(num_features, num_groups, use_affine=False, epsilon=epsilon, dtype=jnp.float32)
        zeros = nnx.initializers.zeros_init()
        self.to_scale_bias = CausalConv3d(
            cond_features, 2 * num_features, 1, kernel_init=zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        scale, bias = jnp.split(self.to_scale_bias(cond).astype(jnp.float32), 2, axis=-1)
        _, t, h, w, _ = x.shape
        scale, bias = (causal_upsample_time(v, t) for v in (scale, bias))
        rh, rw = h // cond.shape[2], w // cond.shape[3]
        scale, bias = (constrain_channels_last(jnp.repeat(jnp.repeat(v, rh, axis=2), rw, axis=3))
                       for v in (scale, bias))
        return constrain_channels_last((self.norm.normalize(x) * (1.0 + scale) + bias).astype(self.dtype))


class DepthToSpace3d(nnx.Module):
    """Causal conv to ``C_out * f_t * f_h * f_w`` channels, then depth-to-space.

    ``[B, 1 + n, H, W, C_in] -> [B, 1 + f_t n, f_h H, f_w W, C_out]``: the first
    ``f_t - 1`` of the ``f_t (1 + n)`` frames are dropped so the frame count stays
    ``1 + multiple of f_t`` and frame 0 depends on latent frame 0 only.
    """

    def __init__(
        self,
        features_in: int,
        features_out: int,
        factors: Sequence[int],
        kernel: int | Sequence[int] = 3,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.factors = _triple(factors)
        ft, fh, fw = self.factors
        self.conv = CausalConv3d(
            features_in, features_out * ft * fh * fw, kernel, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        ft, fh, fw = self.factors
        x = einops.rearrange(
            self.conv(x), "b t h w (c ft fh fw) -> b (t ft) (h fh) (w fw) c", ft=ft, fh=fh, fw=fw
        )
        return constrain_channels_last(x[:, ft - 1 :])


class BlurPool3d(nnx.Module):
    """Anti-aliased 2x downsampling (StyleGAN): binomial low-pass, then stride 2.

    ``[B, T, H, W, C] -> [B, ceil(T/2), H/2, W/2, C]`` (time kept when
    ``downsample_time=False``). The filter is the outer product of ``taps`` (default
    ``[1, 3, 3, 1]``) normalised to sum 1, applied depthwise; not a parameter.
    """

    def __init__(self, taps: Sequence[float] = (1.0, 3.0, 3.0, 1.0), *, downsample_time: bool = True):
        self.taps = tuple(float(t) for t in taps)
        self.downsample_time = downsample_time

    def __call__(self, x: jax.Array, *, impl: str = "auto") -> jax.Array:
        """``impl``: ``"conv"`` (a depthwise 3D convolution), ``"separable"`` (per axis, a
        weighted sum of strided slices), ``"auto"`` (separable on CPU, where XLA runs the
        depthwise strided convolution and above all its input gradient in a generic
        loop, BENCHMARKS.md; the convolution elsewhere)."""
        if impl not in ("auto", "conv", "separable"):
            raise ValueError(f"BlurPool3d impl={impl!r}; expected auto, conv or separable")
        channels = x.shape[-1]
        taps = np.asarray(self.taps, np.float32)
        one = np.ones((1,), np.float32)
        kt = taps if self.downsample_time else one
        # Pad so that stride-1 filtering would keep the size; stride 2 then halves it.
        pad = _same_padding(len(taps), 1)
        strides = (2 if self.downsample_time else 1, 2, 2)
        padding = (pad if self.downsample_time else (0, 0), pad, pad)
        if impl == "separable" or (impl == "auto" and cpu_forms("separable_blur")):
            for axis, (t, s, p) in enumerate(zip((kt, taps, taps), strides, padding), start=1):
                x = _strided_filter(x, t / t.sum(), s, p, axis)
            return constrain_channels_last(x)
        kernel = np.einsum("t,h,w->thw", kt, taps, taps)
        kernel = kernel / kernel.sum()
        kernel = np.broadcast_to(kernel[..., None, None], kernel.shape + (1, channels))
        y = conv3d(x, jnp.asarray(kernel, x.dtype), strides, padding, feature_group_count=channels)
        return constrain_channels_last(y)


def _strided_filter(x: jax.Array, taps: np.ndarray, stride: int, padding: tuple[int, int], axis: int) -> jax.Array:
    """``y[i] = sum_j taps[j] x_pad[stride i + j]`` along ``axis`` (zero padding ``padding``), as
    a weighted sum of strided slices: elementwise work, and so is its gradient."""
    if len(taps) == 1:
        return x * taps[0] if taps[0] != 1 else x
    widths = [(0, 0)] * x.ndim
    widths[axis] = padding
    x = jnp.pad(x, widths)
    out = (x.shape[axis] - len(taps)) // stride + 1
    y = None
    for j, t in enumerate(taps):
        term = jax.lax.slice_in_dim(x, j, j + stride * (out - 1) + 1, stride, axis) * jnp.asarray(t, x.dtype)
        y = term if y is None else y + term
    return y

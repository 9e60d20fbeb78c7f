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

Weights are never downloaded: ``load_i3d(path)`` reads a ``.npz`` the user gives,
whose keys are the checkpoint's variable names without the ``RGB/inception_i3d/``
scope and ``:0`` suffix (both are also accepted), e.g.
``Conv3d_1a_7x7/conv_3d/w`` ``[7, 7, 7, 3, 64]``, ``Mixed_3b/Branch_1/Conv3d_0b_3x3/
batch_norm/moving_mean`` ``[128]`` (any shape of that size), ``Logits/Conv3d_0c_1x1/
conv_3d/b`` ``[400]``. ``save_i3d_npz`` writes the same layout.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.errors import UserError
from mmgen.eval.frechet import feature_statistics, frechet_distance

UNAVAILABLE = "unavailable (no I3D weights given)"

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


def load_i3d(path: str) -> I3D:
    """I3D with weights read from the user's ``.npz``; never downloads anything.

    Raises:
      UserError: the file is missing or unreadable, or an array is absent or has
        the wrong size. The class count is taken from the file's logits kernel.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"I3D weights file not found: {path} (FVD needs Kinetics-400 I3D weights as .npz; none are downloaded)")
    try:
        with np.load(path) as data:
            arrays = {_checkpoint_key(k): data[k] for k in data.files}
    except Exception as err:  # a corrupt or non-npz file
        raise UserError(f"I3D weights file {path} is not a readable .npz ({type(err).__name__}: {err})") from None
    logits_key = "Logits/Conv3d_0c_1x1/conv_3d/w"
    if logits_key not in arrays:
        raise UserError(f"I3D weights file {path} has no array {logits_key!r}: not an I3D checkpoint")
    num_classes = int(arrays[logits_key].shape[-1])
    model = nnx.eval_shape(lambda: I3D(num_classes, rngs=nnx.Rngs(0)))
    expected = model.named_arrays()
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise UserError(f"I3D weights file {path} lacks {len(missing)} arrays, e.g. {missing[0]!r}")
    for key, var in expected.items():
        value = arrays[key]
        want = tuple(var.get_value().shape)
        if tuple(value.shape) != want:
            # Batch-norm statistics are stored as [1, 1, 1, 1, C] in the original checkpoint.
            if "batch_norm" not in key or value.size != int(np.prod(want)):
                raise UserError(f"I3D weights file {path}: array {key!r} has shape {tuple(value.shape)}, the model needs {want}")
            value = value.reshape(want)
        var.set_value(jnp.asarray(value, jnp.float32))
    return model


# ------------------------------------------------------------------------- FVD


@partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, videos):
    return nnx.merge(graphdef, state)(videos)


def preprocess_videos(videos, resolution: int | None = 224) -> jax.Array:
    """uint8 ``[N, T, H, W, 3]`` or float in [-1, 1] -> float32 [-1, 1], resized
    bilinearly (no antialiasing) to ``resolution`` x ``resolution`` (None = keep)."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(f"FVD needs videos shaped [N, T, H, W, 3], got {videos.shape}")
    if videos.dtype == np.uint8:
        x = jnp.asarray(videos, jnp.float32) / 127.5 - 1.0
    else:
        x = jnp.asarray(videos, jnp.float32)
    if resolution is not None and videos.shape[2:4] != (resolution, resolution):
        n, t = videos.shape[:2]
        x = jax.image.resize(x, (n, t, resolution, resolution, 3), "bilinear", antialias=False)
    return x


def i3d_logits(model: I3D, videos, resolution: int | None = 224, batch_size: int = 16) -> np.ndarray:
    """I3D logits ``[N, num_classes]`` of videos (see ``preprocess_videos``), in fixed-size
    batches (the last one zero-padded) so one compiled program serves every batch."""
    graphdef, state = nnx.split(model)
    n = len(videos)
    out = []
    for start in range(0, n, batch_size):
        chunk = preprocess_videos(videos[start : start + batch_size], resolution)
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = jnp.concatenate([chunk, jnp.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(_apply(graphdef, state, chunk))[: chunk.shape[0] - pad])
    return np.concatenate(out, axis=0)


def fvd(real_videos, fake_videos, i3d: I3D, resolution: int | None = 224, batch_size: int = 16) -> float:
    """Frechet Video Distance between two sets of ``[N, T, H, W, 3]`` videos (N >= 2 each)."""
    if len(real_videos) < 2 or len(fake_videos) < 2:
        raise UserError(f"FVD needs at least 2 videos per set, got {len(real_videos)} real and {len(fake_videos)} generated")
    real = i3d_logits(i3d, real_videos, resolution, batch_size)
    fake = i3d_logits(i3d, fake_videos, resolution, batch_size)
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def fvd_or_unavailable(real_videos, fake_videos, weights_path: str | None = None, **kwargs) -> float | str:
    """FVD when the user gave I3D weights, else the string ``UNAVAILABLE`` (never a
    made-up number). A given path that is missing or wrong is an error."""
    if weights_path is None:
        return UNAVAILABLE
    return fvd(real_videos, fake_videos, load_i3d(weights_path), **kwargs)

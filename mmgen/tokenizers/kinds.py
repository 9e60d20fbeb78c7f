"""One object per kind of tokenizer: what the tokenizer family and its users ask of it.

``kind(cfg.modality)`` picks it once, from ``KINDS``; the family
(``mmgen.families.tokenizer``), ``LoadedTokenizer`` and the generative model's layout
check (``mmgen.generative.tokens``) then call the same methods for either kind:

=========================  ==========================================  ==========================================
method                     ``VideoKind`` (MAGVIT-v2)                   ``AudioKind`` (SoundStream)
=========================  ==========================================  ==========================================
``build``                  ``VideoTokenizer(cfg.model)``               ``AudioTokenizer(cfg.model)``
``build_discriminator``    ``StyleGANDiscriminator3D``                 ``STFTDiscriminator`` (logits + features)
                           (``cfg.discriminator``)                     (``cfg.discriminator``)
``input_shape``            ``(1, T, R, R, 3)`` from ``cfg.dataset``    ``(1, S)``, ``S = round(T * rate / fps)``
``model_input``            uint8 frames -> float32 ``x / 127.5 - 1``   float32 waveform as it is
``reconstruction_terms``   ``w_rec * rec(x, x_hat)``                   mel + STFT (+ waveform L1) distance,
                           ``[+ w_perc * LPIPS]``                      weights in ``cfg.model.loss``
``eval_metrics``           PSNR of ``(x_hat - x) / 2``                 none beyond the losses
=========================  ==========================================  ==========================================

Both kinds read their discriminator from the config's top-level ``discriminator``
(a workdir written when audio kept it under ``model.discriminator`` is read through
``mmgen.train.workdir.read_config``, which moves it).
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.data import media
from mmgen.errors import UserError
from mmgen.tokenizers import audio as audio_lib
from mmgen.tokenizers import losses
from mmgen.tokenizers.discriminators import StyleGANDiscriminator3D
from mmgen.tokenizers.video import VideoTokenizer


class TokenizerKind(abc.ABC):
    """The interface; ``name`` is the config's ``modality`` and the batch key of the signal.

    ``signal_dtype``: the dtype of that batch entry (as ``make_data`` yields it);
    ``perceptual``: whether a perceptual (LPIPS) loss is defined on the signal;
    ``signal_doc``: what ``encode`` takes, in words (model cards, the Python API's help).
    """

    name: str
    signal_dtype: jnp.dtype
    signal_doc: str
    signal_ndim: int  # axes of one example's signal, without the batch axis

    @abc.abstractmethod
    def token_ndim(self, model) -> int:
        """Axes of one example's tokens, without the batch axis."""

    @abc.abstractmethod
    def from_user(self, x: np.ndarray) -> np.ndarray:
        """A batch of signals as a user has them (``signal_doc``, batch axis present) ->
        float32 model range; ``UserError`` naming the expected shape otherwise."""

    def to_user(self, x: np.ndarray) -> np.ndarray:
        """Decoded signals (model range) -> as a user has them."""
        return x
    perceptual: bool = False

    @abc.abstractmethod
    def build(self, model_cfg, rngs: nnx.Rngs) -> nnx.Module:
        """The (untrained) tokenizer of ``cfg.model``."""

    @abc.abstractmethod
    def build_discriminator(self, disc_cfg, rngs: nnx.Rngs) -> nnx.Module:
        """The discriminator of ``cfg.discriminator``."""

    @abc.abstractmethod
    def disc_logits(self, disc, x) -> tuple[list, list]:
        """``(list of logits, list of feature lists)``; no features: no feature matching."""

    @abc.abstractmethod
    def input_shape(self, dataset) -> tuple[int, ...]:
        """One example's input shape (batch axis 1) for clips of ``dataset``."""

    @abc.abstractmethod
    def model_input(self, signal) -> jax.Array:
        """The batch's signal in the model's float32 range."""

    @abc.abstractmethod
    def check_input(self, model, shape) -> None:
        """``UserError`` when the tokenizer cannot encode inputs of ``shape``."""

    @abc.abstractmethod
    def check_config(self, cfg, model, shape) -> None:
        """``UserError`` for a tokenizer config that does not fit its data (``shape``: ``input_shape``)."""

    def check_discriminator(self, disc_cfg, shape) -> None:
        """``UserError`` when the discriminator cannot read inputs of ``shape`` (GAN on)."""

    @abc.abstractmethod
    def reconstruction_terms(self, cfg, x, recon, perceptual=None) -> tuple[jax.Array, dict]:
        """``(weighted reconstruction loss, dict of its unweighted terms)``."""

    def eval_metrics(self, x, recon) -> dict:
        """Metrics of one eval batch beyond the losses."""
        return {}


    @abc.abstractmethod
    def check_layout(self, model, dataset, spec) -> None:
        """``UserError`` unless ``model`` makes tokens of ``spec``'s shape and vocabulary from ``dataset``'s clips.

        ``spec`` is the generative model's ``ModalitySpec`` of this modality (its
        ``shape`` and ``vocab`` come from ``config.model.<modality>_*``).
        """

    def _check_vocab(self, model, spec, what: str) -> None:
        if model.vocab_size != spec.vocab:
            key = f"config.model.{self.name}_vocab"
            raise UserError(f"the {self.name} tokenizer has {model.vocab_size} {what} but {key}={spec.vocab}: "
                            f"set --{key}={model.vocab_size}")


class VideoKind(TokenizerKind):
    """MAGVIT-v2-style video tokenizer, 3D StyleGAN discriminator, optional LPIPS."""

    name = "video"
    signal_dtype = jnp.uint8
    signal_doc = "uint8 [T, H, W, 3] or [B, T, H, W, 3]"
    signal_ndim = 4

    def token_ndim(self, model):
        return 3

    def from_user(self, x):
        if x.ndim != 5 or x.shape[-1] != 3:
            raise UserError(f"video must be [T, H, W, 3] or [B, T, H, W, 3], got {list(x.shape)}")
        return media.to_model(x) if x.dtype == np.uint8 else x.astype(np.float32)

    def to_user(self, x):
        return media.from_model(x)
    perceptual = True

    def build(self, model_cfg, rngs):
        return VideoTokenizer(model_cfg, rngs=rngs)

    def build_discriminator(self, disc_cfg, rngs):
        return StyleGANDiscriminator3D(disc_cfg, rngs=rngs)

    def disc_logits(self, disc, x):
        return [disc(x)], []

    def input_shape(self, dataset):
        return (1, int(dataset.frames), int(dataset.resolution), int(dataset.resolution), 3)

    def model_input(self, signal):
        return signal.astype(jnp.float32) / 127.5 - 1.0

    def check_input(self, model, shape):
        model.check_video_shape(shape)

    def check_config(self, cfg, model, shape):
        model.check_video_shape(shape)

    def check_discriminator(self, disc_cfg, shape):
        d = disc_cfg
        if (d.frames, d.height, d.width) != shape[1:4]:
            raise UserError(
                f"discriminator clip {d.frames}x{d.height}x{d.width} differs from the data "
                f"{shape[1]}x{shape[2]}x{shape[3]}: set config.discriminator.frames/height/width")

    def reconstruction_terms(self, cfg, x, recon, perceptual=None):
        rec = losses.reconstruction_loss(recon, x, cfg.loss.reconstruction)
        parts = {"rec_loss": rec}
        total = cfg.loss.reconstruction_weight * rec
        if perceptual is not None:
            parts["perceptual_loss"] = perceptual(recon, x)
            total = total + cfg.loss.perceptual_weight * parts["perceptual_loss"]
        return total, parts

    def eval_metrics(self, x, recon):
        """``psnr``: batch mean of ``10 log10(1 / mse)``, ``mse`` per clip on [0, 1] pixels."""
        mse = jnp.mean(jnp.square((recon - x) / 2.0), axis=tuple(range(1, x.ndim)))
        return {"psnr": jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))}


    def check_layout(self, model, dataset, spec):
        d = dataset
        shape = model.latent_shape(self.input_shape(d))[1:]
        if model.quantizer.num_levels != 1:
            raise UserError("the video tokenizer must have one token per latent position (LFQ, FSQ or VQ, not RVQ)")
        if shape != spec.shape:
            raise UserError(f"the video tokenizer maps {d.frames}x{d.resolution}x{d.resolution} clips to "
                            f"{'x'.join(map(str, shape))} tokens but config.model.video_grid={tuple(spec.shape)}: "
                            f"set --config.model.video_grid={tuple(shape)}")
        self._check_vocab(model, spec, "codes")


class AudioKind(TokenizerKind):
    """SoundStream-style audio codec, multi-resolution STFT discriminator with feature matching."""

    name = "audio"
    signal_dtype = jnp.float32
    signal_doc = "float32 [S] or [B, S] in [-1, 1]"
    signal_ndim = 1

    def token_ndim(self, model):
        return 2 if model.has_levels else 1  # [T_a, levels] (RVQ) or [T_a]

    def from_user(self, x):
        if x.ndim != 2:
            raise UserError(f"audio must be [S] or [B, S], got {list(x.shape)}")
        return x.astype(np.float32)

    def build(self, model_cfg, rngs):
        return audio_lib.AudioTokenizer(model_cfg, rngs=rngs)

    def build_discriminator(self, disc_cfg, rngs):
        return audio_lib.STFTDiscriminator(disc_cfg, rngs=rngs)

    def disc_logits(self, disc, x):
        return disc(x)

    def input_shape(self, dataset):
        return (1, audio_lib.audio_samples_for_video(int(dataset.frames), float(dataset.fps),
                                                     int(dataset.sample_rate)))

    def model_input(self, signal):
        return signal.astype(jnp.float32)

    def check_input(self, model, shape):
        model.check_audio_shape(shape)

    def check_config(self, cfg, model, shape):
        if int(cfg.model.sample_rate) != int(cfg.dataset.sample_rate):
            raise UserError(f"config.model.sample_rate={cfg.model.sample_rate} differs from "
                            f"config.dataset.sample_rate={cfg.dataset.sample_rate}")

    def reconstruction_terms(self, cfg, x, recon, perceptual=None):
        return audio_lib.audio_reconstruction_loss(x, recon, cfg.model.loss)


    def check_layout(self, model, dataset, spec):
        d = dataset
        (_, samples) = self.input_shape(d)
        if int(model.sample_rate) != int(d.sample_rate):
            raise UserError(f"the audio tokenizer runs at {model.sample_rate} Hz but "
                            f"config.dataset.sample_rate={d.sample_rate}")
        shape = model.latent_shape((1, samples))[1:]
        if shape != spec.shape:
            levels = shape[1] if len(shape) > 1 else 1
            raise UserError(f"the audio tokenizer maps {samples} samples to {'x'.join(map(str, shape))} tokens but "
                            f"the config says {'x'.join(map(str, spec.shape))}: "
                            f"set --config.model.audio_len={shape[0]} --config.model.audio_levels={levels}")
        self._check_vocab(model, spec, "codes per level")


KINDS: dict[str, TokenizerKind] = {k.name: k for k in (VideoKind(), AudioKind())}


def kind(modality: str) -> TokenizerKind:
    """The tokenizer kind of ``config.modality`` (``UserError`` for any other value)."""
    if modality not in KINDS:
        raise UserError(f"config.modality={modality!r} must be {' or '.join(repr(k) for k in KINDS)}")
    return KINDS[modality]

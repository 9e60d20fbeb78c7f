"""Specification of the tokenizer losses (mmgen.tokenizers.losses) and the 3D discriminator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen.errors import UserError
from mmgen.parallel.sharding import logical_axes
from mmgen.tokenizers import losses
from mmgen.tokenizers.discriminators import (
    StyleGANDiscriminator3D,
    discriminator_config,
)

REAL = jnp.array([2.0, 0.5, -1.0, 0.0])
FAKE = jnp.array([-2.0, 0.5, 1.0, 0.0])


def test_hinge_losses_on_known_logits():
    # relu(1 - real) = [0, .5, 2, 1] -> 0.875 ; relu(1 + fake) = [0, 1.5, 2, 1] -> 1.125
    np.testing.assert_allclose(losses.hinge_discriminator_loss(REAL, FAKE), 2.0, rtol=1e-6)
    np.testing.assert_allclose(losses.hinge_generator_loss(FAKE), 0.125, rtol=1e-6)
    np.testing.assert_allclose(losses.discriminator_loss(REAL, FAKE, "hinge"), 2.0, rtol=1e-6)


def test_non_saturating_losses_on_known_logits():
    sp = lambda v: math.log1p(math.exp(v))
    d = np.mean([sp(-r) for r in REAL.tolist()]) + np.mean([sp(f) for f in FAKE.tolist()])
    g = np.mean([sp(-f) for f in FAKE.tolist()])
    np.testing.assert_allclose(losses.non_saturating_discriminator_loss(REAL, FAKE), d, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(FAKE, "non_saturating"), g, rtol=1e-6)
    zero = jnp.zeros(3)
    np.testing.assert_allclose(losses.discriminator_loss(zero, zero, "non_saturating"), 2 * math.log(2), rtol=1e-6)
    with pytest.raises(ValueError, match="wasserstein"):
        losses.generator_loss(FAKE, "wasserstein")


def test_reconstruction_losses():
    x, y = jnp.array([0.0, 1.0, -1.0]), jnp.array([0.5, 1.0, 1.0])
    np.testing.assert_allclose(losses.reconstruction_loss(x, y, "l1"), 2.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(losses.reconstruction_loss(x, y, "l2"), 4.25 / 3, rtol=1e-6)


def test_lecam_ema_starts_at_first_batch_then_moves_with_decay_under_jit():
    lecam = losses.LeCAMRegularizer(decay=0.999)
    step = nnx.jit(lambda m, r, f: m(r, f))

    reg1 = step(lecam, REAL, FAKE)  # EMAs := batch means 0.375 and -0.125
    np.testing.assert_allclose([lecam.real_ema[...], lecam.fake_ema[...]], [0.375, -0.125], rtol=1e-6)
    expect1 = np.mean(np.maximum(np.array(REAL) + 0.125, 0) ** 2) + np.mean(np.maximum(0.375 - np.array(FAKE), 0) ** 2)
    np.testing.assert_allclose(reg1, expect1, rtol=1e-5)

    step(lecam, REAL + 1.0, FAKE - 1.0)
    np.testing.assert_allclose(lecam.real_ema[...], 0.999 * 0.375 + 0.001 * 1.375, rtol=1e-6)
    np.testing.assert_allclose(lecam.fake_ema[...], 0.999 * -0.125 + 0.001 * -1.125, rtol=1e-6)
    assert int(lecam.count[...]) == 2
    lecam(REAL, FAKE, update=False)
    assert int(lecam.count[...]) == 2
    assert not nnx.state(lecam, nnx.Param)  # nothing for an optimizer to train


@pytest.fixture(scope="module")
def discriminator():
    cfg = discriminator_config("tiny")
    cfg.frames, cfg.height, cfg.width = 5, 16, 16
    cfg.base_channels, cfg.channel_multipliers, cfg.temporal_downsample = 8, (1, 2), (True, True)
    with jax.threefry_partitionable(False):  # cheaper CPU compile; values don't matter here
        return StyleGANDiscriminator3D(cfg, rngs=nnx.Rngs(0))


def test_discriminator_gives_one_logit_per_clip_and_names_its_parameters(discriminator):
    video = jax.random.uniform(jax.random.key(0), (3, 5, 16, 16, 3), minval=-1, maxval=1)
    logits = nnx.jit(lambda d, v: d(v))(discriminator, video)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0
    for path, var in nnx.to_flat_state(nnx.state(discriminator, nnx.Param)):
        names = logical_axes(var)
        assert names is not None and len(names) == var.ndim, path
    with pytest.raises(ValueError, match="frames/height/width"):
        discriminator(jnp.zeros((1, 9, 16, 16, 3)))


def test_r1_penalty_is_positive_for_a_discriminator_and_zero_for_a_constant(discriminator):
    real = jax.random.uniform(jax.random.key(1), (2, 5, 16, 16, 3), minval=-1, maxval=1)
    r1 = nnx.jit(lambda d, x: losses.r1_penalty(d, x, weight=10.0))(discriminator, real)
    assert float(r1) > 0.0
    # Linear D(x) = sum(x * w): ||grad||^2 = sum(w^2) for every sample.
    w = jnp.full(real.shape[1:], 0.5)
    linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3, 4))
    np.testing.assert_allclose(losses.r1_penalty(linear, real, weight=10.0), 10.0 * 0.25 * w.size, rtol=1e-5)
    assert float(losses.r1_penalty(lambda x: jnp.zeros(x.shape[0]), real)) == 0.0


def _tiny_perceptual(path=""):
    cfg = losses.perceptual_config()
    cfg.stage_channels, cfg.convs_per_stage = (8, 16), (1, 2)
    cfg.weights_path = path
    return cfg


def test_perceptual_weights_save_load_round_trip_gives_identical_features(tmp_path):
    cfg = _tiny_perceptual(str(tmp_path / "lpips.npz"))
    with jax.threefry_partitionable(False):  # cheaper CPU compile of the random init
        written = losses.save_random_perceptual_weights(cfg.weights_path, cfg, seed=3)
    loaded = losses.load_perceptual_loss(cfg)
    assert set(losses.expected_perceptual_arrays(cfg)) == {
        "stages/0/0/kernel", "stages/0/0/bias", "stages/1/0/kernel", "stages/1/0/bias",
        "stages/1/1/kernel", "stages/1/1/bias", "heads/0", "heads/1",
    }
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    features = nnx.jit(lambda net, x: net.features(x))
    for a, b in zip(features(written, images), features(loaded, images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    video = images.reshape(1, 2, 8, 8, 3)
    same, different = nnx.jit(lambda net, v: (net(v, v), net(v, -v)))(loaded, video)
    assert abs(float(same)) < 1e-9 and float(different) > 1e-3
    assert not nnx.state(loaded, nnx.Param)  # frozen: optimizers never see it


def test_perceptual_loss_is_off_without_a_path_and_fails_loudly_on_bad_files(tmp_path):
    assert losses.load_perceptual_loss(_tiny_perceptual("")) is None
    with pytest.raises(UserError, match="does not exist"):
        losses.load_perceptual_loss(_tiny_perceptual(str(tmp_path / "absent.npz")))
    path = str(tmp_path / "other.npz")
    other = _tiny_perceptual(path)
    other.stage_channels = (8, 32)
    with jax.threefry_partitionable(False):
        losses.save_random_perceptual_weights(path, other)
    with pytest.raises(UserError, match=r"stages/1/0/kernel has shape \(3, 3, 8, 32\), expected \(3, 3, 8, 16\)"):
        losses.load_perceptual_loss(_tiny_perceptual(path))

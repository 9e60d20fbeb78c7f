"""The CPU form of the 3D convolution (one 2D conv per temporal tap) equals XLA's 3D conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen.nn.conv import BlurPool3d, CausalConv3d, conv3d


@pytest.mark.parametrize(
    "strides,padding,groups",
    [
        ((1, 1, 1), ((2, 0), (1, 1), (1, 1)), 1),  # causal 3x3x3
        ((2, 2, 2), ((2, 0), (0, 1), (0, 1)), 1),  # strided causal downsampling
        ((1, 2, 2), "SAME", 1),  # the discriminator's padding string
        ((2, 2, 2), ((1, 2), (1, 2), (1, 2)), 4),  # depthwise blur-pool
    ],
)
def test_taps_equals_xla_3d_convolution_and_its_gradient(strides, padding, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4 // groups, 6 if groups == 1 else 4)), jnp.float32)

    def loss(impl, x, k):
        y = conv3d(x, k, strides, padding, feature_group_count=groups, impl=impl)
        return jnp.sum(jnp.sin(y)), y

    (_, y_taps), g_taps = jax.value_and_grad(lambda *a: loss("taps", *a), argnums=(0, 1), has_aux=True)(x, k)
    (_, y_xla), g_xla = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1), has_aux=True)(x, k)
    assert y_taps.shape == y_xla.shape
    np.testing.assert_allclose(y_taps, y_xla, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_taps, g_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_layers_use_the_same_kernels_either_way(monkeypatch):
    """CausalConv3d and BlurPool3d give identical results through both implementations."""
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 8, 8, 3)), jnp.float32)
    conv = CausalConv3d(3, 5, 3, (2, 2, 2), rngs=nnx.Rngs(0))
    blur = BlurPool3d()
    outs = {}
    for impl in ("taps", "xla"):
        monkeypatch.setattr(jax, "default_backend", lambda impl=impl: "cpu" if impl == "taps" else "gpu")
        outs[impl] = (conv(x), blur(x))
    for a, b in zip(outs["taps"], outs["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert outs["taps"][0].shape == (1, 3, 4, 4, 5)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        conv3d(jnp.zeros((1, 3, 4, 4, 1)), jnp.zeros((3, 3, 3, 1, 1)), (1, 1, 1), "SAME", impl="fast")


def _direct_group_norm(x, groups, eps=1e-6):
    b, t, h, w, c = x.shape
    g = x.reshape(b, t, h, w, groups, c // groups)
    mean = g.mean(axis=(2, 3, 5), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(2, 3, 5), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape)


def test_group_norm_and_its_closed_form_gradient_match_a_direct_computation():
    from mmgen.nn.conv import GroupNorm

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 8)) * 3 + 1, jnp.float32)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    norm = GroupNorm(8, 4, use_affine=False)
    np.testing.assert_allclose(norm(x), _direct_group_norm(x, 4), rtol=1e-5, atol=1e-5)
    # Per-frame statistics: changing frame 2 leaves frames 0-1 unchanged.
    np.testing.assert_array_equal(norm(x.at[:, 2].add(5.0))[:, :2], norm(x)[:, :2])
    g_ours = jax.grad(lambda v: jnp.sum(jnp.sin(norm(v)) * w))(x)
    g_direct = jax.grad(lambda v: jnp.sum(jnp.sin(_direct_group_norm(v, 4)) * w))(x)
    np.testing.assert_allclose(g_ours, g_direct, rtol=1e-4, atol=1e-4)

"""The CPU forms of the convolutions (3D as per-tap 2D convs; strided and dilated convs as
stride-1 convs of a rearranged input) equal XLA's convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen.nn.conv import BlurPool3d, CausalConv3d, causal_conv_transpose1d, conv, conv3d


@pytest.mark.parametrize(
    "strides,padding,groups",
    [
        ((1, 1, 1), ((2, 0), (1, 1), (1, 1)), 1),  # causal 3x3x3
        ((2, 2, 2), ((2, 0), (0, 1), (0, 1)), 1),  # strided causal downsampling
        ((1, 2, 2), "SAME", 1),  # the discriminator's padding string
        ((2, 2, 2), ((1, 2), (1, 2), (1, 2)), 4),  # depthwise blur-pool
    ],
)
@pytest.mark.parametrize("impl", ["taps", "taps_chunked", "taps_phases", "stacked"])
def test_taps_equals_xla_3d_convolution_and_its_gradient(strides, padding, groups, impl, same_values_and_gradients):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8, 7, 4)), jnp.float32)  # frames of 56 <= 256 pixels: chunked
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4 // groups, 6 if groups == 1 else 4)), jnp.float32)
    same_values_and_gradients(lambda x, k, impl: conv3d(x, k, strides, padding, feature_group_count=groups,
                                                                impl=impl), x, k, impl)


def test_the_weight_gradient_is_chunked_only_when_the_batch_is_on_one_device():
    from mmgen.parallel.sharding import DEFAULT_RULES, axis_rules

    x = jnp.zeros((8, 3, 4, 4, 2), jnp.float32)  # 8 x 3 = 24 frames: weight gradient in chunks of 4
    k = jnp.zeros((3, 3, 3, 2, 2), jnp.float32)
    padding = ((2, 0), (1, 1), (1, 1))

    def convolutions(mesh_shape):
        mesh = jax.sharding.AbstractMesh(mesh_shape, ("data", "fsdp", "tensor"))
        with jax.sharding.use_abstract_mesh(mesh), axis_rules(DEFAULT_RULES):
            grad = jax.grad(lambda x, k: conv3d(x, k, (1, 1, 1), padding, impl="taps_chunked").sum(), argnums=(0, 1))
            return jax.jit(grad).lower(x, k).as_text().count("stablehlo.convolution")

    # Per tap: the input gradient and the weight gradient, in 6 chunks on one device (the
    # forward's value is not needed for the gradient of a sum).
    assert convolutions((1, 1, 2)) == 3 * (1 + 6)  # a tensor-parallel mesh keeps the batch whole
    assert convolutions((2, 1, 1)) == convolutions((1, 2, 1)) == 3 * (1 + 1)  # split batch: no chunks


@pytest.mark.parametrize(
    "x_shape,k_shape,strides,padding,dilation",
    [
        ((2, 17, 3), (4, 3, 5), (2,), "VALID", None),  # the codec's strided conv, odd length
        ((2, 19, 3), (16, 3, 5), (8,), ((8, 0),), None),  # kernel 2s, causal front padding
        ((2, 23, 3), (5, 3, 2), (3,), ((1, 3),), None),  # kernel not a multiple of the stride
        ((2, 17, 3), (7, 3, 5), (1,), ((6, 0),), (3,)),  # the residual units' dilated conv
        ((2, 16, 3), (3, 3, 2), (1,), "SAME", (9,)),  # dilation wider than half the input
        ((2, 11, 13, 2), (3, 9, 2, 4), (1, 2), "SAME", (2, 1)),  # STFT discriminator
        ((2, 11, 12, 2), (3, 3, 2, 4), (2, 2), ((0, 1), (0, 1)), None),  # strided downsampling
        ((2, 10, 9, 2), (3, 3, 2, 4), (3, 2), ((1, 1), (2, 0)), None),  # different strides per axis
        ((2, 12, 9, 2), (3, 2, 2, 4), (1, 1), "SAME", (4, 3)),  # dilated along both axes
        ((1, 5, 8, 7, 2), (3, 3, 3, 2, 3), (2, 2, 2), "SAME", None),  # 3D
    ],
)
def test_phases_equal_xla_convolution_and_its_gradients(x_shape, k_shape, strides, padding, dilation, same_values_and_gradients):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    same_values_and_gradients(
        lambda x, k, impl: conv(x, k, strides, padding, rhs_dilation=dilation, impl=impl), x, k, "phases")


@pytest.mark.parametrize("length,taps,stride", [(5, 4, 2), (3, 16, 8), (4, 10, 5), (6, 3, 3), (4, 5, 2)])
def test_causal_transposed_conv_phases_equal_xla_and_their_gradients(length, taps, stride, same_values_and_gradients):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, length, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(taps, 3, 4)), jnp.float32)
    same_values_and_gradients(
        lambda x, k, impl: causal_conv_transpose1d(x, k, stride, impl=impl), x, k, "phases")
    # The kept outputs are the first T s of the full transposed convolution.
    full = jax.lax.conv_transpose(x, k, (stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    np.testing.assert_allclose(causal_conv_transpose1d(x, k, stride, impl="phases"), full[:, : length * stride],
                               rtol=1e-5, atol=1e-5)


def test_blur_pool_separable_equals_depthwise_convolution_and_its_gradient():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 8, 6, 3)), jnp.float32)
    for downsample_time in (True, False):
        blur = BlurPool3d(downsample_time=downsample_time)
        w = jnp.asarray(np.random.default_rng(7).normal(size=blur(x, impl="conv").shape), jnp.float32)
        outs = {impl: jax.value_and_grad(lambda v, impl=impl: jnp.sum(jnp.sin(blur(v, impl=impl)) * w))(x)
                for impl in ("conv", "separable")}
        np.testing.assert_allclose(outs["separable"][0], outs["conv"][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs["separable"][1], outs["conv"][1], rtol=1e-5, atol=1e-5)


def test_phases_leave_what_they_do_not_rewrite_to_xla():
    """Feature groups, stride and dilation on one axis, transposed convs: XLA's op, same values."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 12, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)
    for kwargs in (dict(feature_group_count=2), dict(rhs_dilation=(2,)), dict(lhs_dilation=(2,))):
        kernel = k if "feature_group_count" in kwargs else jnp.concatenate([k, k], axis=1)
        np.testing.assert_allclose(conv(x, kernel, (2,), ((1, 1),), impl="phases", **kwargs),
                                   conv(x, kernel, (2,), ((1, 1),), impl="xla", **kwargs), rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match="impl"):
        conv(jnp.zeros((1, 4, 1)), jnp.zeros((3, 1, 1)), (2,), "SAME", impl="fast")


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


def test_cpu_forms_switch_off_by_name_and_come_back():
    from mmgen.nn import backend

    with pytest.raises(ValueError, match="unknown CPU forms"):
        with backend.without_cpu_forms("fast"):
            pass
    on_cpu = jax.default_backend() == "cpu"
    assert all(backend.cpu_forms(name) == on_cpu for name in backend.SWITCHABLE_FORMS)
    with backend.without_cpu_forms("phases"):
        assert not backend.cpu_forms("phases")
        assert backend.cpu_forms("separable_blur") == on_cpu
        assert backend.cpu_forms() == on_cpu
    assert backend.cpu_forms("phases") == on_cpu

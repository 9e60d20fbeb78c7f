"""mmgen's hand-written CPU kernels (``mmgen.nn.cpu_kernels``): the convolution built from them
equals XLA's, values and gradients; the build is cached per host and its absence falls back
to XLA's forms."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen.nn import cpu_kernels
from mmgen.nn.conv import causal_conv_transpose1d, conv, conv3d

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="mmgen's CPU kernels could not be built here")


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize(
    "x_shape,k_shape,strides,padding",
    [
        ((2, 5, 8, 7, 16), (3, 3, 3), (1, 1, 1), ((2, 0), (1, 1), (1, 1))),  # causal 3x3x3, odd width
        ((2, 9, 12, 12, 16), (3, 3, 3), (2, 2, 2), ((2, 0), (0, 1), (0, 1))),  # strided causal downsampling
        ((1, 5, 10, 9, 8), (3, 3, 3), (1, 2, 2), "SAME", ),  # a padding string, strided in space only
        ((2, 3, 6, 23, 3), (3, 3, 3), (1, 1, 1), ((2, 0), (1, 1), (1, 1))),  # RGB in; 23 = 16 + 4 + 2 + 1 positions
        ((1, 4, 5, 6, 20), (1, 1, 1), (1, 1, 1), ((0, 0), (0, 0), (0, 0))),  # 1x1x1; 20 = 16 + 4 input channels
        ((1, 3, 5, 5, 4), (1, 3, 3), (1, 1, 1), ((0, 0), (2, 1), (0, 2))),  # uneven padding, one temporal tap
    ],
)
@pytest.mark.parametrize("c_out", [16, 3, 8, 24, 32, 64, 48])
def test_the_kernel_convolution_equals_xla_values_and_gradients(x_shape, k_shape, strides, padding, c_out,
                                                                same_values_and_gradients):
    x = _normal(0, x_shape)
    k = _normal(1, k_shape + (x_shape[-1], c_out)) * 0.3
    same_values_and_gradients(lambda x, k, impl: conv3d(x, k, strides, padding, impl=impl), x, k, "kernel")


@pytest.mark.parametrize(
    "x_shape,k_shape,strides,padding,dilation",
    [
        ((2, 37, 16), (4, 16, 32), (2,), "VALID", None),  # the codec's strided conv, odd length
        ((2, 40, 3), (16, 3, 16), (8,), ((8, 0),), None),  # kernel 2s, causal front padding
        ((2, 41, 16), (7, 16, 16), (1,), ((18, 0),), (3,)),  # the residual units' dilated conv
        ((2, 33, 16), (1, 16, 1), (1,), "VALID", None),  # 1x1 to one channel (the waveform)
        ((2, 11, 13, 16), (3, 9, 16, 32), (1, 2), "SAME", (2, 1)),  # STFT discriminator
        ((2, 12, 9, 16), (3, 2, 16, 16), (1, 1), "SAME", (4, 3)),  # dilated along both axes
    ],
)
def test_kernel_1d_and_2d_convolutions_equal_xla_values_and_gradients(x_shape, k_shape, strides, padding, dilation,
                                                                       same_values_and_gradients):
    x = _normal(6, x_shape)
    k = _normal(7, k_shape) * 0.3
    same_values_and_gradients(lambda x, k, impl: conv(x, k, strides, padding, rhs_dilation=dilation, impl=impl),
                              x, k, "kernel")
    # The codec's decoder: a transposed conv's phases form is a stride-1 conv, the kernel's on CPU.
    if x_shape[1:] == (37, 16):
        up = jax.jit(lambda x, k: causal_conv_transpose1d(x, k, 2))
        assert cpu_kernels.CONV in up.lower(x, k).as_text()
        np.testing.assert_allclose(up(x, k), causal_conv_transpose1d(x, k, 2, impl="xla"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", [((0, 0), (0, 0), (0, 0)), ((2, 1), (3, 0), (1, 4)), ((-1, 2), (1, -2), (0, 3))])
def test_the_kernels_take_dilations_and_padding_and_the_weight_gradient_does_not_depend_on_the_threads(padding):
    x = _normal(3, (2, 9, 11, 12, 16))
    k = _normal(4, (2, 3, 3, 16, 32))
    strides, dilations = (1, 2, 1), (3, 1, 2)

    def xla(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilations,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    y = xla(x, k)
    np.testing.assert_allclose(cpu_kernels.conv(x, k, strides, dilations, padding), y, rtol=1e-4, atol=1e-4)
    dy = _normal(5, y.shape)
    dw = jax.jit(cpu_kernels.conv_weight_grad, static_argnums=(2, 3, 4, 5))
    first = dw(x, dy, k.shape[:3], strides, dilations, padding)
    np.testing.assert_allclose(first, jax.vjp(lambda w: xla(x, w), k)[1](dy)[0], rtol=1e-4, atol=1e-3)
    # The chunks are summed in a fixed order, whichever thread computed each.
    for _ in range(3):
        np.testing.assert_array_equal(dw(x, dy, k.shape[:3], strides, dilations, padding), first)


def test_the_kernels_refuse_other_dtypes_and_mismatched_shapes():
    with pytest.raises(TypeError, match="float32"):
        cpu_kernels.conv(jnp.zeros((1, 3, 3, 3, 16), jnp.bfloat16), jnp.zeros((1, 1, 1, 16, 16), jnp.bfloat16))
    with pytest.raises(ValueError, match="does not match the output"):
        cpu_kernels.conv_weight_grad(jnp.zeros((1, 3, 5, 5, 16)), jnp.zeros((1, 3, 5, 5, 16)), (3, 3, 3))
    # The kernel checks the geometry it is handed too (an output larger than the padded input).
    call = jax.ffi.ffi_call(cpu_kernels.CONV, jax.ShapeDtypeStruct((1, 3, 3, 3, 16), jnp.float32))
    with pytest.raises(Exception, match="output's size does not match"):
        call(jnp.zeros((1, 3, 3, 3, 16)), jnp.zeros((3, 3, 3, 16, 16)),
             **cpu_kernels._geometry((1, 1, 1), (1, 1, 1), cpu_kernels.NO_PADDING)).block_until_ready()


def test_auto_takes_the_kernels_for_one_device_and_the_taps_for_a_split_batch():
    from mmgen.nn.backend import without_cpu_forms
    from mmgen.parallel.sharding import DEFAULT_RULES, axis_rules

    x = jnp.zeros((4, 3, 8, 8, 16), jnp.float32)
    k = jnp.zeros((3, 3, 3, 16, 16), jnp.float32)

    def hlo(mesh_shape=None):
        grad = jax.jit(jax.grad(lambda x, k: conv3d(x, k, (1, 1, 1), ((2, 0), (1, 1), (1, 1))).sum(), (0, 1)))
        if mesh_shape is None:
            return grad.lower(x, k).as_text()
        mesh = jax.sharding.AbstractMesh(mesh_shape, ("data", "fsdp", "tensor"))
        with jax.sharding.use_abstract_mesh(mesh), axis_rules(DEFAULT_RULES):
            return grad.lower(x, k).as_text()

    assert cpu_kernels.CONV_WEIGHT_GRAD in hlo() and cpu_kernels.CONV in hlo()
    assert "mmgen_conv" not in hlo((2, 1, 1)) and "stablehlo.convolution" in hlo((2, 1, 1))
    assert cpu_kernels.CONV in hlo((1, 1, 2))  # tensor-parallel: the batch stays whole
    with without_cpu_forms("conv_kernels"):
        assert "mmgen_conv" not in hlo()
    with pytest.raises(ValueError, match="impl='kernel' takes float32"):
        conv3d(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (1, 1, 1), "SAME", impl="kernel")


def test_the_build_is_cached_per_host_and_without_a_compiler_the_layers_keep_xla(tmp_path):
    env = dict(os.environ, MMGEN_KERNEL_CACHE=str(tmp_path / "cache"))
    built = subprocess.run([sys.executable, "-c", "from mmgen.nn import cpu_kernels; print(cpu_kernels.build())"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.dirname(built) == str(tmp_path / "cache") and built.endswith(".so")
    assert os.listdir(tmp_path / "cache") == [os.path.basename(built)]  # no partial file left behind
    # Without a compiler (and an empty cache), or switched off, the layers keep XLA's forms.
    probe = ("import logging; logging.basicConfig(); import jax.numpy as jnp; "
             "from mmgen.nn import cpu_kernels, conv; print(cpu_kernels.available()); "
             "x = jnp.zeros((1, 3, 4, 4, 16)); k = jnp.zeros((3, 3, 3, 16, 16)); "
             "print(conv.conv3d(x, k, (1, 1, 1), 'SAME').shape)")
    for extra in ({"CXX": "/bin/false", "MMGEN_KERNEL_CACHE": str(tmp_path / "empty")}, {"MMGEN_CPU_KERNELS": "0"}):
        out = subprocess.run([sys.executable, "-c", probe], env=dict(env, **extra), capture_output=True, text=True,
                             check=True)
        assert out.stdout.split("\n")[:2] == ["False", "(1, 3, 4, 4, 16)"]
        if "CXX" in extra:
            assert "false failed" in out.stderr and out.stderr.count("unavailable") == 1
    rebuilt = subprocess.run([sys.executable, "-c", "from mmgen.nn import cpu_kernels; print(cpu_kernels.build())"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert rebuilt == built


def test_the_tokenizers_flops_count_the_convolutions_the_kernels_compute():
    from mmgen import config as config_lib
    from mmgen.families import tokenizer as tok
    from mmgen.nn.backend import without_cpu_forms

    cfg = config_lib.load_config("configs/tokenizer/video.py:tiny", [])
    with without_cpu_forms("conv_kernels"):
        on_xla = tok.flops_per_example(cfg)
    assert tok.flops_per_example(cfg) == pytest.approx(on_xla) and on_xla > 1e9


@pytest.mark.parametrize("shape,groups,reduce_axes", [
    ((2, 3, 5, 7, 16), 4, (-3, -2)),  # frames of 35 positions x 16 channels
    ((2, 3, 5, 7, 24), 3, (-3, -2)),  # 24 channels: 840 per frame, not a multiple of 16 (a scalar tail)
    ((1, 2, 4, 4, 8), 2, (-3, -2)),
    ((2, 4, 6, 6, 32), 8, (-3, -2)),
    ((3, 50, 16), 4, (-2,)),  # a 1D signal's GroupNorm
])
def test_the_fused_group_norm_swish_equals_xla_values_and_gradients(shape, groups, reduce_axes):
    from flax import nnx

    from mmgen.nn.backend import without_cpu_forms
    from mmgen.nn.conv import GroupNorm

    norm = nnx.eval_shape(lambda: GroupNorm(shape[-1], groups, reduce_axes=reduce_axes))
    graph, state = nnx.split(norm)
    c = shape[-1]
    state = jax.tree.map(lambda a: _normal(8 + a.ndim, a.shape) * 0.5 + (1.0 if a.shape == (c,) else 0.0), state)
    x = _normal(10, shape) * 2.0 + 0.7
    weights = _normal(11, shape)

    def loss(state, x):
        return jnp.sum(nnx.merge(graph, state).swish(x) * weights)

    fused = jax.jit(jax.value_and_grad(loss, (0, 1)))
    assert cpu_kernels.GROUP_NORM_SWISH in fused.lower(state, x).as_text()
    with without_cpu_forms("conv_kernels"):
        reference = jax.jit(jax.value_and_grad(loss, (0, 1)))
        assert cpu_kernels.GROUP_NORM_SWISH not in reference.lower(state, x).as_text()
        (value_xla, grads_xla) = reference(state, x)
    value, grads = fused(state, x)
    np.testing.assert_allclose(value, value_xla, rtol=1e-5, atol=1e-3)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nnx.merge(graph, state).swish(x), jax.nn.swish(nnx.merge(graph, state)(x)),
                               rtol=1e-5, atol=1e-5)

"""Checks that need an NVIDIA GPU (skipped elsewhere): cuDNN's fused attention is the same
function as XLA's, with a key mask, in the forward pass and the gradients.

    JAX_PLATFORMS=cuda pytest tests/test_gpu.py   # on a GPU machine (conftest.py defaults to CPU)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen.nn import backend
from mmgen.nn.attention import attention

pytestmark = pytest.mark.skipif(not backend.cudnn_kernels(), reason="needs an NVIDIA GPU with cuDNN")


@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_attention_equals_xla_attention(masked):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (2, 134, 4, 64)  # even lengths (a mask becomes a bias), head size 64
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in (kq, kk, kv))
    mask = None
    if masked:  # the second clip's last 34 keys absent, as an absent modality is
        mask = jnp.ones((2, 1, 1, 134), bool).at[1, ..., 100:].set(False)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, impl=impl).astype(jnp.float32)))

    out = attention(q, k, v, mask, impl="cudnn").astype(jnp.float32)
    ref = attention(q, k, v, mask, impl="dot_product_attention").astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
    assert attention(q, k, v, mask).dtype == jnp.bfloat16  # "auto" takes cuDNN here
    for g, g_ref in zip(jax.grad(loss("cudnn"), (0, 1, 2))(q, k, v),
                        jax.grad(loss("dot_product_attention"), (0, 1, 2))(q, k, v)):
        g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
        assert np.abs(g - g_ref).max() <= 0.05 * np.abs(g_ref).max() + 1e-3
    if masked:  # an absent key changes nothing
        moved = attention(q, k.at[1, 120].add(3.0), v.at[1, 120].add(3.0), mask, impl="cudnn")
        np.testing.assert_array_equal(np.asarray(moved[1], np.float32), np.asarray(out[1]))

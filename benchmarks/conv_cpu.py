"""The two CPU kernels that bound the video tokenizer: 3D convolution and GroupNorm.

    python benchmarks/conv_cpu.py

Times forward + backward (best of 5 after a warm-up) of a causal 3x3x3 16 -> 16
convolution on a batch of 8 tiny clips (9 x 32 x 32), as XLA's 3D convolution and as
``mmgen.nn.conv.conv3d(impl="taps")`` (one 2D convolution per temporal tap), and of
GroupNorm (8 groups, per-frame statistics) written directly and as
``mmgen.nn.conv.GroupNorm`` (per-channel reductions, closed-form gradient).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mmgen.nn.conv import GroupNorm, conv3d
from mmgen.parallel import runtime


def best_seconds(fn, *args, iters: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def direct_group_norm(x, groups: int = 8, eps: float = 1e-6):
    b, t, h, w, c = x.shape
    g = x.reshape(b, t, h, w, groups, c // groups)
    mean = g.mean(axis=(2, 3, 5), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(2, 3, 5), keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)


def main() -> None:
    runtime.set_flags()
    rng = np.random.default_rng(0)
    b, t, h, w, c = 8, 9, 32, 32, 16
    x = jnp.asarray(rng.normal(size=(b, t + 2, h, w, c)), jnp.float32)  # 2 causal front frames
    k = jnp.asarray(rng.normal(size=(3, 3, 3, c, c)), jnp.float32)
    flops = 3 * 2 * b * t * h * w * 27 * c * c  # forward + backward
    print(f"device: {jax.devices()[0].device_kind}; conv fwd+bwd {flops / 1e9:.2f} GFLOP")
    for impl in ("xla", "taps"):
        def loss(x, k, impl=impl):
            return jnp.sum(jnp.square(conv3d(x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), impl=impl)))
        s = best_seconds(jax.jit(jax.grad(loss, argnums=(0, 1))), x, k)
        print(f"conv3d impl={impl:4s}: {s * 1e3:7.1f} ms  {flops / s / 1e9:5.1f} GFLOP/s")
    y = x[:, 2:]
    norm = GroupNorm(c, 8, use_affine=False)
    for name, fn in (("direct", direct_group_norm), ("mmgen", norm)):
        fwd = best_seconds(jax.jit(fn), y)
        bwd = best_seconds(jax.jit(jax.grad(lambda v, fn=fn: jnp.sum(jnp.square(fn(v))))), y)
        print(f"GroupNorm {name:6s}: forward {fwd * 1e3:6.2f} ms, forward+backward {bwd * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()

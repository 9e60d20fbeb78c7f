"""Self-attention on CPU: ``jax.nn.dot_product_attention`` vs the heads-major and blockwise forms.

    python -m benchmarks.attention_cpu

Times forward and forward + backward (best of 5 after a warm-up) of
``mmgen.nn.attention.attention`` with ``impl="dot_product_attention"``,
``impl="heads_major"`` and ``impl="blockwise"`` (the CPU default) at the shapes of the performance target (batch 4, sequence
1026, width 512) with 8 heads of 64 and 4 heads of 128, next to the 2048^3 float32
matmul that serves as the peak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.conv_cpu import best_seconds
from mmgen.nn.attention import attention
from mmgen.parallel import runtime

BATCH, SEQ, WIDTH = 4, 1026, 512


def main() -> None:
    runtime.set_flags()
    a = jnp.ones((2048, 2048), jnp.float32)
    peak = 2 * 2048**3 / best_seconds(jax.jit(lambda a: a @ a), a)
    print(f"matmul peak (float32, 2048^3): {peak / 1e9:.1f} GFLOP/s")
    for heads in (8, 4):
        dim = WIDTH // heads
        q, k, v = (jax.random.normal(key, (BATCH, SEQ, heads, dim)) for key in jax.random.split(jax.random.key(0), 3))
        fwd_flops = 4 * BATCH * heads * SEQ * SEQ * dim  # two matmuls
        for impl in ("dot_product_attention", "heads_major", "blockwise"):
            forward = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, impl=impl))
            both = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(attention(q, k, v, impl=impl) ** 2),
                                    argnums=(0, 1, 2)))
            t_fwd, t_both = best_seconds(forward, q, k, v), best_seconds(both, q, k, v)
            print(f"{heads} heads of {dim}, {impl:>21}: forward {t_fwd * 1e3:6.0f} ms "
                  f"({fwd_flops / t_fwd / 1e9:5.1f} GFLOP/s), forward + backward {t_both * 1e3:6.0f} ms "
                  f"({3 * fwd_flops / t_both / 1e9:5.1f} GFLOP/s)")


if __name__ == "__main__":
    main()

"""The convolutions of the tiny tokenizers on CPU: forward vs backward, per kernel form.

    python -m benchmarks.conv_cpu [--reps 7] [--only video|audio|legacy]

For every convolution shape the tiny video and audio tokenizers train with (batch 8;
video 9 x 32 x 32 clips, audio 18000 samples and the STFT discriminator's three
spectrograms), times three passes separately, each as its own jitted function:

- forward ``y = conv(x, k)``;
- input gradient ``dx = vjp_x(dy)``;
- weight gradient ``dk = vjp_k(dy)``;

through each kernel form that can compute it: ``xla`` (``lax.conv_general_dilated``:
XLA:CPU's own lowering; for 3D shapes XLA's 3D convolution), ``taps`` (3D as one 2D
conv per temporal tap, ``mmgen.nn.conv.conv3d``), ``phases`` / ``taps_phases`` (strided,
dilated and causal transposed convs as stride-1 convs of a rearranged input,
``mmgen.nn.conv.conv``, ``causal_conv_transpose1d``), ``separable`` (the blur-pool as
strided slices, ``mmgen.nn.conv.BlurPool3d``; its filter is fixed, no weight gradient),
``kernel`` (mmgen's hand-written CPU kernels, ``mmgen.nn.cpu_kernels``: what ``"auto"``
takes on one CPU device where they are built; the transposed convs' phases form with
the kernel's stride-1 convolution). All
forms and passes of one shape alternate call by call (``benchmarks.harness.alternate``),
so a drifting machine falls on all of them alike; each cell is the median of ``--reps``
calls, as GFLOP/s of the convolution's useful FLOPs ``2 * |y| * K * C_in / groups``
(the same count for every form, whatever it computes in zero taps).

``--only legacy`` runs the older comparison (3D conv vs taps forward + backward, and
GroupNorm written directly vs ``mmgen.nn.conv.GroupNorm``).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from mmgen.nn.conv import BlurPool3d, GroupNorm, causal_conv_transpose1d, conv, conv3d
from mmgen.parallel import runtime

# name, x shape, kernel shape, strides, padding, rhs dilation, groups, forms
B = 8
TRANSPOSED = "causal transposed"  # padding of the rows for causal_conv_transpose1d
VIDEO = [
    ("video causal 3x3x3 16->16, 9x32x32", (B, 11, 32, 32, 16), (3, 3, 3, 16, 16), (1, 1, 1),
     ((0, 0), (1, 1), (1, 1)), None, 1, ("xla", "taps", "taps_chunked", "stacked", "kernel")),
    ("video downsample 3x3x3 /2 16->16, 9x32x32", (B, 11, 32, 32, 16), (3, 3, 3, 16, 16), (2, 2, 2),
     ((0, 0), (0, 1), (0, 1)), None, 1, ("xla", "taps", "taps_chunked", "taps_phases", "stacked", "kernel")),
    ("video causal 3x3x3 32->32, 5x16x16", (B, 7, 16, 16, 32), (3, 3, 3, 32, 32), (1, 1, 1),
     ((0, 0), (1, 1), (1, 1)), None, 1, ("xla", "taps", "taps_chunked", "stacked", "kernel")),
    ("video downsample 3x3x3 /2 32->32, 5x16x16", (B, 7, 16, 16, 32), (3, 3, 3, 32, 32), (2, 2, 2),
     ((0, 0), (0, 1), (0, 1)), None, 1, ("xla", "taps", "taps_chunked", "taps_phases", "stacked", "kernel")),
    ("disc. blur-pool 4x4x4 /2 depthwise 16, 9x32x32", (B, 9, 32, 32, 16), (4, 4, 4, 1, 16), (2, 2, 2),
     ((1, 2), (1, 2), (1, 2)), None, 16, ("xla", "taps", "separable")),
]
AUDIO = [
    ("codec residual k7 dil 3, 4 ch, 18240", (B, 18258, 4), (7, 4, 4), (1,), ((0, 0),), (3,), 1, ("xla", "phases", "kernel")),
    ("codec residual k7 dil 9, 8 ch, 9120", (B, 9174, 8), (7, 8, 8), (1,), ((0, 0),), (9,), 1, ("xla", "phases", "kernel")),
    ("codec residual k7 dil 9, 32 ch, 456", (B, 510, 32), (7, 32, 32), (1,), ((0, 0),), (9,), 1, ("xla", "phases", "kernel")),
    ("codec down k4 /2 4->8, 18240", (B, 18242, 4), (4, 4, 8), (2,), ((0, 0),), None, 1, ("xla", "phases", "kernel")),
    ("codec down k8 /4 8->16, 9120", (B, 9124, 8), (8, 8, 16), (4,), ((0, 0),), None, 1, ("xla", "phases", "kernel")),
    ("codec down k16 /8 32->64, 456", (B, 464, 32), (16, 32, 64), (8,), ((0, 0),), None, 1, ("xla", "phases", "kernel")),
    ("codec up transposed k4 x2 8->4, 9120", (B, 9120, 8), (4, 8, 4), (2,), TRANSPOSED, None, 1, ("xla", "phases", "kernel")),
    ("codec up transposed k8 x4 16->8, 2280", (B, 2280, 16), (8, 16, 8), (4,), TRANSPOSED, None, 1, ("xla", "phases", "kernel")),
    ("codec up transposed k16 x8 64->32, 57", (B, 57, 64), (16, 64, 32), (8,), TRANSPOSED, None, 1,
     ("xla", "phases", "kernel")),
    ("STFT-D 512 (3,9) /(1,2) dil (1,1) 8->8, 141x257", (B, 141, 257, 8), (3, 9, 8, 8), (1, 2), "SAME", (1, 1), 1,
     ("xla", "phases", "kernel")),
    ("STFT-D 512 (3,9) /(1,2) dil (2,1) 8->8, 141x129", (B, 141, 129, 8), (3, 9, 8, 8), (1, 2), "SAME", (2, 1), 1,
     ("xla", "phases", "kernel")),
    ("STFT-D 512 (3,9) /(1,2) dil (4,1) 8->8, 141x65", (B, 141, 65, 8), (3, 9, 8, 8), (1, 2), "SAME", (4, 1), 1,
     ("xla", "phases", "kernel")),
    ("STFT-D 128 (3,9) /(1,2) dil (1,1) 8->8, 563x65", (B, 563, 65, 8), (3, 9, 8, 8), (1, 2), "SAME", (1, 1), 1,
     ("xla", "phases", "kernel")),
]


def _conv_fn(form: str, strides, padding, dilation, groups):
    if padding == TRANSPOSED:
        return lambda x, k: causal_conv_transpose1d(x, k, strides[0], impl=form)
    if form == "separable":  # the blur-pool's fixed binomial filter (the kernel is not an input)
        blur = BlurPool3d(downsample_time=strides[0] == 2)
        return lambda x, k: blur(x, impl="separable")
    if form in ("taps", "taps_chunked", "taps_phases", "stacked") or (form in ("xla", "kernel") and len(strides) == 3):
        return lambda x, k: conv3d(x, k, strides, padding, feature_group_count=groups, impl=form)
    return lambda x, k: conv(x, k, strides, padding, rhs_dilation=dilation, feature_group_count=groups, impl=form)


def measure_shape(name, x_shape, k_shape, strides, padding, dilation, groups, forms, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    calls, labels = [], []
    y = None
    for form in forms:
        f = _conv_fn(form, strides, padding, dilation, groups)
        y = jax.eval_shape(f, x, k)
        dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        fwd = jax.jit(f)
        d_in = jax.jit(lambda x, k, dy, f=f: jax.vjp(lambda v: f(v, k), x)[1](dy)[0])
        d_w = jax.jit(lambda x, k, dy, f=f: jax.vjp(lambda v: f(x, v), k)[1](dy)[0])
        calls += [functools.partial(fwd, x, k), functools.partial(d_in, x, k, dy)]
        labels += [(form, "forward"), (form, "input grad")]
        if form != "separable":
            calls.append(functools.partial(d_w, x, k, dy))
            labels.append((form, "weight grad"))
    if padding == TRANSPOSED:  # every input meets every tap once
        flops = 2.0 * float(np.prod(x_shape)) * float(np.prod(k_shape[:1] + k_shape[2:]))
    else:
        flops = 2.0 * float(np.prod(y.shape)) * float(np.prod(k_shape[:-1]))
    times = harness.alternate(calls, reps)
    rows = {}
    for (form, kind), ts in zip(labels, times):
        s = harness.summary(ts)
        rows.setdefault(form, {})[kind] = {"ms": s["median"] * 1e3, "gflops": flops / s["median"] / 1e9,
                                           "min_ms": s["min"] * 1e3, "max_ms": s["max"] * 1e3}
    return [{"shape": name, "form": form, "gflop": flops / 1e9, **passes} for form, passes in rows.items()]


def print_rows(rows: list[dict]) -> None:
    print("| conv (batch 8) | form | GFLOP | forward ms (GFLOP/s) | input grad ms (GFLOP/s) | weight grad ms (GFLOP/s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[p]['ms']:.2f} ({r[p]['gflops']:.1f})" if p in r else "-"
                           for p in ("forward", "input grad", "weight grad"))
        print(f"| {r['shape']} | {r['form']} | {r['gflop']:.3f} | {cells} |", flush=True)


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


def legacy() -> None:
    """3D conv vs taps (forward + backward, best of 5) and GroupNorm, on 8 x 9 x 32 x 32 x 16."""
    rng = np.random.default_rng(0)
    b, t, h, w, c = 8, 9, 32, 32, 16
    x = jnp.asarray(rng.normal(size=(b, t + 2, h, w, c)), jnp.float32)  # 2 causal front frames
    k = jnp.asarray(rng.normal(size=(3, 3, 3, c, c)), jnp.float32)
    flops = 3 * 2 * b * t * h * w * 27 * c * c  # forward + backward
    print(f"conv fwd+bwd {flops / 1e9:.2f} GFLOP")
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--only", choices=("video", "audio", "legacy"), default=None)
    args = p.parse_args(argv)
    runtime.set_flags()
    print(f"device: {jax.devices()[0].device_kind}; CPU {harness.cpu_model()}; {harness.threads()}", flush=True)
    if args.only == "legacy":
        legacy()
        return
    rows = []
    for name, shapes in (("video", VIDEO), ("audio", AUDIO)):
        if args.only in (None, name):
            for spec in shapes:
                rows += measure_shape(*spec, reps=args.reps)
    print_rows(rows)


if __name__ == "__main__":
    main()

"""The tiny tokenizer train steps on CPU with and without the switchable CPU conv forms.

    python -m benchmarks.tokenizer_cpu [--reps 5] [--only video|audio]

For ``configs/tokenizer/video.py:tiny`` and ``configs/tokenizer/audio.py:tiny`` (batch 8,
GAN on from step 0: generator + discriminator + EMA, as ``benchmarks.run``'s tokenizer
rows), compiles the step twice in one process: once inside
``mmgen.nn.backend.without_cpu_forms(*SWITCHABLE_FORMS)`` (``before``: XLA's strided,
dilated and transposed convolutions, the depthwise blur-pool convolution, and the
per-tap 3D convs with XLA's own weight gradient; ``--switch-off NAME...`` switches off
only those) and once as it runs by default (``after``). The two steps and a 2048^3 matmul peak reading then
alternate call by call (``benchmarks.harness.alternate``); each is reported as median
(min-max) seconds, with the per-round speed-up ``before / after``.
"""

from __future__ import annotations

import argparse

from benchmarks import harness
from benchmarks.run import tokenizer_step_bench
from mmgen.nn import backend
from mmgen.parallel import runtime

SPECS = {"video": "configs/tokenizer/video.py:tiny", "audio": "configs/tokenizer/audio.py:tiny"}


def main(argv=None) -> None:
    import jax.numpy as jnp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--only", choices=sorted(SPECS), default=None)
    p.add_argument("--switch-off", nargs="+", choices=backend.SWITCHABLE_FORMS, default=backend.SWITCHABLE_FORMS,
                   help="the forms that 'before' is compiled without (default: all)")
    args = p.parse_args(argv)
    runtime.set_flags()
    print(f"CPU {harness.cpu_model()}; {harness.threads()}", flush=True)
    peak_call, peak_flops = harness.matmul_call(jnp.float32, 2048)
    for name, spec in SPECS.items():
        if args.only not in (None, name):
            continue
        with backend.without_cpu_forms(*args.switch_off):
            before = tokenizer_step_bench(spec, args.batch)
        after = tokenizer_step_bench(spec, args.batch)
        times = harness.alternate([before["call"], after["call"], peak_call], args.reps)
        peaks = [peak_flops / t / 1e9 for t in times[2]]
        flops = after["flops"]
        print(f"{spec} (batch {args.batch}, {flops / 1e9:.1f} model GFLOP per step; before: without "
              f"{', '.join(args.switch_off)}; compile before "
              f"{before['first_compile_s']:.0f} s, after {after['first_compile_s']:.0f} s)")
        for label, ts in (("before", times[0]), ("after", times[1])):
            s = harness.summary(ts)
            print(f"  {label:6s}: {s['median']:.3f} s ({s['min']:.3f}-{s['max']:.3f}), "
                  f"{flops / s['median'] / 1e9:.1f} GFLOP/s")
        r = harness.ratio_per_round(times[1], times[0])
        print(f"  speed-up before/after per round: {harness.ratio_text(r)}; "
              f"matmul peak readings {min(peaks):.0f}-{max(peaks):.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()

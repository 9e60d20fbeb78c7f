"""Train steps on the CPU with and without glibc's huge-page malloc (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

    python -m benchmarks.host_malloc [--rounds 3] [--steps 6] [--which tokenizer transformer]

The tunable has to be in a process's environment when it starts, so each side runs in a
fresh process of its own (``GLIBC_TUNABLES=""``, glibc's defaults, against
``HUGE_PAGES``), the two alternating round by round. XLA:CPU allocates each step's
buffers with ``malloc`` and frees them after the step; glibc maps blocks above 32 MiB
afresh each time, so every step faults its buffers in as new 4 KiB pages. With the
tunable glibc asks for transparent huge pages on those mappings (where the kernel's
``transparent_hugepage`` mode is ``madvise`` or ``always``). mmgen does not set it
(BENCHMARKS.md "Host memory pages": fewer faults, no faster steps on the 2-core VM);
this measures it on another host. Each process compiles one step, runs it once, then times
``--steps`` steps and reports their median, the minor page faults and the kernel and user
CPU seconds per step (``getrusage``), and its peak resident memory. Steps:

- ``tokenizer``: ``configs/tokenizer/video.py:tiny,gan=0`` at 17x64x64, batch 4 (the
  magvit2-pytorch comparison's shape);
- ``transformer``: w512 x 4 layers x 8 heads over a 4x16x16 token grid, batch 4 (the
  torch comparison's shape).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from benchmarks import harness

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def child(which: str, steps: int) -> dict:
    import jax

    from benchmarks import run
    from mmgen.parallel import runtime

    runtime.set_flags()
    if which == "tokenizer":
        bench = run.tokenizer_step_bench("configs/tokenizer/video.py:tiny,gan=0", 4,
                                         ("dataset.frames=17", "dataset.resolution=64"))
    else:
        bench = run.transformer_step_bench(run.transformer_config(512, 4, 8, (4, 16, 16), vocab=1024), 4)
    jax.block_until_ready(bench["call"]())  # the warm-up, outside the counted steps
    before = resource.getrusage(resource.RUSAGE_SELF)
    (times,) = harness.alternate([bench["call"]], steps, warmup=0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"median_s": harness.summary(times)["median"],
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
            "user_s_per_step": (after.ru_utime - before.ru_utime) / steps,
            "peak_rss_mb": after.ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--which", nargs="+", default=["tokenizer", "transformer"], choices=["tokenizer", "transformer"])
    p.add_argument("--child", choices=["tokenizer", "transformer"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    sides = {"glibc defaults": "", "huge pages": HUGE_PAGES}
    th = harness.threads()
    print(f"CPU: {harness.cpu_model()}; {th['usable_cores']} usable cores; load {th['load_1min']:.1f}")
    for which in args.which:
        rows = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, tunables in sides.items():
                out = subprocess.run([sys.executable, "-m", "benchmarks.host_malloc", "--child", which,
                                      "--steps", str(args.steps)], env={**os.environ, "GLIBC_TUNABLES": tunables},
                                     capture_output=True, text=True, check=True).stdout
                rows[name].append(json.loads(out.strip().splitlines()[-1]))
        print(f"\n{which} step, {args.rounds} processes per side, alternating; medians over the processes")
        print("| malloc | s/step (per process) | page faults/step | kernel s/step | user s/step | peak RSS MB |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name, runs in rows.items():
            med = {k: harness.summary([r[k] for r in runs])["median"] for k in runs[0]}
            per = ", ".join(f"{r['median_s']:.2f}" for r in runs)
            print(f"| {name} | {med['median_s']:.3f} ({per}) | {med['faults_per_step']:.0f} | "
                  f"{med['sys_s_per_step']:.2f} | {med['user_s_per_step']:.2f} | {med['peak_rss_mb']:.0f} |")
        ratio = harness.ratio_per_round([r["median_s"] for r in rows["huge pages"]],
                                        [r["median_s"] for r in rows["glibc defaults"]])
        print(f"huge pages' speed over glibc's defaults, per round: {harness.ratio_text(ratio)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    raise SystemExit(main())

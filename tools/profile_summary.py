"""What dominates a profile: the top XLA ops of a ``jax.profiler`` trace, by total time.

    python tools/profile_summary.py WORKDIR_OR_PROFILE_DIR [--top 15]

Reads the newest ``perfetto_trace.json.gz`` under the directory (``config.profile`` writes
one into ``workdir/profile``, ``benchmarks.run --profile DIR`` one per benchmark) and
prints, for the annotated steps it holds (``StepTraceAnnotation``), the mean step time
and the ops that took the most time: each op's total over the steps, its share of the
summed op time, and how often it ran. Op events are the executable's instructions
(``dot.3``, ``convolution.1``, ``multiply_add_fusion.12``, ...); Python and runtime
events are left out. No TensorBoard plugin needed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

OP = re.compile(r"^[a-z_][a-z0-9_\-]*(\.\d+)*$")  # HLO instruction names
NOT_OPS = {"train", "shard_args"}  # step annotations, runtime events


def newest_trace(path: str) -> str:
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"profile_summary: no perfetto_trace.json.gz under {path}")
    return max(found, key=os.path.getmtime)


def summarize(path: str, top: int = 15) -> dict:
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    steps = [e for e in events if e.get("ph") == "X" and "step_num" in (e.get("args") or {})]
    names = {e.get("name") for e in steps} | NOT_OPS
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name not in names and OP.match(name):
            total[name] += float(e.get("dur", 0.0))
            count[name] += 1
    op_us = sum(total.values())
    return {"trace": path, "steps": len(steps),
            "step_ms": (sum(float(e["dur"]) for e in steps) / len(steps) / 1e3) if steps else None,
            "op_ms_per_step": op_us / max(len(steps), 1) / 1e3,
            "top": [(n, total[n] / max(len(steps), 1) / 1e3, total[n] / op_us if op_us else 0.0, count[n])
                    for n, _ in total.most_common(top)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a workdir, its profile/ folder, or a benchmark's --profile folder")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    s = summarize(newest_trace(args.path), args.top)
    step = f"{s['step_ms']:.1f} ms per step" if s["step_ms"] is not None else "no step annotations"
    print(f"{s['trace']}: {s['steps']} steps, {step}, ops {s['op_ms_per_step']:.1f} ms per step")
    print(f"{'op':48s} {'ms/step':>9s} {'share':>7s} {'runs':>6s}")
    for name, ms, share, runs in s["top"]:
        print(f"{name:48s} {ms:9.2f} {share:7.1%} {runs:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

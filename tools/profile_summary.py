"""What dominates a profile: the top XLA ops of a ``jax.profiler`` trace, by total time.

    python tools/profile_summary.py WORKDIR_OR_PROFILE_DIR [--top 15] [--hlo XLA_DUMP_DIR]

Reads the newest ``perfetto_trace.json.gz`` under the directory (``config.profile`` writes
one into ``workdir/profile``, ``benchmarks.run --profile DIR`` one per benchmark) and
prints, for the annotated steps it holds (``StepTraceAnnotation``), the mean step time
and the ops that took the most time: each op's time per step (summed over the process's
devices), its share of the summed op time, and how often it ran. Op events are the executable's instructions
(``dot.3``, ``convolution.1``, ``multiply_add_fusion.12``, ...); Python and runtime
events are left out. No TensorBoard plugin needed.

With ``--hlo``, the directory of an XLA dump of the same run (``XLA_FLAGS="--xla_dump_to=DIR
--xla_dump_hlo_as_text"``), each op is named by what it computes: its kind (``matmul`` for
a fusion around a ``dot``, ``convolution``, ``reduction``, ``elementwise``, or the op itself:
``copy``, ``transpose``, ``while``, ...), its output shape and the JAX operation it came from
(``metadata op_name``), and the time is also summed per kind.
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


INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s(?P<op>[a-z][\w\-]*)\(")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


def read_hlo(directory: str, module: str) -> dict:
    """``{instruction: (kind, shape, source)}`` from the largest optimised HLO text of ``module`` in a dump."""
    files = glob.glob(os.path.join(directory, f"*.{module}.*after_optimizations.txt"))
    if not files:
        raise SystemExit(f"profile_summary: no *{module}*after_optimizations.txt in {directory}")
    ops_of, instructions, computation = collections.defaultdict(set), {}, None
    with open(max(files, key=os.path.getsize)) as f:
        for line in f:
            m = COMPUTATION.match(line)
            if m and "=" not in line.split("{")[0]:
                computation = m["name"]
                continue
            m = INSTRUCTION.match(line)
            if not m:
                continue
            ops_of[computation].add(m["op"])
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            source = re.search(r'op_name="([^"]*)"', line)
            instructions[m["name"]] = (m["op"], calls[1] if calls else None, m["shape"].split("{")[0],
                                       source[1] if source else "")
    out = {}
    for name, (op, calls, shape, source) in instructions.items():
        kind = op
        if op == "fusion" and calls:
            inner = ops_of.get(calls, set())
            kind = ("matmul" if "dot" in inner else "convolution" if "convolution" in inner else
                    "reduction" if inner & {"reduce", "reduce-window", "scatter"} else "elementwise")
        elif op == "dot":
            kind = "matmul"
        parts = [p for p in source.split("/") if p and not p.startswith("jit(")]
        out[name] = (kind, shape, "/".join(parts[-3:]))
    return out


def summarize(path: str, top: int = 15, hlo: str | None = None) -> dict:
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    steps = [e for e in events if e.get("ph") == "X" and "step_num" in (e.get("args") or {})]
    names = {e.get("name") for e in steps} | NOT_OPS
    by_module = collections.Counter()
    ops = []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name not in names and OP.match(name):
            module = (e.get("args") or {}).get("hlo_module", "")
            ops.append((module, name, float(e.get("dur", 0.0))))
            by_module[module] += float(e.get("dur", 0.0))
    module = by_module.most_common(1)[0][0] if by_module else ""  # the step's executable
    total, count = collections.Counter(), collections.Counter()
    for m, name, us in ops:
        if m == module:
            total[name] += us
            count[name] += 1
    op_us = sum(total.values())
    about = read_hlo(hlo, module) if hlo else {}
    kinds = collections.Counter()
    for name, us in total.items():
        kinds[about.get(name, ("?",))[0]] += us
    return {"trace": path, "steps": len(steps), "module": module,
            "other_ms_per_step": (sum(by_module.values()) - op_us) / max(len(steps), 1) / 1e3,
            "kinds": [(k, us / max(len(steps), 1) / 1e3, us / op_us if op_us else 0.0) for k, us in kinds.most_common()],
            "about": {n: about[n] for n, _ in total.most_common(top) if n in about},
            "step_ms": (sum(float(e["dur"]) for e in steps) / len(steps) / 1e3) if steps else None,
            "op_ms_per_step": op_us / max(len(steps), 1) / 1e3,
            "top": [(n, total[n] / max(len(steps), 1) / 1e3, total[n] / op_us if op_us else 0.0, count[n])
                    for n, _ in total.most_common(top)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a workdir, its profile/ folder, or a benchmark's --profile folder")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--hlo", help="an XLA dump directory of the same run (--xla_dump_to, --xla_dump_hlo_as_text)")
    args = p.parse_args(argv)
    s = summarize(newest_trace(args.path), args.top, args.hlo)
    step = f"{s['step_ms']:.1f} ms per step" if s["step_ms"] is not None else "no step annotations"
    print(f"{s['trace']}: {s['steps']} steps, {step}; ops of {s['module']} {s['op_ms_per_step']:.1f} ms per step "
          f"(other executables {s['other_ms_per_step']:.1f} ms)")
    if args.hlo:
        print("by kind: " + ", ".join(f"{k} {ms:.1f} ms ({share:.0%})" for k, ms, share in s["kinds"]))
    print(f"{'op':32s} {'ms/step':>9s} {'share':>7s} {'runs':>5s}" + ("  kind, shape, from" if args.hlo else ""))
    for name, ms, share, runs in s["top"]:
        kind, shape, source = s["about"].get(name, ("", "", ""))
        print(f"{name:32s} {ms:9.2f} {share:7.1%} {runs:5d}" + (f"  {kind} {shape} {source}" if args.hlo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

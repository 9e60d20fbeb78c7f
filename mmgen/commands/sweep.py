"""Hyper-parameter sweeps: build a list of config overrides, run one training per
point (locally K at a time, or as cluster job commands), resume unfinished points,
and summarise the results into a table and a plot.

A config file may define ``get_sweep()`` (or ``get_sweep(arg)``, given the same
``:arg`` as ``get_config``) returning a list of override dicts, built big_vision
style (``hyper.product`` / ``hyper.sweep`` / ``hyper.zipit``):

    def get_sweep():
        return product(sweep("optimizer.lr", [1e-4, 3e-4]),
                       zipit(sweep("model.width", [256, 512]), sweep("model.heads", [4, 8])))

gives 4 points, each a dict such as ``{"optimizer.lr": 1e-4, "model.width": 256,
"model.heads": 4}``, passed to ``python -m mmgen train`` as ``--config.key=value``.

Workdir layout under the sweep root: ``ROOT/<point name>/`` per point (the name
spells its overrides, e.g. ``lr=0.0001,width=256,heads=4``), ``ROOT/sweep.json``
(the points), and after ``--summarize``: ``summary.md``, ``summary.csv``,
``curves.png``. A point is finished when its workdir holds ``DONE``, written after
its training exits 0; a point trained elsewhere (a cluster job) also counts as
finished once its ``metrics.jsonl`` reaches the ``total_steps`` of its
``config.json``. Re-running a sweep runs only the unfinished points, and the train
command itself resumes each from its newest checkpoint.

The command line is ``mmgen sweep`` (``launch/sweep.py`` is the same): see :func:`run`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from mmgen.config import load_config, load_module, parse_value, split_spec
from mmgen.errors import UserError

DONE = "DONE"
TRAIN_CMD_ENV = "MMGEN_SWEEP_TRAIN_CMD"
SLURM_SCRIPT = "launch/slurm_gpu.sbatch"
TPU_SCRIPT = "launch/tpu_pod.sh"
_MAX_NAME = 120

# ----------------------------------------------------------------- sweep algebra


def sweep(key: str, values: Sequence[Any]) -> list[dict]:
    """One axis: ``[{key: v} for v in values]``."""
    if not values:
        raise UserError(f"sweep over {key!r} has no values")
    return [{key: v} for v in values]


def fixed(key: str, value: Any) -> list[dict]:
    """A one-point axis: set ``key`` to ``value`` in every point."""
    return [{key: value}]


def _axes(sweeps) -> list[list[dict]]:
    # product([a, b]) (big_vision's list form) is product(a, b).
    if len(sweeps) == 1 and sweeps[0] and all(isinstance(s, list) for s in sweeps[0]):
        sweeps = sweeps[0]
    return [list(s) for s in sweeps]


def _merge(points: Sequence[dict]) -> dict:
    out: dict = {}
    for point in points:
        clash = set(out) & set(point)
        if clash:
            raise UserError(f"sweep sets {sorted(clash)} twice in one point")
        out.update(point)
    return out


def product(*sweeps: list[dict]) -> list[dict]:
    """Cartesian product of axes; the last axis varies fastest."""
    return [_merge(combo) for combo in itertools.product(*_axes(sweeps))]


def zipit(*sweeps: list[dict]) -> list[dict]:
    """Axes of equal length varied together: point i merges every axis's point i."""
    axes = _axes(sweeps)
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise UserError(f"zipit needs sweeps of equal length, got lengths {[len(a) for a in axes]}")
    return [_merge(combo) for combo in zip(*axes)]


# ------------------------------------------------------------------ points


def format_value(value: Any) -> str:
    """A value as ``--config.key=<text>`` text that ``mmgen.config.parse_value`` reads back."""
    if isinstance(value, str):
        return value if parse_value(value) == value else repr(value)
    return repr(value)


def override_args(overrides: dict) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def _short_keys(points: Sequence[dict]) -> dict[str, str]:
    """Each swept key -> its last dotted component, unless two keys share it."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def point_names(points: Sequence[dict]) -> list[str]:
    """Filesystem-safe, unique names spelling each point's overrides."""
    short = _short_keys(points)
    varying = [k for k in short if len({repr(p.get(k)) for p in points}) > 1] or list(short)
    names, seen = [], {}
    for point in points:
        parts = [f"{short[k]}={format_value(point[k])}" for k in varying if k in point]
        name = re.sub(r"[^A-Za-z0-9._+=,-]", "_", ",".join(parts)) or "default"
        if len(name) > _MAX_NAME:
            name = name[:_MAX_NAME]
        if name in seen:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 0
        names.append(name)
    return names


def load_sweep(config_spec: str) -> list[dict]:
    """The override dicts from ``get_sweep`` of ``path.py[:arg]``."""
    path, arg = split_spec(config_spec)
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise UserError(f"config file {path!r} defines no get_sweep() to sweep over")
    takes_arg = bool(inspect.signature(module.get_sweep).parameters)
    points = module.get_sweep(arg) if takes_arg else module.get_sweep()
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise UserError(f"get_sweep() of {path!r} must return a non-empty list of override dicts")
    return points


def check_points(config_spec: str, points: Sequence[dict]) -> None:
    """Apply every point to the config once, so a key typo fails before any launch."""
    for point in points:
        load_config(config_spec, [a.removeprefix("--config.") for a in override_args(point)])


def is_finished(workdir: str) -> bool:
    """``DONE`` exists, or ``metrics.jsonl`` reached ``config.json``'s ``total_steps``."""
    if os.path.exists(os.path.join(workdir, DONE)):
        return True
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            total = int(json.load(f)["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    rows = read_metrics(workdir)
    return bool(rows) and max(int(r.get("step", -1)) for r in rows) >= total


def read_metrics(workdir: str) -> list[dict]:
    """Lines of ``metrics.jsonl`` (skipping a torn last line), or []."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


# ---------------------------------------------------------------- running


def train_command(train_cmd: Sequence[str], config_spec: str, workdir: str, overrides: dict) -> list[str]:
    return [*train_cmd, "--config", config_spec, "--workdir", workdir, *override_args(overrides)]


def run_local(jobs: Sequence[tuple[str, list[str]]], parallel: int, log=print) -> list[str]:
    """Run ``(workdir, command)`` jobs ``parallel`` at a time; ``DONE`` after exit 0.

    Each job's output goes to ``workdir/train.log``. Returns the failed workdirs.
    """
    pending, running, failed = list(jobs), [], []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                workdir, cmd = pending.pop(0)
                os.makedirs(workdir, exist_ok=True)
                logfile = open(os.path.join(workdir, "train.log"), "a")
                log(f"[sweep] start {os.path.basename(workdir)}: {shlex.join(cmd)}")
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)
                running.append((workdir, cmd, proc, logfile, time.time()))
            still = []
            for workdir, cmd, proc, logfile, start in running:
                code = proc.poll()
                if code is None:
                    still.append((workdir, cmd, proc, logfile, start))
                    continue
                logfile.close()
                name = os.path.basename(workdir)
                if code == 0:
                    with open(os.path.join(workdir, DONE), "w") as f:
                        json.dump({"command": cmd, "seconds": round(time.time() - start, 1)}, f)
                    log(f"[sweep] done  {name} ({time.time() - start:.0f}s)")
                else:
                    failed.append(workdir)
                    log(f"[sweep] FAILED {name} (exit {code}); see {os.path.join(workdir, 'train.log')}")
            running = still
            if running:
                time.sleep(0.2)
    finally:
        for _, _, proc, logfile, _ in running:  # interrupted: stop only what we started
            proc.terminate()
            proc.wait()
            logfile.close()
    return failed


def cluster_commands(kind: str, jobs: Sequence[tuple[str, list[str]]], train_args_start: int) -> list[str]:
    """Shell lines submitting each job with the SLURM or TPU launcher.

    ``train_args_start`` is where the ``train ...`` arguments begin in each command
    (after the local train program), as both launchers take mmgen subcommand args.
    """
    lines = []
    for workdir, cmd in jobs:
        args = shlex.join(["train", *cmd[train_args_start:]])
        name = os.path.basename(workdir)
        if kind == "slurm":
            lines.append(f"sbatch --job-name={shlex.quote(name)} --output={shlex.quote(workdir)}/slurm-%j.out "
                         f"{SLURM_SCRIPT} {args}")
        else:
            lines.append(f"{TPU_SCRIPT} {args}")
    return lines


# ---------------------------------------------------------------- summary


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def final_metrics(workdir: str) -> dict:
    """Last value of every metric in ``metrics.jsonl`` plus ``eval.json`` (prefixed
    ``eval/`` unless already), the eval file winning on a clash."""
    out: dict = {}
    for row in sorted(read_metrics(workdir), key=lambda r: r["step"]):
        out.update({k: v for k, v in row.items() if v is not None})
    path = os.path.join(workdir, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            for k, v in _flatten(json.load(f)).items():
                out[k if k.startswith("eval/") or k == "step" else f"eval/{k}"] = v
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _curve_keys(rows_by_point: dict[str, list[dict]]) -> list[str]:
    keys = {k for rows in rows_by_point.values() for r in rows for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (["loss"] if "loss" in keys else []) + sorted(k for k in keys if k.startswith("eval/"))


PLOTS_MISSING = "the curves plot needs matplotlib, which is not installed: pip install 'mmgen[plots]'"


def plot_curves(rows_by_point: dict[str, list[dict]], path: str, max_panels: int = 6) -> None:
    """One panel per metric (``loss`` and ``eval/*``), one line per point (needs the ``plots`` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(PLOTS_MISSING) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _curve_keys(rows_by_point)[:max_panels] or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in rows_by_point.items():
            by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
            if by_step:  # a resumed run may log a step twice: the later line wins
                steps = sorted(by_step)
                ax.plot(steps, [by_step[s] for s in steps], label=name, marker="." if len(steps) < 20 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss" and all(v > 0 for rows in rows_by_point.values() for r in rows
                                 for v in [r.get("loss")] if isinstance(v, (int, float))):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(root: str, points: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Write ``summary.md``, ``summary.csv`` and ``curves.png`` under ``root``.

    Returns the table rows: ``point``, ``status``, each override, then final metrics.
    """
    override_keys = list(dict.fromkeys(k for p in points for k in p))
    rows, metric_keys, curves = [], [], {}
    for point, name in zip(points, names):
        workdir = os.path.join(root, name)
        finals = final_metrics(workdir)
        status = "done" if is_finished(workdir) else ("running/failed" if finals else "not started")
        row = {"point": name, "status": status, **{k: point.get(k) for k in override_keys}}
        for k, v in finals.items():
            if k not in metric_keys:
                metric_keys.append(k)
        row.update(finals)
        rows.append(row)
        curves[name] = read_metrics(workdir)
    metric_keys = sorted(metric_keys, key=lambda k: (k != "step", k != "loss", not k.startswith("eval/"), k))
    columns = ["point", "status", *override_keys, *[k for k in metric_keys if k not in override_keys]]

    with open(os.path.join(root, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(f"# Sweep summary: {root}\n\n{len(rows)} points, "
                f"{sum(r['status'] == 'done' for r in rows)} finished.\n\n")
        f.write("| " + " | ".join(columns) + " |\n")
        f.write("|" + "---|" * len(columns) + "\n")
        for row in rows:
            f.write("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |\n")
        if importlib.util.find_spec("matplotlib") is not None:
            f.write("\n![curves](curves.png)\n")
    if importlib.util.find_spec("matplotlib") is None:
        print(f"[sweep] summary.csv and summary.md written; no curves.png: {PLOTS_MISSING}", file=sys.stderr)
    else:
        plot_curves(curves, os.path.join(root, "curves.png"))
    return rows


# -------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmgen sweep",
        description="Run the sweep of a config's get_sweep(): one `mmgen train` per point, "
        "resuming unfinished points; --summarize tabulates and plots the results.",
    )
    p.add_argument("--config", help="configs/X.py[:arg] defining get_config and get_sweep "
                   "(optional with --summarize when ROOT/sweep.json exists)")
    p.add_argument("--root", required=True, help="sweep directory; one workdir per point under it")
    p.add_argument("--parallel", type=int, default=1, help="local trainings at a time")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--slurm", action="store_true", help=f"print and write sbatch lines ({SLURM_SCRIPT})")
    where.add_argument("--tpu", action="store_true", help=f"print and write TPU pod lines ({TPU_SCRIPT})")
    p.add_argument("--summarize", action="store_true", help="only write summary.md/.csv and curves.png")
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished points")
    p.add_argument("--train-cmd", default=os.environ.get(TRAIN_CMD_ENV),
                   help=f"the train program (default: '{sys.executable} -m mmgen train', or ${TRAIN_CMD_ENV})")
    return p


def _load_points(args) -> tuple[list[dict], list[str]]:
    index = os.path.join(args.root, "sweep.json")
    if args.config:
        points = load_sweep(args.config)
        return points, point_names(points)
    if args.summarize and os.path.exists(index):
        with open(index) as f:
            saved = json.load(f)
        return [p["overrides"] for p in saved["points"]], [p["name"] for p in saved["points"]]
    if args.summarize:
        raise UserError(f"--config is required: {index} does not exist to summarize from")
    raise UserError("--config is required to run a sweep")


def main(args, overrides) -> int:
    """``mmgen sweep ...``: the flags after ``sweep`` are this module's own (``build_parser``)."""
    return run(overrides)


def run(argv: Sequence[str] | None = None, log=print) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args, log)
    except UserError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


def _main(args, log) -> int:
    if args.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {args.parallel}")
    points, names = _load_points(args)
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    if args.summarize:
        rows = summarize(root, points, names)
        log(f"[sweep] summarized {len(rows)} points into {os.path.join(root, 'summary.md')}")
        return 0

    check_points(args.config, points)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"config": args.config, "points": [
            {"name": n, "overrides": p} for n, p in zip(names, points)]}, f, indent=2, default=repr)
    train_cmd = shlex.split(args.train_cmd) if args.train_cmd else [sys.executable, "-m", "mmgen", "train"]
    jobs = []
    for point, name in zip(points, names):
        workdir = os.path.join(root, name)
        if is_finished(workdir):
            log(f"[sweep] skip  {name} (finished)")
            continue
        jobs.append((workdir, train_command(train_cmd, args.config, workdir, point)))
    log(f"[sweep] {len(points)} points, {len(jobs)} to run")
    if args.slurm or args.tpu:
        kind = "slurm" if args.slurm else "tpu"
        lines = cluster_commands(kind, jobs, len(train_cmd))
        script = os.path.join(root, f"submit_{kind}.sh")
        if not args.dry_run:
            with open(script, "w") as f:
                f.write("#!/usr/bin/env bash\nset -euo pipefail\n" + "".join(line + "\n" for line in lines))
            os.chmod(script, 0o755)
        for line in lines:
            log(line)
        if not args.dry_run:
            log(f"[sweep] wrote {script}; finished points are detected from metrics.jsonl on re-run")
        return 0
    if args.dry_run:
        for _, cmd in jobs:
            log(shlex.join(cmd))
        return 0
    failed = run_local(jobs, args.parallel, log)
    if failed:
        log(f"[sweep] {len(failed)} of {len(jobs)} points failed; re-run to retry them")
        return 1
    return 0

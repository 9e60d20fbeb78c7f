"""Fault injection: kill -9 a training run while it saves checkpoints, resume it, check it survived.

    python tools/kill_during_saves.py --runs 20 [--steps 40] [--workdir DIR] [--seed 0]

One uninterrupted reference run first. Then, each time: start ``mmgen train`` on the toy
config with an asynchronous checkpoint after every step (so a save is nearly always in
flight), kill -9 it a random moment after its first step, note the complete checkpoints
it left, and resume with ``mmgen train --workdir W``. A run survives when

- the resume exits 0 and starts from the newest complete checkpoint left (or, if that
  one is damaged, from an older one with a warning: counted separately),
- the lock of the killed run did not block the resume,
- every checkpoint left at the end restores and verifies (fingerprints),
- the metrics hold each step once, and they and the final weights are bit-identical to
  the reference run.

Prints one line per run and a summary (the README's "Reliability" section records one).
Exit status 0 when every run survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py") + ":tiny"


def train_args(workdir: str, steps: int) -> list[str]:
    return ["train", "--config", TOY, "--workdir", workdir, f"--config.total_steps={steps}",
            "--config.checkpoint_every=1", "--config.keep_checkpoints=3", "--config.log_every=1",
            "--config.tensorboard=False", "--config.async_checkpointing=True"]


def mmgen(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mmgen", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, **kwargs)


def complete_steps(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def logged_steps(workdir: str) -> list[int]:
    from mmgen.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(workdir) if "loss" in r]


def check_checkpoints(workdir: str, reference: str) -> str | None:
    """None when every checkpoint left verifies and the final weights equal the reference's; else why not."""
    import jax
    import numpy as np

    from mmgen.families import get_family
    from mmgen.train import loop
    from mmgen.train import workdir as workdir_lib
    from mmgen.train.checkpoint import CheckpointDamaged, Checkpointer

    cfg = workdir_lib.read_config(workdir)
    family = get_family(cfg.family)
    mesh = loop.mesh_lib.make_mesh(cfg.mesh)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    _, abstract = loop.abstract_state(family, cfg)
    target = loop.with_shardings(abstract, loop.sharding_lib.state_shardings(abstract, mesh, rules))
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        for step in ckpt.all_steps():
            try:
                ckpt.restore(step, target)
            except CheckpointDamaged as e:
                return str(e)
    finally:
        ckpt.close()
    mine = jax.tree.leaves(loop.load_state(family, cfg, workdir, mesh=mesh))
    theirs = jax.tree.leaves(loop.load_state(family, cfg, reference, mesh=mesh))
    if any(not np.array_equal(jax.device_get(a), jax.device_get(b)) for a, b in zip(mine, theirs)):
        return "final weights differ from the reference run"
    return None


def one_run(i: int, root: str, steps: int, reference: str, ref_losses: dict, rng: random.Random) -> dict:
    from mmgen.train.metrics import read_metrics

    workdir = os.path.join(root, f"run{i:03d}")
    proc = subprocess.Popen([sys.executable, "-m", "mmgen", *train_args(workdir, steps)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not logged_steps(workdir) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 4.0))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = complete_steps(workdir)
    in_flight = any(".orbax-checkpoint-tmp" in n for n in os.listdir(os.path.join(workdir, "checkpoints"))) \
        if os.path.isdir(os.path.join(workdir, "checkpoints")) else False
    lock_left = os.path.exists(os.path.join(workdir, "train.lock"))
    killed_at = max(logged_steps(workdir) or [0]) if killed else None
    res = mmgen("train", "--workdir", workdir)
    out = {"run": i, "killed": killed, "killed_at": killed_at, "complete_left": left, "save_in_flight": in_flight,
           "lock_left": lock_left, "rc": res.returncode}
    resumed = re.search(r"resumed from step (\d+)", res.stderr)
    out["resumed_from"] = int(resumed.group(1)) if resumed else None
    out["fell_back"] = "is damaged" in res.stderr
    problems = []
    if res.returncode != 0:
        problems.append(f"resume exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    elif left and out["resumed_from"] != max(left) and not out["fell_back"]:
        problems.append(f"resumed from {out['resumed_from']}, not the newest complete step {max(left)}")
    elif not left and out["resumed_from"] is not None:
        problems.append(f"resumed from {out['resumed_from']} with no complete checkpoint left")
    if not problems:
        logged = logged_steps(workdir)
        if logged != list(range(1, steps + 1)):
            problems.append(f"metrics hold steps {logged[:5]}...{logged[-5:]} (duplicates or gaps)")
        elif any(r["loss"] != ref_losses[r["step"]] for r in read_metrics(workdir) if "loss" in r):
            problems.append("losses differ from the reference run")
        else:
            why = check_checkpoints(workdir, reference)
            if why:
                problems.append(why)
    out["problems"] = problems
    out["survived"] = not problems
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="total_steps of each run")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the workdirs")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    root = args.workdir or tempfile.mkdtemp(prefix="mmgen-kills-")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(args.seed)
    reference = os.path.join(root, "reference")
    res = mmgen(*train_args(reference, args.steps))
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return 1
    from mmgen.train.metrics import read_metrics

    ref_losses = {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}
    results = []
    for i in range(args.runs):
        r = one_run(i, root, args.steps, reference, ref_losses, rng)
        results.append(r)
        print(json.dumps(r), flush=True)
    killed = [r for r in results if r["killed"]]
    survived = sum(r["survived"] for r in killed)
    print(f"kill -9 during saves: {len(killed)} runs killed ({sum(r['save_in_flight'] for r in killed)} with a "
          f"save in flight, {sum(r['lock_left'] for r in killed)} leaving their lock), {survived} survived "
          f"({sum(r['fell_back'] for r in killed)} fell back past a damaged step); "
          f"{len(results) - len(killed)} runs finished before the kill")
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if survived == len(killed) else 1


if __name__ == "__main__":
    sys.exit(main())

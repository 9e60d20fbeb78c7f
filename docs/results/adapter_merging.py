"""Adapters: merging one LoRA per task with every ``adapters merge --method`` (docs/RESULTS.md).

    python docs/results/adapter_merging.py --out /work/runs/adapter_merging_methods --seeds 0 1 \
        [--tasks frame_prediction frame_interpolation video_to_audio audio_to_video] \
        [--base-steps 500] [--adapter-steps 300] [--parallel 2]

Trains, per seed, one tiny base on every task and one LoRA adapter per task on that
task's *new* data, merges the task adapters with each method of ``python -m mmgen
adapters merge --method {sum, average, ties, breadcrumbs, dare} --fold`` (the methods'
default options: ``cfg.merge`` of ``configs/adapters/adapter_common.py``), and scores
every task's masked-token loss and accuracy with the merged model, the task's own
adapter and the base. The trainings go through the sweep runner (``mmgen.commands.sweep``,
the same as ``launch/sweep.py``) with this file as the sweep config (``get_config`` /
``get_sweep``) and ``python docs/results/adapter_merging.py train`` as its train command,
which runs the real trainer (``loop.run`` of the ``generative`` / ``adapters``
families) on a synthetic token source; merges are the real command on the real
checkpoints. The earlier two-task LoRA-vs-FlyLoRA comparison in docs/RESULTS.md was
measured with this file as of commit 6703021.

The synthetic tokens (no tokenizer behind them, but structure the tasks must learn):
clips are 3 x 4 x 4 video grids and 8 x 2 audio grids, both over 16 ids; x_0 (frame 0)
is uniform noise.

* **base data** (every task): a clip-wise shift s in {1, 2, 3}, ``x_t = x_0 + s t (mod 16)``;
  the audio spells frame 0, ``a = x_0`` (row-major, 16 ids);
* **task data** (what each adapter learns, never seen by the base):
  - ``frame_prediction`` (frame 0 given): s = 1 always;
  - ``frame_interpolation`` (frames 0 and 2 given): ``x_1 = P(x_0)``, ``x_2 = P(P(x_0))`` for a
    fixed random permutation P of the ids;
  - ``video_to_audio`` (video given): ``a = Q(x_0)`` for another fixed permutation Q;
  - ``audio_to_video`` (audio given): s = 2 always (frame 0 still spelled by the audio),
    which contradicts frame prediction's s = 1 where the two adapters overlap.

Base: the tiny transformer narrowed to width 64 (MLP 256), prefix conditioning, both
modalities. Adapters: ``configs/adapters/lora.py:tiny`` (r = 16, alpha = 32 on the
attention projections, AdamW lr 1e-3). Score: masked-token cross-entropy (nats, no
label smoothing) and accuracy with every target token masked, on ``TEST_BATCHES`` batches
of ``TEST_BATCH`` clips from a seed the training never uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.commands import sweep as sweep_lib
from mmgen.families import generative, get_family
from mmgen.generative import masking
from mmgen.generative import tasks as tasks_lib
from mmgen.generative import tokens as tokens_lib
from mmgen.train import loop
from mmgen.parallel import runtime

THIS = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(THIS)))
VOCAB, GRID, AUDIO = 16, (3, 4, 4), (8, 2)
TASKS = ("frame_prediction", "frame_interpolation", "video_to_audio", "audio_to_video")
METHODS = ("sum", "average", "ties", "breadcrumbs", "dare")
TEST_SEED, TEST_BATCHES, TEST_BATCH = 10_007, 8, 32
RUN = ["log_every=50", "eval_every=0", "progress=False", "tensorboard=False", "async_checkpointing=False",
       "batch_size=32"]
MODEL = [f"model.video_grid={GRID}", f"model.video_vocab={VOCAB}", f"model.audio_len={AUDIO[0]}",
         f"model.audio_levels={AUDIO[1]}", f"model.audio_vocab={VOCAB}", "model.width=64", "model.mlp_dim=256",
         "model.remat_policy='none'"]


# ------------------------------------------------------------------------ the synthetic token source
def permutation(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(VOCAB)


P, Q = permutation(1234), permutation(4321)


def clip_tokens(rng: np.random.Generator, task_ids: np.ndarray, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(video int32 [b, 3, 4, 4], audio int32 [b, 8, 2]) of ``dataset`` ("base" or "tasks")."""
    b = len(task_ids)
    x0 = rng.integers(0, VOCAB, (b, *GRID[1:]))
    t = np.arange(GRID[0])[None, :, None, None]
    shift = rng.integers(1, 4, b)
    audio = x0.reshape(b, *AUDIO)
    if dataset == "tasks":
        name = np.asarray(tasks_lib.TASK_NAMES)[task_ids]
        shift = np.where(name == "frame_prediction", 1, np.where(name == "audio_to_video", 2, shift))
        audio = np.where((name == "video_to_audio")[:, None, None], Q[audio], audio)
    video = (x0[:, None] + shift[:, None, None, None] * t) % VOCAB
    if dataset == "tasks":
        permuted = np.stack([x0, P[x0], P[P[x0]]], axis=1)
        video = np.where((name == "frame_interpolation")[:, None, None, None], permuted, video)
    return video.astype(np.int32), audio.astype(np.int32)


class SyntheticTokens:
    """Batches in the generative family's layout (prefix conditioning, video and audio); resumable."""

    def __init__(self, cfg, dataset: str, *, seed: int, batch_size: int, process_index: int, process_count: int,
                 num_batches: int | None = None):
        self.cfg, self.dataset, self.seed, self.batch = cfg, dataset, int(seed), int(batch_size)
        self.local = self.batch // process_count
        self.start = process_index * self.local
        self.index, self.num_batches = 0, num_batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self.index >= self.num_batches:
            raise StopIteration
        ids, key = tokens_lib.draw_tasks(self.cfg, self.seed, self.index, self.batch)
        rng = np.random.default_rng([self.seed, self.index, 7])
        video, audio = clip_tokens(rng, ids, self.dataset)
        rows = slice(self.start, self.start + self.local)
        self.index += 1
        n = self.local
        return {"video_tokens": video[rows], "audio_tokens": audio[rows], "task_id": ids[rows],
                "label": np.zeros(n, np.int32), "has_audio": np.ones(n, bool),
                "region_key": np.broadcast_to(key, (n, *key.shape)).copy()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def synthetic_family(name: str, dataset: str):
    def make_data(cfg, *, split, train, seed, batch_size, process_index, process_count):
        return SyntheticTokens(cfg, dataset, seed=seed if train else seed + 1, batch_size=batch_size,
                               process_index=process_index, process_count=process_count,
                               num_batches=None if train else int(cfg.get("eval_batches", 4)))

    return dataclasses.replace(get_family(name), make_data=make_data)


# ------------------------------------------------------------------------ the sweep config (get_config / get_sweep)
def parse_arg(arg: str) -> dict:
    """``phase,key=value,...``: phase ``base`` or ``adapters``; keys tasks (a+b), seeds (0+1), steps,
    task (adapters: the adapter's task), bases (adapters: the base sweep's root)."""
    phase, *rest = arg.split(",")
    out = {"phase": phase}
    for item in rest:
        key, value = item.split("=", 1)
        out[key] = value
    return out


def get_config(arg: str) -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    steps = int(a["steps"])
    run = RUN + [f"total_steps={steps}", f"checkpoint_every={steps}"]
    if a["phase"] == "base":
        spec = (f"{ROOT}/configs/generative/multitask.py:tiny,conditioning=prefix,data_source=random_tokens,"
                f"tasks={a['tasks']}")
        return config_lib.load_config(spec, run + MODEL + [f"schedule.warmup_steps={min(100, steps // 5)}"])
    spec = f"{ROOT}/configs/adapters/lora.py:tiny,tasks={a['task']},data_source=random_tokens"
    return config_lib.load_config(spec, run + [f"base_workdir={os.path.join(a['bases'], 'seed=0')}",
                                              f"schedule.warmup_steps={min(30, steps // 5)}"])


def get_sweep(arg: str) -> list[dict]:
    return sweep_lib.sweep("seed", [int(s) for s in parse_arg(arg)["seeds"].split("+")])


def train_main(argv: list[str]) -> int:
    """``train --config THIS:arg --workdir W --config.seed=S``: the sweep's train command.

    An adapter point adapts the base of its own seed (``bases/seed=S``) with adapter seed
    10 S + the task's index, so each (seed, task) adapter has its own A.
    """
    p = argparse.ArgumentParser(prog="adapter_merging.py train")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    args, extra = p.parse_known_args(argv)
    _, arg = config_lib.split_spec(args.config)
    cfg = config_lib.load_config(args.config, [e.removeprefix("--config.") for e in extra])
    a = parse_arg(arg)
    if a["phase"] == "base":
        family = synthetic_family("generative", "base")
    else:
        family = synthetic_family("adapters", "tasks")
        cfg.base_workdir = os.path.join(a["bases"], f"seed={cfg.seed}")
        cfg.adapter.seed = 10 * int(cfg.seed) + a["tasks"].split("+").index(a["task"])
    loop.run(family, cfg, args.workdir)
    return 0


# ------------------------------------------------------------------------ scoring
@nnx.jit
def _score(model, batch, key):
    example = masking.make_training_example(
        model.cfg, {"video": batch["video_tokens"], "audio": batch["audio_tokens"]}, batch["task_id"], key,
        labels=batch["label"], has_audio=batch["has_audio"], mode="prefix", cfg_dropout=0.0,
        ratio=jnp.ones(batch["task_id"].shape[0]), region_rng=jax.random.wrap_key_data(batch["region_key"][0]))
    _, metrics = masking.loss_fn(model, example, label_smoothing=0.0, train=False)
    return metrics["loss"], metrics["accuracy"]


def task_score(model, task: str) -> tuple[float, float]:
    """Masked-token cross-entropy (no smoothing) and accuracy on ``task``'s test data, every target masked."""
    model.eval()
    probe = ml_collections.ConfigDict({"task_weights": {n: float(n == task) for n in tasks_lib.TASK_NAMES}})
    data = SyntheticTokens(probe, "tasks", seed=TEST_SEED, batch_size=TEST_BATCH, process_index=0, process_count=1,
                           num_batches=TEST_BATCHES)
    scores = [jax.device_get(_score(model, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(i)))
              for i, b in enumerate(data)]
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


def load_model(workdir: str):
    cfg = config_lib.from_json_file(os.path.join(workdir, "config.json"))
    return generative.inference_model(loop.load_state(get_family(cfg.family), cfg, workdir))


# ------------------------------------------------------------------------ the experiment
def sweep(config: str, root: str, parallel: int, log) -> None:
    code = sweep_lib.run(["--config", config, "--root", root, "--parallel", str(parallel),
                          "--train-cmd", f"{sys.executable} {THIS} train"], log=log)
    if code != 0:
        raise SystemExit(f"sweep {config} failed (exit {code}); see the train.log files under {root}")


def run(out: str, seeds: list[int], tasks: list[str], base_steps: int, adapter_steps: int, parallel: int,
        log) -> list[dict]:
    joined, seed_arg = "+".join(tasks), "+".join(map(str, seeds))
    bases = os.path.join(out, "bases")
    t = time.perf_counter()
    sweep(f"{THIS}:base,tasks={joined},seeds={seed_arg},steps={base_steps}", bases, parallel, log)
    log(f"bases trained ({time.perf_counter() - t:.0f}s)")
    for task in tasks:
        t = time.perf_counter()
        sweep(f"{THIS}:adapters,tasks={joined},seeds={seed_arg},steps={adapter_steps},task={task},bases={bases}",
              os.path.join(out, "adapters", task), parallel, log)
        log(f"{task} adapters trained ({time.perf_counter() - t:.0f}s)")
    rows = []
    for seed in seeds:
        t = time.perf_counter()
        adapters = {task: os.path.join(out, "adapters", task, f"seed={seed}") for task in tasks}
        merged = {}
        for method in METHODS:
            merged[method] = os.path.join(out, "merged", f"seed={seed}", method)
            if not os.path.exists(os.path.join(merged[method], "merge.json")):
                args = ["adapters", "merge", "--workdirs", *adapters.values(), "--out", merged[method],
                        "--method", method, "--fold"]
                if cli.main(args) != 0:
                    raise SystemExit(f"merge failed: {args}")
        log(f"seed {seed}: {len(METHODS)} merges ({time.perf_counter() - t:.0f}s)")
        t = time.perf_counter()
        models = {"base": load_model(os.path.join(bases, f"seed={seed}"))}
        models.update({m: load_model(w) for m, w in merged.items()})
        for task in tasks:
            row = {"seed": seed, "task": task}
            row["own_loss"], row["own_acc"] = task_score(load_model(adapters[task]), task)
            for name, model in models.items():
                row[f"{name}_loss"], row[f"{name}_acc"] = task_score(model, task)
            rows.append(row)
            log(json.dumps(row))
        log(f"seed {seed}: scored ({time.perf_counter() - t:.0f}s)")
    return rows


COLUMNS = ("base", "own") + METHODS


def table(rows: list[dict], tasks: list[str]) -> str:
    """Per task: loss (accuracy) of each column, mean over seeds; then the mean over tasks."""
    head = "| task | " + " | ".join(("base", "own adapter") + tuple(f"merged: {m}" for m in METHODS)) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]

    def mean(task, col, what):
        return float(np.mean([r[f"{col}_{what}"] for r in rows if task is None or r["task"] == task]))

    for task in [*tasks, None]:
        cells = [f"{mean(task, c, 'loss'):.3f} ({100 * mean(task, c, 'acc'):.0f}%)" for c in COLUMNS]
        lines.append(f"| {task or '**mean over tasks**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], tasks: list[str], path: str) -> None:
    """Loss and accuracy per task, one bar per column (mean over seeds, whiskers: min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(COLUMNS)
    for ax, what, label in ((axes[0], "loss", "masked-token loss (nats)"), (axes[1], "acc", "accuracy")):
        for j, col in enumerate(COLUMNS):
            values = [[r[f"{col}_{what}"] for r in rows if r["task"] == task] for task in tasks]
            mean = np.array([np.mean(v) for v in values])
            err = np.array([[m - min(v), max(v) - m] for m, v in zip(mean, values)]).T
            ax.bar(np.arange(len(tasks)) + (j - (len(COLUMNS) - 1) / 2) * width, mean, width, yerr=err,
                   label={"own": "own adapter"}.get(col, col if col == "base" else f"merged: {col}"), capsize=2)
        ax.set_xticks(np.arange(len(tasks)), [t.replace("_", "\n") for t in tasks], fontsize=8)
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{len(tasks)} LoRA task adapters merged (tiny base, {len({r['seed'] for r in rows})} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--base-steps", type=int, default=500)
    p.add_argument("--adapter-steps", type=int, default=300)
    p.add_argument("--parallel", type=int, default=2, help="trainings at a time")
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "results", "adapter_merging_methods.png"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(msg, flush=True)
        with open(os.path.join(args.out, "log.txt"), "a") as f:
            f.write(f"{msg}\n")

    start = time.perf_counter()
    rows = run(args.out, args.seeds, args.tasks, args.base_steps, args.adapter_steps, args.parallel, log)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, args.tasks, args.plot)
    log(table(rows, args.tasks))
    log(f"total {time.perf_counter() - start:.0f}s; plot: {args.plot}")
    return 0


if __name__ == "__main__":
    runtime.set_flags()  # what every mmgen run sets where it starts
    sys.exit(main())

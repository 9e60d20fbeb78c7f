"""Adapters: LoRA vs FlyLoRA merging on a structured synthetic token task (docs/RESULTS.md).

    python docs/results/adapter_merging.py --out /work/runs/adapter_merging [--seeds 0 1] [--base-steps 800] [--adapter-steps 800]

FlyLoRA (2025) claims that adapters with independent frozen random A's interfere less
when task adapters are merged than LoRA adapters do. This script measures that at CPU
scale with the real trainer (``loop.run`` on the ``generative`` and ``adapters``
families), the real ``python -m mmgen adapters merge`` and the real checkpoints; only
the token source is synthetic (tokens with no tokenizer behind them, but with
structure the tasks must learn; uniform random tokens would teach nothing):

* clips are 3 x 4 x 4 latent grids of a 16-token vocabulary; frame 0 is uniform noise;
* **base data** (both tasks): every clip moves its tokens by a clip-wise shift
  s in {1, 2, 3}: ``x_t = x_0 + s t (mod 16)``;
* **task A, frame_prediction** (frame 0 given, frames 1-2 generated), new data: always
  s = 1, so ``x_t = x_0 + t``. The base can only guess s from one frame;
* **task B, frame_interpolation** (frames 0 and 2 given, frame 1 generated), new data: a
  fixed random permutation P of the vocabulary, ``x_1 = P(x_0)``, ``x_2 = P(P(x_0))``,
  a relation the base never saw.

The base (the tiny transformer narrowed to 2 layers x 64, MLP 256, prefix conditioning)
trains on the base data; per method, one adapter per task trains on its task's new
data with the same recipe (``configs/adapters/*.py:tiny``: AdamW lr 1e-3; LoRA r=16 and
FlyLoRA r=32, k=8 on the attention projections: 32 x 64 = 2,048 trainable weights per
projection each, 16,384 in all); ``adapters merge`` merges the two (task arithmetic
sum for LoRA, summed outputs of the two independent-A branches for FlyLoRA; weights
1 + 1 and 0.5 + 0.5). Score: masked-token cross-entropy (no label smoothing) and
accuracy of the generated frames with every target token masked, on 16 test batches
of 32 clips drawn from a seed the training never uses, per task.
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
from mmgen.families import generative, get_family
from mmgen.generative import masking
from mmgen.generative import tasks as tasks_lib
from mmgen.generative import tokens as tokens_lib
from mmgen.train import loop
from mmgen.parallel import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, GRID = 16, (3, 4, 4)
TASK_A, TASK_B = "frame_prediction", "frame_interpolation"
TEST_SEED, TEST_BATCHES, TEST_BATCH = 10_007, 16, 32
RUN = ["log_every=50", "eval_every=0", "progress=False", "tensorboard=False", "async_checkpointing=False",
       "batch_size=32"]
MODEL = [f"model.video_grid={GRID}", f"model.video_vocab={VOCAB}", "model.width=64", "model.mlp_dim=256",
         "model.remat_policy='none'"]


# ------------------------------------------------------------------------ the synthetic token source
def permutation(seed: int = 1234) -> np.ndarray:
    return np.random.default_rng(seed).permutation(VOCAB)


def clip_tokens(rng: np.random.Generator, task_ids: np.ndarray, dataset: str) -> np.ndarray:
    """int32 [b, 3, 4, 4] clips of ``dataset`` ("base" or "tasks") for these task ids."""
    b = len(task_ids)
    x0 = rng.integers(0, VOCAB, (b, *GRID[1:]))
    t = np.arange(GRID[0])[None, :, None, None]
    if dataset == "base":
        shift = rng.integers(1, 4, b)[:, None, None, None]
        return ((x0[:, None] + shift * t) % VOCAB).astype(np.int32)
    p = permutation()
    shifted = (x0[:, None] + t) % VOCAB
    permuted = np.stack([x0, p[x0], p[p[x0]]], axis=1)
    is_b = (task_ids == tasks_lib.task_id(TASK_B))[:, None, None, None]
    return np.where(is_b, permuted, shifted).astype(np.int32)


class SyntheticTokens:
    """Batches in the generative family's layout (prefix conditioning, video only); resumable."""

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
        tokens = clip_tokens(rng, ids, self.dataset)[self.start:self.start + self.local]
        ids = ids[self.start:self.start + self.local]
        self.index += 1
        return {"video_tokens": tokens, "task_id": ids, "label": np.zeros(len(ids), np.int32),
                "has_audio": np.zeros(len(ids), bool), "region_key": np.broadcast_to(key, (len(ids), *key.shape)).copy()}

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


# ------------------------------------------------------------------------ scoring
def task_loss(model, task: str) -> tuple[float, float]:
    """Masked-token cross-entropy (no smoothing) and accuracy with every target token masked."""
    model.eval()
    probe = ml_collections.ConfigDict({"task_weights": {n: float(n == task) for n in tasks_lib.TASK_NAMES}})

    @nnx.jit
    def score(model, batch, key):
        example = masking.make_training_example(
            model.cfg, {"video": batch["video_tokens"]}, batch["task_id"], key, labels=batch["label"],
            mode="prefix", cfg_dropout=0.0, ratio=jnp.ones(batch["task_id"].shape[0]),
            region_rng=jax.random.wrap_key_data(batch["region_key"][0]))
        _, metrics = masking.loss_fn(model, example, label_smoothing=0.0, train=False)
        return metrics["loss"], metrics["accuracy"]

    data = SyntheticTokens(probe, "tasks", seed=TEST_SEED, batch_size=TEST_BATCH, process_index=0, process_count=1,
                           num_batches=TEST_BATCHES)
    scores = [jax.device_get(score(model, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(i)))
              for i, b in enumerate(data)]
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


def load_model(workdir: str):
    cfg = config_lib.from_json_file(os.path.join(workdir, "config.json"))
    return generative.inference_model(loop.load_state(get_family(cfg.family), cfg, workdir))


# ------------------------------------------------------------------------ the experiment
def train(family, spec: str, overrides: list[str], workdir: str) -> float:
    t = time.perf_counter()
    if not os.path.exists(os.path.join(workdir, "checkpoints")):
        cfg = config_lib.load_config(spec, overrides)
        loop.run(family, cfg, workdir)
    return time.perf_counter() - t


def run_seed(out: str, seed: int, base_steps: int, adapter_steps: int, log) -> list[dict]:
    root = os.path.join(out, f"seed{seed}")
    base = os.path.join(root, "base")
    spent = train(synthetic_family("generative", "base"),
                  os.path.join(ROOT, f"configs/generative/multitask.py:tiny,modalities=video,conditioning=prefix,"
                                     f"data_source=random_tokens,tasks={TASK_A}+{TASK_B}"),
                  RUN + MODEL + [f"seed={seed}", f"total_steps={base_steps}", "schedule.warmup_steps=100"], base)
    log(f"seed {seed}: base trained in {spent:.0f}s")
    rows = []
    for kind in ("lora", "flylora"):
        workdirs = {}
        for i, task in enumerate((TASK_A, TASK_B)):
            workdirs[task] = os.path.join(root, f"{kind}_{task}")
            spent = train(synthetic_family("adapters", "tasks"),
                          os.path.join(ROOT, f"configs/adapters/{kind}.py:tiny,tasks={task},data_source=random_tokens"),
                          RUN + [f"base_workdir={base}", f"seed={seed}", f"adapter.seed={10 * seed + i}",
                                 f"total_steps={adapter_steps}"], workdirs[task])
            log(f"seed {seed}: {kind} adapter for {task} trained in {spent:.0f}s")
        merged = {}
        for label, weights in (("sum", ["1", "1"]), ("mean", ["0.5", "0.5"])):
            merged[label] = os.path.join(root, f"{kind}_merged_{label}")
            if not os.path.exists(merged[label]):
                args = ["adapters", "merge", "--workdirs", workdirs[TASK_A], workdirs[TASK_B], "--out", merged[label],
                        "--weights", *weights]
                if cli.main(args) != 0:
                    raise SystemExit(f"merge failed: {args}")
        scores = {"base": load_model(base)}
        for task in (TASK_A, TASK_B):
            scores[task] = load_model(workdirs[task])
        for label, workdir in merged.items():
            scores[f"merged_{label}"] = load_model(workdir)
        for task in (TASK_A, TASK_B):
            row = {"seed": seed, "method": kind, "task": task}
            for name, model in scores.items():
                key = "own_adapter" if name == task else ("other_adapter" if name in (TASK_A, TASK_B) else name)
                row[f"{key}_loss"], row[f"{key}_acc"] = task_loss(model, task)
            rows.append(row)
            log(json.dumps(row))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | task | seed | base | own adapter | merged (1+1) | merged (0.5+0.5) | other task's adapter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        def cell(k, r=r):
            return f"{r[k + '_loss']:.3f} ({100 * r[k + '_acc']:.0f}%)"

        lines.append(f"| {r['method']} | {r['task']} | {r['seed']} | {cell('base')} | {cell('own_adapter')} | "
                     f"{cell('merged_sum')} | {cell('merged_mean')} | {cell('other_adapter')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--base-steps", type=int, default=800)
    p.add_argument("--adapter-steps", type=int, default=800)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    def log(msg):
        print(msg, flush=True)
        with open(os.path.join(args.out, "log.txt"), "a") as f:
            f.write(msg + "\n")

    rows = [r for seed in args.seeds for r in run_seed(args.out, seed, args.base_steps, args.adapter_steps, log)]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    log(table(rows))
    return 0


if __name__ == "__main__":
    runtime.set_flags()  # what every mmgen run sets where it starts
    sys.exit(main())

"""``mmgen demo --workdir DIR``: the whole pipeline on synthetic data, on a CPU.

Nothing is downloaded. In order, each stage a normal workdir that ``sample``,
``tokenize``, ``eval`` and ``train`` (to continue it) accept:

1. ``DIR/data``: ``moving_shapes_av/tiny`` built procedurally (TFDS, ArrayRecord), the
   demo's variant (one large shape on one colour, ``DATA`` in the config);
2. ``DIR/video_tokenizer_frames`` then ``DIR/video_tokenizer``: the MAGVIT-v2-style
   video tokenizer (9x32x32 -> 3x8x8 tokens of a 10-bit VQ), trained first on single
   frames, then on clips starting from those weights (``init_from``);
3. ``DIR/audio_tokenizer``: the SoundStream-style audio tokenizer (57 frames x 4 RVQ
   levels of 256);
4. ``DIR/generative``: the masked multi-task transformer over both, on their tokens of
   every clip computed once (``DIR/token_cache``), trained on a few tasks (``TASKS``);
5. ``DIR/samples/<task>/``: every task sampled (mp4 with sound, PNG grid, tokens).

Sizes and step counts are ``configs/generative/demo.py`` (override any with
``--config.<stage>.<key>=value``). Running it again continues where it stopped: a
stage that reached its last step is reused, an interrupted one resumes from its
checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from mmgen import config as config_lib
from mmgen.data import pipeline
from mmgen.families import get_family
from mmgen.families.generative import load_generator
from mmgen.generative import tasks as tasks_lib
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.metrics import read_metrics


def _flat(tree, prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}}`` -> ``["a.b=1"]`` (values as python literals, for ``apply_overrides``)."""
    items = []
    for key, value in tree.items():
        if isinstance(value, ml_collections.ConfigDict) and key != "builder_overrides":
            items.extend(_flat(value, f"{prefix}{key}."))
        else:
            value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            items.append(f"{prefix}{key}={value!r}")
    return items


def stage_config(demo, stage: str, data_dir: str, extra: list[str] = ()):
    """A stage's tiny config with the demo's changes, reading and building data in ``data_dir``."""
    cfg = config_lib.load_config(demo.stages[stage], _flat(demo[stage]) + list(extra))
    cfg.dataset.name = demo.dataset.name
    cfg.dataset.builder_overrides = ml_collections.ConfigDict(demo.dataset.builder_overrides.to_dict())
    cfg.dataset.data_dir = data_dir
    return cfg


def stage_configs(demo, root: str, data_dir: str) -> tuple[dict, dict]:
    """``(workdirs, configs)`` of the stages in training order, each wired to the ones before it."""
    stages = ("video_tokenizer_frames", "video_tokenizer", "audio_tokenizer", "generative")
    if demo.video_tokenizer_frames.total_steps <= 0:
        stages = stages[1:]
    dirs = {s: os.path.join(root, s) for s in stages}
    warm = [f"init_from={dirs['video_tokenizer_frames']!r}"] if "video_tokenizer_frames" in dirs else []
    cfgs = {s: stage_config(demo, s, data_dir) for s in ("video_tokenizer_frames", "audio_tokenizer") if s in dirs}
    cfgs["video_tokenizer"] = stage_config(demo, "video_tokenizer", data_dir, warm)
    generative = [f"tokenizers.video_workdir={dirs['video_tokenizer']!r}",
                  f"tokenizers.audio_workdir={dirs['audio_tokenizer']!r}"]
    if demo.generative.get("data_source", "tokenizers") == "token_cache":
        generative.append(f"token_cache={os.path.join(root, 'token_cache')!r}")
    cfgs["generative"] = stage_config(demo, "generative", data_dir, generative)
    return dirs, {s: cfgs[s] for s in stages}


def _last_eval(workdir: str) -> dict:
    rows = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    return rows[-1] if rows else {}


def _banner(text: str, start: float) -> None:
    print(f"\n=== [{time.perf_counter() - start:6.0f}s] {text}", flush=True)


def train_stage(name: str, cfg, workdir: str, start: float) -> dict:
    """Train (or resume, or reuse) one stage; returns its last eval metrics and its seconds."""
    began = time.perf_counter()
    done = workdir_lib.latest_step(workdir) or 0
    if done >= cfg.total_steps:
        _banner(f"{name}: reusing {workdir} (trained to step {done})", start)
    else:
        _banner(f"{name}: training {cfg.total_steps} steps into {workdir}" + (f" (resuming at {done})" if done else ""),
                start)
        loop.run(get_family(cfg.family), cfg, workdir)
    return {**_last_eval(workdir), "seconds": round(time.perf_counter() - began, 1)}


def main(args, overrides) -> int:
    start = time.perf_counter()
    demo = config_lib.load_config("generative/demo.py" + (":fast" if args.fast else ""), overrides)
    root = os.path.abspath(args.workdir)
    data_dir = os.path.join(root, "data")
    dirs, cfgs = stage_configs(demo, root, data_dir)
    os.makedirs(root, exist_ok=True)

    _banner(f"data: {pipeline.dataset_name(cfgs['video_tokenizer'].dataset)} in {data_dir}", start)
    pipeline.open_dataset(cfgs["video_tokenizer"].dataset, "train")  # built here when missing

    results = {s: train_stage(s.replace("_", " "), cfgs[s], dirs[s], start) for s in dirs}

    began = time.perf_counter()
    _banner(f"samples: every task into {os.path.join(root, 'samples')}", start)
    generator = load_generator(dirs["generative"])
    have = list(generator.model.specs)
    written = {}
    names = [t for t in tasks_lib.TASK_NAMES if all(m in have for m in tasks_lib.get_task(t).modalities())]
    for i, task in enumerate(names):
        print(f"  [{i + 1}/{len(names)}] {task}: {tasks_lib.get_task(task).description}", flush=True)
        result = generator.sample_task(task, int(demo.samples.num), seed=int(demo.samples.seed),
                                       steps=int(demo.samples.steps))
        written[task] = generator.save(result, os.path.join(root, "samples", task))

    elapsed = time.perf_counter() - start
    summary = {"seconds": round(elapsed, 1), "sampling_seconds": round(time.perf_counter() - began, 1),
               "workdirs": dirs, "samples": os.path.join(root, "samples"), "eval": results}
    with open(os.path.join(root, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    v, a, g = (results[s] for s in ("video_tokenizer", "audio_tokenizer", "generative"))
    print(f"\ndemo finished in {elapsed / 60:.1f} min; everything is in {root}")
    nan = float("nan")
    if "video_tokenizer_frames" in results:
        f = results["video_tokenizer_frames"]
        print(f"  ... on frames    {dirs['video_tokenizer_frames']}  eval PSNR {f.get('eval/psnr', nan):.2f} dB"
              f"  ({f['seconds']:.0f}s)")
    print(f"  video tokenizer  {dirs['video_tokenizer']}  eval PSNR {v.get('eval/psnr', nan):.2f} dB  ({v['seconds']:.0f}s)")
    print(f"  audio tokenizer  {dirs['audio_tokenizer']}  eval loss {a.get('eval/loss', nan):.3f}  ({a['seconds']:.0f}s)")
    print(f"  transformer      {dirs['generative']}  eval masked-token accuracy {g.get('eval/accuracy', nan):.3f}"
          f"  ({g['seconds']:.0f}s)")
    print(f"  samples          {os.path.join(root, 'samples')}/<task>/: {len(written)} tasks "
          f"({summary['sampling_seconds']:.0f}s), e.g.")
    for task in ("frame_prediction", "audio_video", "video_to_audio"):
        if task in written:
            print(f"                   {written[task]['media'][0]}")
    print(f"next: mmgen sample --workdir {dirs['generative']} --task audio_to_video --num 4 "
          f"--out {os.path.join(root, 'more')}  |  mmgen eval --workdir {dirs['generative']}")
    return 0

"""Masked multi-task transformer (MAGVIT + COMMIT, with audio) over frozen tokenizers.

    python -m mmgen train --config configs/generative/multitask.py:tiny --workdir runs/gen \
        --config.tokenizers.video_workdir=runs/vtok --config.tokenizers.audio_workdir=runs/atok
    python -m mmgen train --config configs/generative/multitask.py:tiny,conditioning=prefix ...
    python -m mmgen train --config configs/generative/multitask.py:tiny,tasks=frame_prediction ...
    python -m mmgen plan --config configs/generative/multitask.py:L,data_source=random_tokens --devices 8

Variant: ``size[,key=value...]`` with size ``tiny`` (CPU; the tiny tokenizers' layout:
9x32x32 video -> 3x8x8 tokens of a 10-bit LFQ, 1024 ids; 9 frames @ 8 fps of 16 kHz
audio -> 57 frames x 4 RVQ levels x 256), ``B``, ``L`` or ``XL`` (17x128x128 -> 5x16x16
tokens of an 18-bit LFQ read as 2 factors of 512; 17 frames @ 8 fps of audio -> 107
frames x 4 RVQ levels x 1024). Options:

* ``conditioning=commit|prefix``: MAGVIT's COMMIT, or the plain prefix baseline;
* ``tasks=a+b+...``: train only these tasks (equal weights), e.g. a single-task ablation;
* ``modalities=video|audio|video+audio``: drop a modality (its tasks get weight 0);
* ``data_source=tokenizers|token_cache|random_tokens``: real clips through the frozen
  tokenizers at every step; their tokens computed once into ``config.token_cache``
  (``mmgen/generative/token_cache.py``: ~10x cheaper steps at tiny scale, no augmentation,
  COMMIT only for whole-modality tasks); or random tokens of the configured shapes
  (benchmarks, ``plan``; no tokenizer needed).

The token layout (``model.video_grid``, ``model.*_vocab``, ``model.audio_len``,
``model.audio_levels``) lives here so that the train step compiles from the config
alone; training with tokenizers checks it against them and names the value to set.
"""

import ml_collections
from mmgen.configs.common import base_config, parse_variant

from mmgen.data.pipeline import default_dataset_config
from mmgen.generative.tasks import TASKS
from mmgen.generative.transformer import model_config
from mmgen.train.optim import default_optimizer_config, default_schedule_config

SIZES = ("tiny", "B", "L", "XL")

# Multi-modal tasks weigh twice a video-only task: half of all examples use sound.
TASK_WEIGHTS = {
    name: (2.0 if task.audio.kind != "absent" else 1.0) for name, task in TASKS.items()
}

# moving_shapes_av has 9 classes (3 shapes x 3 motions); set model.num_classes for others.
NUM_CLASSES = 9


OPTIONS = ("conditioning", "tasks", "modalities", "data_source")


def token_layout(cfg, size):
    """Token grid and vocabularies of the tokenizers each size is paired with."""
    if size == "tiny":
        cfg.model.video_grid = (3, 8, 8)  # configs/tokenizer/video.py:tiny (4x time, 4x space)
        cfg.model.video_vocab, cfg.model.video_vocab_groups = 2**10, 1
        cfg.model.audio_len, cfg.model.audio_levels = 57, 4  # ceil(18000 / 320); RVQ 4 x 256
        cfg.model.audio_vocab, cfg.model.audio_vocab_groups = 256, 1
    else:
        cfg.model.video_grid = (5, 16, 16)  # MAGVIT-v2: 17x128x128 -> 5x16x16
        cfg.model.video_vocab, cfg.model.video_vocab_groups = 2**18, 2
        cfg.model.audio_len, cfg.model.audio_levels = 107, 4  # ceil(34000 / 320); RVQ 4 x 1024
        cfg.model.audio_vocab, cfg.model.audio_vocab_groups = 1024, 1


def get_config(arg=None):
    size, options = parse_variant(arg, options=OPTIONS)
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    cfg = base_config(family="generative")
    cfg.model = model_config(size)
    token_layout(cfg, size)
    cfg.model.num_classes = NUM_CLASSES

    cfg.tokenizers = ml_collections.ConfigDict({"video_workdir": "", "audio_workdir": ""})
    cfg.data_source = options.get("data_source", "tokenizers")
    cfg.token_cache = ""  # data_source=token_cache: directory of the tokens, built on first use
    cfg.dataset = default_dataset_config()
    cfg.task_weights = ml_collections.ConfigDict(dict(TASK_WEIGHTS))
    cfg.conditioning = options.get("conditioning", "commit")  # commit | prefix
    # Defaults follow MAGVIT's released code (google-research/magvit: mask_utils.random_mask
    # and the multi-task config maskgvt_bair_multitask_config.py); the other values are options.
    cfg.masking = ml_collections.ConfigDict({
        "schedule": "cosine",  # r = cos(pi/2 u), u ~ U(0, 1] (MaskGIT)
        # all (MAGVIT multi-task config: weight_mode="mask+refine+recons", every maskable token)
        # | masked (MAGVIT "mask+refine") | masked+cond (mmgen: masked and the condition region)
        "loss_on": "all",
        # floor (MAGVIT random_mask: max(1, floor(r N))) | ceil (mmgen's earlier max(1, ceil(r N)))
        "mask_count": "floor",
        "label_smoothing": 0.1,
        "cfg_dropout": 0.1,  # classifier-free guidance: condition dropped with this probability
    })
    cfg.sampling = ml_collections.ConfigDict({
        "steps": 12,  # MaskGIT / MAGVIT
        "guidance": 0.0,  # logits = cond + s * (cond - uncond); 0 = one pass
        "temperature": 1.0,
        "choice_temperature": 4.5,  # Gumbel scale 4.5 * (1 - (t+1)/T) at step t (MaskGIT / MAGVIT decoders)
        "schedule": "cosine",
        "batch_size": 16,  # clips decoded at once by `sample` and `eval`
        "eval_tasks": "frame_prediction,audio_video",  # sampled into workdir/samples at every eval
        "eval_num": 2,
    })
    cfg.evaluation = ml_collections.ConfigDict({
        "num": 64,  # test clips per task
        "mask_ratio": 0.5,  # fraction of maskable elements masked for the masked-token accuracy
        "unigram_clips": 64,  # train clips whose tokens give the unigram baseline
        "probe_clips": 1024,  # train clips that fit the token-space height probes (audio-visual agreement)
        "dependence_mask_ratio": 1.0,  # cross-modal dependence: every target token masked, as sampling starts
    })
    cfg.ema_decay = 0.0  # MaskGIT keeps no weight EMA; > 0 samples from an EMA copy

    # MAGVIT's transformer recipe: AdamW b = (0.9, 0.96), weight decay 0.045, clip 1.0.
    cfg.optimizer = default_optimizer_config(lr=1e-4)
    cfg.schedule = default_schedule_config(name="warmup_cosine", warmup_steps=5000, end_lr_factor=0.0)
    cfg.best_metric = "eval/loss"
    cfg.keep_best = 1
    if size == "tiny":
        cfg.total_steps = 2000
        cfg.batch_size = 16
        cfg.log_every = 25
        cfg.eval_every = 500
        cfg.checkpoint_every = 500
        cfg.eval_batches = 4
        cfg.optimizer.lr = 1e-3
        cfg.schedule.warmup_steps = 100
        cfg.evaluation.num = 32
        cfg.evaluation.unigram_clips = 64
    else:
        cfg.dataset.name = "moving_shapes_av/default"
        cfg.dataset.frames, cfg.dataset.resolution = 17, 128
        cfg.dataset.num_workers = 8
        cfg.total_steps = 500_000
        cfg.batch_size = 256 if size == "B" else 512
        cfg.log_every = 100
        cfg.eval_every = 10_000
        cfg.checkpoint_every = 5_000
        cfg.mesh.data, cfg.mesh.fsdp = 1, -1  # parameters and optimizer state sharded (FSDP)

    names = options.get("tasks")
    if names:
        chosen = [n for n in names.split("+") if n]
        unknown = [n for n in chosen if n not in TASKS]
        if unknown:
            raise KeyError(f"tasks={names!r}: unknown {unknown}; choose from {sorted(TASKS)}")
        for name in TASKS:
            cfg.task_weights[name] = 1.0 if name in chosen else 0.0
    modalities = options.get("modalities", "video+audio").split("+")
    if not set(modalities) <= {"video", "audio"} or not modalities:
        raise KeyError(f"modalities={options['modalities']!r} must be video, audio or video+audio")
    if "audio" not in modalities:
        cfg.model.audio_len = 0
    if "video" not in modalities:
        cfg.model.video_grid = ()
    for name, task in TASKS.items():
        if any(m not in modalities for m in task.modalities()):
            cfg.task_weights[name] = 0.0
    if not any(cfg.task_weights[name] > 0 for name in TASKS):
        raise KeyError(f"no task is left for modalities={'+'.join(modalities)} and tasks={names!r}")
    return cfg


def get_sweep():
    from mmgen.commands.sweep import sweep

    return sweep("conditioning", ["commit", "prefix"])

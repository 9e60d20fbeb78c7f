"""Audio-visual agreement: a transformer big enough, trained long enough, for picture and sound to agree.

The masked transformer of ``multitask.py`` at the tiny token layout, trained only on
``audio_to_video`` and ``video_to_audio`` from a token cache of ``moving_shapes_av`` with
one main shape on a plain background (12,000 distinct clips): 8 layers x 256 (7.4M
parameters) in bf16, batch 128, AdamW 5e-4, dropout 0.1, 8,000 steps (40 steps/s on one
H200). What it reaches, and how the run was measured, is in docs/RESULTS.md
("Agreement on a GPU").

    python -m mmgen train --config configs/generative/agreement.py --workdir runs/agree \
        --config.tokenizers.video_workdir=runs/vtok --config.tokenizers.audio_workdir=runs/atok \
        --config.token_cache=runs/agree_tokens --config.dataset.data_dir=runs/data
    python -m mmgen eval --workdir runs/agree --num 64

The token cache is built on first use from the tokenizers (40 clips/s on 2 CPU cores).
Variant ``tiny``: the same run at 2 layers x 128, batch 16 and 200 steps in float32,
for a laptop CPU (the plumbing; it is far too small to learn the link).
"""

import os

from mmgen.config import load_config

# The data: one shape that moves on a plain background, its pitch set by its height.
DATA = {"num_train": 12000, "max_distractors": 0, "background": "plain"}


def get_config(arg=None):
    size = arg or "gpu"
    if size not in ("gpu", "tiny"):
        raise KeyError(f"unknown variant {size!r}; choose gpu or tiny")
    base = os.path.join(os.path.dirname(__file__), "multitask.py")
    cfg = load_config(f"{base}:tiny,tasks=video_to_audio+audio_to_video,data_source=token_cache")
    cfg.dataset.builder_overrides.update(DATA)
    cfg.model.remat_policy = "none"
    cfg.model.dropout = 0.1
    cfg.sampling.eval_tasks = ""
    cfg.keep_best = 0
    cfg.schedule.warmup_steps = 200
    if size == "gpu":
        cfg.model.width, cfg.model.depth, cfg.model.num_heads, cfg.model.mlp_dim = 256, 8, 4, 1024
        cfg.model.dtype = "bfloat16"
        cfg.batch_size, cfg.total_steps, cfg.optimizer.lr = 128, 8000, 5e-4
        cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 250, 1000, 250
        cfg.keep_checkpoints = 2
    else:
        cfg.model.width, cfg.model.depth, cfg.model.num_heads, cfg.model.mlp_dim = 128, 2, 4, 512
        cfg.batch_size, cfg.total_steps, cfg.optimizer.lr = 16, 200, 1e-3
        cfg.schedule.warmup_steps = 20
        cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 25, 200, 200
    return cfg

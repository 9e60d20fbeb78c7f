"""Sizes of ``mmgen demo``: the whole pipeline on 2 CPU cores in minutes.

Each stage trains from its own tiny config (``stages``) with the changes below
applied on top, into its own workdir under the demo's ``--workdir``. The tiny
configs are sized for a real (if small) CPU run; the demo trades quality for time:
no GAN for the tokenizers (the discriminators cost 3-6x a generator step on a CPU),
Adam with momentum, short schedules. Change any number from the command line:

    python -m mmgen demo --workdir runs/demo --config.video_tokenizer.total_steps=600

The time per stage and what each reaches are measured in docs/RESULTS.md ("Masked
multi-task transformer (demo scale)"). The audio tokenizer keeps the tiny preset's C = 4
for the budget; C = 16 learns the tone (docs/RESULTS.md "Audio tokenizer"). Longer
stages (--config.<stage>.total_steps) give more.

Variant ``fast`` (the CLI's hidden ``--config.fast``) shrinks every stage to a few
steps on a 16-clip dataset: it checks the plumbing, it learns nothing.
"""

import ml_collections

STAGES = {  # stage -> the config it starts from (relative to configs/)
    "video_tokenizer_frames": "tokenizer/video.py:tiny,gan=0",
    "video_tokenizer": "tokenizer/video.py:tiny,gan=0",
    "audio_tokenizer": "tokenizer/audio.py:tiny,gan=0",
    "generative": "generative/multitask.py:tiny",
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict(STAGES)
    c.dataset = ml_collections.ConfigDict({"name": "moving_shapes_av/tiny", "builder_overrides": {}})
    # Every stage saves and evaluates once, at its last step.
    common = {"log_every": 10, "eval_batches": 2, "keep_checkpoints": 1, "keep_best": 0, "tensorboard": False}
    # Adam with b1 = 0.9 (the tokenizer recipe's b1 = 0 is for GAN stability; without the
    # GAN, momentum gets further in a few hundred steps).
    # The video tokenizer learns to draw on single frames first (1-frame clips: the causal
    # tokenizer is a joint image/video one, and a frame costs ~1/9 of a 9-frame clip),
    # then the video stage starts from those weights (``init_from``) and learns time.
    # total_steps=0 for the frames stage skips it (the video stage then starts from scratch).
    c.video_tokenizer_frames = ml_collections.ConfigDict({
        "total_steps": 1000, "batch_size": 16, "ema_decay": 0.98, "optimizer": {"b1": 0.9},
        "schedule": {"warmup_steps": 50}, "dataset": {"frames": 1}, **common})
    c.video_tokenizer = ml_collections.ConfigDict({
        "total_steps": 150, "batch_size": 8, "ema_decay": 0.98, "optimizer": {"b1": 0.9},
        "schedule": {"warmup_steps": 15}, **common})
    c.audio_tokenizer = ml_collections.ConfigDict({
        "total_steps": 100, "batch_size": 8, "ema_decay": 0.98, "optimizer": {"b1": 0.9},
        "schedule": {"warmup_steps": 20}, **common})
    c.generative = ml_collections.ConfigDict({
        "total_steps": 300, "batch_size": 8, "schedule": {"warmup_steps": 30}, "sampling": {"eval_tasks": ""},
        **common})
    c.samples = ml_collections.ConfigDict({"num": 2, "steps": 12, "seed": 0})
    if arg == "fast":
        c.dataset.builder_overrides = {"num_train": 16, "num_test": 8}
        for stage in ("video_tokenizer_frames", "video_tokenizer", "audio_tokenizer", "generative"):
            c[stage].total_steps = 2
            c[stage].eval_batches = 1
            c[stage].log_every = 1
        c.samples.num, c.samples.steps = 1, 2
    elif arg:
        raise KeyError(f"unknown demo variant {arg!r}; the only one is 'fast'")
    return c

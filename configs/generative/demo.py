"""Sizes of ``mmgen demo``: the whole pipeline on 2 CPU cores in minutes.

Each stage trains from its own tiny config (``stages``) with the changes below
applied on top, into its own workdir under the demo's ``--workdir``. The tiny
configs are sized for a real (if small) CPU run; the demo trades quality for time:
no GAN for the tokenizers (the discriminators cost 3-6x a generator step on a CPU),
Adam with momentum, short schedules. Change any number from the command line:

    python -m mmgen demo --workdir runs/demo --config.video_tokenizer.total_steps=600

About six minutes on 2 idle cores with mmgen's CPU kernels (378 s; 607, 633 and 575 s with
300 transformer steps before them; docs/RESULTS.md "The demo": the time per stage, what each
reaches, and the schedules measured against this one). The transformer gets 500 steps at lr
3e-3 with frame prediction at 3/5 of the batch (300 steps beat holding the last frame by
+0.1-0.2 dB, 1-2 standard errors; 500 by +0.5, 5); the audio codec is the C = 16 one
(``channels=16``), which carries the tone's pitch within 50 steps of batch 4 where the
tiny preset's C = 4 does not in 100 of batch 8.
The data is the demo's variant of ``moving_shapes_av/tiny`` (``DATA``: one large shape on
one colour); the video tokenizer is the 10-bit VQ; the transformer trains on cached
tokens over ``TASKS`` and samples all 15. Longer stages (--config.<stage>.total_steps)
give more.

Variant ``fast`` (the CLI's hidden ``--config.fast``) shrinks every stage to a few
steps on a 16-clip dataset: it checks the plumbing, it learns nothing.
"""

import ml_collections
from mmgen.generative.tasks import TASK_NAMES

STAGES = {  # stage -> the config it starts from (relative to configs/)
    "video_tokenizer_frames": "tokenizer/video.py:tiny,gan=0,quantizer=vq",
    "video_tokenizer": "tokenizer/video.py:tiny,gan=0,quantizer=vq",
    "audio_tokenizer": "tokenizer/audio.py:tiny,gan=0,channels=16",
    "generative": "generative/multitask.py:tiny",
}


# The demo's picture: one large shape (radius 0.18-0.3 of the frame, 1.5x the default)
# on one colour per clip, no distractors. The textures and distractors of the default
# data cost the tiny tokenizer most of its bits (docs/RESULTS.md "The demo"); 1000 training
# clips keep the token cache small.
DATA = {"background": "plain", "max_distractors": 0, "main_scale": 1.5, "num_train": 1000, "num_test": 200}

# The tasks the transformer trains on; the other tasks are still sampled (from a model
# that never saw them: expect noise there).
TASKS = {"frame_prediction": 3.0, "audio_to_video": 1.0, "video_to_audio": 1.0}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict(STAGES)
    c.dataset = ml_collections.ConfigDict({"name": "moving_shapes_av/tiny", "builder_overrides": dict(DATA)})
    # Every stage evaluates once, at its last step.
    common = {"log_every": 10, "eval_every": 100_000, "eval_batches": 2, "keep_checkpoints": 1, "keep_best": 0,
              "tensorboard": False}
    # Adam with b1 = 0.9 (the tokenizer recipe's b1 = 0 is for GAN stability; without the
    # GAN, momentum gets further in a few hundred steps).
    # The video tokenizer learns to draw on single frames first (1-frame clips: the causal
    # tokenizer is a joint image/video one, and a frame costs ~1/9 of a 9-frame clip),
    # then the video stage starts from those weights (``init_from``) and learns time.
    # total_steps=0 for the frames stage skips it (the video stage then starts from scratch).
    c.video_tokenizer_frames = ml_collections.ConfigDict({
        "total_steps": 900, "batch_size": 16, "ema_decay": 0.98, "optimizer": {"b1": 0.9},
        "schedule": {"warmup_steps": 50}, "dataset": {"frames": 1}, **common})
    c.video_tokenizer = ml_collections.ConfigDict({
        "total_steps": 150, "batch_size": 8, "ema_decay": 0.98, "optimizer": {"b1": 0.9},
        "schedule": {"warmup_steps": 15}, **common})
    # The tone's pitch appears between 30 and 40 steps at batch 8 (r 0.07 -> 0.80 against the
    # clip's height); 50 steps of batch 4 carry it at r 0.65 in about 50 s less (131 -> 82 s in the
    # demo; docs/RESULTS.md "Ten minutes").
    c.audio_tokenizer = ml_collections.ConfigDict({
        "total_steps": 50, "batch_size": 4, "ema_decay": 0.98, "optimizer": {"b1": 0.9},
        "schedule": {"warmup_steps": 10}, **common})
    # The transformer reads the tokens of every clip computed once (``data_source=token_cache``,
    # written to DIR/token_cache: ~10x cheaper steps than tokenizing each batch), which asks
    # for prefix conditioning for the tasks with a partial condition (frame prediction);
    # COMMIT and prefix score alike at this scale (docs/RESULTS.md "Ablations at demo scale").
    c.generative = ml_collections.ConfigDict({
        "total_steps": 500, "batch_size": 16, "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 30},
        "sampling": {"eval_tasks": ""},
        "data_source": "token_cache", "conditioning": "prefix",
        "task_weights": {name: TASKS.get(name, 0.0) for name in TASK_NAMES}, **common})
    c.samples = ml_collections.ConfigDict({"num": 2, "steps": 12, "seed": 0})
    if arg == "fast":
        c.dataset.builder_overrides = {**DATA, "num_train": 16, "num_test": 8}
        for stage in ("video_tokenizer_frames", "video_tokenizer", "audio_tokenizer", "generative"):
            c[stage].total_steps = 2
            c[stage].eval_batches = 1
            c[stage].log_every = 1
        c.generative.batch_size = 8  # distinct clips per batch from the 8-clip test split
        c.samples.num, c.samples.steps = 1, 2
    elif arg:
        raise KeyError(f"unknown demo variant {arg!r}; the only one is 'fast'")
    return c

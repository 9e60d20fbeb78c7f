"""Shared pieces of the tokenizer configs: the optimizer, GAN and EMA recipe per size.

A variant is ``size[,key=value...]``, e.g. ``tiny``, ``tiny,quantizer=fsq``, ``B,gan=0``
(``mmgen.configs.common.parse_variant``).
"""

import ml_collections
from mmgen.configs.common import base_config

from mmgen.data.pipeline import default_dataset_config
from mmgen.train.optim import default_optimizer_config, default_schedule_config


def tokenizer_base(modality, size):
    cfg = base_config(family="tokenizer")
    cfg.modality = modality
    cfg.dataset = default_dataset_config()
    # MAGVIT-v2: Adam b1=0, b2=0.99, lr 1e-4 for both players; weight EMA 0.999.
    cfg.optimizer = default_optimizer_config(name="adam", lr=1e-4, b1=0.0, b2=0.99, weight_decay=0.0, grad_clip=1.0)
    cfg.schedule = default_schedule_config(name="warmup_cosine", warmup_steps=1000, end_lr_factor=0.1)
    cfg.disc_optimizer = default_optimizer_config(name="adam", lr=1e-4, b1=0.0, b2=0.99, weight_decay=0.0, grad_clip=1.0)
    cfg.disc_schedule = default_schedule_config(name="constant", warmup_steps=0)
    cfg.ema_decay = 0.999
    cfg.gan = ml_collections.ConfigDict(dict(start_step=20000))
    cfg.num_samples = 4
    cfg.best_metric = "eval/loss"
    cfg.keep_best = 1
    if size == "tiny":
        cfg.total_steps = 2000
        cfg.batch_size = 8
        cfg.log_every = 25
        cfg.eval_every = 500
        cfg.checkpoint_every = 500
        cfg.eval_batches = 8
        cfg.optimizer.lr = 1e-3
        cfg.disc_optimizer.lr = 2e-4
        cfg.schedule.warmup_steps = 100
        cfg.ema_decay = 0.99
        cfg.gan.start_step = 1000
    else:
        cfg.total_steps = 500_000
        cfg.batch_size = 256
        cfg.log_every = 100
        cfg.eval_every = 5000
        cfg.checkpoint_every = 5000
    return cfg

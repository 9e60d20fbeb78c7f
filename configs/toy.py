"""Tiny MLP regressor: tests the training spine and the sweep runner in seconds.

    python -m mmgen train --config configs/toy.py:tiny --workdir /tmp/toy
"""

import ml_collections
from mmgen.configs.common import base_config


def get_config(arg=None):
    arg = arg or "tiny"
    sizes = {"tiny": (16, 32), "small": (64, 256)}
    if arg not in sizes:
        raise KeyError(f"unknown variant {arg!r}; choose one of {sorted(sizes)}")
    dim, hidden = sizes[arg]
    cfg = base_config(family="toy", total_steps=40, batch_size=16, checkpoint_every=20,
                      log_every=5, eval_every=20)
    cfg.model = ml_collections.ConfigDict(dict(dim=dim, hidden=hidden))
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.weight_decay = 0.0
    cfg.schedule.warmup_steps = 5
    cfg.ema_decay = 0.0
    cfg.progress = False
    return cfg


def get_sweep():
    from mmgen.commands.sweep import product, sweep

    return product(sweep("optimizer.lr", [1e-3, 3e-3]))

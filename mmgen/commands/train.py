"""``mmgen train``: train a model, or resume the newest checkpoint in ``--workdir``.

Without ``--config`` the workdir's own ``config.json`` is resumed (overrides apply on
top); ``config.family`` picks the family (``mmgen.families``) the one loop runs.
"""

from __future__ import annotations

import sys

import jax

from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.parallel import distributed
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import is_disk_full


def train_config(args, overrides):
    """The config to train with: ``--config`` (+ overrides), else the workdir's own."""
    if args.config:
        return config_lib.load_config(args.config, overrides)
    if workdir_lib.has_config(args.workdir):  # resume a workdir with its own config
        cfg = workdir_lib.read_config(args.workdir)
        config_lib.apply_overrides(cfg, overrides)
        return cfg
    raise UserError(f"--config is required: {args.workdir} holds no config.json to resume from")


def main(args, overrides) -> int:
    distributed.maybe_initialize()
    cfg = train_config(args, overrides)
    family = get_family(cfg.get("family", ""))
    try:
        out = loop.run(family, cfg, args.workdir, stop_after=args.stop_after)
    except loop.TrainingDiverged as e:
        print(f"mmgen train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise UserError(f"writing to {args.workdir} failed: no space left on device ({e.filename or e}); "
                        f"free some space and run again to resume") from None
    if jax.process_index() == 0 and "loss" in out:
        print(f"trained to step {out['step']}: loss {out['loss']:.5f}; workdir {args.workdir}")
    elif jax.process_index() == 0:
        print(f"{args.workdir} is already trained to step {out['step']} (total_steps); nothing to do")
    return 0

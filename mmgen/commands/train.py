"""``mmgen train``: train a model, or resume the newest checkpoint in ``--workdir``.

Without ``--config`` the workdir's own ``config.json`` is resumed (overrides apply on
top); ``config.family`` picks the family (``mmgen.families``) the one loop runs.
"""

from __future__ import annotations

import os
import sys

import jax

from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.parallel import distributed
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import is_disk_full


# Config keys naming other runs' workdirs (the frozen tokenizers, an adapter's base, a warm start).
RUN_PATHS = ("tokenizers.video_workdir", "tokenizers.audio_workdir", "base_workdir", "init_from")


def absolute_run_paths(cfg) -> None:
    """Make the other runs' workdirs ``cfg`` names absolute (relative to where ``train`` runs), so
    the run's ``config.json`` finds them from any directory (``sample``, ``eval``, ``export``).
    A path that is not a directory is left as typed, for the config checks to name it."""
    for key in RUN_PATHS:
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.get(name) if node is not None else None
        value = node.get(leaf) if node is not None else None
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.isdir(value):
            node[leaf] = os.path.abspath(value)


def train_config(args, overrides):
    """The config to train with: ``--config`` (+ overrides), else the workdir's own."""
    if args.config:
        cfg = config_lib.load_config(args.config, overrides)
    elif workdir_lib.has_config(args.workdir):  # resume a workdir with its own config
        cfg = workdir_lib.read_config(args.workdir)
        config_lib.apply_overrides(cfg, overrides)
    else:
        raise UserError(f"--config is required: {args.workdir} holds no config.json to resume from")
    absolute_run_paths(cfg)
    return cfg


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

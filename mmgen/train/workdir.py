"""The one reader and writer of a workdir's side files.

A workdir holds ``config.json`` (the resolved config, written atomically),
``checkpoints/`` (Orbax, ``mmgen.train.checkpoint``), ``metrics.jsonl`` and
``tensorboard/`` (``mmgen.train.metrics``), ``samples/``, and evaluation results
(``eval.json`` + ``eval/`` for the newest checkpoint, ``eval_step{S}.json`` +
``eval_step{S}/`` for an older one). Everything downstream asks this module for them,
so a layout change touches one file. Restoring a whole training state is
``mmgen.train.loop.load_state``.
"""

from __future__ import annotations

import os

import ml_collections

from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.train.checkpoint import Checkpointer

CONFIG = "config.json"


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG)


def has_config(workdir: str) -> bool:
    return os.path.exists(config_path(workdir))


def read_config(workdir: str, families: tuple[str, ...] = (), what: str = "") -> ml_collections.ConfigDict:
    """``workdir``'s config; a ``UserError`` when there is none or its family is not in ``families``.

    ``what`` names the expected run in the error ("a tokenizer", ...); default: the families.
    """
    if not os.path.isdir(workdir):
        raise UserError(f"{workdir}: no such workdir")
    if not has_config(workdir):
        raise UserError(f"{workdir} is not a workdir (no {CONFIG}): train into it first or check the path")
    cfg = config_lib.from_json_file(config_path(workdir))
    if families and cfg.get("family") not in families:
        want = what or " or ".join(repr(f) for f in families)
        raise UserError(f"{workdir} holds a {cfg.get('family')!r} run, not {want}")
    return cfg


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config to ``workdir/config.json`` (atomically: a temporary file, then a rename)."""
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config_lib.to_json(cfg))
    os.replace(tmp, path)
    return path


def has_checkpoints(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, "checkpoints"))


def all_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``workdir``, oldest first ([] when none)."""
    if not has_checkpoints(workdir):
        return []
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def latest_step(workdir: str) -> int | None:
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def check_step(workdir: str, step: int | None) -> None:
    """One line when ``workdir`` holds no checkpoint at ``step`` (None: nothing to check)."""
    if step is None:
        return
    steps = all_steps(workdir)
    if step not in steps:
        raise UserError(f"--step {step}: {workdir} has checkpoints at steps {steps or 'none'}")


def output_paths(workdir: str, step: int | None = None) -> tuple[str, str]:
    """(result json, folder for images and sounds) of an evaluation of ``step`` (None: the newest)."""
    name = "eval" if step is None else f"eval_step{int(step)}"
    return os.path.join(workdir, f"{name}.json"), os.path.join(workdir, name)

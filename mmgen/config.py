"""Python config files with variants and ``--config.key=value`` overrides.

big_vision style: a config is a python file with ``get_config(arg)`` returning an
``ml_collections.ConfigDict``; ``path.py:variant`` passes ``variant`` as ``arg``
(``"tiny"``, ``"B"``, or ``"k=v,k2=v2"`` key lists as the file defines). Overrides
``--config.a.b=value`` are parsed as python literals (falling back to strings) and
must name keys that exist: a typo ends the run with the closest valid keys, so a
sweep never silently trains the default.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from mmgen.errors import UserError

# Keys every trainer honours (DESIGN.md "Config keys every trainer honours").
COMMON_KEYS = (
    "seed", "total_steps", "batch_size", "checkpoint_every", "keep_checkpoints",
    "log_every", "eval_every", "mesh", "sharding_rules", "optimizer", "schedule", "dataset",
)


def load_module(path: str):
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    name = "mmgen_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} defines no get_config(arg)")
    return module


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"configs/x.py:tiny"`` -> ``("configs/x.py", "tiny")``."""
    if ":" in spec and not os.path.isfile(spec):
        path, arg = spec.split(":", 1)
        return path, arg
    return spec, None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path.py[:arg]`` and apply ``key=value`` overrides (without ``--config.``)."""
    path, arg = split_spec(spec)
    module = load_module(path)
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except UserError:
        raise
    except (KeyError, ValueError) as e:
        detail = e.args[0] if e.args else e
        raise UserError(f"config {path!r} has no variant {arg!r}: {detail}") from None
    cfg = ml_collections.ConfigDict(cfg)
    apply_overrides(cfg, overrides)
    return cfg


def _all_keys(cfg, prefix="") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Dicts whose keys are free (they are passed on as keyword arguments): an override may add one,
# e.g. ``dataset.builder_overrides.num_train=40000``.
OPEN_DICTS = ("builder_overrides",)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply ``a.b=value`` overrides in place; unknown keys are a ``UserError`` (except in ``OPEN_DICTS``)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        key = key.removeprefix("--config.").removeprefix("config.")
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            is_last = i == len(parts) - 1
            is_new_free_key = is_last and i > 0 and parts[i - 1] in OPEN_DICTS
            if is_new_free_key and isinstance(node, ml_collections.ConfigDict) and part not in node:
                node[part] = parse_value(text)
                break
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = _all_keys(cfg)
                close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"config has no key {key!r}{hint}")
            if is_last:
                value = parse_value(text)
                old = node[part]
                if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
                    value = type(old)(value)
                try:
                    node[part] = value
                except TypeError as e:
                    raise UserError(f"config.{key}={text!r}: {e}") from None
            else:
                node = node[part]


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_json_file(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config to ``workdir/config.json`` (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(cfg))
    os.replace(tmp, path)
    return path


def check_common_keys(cfg: ml_collections.ConfigDict) -> None:
    missing = [k for k in COMMON_KEYS if k not in cfg]
    if missing:
        raise UserError(f"config lacks the common trainer keys {missing}; start from configs/common.py")


def base_config(**overrides) -> ml_collections.ConfigDict:
    """The keys every trainer honours, with defaults; config files start from this."""
    from mmgen.parallel.sharding import DEFAULT_RULES
    from mmgen.train.optim import default_optimizer_config, default_schedule_config

    cfg = ml_collections.ConfigDict()
    cfg.family = ""
    cfg.seed = 0
    cfg.total_steps = 1000
    cfg.batch_size = 8
    cfg.grad_accum_steps = 1  # micro-batches per update: batch_size / grad_accum_steps examples at once
    cfg.checkpoint_every = 500
    cfg.keep_checkpoints = 3
    cfg.keep_best = 0
    cfg.best_metric = ""
    cfg.best_mode = "min"
    cfg.async_checkpointing = True
    cfg.log_every = 50
    cfg.eval_every = 0
    cfg.eval_batches = 4
    cfg.eval_split = "test"
    cfg.progress = True
    cfg.tensorboard = True
    cfg.peak_flops = 0.0  # FLOP/s per device for MFU; 0 = look the device up
    cfg.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    cfg.sharding_rules = [list(r) if isinstance(r[1], str) or r[1] is None else [r[0], list(r[1])]
                          for r in DEFAULT_RULES]
    cfg.optimizer = default_optimizer_config()
    cfg.schedule = default_schedule_config()
    cfg.init_from = ""  # a workdir whose model weights start a fresh run (fine-tuning); see loop.load_warm_start
    cfg.init_from_step = -1  # its checkpoint to take; -1 = the latest
    cfg.dataset = ml_collections.ConfigDict()
    cfg.update(overrides)
    return cfg

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

from mmgen import fs
from mmgen.errors import UserError

# Keys every trainer honours; ``mmgen.configs.common.base_config`` gives them their defaults.
COMMON_KEYS = (
    "seed", "total_steps", "batch_size", "checkpoint_every", "keep_checkpoints",
    "log_every", "eval_every", "mesh", "sharding_rules", "optimizer", "schedule", "dataset",
)


def shipped_configs_dir() -> str | None:
    """Where the shipped configs are: the package ``mmgen.configs`` (the repository's ``configs/``)."""
    spec = importlib.util.find_spec("mmgen.configs")
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def resolve_path(path: str) -> str:
    """A config file on disk, else the shipped one of that name: ``generative/multitask.py`` and
    ``configs/generative/multitask.py`` both find it from any directory, also from an installed wheel."""
    if os.path.isfile(path):
        return path
    shipped = shipped_configs_dir()
    if shipped and not os.path.isabs(path):
        candidate = os.path.join(shipped, path.removeprefix("configs" + os.sep).removeprefix("configs/"))
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"config file {path!r} does not exist (nor among the shipped configs in {shipped})")


def load_module(path: str):
    if not path.endswith(".py"):
        hint = (": to resume a workdir with its own config.json, leave --config out"
                if path.endswith(".json") else "")
        raise UserError(f"config {path!r} is not a python config file (configs/X.py[:variant]){hint}")
    path = resolve_path(path)
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
    """A config saved by ``to_json``; ``ValueError`` when the file is not a JSON object."""
    data = json.loads(fs.read_bytes(path).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    return ml_collections.ConfigDict(data)


def check_common_keys(cfg: ml_collections.ConfigDict) -> None:
    missing = [k for k in COMMON_KEYS if k not in cfg]
    if missing:
        raise UserError(f"config lacks the common trainer keys {missing}; start from configs/common.py's base_config()")


def check_int_at_least(key: str, value, least: int, note: str = "") -> None:
    """``UserError`` naming ``config.<key>`` unless ``value`` is an integer (not a bool) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"config.{key}={value!r} must be an integer of at least {least}" + (f" ({note})" if note else ""))

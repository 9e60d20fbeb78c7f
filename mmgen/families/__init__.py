"""Model families: what the one training loop (``mmgen.train.loop``) runs.

Each module (``toy``, ``tokenizer``, ``generative``, ``adapters``) defines ``FAMILY``, a
``mmgen.train.loop.Family``: how to build its state, one update step, its data, its
evaluation hook, and how a trained workdir is loaded for use. ``cfg.family`` names
the module.
"""

import importlib

from mmgen.errors import UserError

FAMILIES = ("toy", "tokenizer", "generative", "adapters")


def get_family(name: str):
    if name not in FAMILIES:
        raise UserError(f"config.family={name!r} is not one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"mmgen.families.{name}").FAMILY

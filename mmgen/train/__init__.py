"""Trainers: one shared loop (``loop.py``) and one family module per model kind.

``cfg.family`` names the module (``mmgen.train.<family>``) whose ``FAMILY`` the loop runs.
"""

import importlib

from mmgen.errors import UserError

FAMILIES = ("toy", "tokenizer", "generative", "adapters")


def get_family(name: str):
    if name not in FAMILIES:
        raise UserError(f"config.family={name!r} is not one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"mmgen.train.{name}").FAMILY

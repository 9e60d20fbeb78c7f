"""Shared by the plotting scripts here: ``LABEL=WORKDIR`` arguments -> their ``eval.json``."""

import json
import os


def read_evals(pairs: list[str]) -> list[tuple[str, dict]]:
    """``["8=runs/a", ...]`` -> ``[("8", <runs/a/eval.json>), ...]`` in the given order."""
    out = []
    for pair in pairs:
        label, workdir = pair.split("=", 1)
        with open(os.path.join(workdir, "eval.json")) as f:
            out.append((label, json.load(f)))
    return out

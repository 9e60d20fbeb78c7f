"""``mmgen export``: a run's inference weights as safetensors, its config and a model card.

    python -m mmgen export --workdir runs/vtok --out exports/vtok [--step S]

Writes ``--out`` (a new directory) as ``mmgen.families.export`` describes: the EMA model
where the run kept one, read alone from the checkpoint (no optimizer state), for a
tokenizer or a generative run (with its tokenizers exported into ``tokenizers/``).
``mmgen.load_tokenizer`` / ``mmgen.load_generator`` and every command that takes a
tokenizer or generative ``--workdir`` (``tokenize``, ``sample``) load the directory as
they load the workdir.
"""

from __future__ import annotations

import os

from mmgen.families import export as export_family
from mmgen.train import workdir as workdir_lib


def main(args, overrides) -> int:
    """Flags checked first (the run, ``--out`` new, ``--step`` present), then load and write."""
    workdir_lib.read_config(args.workdir, export_family.FAMILIES, "a tokenizer or generative run")
    export_family.check_out(args.out)
    workdir_lib.check_step(args.workdir, args.step)
    info = export_family.export_run(args.workdir, args.out, step=args.step)
    extra = "".join(f", {m} tokenizer in tokenizers/{m}" for m in info["tokenizers"])
    print(f"exported the {info['family']} run {args.workdir} at step {info['step']} to {os.path.abspath(args.out)}: "
          f"model.safetensors {info['weights_bytes'] / 2**20:.1f} MiB ({info['parameters']:,} parameters){extra}")
    return 0

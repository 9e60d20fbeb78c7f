"""``mmgen sample``: generate clips for one task from a generative (or adapter) workdir.

    python -m mmgen sample --workdir runs/gen --task frame_prediction --num 4 --out samples/
    python -m mmgen sample --workdir runs/gen --task audio_to_video --input song.wav --out samples/

Conditional tasks take their condition from ``--input`` (any video or sound file
FFmpeg reads; every sample shares it) or else from the first clips of the test split.
Flags are checked and the input is read before anything compiles; what is written is
described in ``mmgen.generative.generator``; with the files, ``<out>/index.html`` (every
sample in the folder with its condition and metrics: ``mmgen.eval.gallery``) is rebuilt.
"""

from __future__ import annotations

import os

from mmgen import config as config_lib
from mmgen import fs
from mmgen.errors import UserError
from mmgen.eval import gallery
from mmgen.parallel import distributed
from mmgen.families.generative import load_generator, read_config
from mmgen.generative.generator import check_task, conditioned_modalities, read_input


def main(args, overrides) -> int:
    """``mmgen sample``: flags and input checked first, then load, sample, decode, write."""
    distributed.maybe_initialize()  # launched like a multi-host run: evaluate/sample on every host
    cfg = read_config(args.workdir)
    config_lib.apply_overrides(cfg, overrides)
    check_task(cfg, args.task)
    if args.num < 1:
        raise UserError(f"--num={args.num} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps={args.steps} must be at least 1")
    clips = None
    if args.input:
        if conditioned_modalities(args.task):
            clips = read_input(args.input, cfg, args.task, args.num)
        else:
            print(f"mmgen sample: note: task {args.task!r} takes no condition clip; --input is ignored")
    generator = load_generator(args.workdir, overrides)
    result = generator.sample_task(args.task, args.num, seed=args.seed, clips=clips, steps=args.steps,
                                   guidance=args.guidance, temperature=getattr(args, "temperature", None),
                                   progress=True)
    paths = generator.save(result, args.out)
    gallery.record_samples(args.out, result, paths, fps=generator.fps, sample_rate=generator.sample_rate,
                           step=getattr(generator, "step", None), source="mmgen sample",
                           input_path=args.input if clips is not None else None)
    gallery.write_index(args.out, title=f"samples of {os.path.abspath(args.workdir)}")
    kind = "videos" if result.video is not None else "sounds"
    if distributed.is_writer():
        print(f"wrote {len(paths['media'])} {kind} of {args.task} to {fs.normalize(args.out)}"
              + (f" (grid {os.path.basename(paths['grid'])}" if paths["grid"] else " (")
              + f", tokens {os.path.basename(paths['tokens'])})")
    return 0

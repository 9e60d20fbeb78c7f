"""Input-pipeline throughput in clips/s at 17 x 128 x 128 with 2.125 s of 16 kHz audio.

Builds (once) a ``moving_shapes_av/default`` variant with ``--clips`` training clips
in ``--data-dir``, then times ``mmgen.data.pipeline.make_iterator`` in training mode
(global shuffle, random crop + resize, flip, batching) after a warm-up, and prints
the number and the command that produced it. A script, not a test.

    python benchmarks/data_throughput.py [--workers 0] [--batch 32] [--batches 40]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

from mmgen.data import pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mmgen_bench_tfds"))
    parser.add_argument("--clips", type=int, default=256, help="training clips to generate (once)")
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--batches", type=int, default=40, help="timed batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--no-augment", action="store_true", help="evaluation preprocessing instead")
    args = parser.parse_args(argv)

    cfg = pipeline.default_dataset_config()
    cfg.name = "moving_shapes_av/default"
    cfg.builder_overrides = {"num_train": args.clips, "num_test": 8}
    cfg.data_dir = args.data_dir
    cfg.frames, cfg.resolution, cfg.fps, cfg.sample_rate = 17, 128, 8.0, 16000
    cfg.num_workers = args.workers
    t0 = time.perf_counter()
    it = pipeline.make_iterator(cfg, split="train", global_batch_size=args.batch, seed=0,
                                train=not args.no_augment, process_index=0, process_count=1, num_epochs=1000)
    for _ in range(args.warmup):
        batch = next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        batch = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del it  # lets grain stop its workers and free their shared memory
    clips_per_s = args.batches * args.batch / elapsed
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    command = "python benchmarks/data_throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"batch shapes: {shapes}")
    print(f"setup (build if needed + first batches): {start - t0:.1f} s; cpus: {os.cpu_count()}")
    print(f"data throughput: {clips_per_s:.1f} clips/s "
          f"({'eval' if args.no_augment else 'train'} preprocessing, {args.workers} workers, batch {args.batch})")
    if args.workers == 0:  # all work in this process: CPU time is a load-independent cost
        print(f"cpu cost: {1000 * cpu / (args.batches * args.batch):.1f} ms of CPU per clip "
              f"(= {args.batches * args.batch / cpu:.1f} clips per CPU-second)")
    print(f"command: {command.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

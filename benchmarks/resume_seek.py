"""Resuming on another process layout: reading past the consumed batches vs seeking.

A checkpoint's data position is per process; restored on another number of processes
the pipeline must be re-positioned. Before: every consumed batch was read again (the
cost grows with the step). Now: ``pipeline.seek`` writes grain's position directly.

    python -m benchmarks.resume_seek [--data-dir /tmp/resume_seek_data]

Prints both costs at a few steps (the read-again cost measured on up to 20 batches and
scaled linearly; a seek is timed directly at each step).
"""

from __future__ import annotations

import argparse
import time

import ml_collections

from mmgen.data import pipeline

GLOBAL_BATCH = 8


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/tmp/resume_seek_data")
    args = parser.parse_args(argv)
    cfg = pipeline.default_dataset_config()
    cfg.data_dir = args.data_dir
    cfg.builder_overrides = ml_collections.ConfigDict({"num_train": 64, "num_test": 8})

    def fresh():  # process 0 of 2, as a run resumed on a changed layout opens it
        return pipeline.make_iterator(cfg, split="train", global_batch_size=GLOBAL_BATCH, seed=0, train=True,
                                      process_index=0, process_count=2)

    it = fresh()
    next(it)  # dataset built / opened, first batch compiled away
    reads = 20
    t = time.perf_counter()
    for _ in range(reads):
        next(it)
    per_batch = (time.perf_counter() - t) / reads
    print(f"{'step':>9}  {'read again (s)':>15}  {'seek (ms)':>10}")
    for step in (1_000, 100_000, 1_000_000):
        it = fresh()
        t = time.perf_counter()
        pipeline.seek(it, step * GLOBAL_BATCH, global_batch_size=GLOBAL_BATCH, process_index=0, process_count=2)
        seek_ms = (time.perf_counter() - t) * 1e3
        next(it)  # the seeked iterator delivers
        print(f"{step:>9,}  {step * per_batch:>15,.0f}  {seek_ms:>10.2f}")


if __name__ == "__main__":
    main()

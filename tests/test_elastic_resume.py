"""Resuming on another process layout seeks to the global example count in constant time.

The grain pipeline, the random-token stream and the token batches all take
``seek(examples)``; the loop calls it when a checkpoint's per-process data positions do
not fit the new layout. No batch before the position is read.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from mmgen import config as config_lib
from mmgen.data import pipeline
from mmgen.generative.tokens import RandomTokenBatches
from mmgen.train import loop

G = 4  # global batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cfg = pipeline.default_dataset_config()
    cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg.frames, cfg.resolution = 3, 8
    cfg.builder_overrides = ml_collections.ConfigDict({"num_train": 8, "num_test": 4, "frames": 3, "resolution": 8})
    return cfg


def stream(cfg, p, n):
    return pipeline.make_iterator(cfg, split="train", global_batch_size=G, seed=3, train=True, process_index=p,
                                  process_count=n)


def global_batches(cfg, layout, start, count, seek):
    """``count`` global batches from batch ``start`` on ``layout`` processes: (labels, first pixels) per row."""
    its = [stream(cfg, p, layout) for p in range(layout)]
    for p, it in enumerate(its):
        if seek:
            pipeline.seek(it, start * G, global_batch_size=G, process_index=p, process_count=layout)
        else:
            for _ in range(start):
                next(it)
    out = []
    for _ in range(count):
        rows = [next(it) for it in its]
        out.append(list(zip(np.concatenate([r["label"] for r in rows]).tolist(),
                            np.concatenate([r["video"][:, 0, 0, 0, 0] for r in rows]).tolist())))
    return out


def test_seek_on_another_layout_gives_the_straight_streams_global_batches(dataset):
    straight = global_batches(dataset, 1, 0, 6, seek=False)
    # 3 global batches read on 1 process, then resumed on 2 (and the other way round): the same
    # examples with the same augmentation draws, row for row (a global batch is layout-free).
    assert global_batches(dataset, 2, 3, 3, seek=True) == straight[3:]
    assert global_batches(dataset, 1, 5, 1, seek=True) == straight[5:]
    assert global_batches(dataset, 2, 3, 3, seek=False) == straight[3:]  # what reading again gave


def test_seek_costs_the_same_at_any_step(dataset):
    far = stream(dataset, 1, 2)
    pipeline.seek(far, 1_000_000 * G, global_batch_size=G, process_index=1, process_count=2)
    batch = next(far)  # delivered at once: nothing before it is read
    assert batch["video"].shape[0] == G // 2
    with pytest.raises(ValueError, match="whole number of global batches"):
        pipeline.seek(stream(dataset, 0, 1), G + 1, global_batch_size=G, process_index=0, process_count=1)


def test_random_tokens_do_not_depend_on_the_process_count_and_seek():
    cfg = config_lib.load_config("generative/multitask.py:tiny,data_source=random_tokens")
    one = RandomTokenBatches(cfg, seed=0, batch_size=8, process_index=0, process_count=1)
    halves = [RandomTokenBatches(cfg, seed=0, batch_size=8, process_index=p, process_count=2) for p in range(2)]
    for it in halves:
        it.seek(5 * 8)
    loop._fast_forward(one, 5, 8)
    whole, parts = next(one), [next(it) for it in halves]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]), err_msg=key)

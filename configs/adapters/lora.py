"""LoRA adapters on a trained generative workdir (docs/ALGORITHMS.md "Adapters"; Hu et al., 2021).

    python -m mmgen train --config configs/adapters/lora.py:tiny,tasks=frame_prediction \
        --workdir runs/lora_fp --config.base_workdir=runs/gen

Rank chosen for the same trainable size as ``flylora.py`` (r = 32, which trains only
B [m, r]): LoRA trains A [r', n] and B [m, r'], ``r' (n + m)`` weights per layer, equal
to FlyLoRA's ``m r`` when ``r' = m r / (n + m)``. On the attention projections
(m = n = width) that is r' = r / 2 = 16: ``16 * 2 * width = 32 * width`` each, e.g.
3,072 per projection at the tiny model's width 32 and 24,576 at B's 768.
alpha = 2 r' keeps FlyLoRA's scale alpha / r = 2. A ~ N(0, 1/r'^2), B = 0.
Variants: see ``adapter_common.py``.
"""

import ml_collections
from mmgen.configs.adapters.adapter_common import ATTENTION, adapter_config

FLYLORA_RANK = 32
RANK = FLYLORA_RANK // 2  # equal trainable size on square layers (see the docstring)


def get_config(arg=None):
    adapter = ml_collections.ConfigDict({
        "kind": "lora",
        "targets": ATTENTION,
        "rank": RANK,
        "alpha": 2.0 * RANK,
        "seed": 0,
        "init": "normal",  # A ~ N(0, 1/r^2); "he_uniform": U(+-sqrt(6/n))
        "branches": 1,
        "branch_weights": [1.0],
    })
    return adapter_config(adapter, arg)

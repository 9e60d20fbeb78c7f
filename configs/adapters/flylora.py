"""FlyLoRA adapters on a trained generative workdir (docs/ALGORITHMS.md "Adapters", FlyLoRA 2025).

    python -m mmgen train --config configs/adapters/flylora.py:tiny,tasks=frame_prediction \
        --workdir runs/fly_fp --config.base_workdir=runs/gen

Paper defaults: rank r = 32, k = 8 ranks active per token, alpha = 2r (scale 2), a
frozen sparse random A with n * k / r nonzeros per row, top-k of |A x + d|, routing
bias step u = 1e-3. Only B [m, r] trains: ``m * r`` weights per adapted layer, i.e.
``32 * width`` on each attention projection (m = n = width). ``configs/adapters/lora.py``
matches that size with LoRA rank 16. Variants: see ``adapter_common.py``.
"""

import ml_collections
from mmgen.configs.adapters.adapter_common import ATTENTION, adapter_config

RANK, K = 32, 8


def get_config(arg=None):
    adapter = ml_collections.ConfigDict({
        "kind": "flylora",
        "targets": ATTENTION,
        "rank": RANK,
        "k": K,
        "alpha": 2.0 * RANK,
        "seed": 0,  # A's seed (per layer, mixed with the module path); different tasks: different seeds
        "select": "abs",  # top-k of |A x + d| (the paper's minimal code); "signed": of A x + d
        "bias_lr": 1e-3,  # u in d_i += u * sign(mean(c) - c_i)
        "branches": 1,  # > 1 only in workdirs written by `mmgen adapters merge`
        "branch_weights": [1.0],
    })
    return adapter_config(adapter, arg)

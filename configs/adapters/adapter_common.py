"""Shared recipe of the adapter configs (``lora.py``, ``flylora.py``).

An adapter config is the generative config of the same variant (this run's data,
tasks, masking, steps) without the keys the base workdir decides (``model``,
``tokenizers``, ``conditioning``: ``mmgen.families.adapters.BASE_KEYS``, copied from the
base when the run starts), plus the base reference, an ``adapter`` block and the
``merge`` block (``mmgen adapters merge --method`` options, ``merge_options``).

Variant: ``size[,tasks=a+b][,data_source=tokenizers|random_tokens]`` with size ``tiny``
(CPU) or ``B``/``L``/``XL`` (the base's size decides the model; this picks the recipe).
"""

import ml_collections
from mmgen.configs.common import parse_variant
from mmgen.configs.generative import multitask

from mmgen.families.adapters import BASE_KEYS

# The attention projections: square (width x width) layers, so LoRA's A + B and
# FlyLoRA's B have the same size when LoRA's rank is half FlyLoRA's.
ATTENTION = r"blocks\.layers\.attention\.(query|key|value|out)"

OPTIONS = ("tasks", "data_source")


def merge_options():
    """``mmgen adapters merge --method M`` options (formulas: ``mmgen.adapters.merge``), the papers' defaults.

    Change one with ``--config.merge.<method>.<key>=value`` on the merge command line.
    """
    return ml_collections.ConfigDict({
        # TIES-Merging (Yadav et al. 2023): keep the top k of |tau_i|, elect signs, disjoint mean, times lam.
        # scope "model": top-k over the whole task vector (the paper); "layer": within each layer.
        "ties": {"k": 0.2, "lam": 1.0, "scope": "model"},
        # Model Breadcrumbs (Davari & Belilovsky 2023): per layer, mask the drop_largest largest |tau_i|
        # and all below the next `keep`; tau = alpha * sum of the masked tau_i. The starting point of the
        # authors' released search (beta = 0.15 kept, gamma = 0.006 top removed, alpha = 0.2).
        "breadcrumbs": {"keep": 0.15, "drop_largest": 0.006, "alpha": 0.2},
        # DARE (Yu et al. 2023): drop each entry with probability p, rescale by 1 / (1 - p), then
        # combine by "sum" (times lam) or "ties" (sign election + disjoint mean); masks drawn from seed.
        "dare": {"p": 0.9, "combine": "sum", "lam": 1.0, "seed": 0},
        # LoRA merged by ties / breadcrumbs / dare without --fold: the rank of the truncated-SVD LoRA
        # that stores the (full-rank) merged delta; 0: N x adapter rank (capped at min(in, out): exact).
        "svd_rank": 0,
    })


def adapter_config(adapter, arg):
    """The run config around an ``adapter`` block (a ConfigDict with kind, targets, rank, ...)."""
    size, options = parse_variant(arg, options=OPTIONS, why=" (the model, tokenizers and conditioning are the "
                                  "base workdir's)")
    cfg = multitask.get_config(",".join([size] + [f"{k}={v}" for k, v in options.items()]))
    for key in BASE_KEYS:
        del cfg[key]
    cfg.family = "adapters"
    cfg.base_workdir = ""  # the trained generative workdir (required)
    cfg.base_step = -1  # -1: its newest checkpoint, pinned when the run starts
    cfg.base_fingerprint = ""  # sha256 of the base parameters, pinned when the run starts
    cfg.adapter = adapter
    cfg.merge = merge_options()

    # Adapters train with plain AdamW, no weight decay, a short warm-up.
    cfg.optimizer.b2 = 0.999
    cfg.optimizer.weight_decay = 0.0
    cfg.ema_decay = 0.0
    if size == "tiny":
        cfg.total_steps = 300
        cfg.log_every = 10
        cfg.eval_every = 100
        cfg.checkpoint_every = 100
        cfg.optimizer.lr = 1e-3
        cfg.schedule.warmup_steps = 30
    else:
        cfg.total_steps = 20_000
        cfg.eval_every = 2_000
        cfg.checkpoint_every = 2_000
        cfg.optimizer.lr = 2e-4
        cfg.schedule.warmup_steps = 500
    return cfg

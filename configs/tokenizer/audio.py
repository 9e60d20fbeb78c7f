"""SoundStream-style audio tokenizer on the sound of moving_shapes_av (tiny) or speech/music (B).

    python -m mmgen train --config configs/tokenizer/audio.py:tiny --workdir runs/atok
    python -m mmgen train --config configs/tokenizer/audio.py:tiny,quantizer=vq --workdir runs/atok_vq

Variant: ``size[,quantizer=rvq|vq|lfq][,gan=0|1][,channels=C]`` (``channels``: the
codec width C, 4 in ``tiny``; 16 is the width that learns the tone within a few hundred
CPU steps, docs/RESULTS.md "Audio tokenizer"). ``vq`` is the plain baseline at the
same bitrate as the RVQ (one codebook of 2^(levels*log2(codes)) is infeasible, so the
baseline is one VQ level with the same total bits split... see README of the results:
we compare RVQ 4x256 (32 bits/frame) with VQ 1x256 at 8 bits and with mu-law PCM).
"""

from mmgen.configs.common import parse_variant
from mmgen.configs.tokenizer.common import tokenizer_base

from mmgen.tokenizers.audio import discriminator_config, model_config
from mmgen.tokenizers.losses import default_loss_config
from mmgen.tokenizers.quantizers import default_quantizer_config


def get_config(arg=None):
    size, options = parse_variant(arg)
    if size not in ("tiny", "B"):
        raise KeyError(f"unknown size {size!r}; choose one of ['B', 'tiny']")
    cfg = tokenizer_base("audio", size)
    cfg.model = model_config(size)
    cfg.discriminator = discriminator_config(size)
    if "channels" in options:
        cfg.model.channels = int(options["channels"])
    kind = options.get("quantizer", "rvq")
    if kind == "lfq":
        q = default_quantizer_config("lfq")
        q.num_bits = int(options.get("bits", 10))
        q.entropy_groups = 1
        cfg.model.quantizer = q
    elif kind == "vq":
        q = default_quantizer_config("vq")
        q.codebook_size = cfg.model.quantizer.codebook_size
        q.code_dim = cfg.model.quantizer.code_dim
        q.use_ema = True
        cfg.model.quantizer = q
    elif kind != "rvq":
        raise KeyError(f"quantizer={kind!r} is not one of rvq, vq, lfq")
    cfg.loss = default_loss_config()
    cfg.loss.feature_matching_weight = 1.0  # SoundStream: lambda_feat / lambda_adv = 100 / 1 with rec weight 1
    cfg.loss.generator_weight = 0.1
    if options.get("gan", "1") == "0":
        cfg.loss.generator_weight = 0.0
    cfg.model.sample_rate = cfg.dataset.sample_rate
    if size != "tiny":
        cfg.dataset.name = "moving_shapes_av/default"
        cfg.dataset.frames = 17
        cfg.model.dtype = "bfloat16"
    return cfg

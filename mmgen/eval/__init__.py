"""Evaluation: reconstruction metrics (PSNR, SSIM, SI-SNR), codebook usage and
perplexity, masked-token accuracy against a unigram baseline (``metrics``), the
Frechet distance (``frechet``) and the I3D network behind FVD (``i3d``, weights only
from a file the user gives)."""

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

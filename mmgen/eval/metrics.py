"""Host-side evaluation metrics (numpy): reconstruction quality, codebook health,
token prediction accuracy.

Used at eval time on gathered numpy arrays, never inside ``jit``.

* ``psnr``: ``10 log10(max_val^2 / MSE)``; ``max_val`` is the signal's peak-to-peak
  range (255 for uint8, 1 for [0, 1], 2 for [-1, 1] model outputs).
* ``ssim``: Wang et al. 2004 ("Image quality assessment: from error visibility to
  structural similarity"), with the constants of their reference code and of
  ``tf.image.ssim``: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03,
  ``'valid'`` filtering (no padding), computed per channel and averaged over
  positions and channels (``luma=True`` first converts RGB to BT.601 luma
  Y = 0.299 R + 0.587 G + 0.114 B). Images are ``[..., H, W, C]``; every leading
  index (batch, frame) is one image, and the result is the mean over images.
* ``si_snr``: scale-invariant SNR (Le Roux et al. 2019, "SDR - half-baked or well
  done?"): both signals made zero-mean, ``s = <est, ref> ref / |ref|^2``,
  ``10 log10(|s|^2 / |est - s|^2)`` in dB.
* ``codebook_usage``: fraction of the vocabulary that occurs at least once (counts
  distinct indices, so it works for 2^18 codes); ``perplexity``: ``exp(H)`` of the
  empirical code distribution, natural log (1 = one code, vocab_size = uniform).
* ``masked_token_accuracy``: accuracy of predictions on masked positions only;
  ``unigram_baseline_accuracy``: the accuracy of always predicting the training
  set's most frequent token, the floor a generative model must beat.
"""

from __future__ import annotations

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_LUMA = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------- pixels


def psnr(a, b, max_val: float = 255.0, axis=None):
    """Peak signal-to-noise ratio in dB.

    Args:
      a, b: arrays of the same shape (any dtype; computed in float64).
      max_val: peak-to-peak range of the signal.
      axis: axes the MSE is averaged over; None = all elements (one number).
        For a per-frame PSNR of ``[B, T, H, W, C]`` video use ``axis=(-3, -2, -1)``.
    Returns:
      float (``inf`` for identical inputs) or an array over the remaining axes.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = np.mean(np.square(a - b), axis=axis)
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(max_val**2 / mse)
    return float(value) if np.ndim(value) == 0 else value


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1D Gaussian ``[size]``; the 2D SSIM window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * np.square(x / sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter over H and W of ``[N, H, W, C]``."""
    k = g.size
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)  # [N, H-k+1, W, C, k]
    x = rows @ g
    cols = np.lib.stride_tricks.sliding_window_view(x, k, axis=2)  # [N, H', W-k+1, C, k]
    return cols @ g


def ssim_per_image(a, b, max_val: float = 255.0, luma: bool = False) -> np.ndarray:
    """SSIM of each image: ``[..., H, W, C]`` -> ``[...]`` (see module docstring)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {a.shape} and {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"ssim needs [..., H, W, C] images, got shape {a.shape}")
    if luma:
        if a.shape[-1] != 3:
            raise ValueError(f"ssim luma=True needs 3 RGB channels, got {a.shape[-1]}")
        a, b = (a @ _LUMA)[..., None], (b @ _LUMA)[..., None]
    lead, (h, w, c) = a.shape[:-3], a.shape[-3:]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    a = a.reshape(-1, h, w, c)
    b = b.reshape(-1, h, w, c)
    g = gaussian_window()
    c1 = (SSIM_K1 * max_val) ** 2
    c2 = (SSIM_K2 * max_val) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.mean(axis=(1, 2, 3)).reshape(lead)


def ssim(a, b, max_val: float = 255.0, luma: bool = False) -> float:
    """Mean SSIM over all images (every leading index of ``[..., H, W, C]``)."""
    return float(np.mean(ssim_per_image(a, b, max_val, luma)))


# ---------------------------------------------------------------------- audio


def si_snr(ref, est, eps: float = 1e-8):
    """Scale-invariant SNR in dB over the last axis: ``[..., S]`` -> float or ``[...]``."""
    ref = np.asarray(ref, np.float64)
    est = np.asarray(est, np.float64)
    if ref.shape != est.shape:
        raise ValueError(f"si_snr needs equal shapes, got {ref.shape} and {est.shape}")
    ref = ref - ref.mean(axis=-1, keepdims=True)
    est = est - est.mean(axis=-1, keepdims=True)
    scale = np.sum(est * ref, axis=-1, keepdims=True) / (np.sum(ref * ref, axis=-1, keepdims=True) + eps)
    target = scale * ref
    noise = est - target
    value = 10.0 * np.log10((np.sum(target**2, axis=-1) + eps) / (np.sum(noise**2, axis=-1) + eps))
    return float(value) if np.ndim(value) == 0 else value


# ------------------------------------------------------------------- codebook


def _check_indices(indices, vocab_size: int) -> np.ndarray:
    flat = np.asarray(indices).reshape(-1)
    if flat.size == 0:
        raise ValueError("codebook metrics need at least one index")
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"code indices must be integers, got dtype {flat.dtype}")
    if flat.min() < 0 or flat.max() >= vocab_size:
        raise ValueError(f"code indices must lie in [0, {vocab_size}), got [{flat.min()}, {flat.max()}]")
    return flat


def codebook_usage(indices, vocab_size: int) -> float:
    """Fraction of the ``vocab_size`` codes that occur in ``indices`` (any shape)."""
    return float(np.unique(_check_indices(indices, vocab_size)).size / vocab_size)


def perplexity(indices, vocab_size: int) -> float:
    """``exp(entropy)`` (nats) of the empirical distribution of ``indices``."""
    counts = np.bincount(_check_indices(indices, vocab_size), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# --------------------------------------------------------------------- tokens


def masked_token_accuracy(logits_or_preds, targets, mask) -> float:
    """Accuracy on masked positions.

    Args:
      logits_or_preds: ``[..., V]`` logits (argmax taken) or ``[...]`` int predictions.
      targets: int ``[...]``.
      mask: bool ``[...]``; True where the position was masked (is scored).
    Returns:
      float in [0, 1]; NaN when nothing is masked.
    """
    targets = np.asarray(targets)
    preds = np.asarray(logits_or_preds)
    if preds.ndim == targets.ndim + 1:
        preds = np.argmax(preds, axis=-1)
    mask = np.broadcast_to(np.asarray(mask, bool), targets.shape)
    if preds.shape != targets.shape:
        raise ValueError(f"predictions {preds.shape} do not match targets {targets.shape}")
    if not mask.any():
        return float("nan")
    return float(np.mean(preds[mask] == targets[mask]))


def unigram_baseline_accuracy(train_tokens, targets, mask) -> float:
    """Masked accuracy of always predicting the most frequent token of ``train_tokens``.

    ``train_tokens``: int, any shape (the training tokens of one modality);
    ``targets``, ``mask``: as in :func:`masked_token_accuracy`.
    """
    train = np.asarray(train_tokens).reshape(-1)
    if train.size == 0:
        raise ValueError("unigram baseline needs at least one training token")
    values, counts = np.unique(train, return_counts=True)
    mode = values[np.argmax(counts)]
    targets = np.asarray(targets)
    return masked_token_accuracy(np.full(targets.shape, mode), targets, mask)

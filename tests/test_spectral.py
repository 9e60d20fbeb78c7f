"""Specification of mmgen.nn.spectral: STFT, mel filterbank, spectral losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen.nn import spectral


def test_stft_shape_and_sine_peaks_at_its_bin():
    sr, n_fft, hop = 8000, 256, 64
    bin_index = 20  # 20 * 8000 / 256 = 625 Hz, exactly on a bin
    t = np.arange(2048) / sr
    x = np.stack([np.sin(2 * np.pi * bin_index * sr / n_fft * t), np.zeros_like(t)])
    spec = spectral.stft(jnp.asarray(x, jnp.float32), n_fft, hop)
    assert spec.shape == (2, 1 + 2048 // hop, n_fft // 2 + 1)
    assert spec.dtype == jnp.complex64
    mag = np.abs(np.asarray(spec))
    assert np.all(np.argmax(mag[0, 2:-2], axis=-1) == bin_index)  # edges see the reflect pad
    # A Hann-windowed sine of amplitude 1 on a bin has |X_k| = n_fft / 4 (interior frames).
    np.testing.assert_allclose(mag[0, 5:-5, bin_index], n_fft / 4, rtol=1e-3)
    assert mag[1].max() == 0.0


def test_stft_matches_direct_dft_of_one_frame():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 300)).astype(np.float32)
    n_fft, hop, win = 64, 16, 48
    spec = np.asarray(spectral.stft(jnp.asarray(x), n_fft, hop, win, pad_mode="constant"))
    padded = np.pad(x[0], (n_fft // 2, n_fft // 2))
    window = np.zeros(n_fft)
    window[8:56] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frame = 7
    expected = np.fft.rfft(padded[frame * hop : frame * hop + n_fft] * window)
    np.testing.assert_allclose(spec[0, frame], expected, rtol=1e-4, atol=1e-4)


def test_mel_filterbank_shape_peaks_and_partition_of_unity():
    sr, n_fft, n_mels = 16000, 512, 40
    bank = spectral.mel_filterbank(sr, n_fft, n_mels, fmin=0.0, fmax=8000.0)
    assert bank.shape == (n_fft // 2 + 1, n_mels) and bank.dtype == np.float32
    assert bank.min() >= 0.0 and bank.max() <= 1.0 + 1e-6
    assert np.all(bank.sum(axis=0) > 0), "no empty filter"
    # Filter centres increase with the band index.
    assert np.all(np.diff(np.argmax(bank, axis=0)) >= 0)
    # Between the first and last centres, adjacent triangles sum to exactly 1.
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = spectral.mel_to_hz(np.linspace(0, spectral.hz_to_mel(8000.0), n_mels + 2))
    inside = (freqs >= edges[1]) & (freqs <= edges[-2])
    np.testing.assert_allclose(bank[inside].sum(axis=1), 1.0, atol=1e-5)


def test_mel_scales_invert_and_slaney_is_linear_below_1khz():
    f = np.array([0.0, 300.0, 1000.0, 4321.0])
    for scale in ("htk", "slaney"):
        np.testing.assert_allclose(spectral.mel_to_hz(spectral.hz_to_mel(f, scale), scale), f, atol=1e-6)
    np.testing.assert_allclose(spectral.hz_to_mel(1000.0, "htk"), 1000.0, atol=0.1)
    np.testing.assert_allclose(spectral.hz_to_mel(600.0, "slaney"), 9.0)
    bank = spectral.mel_filterbank(16000, 512, 40, scale="slaney", norm="slaney")
    assert bank.shape == (257, 40)


def test_log_mel_shape_and_floor():
    x = jnp.zeros((2, 1600))
    logmel = spectral.log_mel_spectrogram(x, 16000, n_fft=256, hop=64, n_mels=32)
    assert logmel.shape == (2, 1 + 1600 // 64, 32)
    # Silence sits at the floor: the magnitude floor sqrt(1e-7) summed by the filters.
    assert float(logmel.max()) < np.log(1.0)


def test_multiscale_losses_zero_on_identity_positive_otherwise_and_differentiable():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 2400)) * 0.1, jnp.float32)
    y = x + 0.05 * jnp.asarray(rng.normal(size=(2, 2400)), jnp.float32)
    mel = jax.jit(lambda a, b: spectral.multiscale_mel_distance(a, b, 16000, fft_sizes=(512, 128, 64)))
    stft_loss = jax.jit(
        lambda a, b: spectral.multiscale_stft_loss(a, b, (256, 128), (64, 32), (200, 100))
    )
    assert float(mel(x, x)) == 0.0 and float(stft_loss(x, x)) == 0.0
    assert float(mel(x, y)) > 0.0 and float(stft_loss(x, y)) > 0.0
    # More noise -> larger distance.
    y2 = x + 0.2 * (y - x) / 0.05
    assert float(mel(x, y2)) > float(mel(x, y))
    grad = jax.grad(lambda b: mel(x, b) + stft_loss(x, b))(y)
    assert grad.shape == y.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).sum()) > 0.0


def test_soundstream_weighting_scales_log_term_by_sqrt_half_window():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 1024)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(1, 1024)), jnp.float32)
    kw = dict(fft_sizes=(128,), linear_weight=0.0, log_distance="l2")
    plain = spectral.multiscale_mel_distance(x, y, 16000, scale_weighting="none", **kw)
    weighted = spectral.multiscale_mel_distance(x, y, 16000, scale_weighting="sqrt", **kw)
    np.testing.assert_allclose(float(weighted), float(plain) * np.sqrt(64.0), rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="pad_mode"):
        spectral.stft(jnp.zeros((1, 100)), 64, 16, pad_mode="wrap")
    with pytest.raises(ValueError, match="fmax"):
        spectral.mel_filterbank(16000, 512, 40, fmax=9000.0)

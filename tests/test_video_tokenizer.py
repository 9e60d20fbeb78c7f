"""Specification of the causal MAGVIT-v2-style video tokenizer (mmgen.tokenizers.video)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen.parallel.sharding import logical_axes
from mmgen.tokenizers.quantizers import default_quantizer_config
from mmgen.tokenizers.video import VideoTokenizer, model_config

TINY_SHAPE = (1, 9, 16, 16, 3)  # tiny preset: T 9 -> 3, H/W 16 -> 4


def _init(cfg):
    # The partitionable threefry PRNG costs ~5x more XLA compile time on CPU; the
    # values of the initial weights do not matter for these properties.
    with jax.threefry_partitionable(False):
        return VideoTokenizer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny():
    return _init(model_config("tiny"))


@pytest.fixture(scope="module")
def abstract_b():
    return nnx.eval_shape(lambda: VideoTokenizer(model_config("B"), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def forward():
    @nnx.jit
    def run(model, video):
        z = model.encode_latent(video)
        z_q, tokens, aux = model.quantize(z)
        return z, tokens, model.decode_latent(z_q), model.decode(tokens), aux

    return run


def _video(seed, shape=TINY_SHAPE):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_b_config_maps_17x128x128_to_5x16x16(abstract_b):
    def shapes():
        model = VideoTokenizer(model_config("B"), rngs=nnx.Rngs(0))
        tokens, _ = model.encode(jnp.zeros((2, 17, 128, 128, 3)))
        return tokens, model.decode(tokens)

    tokens, video = jax.eval_shape(shapes)
    assert tokens.shape == (2, 5, 16, 16) and tokens.dtype == jnp.int32
    assert video.shape == (2, 17, 128, 128, 3)
    assert abstract_b.latent_shape((2, 17, 128, 128, 3)) == (2, 5, 16, 16)
    assert abstract_b.vocab_size == 2**18


def test_every_parameter_has_logical_names_of_matching_rank(abstract_b):
    params = nnx.state(abstract_b, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) > 100
    for path, var in nnx.to_flat_state(params):
        names = logical_axes(var)
        assert names is not None, f"{path} has no logical names"
        assert len(names) == var.ndim, f"{path}: names {names} for shape {var.shape}"
        if path[-1] == "kernel" and var.ndim == 5:
            assert names == (None, None, None, "conv_in", "conv_out"), path
        if path[-1] in ("scale", "bias") and str(path[-2]).startswith("norm"):
            assert names == ("norm",), path


def test_bad_frame_count_or_size_raises_clear_error_before_compiling(abstract_b):
    with pytest.raises(ValueError, match=r"frames=16 must be 1 \+ 4n.*try 17"):
        abstract_b.encode(np.zeros((1, 16, 128, 128, 3), np.float32))
    with pytest.raises(ValueError, match=r"height=100 must be a multiple of 8.*try 96"):
        abstract_b.latent_shape((1, 17, 100, 128, 3))
    with pytest.raises(ValueError, match=r"temporal_downsample"):
        cfg = model_config("tiny")
        cfg.temporal_downsample = (True,)
        nnx.eval_shape(lambda: VideoTokenizer(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.slow
def test_encoder_and_decoder_are_causal_in_time(tiny, forward):
    video = _video(0)
    later_changed = video.at[:, 5:].set(_video(1)[:, 5:])  # frames 5..8 = latent frame 2
    z, tokens, recon, _, _ = forward(tiny, video)
    z2, tokens2, recon2, _, _ = forward(tiny, later_changed)
    np.testing.assert_allclose(z2[:, :2], z[:, :2], atol=1e-6)
    np.testing.assert_array_equal(tokens2[:, :2], tokens[:, :2])
    assert not np.allclose(z2[:, 2], z[:, 2], atol=1e-3)
    # Decoded frames 0..4 come from latent frames 0 and 1 only.
    np.testing.assert_allclose(recon2[:, :5], recon[:, :5], atol=1e-5)


def test_an_image_is_a_one_frame_video(tiny, forward):
    video = _video(2)
    z, tokens, recon, _, _ = forward(tiny, video)
    z_img, tokens_img, recon_img, _, _ = forward(tiny, video[:, :1])
    assert tokens_img.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(tokens_img[:, 0], tokens[:, 0])
    np.testing.assert_allclose(z_img[:, 0], z[:, 0], atol=1e-5)
    np.testing.assert_allclose(recon_img[:, 0], recon[:, 0], atol=1e-5)


def test_decode_of_encode_has_input_shape_and_lies_in_range(tiny, forward):
    video = _video(3)
    _, tokens, recon, decoded, aux = forward(tiny, video)
    assert tokens.shape == tiny.latent_shape(TINY_SHAPE) == (1, 3, 4, 4)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tiny.vocab_size == 2**10
    for out in (recon, decoded):
        assert out.shape == video.shape
        assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
        assert float(out.std()) > 0.0
    # Decoding tokens equals decoding the straight-through quantized latent.
    np.testing.assert_allclose(decoded, recon, atol=1e-5)
    assert np.isfinite(float(aux["loss"]))


@pytest.mark.parametrize("kind", ["fsq", "rvq"])
def test_other_quantizers_plug_in_with_their_token_shapes(kind):
    cfg = model_config("tiny")
    cfg.quantizer = default_quantizer_config(kind)
    if kind == "rvq":
        cfg.quantizer.update(code_dim=8, num_quantizers=4)

    def shapes():
        model = VideoTokenizer(cfg, rngs=nnx.Rngs(0))
        tokens, _ = model.encode(jnp.zeros(TINY_SHAPE))
        return tokens, model.decode(tokens)

    tokens, video = jax.eval_shape(shapes)
    expected = (1, 3, 4, 4) + ((4,) if kind == "rvq" else ())
    assert tokens.shape == expected and video.shape == TINY_SHAPE
    model = nnx.eval_shape(lambda: VideoTokenizer(cfg, rngs=nnx.Rngs(0)))
    assert model.latent_shape(TINY_SHAPE) == expected
    assert model.vocab_size == (8 * 5 * 5 * 5 if kind == "fsq" else 1024)


def test_remat_bfloat16_variant_traces_forward_and_grad():
    cfg = model_config("tiny")
    cfg.remat, cfg.dtype = True, "bfloat16"

    def loss_grad():
        model = VideoTokenizer(cfg, rngs=nnx.Rngs(0))

        def loss_fn(m):
            recon, _, aux = m(jnp.zeros(TINY_SHAPE), train=True)
            return jnp.mean(jnp.abs(recon)) + aux["loss"]

        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = jax.eval_shape(loss_grad)
    assert loss.shape == () and loss.dtype == jnp.float32
    grad_leaves = jax.tree.leaves(grads)
    assert len(grad_leaves) > 20 and all(g.dtype == jnp.float32 for g in grad_leaves)


@pytest.mark.slow
def test_sharded_train_forward_and_grad_matches_one_device():
    cfg = model_config("tiny")  # one level keeps the compile small; batch sharding is the point
    cfg.channel_multipliers, cfg.temporal_downsample = (1,), ()
    graphdef, params, rest = nnx.split(_init(cfg), nnx.Param, ...)
    video = _video(4, (8, 2, 8, 8, 3))

    def loss_and_grad(params, rest, video):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            recon, _, aux = model(video, train=True)
            return jnp.mean(jnp.abs(recon - video)) + aux["loss"]

        return jax.value_and_grad(loss_fn)(params)

    one_loss, one_grad = jax.jit(loss_and_grad)(params, rest, video)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    sharded_video = jax.device_put(video, NamedSharding(mesh, P("data")))
    params8, rest8 = jax.device_put((params, rest), replicated)
    loss8, grad8 = jax.jit(loss_and_grad)(params8, rest8, sharded_video)

    assert len(sharded_video.sharding.device_set) == 8
    np.testing.assert_allclose(float(loss8), float(one_loss), rtol=1e-5)
    # Reduction order differs across devices; LFQ's sharp entropy softmax (tau = 0.01)
    # amplifies that, so gradients agree to a fraction of each leaf's scale.
    for g1, g8 in zip(jax.tree.leaves(one_grad), jax.tree.leaves(grad8)):
        scale = float(np.max(np.abs(g1)))
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=0, atol=3e-3 * scale + 1e-8)


def test_constrained_forward_and_gradients_match_one_device_and_keep_the_batch_split(constrained_matches_one_device):
    """Tokenizer + discriminator on a data=2 x fsdp=2 x tensor=2 mesh, activations constrained
    by logical name (the train step's context), equal one unconstrained device."""
    from mmgen.tokenizers.discriminators import StyleGANDiscriminator3D, discriminator_config

    disc_cfg = discriminator_config("tiny")
    disc_cfg.height = disc_cfg.width = TINY_SHAPE[2]
    with jax.threefry_partitionable(False):
        models = (VideoTokenizer(model_config("tiny"), rngs=nnx.Rngs(0)),
                  StyleGANDiscriminator3D(disc_cfg, rngs=nnx.Rngs(1)))
    graphdef, params, rest = nnx.split(models, nnx.Param, ...)

    def loss(params, video):
        tokenizer, disc = nnx.merge(graphdef, params, rest)
        recon, _, aux = tokenizer(video)
        return jnp.mean((recon - video) ** 2) + aux["loss"] + 0.1 * jnp.mean(disc(recon))

    specs = constrained_matches_one_device(loss, params, _video(3, (4,) + TINY_SHAPE[1:]))
    # conv_in's output [4, 9, 16, 16, 16]: the batch over data x fsdp, frames, space, channels whole
    # (the kernel, split over fsdp along conv_out, is gathered to it); the discriminator's
    # flattened features likewise.
    assert ('[{"data", "fsdp"}, {}, {}, {}, {}]', "4x9x16x16x16xf32") in specs
    assert any(spec == '[{"data", "fsdp"}, {}]' and shape.startswith("4x") for spec, shape in specs)

"""Specification of the SoundStream-style audio tokenizer, its STFT discriminator and losses."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmgen.errors import UserError
from mmgen.parallel.sharding import logical_axes, state_shardings
from mmgen.tokenizers.audio import (
    AudioTokenizer,
    STFTDiscriminator,
    audio_frames_for_video,
    audio_reconstruction_loss,
    audio_samples_for_video,
    discriminator_config,
    feature_matching_loss,
    model_config,
)
from mmgen.tokenizers.quantizers import QuantizerState

HOP = 320


def _audio(batch, samples, seed=0):
    t = np.arange(samples) / 16000.0
    rng = np.random.RandomState(seed)
    freqs = rng.uniform(100, 2000, (batch, 1))
    x = 0.5 * np.sin(2 * np.pi * freqs * t) + 0.05 * rng.randn(batch, samples)
    return jnp.asarray(x, jnp.float32)


def _init(module_class, cfg, seed=0):
    # As in test_video_tokenizer: the partitionable threefry PRNG (mmgen's setting)
    # compiles each eager initialiser several times slower on CPU, and these
    # properties do not depend on which random weights the model starts from.
    with jax.threefry_partitionable(False):
        return module_class(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def cfg():
    return model_config("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    return _init(AudioTokenizer, cfg)


@pytest.fixture(scope="module")
def disc_cfg():
    return discriminator_config("tiny")


@pytest.fixture(scope="module")
def discriminator(disc_cfg):
    return _init(STFTDiscriminator, disc_cfg)


@nnx.jit
def _encode_latent(model, audio):
    return model.encode_latent(audio)


@nnx.jit
def _train_forward(model, audio):
    return model(audio, train=True)


@nnx.jit
def _encode(model, audio):
    return model.encode(audio)


@nnx.jit
def _decode(model, tokens):
    return model.decode(tokens)


def test_presets_give_hop_320_and_50_hz(model):
    assert model.hop_length == HOP
    assert model.frame_rate == 50.0
    assert model.num_levels == 4 and model.vocab_size == 256
    b = model_config("B")
    assert b.quantizer.kind == "rvq" and b.quantizer.codebook_size == 1024
    with pytest.raises(UserError, match="unknown"):
        model_config("XXL")
    # The discriminator is the config's own top-level block, as the video tokenizer's.
    assert "discriminator" not in b
    assert discriminator_config("B").fft_sizes == (2048, 1024, 512)
    with pytest.raises(UserError, match="unknown"):
        discriminator_config("XXL")


@pytest.mark.parametrize("samples", [1, 320, 1000, 1280, 1601])
def test_latent_length_matches_latent_shape(model, samples):
    audio = jnp.zeros((2, samples), jnp.float32)
    tokens = jax.eval_shape(lambda x: model.encode(x)[0], audio)
    assert tokens.shape == model.latent_shape(audio.shape)
    assert tokens.shape == (2, -(-samples // HOP), 4)
    assert tokens.dtype == jnp.int32
    recon = jax.eval_shape(model.decode, tokens)
    assert recon.shape == (2, tokens.shape[1] * HOP)


def test_audio_latents_line_up_with_video_clips(model):
    # 17 frames at 8 fps = 2.125 s; 9 frames at 8 fps = 1.125 s (the tiny demo data).
    assert audio_samples_for_video(17, 8, 16000) == 34000
    assert audio_frames_for_video(17, 8, 16000, HOP) == 107
    assert audio_samples_for_video(9, 8, 16000) == 18000
    assert audio_frames_for_video(9, 8, 16000, HOP) == 57
    assert model.latent_shape((1, 18000))[1] == 57


def test_encoder_is_causal_and_each_frame_covers_its_hop(model):
    x = _audio(4, 8 * HOP)
    base = np.asarray(_encode_latent(model, x))
    assert base.shape == (4, 8, model.quantizer.dim)
    # Changing samples from p on never changes latent frames that end before p.
    p = 2 * HOP + 100
    changed = x.at[:, p:].set(-x[:, p:] + 0.3)
    z = np.asarray(_encode_latent(model, changed))
    np.testing.assert_allclose(z[:, :2], base[:, :2], atol=1e-6)
    assert np.abs(z[:, 2] - base[:, 2]).max() > 1e-4
    # Frame 1 sees the last sample of its own hop (no one-frame lag).
    last_of_frame_1 = x.at[:, 2 * HOP - 1].add(0.5)
    z = np.asarray(_encode_latent(model, last_of_frame_1))
    np.testing.assert_allclose(z[:, :1], base[:, :1], atol=1e-6)
    assert np.abs(z[:, 1] - base[:, 1]).max() > 1e-6


def test_decoder_is_causal(model):
    tokens, _ = _encode(model, _audio(2, 1000))  # 4 latent frames
    base = np.asarray(_decode(model, tokens))
    other = np.asarray(_decode(model, tokens.at[:, 2].set((tokens[:, 2] + 1) % model.vocab_size)))
    np.testing.assert_allclose(other[:, : 2 * HOP], base[:, : 2 * HOP], atol=1e-6)
    assert np.abs(other[:, 2 * HOP :] - base[:, 2 * HOP :]).max() > 1e-6


def test_decode_encode_round_trip_shapes_and_range(model):
    x = _audio(2, 1000)
    tokens, aux = _encode(model, x)
    assert tokens.shape == (2, 4, 4)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.vocab_size
    recon = _decode(model, tokens)
    assert recon.shape == (2, 4 * HOP) and recon.dtype == jnp.float32
    assert float(jnp.abs(recon).max()) <= 1.0
    # Fewer RVQ levels decode to the same length (lower bitrate).
    assert jax.eval_shape(model.decode, tokens[..., :2]).shape == (2, 4 * HOP)
    assert set(aux) >= {"loss", "levels_used"}


def test_more_rvq_levels_never_reconstruct_the_latent_worse(model):
    quantizer = nnx.clone(model.quantizer)
    levels = quantizer.num_levels

    @nnx.jit
    def fit(q, z):  # EMA steps with every level active
        return q(z, train=True, num_levels_used=levels)[2]["loss"]

    for seed in range(1, 5):
        fit(quantizer, _encode_latent(model, _audio(4, 8 * HOP, seed=seed)))
    z = _encode_latent(model, _audio(4, 8 * HOP, seed=10))  # held out
    errors = []
    for used in range(1, levels + 1):
        z_q, indices, _ = quantizer(z, train=False, num_levels_used=used)
        assert indices.shape == z.shape[:-1] + (used,)
        errors.append(float(jnp.mean(jnp.sum((z - z_q) ** 2, axis=-1))))
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.9 * errors[0], errors


def test_quantizer_dropout_trains_with_a_variable_number_of_levels(cfg):
    x = _audio(2, 2 * HOP)

    def depths(seed):
        model = _init(AudioTokenizer, cfg, seed)
        out = []
        for _ in range(8):
            recon, tokens, aux = _train_forward(model, x)
            assert recon.shape == x.shape
            assert tokens.shape == (2, 2, 4)  # every level still gets indices
            out.append(int(aux["levels_used"]))
        return out

    first, second = depths(0), depths(1)
    assert all(1 <= d <= 4 for d in first + second)
    assert len(set(first)) > 1
    assert first != second


def test_stft_discriminator_returns_logits_and_features_per_resolution(disc_cfg, discriminator):
    samples = 1000
    real = _audio(2, samples)
    logits, features = nnx.jit(lambda d, x: d(x))(discriminator, jnp.stack([real, 0.5 * real[:, ::-1]]).reshape(4, -1))
    assert len(logits) == len(features) == len(disc_cfg.fft_sizes)
    blocks = len(disc_cfg.time_dilations)
    for n_fft, logit, feats in zip(disc_cfg.fft_sizes, logits, features):
        frames, bins = 1 + samples // (n_fft // 4), n_fft // 2 + 1
        assert logit.shape == (4, frames, -(-bins // 2**blocks))
        assert np.isfinite(np.asarray(logit)).all()
        assert len(feats) == blocks + 2
        assert feats[0].shape == (4, frames, bins, disc_cfg.channels)
    # Different audio gives different features (the feature-matching signal is non-zero).
    real_feats = [[f[:2] for f in feats] for feats in features]
    fake_feats = [[f[2:] for f in feats] for feats in features]
    matching = jax.jit(feature_matching_loss)
    assert float(matching(real_feats, fake_feats)) > 0.0
    assert float(matching(real_feats, real_feats)) == 0.0


def test_feature_matching_is_zero_for_identical_features():
    rng = np.random.RandomState(0)
    feats = [[jnp.asarray(rng.randn(2, 5, 7, 3), jnp.float32) for _ in range(3)] for _ in range(2)]
    shifted = [[f + 1.0 for f in layers] for layers in feats]
    assert float(feature_matching_loss(feats, feats)) == 0.0
    assert float(feature_matching_loss(feats, feats, relative=True)) == 0.0
    np.testing.assert_allclose(float(feature_matching_loss(feats, shifted)), 1.0, rtol=1e-6)
    grads = jax.grad(lambda f: feature_matching_loss(feats, f))(shifted)
    assert all(float(jnp.abs(g).sum()) > 0 for layers in grads for g in layers)


def test_every_parameter_has_logical_names(model, discriminator):
    for module in (model, discriminator):
        variables = nnx.state(module, nnx.Param, QuantizerState)
        leaves = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nnx.Variable))
        assert leaves
        for var in leaves:
            names = logical_axes(var)
            assert names is not None and len(names) == np.ndim(var.get_value()), (var, names)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = state_shardings(nnx.state(model, nnx.Param), mesh, [("conv_out", "fsdp")])
    kernel = shardings["encoder"]["conv_out"]["conv"]["kernel"]
    assert kernel.get_value().spec == jax.sharding.PartitionSpec(None, None, "fsdp")


@pytest.mark.slow
def test_reconstruction_loss_is_zero_for_identical_audio_and_has_useful_gradients(model, cfg):
    loss_cfg = cfg.loss.copy_and_resolve_references()
    loss_cfg.waveform_l1_weight = 1.0
    x = _audio(2, 2 * HOP)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_grad(params):
        def loss_fn(params):
            recon, _, aux = nnx.merge(graphdef, params, rest)(x, train=False)
            return audio_reconstruction_loss(x, recon, loss_cfg)[0] + aux["loss"]

        return jax.value_and_grad(loss_fn)(params), audio_reconstruction_loss(x, x, loss_cfg)

    (loss, grads), (same, parts) = loss_and_grad(params)
    assert float(same) == 0.0 and set(parts) == {"mel_loss", "stft_loss", "waveform_l1"}
    assert float(loss) > 0.0
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    # Gradients reach the encoder through the quantizer's straight-through estimator.
    for part in ("encoder", "decoder"):
        norm = sum(float(np.sum(np.square(np.asarray(g)))) for g in jax.tree.leaves(grads[part]))
        assert norm > 0.0, part


def test_lfq_tokenizer_gives_flat_tokens(cfg):
    lfq = cfg.copy_and_resolve_references()
    lfq.quantizer = {"kind": "lfq", "num_bits": 8, "entropy_groups": 1}
    model = _init(AudioTokenizer, lfq)
    assert model.vocab_size == 256 and model.num_levels == 1
    audio = jnp.zeros((2, 700), jnp.float32)
    tokens = jax.eval_shape(lambda x: model.encode(x)[0], audio)
    assert tokens.shape == model.latent_shape(audio.shape) == (2, 3)
    assert jax.eval_shape(model.decode, tokens).shape == (2, 3 * HOP)
    with pytest.raises(UserError, match="RVQ"):
        model.encode(audio, num_levels_used=1)


def test_bad_audio_shape_is_a_user_error(model):
    with pytest.raises(UserError, match=r"\[B, S\]"):
        model.latent_shape((2, 100, 1))


def test_fresh_decoder_starts_near_silence_and_the_scale_is_a_config_knob():
    cfg = model_config("tiny")
    x = _audio(2, 4 * HOP)
    quiet = _init(AudioTokenizer, cfg)(x)[0]
    cfg.output_init_scale = 1.0  # plain LeCun-normal last layer
    loud = _init(AudioTokenizer, cfg)(x)[0]
    rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))  # noqa: E731
    assert rms(quiet) < 0.1 * rms(x)  # far below the input's level
    assert rms(loud) > 10 * rms(quiet)  # the same weights but the last layer's scale


def test_constrained_forward_and_gradients_match_one_device_and_keep_the_batch_split(cfg, disc_cfg,
                                                                                    constrained_matches_one_device):
    """Codec + STFT discriminator on a data=2 x fsdp=2 x tensor=2 mesh, activations constrained
    by logical name (the train step's context), equal one unconstrained device."""
    models = (_init(AudioTokenizer, cfg), _init(STFTDiscriminator, disc_cfg, seed=1))
    graphdef, params, rest = nnx.split(models, nnx.Param, ...)

    def loss(params, audio):
        tokenizer, disc = nnx.merge(graphdef, params, rest)
        recon, _, aux = tokenizer(audio)
        logits, _ = disc(recon)
        return jnp.mean((recon - audio) ** 2) + aux["loss"] + 0.1 * sum(jnp.mean(l) for l in logits)

    specs = constrained_matches_one_device(loss, params, _audio(4, 4 * HOP))
    # The waveform [4, 1280, 1] and the first conv's output [4, 1280, channels]: the batch over
    # data x fsdp, samples and channels whole; the STFT images [4, frames, bins, 1] likewise.
    assert ('[{"data", "fsdp"}, {}, {}]', "4x1280x1xf32") in specs
    assert ('[{"data", "fsdp"}, {}, {}]', f"4x1280x{cfg.channels}xf32") in specs
    assert any(spec == '[{"data", "fsdp"}, {}, {}, {}]' and shape.startswith("4x") for spec, shape in specs)



def test_cpu_conv_forms_give_the_same_codec_blocks_discriminator_and_gradients(disc_cfg):
    """The phase forms (strided, dilated, transposed convs as stride-1 convs) that the
    codec's blocks and the STFT discriminator take on CPU change neither values nor
    gradients (input and parameters)."""
    from mmgen.nn import backend
    from mmgen.tokenizers.audio import DecoderBlock, EncoderBlock, _STFTResolutionDiscriminator

    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    with jax.threefry_partitionable(False):
        enc = EncoderBlock(2, 4, 4, (1, 3), 7, rngs=nnx.Rngs(0), **kw)
        dec = DecoderBlock(4, 2, 4, (1, 3), 7, rngs=nnx.Rngs(1), **kw)
        disc = _STFTResolutionDiscriminator(disc_cfg, rngs=nnx.Rngs(2), **kw)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 32, 2)), jnp.float32)

    def loss(enc, dec, disc, x):
        y = dec(enc(x))  # [1, 32, 2]
        logit, features = disc(y.reshape(1, 8, 8, 1))
        return jnp.sum(jnp.sin(logit)) + sum(jnp.mean(f) for f in features) + jnp.sum(y * x)

    grad = nnx.grad(loss, argnums=(0, 1, 2, 3))
    grads = {"phases": nnx.jit(grad)(enc, dec, disc, x)}
    with backend.without_cpu_forms("phases"):
        grads["xla"] = nnx.jit(grad)(enc, dec, disc, x)
    flat_a, flat_b = jax.tree.leaves(grads["phases"]), jax.tree.leaves(grads["xla"])
    assert len(flat_a) == len(flat_b) > 20
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(b)))))

"""Specification of mmgen.tokenizers.quantizers: LFQ, FSQ, VQ and RVQ.

Golden values are restated in numpy from the papers' formulas and the authors'
published code (FSQ: Mentzer et al. 2023, appendix A.1; RVQ quantizer dropout:
SoundStream, Zeghidour et al. 2021), never by calling the quantizer under test.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmgen.parallel.sharding import logical_axes
from mmgen.tokenizers.quantizers import (
    QuantizerState,
    build_quantizer,
    default_quantizer_config,
    lfq_bits_to_indices,
    lfq_entropy_loss,
    lfq_indices_to_bits,
)


def make(kind, **fields):
    cfg = default_quantizer_config(kind)
    cfg.update(fields)
    return build_quantizer(cfg, rngs=nnx.Rngs(0))


def call(q, z, **kw):
    """The quantizer under jit, as a trainer runs it."""
    return nnx.jit(lambda q, z: q(z, **kw))(q, z)


def dense_entropy_numpy(z, tau):
    """Per-sample and codebook entropy over all 2^K codes, float64, no factorisation."""
    z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=z.shape[-1])))
    logits = 2.0 * z @ codes.T / tau
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    xlogx = lambda a: np.where(a > 0, a * np.log(np.maximum(a, 1e-300)), 0.0)
    per_sample = -xlogx(p).sum(axis=1).mean()
    avg = p.mean(axis=0)
    return per_sample, -xlogx(avg).sum()


# ----------------------------------------------------------------------------- LFQ


def test_lfq_index_bits_roundtrip_and_bit_order():
    idx = jnp.arange(2**5, dtype=jnp.int32)
    for order in ("lsb_first", "msb_first"):
        bits = lfq_indices_to_bits(idx, 5, order)
        np.testing.assert_array_equal(lfq_bits_to_indices(bits, order), idx)
    # lsb_first: channel 0 is the least significant bit; msb_first reverses it.
    np.testing.assert_array_equal(lfq_indices_to_bits(jnp.int32(1), 5), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(lfq_indices_to_bits(jnp.int32(1), 5, "msb_first"), [0, 0, 0, 0, 1])

    q = make("lfq", num_bits=5, entropy_groups=1)
    z = jnp.array([[0.3, -0.2, 0.7, -1.0, 0.1], [-0.3, -0.2, -0.7, -1.0, -0.1]])
    z_q, indices, _ = call(q, z, train=False)
    np.testing.assert_array_equal(indices, [1 + 4 + 16, 0])
    np.testing.assert_array_equal(z_q, jnp.sign(z))
    np.testing.assert_array_equal(q.indices_to_codes(indices), z_q)
    assert indices.dtype == jnp.int32 and q.vocab_size == 32 and q.dim == 5


def test_lfq_entropy_equals_dense_numpy_for_small_k():
    z = 0.01 * jax.random.normal(jax.random.key(1), (3, 7, 4))  # soft p at tau = 0.01
    per_ref, cb_ref = dense_entropy_numpy(z, 0.01)
    loss, per, cb = jax.jit(lambda z: lfq_entropy_loss(z, temperature=0.01, num_groups=1))(z)
    np.testing.assert_allclose([per, cb], [per_ref, cb_ref], rtol=1e-4)
    np.testing.assert_allclose(loss, per_ref - cb_ref, rtol=1e-4, atol=1e-6)
    assert 0.1 < per_ref < cb_ref  # neither term is trivially 0 on this data


def test_lfq_grouped_entropy_is_sum_of_per_group_dense_entropies():
    z = 0.01 * jax.random.normal(jax.random.key(2), (21, 4))
    loss, per, cb = jax.jit(lambda z: lfq_entropy_loss(z, temperature=0.01, num_groups=2))(z)
    groups = [dense_entropy_numpy(z[:, :2], 0.01), dense_entropy_numpy(z[:, 2:], 0.01)]
    np.testing.assert_allclose(cb, sum(g[1] for g in groups), rtol=1e-4)
    # p(c|z) is a product over bits, so the per-token entropy is exact under grouping.
    np.testing.assert_allclose(per, dense_entropy_numpy(z, 0.01)[0], rtol=1e-4)
    np.testing.assert_allclose(loss, per - cb, rtol=1e-5)


def test_lfq_entropy_mean_is_global_over_a_sharded_batch():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    z = 0.01 * jax.random.normal(jax.random.key(3), (16, 6))
    sharded = jax.device_put(z, NamedSharding(mesh, P("data", None)))
    f = jax.jit(lambda z: lfq_entropy_loss(z, num_groups=3))
    np.testing.assert_allclose(f(sharded), f(z), rtol=1e-5)


def test_lfq_loss_straight_through_gradients_and_annealing():
    q = make("lfq", num_bits=4, entropy_groups=2, entropy_anneal_factor=2.0, entropy_anneal_steps=10)
    z = 0.5 * jax.random.normal(jax.random.key(4), (2, 3, 4))
    w = jax.random.normal(jax.random.key(5), z.shape)

    @nnx.jit
    def run(q, z, step):
        def f(z):
            z_q, _, aux = q(z, train=True, step=step)
            return jnp.sum(z_q * w) + aux["loss"], aux

        return jax.grad(f, has_aux=True)(z)

    g_early, aux_early = run(q, z, 0)
    g_late, aux_late = run(q, z, 20)
    np.testing.assert_allclose(aux_early["entropy_weight"], 0.1 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(aux_late["entropy_weight"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(
        aux_late["loss"], 0.25 * aux_late["commit_loss"] + 0.1 * aux_late["entropy_loss"], rtol=1e-6
    )
    commit = np.mean((np.asarray(z) - np.sign(z)) ** 2)
    np.testing.assert_allclose(aux_late["commit_loss"], commit, rtol=1e-5)
    # Straight-through: the task gradient w reaches z unchanged, plus the loss terms.
    assert np.abs(g_late - w).max() > 1e-4 and np.abs(g_late).min() > 0
    assert np.abs(g_early - g_late).max() > 1e-6  # annealed entropy weight changes the gradient


def test_lfq_entropy_on_a_random_token_subset():
    q = make("lfq", num_bits=6, entropy_groups=1, entropy_max_tokens=2)
    z = jax.random.normal(jax.random.key(6), (64, 6))
    _, _, aux_train = call(q, z, train=True)
    _, _, aux_eval = call(q, z, train=False)  # eval uses every token
    assert float(aux_train["codebook_entropy"]) <= np.log(2) + 1e-5
    assert float(aux_eval["codebook_entropy"]) > 2.0


def test_lfq_bf16_input_gives_float32_indices_and_keeps_dtype():
    q = make("lfq", num_bits=8, entropy_groups=2)
    z = jax.random.normal(jax.random.key(7), (4, 8)).astype(jnp.bfloat16)
    z_q, indices, aux = call(q, z, train=True)
    _, ref, _ = call(q, z.astype(jnp.float32), train=True)
    np.testing.assert_array_equal(indices, ref)
    assert z_q.dtype == jnp.bfloat16 and all(v.dtype == jnp.float32 for v in aux.values())


# ----------------------------------------------------------------------------- FSQ


def test_fsq_every_code_round_trips_through_indices():
    q = make("fsq")  # levels (8, 5, 5, 5)
    assert (q.dim, q.vocab_size) == (4, 1000)
    codes = q.indices_to_codes(jnp.arange(1000))
    assert codes.shape == (1000, 4) and len(np.unique(np.asarray(codes), axis=0)) == 1000
    assert float(codes.min()) == -1.0 and float(codes.max()) == 1.0
    # Invert the bound so the quantizer sees these codes (the extremes just inside
    # the open interval tanh reaches, which still round to them).
    levels = np.array([8, 5, 5, 5])
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    target = np.clip(np.asarray(codes) * (levels // 2), -half_l - offset + 0.01, half_l - offset - 0.01)
    z = np.arctanh((target + offset) / half_l) - np.arctanh(offset / half_l)
    z_q, indices, aux = call(q, jnp.asarray(z, jnp.float32), train=False)
    np.testing.assert_array_equal(indices, np.arange(1000))
    np.testing.assert_allclose(z_q, codes, atol=1e-6)
    assert float(aux["usage"]) == 1.0 and float(aux["loss"]) == 0.0


def test_fsq_shapes_mixed_radix_and_gradient():
    q = make("fsq", levels=(3, 4))
    z = 2.0 * jax.random.normal(jax.random.key(8), (2, 5, 2))
    z_q, indices, _ = call(q, z, train=True)
    assert z_q.shape == z.shape and indices.shape == (2, 5)
    digits = np.stack([np.asarray(indices) % 3, np.asarray(indices) // 3], -1)
    np.testing.assert_allclose(z_q, (digits - [1, 2]) / [1, 2], atol=1e-6)
    np.testing.assert_allclose(q.indices_to_codes(indices), z_q, atol=1e-6)
    g = nnx.jit(lambda q, z: jax.grad(lambda z: jnp.sum(q(z, train=True)[0]))(z))(q, z)
    assert np.all(np.asarray(g) > 0)  # round_ste passes the tanh gradient


def paper_fsq(z, levels, eps=1e-3):
    """FSQ as the paper's published code: shift = tan(offset / half_l); float64 numpy."""
    levels = np.asarray(levels)
    half_l = (levels - 1) * (1 - eps) / 2
    offset = np.where(levels % 2 == 1, 0.0, 0.5)
    shift = np.tan(offset / half_l)
    bounded = np.tanh(np.asarray(z, np.float64) + shift) * half_l - offset
    return np.round(bounded) / (levels // 2)


def _inputs_for_codes(codes, levels, eps=1e-3):
    """Encoder outputs the paper's bound sends to ``codes`` (a hair inside each rounding cell)."""
    levels = np.asarray(levels)
    half_l = (levels - 1) * (1 - eps) / 2
    offset = np.where(levels % 2 == 1, 0.0, 0.5)
    target = np.clip(np.asarray(codes) * (levels // 2), -half_l - offset + 0.01, half_l - offset - 0.01)
    return np.arctanh((target + offset) / half_l) - np.tan(offset / half_l)


@pytest.mark.parametrize("levels", [(2, 3), (8, 5, 5, 5)])
def test_fsq_is_finite_and_bijective_for_levels_with_two_and_more(levels):
    q = make("fsq", levels=levels)
    vocab = int(np.prod(levels))
    # the input for (2, 3), and a spread of values, extremes included
    z = np.asarray([[0.3, -0.2], [-1.0, 1.0]]) if levels == (2, 3) else np.zeros((0, len(levels)))
    z = np.concatenate([z, 3.0 * np.random.default_rng(0).normal(size=(256, len(levels))),
                        np.full((2, len(levels)), 50.0) * [[1.0], [-1.0]]])
    z_q, indices, _ = call(q, jnp.asarray(z, jnp.float32), train=True)
    assert np.all(np.isfinite(np.asarray(z_q)))
    np.testing.assert_allclose(z_q, paper_fsq(z, levels), atol=1e-6)
    if levels == (2, 3):
        # channel 0 (L = 2) takes the codes {-1, 0} of the paper's code; it rounds to -1
        # only below z = -tan(0.5 / 0.4995) = -1.56, so [0.3, -0.2] and [-1, 1] give:
        assert set(np.unique(np.asarray(z_q)[:, 0]).tolist()) == {-1.0, 0.0}
        np.testing.assert_allclose(z_q[:2], [[0.0, 0.0], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(q.indices_to_codes(indices), z_q, atol=1e-6)
    # bijective: every index has its own code, and that code's preimage gives the index back
    codes = np.asarray(q.indices_to_codes(jnp.arange(vocab)))
    assert len(np.unique(codes, axis=0)) == vocab
    back_q, back, aux = call(q, jnp.asarray(_inputs_for_codes(codes, levels), jnp.float32), train=False)
    np.testing.assert_array_equal(back, np.arange(vocab))
    np.testing.assert_allclose(back_q, codes, atol=1e-6)
    assert float(aux["usage"]) == 1.0
    g = nnx.jit(lambda q, z: jax.grad(lambda z: jnp.sum(q(z, train=True)[0]))(z))(q, jnp.asarray(z, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


def test_fsq_atanh_shift_stays_an_option_and_rejects_two_levels():
    z = 2.0 * jax.random.normal(jax.random.key(9), (64, 4))
    q = make("fsq", shift="atanh")  # (8, 5, 5, 5): bound(0) is exactly 0 on the 8-level channel
    np.testing.assert_allclose(q.bound(jnp.zeros((1, 4))), 0.0, atol=1e-6)
    z_q, _, _ = call(q, z, train=False)
    z_q_tan, _, _ = call(make("fsq"), z, train=False)
    assert np.mean(np.asarray(z_q) == np.asarray(z_q_tan)) > 0.99  # the shifts differ by 4e-6
    with pytest.raises(ValueError, match="undefined for a level count of 2.*shift='tan'"):
        make("fsq", levels=(2, 3), shift="atanh")
    with pytest.raises(ValueError, match="shift='sin' must be one of"):
        make("fsq", shift="sin")


# ----------------------------------------------------------------------------- VQ


def set_codebook(q, codes):
    q.codebook[...] = jnp.asarray(codes, jnp.float32)
    if q.use_ema:
        q.ema_embed_sum[...] = q.codebook[...] * q.ema_cluster_size[...][:, None]


def test_vq_picks_the_nearest_code_and_has_logical_names():
    q = make("vq", codebook_size=8, code_dim=3)
    assert logical_axes(q.codebook) == ("codebook", None) and isinstance(q.codebook, nnx.Param)
    z = jax.random.normal(jax.random.key(9), (2, 6, 3))
    z_q, indices, aux = call(q, z, train=False)
    cb = np.asarray(q.codebook[...])
    d = ((np.asarray(z)[..., None, :] - cb) ** 2).sum(-1)
    np.testing.assert_array_equal(indices, d.argmin(-1))
    np.testing.assert_allclose(z_q, cb[d.argmin(-1)], atol=1e-6)
    np.testing.assert_allclose(aux["loss"], 1.25 * d.min(-1).mean() / 3, rtol=1e-5)
    grads = nnx.jit(nnx.grad(lambda q: q(z, train=False)[2]["loss"]))(q)
    used = np.unique(d.argmin(-1))
    assert np.all(np.abs(np.asarray(grads.codebook[...]))[used].sum(-1) > 0)  # codebook loss


def test_vq_bf16_distances_are_float32():
    q = make("vq", codebook_size=2, code_dim=1, dead_code_unused_steps=0)
    set_codebook(q, [[1.0], [1.0117]])  # bf16 would round code 1 to 1.0156: a tie with code 0
    z = jnp.full((3, 1), 1.0078125, jnp.bfloat16)  # exact in bf16
    z_q, indices, _ = call(q, z, train=False)
    np.testing.assert_array_equal(indices, [1, 1, 1])
    assert z_q.dtype == jnp.bfloat16


def test_vq_ema_update_moves_codes_to_assigned_means_only_when_training():
    q = make("vq", codebook_size=3, code_dim=2, use_ema=True, ema_decay=0.5,
             dead_code_threshold=0.0, dead_code_unused_steps=0)
    assert isinstance(q.codebook, QuantizerState) and logical_axes(q.codebook) == ("codebook", None)
    set_codebook(q, [[0.0, 0.0], [4.0, 0.0], [0.0, 9.0]])
    z = jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 1.0], [3.0, 1.0]])
    before = np.asarray(q.codebook[...])
    call(q, z, train=False)
    np.testing.assert_array_equal(q.codebook[...], before)

    _, indices, _ = call(q, z, train=True)
    np.testing.assert_array_equal(indices, [0, 0, 1, 1])
    n = 0.5 * 1 + 0.5 * np.array([2.0, 2.0, 0.0])
    m = 0.5 * before + 0.5 * np.array([[1.0, 1.0], [8.0, 2.0], [0.0, 0.0]])
    smoothed = (n + 1e-5) / (n.sum() + 3e-5) * n.sum()
    after = np.asarray(q.codebook[...])
    np.testing.assert_allclose(after, m / smoothed[:, None], rtol=1e-5)
    means = np.array([[0.5, 0.5], [4.0, 1.0]])
    assert np.all(np.linalg.norm(after[:2] - means, axis=1) < np.linalg.norm(before[:2] - means, axis=1))


def test_dead_code_restart_replaces_an_unused_code_with_a_batch_vector():
    q = make("vq", codebook_size=3, code_dim=2, dead_code_unused_steps=2)
    set_codebook(q, [[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])
    z = jax.random.normal(jax.random.key(10), (8, 2))
    step = nnx.jit(lambda q, z: q(z, train=True))
    _, _, aux1 = step(q, z)
    np.testing.assert_array_equal(q.codebook[2], [100.0, 100.0])  # unused for 1 step only
    _, _, aux2 = step(q, z)
    new = np.asarray(q.codebook[2])
    assert np.min(np.abs(np.asarray(z) - new).sum(-1)) < 1e-6  # one of the batch vectors
    np.testing.assert_array_equal(q.codebook[:2], [[0.0, 0.0], [1.0, 1.0]])
    assert float(aux1["restarted_codes"]) == 0.0 and float(aux2["restarted_codes"]) == pytest.approx(1 / 3)


def test_ema_dead_code_threshold_initialises_the_codebook_from_data():
    q = make("vq", codebook_size=4, code_dim=2, use_ema=True)  # counts start at 1 < threshold 2
    z = 10.0 + jax.random.normal(jax.random.key(11), (16, 2))
    call(q, z, train=True)
    cb = np.asarray(q.codebook[...])
    dist = np.abs(cb[:, None, :] - np.asarray(z)[None]).sum(-1).min(-1)
    np.testing.assert_allclose(dist, 0.0, atol=1e-5)
    np.testing.assert_allclose(q.ema_cluster_size[...], 2.0)


# ----------------------------------------------------------------------------- RVQ


def test_rvq_shapes_and_more_levels_never_reconstruct_worse():
    q = make("rvq", num_quantizers=3, codebook_size=8, code_dim=3, quantizer_dropout=0.0, ema_decay=0.0,
             dead_code_threshold=0.5)
    assert q.num_levels == 3 and all(logical_axes(v.codebook) == ("codebook", None) for v in q.quantizers)
    z = jax.random.normal(jax.random.key(12), (4, 16, 3))
    step = nnx.jit(lambda q, z: q(z, train=True))
    for _ in range(6):  # a few EMA k-means steps on this data
        step(q, z)
    z_q, indices, aux = call(q, z, train=False)
    assert z_q.shape == z.shape and indices.shape == (4, 16, 3) and indices.dtype == jnp.int32
    codebooks = [np.asarray(v.codebook[...]) for v in q.quantizers]
    partial = np.cumsum([cb[indices[..., l]] for l, cb in enumerate(codebooks)], axis=0)
    np.testing.assert_allclose(partial[-1], z_q, atol=1e-5)
    errors = ((np.asarray(z) - partial) ** 2).mean(axis=(1, 2, 3))
    assert np.all(np.diff(errors) <= 1e-6) and errors[-1] < 0.5 * errors[0], errors
    # Variable bitrate: quantizing with fewer levels gives the same leading indices.
    z_q2, indices2, aux2 = call(q, z, train=False, num_levels_used=2)
    assert indices2.shape == (4, 16, 2) and float(aux2["levels_used"]) == 2.0
    np.testing.assert_array_equal(indices2, indices[..., :2])
    np.testing.assert_allclose(z_q2, partial[1], atol=1e-5)
    np.testing.assert_allclose(q.indices_to_codes(indices2), partial[1], atol=1e-5)


def _depth_of_each_example(z_q, indices, codebooks):
    """The depth n_b at which sum_{l < n_b} codebook_l[indices_b] reproduces example b's z_q."""
    depths = []
    for b in range(z_q.shape[0]):
        partial = np.cumsum([cb[indices[b, ..., l]] for l, cb in enumerate(codebooks)], axis=0)
        match = [n + 1 for n in range(len(codebooks)) if np.allclose(partial[n], z_q[b], atol=1e-5)]
        assert len(match) == 1, f"example {b}: depth not unique {match}"
        depths.append(match[0])
    return np.asarray(depths)


def test_rvq_quantizer_dropout_draws_a_depth_per_example():
    # SoundStream: "for each input example, we sample n_q uniformly at random in
    # [1; N_q] and only use quantizers Q_i for i = 1 ... n_q".
    levels, batch, frames, dim = 4, 64, 5, 3
    q = make("rvq", num_quantizers=levels, codebook_size=8, code_dim=dim, use_ema=False,
             dead_code_unused_steps=0)
    z = np.asarray(jax.random.normal(jax.random.key(13), (batch, frames, dim)))
    step = nnx.jit(lambda q, z: q(z, train=True))
    codebooks = [np.asarray(v.codebook[...], np.float64) for v in q.quantizers]  # fixed: no EMA, no restart
    seen = []
    for _ in range(3):
        z_q, indices, aux = step(q, jnp.asarray(z))
        z_q, indices = np.asarray(z_q, np.float64), np.asarray(indices)
        assert indices.shape == (batch, frames, levels)  # every level still gets indices
        depths = _depth_of_each_example(z_q, indices, codebooks)
        assert set(depths.tolist()) == {1, 2, 3, 4}  # 64 examples, one batch: all depths occur
        assert float(aux["levels_used"]) == pytest.approx(depths.mean())
        # golden loss: level l's commitment mean_{b, t, d}([l < n_b] (r_l - q_l)^2), 0.25 x summed
        residual, commit = z.astype(np.float64), 0.0
        for l, cb in enumerate(codebooks):
            code = cb[indices[..., l]]
            active = (l < depths)[:, None, None]
            commit += np.mean(active * (residual - code) ** 2)
            residual = residual - code
        assert float(aux["commit_loss"]) == pytest.approx(commit, rel=1e-5)
        seen.append(depths)
    assert not all(np.array_equal(seen[0], d) for d in seen[1:])  # fresh draws every call
    _, _, aux = call(q, jnp.asarray(z), train=False)
    assert float(aux["levels_used"]) == float(levels)


def test_rvq_per_example_dropout_updates_a_codebook_only_from_examples_that_reach_it():
    levels, batch, frames = 3, 32, 4
    q = make("rvq", num_quantizers=levels, codebook_size=4, code_dim=2, use_ema=True, ema_decay=0.5,
             dead_code_threshold=0.0, dead_code_unused_steps=0)
    z = jax.random.normal(jax.random.key(21), (batch, frames, 2))
    codebooks = [np.asarray(v.codebook[...], np.float64) for v in q.quantizers]  # before the update
    z_q, indices, _ = call(q, z, train=True)
    depths = _depth_of_each_example(np.asarray(z_q, np.float64), np.asarray(indices), codebooks)
    for l, vq in enumerate(q.quantizers):
        # EMA counts start at 1 per code: N_c <- 0.5 * 1 + 0.5 * (vectors of examples with n_b > l)
        expected = 0.5 * 4 + 0.5 * frames * int(np.sum(depths > l))
        assert float(np.sum(vq.ema_cluster_size[...])) == pytest.approx(expected), l


def test_rvq_per_batch_dropout_stays_an_option():
    q = make("rvq", num_quantizers=3, codebook_size=8, code_dim=3, use_ema=False, dead_code_unused_steps=0,
             quantizer_dropout_scope="batch")
    z = jax.random.normal(jax.random.key(13), (16, 5, 3))
    step = nnx.jit(lambda q, z: q(z, train=True))
    codebooks = [np.asarray(v.codebook[...], np.float64) for v in q.quantizers]
    used = set()
    for _ in range(8):
        z_q, indices, aux = step(q, z)
        depths = _depth_of_each_example(np.asarray(z_q, np.float64), np.asarray(indices), codebooks)
        assert len(set(depths.tolist())) == 1 and float(aux["levels_used"]) == depths[0]
        used.add(int(depths[0]))
    assert len(used) > 1 and used <= {1, 2, 3}
    with pytest.raises(ValueError, match="quantizer_dropout_scope='token' must be one of"):
        make("rvq", quantizer_dropout_scope="token")


def test_rvq_losses_only_count_active_levels_and_reach_the_codebooks():
    q = make("rvq", num_quantizers=2, codebook_size=4, code_dim=2, use_ema=False, quantizer_dropout=0.0,
             dead_code_unused_steps=0)
    z = jax.random.normal(jax.random.key(14), (6, 2))
    params = nnx.state(q, nnx.Param)
    grads = nnx.jit(nnx.grad(lambda q: q(z, train=True)[2]["loss"]))(q)
    assert len(jax.tree.leaves(params)) == 2
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_mistake():
    cfg = default_quantizer_config("lfq")
    cfg.entropy_weigth = 0.2
    with pytest.raises(ValueError, match="entropy_weigth"):
        build_quantizer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown quantizer kind 'pq'"):
        default_quantizer_config("pq")
    with pytest.raises(ValueError, match="entropy_groups=4 must divide num_bits=6"):
        make("lfq", num_bits=6, entropy_groups=4)
    with pytest.raises(ValueError, match="last dimension of 6"):
        make("lfq", num_bits=6)(jnp.zeros((2, 5)), train=False)

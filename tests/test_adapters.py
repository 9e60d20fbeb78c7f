"""Specification of the LoRA / FlyLoRA adapters, surgery and merging (mmgen.adapters)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mmgen  # noqa: F401  (process-wide flax/jax settings)
from mmgen.adapters import (
    AdapterParam,
    FlyLoRA,
    FlyLoRASum,
    LoRA,
    adapter_filter,
    adapter_state,
    apply_adapters,
    base_fingerprint,
    count_params,
    fold_lora,
    merge_flylora_adapters,
    merge_lora_adapters,
    sparse_projection,
    update_flylora_biases,
)
from mmgen.parallel.sharding import logical_axes

D, HIDDEN, LAYERS = 8, 16, 2


def _linear(n, m, names, rngs):
    return nnx.Linear(n, m, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names), rngs=rngs)


class Attn(nnx.Module):
    def __init__(self, *, rngs):
        self.query = _linear(D, D, ("embed", "heads"), rngs)
        self.key = _linear(D, D, ("embed", "heads"), rngs)
        self.value = _linear(D, D, ("embed", "heads"), rngs)
        self.out = _linear(D, D, ("heads", "embed"), rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.query(x)) * self.value(x) + self.key(x))


class Block(nnx.Module):
    def __init__(self, *, rngs):
        self.attn = Attn(rngs=rngs)
        self.mlp_in = _linear(D, HIDDEN, ("embed", "mlp"), rngs)
        self.mlp_out = _linear(HIDDEN, D, ("mlp", "embed"), rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(x)))


class TinyScanned(nnx.Module):
    """Two blocks created with nnx.vmap and run with nnx.scan, like the generative transformer."""

    def __init__(self, seed=0):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(rngs=rngs)

        rngs = nnx.Rngs(seed)
        self.blocks = make_blocks(rngs)
        self.head = _linear(D, 4, ("embed", "vocab"), rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body(h, block):
            return block(h)

        return self.head(body(x, self.blocks))


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _randomise(variable, seed, scale=0.3):
    variable[...] = scale * jax.random.normal(jax.random.key(seed), variable[...].shape)


def _paths(state):
    return {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}


def flylora_reference(x, w, bias, a, b, d, k, scale, select):
    """Plain-numpy FlyLoRA: base + (alpha/r) B (y * topk_mask(y + d)), y = A x."""
    y = x @ a.T
    score = y + d
    if select == "abs":
        score = np.abs(score)
    chosen = np.argsort(-score, axis=-1)[..., :k]
    mask = np.zeros_like(y)
    np.put_along_axis(mask, chosen, 1.0, axis=-1)
    return x @ w + bias + scale * (y * mask) @ b.T, mask


def _np(v):
    return np.asarray(v[...], np.float64)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("init", ["normal", "he_uniform"])
def test_lora_with_zero_b_reproduces_the_base_layer_exactly(init):
    base = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    x = _x((3, D))
    expected = base(x)
    lora = LoRA(base, rank=4, alpha=8.0, rngs=nnx.Rngs(1), init=init)
    assert lora.A[...].shape == (4, D) and lora.B[...].shape == (5, 4)
    assert np.all(np.asarray(lora.B[...]) == 0) and np.any(np.asarray(lora.A[...]) != 0)
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(expected))


def test_lora_initialisations_follow_their_definitions():
    n, r = 512, 4
    normal = LoRA(nnx.Linear(n, 2, rngs=nnx.Rngs(0)), r, 4.0, rngs=nnx.Rngs(1), init="normal")
    assert abs(np.std(np.asarray(normal.A[...])) - 1.0 / r) < 0.1 / r
    he = LoRA(nnx.Linear(n, 2, rngs=nnx.Rngs(0)), r, 4.0, rngs=nnx.Rngs(1), init="he_uniform")
    bound = np.sqrt(6.0 / n)
    a = np.abs(np.asarray(he.A[...]))
    assert a.max() <= bound and a.max() > 0.95 * bound


def test_lora_forward_is_base_plus_scaled_low_rank_update():
    base = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    lora = LoRA(base, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    _randomise(lora.B, 2)
    x = _x((4, D))
    expected = _np(base.kernel).T @ np.asarray(x, np.float64).T
    expected = expected.T + _np(base.bias) + 2.0 * (np.asarray(x, np.float64) @ _np(lora.A).T) @ _np(lora.B).T
    np.testing.assert_allclose(np.asarray(lora(x)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FlyLoRA


def test_flylora_projection_is_sparse_regenerable_and_frozen():
    n, r, k = 16, 8, 2  # p = n k / r = 4 nonzeros per row
    fly = FlyLoRA(nnx.Linear(n, 3, rngs=nnx.Rngs(0)), rank=r, k=k, seed=7)
    a = np.asarray(fly.A[...])
    assert a.shape == (r, n)
    np.testing.assert_array_equal((a != 0).sum(axis=1), np.full(r, 4))
    nonzero = a[a != 0]
    assert 0.5 / r < np.std(nonzero) < 1.5 / r  # N(0, 1/r^2)
    np.testing.assert_array_equal(a, sparse_projection(7, r, n, k))
    assert not np.array_equal(a, sparse_projection(8, r, n, k))
    assert fly.alpha == 2 * r
    assert not isinstance(fly.A, nnx.Param) and isinstance(fly.B, AdapterParam)
    assert set(_paths(nnx.state(fly, adapter_filter))) == {("B",)}


@pytest.mark.parametrize("select", ["abs", "signed"])
def test_flylora_activates_exactly_k_ranks_per_token(select):
    fly = FlyLoRA(nnx.Linear(D, 3, rngs=nnx.Rngs(0)), rank=8, k=3, seed=1, select=select)
    _randomise(fly.d, 5, scale=0.05)
    _, mask = fly.route(_x((2, 5, D)))
    mask = np.asarray(mask)
    assert mask.shape == (2, 5, 8)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(-1), np.full((2, 5), 3.0))


@pytest.mark.parametrize("select", ["abs", "signed"])
def test_flylora_forward_matches_numpy_formula(select):
    r, k = 8, 3
    fly = FlyLoRA(nnx.Linear(D, 5, rngs=nnx.Rngs(0)), rank=r, k=k, alpha=4.0, seed=3, select=select)
    _randomise(fly.B, 4)
    _randomise(fly.d, 5, scale=0.1)
    _randomise(fly.base.bias, 6)
    x = _x((2, 6, D))
    expected, mask = flylora_reference(np.asarray(x, np.float64), _np(fly.base.kernel), _np(fly.base.bias),
                                       _np(fly.A), _np(fly.B), _np(fly.d), k, 4.0 / r, select)
    out = fly(x)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    # The bias steered the choice but is not part of the value: the numpy formula has no d term.
    np.testing.assert_array_equal(np.asarray(fly.counts[...]), mask.reshape(-1, r).sum(0).astype(np.int32))


def test_flylora_bias_update_follows_the_rule_and_is_skipped_at_eval():
    fly = FlyLoRA(nnx.Linear(D, 3, rngs=nnx.Rngs(0)), rank=4, k=2, seed=1, bias_lr=1e-2)
    model = nnx.List([fly])
    d0 = np.array([0.1, -0.2, 0.0, 0.3], np.float32)
    fly.d[...] = jnp.asarray(d0)
    fly.counts[...] = jnp.array([5, 0, 3, 4], jnp.int32)  # mean 3
    update_flylora_biases(model)
    expected = d0 + np.float32(1e-2) * np.sign(np.array([3 - 5, 3 - 0, 3 - 3, 3 - 4], np.float32))
    np.testing.assert_array_equal(np.asarray(fly.d[...]), expected)
    np.testing.assert_array_equal(np.asarray(fly.counts[...]), np.zeros(4, np.int32))

    x = _x((7, D))
    model.eval()
    fly(x)
    fly(x, train=False)
    np.testing.assert_array_equal(np.asarray(fly.counts[...]), np.zeros(4, np.int32))
    update_flylora_biases(model)
    np.testing.assert_array_equal(np.asarray(fly.d[...]), expected)

    model.train()
    fly(x)
    assert int(np.asarray(fly.counts[...]).sum()) == 7 * 2


# ----------------------------------------------------------------------------- surgery


@pytest.mark.slow
def test_surgery_replaces_exactly_the_matching_scanned_layers_and_counts_parameters():
    model = TinyScanned()
    base_params = count_params(model, nnx.Param)
    x = _x((2, 3, D))
    before = model(x)
    report = apply_adapters(model, {"kind": "lora", "targets": r"blocks\.attn\.(query|value)", "rank": 2})
    assert report.replaced == ("blocks.attn.query", "blocks.attn.value")
    attn = model.blocks.attn
    assert isinstance(attn.query, LoRA) and isinstance(attn.value, LoRA)
    assert type(attn.key) is nnx.Linear and type(attn.out) is nnx.Linear
    assert type(model.blocks.mlp_in) is nnx.Linear and type(model.head) is nnx.Linear
    per_layer = 2 * D + D * 2  # A [2, D] + B [D, 2]
    assert report.trainable_params == 2 * LAYERS * per_layer
    assert report.total_params == base_params + report.trainable_params
    assert attn.query.A[...].shape == (LAYERS, 2, D) and attn.query.B[...].shape == (LAYERS, D, 2)
    assert logical_axes(attn.query.A) == ("layers", None, "embed")
    assert logical_axes(attn.query.B) == ("layers", "heads", None)
    assert not np.array_equal(np.asarray(attn.query.A[...][0]), np.asarray(attn.query.A[...][1]))
    # Zero B: the scanned, adapted model computes what the base model computed.
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(before), rtol=1e-6, atol=1e-6)

    fly_model = TinyScanned()
    fly_report = apply_adapters(fly_model, {"kind": "flylora", "targets": r".*mlp_(in|out)", "rank": 4, "k": 2})
    assert fly_report.replaced == ("blocks.mlp_in", "blocks.mlp_out")
    trainable = LAYERS * (HIDDEN * 4 + D * 4)  # B's only
    frozen_a = LAYERS * (4 * D + 4 * HIDDEN)
    assert fly_report.trainable_params == trainable
    assert fly_report.total_params == base_params + trainable + frozen_a
    assert logical_axes(fly_model.blocks.mlp_in.d) == ("layers", None)

    with pytest.raises(ValueError, match="matches no nnx.Linear"):
        apply_adapters(TinyScanned(), {"kind": "lora", "targets": "blocks.attention", "rank": 2})


def test_only_adapter_params_receive_gradients_and_optimizer_state():
    model = TinyScanned()
    apply_adapters(model, {"kind": "lora", "targets": r".*(query|mlp_out)", "rank": 2})
    adapter_paths = _paths(nnx.state(model, adapter_filter))
    assert adapter_paths == {("blocks", "attn", "query", "A"), ("blocks", "attn", "query", "B"),
                             ("blocks", "mlp_out", "A"), ("blocks", "mlp_out", "B")}

    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, adapter_filter))(model, _x((2, 3, D)))
    assert _paths(grads) == adapter_paths
    assert np.any(np.asarray(grads["blocks"]["mlp_out"]["B"][...]) != 0)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=adapter_filter)
    opt_paths = _paths(nnx.state(optimizer.opt_state))
    mu = {p[2:] for p in opt_paths if p[1] == "mu"}
    nu = {p[2:] for p in opt_paths if p[1] == "nu"}
    assert mu == nu == adapter_paths
    opt_leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
    assert sum(int(np.size(v)) for v in opt_leaves) == 1 + 2 * count_params(model, adapter_filter)


def test_flylora_training_changes_b_and_d_but_leaves_a_and_base_bit_identical():
    model = TinyScanned()
    apply_adapters(model, {"kind": "flylora", "targets": r".*attn\.(query|value)", "rank": 8, "k": 2,
                           "bias_lr": 1e-2})
    a_before = np.asarray(model.blocks.attn.query.A[...])
    base_before = {p: np.asarray(v.get_value())
                   for p, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(adapter_filter))))}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=adapter_filter)
    model.train()

    @nnx.jit
    def train_step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=nnx.DiffState(0, adapter_filter))(model)
        optimizer.update(model, grads)
        update_flylora_biases(model)

    x = _x((4, 5, D))
    for _ in range(3):
        train_step(model, optimizer, x)

    query = model.blocks.attn.query
    np.testing.assert_array_equal(np.asarray(query.A[...]), a_before)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(adapter_filter)))):
        np.testing.assert_array_equal(np.asarray(v.get_value()), base_before[p])
    assert np.any(np.asarray(query.B[...]) != 0)
    d = np.asarray(query.d[...])
    assert d.shape == (LAYERS, 8) and np.any(d != 0)
    np.testing.assert_array_equal(np.asarray(query.counts[...]), np.zeros((LAYERS, 8), np.int32))
    # d only moves in steps of u.
    np.testing.assert_allclose(np.round(d / 1e-2), d / 1e-2, atol=1e-4)


def test_flylora_records_per_layer_counts_inside_scan():
    model = TinyScanned()
    apply_adapters(model, {"kind": "flylora", "targets": r".*mlp_in", "rank": 8, "k": 2})
    model(_x((3, 5, D)))
    fly = model.blocks.mlp_in
    counts = np.asarray(fly.counts[...])
    assert counts.shape == (LAYERS, 8)
    a = np.asarray(fly.A[...])
    assert a.shape == (LAYERS, 8, D) and not np.array_equal(a[0], a[1])  # one independent A per layer
    np.testing.assert_array_equal(a, sparse_projection(fly.seed, 8, D, 2, (LAYERS,)))
    np.testing.assert_array_equal(counts.sum(-1), np.full(LAYERS, 3 * 5 * 2))


def test_base_fingerprint_ignores_adapters_and_detects_a_changed_base_weight():
    model = TinyScanned()
    print_before = base_fingerprint(model)
    assert print_before == base_fingerprint(TinyScanned())
    apply_adapters(model, {"kind": "lora", "targets": r".*attn\.(query|key)", "rank": 2})
    _randomise(model.blocks.attn.query.B, 3)
    assert base_fingerprint(model) == print_before
    kernel = model.blocks.attn.query.base.kernel
    kernel[...] = kernel[...].at[1, 0, 0].add(1e-3)
    assert base_fingerprint(model) != print_before


# ----------------------------------------------------------------------------- folding and merging


def test_fold_lora_equals_the_unfolded_model_on_plain_and_scanned_layers():
    base = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    lora = LoRA(base, rank=3, alpha=12.0, rngs=nnx.Rngs(1))
    _randomise(lora.B, 2)
    x = _x((4, D))
    unfolded = np.asarray(lora(x))
    folded = fold_lora(lora)
    assert type(folded) is nnx.Linear
    np.testing.assert_allclose(np.asarray(folded(x)), unfolded, rtol=1e-5, atol=1e-5)

    model = TinyScanned()
    apply_adapters(model, {"kind": "lora", "targets": r"blocks\..*", "rank": 2, "alpha": 4.0})
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, LoRA):
            _randomise(m.B, 10 + i)
    xs = _x((2, 3, D))
    unfolded = np.asarray(model(xs))
    model = fold_lora(model)
    assert not any(isinstance(m, LoRA) for _, m in nnx.iter_modules(model))
    assert model.blocks.attn.query.kernel[...].shape == (LAYERS, D, D)
    assert np.max(np.abs(unfolded - np.asarray(TinyScanned()(xs)))) > 1e-3  # the adapters mattered
    # float32 through the scanned layers (outputs up to ~30): W x + B A x and (W + B A) x round
    # differently, by up to ~1e-6 of the largest output.
    np.testing.assert_allclose(np.asarray(model(xs)), unfolded, rtol=1e-5, atol=2e-6 * np.abs(unfolded).max())


def test_merge_lora_adapters_adds_the_weighted_deltas_with_the_alpha_over_r_scale():
    def adapted(seed):
        model = TinyScanned()
        apply_adapters(model, {"kind": "lora", "targets": r".*value", "rank": 2, "alpha": 6.0, "seed": seed})
        _randomise(model.blocks.attn.value.B, seed)
        return model

    states = [adapter_state(adapted(s)) for s in (1, 2)]
    w0 = _np(TinyScanned().blocks.attn.value.kernel)
    model = merge_lora_adapters(adapted(3), states, weights=(0.5, 2.0))
    assert type(model.blocks.attn.value) is nnx.Linear
    expected = w0.copy()
    for w, s in zip((0.5, 2.0), states):
        a = np.asarray(s["blocks"]["attn"]["value"]["A"][...], np.float64)
        b = np.asarray(s["blocks"]["attn"]["value"]["B"][...], np.float64)
        expected += w * 3.0 * np.einsum("lmr,lrn->lnm", b, a)
    np.testing.assert_allclose(_np(model.blocks.attn.value.kernel), expected, rtol=1e-5, atol=1e-6)


def _single_flylora(seed, select="signed"):
    model = nnx.List([nnx.Linear(D, 5, rngs=nnx.Rngs(0))])
    apply_adapters(model, {"kind": "flylora", "targets": "0", "rank": 8, "k": 2, "seed": seed, "select": select})
    _randomise(model[0].B, seed + 100)
    _randomise(model[0].d, seed + 200, scale=0.05)
    return model


def test_merge_flylora_independent_adapters_sums_their_outputs():
    adapters = [_single_flylora(s) for s in (1, 2)]
    assert not np.array_equal(_np(adapters[0][0].A), _np(adapters[1][0].A))
    x = _x((6, D))
    base = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    base_out = np.asarray(base(x), np.float64)
    deltas = [np.asarray(m[0](x, train=False), np.float64) - base_out for m in adapters]
    merged = merge_flylora_adapters(_single_flylora(9), [adapter_state(m) for m in adapters], weights=(1.0, 0.5))
    assert isinstance(merged[0], FlyLoRASum) and len(merged[0].branches) == 2
    np.testing.assert_allclose(np.asarray(merged[0](x, train=False)), base_out + deltas[0] + 0.5 * deltas[1],
                               rtol=1e-5, atol=1e-5)
    assert base_fingerprint(merged) == base_fingerprint(nnx.List([base]))


def test_merge_flylora_shared_a_averages_b_and_rejects_different_a():
    adapters = [_single_flylora(4) for _ in range(2)]
    _randomise(adapters[1][0].B, 77)
    states = [adapter_state(m) for m in adapters]
    merged = merge_flylora_adapters(_single_flylora(5), states, shared_a=True)
    fly = merged[0]
    assert isinstance(fly, FlyLoRA)
    np.testing.assert_array_equal(np.asarray(fly.A[...]), np.asarray(adapters[0][0].A[...]))
    np.testing.assert_allclose(_np(fly.B), (_np(adapters[0][0].B) + _np(adapters[1][0].B)) / 2, rtol=1e-6)
    np.testing.assert_allclose(_np(fly.d), (_np(adapters[0][0].d) + _np(adapters[1][0].d)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="disagree on A"):
        merge_flylora_adapters(_single_flylora(5), [adapter_state(_single_flylora(s)) for s in (1, 2)],
                               shared_a=True)

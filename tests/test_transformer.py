"""Specification of the masked multi-modal transformer: layout, factorisation, size, sharding.

A small model (width 32, 2 layers) over video 3 x 4 x 4 with a 2^6 vocabulary split
in 2 groups of 8, and audio 8 frames x 2 RVQ levels of 16 codes.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen.generative import masking, tasks
from mmgen.generative import transformer as tr
from mmgen.parallel.sharding import (
    DEFAULT_RULES,
    axis_rules,
    batch_sharding,
    replicated,
    state_shardings,
)

B = 8
# small_transformer_config (the layout in the docstring, shared with tests/test_sampling.py): tests/conftest.py


def random_tokens(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    return {
        "video": jnp.asarray(rng.integers(0, 2**6, (batch, 3, 4, 4)), jnp.int32),
        "audio": jnp.asarray(rng.integers(0, 16, (batch, 8, 2)), jnp.int32),
    }


def numpy_initialised(cfg, seed=0):
    """The model with weights from a seeded numpy generator (no per-shape init compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def init(path, x):
        if str(path[-1]) in ("scale",) or "scale" in jax.tree_util.keystr(path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


@pytest.fixture(scope="module")
def model(small_transformer_config):
    return numpy_initialised(small_transformer_config())


@pytest.fixture(scope="module")
def forward_results(model):
    """Logits with audio hidden for half the batch, and with audio left out of the sequence."""
    tokens = random_tokens()
    tokens["video"] = tokens["video"].at[:, 0].set(2**6)  # some [MASK]s
    tokens["audio"] = tokens["audio"].at[:, :, 1].set(16)
    ids = jnp.full((B,), tasks.task_id("audio_video"), jnp.int32)
    labels = jnp.arange(B, dtype=jnp.int32) % 6
    present = {"video": jnp.ones(B, bool), "audio": jnp.arange(B) % 2 == 0}

    @nnx.jit
    def both(model, tokens):
        full = model(tokens, ids, {"label": labels}, present=present)
        video_only = model({"video": tokens["video"]}, ids, {"label": labels})
        return full, video_only

    return both(model, tokens)


def test_logits_have_token_shape_plus_groups_and_group_vocab(model, forward_results):
    full, video_only = forward_results
    assert full["video"].shape == (B, 3, 4, 4, 2, 8)  # 2^6 ids = 2 groups of 2^3
    assert full["audio"].shape == (B, 8, 2, 1, 16)  # per-level heads, one position per frame
    assert full["video"].dtype == jnp.float32 and set(video_only) == {"video"}
    assert np.all(np.isfinite(np.asarray(full["video"])))
    # Factorised embedding: one row per (level, group, digit), plus one [MASK] vector per level.
    assert model.token_embeddings["video"].table.embedding.shape == (2 * 8, 32)
    assert model.token_embeddings["audio"].table.embedding.shape == (2 * 16, 32)
    assert model.token_embeddings["audio"].mask_embedding.shape == (2, 32)
    assert model.heads["video"].head.kernel.shape == (32, 16)


def test_absent_modality_gives_the_same_logits_as_leaving_it_out(forward_results):
    full, video_only = forward_results
    absent = np.arange(B) % 2 == 1
    np.testing.assert_allclose(full["video"][absent], video_only["video"][absent], rtol=1e-5, atol=1e-5)
    # ... while a present audio track does change the video logits
    assert not np.allclose(full["video"][~absent], video_only["video"][~absent], atol=1e-4)


def test_group_digits_are_least_significant_first_and_round_trip():
    spec = tr.ModalitySpec("video", (4,), vocab=2**6, groups=2)
    ids = jnp.asarray([0, 1, 8, 63])
    digits = tr.group_digits(ids, spec)
    assert digits.tolist() == [[0, 0], [1, 0], [0, 1], [7, 7]]
    np.testing.assert_array_equal(tr.combine_digits(digits, spec), ids)


def test_factorised_log_prob_is_the_sum_of_group_log_probs():
    spec = tr.ModalitySpec("video", (5,), vocab=2**6, groups=2)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2, 8)), jnp.float32)
    ids = jnp.asarray([0, 9, 17, 42, 63])
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = [logp[i, 0, int(t) % 8] + logp[i, 1, int(t) // 8] for i, t in enumerate(ids)]
    np.testing.assert_allclose(tr.token_log_prob(logits, ids, spec), expected, rtol=1e-6)
    # and it is a proper distribution over the 64 ids
    all_ids = jnp.arange(64)
    total = jnp.exp(tr.token_log_prob(jnp.broadcast_to(logits[0], (64, 2, 8)), all_ids, spec)).sum()
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_vocabulary_that_does_not_split_into_groups_is_rejected(small_transformer_config):
    with pytest.raises(ValueError, match="cannot be split into 4 equal groups"):
        tr.modality_specs(small_transformer_config(video_vocab=2**6, video_vocab_groups=4))


def _linear_params(model) -> int:
    return sum(
        m.kernel.size + m.bias.size for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)
    )


def test_parameter_count_and_flops_formula_match_the_built_model(model, small_transformer_config):
    cfg = small_transformer_config()
    params = nnx.state(model, nnx.Param)
    assert tr.param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))
    assert tr.matmul_param_count(cfg) == _linear_params(model)
    seq = 2 + 3 * 4 * 4 + 8
    assert tr.sequence_length(cfg) == seq
    # Blocks at every position, each head only at its modality's positions (48 video, 8 audio frames).
    heads = {m: h.head.kernel.size + h.head.bias.size for m, h in model.heads.items()}
    blocks = _linear_params(model) - sum(heads.values())
    per_example = 6 * (blocks * seq + heads["video"] * 48 + heads["audio"] * 8) + 12 * 2 * seq * seq * 32
    assert tr.flops_per_token(cfg) * seq == pytest.approx(per_example, rel=1e-12)


@pytest.mark.parametrize("layout", [
    {},  # tiny: one 1024-way head per modality
    {"width": 64, "mlp_dim": 256, "num_heads": 2, "video_grid": (2, 4, 4), "video_vocab": 2**12,
     "video_vocab_groups": 2, "audio_len": 8, "audio_levels": 4, "audio_vocab": 256},  # factorised video, 4 RVQ levels
], ids=["tiny", "factorised_rvq"])
def test_flops_formula_matches_the_compiled_training_step(layout):
    # One block: XLA's cost analysis counts a scanned body once, whatever the trip count.
    cfg = tr.model_config("tiny")
    cfg.update({"depth": 1, "remat_policy": "none", "dropout": 0.0, **layout})
    specs = tr.modality_specs(cfg)
    rng = np.random.default_rng(0)
    tokens = {m: jnp.asarray(rng.integers(0, s.vocab, (2, *s.shape)), jnp.int32) for m, s in specs.items()}
    example = masking.make_training_example(cfg, tokens, jnp.full((2,), tasks.task_id("audio_video"), jnp.int32),
                                            jax.random.key(0), mode="prefix")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0))))

    def loss(state, example):
        return masking.loss_fn(nnx.merge(graphdef, state), example, train=True)[0]

    cost = jax.jit(jax.value_and_grad(loss)).lower(state, example).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert xla_flops == pytest.approx(tr.flops_per_token(cfg) * tr.sequence_length(cfg) * 2, rel=0.1)



def test_adapter_flops_are_the_frozen_base_forward_and_activation_gradients(small_transformer_config):
    from mmgen.families import adapters

    cfg = ml_collections.ConfigDict({"model": small_transformer_config()})
    seq = tr.sequence_length(cfg.model)
    attention = 12 * 2 * seq * seq * 32
    dense = tr.flops_per_token(cfg.model) * seq - attention  # 6 N per token, heads on their positions
    assert adapters.flops_per_example(cfg) == pytest.approx(4 / 6 * dense + attention, rel=1e-12)


def test_an_unrolled_layer_loop_has_the_same_parameters_values_and_gradients(model, small_transformer_config):
    tokens = random_tokens(1)
    ids = jnp.full((B,), tasks.task_id("audio_video"), jnp.int32)

    def loss(m):
        out = m(tokens, ids, {"label": jnp.zeros(B, jnp.int32)})
        return sum(jnp.mean(jnp.square(v)) for v in out.values())

    state = nnx.state(model)
    results = {}
    for unroll in (1, 2):  # the fixture has 2 layers: 2 unrolls the loop
        cfg = small_transformer_config(scan_unroll=unroll)
        built_graphdef, built_state = nnx.split(nnx.eval_shape(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0))))
        assert jax.tree.structure(built_state) == jax.tree.structure(state)  # checkpoints load either way
        unrolled = nnx.merge(built_graphdef, state)
        assert unrolled.blocks.scan_unroll == unroll
        results[unroll] = nnx.jit(nnx.value_and_grad(loss))(unrolled)
    (value_1, grads_1), (value_2, grads_2) = results[1], results[2]
    np.testing.assert_allclose(value_2, value_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="scan_unroll=0"):
        tr.MaskedTransformer(small_transformer_config(scan_unroll=0), rngs=nnx.Rngs(0))


def test_size_presets():
    b, l, xl = (tr.model_config(s) for s in ("B", "L", "XL"))
    assert (b.depth, b.width, b.mlp_dim, b.num_heads) == (12, 768, 3072, 12)
    assert (l.depth, l.width, l.mlp_dim, l.num_heads) == (24, 1024, 4096, 16)
    assert 0.9e9 < tr.param_count(xl) < 1.3e9
    # analytic count of a preset equals the abstract model's (LFQ 2^18 in 2 groups, 4 RVQ levels)
    abstract = nnx.eval_shape(lambda: tr.MaskedTransformer(b, rngs=nnx.Rngs(0)))
    assert tr.param_count(b) == sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert b.dtype == "bfloat16" and b.param_dtype == "float32"
    with pytest.raises(ValueError, match="choose one of tiny, B, L, XL"):
        tr.model_config("H")


def test_parameters_carry_logical_names_and_compute_dtype_is_separate(small_transformer_config):
    cfg = small_transformer_config(dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0)))
    layer = abstract.blocks.layers
    assert layer.attention.query.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert layer.mlp.mlp_out.kernel.get_metadata()["out_sharding"] == ("layers", "mlp", "embed")
    assert abstract.heads["video"].head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")
    assert layer.attention.query.kernel.dtype == jnp.float32 and layer.attention.query.dtype == jnp.bfloat16


def test_bad_inputs_fail_with_named_errors(model, small_transformer_config):
    ids = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"video tokens have shape \(2, 3, 4\)"):
        model({"video": jnp.zeros((2, 3, 4), jnp.int32)}, ids)
    abstract = lambda cfg: nnx.eval_shape(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="remat_policy='save_all'"):
        abstract(small_transformer_config(remat_policy="save_all"))
    with pytest.raises(ValueError, match="needs a dropout rng"):
        abstract(small_transformer_config(dropout=0.1))(random_tokens(batch=2), ids, train=True)


@pytest.mark.slow
def test_sharded_train_step_matches_one_device_and_params_are_sharded(model, small_transformer_config):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    graphdef, params = nnx.split(model)
    shardings = state_shardings(params, mesh, DEFAULT_RULES)

    names = ["class_conditional", "frame_prediction", "audio_video", "video_to_audio"] * 2
    ids = jnp.asarray([tasks.task_id(n) for n in names], jnp.int32)
    tokens = random_tokens(3)
    example = jax.jit(
        lambda tokens: masking.make_training_example(
            small_transformer_config(), tokens, ids, jax.random.key(4), labels=ids % 5, mode="prefix",
            region_rng=jax.random.key(5)
        )
    )(tokens)

    def loss(params, example):
        return masking.loss_fn(nnx.merge(graphdef, params), example, label_smoothing=0.1)[0]

    loss_1 = jax.jit(loss)(params, example)  # one device

    sharded_params = jax.device_put(params, shardings)
    sharded_example = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), example)
    train_step = jax.jit(jax.value_and_grad(loss), out_shardings=(replicated(mesh), shardings))
    loss_8, grads_8 = train_step(sharded_params, sharded_example)

    assert float(loss_8) == pytest.approx(float(loss_1), rel=1e-5)
    kernel = lambda tree: tree["blocks"]["layers"]["mlp"]["mlp_in"]["kernel"][...]
    assert np.all(np.isfinite(kernel(grads_8))) and float(jnp.abs(kernel(grads_8)).max()) > 0
    # The kernel [layers, embed, mlp] really is split over fsdp x tensor: 4 distinct shards.
    assert kernel(sharded_params).sharding.spec == P(None, "fsdp", "tensor")
    assert kernel(grads_8).sharding.spec == P(None, "fsdp", "tensor")
    assert len({str(s.index) for s in kernel(sharded_params).addressable_shards}) == 4
    table = sharded_params["token_embeddings"]["video"]["table"]["embedding"][...]
    assert table.sharding.spec == P("tensor", "fsdp")


def _constraints(text: str) -> set[tuple[str, str]]:
    """(spec, tensor type) of every ``sdy.sharding_constraint`` in lowered StableHLO text."""
    return set(re.findall(r"sdy\.sharding_constraint %[\w#.]+ <@\w+, (\[.*?\])> : tensor<([^>]*)>", text))


def test_constrained_activations_match_one_device_and_the_constraints_follow_the_rules(model, small_transformer_config):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray([tasks.task_id(n) for n in ["class_conditional", "audio_video", "video_to_audio"] * 3][:B],
                      jnp.int32)
    example = jax.jit(lambda tokens: masking.make_training_example(
        small_transformer_config(), tokens, ids, jax.random.key(1), labels=ids % 5, mode="prefix",
        region_rng=jax.random.key(2)))(random_tokens(7))

    def loss(params, example):
        return masking.loss_fn(nnx.merge(graphdef, params), example, label_smoothing=0.1)[0]

    def constrained(rules):
        def step(params, example):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axis_rules(rules):
                return jax.value_and_grad(loss)(params, example)
        return step

    loss_1, grads_1 = jax.jit(jax.value_and_grad(loss))(params, example)  # one device, no mesh: no constraint
    shardings = state_shardings(params, mesh, DEFAULT_RULES)
    sharded = (jax.device_put(params, shardings),
               jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), example))
    step = jax.jit(constrained(DEFAULT_RULES), out_shardings=(replicated(mesh), shardings))
    loss_8, grads_8 = step(*sharded)
    assert float(loss_8) == pytest.approx(float(loss_1), rel=1e-5)
    flat_1, flat_8 = jax.tree.leaves(grads_1), jax.tree.leaves(grads_8)
    assert len(flat_1) == len(flat_8)
    for g1, g8 in zip(flat_1, flat_8):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=2e-4, atol=2e-6)

    # The residual stream [B, S, D=32] is split over data x fsdp with D whole (the weights'
    # embed -> fsdp cannot take fsdp twice); the MLP hidden [B, S, 64] and the per-head
    # q/k/v [B, S, N, H] split over tensor too (Megatron); the logits over vocab -> tensor.
    specs = _constraints(jax.jit(constrained(DEFAULT_RULES)).lower(*sharded).as_text())
    seq = sum(int(np.prod(s.grid)) for s in tr.modality_specs(small_transformer_config()).values()) + 2
    assert ('[{"data", "fsdp"}, {}, {}]', f"{B}x{seq}x32xf32") in specs
    assert ('[{"data", "fsdp"}, {}, {"tensor"}]', f"{B}x{seq}x64xf32") in specs
    assert ('[{"data", "fsdp"}, {}, {"tensor"}, {}]', f"{B}x{seq}x2x16xf32") in specs
    assert ('[{"data", "fsdp"}, {}, {"tensor"}]', f"{B}x48x{2 * 8}xf32") in specs  # video logits, 3*4*4 positions
    # The batch axes come from the rules: "batch" -> data alone leaves fsdp to nothing.
    only_data = [(n, "data" if n == "batch" else a) for n, a in DEFAULT_RULES]
    specs = _constraints(jax.jit(constrained(only_data)).lower(*sharded).as_text())
    assert ('[{"data"}, {}, {}]', f"{B}x{seq}x32xf32") in specs
    assert not any('"fsdp"' in spec for spec, _ in specs)


@pytest.mark.slow
def test_heads_major_attention_equals_dot_product_attention_with_mask_and_gradients():
    from mmgen.nn.attention import attention

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 3, 4))
    k, v = jax.random.normal(kk, (2, 7, 3, 4)), jax.random.normal(kv, (2, 7, 3, 4))
    mask = jnp.array([[True] * 7, [True, False, True, True, False, False, True]])[:, None, None, :]
    ref = attention(q, k, v, mask, impl="dot_product_attention")
    out = attention(q, k, v, mask, impl="heads_major")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # A masked key changes nothing: perturbing it leaves the output alone.
    np.testing.assert_allclose(attention(q, k.at[1, 1].add(5.0), v.at[1, 1].add(5.0), mask, impl="heads_major")[1],
                               out[1], rtol=1e-5, atol=1e-5)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, impl=impl)))

    for g, g_ref in zip(jax.grad(loss("heads_major"), (0, 1, 2))(q, k, v),
                        jax.grad(loss("dot_product_attention"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="impl='flash'"):
        attention(q, k, v, impl="flash")


def test_blockwise_attention_equals_dot_product_attention_with_masks_and_gradients():
    """The CPU form with its own backward (recomputed weights) against XLA's plain form."""
    from mmgen.nn import attention as attn

    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 5, 3, 4))
    k, v = jax.random.normal(kk, (2, 7, 3, 4)), jax.random.normal(kv, (2, 7, 3, 4))
    key_mask = jnp.array([[True] * 7, [True, False, True, True, False, False, True]])[:, None, None, :]
    full_mask = jax.random.bernoulli(kk, 0.7, (2, 3, 5, 7)).at[..., 0].set(True)  # per query and head
    for mask in (None, key_mask, full_mask):
        ref = attn.attention(q, k, v, mask, impl="dot_product_attention")
        np.testing.assert_allclose(attn.attention(q, k, v, mask, impl="blockwise"), ref, rtol=1e-5, atol=1e-5)

        def loss(impl):
            return lambda q, k, v: jnp.sum(jnp.sin(attn.attention(q, k, v, mask, impl=impl)))

        for g, g_ref in zip(jax.grad(loss("blockwise"), (0, 1, 2))(q, k, v),
                            jax.grad(loss("dot_product_attention"), (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    # A masked key gets no gradient and changes nothing.
    gk = jax.grad(lambda k: jnp.sum(attn.attention(q, k, v, key_mask, impl="blockwise")))(k)
    np.testing.assert_array_equal(gk[1, 1], 0.0)


def test_auto_attention_takes_cudnn_only_where_cudnn_can_run_the_call():
    from mmgen.nn import backend
    from mmgen.nn.attention import attention, auto_impl

    gpu = {"cpu": False, "cudnn": True, "dtype": jnp.bfloat16, "head_dim": 64, "q_len": 422, "kv_len": 422,
           "masked": True}
    assert auto_impl(**gpu) == "cudnn"
    assert auto_impl(**{**gpu, "dtype": jnp.float16}) == "cudnn"
    assert auto_impl(**{**gpu, "cpu": True}) == "blockwise"
    assert auto_impl(**{**gpu, "cpu": True, "devices": 8}) == "heads_major"  # blockwise would gather the batch
    # What cuDNN's flash attention refuses goes to XLA's implementation.
    for change in ({"cudnn": False}, {"dtype": jnp.float32}, {"head_dim": 60}, {"head_dim": 192},
                   {"q_len": 421, "kv_len": 421}):
        assert auto_impl(**{**gpu, **change}) == "dot_product_attention", change
    assert auto_impl(**{**gpu, "q_len": 421, "kv_len": 421, "masked": False}) == "cudnn"  # odd lengths need no bias
    # A CPU stand-in compiling for a GPU (plan) has no cuDNN kernels: "auto" must not pick them.
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with backend.target_platform("gpu"):
        assert not backend.cudnn_kernels()
        out = attention(q, q, q, jnp.ones((1, 1, 1, 4), bool))
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)
    assert not backend.cudnn_kernels()  # on this CPU

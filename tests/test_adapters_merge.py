"""Specification of the task-vector merges of ``mmgen.adapters.merge`` (sum, average, TIES,
Model Breadcrumbs, DARE), each against an independent numpy reading of its paper's
formula on small random task vectors, plus the truncated-SVD re-factorisation and the
model-level LoRA / FlyLoRA merges on one small layer. Fast: numpy and one-layer models.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen import config as config_lib
from mmgen.adapters import FlyLoRA, FlyLoRASum, LoRA, adapter_state
from mmgen.adapters.merge import (
    METHOD_OPTIONS,
    check_merge_options,
    lora_factors,
    merge_flylora_adapters,
    merge_lora_adapters,
    merge_task_vectors,
)

TIES = {"k": 0.2, "lam": 1.0, "scope": "model"}
BREADCRUMBS = {"keep": 0.15, "drop_largest": 0.006, "alpha": 0.2}
DARE = {"p": 0.9, "combine": "sum", "lam": 1.0, "seed": 0}
OPTIONS = {"sum": {}, "average": {}, "ties": TIES, "breadcrumbs": BREADCRUMBS, "dare": DARE}


def task_vectors(n=3, seed=0):
    """n task vectors over a stacked layer [2, 6, 5] (two layers) and a plain one [8, 4]."""
    rng = np.random.default_rng(seed)
    return [{"blocks.query": rng.normal(size=(2, 6, 5)).astype(np.float32),
             "head": rng.normal(size=(8, 4)).astype(np.float32)} for _ in range(n)]


def layer_matrices(vector):
    """Every layer's matrix as a flat array: the stacked entry gives one per leading index."""
    return [m.ravel() for name in vector for m in np.asarray(vector[name]).reshape(-1, *vector[name].shape[-2:])]


# ------------------------------------------------------------------------ the papers' formulas, read with numpy
def reference_ties(vectors, k, lam, scope):
    """TIES-Merging (Yadav et al. 2023): trim to top-k% |tau|, sign = sgn(sum), mean of the agreeing."""
    names = list(vectors[0])
    trimmed = []
    for v in vectors:
        if scope == "model":
            flat = np.concatenate([v[n].ravel() for n in names])
            threshold = np.sort(np.abs(flat))[::-1][int(round(k * flat.size)) - 1]
            trimmed.append({n: np.where(np.abs(v[n]) >= threshold, v[n], 0.0) for n in names})
        else:
            out = {}
            for n in names:
                mats = v[n].reshape(-1, v[n].shape[-2] * v[n].shape[-1])
                thr = np.sort(np.abs(mats), axis=1)[:, ::-1][:, int(round(k * mats.shape[1])) - 1][:, None]
                out[n] = np.where(np.abs(mats) >= thr, mats, 0.0).reshape(v[n].shape)
            trimmed.append(out)
    merged = {}
    for n in names:
        t = np.stack([tr[n] for tr in trimmed])
        gamma = np.sign(t.sum(0))
        total, count = np.zeros_like(t[0]), np.zeros_like(t[0])
        for ti in t:
            agree = (ti != 0) & (np.sign(ti) == gamma)
            total += np.where(agree, ti, 0.0)
            count += agree
        merged[n] = lam * np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return merged, trimmed


def reference_breadcrumbs(vectors, keep, drop_largest, alpha):
    """Model Breadcrumbs: per layer, drop the top drop_largest and everything below the next keep by |tau|."""
    merged = {n: np.zeros_like(vectors[0][n]) for n in vectors[0]}
    for v in vectors:
        for n in v:
            mats = v[n].reshape(-1, v[n].shape[-2] * v[n].shape[-1])
            out = np.zeros_like(mats)
            for i, row in enumerate(mats):
                desc = np.sort(np.abs(row))[::-1]
                top = int(round(drop_largest * row.size))
                kept = int(round(keep * row.size))
                upper = desc[top - 1] if top > 0 else np.inf  # strictly below the top-removed values
                lower = desc[top + kept - 1]  # at least the last kept magnitude
                out[i] = np.where((np.abs(row) < upper) & (np.abs(row) >= lower), row, 0.0)
            merged[n] += alpha * out.reshape(v[n].shape)
    return merged


# ------------------------------------------------------------------------ TIES
@pytest.mark.parametrize("scope", ["model", "layer"])
def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(scope):
    vectors = task_vectors(3)
    options = dict(TIES, scope=scope, lam=0.7)
    merged = merge_task_vectors(vectors, "ties", options)
    want, trimmed = reference_ties(vectors, 0.2, 0.7, scope)
    for n in want:
        np.testing.assert_allclose(merged[n], want[n], rtol=1e-5, atol=1e-6)
    # the trim keeps exactly round(k d) entries per task vector (per layer for scope=layer)
    for t in trimmed:
        if scope == "model":
            d = sum(x.size for x in t.values())
            assert sum(int((x != 0).sum()) for x in t.values()) == round(0.2 * d)
        else:
            assert all(int((m != 0).sum()) == round(0.2 * m.size) for m in layer_matrices(t))
    # an entry where the tasks disagree takes only the elected side: never a value of the other sign
    for n in merged:
        stacked = np.stack([t[n] for t in trimmed])
        elected = np.sign(stacked.sum(0))
        assert np.all(merged[n] * elected >= 0)
        both = (stacked > 0).any(0) & (stacked < 0).any(0)
        assert both.any()  # the random draw has conflicts to resolve


def test_ties_sign_election_on_a_hand_made_conflict():
    # three tasks on 1 x 3 entries, nothing trimmed (k = 1): entry 0 has mass +3 vs -1 (elected +,
    # mean of 1 and 2); entry 1 has +1 vs -5 (elected -, only -5 is kept); entry 2 cancels exactly (0).
    vectors = [{"w": np.array([[1.0, 1.0, 2.0]])}, {"w": np.array([[2.0, -5.0, -2.0]])},
               {"w": np.array([[-1.0, 0.0, 0.0]])}]
    merged = merge_task_vectors(vectors, "ties", {"k": 1.0, "lam": 1.0, "scope": "model"})
    np.testing.assert_allclose(merged["w"], [[1.5, -5.0, 0.0]])


# ------------------------------------------------------------------------ Breadcrumbs
def test_breadcrumbs_keeps_the_middle_of_each_layer_and_scales_the_sum():
    vectors = task_vectors(3, seed=1)
    options = {"keep": 0.3, "drop_largest": 0.1, "alpha": 0.5}
    merged = merge_task_vectors(vectors, "breadcrumbs", options)
    want = reference_breadcrumbs(vectors, 0.3, 0.1, 0.5)
    for n in want:
        np.testing.assert_allclose(merged[n], want[n], rtol=1e-5, atol=1e-6)
    # one task: per layer round(0.3 d) entries survive, none of the round(0.1 d) largest, all of them
    # larger in magnitude than every masked entry outside the top
    one = merge_task_vectors(vectors[:1], "breadcrumbs", dict(options, alpha=1.0))
    for kept, orig in zip(layer_matrices(one), layer_matrices(vectors[0])):
        d = orig.size
        assert int((kept != 0).sum()) == round(0.3 * d)
        order = np.argsort(-np.abs(orig))
        assert np.all(kept[order[:round(0.1 * d)]] == 0)
        np.testing.assert_array_equal(kept[order[round(0.1 * d):round(0.4 * d)]], orig[order[round(0.1 * d):round(0.4 * d)]])
        assert np.all(kept[order[round(0.4 * d):]] == 0)


def test_breadcrumbs_paper_defaults_mask_the_bottom_and_the_outliers():
    vectors = [{"w": np.random.default_rng(3).normal(size=(2, 40, 50)).astype(np.float32)}]
    kept = merge_task_vectors(vectors, "breadcrumbs", dict(BREADCRUMBS, alpha=1.0))["w"]
    for layer, orig in zip(kept, vectors[0]["w"]):
        nonzero = np.abs(layer[layer != 0])
        assert (layer != 0).sum() == round(0.15 * 2000)  # 15% kept
        assert nonzero.max() < np.sort(np.abs(orig).ravel())[::-1][round(0.006 * 2000) - 1]  # the top 0.6% gone
        assert nonzero.min() >= np.quantile(np.abs(orig), 1 - 0.15 - 0.006 - 1e-3)  # the bottom ~84% gone


# ------------------------------------------------------------------------ DARE
def test_dare_drops_with_probability_p_rescales_survivors_and_is_seeded():
    vectors = [{"w": np.random.default_rng(4).normal(size=(3, 40, 50)).astype(np.float32)}]
    x = vectors[0]["w"]
    out = merge_task_vectors(vectors, "dare", dict(DARE, p=0.7))["w"]
    survived = out != 0
    np.testing.assert_allclose(out[survived], x[survived] / 0.3, rtol=1e-6)  # rescaled by 1 / (1 - p)
    assert abs(survived.mean() - 0.3) < 0.02  # 6000 Bernoulli(0.3) draws
    again = merge_task_vectors(vectors, "dare", dict(DARE, p=0.7))["w"]
    np.testing.assert_array_equal(out, again)  # seeded
    other = merge_task_vectors(vectors, "dare", dict(DARE, p=0.7, seed=1))["w"]
    assert ((other != 0) != survived).mean() > 0.2  # another seed, another mask
    # unbiased: the mean over seeds approaches tau (E[m / (1 - p)] = 1)
    mean = np.mean([merge_task_vectors(vectors, "dare", dict(DARE, p=0.7, seed=s))["w"] for s in range(200)], axis=0)
    assert np.abs(mean - x).mean() < 0.1 * np.abs(x).mean()
    # two tasks draw different masks from one seed
    two = [vectors[0], {"w": x.copy()}]
    both = merge_task_vectors(two, "dare", dict(DARE, p=0.7))["w"]
    assert not np.allclose(both, 2 * out)


def test_dare_combined_by_ties_is_the_election_over_the_rescaled_vectors():
    vectors = task_vectors(3, seed=5)
    options = dict(DARE, p=0.5, combine="ties", lam=0.8)
    merged = merge_task_vectors(vectors, "dare", options)
    # the i-th task's mask depends on its index: drop each alone at its own index
    dropped = []
    for i, v in enumerate(vectors):
        placeholder = [{n: np.zeros_like(x) for n, x in v.items()}] * i + [v]
        dropped.append(merge_task_vectors(placeholder, "dare", dict(options, combine="sum", lam=1.0)))
    want, _ = reference_ties(dropped, 1.0, 0.8, "model")
    for n in want:
        np.testing.assert_allclose(merged[n], want[n], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ sum, average, one adapter
def test_sum_and_average_are_task_arithmetic_with_weights():
    vectors = task_vectors(3, seed=6)
    w = [0.5, 2.0, -1.0]
    merged_sum = merge_task_vectors(vectors, "sum", weights=w)
    merged_avg = merge_task_vectors(vectors, "average", weights=w)
    for n in vectors[0]:
        want = sum(wi * v[n] for wi, v in zip(w, vectors))
        np.testing.assert_allclose(merged_sum[n], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged_avg[n], want / sum(w), rtol=1e-5, atol=1e-6)
    plain = merge_task_vectors(vectors, "average")
    np.testing.assert_allclose(plain["head"], np.mean([v["head"] for v in vectors], axis=0), rtol=1e-5, atol=1e-6)


IDENTITY = {"sum": {}, "average": {}, "ties": dict(TIES, k=1.0), "dare": dict(DARE, p=0.0),
            "breadcrumbs": {"keep": 1.0, "drop_largest": 0.0, "alpha": 1.0}}


@pytest.mark.parametrize("method", list(IDENTITY))
def test_one_task_vector_merges_to_itself_where_the_method_allows(method):
    vectors = task_vectors(1, seed=7)
    merged = merge_task_vectors(vectors, method, IDENTITY[method])
    for n in vectors[0]:
        np.testing.assert_allclose(merged[n], vectors[0][n], rtol=1e-6)


def test_bad_options_are_one_line_value_errors():
    cases = [("ties", dict(TIES, k=0.0), "ties.k"), ("ties", dict(TIES, scope="row"), "ties.scope"),
             ("dare", dict(DARE, p=1.0), "dare.p"), ("dare", dict(DARE, combine="mean"), "dare.combine"),
             ("breadcrumbs", dict(BREADCRUMBS, keep=0.999), "exceeds 1"), ("ties", {"k": 0.2}, "needs the options"),
             ("slerp", {}, "not one of")]
    for method, options, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            check_merge_options(method, options)
        assert "\n" not in str(info.value)


def test_the_shipped_merge_options_are_complete_and_valid():
    cfg = config_lib.load_config("configs/adapters/lora.py:tiny")
    assert set(cfg.merge) == {"ties", "breadcrumbs", "dare", "svd_rank"}
    for method, keys in METHOD_OPTIONS.items():
        if keys:
            assert set(cfg.merge[method]) == set(keys)
            check_merge_options(method, cfg.merge[method].to_dict())
    assert cfg.merge.ties.k == 0.2 and cfg.merge.dare.p == 0.9  # the papers' defaults
    assert dict(config_lib.load_config("configs/adapters/flylora.py:tiny").merge) == dict(cfg.merge)


# ------------------------------------------------------------------------ SVD re-factorisation
def test_lora_factors_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(8)
    delta = rng.normal(size=(2, 12, 9)).astype(np.float32)  # kernel layout [stack, in, out]
    a, b, residual = lora_factors(delta, 9, 2.0)
    assert a.shape == (2, 9, 12) and b.shape == (2, 9, 9) and residual < 1e-5
    np.testing.assert_allclose(2.0 * np.swapaxes(b @ a, -1, -2), delta, atol=1e-5)
    a, b, residual = lora_factors(delta, 4, 2.0)
    s = np.linalg.svd(np.swapaxes(delta, -1, -2), compute_uv=False)
    want = np.sqrt((s[:, 4:] ** 2).sum()) / np.sqrt((s ** 2).sum())  # Eckart-Young
    assert abs(residual - want) < 1e-5
    approx = 2.0 * np.swapaxes(b @ a, -1, -2)
    assert abs(np.linalg.norm(approx - delta) / np.linalg.norm(delta) - want) < 1e-5
    assert np.linalg.matrix_rank(approx[0], tol=1e-4) == 4


# ------------------------------------------------------------------------ model-level merges
def _lora_layer(seed, rank=2):
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    lora = LoRA(base, rank, 2.0 * rank, rngs=nnx.Rngs(seed))
    lora.B[...] = jnp.asarray(np.random.default_rng(seed).normal(size=lora.B[...].shape), jnp.float32)
    return nnx.List([lora])


def test_merge_lora_adapters_folds_the_methods_merge_of_the_folded_deltas():
    adapters = [_lora_layer(s) for s in (1, 2, 3)]
    deltas = [{"0": np.asarray(m[0].scale * (m[0].B[...] @ m[0].A[...])).T} for m in adapters]
    kernel = np.asarray(adapters[0][0].base.kernel[...])
    for method in ("ties", "breadcrumbs", "dare"):
        options = {"ties": dict(TIES, k=0.4), "breadcrumbs": {"keep": 0.5, "drop_largest": 0.1, "alpha": 0.3},
                   "dare": dict(DARE, p=0.5)}[method]
        model = merge_lora_adapters(_lora_layer(9), [adapter_state(m) for m in adapters], method=method, options=options)
        assert isinstance(model[0], nnx.Linear)
        want = kernel + merge_task_vectors(deltas, method, options)["0"]
        np.testing.assert_allclose(np.asarray(model[0].kernel[...]), want, atol=1e-5)


def _flylora_layer(seed):
    base = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    fly = FlyLoRA(base, rank=8, k=2, seed=seed, deterministic=True)
    fly.B[...] = jnp.asarray(np.random.default_rng(seed).normal(size=fly.B[...].shape), jnp.float32)
    return nnx.List([fly])


def test_flylora_merges_apply_per_task_steps_to_independent_branches_and_refuse_ties():
    adapters = [_flylora_layer(s) for s in (1, 2)]
    states = [adapter_state(m) for m in adapters]
    options = {"keep": 0.5, "drop_largest": 0.1, "alpha": 0.4}
    merged = merge_flylora_adapters(_flylora_layer(1), states, [1.0, 2.0], method="breadcrumbs", options=options)
    assert isinstance(merged[0], FlyLoRASum) and merged[0].weights == (0.4, 0.8)
    for branch, original in zip(merged[0].branches, adapters):
        masked = merge_task_vectors([{"B": np.asarray(original[0].B[...])}], "breadcrumbs", dict(options, alpha=1.0))
        np.testing.assert_allclose(np.asarray(branch.B[...]), masked["B"])
        np.testing.assert_array_equal(np.asarray(branch.A[...]), np.asarray(original[0].A[...]))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)), jnp.float32)
    want = adapters[0][0].base(x) + sum(w * b.delta(x) for w, b in zip((0.4, 0.8), merged[0].branches))
    np.testing.assert_allclose(np.asarray(merged[0](x)), np.asarray(want), atol=1e-5)
    for method, opts in (("ties", TIES), ("dare", dict(DARE, combine="ties"))):
        with pytest.raises(ValueError, match="share none") as info:
            merge_flylora_adapters(_flylora_layer(1), states, method=method, options=opts)
        assert "\n" not in str(info.value)


def test_flylora_with_a_shared_a_merges_b_by_any_method():
    adapters = [_flylora_layer(1), _flylora_layer(1)]
    adapters[1][0].B[...] = jnp.asarray(np.random.default_rng(11).normal(size=adapters[1][0].B[...].shape), jnp.float32)
    states = [adapter_state(m) for m in adapters]
    merged = merge_flylora_adapters(_flylora_layer(1), states, shared_a=True, method="ties", options=TIES)
    want = merge_task_vectors([{"B": np.asarray(m[0].B[...])} for m in adapters], "ties", TIES)["B"]
    assert isinstance(merged[0], FlyLoRA)
    np.testing.assert_allclose(np.asarray(merged[0].B[...]), want, atol=1e-6)

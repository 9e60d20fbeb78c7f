"""Specification of iterative MaskGIT decoding and classifier-free guidance.

A small model (width 32, 2 layers; numpy-initialised weights) over video 3 x 4 x 4
(2^6 ids in 2 groups) and audio 8 frames x 2 RVQ levels of 16 codes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen.generative import sampling, tasks
from mmgen.generative import transformer as tr

B = 2
V_MASK, A_MASK = 2**6, 16
# small_transformer_config (one tiny layout for the transformer and sampling specs): tests/conftest.py




def numpy_initialised(cfg, seed=0):
    """The model with weights from a seeded numpy generator (no per-shape init compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def init(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def random_tokens(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "video": jnp.asarray(rng.integers(0, 2**6, (B, 3, 4, 4)), jnp.int32),
        "audio": jnp.asarray(rng.integers(0, 16, (B, 8, 2)), jnp.int32),
    }


@pytest.fixture(scope="module")
def model(small_transformer_config):
    return numpy_initialised(small_transformer_config())


@pytest.fixture(scope="module")
def prefix_frame_prediction(model):
    cond = random_tokens(1)["video"]
    out, trace = sampling.sample(
        model, "frame_prediction", {"video": cond}, jax.random.key(0), steps=5, mode="prefix", return_trace=True
    )
    return cond, jax.device_get(out), jax.device_get(trace)


def test_prefix_sampling_returns_the_condition_tokens_unchanged(prefix_frame_prediction):
    cond, out, _ = prefix_frame_prediction
    assert set(out) == {"video"}  # audio is absent from frame prediction
    # 40% of 3 latent frames -> the first frame is given
    np.testing.assert_array_equal(out["video"][:, :1], np.asarray(cond)[:, :1])
    generated = out["video"][:, 1:]
    assert generated.min() >= 0 and generated.max() < 2**6  # real ids, no [MASK] left


def test_masked_count_follows_the_cosine_schedule_and_reaches_zero(prefix_frame_prediction):
    _, _, trace = prefix_frame_prediction
    assert trace["initial_masked"].tolist() == [32, 32]  # 2 of 3 frames x 16
    # floor(32 * cos(pi/2 * k/5)) for k = 1..4, then nothing left
    expected = [30, 25, 18, 9, 0]
    assert [math.floor(32 * math.cos(math.pi / 2 * k / 5)) for k in range(1, 5)] == expected[:4]
    for b in range(B):
        assert trace["num_masked"][:, b].tolist() == expected
    assert sampling.decoding_mask_counts(32, 5) == expected


def test_choice_noise_is_annealed_as_the_released_maskgit_decoder_over_12_steps(model):
    # Released MaskGIT / MAGVIT decoders (parallel_decode.py): at step t of T the Gumbel
    # noise on the confidence is scaled by choice_temperature * (1 - (t + 1) / T).
    steps, temp = 12, 4.5
    golden = [temp * (1.0 - (t + 1) / steps) for t in range(steps)]
    assert golden[-1] == 0.0 and golden[0] == pytest.approx(4.125)
    cond = random_tokens(4)["video"]
    _, trace = sampling.sample(model, "frame_prediction", {"video": cond}, jax.random.key(3), steps=steps,
                               mode="prefix", choice_temperature=temp, return_trace=True)
    np.testing.assert_allclose(np.asarray(trace["noise_scale"]), golden, rtol=1e-6, atol=1e-6)
    # the earlier form, kept as an option: one step more noise, never noise-free
    earlier = [float(sampling.choice_noise_scale(t, steps, temp, "step_start")) for t in range(steps)]
    np.testing.assert_allclose(earlier, [temp * (1.0 - t / steps) for t in range(steps)], rtol=1e-6)
    assert [float(sampling.choice_noise_scale(t, steps, temp)) for t in range(steps)] == pytest.approx(golden)
    with pytest.raises(ValueError, match="choice_anneal 'late' is unknown"):
        sampling.sample(model, "frame_prediction", {"video": cond}, jax.random.key(3), choice_anneal="late")


def test_at_least_one_token_is_revealed_per_step_when_steps_exceed_the_schedule():
    # 3 masked tokens over 5 steps: the schedule alone would keep 2 masked twice.
    assert sampling.decoding_mask_counts(3, 5) == [2, 1, 0, 0, 0]
    for schedule in ("linear", "square", "exp"):
        counts = sampling.decoding_mask_counts(100, 12, schedule)
        assert counts[-1] == 0 and all(a > b for a, b in zip([100] + counts, counts) if a > 0)


def test_guided_logits_follow_cond_plus_scale_times_difference(model):
    tokens = random_tokens(2)
    ids = jnp.full((B,), tasks.task_id("audio_to_video"), jnp.int32)
    labels = jnp.asarray([1, 3], jnp.int32)
    uncond_labels = jnp.full((B,), model.uncond_label, jnp.int32)
    cond_inputs = {"video": jnp.full_like(tokens["video"], V_MASK), "audio": tokens["audio"]}
    uncond_inputs = {"video": cond_inputs["video"], "audio": jnp.full_like(tokens["audio"], A_MASK)}

    @nnx.jit
    def run(model):
        scale0 = sampling.guided_logits(model, cond_inputs, ids, labels, uncond_inputs, uncond_labels, 0.0)
        scale2 = sampling.guided_logits(model, cond_inputs, ids, labels, uncond_inputs, uncond_labels, 2.0)
        cond = model(cond_inputs, ids, {"label": labels})
        uncond = model(uncond_inputs, ids, {"label": uncond_labels})
        return scale0, scale2, cond, uncond

    scale0, scale2, cond, uncond = run(model)
    for m in ("video", "audio"):
        np.testing.assert_allclose(scale0[m], cond[m], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scale2[m], 3 * cond[m] - 2 * uncond[m], rtol=1e-4, atol=1e-4)
    assert not np.allclose(cond["video"], uncond["video"], atol=1e-3)  # the audio condition matters


def test_commit_sampling_with_guidance_decodes_everything_and_compiles_once(model):
    cond = random_tokens(3)
    before = sampling._decode._cache_size()
    runs = [
        sampling.sample(
            model, "audio_video_continuation", cond, jax.random.key(seed), steps=4, guidance=scale, return_trace=True
        )
        for seed, scale in ((0, 1.5), (1, 3.0))
    ]
    assert sampling._decode._cache_size() == before + 1  # same task and shapes: one compile
    for out, trace in runs:
        assert out["video"].shape == (B, 3, 4, 4) and out["audio"].shape == (B, 8, 2)
        assert int(out["video"].max()) < V_MASK and int(out["audio"].max()) < A_MASK
        # commit mode decodes (refines) the condition region too: every element starts masked
        assert trace["initial_masked"].tolist() == [48 + 16] * B
        assert trace["num_masked"][-1].tolist() == [0] * B
    assert not np.array_equal(runs[0][0]["video"], runs[1][0]["video"])


def test_tasks_over_the_same_modalities_share_one_compile_and_keep_their_own_regions(model):
    cond = random_tokens(4)
    before = sampling._decode._cache_size()
    traces = {task: jax.device_get(sampling.sample(model, task, cond, jax.random.key(0), steps=3, mode="prefix",
                                                   return_trace=True)[1])
              for task in ("frame_prediction", "outpainting_central", "inpainting_central")}
    assert sampling._decode._cache_size() == before + 1  # video only, same shapes: one compile for the three
    regions = {task: np.asarray(trace["region"]["video"]) for task, trace in traces.items()}
    for task, region in regions.items():  # the task index, now data, still picks the task's region
        region_key = jax.random.split(jax.random.key(0))[1]  # as sample() derives it
        want = tasks.condition_region(jnp.full((B,), tasks.get_task(task).index, jnp.int32), "video", (3, 4, 4),
                                      region_key)
        assert np.array_equal(region, np.asarray(want)), task
    assert not np.array_equal(regions["frame_prediction"], regions["outpainting_central"])


def test_bad_sampling_requests_fail_before_compiling(model, small_transformer_config):
    with pytest.raises(ValueError, match="unknown task 'outpaint'.*outpainting_central"):
        sampling.sample(model, "outpaint", {}, jax.random.key(0), batch_size=2)
    with pytest.raises(ValueError, match=r"conditions on \['video'\]"):
        sampling.sample(model, "frame_prediction", {}, jax.random.key(0), batch_size=2)
    video_only = nnx.eval_shape(lambda: tr.MaskedTransformer(small_transformer_config(audio_len=0), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"needs \['audio'\]"):
        sampling.sample(video_only, "audio_video", {}, jax.random.key(0), batch_size=2)

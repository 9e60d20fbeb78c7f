"""Specification of the task registry, COMMIT condition clips and training masks.

Latent grid in most tests: video 5 x 4 x 4 (17 x 8 x 8 pixels, 4x temporal and
2x spatial), audio 8 frames x 2 RVQ levels. Every task's training mask is checked
against its definition: condition region shown, targets masked, absent modality
dropped. The golden tests restate the formulas of MAGVIT's released code
(google-research/magvit ``videogvt/train_lib/cond_utils.py`` and ``mask_utils.py``)
in numpy and compare; they never call mmgen to get the expected values.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen.generative import masking, tasks
from mmgen.generative.transformer import ModalitySpec, model_config

GRID = (5, 4, 4)
AUDIO = 8
V_VOCAB, A_VOCAB = 64, 16
UNCOND = 10

EXPECTED_NAMES = (
    "class_conditional",
    "unconditional",
    "frame_prediction",
    "frame_interpolation",
    "outpainting_central",
    "outpainting_horizontal",
    "outpainting_vertical",
    "outpainting_dynamic",
    "inpainting_central",
    "inpainting_dynamic",
    "audio_to_video",
    "video_to_audio",
    "audio_video",
    "audio_continuation",
    "audio_video_continuation",
)


def magvit_video_mask(name, t, h, w, frames=(0, 0)):
    """bool ``[t, h, w]``: the condition mask of a MAGVIT video task, from cond_utils' formulas.

    ``frames``: (given leading, given trailing) frames of frame prediction / interpolation
    on this grid (MAGVIT's cond_frames / cond_latent_frames, a config value).
    """
    m = np.zeros((t, h, w), bool)
    start = np.round(np.linspace(0, w // 2, t)).astype(int)  # dynamic_*: left edge per frame
    if name == "frame_prediction":
        m[: frames[0]] = True
    elif name == "frame_interpolation":
        m[: frames[0]] = True
        m[t - frames[1]:] = True
    elif name == "outpainting_central":  # rectangle_central
        m[:, h // 4 : h * 3 // 4, w // 4 : w * 3 // 4] = True
    elif name == "outpainting_horizontal":  # rectangle_horizontal
        m[:, h // 4 : h * 3 // 4, :] = True
    elif name == "outpainting_vertical":  # rectangle_vertical
        m[:, :, w // 4 : w * 3 // 4] = True
    elif name == "outpainting_dynamic":  # dynamic_vertical
        for f in range(t):
            m[f, :, start[f] : start[f] + w // 2] = True
    elif name == "inpainting_central":  # rectangle_central, inverted
        m[:] = True
        m[:, h // 4 : h * 3 // 4, w // 4 : w * 3 // 4] = False
    elif name == "inpainting_dynamic":  # dynamic_central
        m[:] = True
        for f in range(t):
            m[f, :, start[f] : start[f] + w // 2] = False
        m[:, : h // 4] = True
        m[:, h * 3 // 4 :] = True
    else:
        assert name in ("class_conditional", "unconditional"), name
    return m


def _video(kind):
    r = np.zeros(GRID, bool)
    if kind == "all":
        r[:] = True
    elif kind == "first2":
        r[:2] = True
    elif kind == "first_last":
        r[0] = r[-1] = True
    elif kind == "central":
        r[:, 1:3, 1:3] = True
    elif kind == "strip":  # central vertical strip (columns 1..2)
        r[:, :, 1:3] = True
    elif kind == "band":  # central horizontal band (rows 1..2)
        r[:, 1:3, :] = True
    elif kind in ("outpainting_dynamic", "inpainting_dynamic"):
        r[:] = magvit_video_mask(kind, *GRID)
    elif kind == "around_central":
        r[:] = True
        r[:, 1:3, 1:3] = False
    return r


def _audio(first):
    r = np.zeros((AUDIO, 2), bool)
    r[:first] = True
    return r


# task -> (video region or None when absent, audio region or None, uses class label)
EXPECTED = {
    "class_conditional": (_video("none"), None, True),
    "unconditional": (_video("none"), None, False),
    "frame_prediction": (_video("first2"), None, False),
    "frame_interpolation": (_video("first_last"), None, False),
    "outpainting_central": (_video("central"), None, False),
    "outpainting_horizontal": (_video("band"), None, False),  # MAGVIT rectangle_horizontal
    "outpainting_vertical": (_video("strip"), None, False),  # MAGVIT rectangle_vertical
    "outpainting_dynamic": (_video("outpainting_dynamic"), None, False),
    "inpainting_central": (_video("around_central"), None, False),
    "inpainting_dynamic": (_video("inpainting_dynamic"), None, False),
    "audio_to_video": (_video("none"), _audio(AUDIO), False),
    "video_to_audio": (_video("all"), _audio(0), False),
    "audio_video": (_video("none"), _audio(0), False),
    "audio_continuation": (None, _audio(4), False),
    "audio_video_continuation": (_video("first2"), _audio(2), False),  # 30% of 8 audio frames
}


def _cfg():
    cfg = model_config("tiny")
    cfg.video_grid, cfg.video_vocab = GRID, V_VOCAB
    cfg.audio_len, cfg.audio_levels, cfg.audio_vocab = AUDIO, 2, A_VOCAB
    cfg.num_classes = UNCOND
    return cfg


N = len(EXPECTED_NAMES)  # every test batch has this many examples, so compiled builders are shared


@functools.partial(jax.jit, static_argnames=("mode",))
def _build(tokens, task_ids, cond, labels, ratio, cfg_dropout, region_rng, *, mode):
    return masking.make_training_example(
        _cfg(), tokens, task_ids, jax.random.key(0), labels=labels, condition_tokens=cond, region_rng=region_rng,
        mode=mode, ratio=ratio, cfg_dropout=cfg_dropout,
    )


def _tokens(seed=0):
    key = jax.random.key(seed)
    return {
        "video": jax.random.randint(jax.random.fold_in(key, 1), (N, *GRID), 0, V_VOCAB),
        "audio": jax.random.randint(jax.random.fold_in(key, 2), (N, AUDIO, 2), 0, A_VOCAB),
    }


def _condition_tokens(tokens):
    # Condition-clip tokens differ from the ground truth, so COMMIT's substitution is visible.
    return {m: (t + 1) % (V_VOCAB if m == "video" else A_VOCAB) for m, t in tokens.items()}


LABELS = jnp.arange(N, dtype=jnp.int32) % UNCOND


@pytest.fixture(scope="module")
def all_tasks_batch():
    """One example per task (row i = task i), every target masked (ratio 1), both modes."""
    tokens = _tokens()
    cond = _condition_tokens(tokens)
    ids = jnp.arange(N, dtype=jnp.int32)
    args = (tokens, ids, cond, LABELS, jnp.ones(N), 0.0, jax.random.key(7))
    prefix, commit = _build(*args, mode="prefix"), _build(*args, mode="commit")
    return jax.device_get((tokens, cond, LABELS, prefix, commit))


def test_registry_has_exactly_the_fifteen_tasks_in_order():
    assert tasks.TASK_NAMES == EXPECTED_NAMES
    assert [tasks.task_id(n) for n in EXPECTED_NAMES] == list(range(15))


def test_unknown_task_is_a_value_error_listing_the_valid_names():
    with pytest.raises(ValueError, match="unknown task 'frame_predict'.*frame_prediction.*audio_video_continuation"):
        tasks.get_task("frame_predict")
    with pytest.raises(ValueError, match="valid tasks"):
        tasks.sample_task_ids(jax.random.key(0), 4, {"inpaint": 1.0})


def _rectangle(mask2d):
    """(rows, cols) if the True cells of a 2D mask form one filled rectangle, else None."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    return (h, w) if rows.size == h * w else None


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_training_mask_matches_the_task_definition(all_tasks_batch, name):
    tokens, cond, labels, prefix, commit = all_tasks_batch
    i = tasks.task_id(name)
    video_expected, audio_expected, class_label = EXPECTED[name]
    mask_id = {"video": V_VOCAB, "audio": A_VOCAB}

    assert prefix.labels[i] == (labels[i] if class_label else UNCOND)
    for m, expected in (("video", video_expected), ("audio", audio_expected)):
        x, w = prefix.inputs[m][i], prefix.weights[m][i]
        if expected is None:  # absent modality: dropped from attention and the loss
            assert not prefix.present[m][i] and not commit.present[m][i]
            assert np.all(w == 0) and np.all(commit.weights[m][i] == 0)
            continue
        assert prefix.present[m][i]
        region = np.asarray(x != mask_id[m])  # what the prefix input still shows
        np.testing.assert_array_equal(region, expected, err_msg=f"{name} {m} condition region")
        # prefix: the region shows the real tokens, every target is [MASK] and scored
        # (loss_on="all" scores the maskable elements: the targets)
        np.testing.assert_array_equal(x[expected], tokens[m][i][expected])
        np.testing.assert_array_equal(w, (~expected).astype(np.float32))
        # commit: every element masked; the region shows the condition clip's tokens
        xc = commit.inputs[m][i]
        np.testing.assert_array_equal(xc[expected], cond[m][i][expected])
        assert np.all(xc[~expected] == mask_id[m])
        assert np.all(commit.weights[m][i] == 1.0)


def test_mask_count_is_floor_of_ratio_times_maskable_elements_at_least_one():
    # MAGVIT's random_mask: num_masked = clip(floor(num_maskable * mask_ratio), 1, num_maskable),
    # in float32 like the released code.
    names = ["frame_prediction", "unconditional", "audio_video"] * 5
    maskable = [48, 80, 80 + 16] * 5  # prefix: 3 of 5 frames x 16; all video; video + 8 x 2 audio
    rs = [0.05] * 3 + [0.3] * 3 + [0.99] * 3 + [1e-4] * 3 + [1.0] * 3
    ids = jnp.asarray([tasks.task_id(n) for n in names], jnp.int32)
    tokens = _tokens(1)
    ratio = jnp.asarray(rs, jnp.float32)
    ex = jax.device_get(_build(tokens, ids, tokens, LABELS, ratio, 0.0, jax.random.key(2), mode="prefix"))
    counts = ex.masked["video"].sum(axis=(1, 2, 3)) + ex.masked["audio"].sum(axis=(1, 2))
    golden = [max(1, int(np.floor(np.float32(r) * np.float32(n)))) for r, n in zip(rs, maskable)]
    assert golden[:9] == [2, 4, 4, 14, 24, 28, 47, 79, 95]
    assert counts.tolist() == golden
    # frame prediction never masks the given frames (prefix mode)
    assert not np.any(ex.masked["video"][::3, :2])
    # the earlier rule, kept as mask_count="ceil"
    ceil = masking.mask_count(jnp.asarray(rs[:9], jnp.float32), jnp.asarray(maskable[:9]), "ceil")
    assert ceil.tolist() == [3, 4, 5, 15, 24, 29, 48, 80, 96]
    with pytest.raises(ValueError, match="mask_count='round'"):
        masking.mask_count(ratio, jnp.asarray(maskable), "round")


def test_loss_weights_per_token_class_follow_magvit_mask_refine_recons():
    # MAGVIT's multi-task config sets weight_mode="mask+refine+recons": with cond->input
    # (COMMIT) every token is scored (masked, refined condition, reconstructed); with
    # input->input (prefix) every maskable token, i.e. not the condition region.
    names = ["frame_prediction", "audio_continuation", "audio_video_continuation"] * 5
    ids = jnp.asarray([tasks.task_id(n) for n in names], jnp.int32)
    tokens = _tokens(3)
    cond = _condition_tokens(tokens)
    args = (tokens, ids, cond, LABELS, jnp.full(N, 0.5), 0.0, jax.random.key(4))
    for mode in ("commit", "prefix"):
        ex = jax.device_get(_build(*args, mode=mode))
        for m in ("video", "audio"):
            present = np.asarray(ex.present[m])
            expand = (slice(None),) + (None,) * (ex.masked[m].ndim - 1)
            region = np.stack([EXPECTED[n][0 if m == "video" else 1] if EXPECTED[n][0 if m == "video" else 1]
                               is not None else np.zeros(ex.masked[m].shape[1:], bool) for n in names])
            masked = np.asarray(ex.masked[m])
            classes = {
                "masked target": masked & ~region,
                "masked condition (refined)": masked & region,
                "unmasked target (reconstructed)": ~masked & ~region,
                "unmasked condition": ~masked & region,
            }
            golden = {  # weight of each class, present modality
                "commit": {"masked target": 1, "masked condition (refined)": 1,
                           "unmasked target (reconstructed)": 1, "unmasked condition": 1},
                "prefix": {"masked target": 1, "masked condition (refined)": None,
                           "unmasked target (reconstructed)": 1, "unmasked condition": 0},
            }[mode]
            w = np.asarray(ex.weights[m])
            assert np.all(w[~present] == 0), f"{mode} {m}: an absent modality is never scored"
            for cls, sel in classes.items():
                sel = sel & present[expand]
                if golden[cls] is None:  # prefix never masks the condition region
                    assert not sel.any()
                    continue
                assert sel.any(), f"{mode} {m} {cls}: the batch has no such element"
                assert np.all(w[sel] == golden[cls]), f"{mode} {m} {cls}"
    # the other rules, kept as options: masked only (MAGVIT "mask+refine"); masked + region (mmgen)
    masked = jnp.asarray([[True, True, False, False, False]])
    region = jnp.asarray([[False, True, True, False, False]])
    present = jnp.asarray([[True, True, True, True, False]])
    maskable = jnp.asarray([[True, False, False, True, True]])  # prefix: the region is not maskable
    w = {k: np.asarray(masking.loss_weights(masked, region, present, k, maskable)).tolist() for k in masking.LOSS_ON}
    assert w == {"all": [[1, 0, 0, 1, 0]], "masked": [[1, 1, 0, 0, 0]], "masked+cond": [[1, 1, 1, 0, 0]]}


def test_cfg_dropout_replaces_label_and_condition_tokens():
    names = ["class_conditional", "frame_prediction", "audio_to_video"] * 5
    ids = jnp.asarray([tasks.task_id(n) for n in names], jnp.int32)
    tokens = {"video": jnp.ones((N, *GRID), jnp.int32), "audio": jnp.ones((N, AUDIO, 2), jnp.int32)}
    cond = {m: t + 1 for m, t in tokens.items()}
    args = (tokens, ids, cond, LABELS, jnp.ones(N))
    kept = jax.device_get(_build(*args, 0.0, jax.random.key(0), mode="commit"))
    dropped = jax.device_get(_build(*args, 1.0, jax.random.key(0), mode="commit"))
    assert kept.labels[:3].tolist() == [0, UNCOND, UNCOND]
    assert dropped.labels.tolist() == [UNCOND] * N
    assert np.all(kept.inputs["video"][1, :2] == 2)  # condition tokens shown
    assert np.all(kept.inputs["audio"][2] == 2)
    assert np.all(dropped.inputs["video"][1] == V_VOCAB)  # ... replaced by [MASK]
    assert np.all(dropped.inputs["audio"][2] == A_VOCAB)


def test_loss_on_selects_all_masked_or_masked_and_condition_elements():
    masked = jnp.asarray([[True, False, False, False]])
    region = jnp.asarray([[False, False, True, True]])
    present = jnp.asarray([[True, True, True, False]])
    w = {k: np.asarray(masking.loss_weights(masked, region, present, k)).tolist() for k in masking.LOSS_ON}
    assert w == {"masked": [[1, 0, 0, 0]], "masked+cond": [[1, 0, 1, 0]], "all": [[1, 1, 1, 0]]}
    with pytest.raises(ValueError, match="loss_on"):
        masking.loss_weights(masked, region, present, "cond")


def test_mask_schedules_go_from_one_to_zero():
    u = jnp.linspace(0.0, 1.0, 11)
    for schedule in masking.SCHEDULES:
        r = np.asarray(masking.mask_ratio(u, schedule, total=256))
        assert r[-1] == pytest.approx(0.0, abs=1e-6)
        assert np.all(np.diff(r) < 0), schedule
        assert r[0] == pytest.approx(1.0, abs=1e-6) if schedule != "exp" else r[0] == pytest.approx(1 - 1 / 256)
    np.testing.assert_allclose(masking.mask_ratio(u), np.cos(np.pi / 2 * np.asarray(u)), atol=1e-6)
    np.testing.assert_allclose(masking.mask_ratio(0.5, "square"), 0.75)
    with pytest.raises(ValueError, match="exp schedule needs"):
        masking.mask_ratio(u, "exp")


def test_weighted_task_sampling_follows_the_weights():
    ids = np.asarray(tasks.sample_task_ids(jax.random.key(0), 4000, {"frame_prediction": 3.0, "audio_video": 1.0}))
    assert set(np.unique(ids)) == {tasks.task_id("frame_prediction"), tasks.task_id("audio_video")}
    assert np.mean(ids == tasks.task_id("frame_prediction")) == pytest.approx(0.75, abs=0.03)


def test_causal_tokenizer_frame_mapping():
    assert tasks.pixel_frames(5) == 17 and tasks.pixel_frames(5, temporal_factor=2) == 9
    assert [int(tasks.latent_frame_of_pixel(f)) for f in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


_condition_video = jax.jit(tasks.build_condition_video, static_argnames=("latent_grid", "temporal_factor", "fill"))
_condition_region = jax.jit(tasks.condition_region, static_argnames=("modality", "grid"))


def _clip(n):
    # Frame f, pixel (y, x) holds a distinct value so copies are recognisable.
    f, y, x = np.meshgrid(np.arange(17), np.arange(8), np.arange(8), indexing="ij")
    v = (f * 64 + y * 8 + x) / 2000.0
    return jnp.asarray(np.broadcast_to(v[None, ..., None], (n, 17, 8, 8, 3)), jnp.float32)


def test_condition_clips_repeat_the_last_kept_frame_and_pad_the_rest():
    names = ["frame_prediction", "frame_interpolation", "outpainting_central", "inpainting_central", "audio_video"]
    ids = jnp.asarray([tasks.task_id(n) for n in names])
    video = _clip(len(names))
    clip = np.asarray(_condition_video(video, ids, jax.random.key(0), latent_grid=GRID, fill=-1.0))
    v = np.asarray(video)
    # frame prediction: latent frames 0-1 = pixel frames 0-4 kept, then frame 4 repeated
    np.testing.assert_array_equal(clip[0, :5], v[0, :5])
    np.testing.assert_array_equal(clip[0, 5:], np.broadcast_to(v[0, 4], clip[0, 5:].shape))
    # interpolation: frame 0 kept, repeated over 1..12, last latent frame (pixels 13-16) kept
    np.testing.assert_array_equal(clip[1, 1:13], np.broadcast_to(v[1, 0], clip[1, 1:13].shape))
    np.testing.assert_array_equal(clip[1, 13:], v[1, 13:])
    # outpainting: central 4 x 4 pixels (latent 1..2 x 2 pixels) kept, the rest padded
    np.testing.assert_array_equal(clip[2, :, 2:6, 2:6], v[2, :, 2:6, 2:6])
    assert np.all(clip[2, :, :2] == -1.0) and np.all(clip[2, :, :, 6:] == -1.0)
    # inpainting: the central box is padded, everything around it kept
    assert np.all(clip[3, :, 2:6, 2:6] == -1.0)
    np.testing.assert_array_equal(clip[3, :, :2], v[3, :, :2])
    # a task without a video condition gives an all-padding clip
    assert np.all(clip[4] == -1.0)
    with pytest.raises(ValueError, match="does not map onto"):
        tasks.build_condition_video(video[:, :16], ids, jax.random.key(0), GRID)


def test_condition_masks_of_the_ten_magvit_video_tasks_in_pixels_and_latents():
    """A 17 x 64 x 64 clip and its 5 x 16 x 16 latent grid (MAGVIT-v2's 4x causal tokenizer)."""
    latent_grid, pixel_grid = (5, 16, 16), (17, 64, 64)
    names = EXPECTED_NAMES[:10]
    assert all(tasks.get_task(n).audio.kind == "absent" for n in names)
    # given (leading, trailing) frames: mmgen's 40% / 20% + 20% of 5 latent frames; the
    # pixel frames are those the causal tokenizer maps to them (frame 0 -> latent 0,
    # frames 4(i-1)+1 .. 4i -> latent i)
    frames = {"frame_prediction": ((2, 0), (5, 0)), "frame_interpolation": ((1, 1), (1, 4))}
    ids = jnp.asarray([tasks.task_id(n) for n in names])
    latent = np.asarray(_condition_region(ids, "video", latent_grid))
    pixel = np.asarray(jax.jit(tasks.pixel_condition_region, static_argnums=(1, 2))(ids, latent_grid, pixel_grid))
    for i, name in enumerate(names):
        latent_frames, pixel_frames = frames.get(name, ((0, 0), (0, 0)))
        np.testing.assert_array_equal(latent[i], magvit_video_mask(name, *latent_grid, latent_frames), err_msg=name)
        np.testing.assert_array_equal(pixel[i], magvit_video_mask(name, *pixel_grid, pixel_frames), err_msg=name)
    # The sweeps are MAGVIT's: pixel left edges 0, 2, ..., 32 over 17 frames, latent 0, 2, 4, 6, 8.
    dyn = names.index("outpainting_dynamic")
    assert [int(np.argmax(pixel[dyn, f, 0])) for f in range(17)] == list(range(0, 33, 2))
    assert [int(np.argmax(latent[dyn, f, 0])) for f in range(5)] == [0, 2, 4, 6, 8]
    # ... deterministic: no rng needed, and the clip keeps exactly the pixel mask on every
    # frame that keeps something (the others repeat the last such frame, tested above)
    video = jnp.full((len(names), *pixel_grid, 3), 0.5, jnp.float32)
    clip = np.asarray(_condition_video(video, ids, None, latent_grid=latent_grid, fill=-1.0))
    for i, name in enumerate(names):
        kept = pixel[i].any(axis=(1, 2))
        np.testing.assert_array_equal((clip[i, kept, ..., 0] != -1.0), pixel[i, kept], err_msg=name)
        assert kept.any() == (name not in ("class_conditional", "unconditional"))


def test_random_moving_boxes_stay_available_as_an_option(monkeypatch):
    # motion="random" (mmgen's earlier dynamic boxes): drawn from the rng, one size on
    # every frame, and the pixels of the condition clip follow the latent region.
    role = dataclasses.replace(tasks.get_task("inpainting_dynamic").video, motion="random")
    registry = tuple(dataclasses.replace(t, video=role) if t.name == "inpainting_dynamic" else t
                     for t in tasks._REGISTRY)
    monkeypatch.setattr(tasks, "_REGISTRY", registry)
    tasks._role_table.cache_clear()
    try:
        ids = jnp.full((5,), tasks.task_id("inpainting_dynamic"))
        region = np.asarray(tasks.condition_region(ids, "video", GRID, jax.random.key(5)))
        clip = np.asarray(tasks.build_condition_video(_clip(5), ids, jax.random.key(5), GRID, fill=-1.0))
        padded_latent = (clip == -1.0)[:, ::4, ::2, ::2, 0]  # pixel frames 0,4,8,12,16 -> latent 0..4
        np.testing.assert_array_equal(padded_latent, ~region)
        other = np.asarray(tasks.condition_region(ids, "video", GRID, jax.random.key(6)))
        assert not np.array_equal(region, other)
        for b in range(5):
            sizes = {_rectangle(~region[b, t]) for t in range(GRID[0])}
            assert len(sizes) == 1 and None not in sizes
        with pytest.raises(ValueError, match="need an rng"):
            tasks.condition_region(ids, "video", GRID)
    finally:
        monkeypatch.undo()
        tasks._role_table.cache_clear()


def test_condition_audio_keeps_the_given_frames_and_silences_the_rest():
    ids = jnp.asarray([tasks.task_id("audio_continuation"), tasks.task_id("video_to_audio")])
    audio = jnp.ones((2, 80))
    out = np.asarray(tasks.build_condition_audio(audio, ids, AUDIO))
    np.testing.assert_array_equal(out[0], np.r_[np.ones(40), np.zeros(40)])
    assert np.all(out[1] == 0)


def test_label_smoothed_factorised_cross_entropy_value():
    spec = ModalitySpec("video", (1,), vocab=4, groups=2)  # 2 groups of 2
    logits = jnp.log(jnp.asarray([[[0.25, 0.75], [0.5, 0.5]]]))  # [1, G=2, v=2]
    token = jnp.asarray([1 + 2 * 0])  # digits (1, 0)
    ce = masking.token_cross_entropy(logits, token, spec, label_smoothing=0.1)
    nll = -np.log(0.75) - np.log(0.5)
    smooth = -(np.log(0.25) + np.log(0.75)) / 2 - np.log(0.5)
    assert float(ce[0]) == pytest.approx(0.9 * nll + 0.1 * smooth, rel=1e-6)

"""Specification of the generative trainer (mmgen/families/generative.py) and its configs.

Tiny shapes: a 1-layer transformer of width 32 over the tiny tokenizers' layout
(video 3x8x8 of 1024 ids, audio 57 frames x 4 RVQ levels of 256). Tokenizer
workdirs hold numpy-initialised weights (no tokenizer training compiles).
"""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen import config as config_lib
from mmgen.data import pipeline
from mmgen.errors import UserError
from mmgen.families import generative as gen
from mmgen.generative import tasks as tasks_lib
from mmgen.generative import tokens
from mmgen.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "generative", "multitask.py")
# generative_config, write_numpy_initialised, data_dir and tokenizers: tests/conftest.py


# ---------------------------------------------------------------- configs
def test_tiny_layout_is_the_tiny_tokenizers_and_large_sizes_use_magvit_v2():
    tiny = config_lib.load_config(f"{CONFIG}:tiny")
    assert tiny.family == "generative" and tiny.data_source == "tokenizers"
    assert tuple(tiny.model.video_grid) == (3, 8, 8) and tiny.model.video_vocab == 1024
    assert (tiny.model.audio_len, tiny.model.audio_levels, tiny.model.audio_vocab) == (57, 4, 256)
    assert (tiny.optimizer.name, tiny.optimizer.b1, tiny.optimizer.b2) == ("adamw", 0.9, 0.96)
    assert (tiny.optimizer.weight_decay, tiny.optimizer.grad_clip) == (0.045, 1.0)
    assert set(tokens.task_weights(tiny)) == set(tasks_lib.TASK_NAMES)  # every task trains
    for size, (depth, width) in {"B": (12, 768), "L": (24, 1024), "XL": (20, 2048)}.items():
        cfg = config_lib.load_config(f"{CONFIG}:{size}")
        assert (cfg.model.depth, cfg.model.width) == (depth, width)
        assert tuple(cfg.model.video_grid) == (5, 16, 16)
        assert (cfg.model.video_vocab, cfg.model.video_vocab_groups) == (2**18, 2)
        assert (cfg.model.audio_len, cfg.model.audio_levels, cfg.model.audio_vocab) == (107, 4, 1024)
        assert (cfg.dataset.frames, cfg.dataset.resolution) == (17, 128)


def test_variant_options_for_ablations():
    prefix = config_lib.load_config(f"{CONFIG}:tiny,conditioning=prefix")
    assert prefix.conditioning == "prefix"
    single = config_lib.load_config(f"{CONFIG}:tiny,tasks=frame_prediction")
    assert tokens.task_weights(single) == {"frame_prediction": 1.0}
    video_only = config_lib.load_config(f"{CONFIG}:tiny,modalities=video")
    assert video_only.model.audio_len == 0
    assert all(tasks_lib.get_task(t).audio.kind == "absent" for t in tokens.task_weights(video_only))
    assert len(tokens.task_weights(video_only)) == 10
    random = config_lib.load_config(f"{CONFIG}:B,data_source=random_tokens")
    assert random.data_source == "random_tokens"
    with pytest.raises(UserError, match="unknown variant options"):
        config_lib.load_config(f"{CONFIG}:tiny,conditionning=prefix")
    with pytest.raises(UserError, match="frame_predictoin"):
        config_lib.load_config(f"{CONFIG}:tiny,tasks=frame_predictoin")


def test_agreement_config_is_the_gpu_run_and_fits_the_tiny_tokenizers(tokenizers, data_dir, tmp_path):
    from mmgen.data.builders import sources

    path = os.path.join(ROOT, "configs", "generative", "agreement.py")
    cfg = config_lib.load_config(path)
    assert (cfg.model.depth, cfg.model.width, cfg.model.dtype) == (8, 256, "bfloat16")
    assert (cfg.batch_size, cfg.total_steps, cfg.data_source) == (128, 8000, "token_cache")
    assert tokens.task_weights(cfg) == {"audio_to_video": 1.0, "video_to_audio": 1.0}
    builder = sources.make_config("moving_shapes_av", "tiny", pipeline.builder_overrides(cfg.dataset))
    assert (builder.num_train, builder.max_distractors, builder.background) == (12000, 0, "plain")
    tiny = config_lib.load_config(f"{path}:tiny", [f"dataset.data_dir={data_dir}",
                                                   f"tokenizers.video_workdir={tokenizers['video']}",
                                                   f"tokenizers.audio_workdir={tokenizers['audio']}",
                                                   f"token_cache={tmp_path}"])
    assert (tiny.model.depth, tiny.model.dtype) == (2, "float32")
    gen.validate(tiny)  # the token layout is the tiny tokenizers'; no cache yet is fine
    with pytest.raises(UserError, match="no variant 'huge'"):
        config_lib.load_config(f"{path}:huge")


def test_validate_names_the_mistake_in_one_line(tokenizers, data_dir, generative_config):
    gen.validate(generative_config(data_dir=data_dir, tokenizers=tokenizers))  # the tiny layout fits
    cases = [
        (generative_config(), "tokenizers.video_workdir is empty.*random_tokens"),
        (generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=["model.video_grid=(3, 4, 4)"]),
         r"3x8x8 tokens.*--config.model.video_grid=\(3, 8, 8\)"),
        (generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=["model.audio_vocab=1024"]),
         "256 codes per level.*--config.model.audio_vocab=256"),
        (generative_config("tiny,modalities=video", extra=["data_source='random_tokens'",
                                                            "task_weights.audio_to_video=1.0"]),
         "task 'audio_to_video' has weight 1 but needs"),
        (generative_config(extra=["data_source='random_tokens'", "conditioning='prefx'"]),
         "conditioning='prefx' is not one of commit, prefix"),
        (generative_config(extra=["data_source='random_tokens'", "model.scan_unroll=0"]),
         r"config.model.scan_unroll=0 must be an integer of at least 1"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match=message) as info:
            gen.validate(cfg)
        assert "\n" not in str(info.value)


def test_flops_and_tokens_per_example_count_the_whole_sequence(generative_config):
    cfg = generative_config(extra=["data_source='random_tokens'"])
    seq = 2 + 3 * 8 * 8 + 57  # task + condition tokens, video positions, audio frames (levels share one)
    assert gen.tokens_per_example(cfg) == seq
    from mmgen.generative.transformer import flops_per_token

    assert gen.flops_per_example(cfg) == pytest.approx(flops_per_token(cfg.model) * seq)


# ---------------------------------------------------------------- training
@pytest.mark.slow
def test_sharded_random_token_steps_fit_a_fixed_batch(generative_config):
    """8 fake devices (data 2 x fsdp 4): the loss on one repeated batch is finite and falls."""
    from mmgen.parallel import mesh as mesh_lib
    from mmgen.parallel import sharding as sharding_lib

    cfg = generative_config(extra=["data_source='random_tokens'", "mesh.data=2", "mesh.fsdp=4",
                                   "schedule.name='constant'", "optimizer.lr=3e-3", "total_steps=100"])
    gen.validate(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    graphdef, abstract = loop.abstract_state(gen.FAMILY, cfg)
    shardings = sharding_lib.state_shardings(abstract, mesh, tuple(tuple(r) for r in cfg.sharding_rules))
    state = loop.init_state(gen.FAMILY, cfg, mesh, shardings)
    batch = next(gen.make_data(cfg, split="train", train=True, seed=0, batch_size=8, process_index=0,
                               process_count=1))
    step = loop.make_train_step(gen.FAMILY, cfg, graphdef, shardings, loop.batch_shardings_for(batch, mesh), mesh)
    embed = state["model"]["token_embeddings"]["video"]["table"]["embedding"]
    assert embed.shape == (1024, 32) and embed.addressable_shards[0].data.shape == (1024, 8)  # embed over fsdp=4
    losses = []
    for _ in range(6):
        state, metrics = step(state, loop.global_batch(batch, mesh), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and np.isfinite(float(metrics["grad_norm"]))
    assert np.log(256) - 0.5 < losses[0] < np.log(1024) + 0.5, losses  # near chance at init
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.2, losses


def test_random_token_batches_follow_the_task_weights_and_resume(generative_config):
    cfg = generative_config("tiny,tasks=frame_prediction+audio_video", extra=["data_source='random_tokens'"])
    it = gen.make_data(cfg, split="train", train=True, seed=3, batch_size=64, process_index=0, process_count=1)
    first = next(it)
    assert set(np.unique(first["task_id"])) == {tasks_lib.task_id("frame_prediction"), tasks_lib.task_id("audio_video")}
    assert first["video_tokens"].max() < 1024 and first["audio_tokens"].max() < 256
    assert (first["region_key"] == first["region_key"][0]).all()
    saved = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    again = gen.make_data(cfg, split="train", train=True, seed=3, batch_size=64, process_index=0, process_count=1)
    again.set_state(saved)
    resumed = next(again)
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key])


@pytest.mark.slow
def test_token_batches_resume_exactly_and_carry_condition_tokens(tokenizers, data_dir, generative_config):
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers)
    make = lambda: gen.make_data(cfg, split="train", train=True, seed=0, batch_size=8, process_index=0,
                                 process_count=1)
    it = make()
    next(it)
    saved = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it) for _ in range(2)]
    again = make()
    again.set_state(saved)
    for want in expected:
        got = next(again)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    batch = expected[0]
    assert batch["video_tokens"].shape == (8, 3, 8, 8) and batch["audio_tokens"].shape == (8, 57, 4)
    ids, _ = tokens.draw_tasks(cfg, 0, 1, 8)
    np.testing.assert_array_equal(batch["task_id"], ids)
    # The causal tokenizers encode a kept prefix exactly as the clip: frame prediction keeps
    # latent frame 0, audio continuation the first half of the frames.
    for name, modality, kept in (("frame_prediction", "video", 1), ("audio_continuation", "audio", 28)):
        ids = np.full((8,), tasks_lib.task_id(name), np.int32)
        clips = {"video": np.random.default_rng(0).integers(0, 256, (8, 9, 32, 32, 3), dtype=np.uint8),
                 "audio": np.random.default_rng(1).uniform(-0.5, 0.5, (8, 18000)).astype(np.float32)}
        loaded = gen.load_tokenizers(cfg)
        out = tokens.tokenize_clips(cfg, {modality: loaded[modality]}, clips["video"], clips["audio"], ids,
                                 jax.random.key(0))
        tok, cond = out[f"{modality}_tokens"], out[f"{modality}_condition"]
        np.testing.assert_array_equal(cond[:, :kept], tok[:, :kept])
        assert (cond[:, kept + 1:] != tok[:, kept + 1:]).any()  # the rest is not the clip


def test_host_rows_of_condition_clips_match_the_global_batch():
    """A host building its rows of a global batch gets the global batch's dynamic boxes."""
    video = jax.random.uniform(jax.random.key(1), (8, 9, 16, 16, 3), minval=-1.0, maxval=1.0)
    ids = jnp.asarray([tasks_lib.task_id("inpainting_dynamic")] * 4 + [tasks_lib.task_id("outpainting_dynamic")] * 4)
    key = jax.random.key(7)
    whole = tokens.condition_video(video, ids, key, grid=(3, 4, 4), temporal_factor=4, start=0)
    rows = tokens.condition_video(video[4:], ids, key, grid=(3, 4, 4), temporal_factor=4, start=4)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(whole[4:]))
    # MAGVIT's dynamic tasks sweep deterministically: a host-local build agrees as well
    # (only tasks with motion="random" draw their box from the key).
    alone = tasks_lib.build_condition_video(video[4:], ids[4:], jax.random.key(8), (3, 4, 4))
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(whole[4:]))


@pytest.mark.slow
def test_loop_trains_saves_the_data_position_and_samples_at_eval(tokenizers, data_dir, tmp_path, generative_config,
                                                                event_summaries, check_gallery):
    """loop.run, 2 steps: metrics, the wrapper's position in the checkpoint, an mp4 + PNG from on_eval,
    its page and its pictures in TensorBoard."""
    workdir = str(tmp_path / "gen")
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers,
                            extra=["total_steps=2", "checkpoint_every=2", "eval_every=2", "eval_batches=1",
                                   "sampling.eval_tasks='frame_prediction'", "sampling.eval_num=1",
                                   "sampling.steps=2", "tensorboard=True"])
    out = loop.run(gen.FAMILY, cfg, workdir, devices=jax.devices()[:1])  # sharding: the test above
    assert out["step"] == 2 and np.isfinite(out["loss"]) and out["tokens_per_s"] > 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert any("eval/accuracy" in r for r in rows)
    with open(os.path.join(workdir, "checkpoints", "2", "data", "process_0-of-1.json")) as f:
        saved = json.load(f)
    assert saved["json"]["index"] == 2 and saved["json"]["clips"]  # resumes at batch 2 of the same stream
    names = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert names == ["index.html", "step000002_frame_prediction.gallery.json", "step000002_frame_prediction.png",
                     "step000002_frame_prediction_000.mp4", "step000002_frame_prediction_000_real.mp4",
                     "step000002_frame_prediction_tokens.npz"]
    check_gallery(os.path.join(workdir, "samples"))
    seen = event_summaries(os.path.join(workdir, "tensorboard"))  # the eval's pictures beside the scalars
    assert [(s, kind) for s, kind, _ in seen["samples/frame_prediction"]] == [(2, "image")]
    assert [(s, kind) for s, kind, _ in seen["samples/frame_prediction/video"]] == [(2, "image")]
    assert any(kind == "simple_value" for _, kind, _ in seen["loss"])


def test_example_batch_matches_the_random_token_batches(generative_config):
    cfg = generative_config(extra=["data_source='random_tokens'"])
    batch = next(gen.make_data(cfg, split="train", train=True, seed=0, batch_size=8, process_index=0,
                               process_count=1))
    shapes = gen.example_batch(cfg)
    assert {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in shapes.items()} == \
        {k: (v.shape, v.dtype) for k, v in batch.items()}


# ---------------------------------------------------------------- token cache
def test_token_cache_holds_the_tokenizers_tokens_and_serves_commit_tasks(tokenizers, data_dir, tmp_path, generative_config):
    from mmgen.generative import token_cache
    from mmgen.generative.generator import read_split

    cache = str(tmp_path / "cache")
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers,
                            extra=["data_source='token_cache'", f"token_cache={cache!r}"])
    for name in cfg.task_weights:
        cfg.task_weights[name] = 1.0 if name in ("video_to_audio", "audio_to_video", "audio_video") else 0.0
    gen.validate(cfg)
    make = lambda: gen.make_data(cfg, split="train", train=True, seed=0, batch_size=8, process_index=0,
                                 process_count=1)
    it = make()
    first = next(it)
    # The cache is every train clip, tokenized as the tokenizers do it with evaluation preprocessing.
    arrays = token_cache.load(cfg, "train", gen.load_tokenizers)
    clips = read_split(cfg, "train", 16)
    want = tokens.tokenize_clips(cfg, gen.load_tokenizers(cfg), clips["video"], clips["audio"], np.zeros(16, np.int32),
                              None, with_condition=False)
    assert len(arrays["label"]) == 16
    for m in ("video", "audio"):
        np.testing.assert_array_equal(arrays[f"{m}_tokens"], want[f"{m}_tokens"])
        # Whole-modality tasks: the condition clip is the clip, so are its tokens.
        np.testing.assert_array_equal(first[f"{m}_condition"], first[f"{m}_tokens"])
    rows = [np.flatnonzero((arrays["video_tokens"] == v).all(axis=(1, 2, 3)))[0] for v in first["video_tokens"]]
    assert len(set(rows)) == 8  # distinct clips
    np.testing.assert_array_equal(first["audio_tokens"], arrays["audio_tokens"][rows])  # pairs stay paired
    np.testing.assert_array_equal(first["label"], arrays["label"][rows])
    ids, _ = tokens.draw_tasks(cfg, 0, 0, 8)
    np.testing.assert_array_equal(first["task_id"], ids)
    # Resumable: the position is the batch index.
    saved = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    again = make()
    again.set_state(saved)
    got = next(again)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # Evaluation batches: a fixed number, from the start of the split.
    evals = list(gen.make_data(cfg, split="test", train=False, seed=0, batch_size=8, process_index=0,
                               process_count=1))
    assert len(evals) == cfg.eval_batches


def test_token_cache_refuses_partial_conditions_and_stale_caches(tokenizers, data_dir, tmp_path, generative_config):
    from mmgen.generative import token_cache

    cache = str(tmp_path / "cache")
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers,
                            extra=["data_source='token_cache'", f"token_cache={cache!r}"])
    with pytest.raises(UserError, match=r"cannot build COMMIT condition clips for \['frame_prediction'"):
        gen.validate(cfg)  # all 15 tasks, COMMIT
    assert not os.path.exists(cache)
    prefix = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=[
        "data_source='token_cache'", f"token_cache={cache!r}", "conditioning='prefix'"])
    gen.validate(prefix)  # prefix conditioning needs no condition clips
    token_cache.build(prefix, "test", gen.load_tokenizers)
    assert sorted(os.listdir(cache)) == ["test.json", "test.npz"]
    moved = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=[
        "data_source='token_cache'", f"token_cache={cache!r}", "conditioning='prefix'", "dataset.fps=4.0"])
    with pytest.raises(UserError, match="was made from other dataset"):
        token_cache.check(moved, "test")
    other_clips = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=[
        "data_source='token_cache'", f"token_cache={cache!r}", "conditioning='prefix'",
        "dataset.builder_overrides={'num_train': 16, 'num_test': 8, 'max_distractors': 0}"])
    with pytest.raises(UserError, match="was made from other dataset"):
        token_cache.check(other_clips, "test")
    with pytest.raises(UserError, match="needs config.token_cache"):
        token_cache.paths(generative_config(extra=["data_source='token_cache'"]), "train")


@pytest.mark.slow
def test_the_transformer_learns_to_read_one_modality_from_the_other(generative_config):
    """Plumbing check for audio-visual agreement: when the sound is a copy of some video
    tokens, training on video_to_audio + audio_to_video makes the prediction of the sound
    follow the picture (and nothing of it survives when the picture is another clip's)."""
    from flax import nnx

    from mmgen.generative.transformer import combine_digits

    cfg = generative_config("tiny,tasks=video_to_audio+audio_to_video", extra=[
        "data_source='random_tokens'", "model.depth=2", "model.video_grid=(2, 2, 2)", "model.video_vocab=16",
        "model.audio_len=4", "model.audio_levels=1", "model.audio_vocab=16", "schedule.name='constant'",
        "optimizer.lr=3e-3", "total_steps=300", "batch_size=64"])
    mesh = loop.mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, abstract = loop.abstract_state(gen.FAMILY, cfg)
    shardings = loop.sharding_lib.state_shardings(abstract, mesh, tuple(tuple(r) for r in cfg.sharding_rules))
    state = loop.init_state(gen.FAMILY, cfg, mesh, shardings)
    random_batches = gen.make_data(cfg, split="train", train=True, seed=0, batch_size=64, process_index=0,
                                   process_count=1)

    def paired(batch):
        video = batch["video_tokens"]
        audio = video[:, np.arange(4) // 2, 0, 0]  # sound frame t = the top-left token of latent frame t // 2
        return {**batch, "audio_tokens": audio, "audio_condition": audio, "video_condition": video}

    first = paired(next(random_batches))
    step = loop.make_train_step(gen.FAMILY, cfg, graphdef, shardings, loop.batch_shardings_for(first, mesh), mesh)
    for i in range(300):
        batch = first if i == 0 else paired(next(random_batches))
        state, _ = step(state, loop.global_batch(batch, mesh), jax.random.key(i))

    model = gen.inference_model(nnx.merge(graphdef, state))
    test = paired(next(random_batches))
    test["task_id"] = np.full((64,), tasks_lib.task_id("video_to_audio"), np.int32)

    def sound_accuracy(batch):
        example = tokens.training_example(cfg, batch, jax.random.key(0), cfg_dropout=0.0, ratio=jnp.ones((64,)))
        assert bool(example.masked["audio"].all())  # the whole sound is generated
        logits = model(example.inputs, example.task_ids, {"label": example.labels}, present=example.present)
        pred = combine_digits(jnp.argmax(logits["audio"], axis=-1), tokens.specs_of(cfg)["audio"])
        return float(np.mean(np.asarray(pred) == test["audio_tokens"]))

    other = {**test, "video_tokens": np.roll(test["video_tokens"], 1, axis=0)}
    other["video_condition"] = other["video_tokens"]
    assert sound_accuracy(test) > 0.9
    assert sound_accuracy(other) < 0.25  # chance is 1/16

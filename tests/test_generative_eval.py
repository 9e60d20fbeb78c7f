"""Specification of the generative evaluation (mmgen/eval/generative_eval.py).

The height estimators are checked on real moving_shapes_av clips (numpy only); the
whole evaluation runs once on a tiny video-only workdir with numpy-initialised weights.
"""

import json
import os

import numpy as np
import pytest

import mmgen  # noqa: F401
from mmgen.data.builders import moving_shapes_av as msav
from mmgen.eval import generative_eval as ge
from mmgen.eval import reference
from mmgen.families import generative as gen


@pytest.fixture(scope="module")
def clips():
    rows = [msav.generate_clip(np.random.default_rng((5, i)), frames=9, resolution=32, fps=8.0, sample_rate=16000)
            for i in range(8)]
    return {k: np.stack([r[k] for r in rows]) for k in ("video", "audio", "main_y")}


def test_height_estimators_read_the_main_shape_from_pictures_and_pitch(clips):
    from_video = ge.video_heights(clips["video"])
    from_audio = ge.audio_heights(clips["audio"], 9, 8.0, 16000)
    assert from_video.shape == from_audio.shape == (8, 9)
    video = ge.agreement(from_video, clips["main_y"])
    audio = ge.agreement(from_audio, clips["main_y"])
    assert video["valid_frames"] == 1.0 and video["mae"] < 0.03 and video["corr"] > 0.95
    assert audio["mae"] < 0.08 and audio["corr"] > 0.8
    for scores in (video, audio):  # a shuffled pairing is far worse: this is what "chance" means
        assert scores["mae_shuffled"] > 2 * scores["mae"] and scores["corr_shuffled"] < scores["corr"] - 0.3
        assert scores["mae_gain"] > 5 * scores["mae_gain_se"] > 0


def test_paired_gain_is_the_error_against_other_clips_minus_the_own_and_zero_for_unrelated_heights():
    reference = np.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]])
    estimate = np.array([[0.1, np.nan], [0.5, 0.6], [0.8, 0.8]])  # clip 0 has one frame with a shape
    scores = ge.agreement(estimate, reference)
    own = np.array([0.0, 0.05, 0.1])
    others = np.array([(0.4 + 0.8) / 2, ((0.4 + 0.5) / 2 + (0.4 + 0.3) / 2) / 2, (0.7 + 0.3) / 2])
    assert scores["mae_gain"] == pytest.approx(np.mean(others - own))
    assert scores["mae_gain_se"] == pytest.approx(np.std(others - own, ddof=1) / np.sqrt(3))
    rng = np.random.default_rng(0)
    unrelated = ge.agreement(rng.uniform(size=(200, 9)), rng.uniform(size=(200, 9)))
    assert abs(unrelated["mae_gain"]) < 3 * unrelated["mae_gain_se"]
    assert np.isnan(ge.agreement(np.full((3, 2), np.nan), reference)["mae_gain"])


def test_blank_video_has_no_height_and_agreement_skips_it():
    blank = np.full((2, 3, 16, 16, 3), 90, np.uint8)
    assert np.isnan(ge.video_heights(blank)).all()
    scores = ge.agreement(ge.video_heights(blank), np.zeros((2, 3)))
    assert np.isnan(scores["mae"]) and scores["valid_frames"] == 0.0


@pytest.mark.slow
def test_evaluate_writes_per_task_accuracy_psnr_fvd_and_grids(tmp_path, random_i3d, data_dir, tokenizers,
                                                             generative_config, write_numpy_initialised,
                                                             event_summaries, check_gallery):
    root = str(tmp_path)
    cfg = generative_config("tiny,modalities=video", data_dir=data_dir, extra=[
        f"tokenizers.video_workdir={tokenizers['video']!r}", "sampling.steps=2", "evaluation.unigram_clips=4",
        "sampling.batch_size=4", "tensorboard=True"])
    workdir = write_numpy_initialised(gen.FAMILY, cfg, os.path.join(root, "generative"), seed=3)
    # FVD's plumbing with a random I3D on the clips' own 32x32 (the Kinetics one: test_pretrained.py).
    networks = reference.Networks(i3d=random_i3d, fvd_resolution=None)
    result = ge.evaluate(workdir, gen.load_generator, "test", num=4, networks=networks)
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    rows = {r["task"]: r for r in result["token_accuracy"]}
    assert len(rows) == 10 and "audio_to_video" not in rows  # the video-only model's tasks
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["unigram"] <= 1.0 and row["scored"] > 0
        assert abs(row["video_nll"] - np.log(1024)) < 0.5  # nats per token; a random model is near uniform
    # Masked targets only: frame prediction scores the 2 generated latent frames of 3 (x 8 x 8), at most.
    assert rows["frame_prediction"]["scored"] <= 4 * 2 * 8 * 8
    fp = result["frame_prediction"]
    assert fp["given_frames"] == 1 and fp["predicted_frames"] == 8
    assert np.isfinite([fp["psnr"], fp["copy_last_frame_psnr"], fp["tokenizer_round_trip_psnr"]]).all()
    assert "audio_visual" not in result
    (fvd,) = result["fvd"]  # the one sampled task that generates video, with its clip counts
    assert {k: v for k, v in fvd.items() if k != "fvd"} == {
        "task": "frame_prediction", "clips_real": 4, "clips_generated": 4, "frames": 9, "resolution": "native"}
    assert np.isfinite(fvd["fvd"]) and fvd["fvd"] > 0
    samples = os.path.join(workdir, "eval")  # the samples with their real clips, on a page with the task's numbers
    assert sorted(os.listdir(samples)) == sorted(
        ["frame_prediction.gallery.json", "frame_prediction.png", "frame_prediction_tokens.npz", "index.html"]
        + [f"frame_prediction_{i:03d}{real}.mp4" for i in range(4) for real in ("", "_real")])
    assert len(check_gallery(samples)["videos"]) == 8
    with open(os.path.join(samples, "frame_prediction.gallery.json")) as f:
        record = json.load(f)
    assert record["metrics"]["psnr"] == fp["psnr"] and record["metrics"]["fvd"] == fvd["fvd"]
    seen = event_summaries(os.path.join(workdir, "tensorboard"))  # and in TensorBoard at the checkpoint's step
    assert [(s, kind) for s, kind, _ in seen["test/frame_prediction"]] == [(result["step"], "image")]
    assert [(s, kind) for s, kind, _ in seen["test/frame_prediction/video"]] == [(result["step"], "image")]
    at_step = ge.evaluate(workdir, gen.load_generator, "test", num=4, step=result["step"])  # the same checkpoint, by its step
    assert at_step["token_accuracy"] == result["token_accuracy"]
    assert at_step["fvd"] == "unavailable (FVD not computed here)"  # no networks given
    with open(os.path.join(workdir, f"eval_step{result['step']}.json")) as f:
        assert json.load(f)["step"] == result["step"]
    assert "frame_prediction.png" in os.listdir(os.path.join(workdir, f"eval_step{result['step']}"))
    # Per-clip cross-entropy (the paired dependence test's input) averages back to the task's.
    from mmgen.generative.generator import read_split

    generator = gen.load_generator(workdir)
    clips = read_split(generator.cfg, "test", 4)
    per_clip = {}
    (row,) = ge.token_accuracy(generator, clips, {"video": np.zeros((1, 3, 8, 8), np.int32)}, ["frame_prediction"],
                               1.0, per_clip=per_clip)
    clip_nll, clip_accuracy = per_clip["frame_prediction"]["video"]["nll"], per_clip["frame_prediction"]["video"]["accuracy"]
    assert clip_nll.shape == clip_accuracy.shape == (4, 1) and np.isfinite(clip_nll).all() and np.ptp(clip_nll) > 0
    # Every clip scores its 2 x 8 x 8 targets: the per-clip means average back to the task's.
    assert row["video_nll"] == pytest.approx(clip_nll.mean(), rel=1e-6)
    assert row["video_accuracy"] == pytest.approx(clip_accuracy.mean(), rel=1e-6)


def test_height_probe_reads_heights_that_the_features_carry_and_not_others():
    rng = np.random.default_rng(0)
    heights = rng.uniform(0, 1, (400, 9))
    mixing = rng.normal(size=(9, 60))
    carrying = heights @ mixing + 0.1 * rng.normal(size=(400, 60))  # heights linearly in the features, plus noise
    probe = ge.HeightProbe(carrying[:300], heights[:300])
    scores = ge.agreement(probe(carrying[300:]), heights[300:])
    assert scores["mae"] < 0.05 and scores["corr"] > 0.95 and scores["mae_shuffled"] > 4 * scores["mae"]
    assert probe.penalty in (1.0, 10.0, 100.0, 1000.0, 10000.0) and probe.holdout_mae < 0.05
    unrelated = ge.HeightProbe(rng.normal(size=(300, 60)), heights[:300])  # features that say nothing
    scores = ge.agreement(unrelated(rng.normal(size=(100, 60))), heights[300:])
    assert abs(scores["mae"] - scores["mae_shuffled"]) < 0.05 and abs(scores["corr"]) < 0.2
    assert unrelated.penalty == 10000.0  # held-out error prefers shrinking to the mean
    with pytest.raises(ValueError, match="at least 8 clips"):
        ge.HeightProbe(carrying[:4], heights[:4])


def test_training_clips_are_at_most_the_splits_distinct_clips():
    e = {"unigram_clips": 64, "probe_clips": 1024}
    assert ge.training_clips(e, 5000, probes=True) == (64, 1024, "")
    assert ge.training_clips(e, 16, probes=True) == (16, 16, "")  # not 1024 read round a 16-clip split
    assert ge.training_clips(e, 16, probes=False) == (16, 0, "")
    unigram, probe_clips, why = ge.training_clips(e, 7, probes=True)
    assert (unigram, probe_clips) == (7, 0) and why == "unavailable (the train split has 7 clips; a height probe needs 8)"
    assert ge.training_clips({}, 100, probes=True) == (64, 100, "")  # the defaults


def test_token_features_are_the_codes_the_decoder_sees():
    from flax import nnx

    from mmgen.tokenizers.quantizers import build_quantizer, default_quantizer_config

    q = default_quantizer_config("lfq")
    q.num_bits = 4

    class Tok:
        model = type("M", (), {"quantizer": build_quantizer(q, rngs=nnx.Rngs(0))})

    tokens = np.array([[[0, 5], [15, 8]]])  # [n=1, 2, 2]
    features = ge.token_features(Tok, tokens)
    assert features.shape == (1, 2 * 2 * 4)
    np.testing.assert_array_equal(features[0, 4:8], [1, -1, 1, -1])  # 5 = 0b0101, channel 0 = least significant bit


def test_cross_modal_dependence_scores_the_targets_again_with_the_sound_of_another_clip(monkeypatch):
    clips = {"video": np.arange(3)[:, None] * np.ones((3, 4)), "audio": np.arange(3)[:, None] * np.ones((3, 5)),
             "has_audio": np.array([True, True, False]), "label": np.zeros(3)}
    seen = []

    # Per clip and level cross-entropy: the sound's first level is 0.5 nats worse with another clip's
    # picture, 0.1 nats on average for the video; clip 2's sound had no scored token.
    # Accuracy: 0.2 better on the true pairs for every clip and level.
    def per_clip_of(video_nll, audio_nll, accuracy):
        return {"video": {"nll": np.array(video_nll), "accuracy": np.full((3, 1), accuracy)},
                "audio": {"nll": np.array(audio_nll), "accuracy": np.full((3, 2), accuracy)}}

    true_clip = per_clip_of([[2.0], [2.1], [1.9]], [[1.0, 2.0], [1.2, 2.0], [np.nan, 2.0]], 0.3)
    swap_clip = per_clip_of([[2.0], [2.3], [2.0]], [[1.5, 2.0], [1.7, 2.0], [1.0, 2.0]], 0.1)

    def fake_accuracy(generator, given, train_tokens, task_names, ratio, per_clip):
        assert ratio == 1.0
        seen.append(given)
        true = len(seen) == 1  # the first call scores the true pairs
        for t in task_names:
            per_clip[t] = true_clip if true else swap_clip
        return [{"task": t, "scored": 10, "video_accuracy": 0.3 if true else 0.1, "video_nll": 2.0 if true else 3.0,
                 "audio_accuracy": 0.4 if true else 0.2, "audio_nll": 1.0 if true else 1.5} for t in task_names]

    monkeypatch.setattr(ge, "token_accuracy", fake_accuracy)
    rows = {r["task"]: r for r in ge.cross_modal_dependence(None, clips, {}, list(ge.AV_TASKS), 1.0)}
    np.testing.assert_array_equal(seen[0]["audio"], clips["audio"])
    np.testing.assert_array_equal(seen[1]["audio"][:, 0], [2, 0, 1])  # every clip gets its neighbour's sound
    np.testing.assert_array_equal(seen[1]["has_audio"], [False, True, True])
    np.testing.assert_array_equal(seen[1]["video"], clips["video"])  # the picture stays
    # Only the generated (target) modality is compared: the condition is given, not predicted.
    video_gain = rows["audio_to_video"].pop("video_nll_gain")
    video_se = rows["audio_to_video"].pop("video_nll_gain_se")
    assert rows["audio_to_video"].pop("video_accuracy_gain") == pytest.approx(0.2)
    assert rows["audio_to_video"].pop("video_accuracy_gain_se") == pytest.approx(0.0)
    assert rows["audio_to_video"] == {"task": "audio_to_video", "mask_ratio": 1.0, "scored": 10,
                                      "video_accuracy_matched": 0.3, "video_accuracy_mismatched": 0.1,
                                      "video_nll_matched": 2.0, "video_nll_mismatched": 3.0}
    assert video_gain == pytest.approx(0.1) and video_se == pytest.approx(np.std([0.0, 0.2, 0.1], ddof=1) / np.sqrt(3))
    audio = rows["video_to_audio"]
    assert {k for k in audio if k.startswith(("video", "audio"))} == {
        "audio_accuracy_matched", "audio_accuracy_mismatched", "audio_nll_matched", "audio_nll_mismatched",
        "audio_nll_gain", "audio_nll_gain_se", "audio_nll_gain_by_level",
        "audio_accuracy_gain", "audio_accuracy_gain_se", "audio_accuracy_gain_by_level"}
    # Clip 2 is left out (no scored first-level token); the gain is per token, over the levels.
    assert audio["audio_nll_gain_by_level"] == pytest.approx([0.5, 0.0])
    assert audio["audio_nll_gain"] == pytest.approx(0.25) and audio["audio_nll_gain_se"] == pytest.approx(0.0)
    assert rows["audio_video"]["audio_accuracy_mismatched"] == 0.2 and rows["audio_video"]["video_accuracy_matched"] == 0.3

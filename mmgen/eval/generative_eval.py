"""Per-task evaluation of a generative workdir (``mmgen eval`` on family "generative").

On ``num`` clips of a split (default ``cfg.evaluation.num``), for the newest
checkpoint's inference model and its frozen tokenizers:

* **Masked-token accuracy, every trained task.** Each clip is tokenized with the
  task's condition (as in training), ``cfg.evaluation.mask_ratio`` of the maskable
  elements are masked (fixed seed, no guidance dropout) and the argmax prediction is
  scored on masked *target* elements (the condition region is left out), per modality
  and together; the floor is the **unigram baseline**: always predicting the most
  frequent token of ``cfg.evaluation.unigram_clips`` training clips (at most the split's
  distinct clips; per RVQ level for audio), scored on the same elements
  (``mmgen.eval.metrics``).
* **Frame prediction PSNR.** MaskGIT samples (``cfg.sampling``) decoded to pixels;
  PSNR (uint8, dB) of the pixel frames after the given ones against the truth, next
  to the **copy-last-frame baseline** (the last given frame held) and to the
  tokenizer's own round trip of those frames (what a perfect token predictor would
  reach).
* **Audio-visual agreement** (datasets with the ``main_y`` feature, i.e.
  ``moving_shapes_av``, whose tone pitch is ``height_to_pitch(main_y)``). Height of the
  main shape in a video frame: centroid row of the largest connected blob of strongly
  saturated pixels (the main shape is the largest saturated shape; the backgrounds'
  channels differ by at most 0.45). Height from sound: the FFT peak between 150 and
  1100 Hz of each frame's window (Hann, zero-padded to 8192 points), through
  ``pitch_to_height``. ``audio_to_video`` compares the generated video's heights with the
  true ones, ``video_to_audio`` the generated sound's, ``audio_video`` the generated
  video's with the generated sound's: mean absolute error and Pearson correlation,
  next to **chance** (the same numbers with the pairing shuffled: examples rolled by
  one). The estimators' errors on the real clips and on the tokenizers' round trips of them
  say how low the error can go.
* **Audio-visual agreement in token space** (same datasets). The pixel and pitch
  estimators above need tokenizers that redraw a visible shape and an audible tone; the
  token probes do not. Per modality, a ridge regression (``HeightProbe``) from a
  clip's quantized latents (the codes its decoder would see, flattened) to the main
  shape's height in every frame is fit on ``cfg.evaluation.probe_clips`` real training
  clips, at most the split's distinct clips (its penalty chosen on a held-out quarter of
  them; a split of fewer than 8 clips gets no probes, ``height_probes`` says so) and then
  read out on the generated tokens: ``audio_to_video`` (probe on the generated video vs the true
  height), ``video_to_audio`` (generated sound vs true height), ``audio_video``
  (generated video vs generated sound), each next to the shuffled pairing and with the
  paired gain over every other pairing (``mae_gain`` +- ``mae_gain_se``). The probes'
  errors on the real test clips' tokens are the ceiling.
* **Cross-modal dependence** (every trained audio-visual task): the masked-token
  accuracy and cross-entropy (nats per token) of the target modality with every target
  token masked (``cfg.evaluation.dependence_mask_ratio``, default 1.0), on the true
  pairs and with each clip's sound swapped for another clip's (rolled by one); a model
  that reads the picture to predict the sound (or the other way round) does better on
  the true pairs. The paired per-clip gain (``<m>_nll_gain`` +- ``<m>_nll_gain_se``)
  says whether the difference is more than chance.
* **FVD per task** (``fvd``, every sampled task that generates video: frame
  prediction, audio-to-video, audio-video): the I3D FVD (``mmgen.eval.i3d``: logits
  of clips resized to 224x224, Frechet distance in float64) of the task's ``num``
  samples, whole clips (given frames included, as MAGVIT reports frame prediction),
  against the ``num`` real clips of the split, each row with its clip counts (FVD
  depends on them). Without the ``metrics`` extra it is an ``"unavailable (...)"``
  string saying what to install.
* Under ``workdir/eval/``: per sampled task a labelled PNG grid (reference row, sample
  row per clip) ``<task>.png``, the samples ``<task>_<i>.mp4`` (with sound; ``.wav`` for
  audio-only) beside the real clips ``<task>_<i>_real.mp4``, the tokens, and
  ``index.html``, a page of them all with the task's metrics (``mmgen.eval.gallery``); in
  the workdir's TensorBoard at the checkpoint's step, ``<split>/<task>`` (the grid),
  ``.../video`` and ``.../audio`` (the first sample), unless ``tensorboard=False``.

Writes ``workdir/eval.json`` (the returned dict).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen import fs
from mmgen.data import pipeline
from mmgen.data.builders.moving_shapes_av import pitch_to_height
from mmgen.errors import UserError
from mmgen.eval import gallery, metrics, reference
from mmgen.generative import masking
from mmgen.generative import tasks as tasks_lib
from mmgen.generative.generator import read_split
from mmgen.generative.tokens import (
    clip_dataset_config,
    draw_tasks,
    specs_of,
    task_weights,
    tokenize_clips,
    training_example,
)
from mmgen.generative.transformer import combine_digits, token_log_prob
from mmgen.parallel.distributed import host_value, is_writer
from mmgen.progress import progress
from mmgen.train import workdir as workdir_lib
from mmgen.train.metrics import write_media

SATURATION = 0.5  # a pixel is "saturated" when max - min channel (in [0, 1]) exceeds this
PITCH_BAND_HZ = (150.0, 1100.0)
FFT_POINTS = 8192
AV_TASKS = ("audio_to_video", "video_to_audio", "audio_video")


# ---------------------------------------------------------------- height estimators
def video_heights(video) -> np.ndarray:
    """Normalised height (0 = top) of the main shape per frame, ``uint8 [n, T, H, W, 3] -> [n, T]``.

    NaN where a frame has no saturated pixel.
    """
    from scipy import ndimage

    v = np.asarray(video, np.float32) / 255.0
    saturated = (v.max(-1) - v.min(-1)) > SATURATION
    n, t, h, _ = saturated.shape
    out = np.full((n, t), np.nan)
    for i in range(n):
        for j in range(t):
            labels, count = ndimage.label(saturated[i, j])
            if count == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            rows, _ = np.nonzero(labels == 1 + int(np.argmax(sizes)))
            out[i, j] = (rows.mean() + 0.5) / h
    return out


def audio_heights(audio, frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """Height implied by the dominant pitch of each video frame's window, ``[n, S] -> [n, frames]``."""
    audio = np.asarray(audio, np.float32)
    window = round(sample_rate / fps)
    freqs = np.fft.rfftfreq(FFT_POINTS, 1.0 / sample_rate)
    band = (freqs >= PITCH_BAND_HZ[0]) & (freqs <= PITCH_BAND_HZ[1])
    out = np.full((len(audio), frames), np.nan)
    for j in range(frames):
        piece = audio[:, j * window:(j + 1) * window]
        if piece.shape[1] < window // 2:
            continue
        spectrum = np.abs(np.fft.rfft(piece * np.hanning(piece.shape[1]), n=FFT_POINTS, axis=1))
        peak = freqs[band][np.argmax(spectrum[:, band], axis=1)]
        out[:, j] = np.clip(pitch_to_height(peak), 0.0, 1.0)
    return out


def agreement(estimate: np.ndarray, reference: np.ndarray) -> dict:
    """MAE and Pearson r of two height arrays ``[n, T]``, and both with the pairing shuffled.

    Frames where either is nan (no shape found) are left out. ``mae_gain`` is the paired
    test of "better than chance": per clip, its mean error against every *other* clip's
    reference minus its error against its own, averaged over clips, with ``mae_gain_se``
    its standard error over clips (0 +- a few se when the estimate ignores its pair).
    """

    def scores(a, b):
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3:
            return float("nan"), float("nan")
        a, b = a[ok], b[ok]
        corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        return float(np.mean(np.abs(a - b))), corr

    mae, corr = scores(estimate, reference)
    mae_chance, corr_chance = scores(estimate, np.roll(reference, 1, axis=0))
    valid = float(np.mean(np.isfinite(estimate) & np.isfinite(reference)))
    return {"mae": mae, "mae_shuffled": mae_chance, "corr": corr, "corr_shuffled": corr_chance,
            "valid_frames": valid, **_paired_mae_gain(estimate, reference)}


def _paired_mae_gain(estimate: np.ndarray, reference: np.ndarray) -> dict:
    errors = np.abs(estimate[:, None, :] - reference[None, :, :])  # [clip, reference clip, T], nan where missing
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # clips with no valid frame: nan, dropped below
        per_pair = np.nanmean(errors, axis=2)  # [n, n]
        own = np.diagonal(per_pair)
        others = np.where(np.eye(len(estimate), dtype=bool), np.nan, per_pair)
        gain = np.nanmean(others, axis=1) - own
    gain = gain[np.isfinite(gain)]
    if len(gain) < 2:
        return {"mae_gain": float("nan"), "mae_gain_se": float("nan")}
    return _mean_and_se("mae_gain", gain)


def _mean_and_se(name: str, per_clip: np.ndarray) -> dict:
    """``{name: mean, name_se: standard error}`` of per-clip values (at least 2)."""
    return {name: float(per_clip.mean()), f"{name}_se": float(per_clip.std(ddof=1) / np.sqrt(len(per_clip)))}


# ---------------------------------------------------------------- token-space height probes
def token_features(tokenizer, tokens) -> np.ndarray:
    """The quantized latents a decoder would see, flattened: tokens ``[n, ...] -> float32 [n, F]``."""
    codes = tokenizer.model.quantizer.indices_to_codes(jnp.asarray(tokens, jnp.int32))
    return np.asarray(codes, np.float32).reshape(len(tokens), -1)


class HeightProbe:
    """Ridge regression from a clip's token features ``[n, F]`` to per-frame heights ``[n, T]``.

    Features are standardised on the fitting set; the penalty is the one of
    ``penalties`` with the lowest mean absolute error on the last ``holdout`` of the
    fitting clips, then the probe is refit on all of them. Predictions are clipped to
    the height range [0, 1].
    """

    MIN_CLIPS = 8

    def __init__(self, features: np.ndarray, heights: np.ndarray,
                 penalties=(1.0, 10.0, 100.0, 1000.0, 10000.0), holdout: float = 0.25):
        features, heights = np.asarray(features, np.float64), np.asarray(heights, np.float64)
        if len(features) < self.MIN_CLIPS:
            raise UserError(f"a height probe needs at least {self.MIN_CLIPS} clips to fit, got {len(features)}")
        cut = max(1, int(round(len(features) * (1.0 - holdout))))
        errors = {}
        for penalty in penalties:
            self._fit(features[:cut], heights[:cut], penalty)
            errors[penalty] = float(np.mean(np.abs(self(features[cut:]) - heights[cut:])))
        self.penalty = min(errors, key=errors.get)
        self.holdout_mae = errors[self.penalty]
        self._fit(features, heights, self.penalty)

    def _fit(self, x, y, penalty):
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-6
        a = (x - self.mean) / self.scale
        self.bias = y.mean(0)
        self.weights = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]), a.T @ (y - self.bias))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        a = (np.asarray(features, np.float64) - self.mean) / self.scale
        return np.clip(a @ self.weights + self.bias, 0.0, 1.0)


def training_clips(evaluation, train_size: int, probes: bool) -> tuple[int, int, str]:
    """``(unigram_clips, probe_clips, why_no_probes)``: how many training clips the unigram
    baseline and the height probes read (``cfg.evaluation``'s numbers), at most the split's
    ``train_size`` distinct clips. A split read round again would repeat the encoding and
    put copies of fitted clips into the held-out quarter that picks a probe's penalty.
    ``probes``: the run has both modalities and the data its heights; too few clips for a
    probe give 0 and the reason."""
    unigram = min(int(evaluation.get("unigram_clips", 64)), train_size)
    if not probes:
        return unigram, 0, ""
    clips = min(int(evaluation.get("probe_clips", 1024)), train_size)
    if clips < HeightProbe.MIN_CLIPS:
        return unigram, 0, (f"unavailable (the train split has {train_size} clips; a height probe needs "
                            f"{HeightProbe.MIN_CLIPS})")
    return unigram, clips, ""


# ---------------------------------------------------------------- token accuracy
def _prediction_fn(cfg, graphdef):
    """Jitted: argmax predictions, targets, scored elements (masked targets) and log p(target) of one batch."""
    specs = specs_of(cfg)

    @jax.jit
    def predict(state, batch, rng, ratio):
        model = nnx.merge(graphdef, state)
        batch_size = batch["task_id"].shape[0]
        example = training_example(cfg, batch, rng, cfg_dropout=0.0, ratio=jnp.full((batch_size,), ratio))
        regions = masking.element_regions(specs, example.task_ids, jax.random.wrap_key_data(batch["region_key"][0]))
        logits = model(example.inputs, example.task_ids, {"label": example.labels}, present=example.present)
        out = {}
        for m, spec in specs.items():
            present = example.present[m].reshape((batch_size,) + (1,) * (regions[m].ndim - 1))
            out[m] = (combine_digits(jnp.argmax(logits[m], axis=-1), spec), example.targets[m],
                      example.masked[m] & ~regions[m] & present, token_log_prob(logits[m], example.targets[m], spec))
        return out

    return predict


def _unigram_modes(tokens: np.ndarray) -> np.ndarray:
    """Most frequent id (per RVQ level when ``tokens`` has a level axis): ``[...] -> [levels]``."""
    flat = tokens.reshape(-1, tokens.shape[-1]) if tokens.ndim == 3 else tokens.reshape(-1, 1)
    return np.asarray([np.bincount(flat[:, i]).argmax() for i in range(flat.shape[1])])


def token_accuracy(generator, clips: dict, train_tokens: dict, task_names, ratio: float, seed: int = 0,
                   per_clip: dict | None = None) -> list:
    """Per task masked-target accuracy and unigram baseline (see the module docstring).

    ``per_clip``, when given, receives ``per_clip[task][modality][metric]`` for metric
    ``nll`` and ``accuracy``: float64 [clips, levels] (levels 1 for video), each clip's
    mean over its scored tokens of that level (nan where none was scored).
    """
    cfg = generator.cfg
    graphdef, state = nnx.split(generator.model)
    predict = _prediction_fn(cfg, graphdef)
    modes = {m: _unigram_modes(t) for m, t in train_tokens.items()}
    num = len(clips["label"])
    chunk = max(1, min(num, int(cfg.sampling.batch_size)))
    rows_out = []
    for task in progress(task_names, desc="token accuracy", unit="task"):
        hits = {m: [0, 0, 0, 0.0] for m in generator.tokenizers}  # model hits, unigram hits, scored, -log p sum
        clip_sums = {}  # modality -> [nll sum, hits, scored] per clip and level
        for c, lo in enumerate(range(0, num, chunk)):
            rows = np.minimum(np.arange(lo, lo + chunk), num - 1)
            real = np.arange(lo, lo + chunk) < num
            ids = np.full((chunk,), tasks_lib.task_id(task), np.int32)
            _, key_data = draw_tasks(cfg, seed, c, chunk)
            batch = tokenize_clips(cfg, generator.tokenizers, clips["video"][rows], clips["audio"][rows], ids,
                                   jax.random.wrap_key_data(jnp.asarray(key_data)),
                                   with_condition=cfg.conditioning == "commit")
            batch.update(task_id=ids, label=clips["label"][rows].astype(np.int32),
                         has_audio=clips["has_audio"][rows].astype(bool),
                         region_key=np.broadcast_to(key_data, (chunk, *key_data.shape)).copy())
            out = jax.tree.map(host_value, predict(state, batch, jax.random.key(seed + c), jnp.float32(ratio)))
            for m, (pred, target, scored, logp) in out.items():
                pred, target, scored = np.asarray(pred), np.asarray(target), np.asarray(scored) & real.reshape(
                    (-1,) + (1,) * (np.ndim(target) - 1))
                logp = np.where(scored, np.asarray(logp, np.float64), 0.0)
                hits[m][3] -= float(logp.sum())
                levels = target.shape[-1] if target.ndim == 3 else 1  # audio [B, T, levels]
                sums = clip_sums.setdefault(m, np.zeros((3, num, levels)))
                for i, per_token in enumerate((-logp, (pred == target) & scored, scored)):
                    sums[i, rows[real]] += per_token.reshape(chunk, -1, levels).sum(axis=1)[real]
                baseline = np.broadcast_to(modes[m] if target.ndim == 3 else modes[m][0], target.shape)
                hits[m][0] += int((pred == target)[scored].sum())
                hits[m][1] += int((baseline == target)[scored].sum())
                hits[m][2] += int(scored.sum())
        row = {"task": task}
        total = [sum(h[i] for h in hits.values()) for i in range(3)]
        row["accuracy"] = total[0] / total[2] if total[2] else float("nan")
        row["unigram"] = total[1] / total[2] if total[2] else float("nan")
        for m, (hit, base, count, nll) in hits.items():
            if count:
                row[f"{m}_accuracy"] = hit / count
                row[f"{m}_unigram"] = base / count
                row[f"{m}_nll"] = nll / count
        row["scored"] = total[2]
        rows_out.append(row)
        if per_clip is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                per_clip[task] = {m: {"nll": nll / count, "accuracy": hit / count}
                                  for m, (nll, hit, count) in clip_sums.items()}
    return rows_out


def cross_modal_dependence(generator, clips: dict, train_tokens: dict, task_names, ratio: float) -> list:
    """Masked-token accuracy and cross-entropy of the audio-visual tasks' targets, on the
    true pairs and with each clip's sound swapped for another clip's.

    If the model reads the picture to predict the sound (and the other way round), it
    predicts the targets better on the true pairs than on mismatched ones (sound rolled
    by one clip, same masks and seed). ``ratio`` is the masked fraction: 1.0 (the
    default, ``evaluation.dependence_mask_ratio``) masks every target token, as sampling
    starts, so that only the other modality can tell where the shape is or what the
    pitch is; at lower ratios the visible targets already say much of it.

    Whether the difference is more than chance is read from the clips themselves:
    ``<m>_nll_gain`` is the mean over clips of (mismatched - matched) cross-entropy, in
    nats per token, and ``<m>_nll_gain_se`` its standard error over clips;
    ``<m>_accuracy_gain`` (+- ``_se``) the same for accuracy (matched - mismatched). A
    model that ignores the other modality has gains within a few standard errors of 0.
    ``<m>_nll_gain_by_level`` splits the gain over the residual levels (audio): the
    first level carries most of the pitch.
    """
    mismatched = dict(clips, audio=np.roll(clips["audio"], 1, axis=0), has_audio=np.roll(clips["has_audio"], 1, axis=0))
    clip_true, clip_swapped = {}, {}
    matched = {r["task"]: r for r in token_accuracy(generator, clips, train_tokens, task_names, ratio,
                                                    per_clip=clip_true)}
    out = []
    for row in token_accuracy(generator, mismatched, train_tokens, task_names, ratio, per_clip=clip_swapped):
        task, true = row["task"], matched[row["task"]]
        entry = {"task": task, "mask_ratio": float(ratio), "scored": row["scored"]}
        for m in ("video", "audio"):
            if f"{m}_accuracy" in row and tasks_lib.get_task(task).role(m).kind == "target":
                for metric in ("accuracy", "nll"):
                    entry[f"{m}_{metric}_matched"] = true[f"{m}_{metric}"]
                    entry[f"{m}_{metric}_mismatched"] = row[f"{m}_{metric}"]
                if m in clip_true.get(task, {}):
                    true_clip, swapped_clip = clip_true[task][m], clip_swapped[task][m]
                    entry.update(_paired_gain(f"{m}_nll", true_clip["nll"], swapped_clip["nll"]))
                    entry.update(_paired_gain(f"{m}_accuracy", swapped_clip["accuracy"], true_clip["accuracy"]))
        out.append(entry)
    return out


def _paired_gain(name: str, low: np.ndarray, high: np.ndarray) -> dict:
    """Per clip and level ``high - low`` [clips, levels] -> mean gain, its standard error over clips, per level."""
    both = np.isfinite(low).all(axis=1) & np.isfinite(high).all(axis=1)
    gain = (high - low)[both]
    if len(gain) < 2:
        return {}
    out = _mean_and_se(f"{name}_gain", gain.mean(axis=1))
    if gain.shape[1] > 1:
        out[f"{name}_gain_by_level"] = [float(g) for g in gain.mean(axis=0)]
    return out


# ---------------------------------------------------------------- the evaluation
def _given_pixel_frames(cfg, tokenizer) -> int:
    """Pixel frames given by frame_prediction (the kept latent frames, decoded causally)."""
    grid = tuple(int(n) for n in cfg.model.video_grid)
    region = tasks_lib.condition_region(jnp.asarray([tasks_lib.task_id("frame_prediction")]), "video", grid,
                                        jax.random.key(0))
    kept = int(np.asarray(region[0]).any(axis=(1, 2)).sum())
    return tasks_lib.pixel_frames(kept, int(tokenizer.model.temporal_factor))


def frame_prediction_psnr(generator, result, clips) -> dict:
    ref = clips["video"][: len(result.video)]
    given = _given_pixel_frames(generator.cfg, generator.tokenizers["video"])
    axes = (1, 2, 3, 4)
    held = np.repeat(ref[:, given - 1:given], ref.shape[1] - given, axis=1)
    tokens = np.asarray(generator.tokenizers["video"].encode(jnp.asarray(ref, jnp.float32) / 127.5 - 1.0)[0])
    round_trip, _ = generator.decode({"video": tokens})
    psnr = lambda a: float(np.mean(metrics.psnr(a, ref[:, given:], axis=axes)))
    return {"psnr": psnr(result.video[:, given:]), "copy_last_frame_psnr": psnr(held),
            "tokenizer_round_trip_psnr": psnr(round_trip[:, given:]), "given_frames": given,
            "predicted_frames": int(ref.shape[1] - given)}


def evaluate(workdir: str, load_generator, split: str = "test", num: int | None = None,
             step: int | None = None, networks: reference.Networks | None = None) -> dict:
    """Evaluate checkpoint ``step`` (default the newest) of the generative run in ``workdir``
    (see the module docstring); writes eval.json (``eval_step{S}.json`` for a given step).

    ``load_generator(workdir, step=...)`` gives its ``Generator``
    (``mmgen.families.generative.load_generator``); flags are checked before it is called.
    ``networks``: the I3D for FVD (``reference.load_networks()``; None: FVD is reported
    unavailable).
    """
    cfg = workdir_lib.read_config(workdir, ("generative", "adapters"), "a generative (or adapter) one")
    e = cfg.get("evaluation", {})
    num = int(num if num is not None else e.get("num", 32))
    if num < 2:
        raise UserError(f"--num {num} must be at least 2 (the shuffled baseline pairs different clips)")
    if cfg.data_source == "random_tokens":
        raise UserError(f"{workdir} was trained on {cfg.data_source}: there are no tokenizers to evaluate with")
    generator = load_generator(workdir, step=step)
    cfg = generator.cfg
    try:
        clips = read_split(cfg, split, num, extra_features="main_y")
    except ValueError:  # a dataset without the moving_shapes_av metadata: no audio-visual agreement
        clips = read_split(cfg, split, num)
    both = {"video", "audio"} <= set(generator.tokenizers)
    unigram_clips, probe_clips, no_probes = training_clips(
        e, pipeline.split_size(clip_dataset_config(cfg), "train"), probes=both and "main_y" in clips)
    train = read_split(cfg, "train", max(unigram_clips, probe_clips), extra_features="main_y" if probe_clips else "")
    chunk = max(1, int(cfg.sampling.batch_size))
    train_tokens = {m: [] for m in generator.tokenizers}
    for lo in progress(range(0, len(train["label"]), chunk), desc="tokenize train clips", unit="batch"):
        ids = np.zeros((len(train["label"][lo:lo + chunk]),), np.int32)
        toks = tokenize_clips(cfg, generator.tokenizers, train["video"][lo:lo + chunk],
                              train["audio"][lo:lo + chunk], ids, jax.random.key(0), with_condition=False)
        for m, rows in train_tokens.items():
            rows.append(toks[f"{m}_tokens"])
    train_tokens = {m: np.concatenate(v) for m, v in train_tokens.items()}
    probes = ({m: HeightProbe(token_features(tok, train_tokens[m][:probe_clips]), train["main_y"][:probe_clips])
               for m, tok in generator.tokenizers.items()} if probe_clips else {})
    train_tokens = {m: v[:unigram_clips] for m, v in train_tokens.items()}

    trained = list(task_weights(cfg))
    result = {"family": "generative", "workdir": fs.normalize(workdir), "step": int(step) if step is not None else getattr(generator, "step", None) or workdir_lib.latest_step(workdir),
              "split": split, "clips": num, "conditioning": cfg.conditioning,
              "mask_ratio": float(e.get("mask_ratio", 0.5)), "sampling_steps": int(cfg.sampling.steps)}
    if no_probes:
        result["height_probes"] = no_probes
    result["token_accuracy"] = token_accuracy(generator, clips, train_tokens, trained, result["mask_ratio"])
    av_trained = [t for t in AV_TASKS if t in trained]
    if av_trained and both:
        result["cross_modal_dependence"] = cross_modal_dependence(
            generator, clips, train_tokens, av_trained, float(e.get("dependence_mask_ratio", 1.0)))

    result_path, out_dir = workdir_lib.output_paths(workdir, step)
    have = specs_of(cfg)
    sampled = [t for t in ("frame_prediction", *AV_TASKS)
               if all(m in have for m in tasks_lib.get_task(t).modalities())]
    d = cfg.dataset
    frames, fps, rate = int(d.frames), float(d.fps), int(d.sample_rate)
    av, av_tokens = [], []
    heights_of = {m: (lambda toks, m=m: probes[m](token_features(generator.tokenizers[m], toks))) for m in probes}
    networks = networks or reference.Networks()
    video_tasks = [t for t in sampled if tasks_lib.get_task(t).video.kind in ("target", "partial")]
    scorer = reference.FrechetScorer(networks) if networks.i3d is not None and video_tasks else None
    if scorer is not None:
        scorer.add_real(clips["video"][:num])
    fvd_rows = []
    saved, summaries = {}, {}
    for task in progress(sampled, desc="sample tasks", unit="task"):
        res = generator.sample_task(task, num, seed=1, clips=clips)
        saved[task] = (res, generator.save(res, out_dir, prefix=task))
        summaries.update(gallery.sample_summaries(res, f"{split}/{task}", generator.grid_rows(res),
                                                  fps=fps, sample_rate=rate))
        if scorer is not None and task in video_tasks:
            fvd_rows.append({"task": task, **scorer.score(res.video, frames)})
        if task == "frame_prediction":
            result["frame_prediction"] = frame_prediction_psnr(generator, res, clips)
        elif "main_y" in clips:
            truth = clips["main_y"][:num]
            if task == "audio_to_video":
                row = {"compared": "generated video, true height", **agreement(video_heights(res.video), truth)}
            elif task == "video_to_audio":
                row = {"compared": "generated sound, true height",
                       **agreement(audio_heights(res.audio, frames, fps, rate), truth)}
            else:
                row = {"compared": "generated video, generated sound",
                       **agreement(video_heights(res.video), audio_heights(res.audio, frames, fps, rate))}
            av.append({"task": task, **row})
            if probes:
                v_h, a_h = (heights_of[m](res.tokens[m]) if m in res.tokens else None for m in ("video", "audio"))
                compared, est, ref = {"audio_to_video": ("generated video tokens, true height", v_h, truth),
                                      "video_to_audio": ("generated sound tokens, true height", a_h, truth),
                                      "audio_video": ("generated video tokens, generated sound tokens", v_h, a_h)}[task]
                av_tokens.append({"task": task, "compared": compared, **agreement(est, ref)})
    if av:
        truth = clips["main_y"][:num]
        result["audio_visual"] = av
        # How low the error can go: the estimators on the real clips and on the tokenizers' round trips.
        ids = np.zeros((num,), np.int32)
        chunks = [tokenize_clips(cfg, generator.tokenizers, clips["video"][lo:lo + chunk], clips["audio"][lo:lo + chunk],
                                 ids[lo:lo + chunk], jax.random.key(0), with_condition=False)
                  for lo in range(0, num, chunk)]
        video_rt, audio_rt = generator.decode({m: np.concatenate([c[f"{m}_tokens"] for c in chunks])
                                               for m in generator.tokenizers})
        result["height_estimators"] = {
            "video_mae_real": agreement(video_heights(clips["video"]), truth)["mae"],
            "audio_mae_real": agreement(audio_heights(clips["audio"], frames, fps, rate), truth)["mae"],
            "video_mae_round_trip": agreement(video_heights(video_rt), truth)["mae"],
            "audio_mae_round_trip": agreement(audio_heights(audio_rt, frames, fps, rate), truth)["mae"],
        }
        if probes:
            real_tokens = {m: np.concatenate([c[f"{m}_tokens"] for c in chunks]) for m in probes}
            result["audio_visual_tokens"] = av_tokens
            result["height_probes"] = {
                m: {"train_clips": probe_clips, "penalty": p.penalty, "holdout_mae": p.holdout_mae,
                    **{f"test_{k}": v for k, v in agreement(heights_of[m](real_tokens[m]), truth).items()}}
                for m, p in probes.items()}
    if scorer is not None:
        result["fvd"] = fvd_rows
    elif video_tasks:
        result["fvd"] = networks.reason("FVD")
    result["grids"] = out_dir
    for task, (res, paths) in saved.items():
        gallery.record_samples(out_dir, res, paths, fps=fps, sample_rate=rate, step=result["step"],
                               source=f"mmgen eval ({split})", split=split, metrics=task_metrics(result, task))
    if saved:
        gallery.write_index(out_dir, title=f"evaluation samples of {fs.normalize(workdir)}")
    if is_writer():
        fs.write_text(result_path, json.dumps(result, indent=2))
    if cfg.get("tensorboard", True):
        write_media(workdir, result["step"] or 0, summaries)
    return result


def task_metrics(result: dict, task: str) -> dict:
    """The numbers of ``result`` (``evaluate``'s) about one sampled task, flat (for its gallery section)."""
    out = {}
    rows = [r for key in ("token_accuracy", "audio_visual", "audio_visual_tokens", "fvd")
            if isinstance(result.get(key), list) for r in result[key] if r.get("task") == task]
    if task == "frame_prediction" and isinstance(result.get("frame_prediction"), dict):
        rows.append(result["frame_prediction"])
    for row in rows:
        prefix = f"{row['compared']}: " if "compared" in row else ""
        out.update({prefix + k: v for k, v in row.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out

"""Evaluate a trained tokenizer on a dataset split: reconstruction quality and code use.

``evaluate(workdir, split, num)`` encodes and decodes ``num`` clips of ``split`` (the
whole split by default) of the workdir's own ``cfg.dataset`` with the EMA weights
``mmgen.families.tokenizer.load`` gives, and writes ``workdir/eval.json`` plus examples under
``workdir/eval/``.

Video (frames compared as uint8, what a viewer sees):

* ``psnr``: mean over clips of the clip's PSNR (MSE over all its pixels, peak 255),
  ``psnr_stderr`` its standard error over clips;
* ``ssim``: mean over all frames (Wang et al. 2004, ``mmgen.eval.metrics.ssim``);
* ``codebook_usage``: distinct codes among all the split's tokens / vocabulary;
  ``perplexity``: ``exp(H)`` of their empirical distribution (docs/ALGORITHMS.md asks for both);
* ``bits_per_token`` = ``log2(vocab)``, ``bits_per_pixel`` = tokens x bits / pixels;
* ``lpips_vgg16``, ``lpips_alexnet``: LPIPS (``mmgen.nn.lpips``) of every frame of the
  reconstruction against the input (both uint8, as seen), averaged over all frames;
* ``rfvd``: FVD (``mmgen.eval.i3d``: I3D logits of clips resized to 224x224, Frechet
  distance in float64) of the reconstructions against the inputs, over the ``num``
  clips evaluated, with ``rfvd_setup`` stating the clip counts, frames and resolution;
  FVD depends on them, so compare numbers only at equal counts. Without the
  ``metrics`` extra these three are ``"unavailable (...)"`` strings that say what to
  install;
* ``eval/recon.png``: rows alternate reference and reconstruction (labelled in a left
  margin), columns are frames.

Audio:

* ``si_snr`` (dB, mean over clips; ``si_snr_stderr`` its standard error) and
  ``mel_distance`` (``mel_distance`` below), at the full depth and, for RVQ, at every
  depth ``1..levels`` (the first ``d`` levels of the same tokens: RVQ is greedy, so
  that is exactly ``num_levels_used=d``), each with its bitrate;
* ``codebook_usage`` / ``perplexity`` per RVQ level;
* ``baseline_mulaw``: the plain waveform codec at the tokenizer's bitrate -- 8-bit
  mu-law (G.711, mu = 255) PCM at ``bitrate / 8`` samples per second, band-limited
  down and back up with a polyphase filter -- scored the same way;
* ``eval/clip{i}_orig.wav`` / ``eval/clip{i}_recon.wav`` for the first clips.

Both also go to the workdir's TensorBoard at the checkpoint's step (unless the run's
config says ``tensorboard=False``): ``<split>/reconstruction`` (video: the labelled grid,
and ``.../video`` clip 0 real | reconstructed; audio: clip 0's reconstruction, and
``.../real`` the clip).
"""

from __future__ import annotations

import functools
import json
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from scipy import signal

from mmgen import fs
from mmgen.data import media, pipeline
from mmgen.errors import UserError
from mmgen.eval import i3d as i3d_lib
from mmgen.eval import metrics, reference
from mmgen.nn import lpips as lpips_lib
from mmgen.nn.spectral import multiscale_mel_distance
from mmgen.parallel.distributed import host_value, is_writer
from mmgen.progress import progress
from mmgen.train import metrics as train_metrics
from mmgen.train import workdir as workdir_lib

MULAW_BITS = 8  # G.711
MULAW_MU = 255.0


# ----------------------------------------------------------------------------- audio metrics


@functools.cache
def _mel_distance_fn(sample_rate: int, fft_sizes: tuple[int, ...], n_mels: int):
    return jax.jit(functools.partial(multiscale_mel_distance, sample_rate=sample_rate, fft_sizes=fft_sizes,
                                     n_mels=n_mels, log_weight=1.0, linear_weight=0.0))


def mel_distance(reference: np.ndarray, estimate: np.ndarray, cfg) -> float:
    """Multi-scale log-mel distance ``[B, S]`` x ``[B, S]`` -> float (lower is better).

    The sum over the tokenizer's mel scales (``cfg.model.loss.mel_fft_sizes``, SoundStream's
    2^11 .. 2^6 by default, hop s/4, ``n_mels`` bands) of the mean absolute difference of
    log-mel magnitudes: the log term of the training loss, without its amplitude-dependent
    linear term, so that tokenizers trained with different loss weights compare fairly.
    """
    loss_cfg = cfg.model.get("loss", {}) or {}
    fn = _mel_distance_fn(int(cfg.model.sample_rate),
                          tuple(int(s) for s in loss_cfg.get("mel_fft_sizes", (2048, 1024, 512, 256, 128, 64))),
                          int(loss_cfg.get("n_mels", 64)))
    return float(fn(np.asarray(reference, np.float32), np.asarray(estimate, np.float32)))


def mulaw_codec(audio: np.ndarray, sample_rate: int, bitrate: float, bits: int = MULAW_BITS,
                mu: float = MULAW_MU) -> np.ndarray:
    """``[B, S]`` -> the same sound sent through ``bits``-bit mu-law PCM at ``bitrate`` bits/s.

    The sound is resampled (polyphase, anti-aliased) to ``bitrate / bits`` samples per
    second, companded ``sign(x) ln(1 + mu|x|) / ln(1 + mu)``, rounded to ``2^bits``
    levels, expanded and resampled back to ``sample_rate``.
    """
    ratio = Fraction(bitrate / bits / sample_rate).limit_denominator(1000)
    low = signal.resample_poly(audio, ratio.numerator, ratio.denominator, axis=-1)
    y = np.sign(low) * np.log1p(mu * np.abs(np.clip(low, -1, 1))) / math.log1p(mu)
    steps = 2 ** (bits - 1)
    y = np.clip(np.round(y * steps), -steps, steps - 1) / steps
    decoded = np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu
    back = signal.resample_poly(decoded, ratio.denominator, ratio.numerator, axis=-1)
    out = np.zeros_like(audio)
    n = min(audio.shape[-1], back.shape[-1])
    out[..., :n] = back[..., :n]
    return out.astype(np.float32)


def bits_per_token(vocab_size: int, num_levels: int = 1) -> float:
    """``num_levels * log2(vocab_size)``: the information one token position carries."""
    return num_levels * math.log2(vocab_size)


# ----------------------------------------------------------------------------- evaluation


def _split_size(cfg, split: str) -> int:
    try:
        return pipeline.split_size(cfg.dataset, split)
    except ValueError as e:  # DatasetNotPreparedError and friends: one line from the data layer
        raise UserError(str(e).splitlines()[0]) from None


def _batch_size(num: int, largest: int) -> int:
    """The largest batch <= ``largest`` that divides ``num`` (every clip is used once)."""
    return max(b for b in range(1, max(1, min(num, largest)) + 1) if num % b == 0)


def _batches(cfg, split: str, num: int, modality: str):
    batch = _batch_size(num, int(cfg.batch_size))
    it = pipeline.make_iterator(cfg.dataset, split=split, global_batch_size=batch, seed=0, train=False,
                                process_index=0, process_count=1)
    for _ in progress(range(num // batch), desc=f"eval {modality} tokenizer ({split}, {num} clips)", unit="batch"):
        yield next(it)[modality]


def _stderr(values: np.ndarray) -> float:
    """Standard error of the mean over clips: how far two tokenizers' means may differ by chance."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _code_statistics(tokens: np.ndarray, vocab_size: int) -> dict:
    return {"codebook_usage": metrics.codebook_usage(tokens, vocab_size),
            "perplexity": metrics.perplexity(tokens, vocab_size)}


def evaluate_video(tok, split: str, num: int, out_dir: str, num_show: int,
                   networks: reference.Networks | None = None, summaries: dict | None = None) -> dict:
    cfg = tok.cfg
    networks = networks or reference.Networks()
    resolution = int(cfg.dataset.resolution)
    lpips_nets = {name: net for name, net in networks.lpips.items() if reference.lpips_fits(name, resolution)}
    scorer = reference.FrechetScorer(networks) if networks.i3d is not None and num >= 2 else None
    psnrs, ssims, tokens, shown = [], [], [], []
    lpips_values = {name: [] for name in lpips_nets}
    for x in _batches(cfg, split, num, "video"):
        t, _ = tok.encode(media.to_model(x))
        recon = media.from_model(np.asarray(tok.decode(t)))
        psnrs.append(metrics.psnr(x, recon, 255.0, axis=(1, 2, 3, 4)))
        ssims.append(metrics.ssim_per_image(x, recon, 255.0).reshape(-1))
        for name, net in lpips_nets.items():
            lpips_values[name].append(reference.lpips_per_frame(net, x, recon).reshape(-1))
        if scorer is not None:
            scorer.add_real(x)
            scorer.add_generated(recon)
        tokens.append(np.asarray(t))
        if sum(len(s) for s in shown) < 2 * num_show:  # two rows per clip
            shown.append(np.stack([x, recon], axis=1).reshape(-1, *x.shape[1:]))  # ref, recon, ref, ...
    tokens = np.concatenate(tokens)
    levels = tokens.shape[-1] if tokens.ndim == 5 else 1
    d = cfg.dataset
    per_clip = int(np.prod(tokens.shape[1:4]))
    bpt = bits_per_token(tok.vocab_size, levels)
    grid = fs.join(out_dir, "recon.png")
    rows = np.concatenate(shown)[: 2 * num_show]
    labels = [f"clip {i // 2} {'reconstructed' if i % 2 else 'real'}" for i in range(len(rows))]
    title = f"{split} reconstruction, step {tok.step}"
    if is_writer():
        media.save_png_grid(grid, rows, upscale=2, row_labels=labels, title=title)
    if summaries is not None:  # TensorBoard: the grid and clip 0 real | reconstructed
        summaries[f"{split}/reconstruction"] = train_metrics.Picture(
            media.labelled_grid(rows, upscale=2, row_labels=labels, title=title))
        summaries[f"{split}/reconstruction/video"] = train_metrics.Video(
            np.concatenate([rows[0], rows[1]], axis=2), float(cfg.dataset.fps))
    psnrs = np.concatenate(psnrs)
    perceptual = {}
    for name in reference.LPIPS_NETS:
        if name in lpips_nets:
            perceptual[f"lpips_{name}"] = float(np.mean(np.concatenate(lpips_values[name])))
        elif name in networks.lpips:
            perceptual[f"lpips_{name}"] = i3d_lib.unavailable(
                f"frames of {resolution}x{resolution} are below LPIPS-{name}'s {lpips_lib.MIN_SIZE[name]}")
        else:
            perceptual[f"lpips_{name}"] = networks.reason("LPIPS")
    if scorer is not None:
        fvd = scorer.result(int(cfg.dataset.frames))
        perceptual["rfvd"] = fvd.pop("fvd")
        perceptual["rfvd_setup"] = fvd
    elif networks.i3d is not None:
        perceptual["rfvd"] = i3d_lib.unavailable(f"FVD needs at least 2 clips, --num is {num}")
    else:
        perceptual["rfvd"] = networks.reason("FVD")
    return {
        "psnr": float(np.mean(psnrs)),
        "psnr_stderr": _stderr(psnrs),
        "ssim": float(np.mean(np.concatenate(ssims))),
        **perceptual,
        **_code_statistics(tokens, tok.vocab_size),
        "vocab_size": int(tok.vocab_size),
        "bits_per_token": bpt,
        "token_grid": list(tokens.shape[1:]),
        "bits_per_pixel": per_clip * bpt / (int(d.frames) * int(d.resolution) ** 2),
        "files": {"recon_grid": grid},
    }


@functools.partial(jax.jit, static_argnums=2)
def _decode_depths(model, tokens, depths: int):
    """``tokens [B, T, levels]`` -> audio ``[depths, B, T * hop]`` decoded from the first
    1..depths RVQ levels, in one decoder call; ``depths=0``: a single-level quantizer."""
    if depths == 0:
        return model.decode(tokens)[None]
    codes = [model.quantizer.indices_to_codes(tokens[..., :d]) for d in range(1, depths + 1)]
    audio = model.decode_latent(jnp.concatenate(codes))
    return audio.reshape(depths, tokens.shape[0], -1)


def evaluate_audio(tok, split: str, num: int, out_dir: str, num_show: int, summaries: dict | None = None) -> dict:
    cfg = tok.cfg
    rate = int(cfg.model.sample_rate)
    frame_rate = rate / tok.model.hop_length
    rvq = tok.num_levels > 1
    depths = list(range(1, tok.num_levels + 1)) if rvq else [1]
    scores = {d: {"si_snr": [], "mel": []} for d in depths}
    baseline = {"si_snr": [], "mel": []}
    full_bitrate = frame_rate * bits_per_token(tok.vocab_size, tok.num_levels)
    tokens, files, weights = [], [], []
    for x in _batches(cfg, split, num, "audio"):
        t, _ = tok.encode(x)
        t = np.asarray(t)
        tokens.append(t)
        weights.append(len(x))
        by_depth = np.asarray(host_value(_decode_depths(tok.model, t, len(depths) if rvq else 0)))[..., : x.shape[1]]
        for depth, recon in zip(depths, by_depth):  # the deepest last: ``recon`` is then the full one
            scores[depth]["si_snr"].append(metrics.si_snr(x, recon))
            scores[depth]["mel"].append(mel_distance(x, recon, cfg))
        coded = mulaw_codec(x, rate, full_bitrate)
        baseline["si_snr"].append(metrics.si_snr(x, coded))
        baseline["mel"].append(mel_distance(x, coded, cfg))
        for i in range(min(len(x), num_show - len(files) // 2)):
            k = len(files) // 2
            files += [fs.join(out_dir, f"clip{k}_orig.wav"), fs.join(out_dir, f"clip{k}_recon.wav")]
            if is_writer():
                media.write_wav(files[-2], x[i], sample_rate=rate)
                media.write_wav(files[-1], recon[i], sample_rate=rate)
            if summaries is not None and k == 0:  # TensorBoard: clip 0 reconstructed, and real
                summaries[f"{split}/reconstruction"] = train_metrics.Sound(np.asarray(recon[i], np.float32), rate)
                summaries[f"{split}/reconstruction/real"] = train_metrics.Sound(np.asarray(x[i], np.float32), rate)
    tokens = np.concatenate(tokens)
    w = np.asarray(weights, np.float64)

    def summary(s):
        values = np.concatenate(s["si_snr"])
        return {"si_snr": float(np.mean(values)), "si_snr_stderr": _stderr(values),
                "mel_distance": float(np.average(s["mel"], weights=w))}

    by_depth = [{"levels_used": d, "bitrate_bps": frame_rate * bits_per_token(tok.vocab_size, d),
                 **summary(scores[d])} for d in depths]
    per_level = [_code_statistics(tokens[..., l] if rvq else tokens, tok.vocab_size)
                 for l in range(tok.num_levels if rvq else 1)]
    return {
        **summary(scores[depths[-1]]),
        "vocab_size": int(tok.vocab_size),
        "levels": int(tok.num_levels),
        "tokens_per_second": frame_rate * (tok.num_levels if rvq else 1),
        "bitrate_bps": full_bitrate,
        "codebook_usage": [p["codebook_usage"] for p in per_level],
        "perplexity": [p["perplexity"] for p in per_level],
        "by_depth": by_depth,
        "baseline_mulaw": {"bits": MULAW_BITS, "sample_rate": full_bitrate / MULAW_BITS,
                           "bitrate_bps": full_bitrate, **summary(baseline)},
        "files": {"wavs": files},
    }


def evaluate(workdir: str, load_tokenizer, split: str = "test", num: int | None = None,
             step: int | None = None, networks: reference.Networks | None = None) -> dict:
    """Evaluate the tokenizer in ``workdir`` (checkpoint ``step``, default the newest) on
    ``num`` clips of ``split`` (default all).

    ``load_tokenizer(workdir, step=...)`` gives the trained tokenizer
    (``mmgen.families.tokenizer.load``); ``networks`` the pretrained I3D / LPIPS
    networks for video (``reference.load_networks()``; None: those metrics are
    reported unavailable). Writes ``workdir/eval.json`` (the returned dict) and
    ``workdir/eval/`` examples (``eval_step{S}.json`` and ``eval_step{S}/`` for a given
    step). The split and ``num`` are checked before the checkpoint is read.
    """
    cfg = workdir_lib.read_config(workdir)
    available = _split_size(cfg, split)
    num = available if num is None else int(num)
    if not 1 <= num <= available:
        raise UserError(f"--num {num}: split {split!r} of {pipeline.dataset_name(cfg.dataset)} has {available} clips")
    tok = load_tokenizer(workdir, step=step)
    result_path, out_dir = workdir_lib.output_paths(workdir, step)
    if is_writer():
        fs.makedirs(out_dir)
    num_show = min(num, int(cfg.get("num_samples", 4)))
    summaries = {}
    if tok.modality == "video":
        run = lambda *args: evaluate_video(*args, networks=networks, summaries=summaries)
    else:
        run = lambda *args: evaluate_audio(*args, summaries=summaries)
    result = {
        "family": "tokenizer",
        "modality": tok.modality,
        "quantizer": cfg.model.quantizer.kind,
        "step": tok.step,
        "split": split,
        "dataset": pipeline.dataset_name(cfg.dataset),
        "num_examples": num,
        **run(tok, split, num, out_dir, num_show),
    }
    if is_writer():
        fs.write_text(result_path, json.dumps(result, indent=2))
    if cfg.get("tensorboard", True):
        train_metrics.write_media(workdir, tok.step or 0, summaries)
    return result

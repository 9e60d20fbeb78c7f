"""``mmgen tokenize``: round-trip one video or sound through a tokenizer workdir.

    python -m mmgen tokenize --workdir runs/vtok --input clip.mp4 --out recon.mp4 [--save-tokens t.npy]
    python -m mmgen tokenize --workdir runs/atok --input sound.wav --out recon.wav

Video workdir: the input (any file FFmpeg reads) is resampled to the config's frame
rate (sample-and-hold), scaled so its short side is the config's resolution (area
filter) and centre-cropped to a square, then cut to the config's frame count
(``1 + 4n``) or padded by repeating its last frame. ``--out`` receives the
reconstruction alone (mp4, config resolution and rate); ``<out>_compare.mp4`` beside it
shows original | reconstruction side by side. Printed: PSNR and SSIM (uint8 frames,
padding frames excluded), the token grid and bits per pixel.

Audio workdir: the sound of a wav or of a video's audio track, down-mixed to mono and
resampled to the config's rate, is tokenized whole. ``--out`` receives the
reconstruction as a 16-bit wav at that rate. Printed: SI-SNR, the multi-scale mel
distance (``tokenizer_eval.mel_distance``), tokens per second and bitrate.

A missing, empty or corrupt input, a workdir that is not a tokenizer's, or an output
name of the wrong kind ends in one line (``UserError``) before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np

from mmgen.data import media
from mmgen.errors import UserError
from mmgen.eval import metrics
from mmgen.eval.tokenizer_eval import bits_per_token, mel_distance
from mmgen.families import tokenizer as tokenizer_family
from mmgen.train import workdir as workdir_lib

VIDEO_OUT = (".mp4",)
AUDIO_OUT = (".wav",)


def read_workdir_config(workdir: str):
    """The workdir's config; a ``UserError`` when it is not a trained tokenizer's."""
    cfg = workdir_lib.read_config(workdir, ("tokenizer",), "a tokenizer: tokenize needs a tokenizer workdir")
    if cfg.get("modality") not in ("video", "audio"):
        raise UserError(f"{workdir}: config.modality={cfg.get('modality')!r} is neither video nor audio")
    return cfg


# ----------------------------------------------------------------------------- video


@dataclasses.dataclass
class VideoInput:
    """A video file fitted to a tokenizer: ``video`` uint8 [frames, R, R, 3], of which
    the first ``real`` frames come from the file (the rest repeat its last frame)."""

    path: str
    video: np.ndarray
    real: int
    width: int
    height: int
    source_fps: float
    duration: float


def read_video_input(path: str, frames: int, resolution: int, fps: float) -> VideoInput:
    """Any video file -> the tokenizer's clip: rate ``fps``, short side ``resolution``,
    centre square crop, first ``frames`` frames (padded with the last one when short)."""
    try:
        info = media.probe_video(path)
        clip = media.read_video(path, fps=fps, resize_short_side=resolution, with_audio=False)
    except media.MediaError as e:
        raise UserError(str(e)) from None
    video = clip.video
    _, h, w, _ = video.shape
    top, left = (h - resolution) // 2, (w - resolution) // 2
    video = video[:frames, top:top + resolution, left:left + resolution]
    real = len(video)
    if real < frames:
        video = np.concatenate([video, np.repeat(video[-1:], frames - real, axis=0)])
    return VideoInput(path, np.ascontiguousarray(video), real, info.width, info.height, info.fps, clip.duration)


def tokenize_video(tok, clip: VideoInput, out: str, save_tokens: str | None) -> dict:
    d = tok.cfg.dataset
    frames, resolution, fps = int(d.frames), int(d.resolution), float(d.fps)
    video, real = clip.video, clip.real
    tokens, _ = tok.encode(media.to_model(video[None]))
    recon = media.from_model(np.asarray(tok.decode(tokens))[0])
    tokens = np.asarray(tokens)[0]

    levels = tokens.shape[-1] if tokens.ndim == 4 else 1
    result = {
        "psnr": metrics.psnr(video[:real], recon[:real], 255.0),
        "ssim": metrics.ssim(video[:real], recon[:real], 255.0),
        "token_shape": list(tokens.shape),
        "bits_per_token": bits_per_token(tok.vocab_size, levels),
    }
    positions = int(np.prod(tokens.shape[:3]))
    result["bits_per_pixel"] = positions * result["bits_per_token"] / (frames * resolution * resolution)

    media.write_video(out, recon, fps=fps)
    stem, ext = os.path.splitext(out)
    compare = f"{stem}_compare{ext}"
    media.write_video(compare, np.concatenate([video, recon], axis=2), fps=fps)
    if save_tokens:
        np.save(save_tokens, tokens.astype(np.int32))

    padded = frames - real
    print(f"input   {clip.path}: {clip.width}x{clip.height} at {clip.source_fps:g} fps, {clip.duration:.2f} s -> "
          f"{frames} frames {resolution}x{resolution} at {fps:g} fps (short side scaled, centre crop"
          f"{f', last frame repeated {padded} times' if padded else ''})")
    print(f"tokens  {' x '.join(map(str, tokens.shape))} grid, vocabulary {tok.vocab_size} "
          f"({result['bits_per_token']:g} bits per token) = {result['bits_per_pixel']:.4f} bits per pixel")
    print(f"quality PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} (over the {real} input frames)")
    print(f"wrote   {out} (reconstruction) and {compare} (original | reconstruction)")
    return result


# ----------------------------------------------------------------------------- audio


def read_sound(path: str, sample_rate: int) -> np.ndarray:
    """The sound of a wav or video file as float32 [S] mono at ``sample_rate``."""
    try:
        audio = media.read_audio(path, sample_rate=sample_rate)
    except media.MediaError as e:
        raise UserError(str(e)) from None
    if audio.size == 0:
        raise UserError(f"{path}: the audio track holds no samples")
    return audio


def _describe_sound(path: str) -> str:
    """``"2 channels at 44100 Hz"``: what the file held before down-mixing and resampling."""
    with av.open(path) as container:
        ctx = container.streams.audio[0].codec_context
        return f"{ctx.channels} channel{'s' if ctx.channels != 1 else ''} at {ctx.sample_rate} Hz"


def tokenize_audio(tok, path: str, audio: np.ndarray, out: str, save_tokens: str | None) -> dict:
    rate = int(tok.cfg.model.sample_rate)
    tokens, _ = tok.encode(audio[None])
    recon = np.asarray(tok.decode(tokens))[0, : audio.size]
    tokens = np.asarray(tokens)[0]

    levels = tokens.shape[-1] if tokens.ndim == 2 else 1
    frame_rate = rate / tok.model.hop_length
    result = {
        "si_snr": metrics.si_snr(audio, recon),
        "mel_distance": float(mel_distance(audio[None], recon[None], tok.cfg)),
        "token_shape": list(tokens.shape),
        "tokens_per_second": frame_rate * levels,
        "bitrate_bps": frame_rate * bits_per_token(tok.vocab_size, levels),
    }
    media.write_wav(out, recon, sample_rate=rate)
    if save_tokens:
        np.save(save_tokens, tokens.astype(np.int32))
    print(f"input   {path}: {_describe_sound(path)} -> {audio.size / rate:.2f} s, mono at {rate} Hz")
    print(f"tokens  {' x '.join(map(str, tokens.shape))} ({frame_rate:g} frames/s x {levels} level(s) of "
          f"{tok.vocab_size} codes) = {result['tokens_per_second']:g} tokens/s, "
          f"{result['bitrate_bps'] / 1000:.2f} kbps")
    print(f"quality SI-SNR {result['si_snr']:.2f} dB, mel distance {result['mel_distance']:.4f}")
    print(f"wrote   {out} (reconstruction, 16-bit mono {rate} Hz)")
    return result


# ----------------------------------------------------------------------------- entry


def main(args, overrides) -> int:
    if overrides:
        raise UserError("tokenize takes no --config overrides: it uses the workdir's own config")
    cfg = read_workdir_config(args.workdir)
    wanted = VIDEO_OUT if cfg.modality == "video" else AUDIO_OUT
    if os.path.splitext(args.out)[1].lower() not in wanted:
        raise UserError(f"--out {args.out}: a {cfg.modality} tokenizer writes {' or '.join(wanted)} files")
    if not os.path.exists(args.input):
        raise UserError(f"{args.input}: no such file")
    # Decode the input before loading the checkpoint: a bad file fails in a second.
    if cfg.modality == "video":
        d = cfg.dataset
        clip = read_video_input(args.input, int(d.frames), int(d.resolution), float(d.fps))
    else:
        audio = read_sound(args.input, int(cfg.model.sample_rate))

    tok = tokenizer_family.load(args.workdir)
    print(f"{cfg.modality} tokenizer {args.workdir} (step {tok.step}, {cfg.model.quantizer.kind})")
    if cfg.modality == "video":
        tokenize_video(tok, clip, args.out, args.save_tokens)
    else:
        tokenize_audio(tok, args.input, audio, args.out, args.save_tokens)
    if args.save_tokens:
        print(f"wrote   {args.save_tokens} (int32 tokens)")
    return 0

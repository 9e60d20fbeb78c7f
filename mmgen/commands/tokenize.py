"""``mmgen tokenize``: round-trip videos or sounds through a tokenizer workdir.

    python -m mmgen tokenize --workdir runs/vtok --input clip.mp4 --out recon.mp4 [--save-tokens t.npy]
    python -m mmgen tokenize --workdir runs/vtok --input my_videos/ --out recon/ [--save-tokens tokens/]
    python -m mmgen tokenize --workdir runs/atok --input sound.wav --out recon.wav

Video workdir: the whole input (any file FFmpeg reads) is resampled to the config's
frame rate (sample-and-hold), scaled so its short side is the config's resolution
(area filter) and centre-cropped to a square. Its frames are cut, in order, into
consecutive chunks of the config's frame count ``F`` (``1 + 4n``: the clips the causal
tokenizer was trained on; the last chunk is filled up by repeating the last frame),
each chunk encoded and decoded on its own (a batch of chunks at a time), and the
decoded chunks put back in order with the fill dropped: every input frame comes
back. ``--out`` receives the reconstruction (mp4, config resolution and rate) with
the input's sound (mono, at the input's sample rate; none when the input has none);
``<out>_compare.mp4`` beside it shows original | reconstruction side by side.
``--save-tokens`` writes int32 ``[chunks, T', H', W']`` (``[..., levels]`` for RVQ).
Printed: PSNR and SSIM over all input frames (uint8), the chunks, the token grid and
bits per pixel.

Audio workdir: the sound of a wav or of a video's audio track, down-mixed to mono and
resampled to the config's rate, is tokenized whole. ``--out`` receives the
reconstruction as a 16-bit wav at that rate. Printed: SI-SNR, the multi-scale mel
distance (``tokenizer_eval.mel_distance``), tokens per second and bitrate.

A folder as ``--input``: every media file under it (sorted; video extensions, plus
wav/flac/mp3/ogg/m4a for audio), ``--out`` (and ``--save-tokens``) are then folders
that receive one file per input under its relative path (``<name>.mp4`` / ``.wav``,
``<name>.npy``); a file that cannot be read is reported and skipped, and the command
fails only when none could be.

A missing, empty or corrupt input, a workdir that is not a tokenizer's, or an output
name of the wrong kind ends in one line (``UserError``) before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np

from mmgen.data import media
from mmgen.data.builders.video_folder import VIDEO_EXTENSIONS
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
    """A whole video file fitted to a tokenizer: ``video`` uint8 [L, R, R, 3] (all of its
    frames at the config's rate) and its sound, float32 [S] mono at ``sample_rate``
    (None when the file has none)."""

    path: str
    video: np.ndarray
    audio: np.ndarray | None
    sample_rate: int
    width: int
    height: int
    source_fps: float
    duration: float


def _source_sample_rate(path: str) -> int | None:
    with av.open(path) as container:
        if not container.streams.audio:
            return None
        return int(container.streams.audio[0].codec_context.sample_rate or 0) or None


def read_video_input(path: str, resolution: int, fps: float) -> VideoInput:
    """Any video file -> all its frames at ``fps``, short side ``resolution``, centre square
    crop, and its sound at its own rate (mono)."""
    try:
        info = media.probe_video(path)
        rate = _source_sample_rate(path) if info.has_audio else None
        clip = media.read_video(path, fps=fps, resize_short_side=resolution, sample_rate=rate or 16000,
                                with_audio=rate is not None)
    except media.MediaError as e:
        raise UserError(str(e)) from None
    video = clip.video
    _, h, w, _ = video.shape
    top, left = (h - resolution) // 2, (w - resolution) // 2
    video = np.ascontiguousarray(video[:, top:top + resolution, left:left + resolution])
    return VideoInput(path, video, clip.audio, rate or 0, info.width, info.height, info.fps, clip.duration)


def chunk_video(video: np.ndarray, frames: int) -> np.ndarray:
    """uint8 [L, R, R, 3] -> [ceil(L / frames), frames, R, R, 3]: consecutive chunks in order,
    the last one filled up by repeating the video's last frame."""
    pad = -len(video) % frames
    if pad:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    return video.reshape(-1, frames, *video.shape[1:])


def round_trip_chunks(tok, chunks: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, reconstruction uint8) of ``[K, F, R, R, 3]`` chunks, ``batch`` chunks per call
    (the last call filled up with copies, so one compiled shape serves every call)."""
    batch = max(1, min(batch, len(chunks)))
    tokens, recon = [], []
    for lo in range(0, len(chunks), batch):
        part = chunks[lo:lo + batch]
        real = len(part)
        if real < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - real, axis=0)])
        t, _ = tok.encode(media.to_model(part))
        tokens.append(np.asarray(t)[:real])
        recon.append(media.from_model(np.asarray(tok.decode(t)))[:real])
    return np.concatenate(tokens), np.concatenate(recon)


def tokenize_video(tok, clip: VideoInput, out: str, save_tokens: str | None) -> dict:
    d = tok.cfg.dataset
    frames, resolution, fps = int(d.frames), int(d.resolution), float(d.fps)
    video = clip.video
    length = len(video)
    tokens, recon = round_trip_chunks(tok, chunk_video(video, frames))
    recon = recon.reshape(-1, *recon.shape[2:])[:length]  # chunks back in order, the fill dropped

    levels = tokens.shape[-1] if tokens.ndim == 5 else 1
    result = {
        "psnr": metrics.psnr(video, recon, 255.0),
        "ssim": metrics.ssim(video, recon, 255.0),
        "frames": length,
        "chunks": len(tokens),
        "token_shape": list(tokens.shape),
        "bits_per_token": bits_per_token(tok.vocab_size, levels),
    }
    positions = int(np.prod(tokens.shape[1:4]))
    result["bits_per_pixel"] = positions * result["bits_per_token"] / (frames * resolution * resolution)

    sound = dict(audio=clip.audio, sample_rate=clip.sample_rate) if clip.audio is not None else {}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    media.write_video(out, recon, fps=fps, **sound)
    stem, ext = os.path.splitext(out)
    compare = f"{stem}_compare{ext}"
    media.write_video(compare, np.concatenate([video, recon], axis=2), fps=fps, **sound)
    if save_tokens:
        os.makedirs(os.path.dirname(os.path.abspath(save_tokens)), exist_ok=True)
        np.save(save_tokens, tokens.astype(np.int32))

    fill = -length % frames
    print(f"input   {clip.path}: {clip.width}x{clip.height} at {clip.source_fps:g} fps, {clip.duration:.2f} s -> "
          f"{length} frames {resolution}x{resolution} at {fps:g} fps (short side scaled, centre crop), "
          f"{len(tokens)} chunk(s) of {frames}{f' (the last filled with {fill} repeated frames)' if fill else ''}")
    print(f"tokens  {len(tokens)} x {' x '.join(map(str, tokens.shape[1:]))} grid, vocabulary {tok.vocab_size} "
          f"({result['bits_per_token']:g} bits per token) = {result['bits_per_pixel']:.4f} bits per pixel")
    print(f"quality PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} (over the {length} input frames)")
    kept = f"with its sound ({clip.sample_rate} Hz mono)" if clip.audio is not None else "silent like its input"
    print(f"wrote   {out} (reconstruction, {kept}) and {compare} (original | reconstruction)")
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


AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


def _inputs(path: str, modality: str) -> list[str]:
    """Media files under a folder (relative paths, sorted), or [""] for a single file."""
    if not os.path.isdir(path):
        return [""]
    extensions = VIDEO_EXTENSIONS + (AUDIO_EXTENSIONS if modality == "audio" else ())
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), path) for f in sorted(filenames)
                  if f.lower().endswith(extensions) and not f.startswith(".")]
    if not found:
        raise UserError(f"{path}: a folder without media files (looked for {', '.join(extensions)})")
    return found


def _read(cfg, path: str):
    if cfg.modality == "video":
        return read_video_input(path, int(cfg.dataset.resolution), float(cfg.dataset.fps))
    return read_sound(path, int(cfg.model.sample_rate))


def main(args, overrides) -> int:
    if overrides:
        raise UserError("tokenize takes no --config overrides: it uses the workdir's own config")
    cfg = read_workdir_config(args.workdir)
    wanted = VIDEO_OUT if cfg.modality == "video" else AUDIO_OUT
    if not os.path.exists(args.input):
        raise UserError(f"{args.input}: no such file")
    files = _inputs(args.input, cfg.modality)
    folder = files != [""]
    if folder and os.path.splitext(args.out)[1].lower() in VIDEO_OUT + AUDIO_OUT:
        raise UserError(f"--out {args.out}: with a folder as --input, --out is the folder the reconstructions go to")
    if not folder and os.path.splitext(args.out)[1].lower() not in wanted:
        raise UserError(f"--out {args.out}: a {cfg.modality} tokenizer writes {' or '.join(wanted)} files")
    # Decode a single input before loading the checkpoint: a bad file fails in a second.
    first = None if folder else _read(cfg, args.input)

    tok = tokenizer_family.load(args.workdir)
    print(f"{cfg.modality} tokenizer {args.workdir} (step {tok.step}, {cfg.model.quantizer.kind})")
    done, skipped = [], []
    for rel in files:
        src = os.path.join(args.input, rel) if folder else args.input
        stem = os.path.splitext(rel)[0]
        out = os.path.join(args.out, stem + wanted[0]) if folder else args.out
        tokens = (os.path.join(args.save_tokens, stem + ".npy") if folder and args.save_tokens
                  else args.save_tokens)
        try:
            data = first if first is not None else _read(cfg, src)
        except UserError as e:
            if not folder:
                raise
            skipped.append(f"{rel}: {e}")
            print(f"skipped {rel}: {e}")
            continue
        if cfg.modality == "video":
            done.append(tokenize_video(tok, data, out, tokens))
        else:
            done.append(tokenize_audio(tok, src, data, out, tokens))
        if tokens:
            print(f"wrote   {tokens} (int32 tokens)")
    if folder:
        if not done:
            raise UserError(f"{args.input}: none of its {len(files)} media files could be read ({skipped[0]})")
        key = "psnr" if cfg.modality == "video" else "si_snr"
        print(f"done    {len(done)} of {len(files)} files into {args.out}; mean {key} "
              f"{np.mean([r[key] for r in done]):.2f} dB" + (f"; skipped {len(skipped)}" if skipped else ""))
    return 0

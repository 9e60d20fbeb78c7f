"""Media I/O with PyAV: video files with a sound track, wav files, PNG grids (labelled).

Everything the rest of mmgen reads from or writes to disk as pictures or sound goes
through this module, so that one set of conventions holds everywhere:

* video is ``uint8 [T, H, W, 3]`` RGB; ``to_model`` / ``from_model`` convert to and
  from the models' ``float32 [-1, 1]``;
* audio is ``float32 [S]`` mono in ``[-1, 1]`` at a given sample rate; files with
  several channels are down-mixed by the mean of their channels and resampled with
  libswresample;
* a video read at a requested ``fps`` shows, at time ``k / fps``, the newest source
  frame whose timestamp is not after that time (sample-and-hold, what a viewer sees);
* a missing, empty, truncated or undecodable file raises ``MediaError`` (a
  ``ValueError``) whose one-line message names the file and the problem.

Writing: mp4 with H.264 (libx264, yuv420p) video and an AAC mono track; wav as 16-bit
PCM; to any path ``mmgen.fs`` knows (for a URL, ``gs://...``, the file is written locally
and then copied: ``fs.local_file``). PNG grids (rows = clips, columns = frames), optionally
labelled (a title strip and a label per row drawn with PIL's default font in a grey
margin). In memory (for TensorBoard summaries): PNG, animated GIF and wav bytes. Reading
takes local (or mounted) files.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from mmgen import fs

# A file whose decoded stream covers less than this fraction of the duration its
# container declares is treated as truncated (a cut-off download, a killed writer).
_TRUNCATION_TOLERANCE = 0.9


class MediaError(ValueError):
    """A media file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class Clip:
    """Decoded media.

    Attributes:
      video: uint8 [T, H, W, 3] RGB frames, or None for a file without pictures.
      audio: float32 [S] mono in [-1, 1], or None for a file without sound.
      fps: frames per second of ``video`` (0.0 when there is none).
      sample_rate: samples per second of ``audio``.
    """

    video: np.ndarray | None
    audio: np.ndarray | None
    fps: float
    sample_rate: int

    @property
    def duration(self) -> float:
        """Seconds covered by the pictures (or by the sound when there are none)."""
        if self.video is not None and self.fps > 0:
            return len(self.video) / self.fps
        if self.audio is not None:
            return len(self.audio) / self.sample_rate
        return 0.0


# --------------------------------------------------------------------------------
# Model-range conversions
# --------------------------------------------------------------------------------


def to_model(video_uint8):
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1] (numpy or jax, same type out)."""
    return video_uint8.astype(np.float32) / 127.5 - 1.0


def from_model(x):
    """float [-1, 1] -> uint8 [0, 255], clipped and rounded (inverse of ``to_model``)."""
    return ((x.clip(-1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)


# --------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------


def _open(path: str):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{path}: is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: file is empty (0 bytes)")
    try:
        return av.open(path, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: not a readable media file ({_reason(e, path)})") from None


def _reason(e: Exception, path: str = "") -> str:
    """FFmpeg's own words for a failure, without the path it repeats or its errno."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text.replace(f"'{path}'", "").replace(path, ""))
    return text.strip(" :;") or type(e).__name__


def _declared_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _select_frames(frames: Iterator[tuple[float, np.ndarray]], fps: float | None, src_fps: float):
    """Sample-and-hold resampling of (time, frame) pairs to ``fps`` (None = keep all)."""
    out, last_time = [], None
    if fps is None:
        for t, frame in frames:
            out.append(frame)
            last_time = t
        return out, last_time
    eps = 1e-6
    k, prev, t0 = 0, None, None
    for t, frame in frames:
        if t0 is None:
            t0 = t
        t -= t0
        while prev is not None and k / fps < t - eps:
            out.append(prev)
            k += 1
        prev, last_time = frame, t
    if prev is not None:
        end = last_time + 1.0 / src_fps
        while k / fps < end - eps:
            out.append(prev)
            k += 1
    return out, last_time


def _video_frames(container, stream, size: tuple[int, int] | None):
    for frame in container.decode(stream):
        if frame.time is None:
            continue
        if size is not None:
            frame = frame.reformat(width=size[1], height=size[0], format="rgb24", interpolation="AREA")
        yield float(frame.time), frame.to_ndarray(format="rgb24")


def _decode_audio(container, stream, sample_rate: int) -> np.ndarray:
    """All of an audio stream as float32 [S] mono at ``sample_rate``."""
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    chunks = []

    def take(frames):
        for f in frames:
            chunks.append(f.to_ndarray().mean(axis=0))

    for frame in container.decode(stream):
        take(resampler.resample(frame))
    take(resampler.resample(None))
    if not chunks:
        return np.zeros((0,), np.float32)
    return np.clip(np.concatenate(chunks).astype(np.float32), -1.0, 1.0)


def _target_size(width: int, height: int, short_side: int | None) -> tuple[int, int] | None:
    if short_side is None:
        return None
    scale = short_side / min(width, height)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


@dataclasses.dataclass
class VideoInfo:
    """What ``probe_video`` learns about a file without decoding all of it."""

    width: int
    height: int
    fps: float
    duration: float  # seconds
    has_audio: bool


def probe_video(path: str) -> VideoInfo:
    """Check that a video file is whole and say its size, rate and duration.

    Opens the file, decodes its first frame, then seeks near the end and decodes to
    the end: a file cut short fails there while costing only its last keyframe
    interval. Raises ``MediaError`` for what ``read_video`` would reject.
    """
    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream")
        vstream = container.streams.video[0]
        src_fps = float(vstream.average_rate or vstream.guessed_rate or 25)
        declared = _declared_duration(container, vstream)
        try:
            first = next(iter(container.decode(vstream)), None)
            if first is None:
                raise MediaError(f"{path}: no decodable video frames")
            last_time = float(first.time or 0.0)
            if declared is not None and declared > 2.0 / src_fps:
                container.seek(int(_TRUNCATION_TOLERANCE * declared / vstream.time_base), stream=vstream)
                for frame in container.decode(vstream):
                    if frame.time is not None:
                        last_time = max(last_time, float(frame.time))
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"{path}: corrupt video data ({_reason(e, path)})") from None
        decoded = last_time + 1.0 / src_fps
        if declared is not None and declared > 2.0 / src_fps and decoded < _TRUNCATION_TOLERANCE * declared:
            raise MediaError(f"{path}: truncated (decodes to {decoded:.2f} s of the {declared:.2f} s it declares)")
        return VideoInfo(
            width=vstream.codec_context.width, height=vstream.codec_context.height, fps=src_fps,
            duration=declared if declared is not None else decoded, has_audio=bool(container.streams.audio),
        )


def read_video(
    path: str,
    *,
    fps: float | None = None,
    sample_rate: int = 16000,
    resize_short_side: int | None = None,
    with_audio: bool = True,
) -> Clip:
    """Frames and sound of a video file.

    Args:
      path: mp4, webm, avi, mov, ... anything FFmpeg reads.
      fps: resample the frames to this rate (sample-and-hold); None keeps the file's.
      sample_rate: resample the sound to this rate (mono, mean of channels).
      resize_short_side: scale frames (area filter) so the shorter side has this many
        pixels, keeping the aspect ratio; None keeps the file's size.
      with_audio: False skips decoding the sound.

    Returns:
      A ``Clip``: video uint8 [T, H, W, 3]; audio float32 [S] or None when the file has
      no sound track, cut to the pictures' duration (S <= T / fps * sample_rate).

    Raises:
      MediaError: missing, empty, corrupt or truncated file, or no video stream.
    """
    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream")
        vstream = container.streams.video[0]
        vstream.thread_type = "AUTO"
        src_fps = float(vstream.average_rate or vstream.guessed_rate or 25)
        size = _target_size(vstream.codec_context.width, vstream.codec_context.height, resize_short_side)
        try:
            frames, last_time = _select_frames(_video_frames(container, vstream, size), fps, src_fps)
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"{path}: corrupt video data ({_reason(e, path)})") from None
        if not frames:
            raise MediaError(f"{path}: no decodable video frames")
        declared = _declared_duration(container, vstream)
        decoded = (last_time or 0.0) + 1.0 / src_fps
        if declared is not None and declared > 2.0 / src_fps and decoded < _TRUNCATION_TOLERANCE * declared:
            raise MediaError(f"{path}: truncated (decoded {decoded:.2f} s of the {declared:.2f} s it declares)")
        video = np.stack(frames)
    out_fps = float(fps or src_fps)
    audio = None
    if with_audio:
        audio = _read_audio_track(path, sample_rate, required=False)
        if audio is not None:
            # Encoders pad the sound to whole codec frames: cut it to the pictures.
            audio = audio[: round(len(video) / out_fps * sample_rate)]
    return Clip(video=video, audio=audio, fps=out_fps, sample_rate=sample_rate)


def _read_audio_track(path: str, sample_rate: int, required: bool) -> np.ndarray | None:
    with _open(path) as container:
        if not container.streams.audio:
            if required:
                raise MediaError(f"{path}: has no audio stream")
            return None
        try:
            return _decode_audio(container, container.streams.audio[0], sample_rate)
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"{path}: corrupt audio data ({_reason(e, path)})") from None


def read_audio(path: str, *, sample_rate: int = 16000) -> np.ndarray:
    """The sound of any audio or video file as float32 [S] mono in [-1, 1] at ``sample_rate``."""
    return _read_audio_track(os.fspath(path), sample_rate, required=True)


def read_wav(path: str, *, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """A wav file (any rate, any channels) -> (float32 [S] mono, sample_rate).

    ``sample_rate=None`` keeps the file's own rate.
    """
    path = os.fspath(path)
    if sample_rate is None:
        with _open(path) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: has no audio stream")
            sample_rate = container.streams.audio[0].codec_context.sample_rate
    return read_audio(path, sample_rate=sample_rate), int(sample_rate)


# --------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------


def _as_uint8_video(video) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = from_model(video.astype(np.float32))
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be [T, H, W, 3], got shape {video.shape}")
    return video


def _pad_even(video: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column when a side is odd."""
    _, h, w, _ = video.shape
    return np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _audio_frames(audio: np.ndarray, sample_rate: int, frame_size: int, layout: str, fmt: str):
    """float32 [C, S] -> AudioFrames of ``frame_size`` samples (the last one shorter).

    ``fmt`` "fltp" gives planar float frames (AAC); "s16" interleaved 16-bit (PCM).
    """
    n = audio.shape[1]
    for start in range(0, max(n, 1), frame_size):
        chunk = np.ascontiguousarray(audio[:, start : start + frame_size], dtype=np.float32)
        if fmt == "s16":
            chunk = (np.clip(chunk, -1, 1) * 32767).round().astype(np.int16).T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        yield frame


def write_video(
    path: str,
    video,
    *,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 18,
    audio_bitrate: int = 128_000,
) -> None:
    """Write an mp4: H.264 (yuv420p, quality ``crf``) plus an AAC mono track.

    Args:
      video: uint8 [T, H, W, 3] (or float [-1, 1], converted with ``from_model``).
        Odd sides are padded by one repeated row/column (yuv420p needs even sides).
      fps: frame rate.
      audio: float32 [S] mono in [-1, 1], or None for a silent file without a track.
      sample_rate: rate of ``audio``.
    """
    video = _pad_even(_as_uint8_video(video))
    _, h, w, _ = video.shape
    with fs.local_file(path) as local, av.open(local, mode="w") as container:
        vstream = container.add_stream("libx264", rate=_fraction(fps))
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        vstream.options = {"crf": str(crf)}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="mono")
            astream.bit_rate = audio_bitrate
        for frame in video:
            container.mux(vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(vstream.encode(None))
        if astream is not None:
            # AAC wants whole codec frames: zero-pad the sound to a multiple of them.
            frame_size = astream.codec_context.frame_size or 1024
            samples = np.asarray(audio, np.float32).reshape(1, -1)
            samples = np.pad(samples, ((0, 0), (0, -samples.shape[1] % frame_size)))
            for frame in _audio_frames(samples, sample_rate, frame_size, "mono", "fltp"):
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))


def _fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def write_wav(path: str, audio: np.ndarray, *, sample_rate: int) -> None:
    """Write 16-bit PCM wav; ``audio`` float [S] (mono) or [S, C] (C channels) in [-1, 1]."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2:
        raise ValueError(f"audio must be [S] or [S, C], got shape {audio.shape}")
    channels = audio.shape[1]
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
    with fs.local_file(path) as local, av.open(local, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate, layout=layout)
        for frame in _audio_frames(audio.T, sample_rate, 4096, layout, "s16"):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------


def decode_images(encoded) -> np.ndarray:
    """PNG/JPEG byte strings (e.g. the frames of a TFDS ``Video``) -> uint8 [N, H, W, 3] RGB."""
    frames = []
    for i, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError) as e:
            raise MediaError(f"encoded frame {i}: not a decodable image ({e})") from None
    if not frames:
        raise MediaError("no encoded frames to decode")
    return np.stack(frames)


def frame_grid(videos, *, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile clips into one picture: rows = clips, columns = time.

    Args:
      videos: uint8 [N, T, H, W, 3] (or float [-1, 1]), or one clip [T, H, W, 3].

    Returns:
      uint8 [N * (H + pad) - pad, T * (W + pad) - pad, 3].
    """
    videos = np.asarray(videos)
    if videos.ndim == 4:
        videos = videos[None]
    if videos.dtype != np.uint8:
        videos = from_model(videos.astype(np.float32))
    n, t, h, w, c = videos.shape
    grid = np.full((n * (h + pad) - pad, t * (w + pad) - pad, c), pad_value, np.uint8)
    for i in range(n):
        for j in range(t):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = videos[i, j]
    return grid


LABEL_MARGIN_COLOR = (240, 240, 240)


def label_picture(picture: np.ndarray, *, row_labels=(), row_height: int = 0, title: str = "") -> np.ndarray:
    """Draw text labels into a margin around ``picture`` (PIL's default bitmap font).

    A title strip of ``title_height = 4 + line height`` rows goes on top when ``title`` is
    given; a left margin as wide as the longest row label (+8 px) holds ``row_labels[i]``
    at the top of row ``i`` (rows of ``row_height`` pixels). The margins are light grey
    (``LABEL_MARGIN_COLOR``), the text black.

    Returns:
      uint8 [title_height + H, left + W, 3]: ``picture`` placed at (title_height, left).
    """
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text):
        x0, y0, x1, y1 = measure.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    line = max([size(t)[1] for t in (title, *row_labels) if t] or [0])
    top = line + 4 if title else 0
    left = max([size(t)[0] for t in row_labels] or [-8]) + 8
    h, w = picture.shape[:2]
    canvas = Image.new("RGB", (left + w, top + h), LABEL_MARGIN_COLOR)
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture)), (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for i, text in enumerate(row_labels):
        draw.text((4, top + i * row_height + 2), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def labelled_grid(videos, *, pad: int = 2, upscale: int = 1, row_labels=(), title: str = "") -> np.ndarray:
    """``frame_grid(videos)`` upscaled (nearest neighbour) with a title on top and a label per row.

    Returns:
      uint8 RGB; without labels and title exactly the upscaled grid.
    """
    grid = frame_grid(videos, pad=pad)
    if upscale > 1:
        grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
    if not row_labels and not title:
        return grid
    videos = np.asarray(videos)
    row_height = (videos.shape[-3] + pad) * upscale
    return label_picture(grid, row_labels=list(row_labels), row_height=row_height, title=title)


def save_png_grid(path: str, videos, *, pad: int = 2, upscale: int = 1, row_labels=(), title: str = "") -> np.ndarray:
    """Save ``labelled_grid(videos, ...)`` as a PNG; returns the unlabelled ``frame_grid``.

    ``row_labels`` (one per clip, e.g. ``"clip 0 real"``) go in a left margin and ``title``
    (e.g. the task) on top, so a grid read alone says what it shows.
    """
    picture = labelled_grid(videos, pad=pad, upscale=upscale, row_labels=row_labels, title=title)
    with fs.local_file(path) as local:
        Image.fromarray(picture).save(local, format="PNG")
    return frame_grid(videos, pad=pad)


# --------------------------------------------------------------------------------
# In-memory encodings (TensorBoard summaries, web pages)
# --------------------------------------------------------------------------------


def png_bytes(picture: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes(video, *, fps: float) -> bytes:
    """uint8 [T, H, W, 3] (or float [-1, 1]) -> animated GIF bytes, looping, ``1000 / fps`` ms a frame.

    GIF has a 256-colour palette per frame (PIL's adaptive quantizer): fine to look at,
    not for measuring.
    """
    frames = [Image.fromarray(f) for f in _as_uint8_video(video)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(1, round(1000.0 / fps)), loop=0)
    return buffer.getvalue()


def wav_bytes(audio: np.ndarray, *, sample_rate: int) -> bytes:
    """float [S] mono in [-1, 1] -> 16-bit PCM wav file bytes (clipped to [-1, 1])."""
    import wave

    pcm = np.round(np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return buffer.getvalue()

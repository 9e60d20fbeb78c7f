"""``moving_shapes_av``: procedurally generated audio-visual clips (TFDS, ArrayRecord).

A clip shows coloured shapes moving over a textured, slowly scrolling background.
One of them, the *main* shape (largest, drawn on top), makes the sound:

* a tone whose pitch follows the main shape's height on screen,
  ``f = low * (high / low) ** (1 - y)`` with ``y`` in [0, 1] the normalised vertical
  position of its centre (0 = top row, 1 = bottom row), ``low = 220 Hz``,
  ``high = 880 Hz``: two octaves, higher on screen sounds higher
  (``height_to_pitch`` / ``pitch_to_height``, monotone and exact inverses);
* a short noise click at every bounce (against a wall, or on the floor);
* the timbre says the shape: circle = pure sine, square = 1st + 3rd harmonic,
  triangle = 1st + 2nd harmonic.

Small distractor shapes bounce around silently (``max_distractors=0``: none); the
background is a texture, or one colour per clip with ``background="plain"``; the main
shape's radius, 0.12-0.2 of the frame, is scaled by ``main_scale``: easier variants for
controlled experiments and for the demo (``mmgen demo``: one large shape on one
colour). The label is the main shape's family, ``shape_motion`` with shape in (circle,
square, triangle) and motion in (bounce: straight lines reflected by the walls, gravity: a ball bouncing on the floor,
orbit: a circle, no bounces), 9 classes. Metadata per frame: the main shape's centre
(``main_x``, ``main_y``), its pitch (``pitch_hz``) and whether a bounce happens during
the frame (``bounce``), so evaluations can measure audio-visual agreement.

Everything is an analytic function of time, evaluated at frame times ``k / fps`` for
pictures and at sample times ``n / sample_rate`` for sound; clip ``i`` of a split is
drawn from ``np.random.default_rng((seed, split, i))``, so the same config always gives
the same data, in any order. Sizes are builder configs: ``tiny`` (9 x 32^2, 2000/200
clips, seconds to build), ``small`` (17 x 64^2), ``default`` (17 x 128^2, 4000/400),
or any ``MovingShapesConfig`` passed to the builder.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

PITCH_LOW_HZ = 220.0
PITCH_HIGH_HZ = 880.0

SHAPES = ("circle", "square", "triangle")
MOTIONS = ("bounce", "gravity", "orbit")
BACKGROUNDS = ("texture", "plain")
CLASS_NAMES = tuple(f"{shape}_{motion}" for motion in MOTIONS for shape in SHAPES)

# Harmonic amplitudes (1st, 2nd, 3rd) of the main tone, by shape.
_TIMBRE = {"circle": (1.0, 0.0, 0.0), "square": (1.0, 0.0, 0.35), "triangle": (1.0, 0.45, 0.0)}


def height_to_pitch(y, low: float = PITCH_LOW_HZ, high: float = PITCH_HIGH_HZ):
    """Normalised height y in [0, 1] (0 = top) -> tone frequency in Hz (monotone decreasing)."""
    return low * (high / low) ** (1.0 - np.asarray(y, np.float64))


def pitch_to_height(f, low: float = PITCH_LOW_HZ, high: float = PITCH_HIGH_HZ):
    """Inverse of ``height_to_pitch``: frequency in Hz -> normalised height (0 = top)."""
    return 1.0 - np.log(np.asarray(f, np.float64) / low) / math.log(high / low)


def label_name(label: int) -> str:
    return CLASS_NAMES[int(label)]


# --------------------------------------------------------------------------------
# Trajectories: position and bounce count as analytic functions of time
# --------------------------------------------------------------------------------


def _reflect(p, lo, hi):
    """Position of a point moving on a line folded into [lo, hi]; and the fold count."""
    span = hi - lo
    u = p - lo
    folds = np.floor(u / span)
    u = np.mod(u, 2 * span)
    return lo + np.where(u < span, u, 2 * span - u), folds


@dataclasses.dataclass
class _Trajectory:
    """Centre (x, y) of one shape at times t [N], and its fold counts [N, 2] per axis.

    A bounce happens wherever a fold count changes between consecutive times.
    """

    motion: str
    lo: float
    hi: float
    p0: tuple[float, float]
    v: tuple[float, float]
    period: float = 1.0  # gravity: seconds between floor bounces
    phase: float = 0.0  # gravity: seconds into the first period; orbit: radians
    apex: float = 0.0  # gravity: highest y
    radius: float = 0.0  # orbit
    omega: float = 0.0  # orbit: radians per second

    def __call__(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.motion == "orbit":
            angle = self.phase + self.omega * t
            x = self.p0[0] + self.radius * np.cos(angle)
            y = self.p0[1] + self.radius * np.sin(angle)
            return x, y, np.zeros(t.shape + (2,))
        x, x_folds = _reflect(self.p0[0] + self.v[0] * t, self.lo, self.hi)
        if self.motion == "bounce":
            y, y_folds = _reflect(self.p0[1] + self.v[1] * t, self.lo, self.hi)
        else:  # gravity: parabolic arcs between floor contacts, no energy lost
            s = (t + self.phase) / self.period
            u = 2.0 * (s - np.floor(s)) - 1.0
            y = self.hi - (self.hi - self.apex) * (1.0 - u * u)
            y_folds = np.floor(s)
        return x, y, np.stack([x_folds, y_folds], axis=-1)


def _draw_trajectory(rng: np.random.Generator, motion: str, radius: float, slow: bool = False) -> _Trajectory:
    lo, hi = radius, 1.0 - radius
    p0 = (rng.uniform(lo, hi), rng.uniform(lo, hi))
    speed = 0.5 if slow else 1.0
    if motion == "bounce":
        vy = rng.choice([-1, 1]) * rng.uniform(0.5, 1.2) * speed
        vx = rng.choice([-1, 1]) * rng.uniform(0.0, 0.8) * speed
        return _Trajectory("bounce", lo, hi, p0, (vx, vy))
    if motion == "gravity":
        vx = rng.choice([-1, 1]) * rng.uniform(0.0, 0.4)
        period = rng.uniform(0.45, 0.9)
        apex = rng.uniform(lo, lo + 0.5 * (hi - lo))
        return _Trajectory("gravity", lo, hi, p0, (vx, 0.0), period=period, phase=rng.uniform(0, period), apex=apex)
    orbit_r = rng.uniform(0.15, 0.5 * (hi - lo) - 0.01)
    centre = (rng.uniform(lo + orbit_r, hi - orbit_r), rng.uniform(lo + orbit_r, hi - orbit_r))
    omega = rng.choice([-1, 1]) * 2 * math.pi / rng.uniform(0.8, 2.0)
    return _Trajectory("orbit", lo, hi, centre, (0.0, 0.0), phase=rng.uniform(0, 2 * math.pi), radius=orbit_r, omega=omega)


# --------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------


def _plane_wave(fx, fy, phase, x, y):
    """sin(2 pi (fx x + fy y) + phase) from separable factors: x [T, 1, W], y [T, H, 1]."""
    ax, ay = 2 * math.pi * fx * x, 2 * math.pi * fy * y + phase
    return np.sin(ax) * np.cos(ay) + np.cos(ax) * np.sin(ay)


def _background(rng: np.random.Generator, t: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                kind: str = "texture") -> np.ndarray:
    """float32 [T, H, W, 3] in [0, 1]: plasma, stripes or checkerboard, scrolling; or one colour."""
    if kind == "plain":
        colour = rng.uniform(0.1, 0.55, size=3).astype(np.float32)
        return np.broadcast_to(colour, (len(t), len(ys), len(xs), 3)).copy()
    if kind not in BACKGROUNDS:
        raise ValueError(f"moving_shapes_av background must be one of {BACKGROUNDS}, not {kind!r}")
    shift = rng.uniform(-0.15, 0.15, size=2)
    x = (xs[None, None, :] - shift[0] * t[:, None, None]).astype(np.float32)
    y = (ys[None, :, None] - shift[1] * t[:, None, None]).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        v = sum(_plane_wave(*rng.uniform(-3, 3, size=2), rng.uniform(0, 2 * math.pi), x, y) for _ in range(3))
        v = 0.5 + v / 6.0
    elif kind == 1:
        angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 8)
        v = 0.5 + 0.5 * _plane_wave(freq * math.cos(angle), freq * math.sin(angle), 0.0, x, y)
    else:
        freq = rng.uniform(2, 5)
        v = 0.5 + 0.5 * np.clip(4.0 * np.sin(2 * math.pi * freq * x) * np.sin(2 * math.pi * freq * y), -1, 1)
    low, high = rng.uniform(0.1, 0.55, size=(2, 3)).astype(np.float32)
    return low + (high - low) * v[..., None]


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform()
    rgb = np.clip(np.abs(np.mod(hue * 6 + np.array([0.0, 4.0, 2.0]), 6) - 3) - 1, 0, 1)
    return (0.25 + 0.75 * rgb).astype(np.float32)


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
    """Distance (normalised units, < 0 inside) to a shape centred at 0 in its own frame."""
    if shape == "circle":
        return np.sqrt(px * px + py * py) - np.float32(radius)
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.85 * radius
    circum = 1.2 * radius  # equilateral triangle: inradius = circumradius / 2
    d = None
    for k in range(3):
        a = math.pi / 2 + 2 * math.pi * k / 3
        edge = px * math.cos(a) + py * math.sin(a)
        d = edge if d is None else np.maximum(d, edge)
    return d - circum / 2


def _paint(frames, shape, colour, x, y, angle, radius, coords, pixels):
    """Alpha-blend one anti-aliased shape into frames float32 [T, H, W, 3] (in place).

    x, y, angle: [T] centre and rotation per frame; coords [R]: pixel-centre positions.
    """
    x, y, angle = (np.asarray(a, np.float32) for a in (x, y, angle))
    dx = coords[None, None, :] - x[:, None, None]
    dy = coords[None, :, None] - y[:, None, None]
    if shape == "circle":  # rotation-invariant
        px, py = dx, dy
    else:
        c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        px, py = c * dx + s * dy, c * dy - s * dx
    d = _signed_distance(shape, px, py, radius)
    alpha = np.clip(0.5 - d * pixels, 0.0, 1.0)[..., None]
    frames += alpha * (colour - frames)


# --------------------------------------------------------------------------------
# Sound
# --------------------------------------------------------------------------------


def _tone(shape: str, freq: np.ndarray, sample_rate: int, phase0: float) -> np.ndarray:
    """float32 [S] in [-1, 1]: harmonics of the instantaneous frequency ``freq`` [S] (Hz)."""
    phase = np.mod(phase0 + 2 * math.pi * np.cumsum(freq, dtype=np.float64) / sample_rate, 2 * math.pi)
    s1 = np.sin(phase.astype(np.float32))
    h1, h2, h3 = _TIMBRE[shape]
    wave = h1 * s1
    if h2:
        wave += h2 * 2 * s1 * np.cos(phase.astype(np.float32))  # sin 2p
    if h3:
        wave += h3 * (3 * s1 - 4 * s1**3)  # sin 3p
    return wave / (h1 + h2 + h3)


def _clicks(rng: np.random.Generator, bounces: np.ndarray, sample_rate: int, num_samples: int) -> np.ndarray:
    """Decaying noise bursts (20 ms, 4 ms time constant) starting at the bounce samples."""
    length = int(0.02 * sample_rate)
    envelope = np.exp(-np.arange(length) / (0.004 * sample_rate)).astype(np.float32)
    out = np.zeros(num_samples + length, np.float32)
    for start in bounces:
        out[start : start + length] += envelope * rng.uniform(-1.0, 1.0, length).astype(np.float32)
    return out[:num_samples]


# --------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------


def generate_clip(
    rng: np.random.Generator,
    *,
    frames: int,
    resolution: int,
    fps: float,
    sample_rate: int,
    max_distractors: int = 2,
    pitch_low_hz: float = PITCH_LOW_HZ,
    pitch_high_hz: float = PITCH_HIGH_HZ,
    background: str = "texture",
    main_scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """One example: video uint8 [T, R, R, 3], audio float32 [round(T / fps * sr)], metadata.

    Returns the feature dict of the builder: ``video``, ``audio``, ``label``,
    ``has_audio``, ``main_x`` / ``main_y`` / ``pitch_hz`` float32 [T], ``bounce`` bool [T].
    """
    label = int(rng.integers(len(CLASS_NAMES)))
    motion, shape = MOTIONS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    num_samples = round(frames / fps * sample_rate)
    t_frames = np.arange(frames) / fps
    coords = ((np.arange(resolution) + 0.5) / resolution).astype(np.float32)

    video = _background(rng, t_frames, coords, coords, background)
    for _ in range(int(rng.integers(max_distractors + 1))):
        radius = rng.uniform(0.06, 0.1)
        path = _draw_trajectory(rng, "bounce", radius, slow=True)
        x, y, _ = path(t_frames)
        spin = rng.uniform(-3, 3)
        _paint(video, SHAPES[rng.integers(3)], _saturated_colour(rng), x, y, spin * t_frames, radius, coords, resolution)

    radius = main_scale * rng.uniform(0.12, 0.2)
    path = _draw_trajectory(rng, motion, radius)
    angle = rng.uniform(0, 2 * math.pi) + rng.uniform(-2, 2) * t_frames
    main_x, main_y, _ = path(t_frames)
    _paint(video, shape, _saturated_colour(rng), main_x, main_y, angle, radius, coords, resolution)

    # The sound follows the path at a 1 kHz control rate, interpolated to the samples.
    hop = max(1, sample_rate // 1000)
    control = np.arange(0, num_samples + hop, hop)
    _, y_control, folds = path(control / sample_rate)
    freq = np.interp(np.arange(num_samples), control, height_to_pitch(y_control, pitch_low_hz, pitch_high_hz))
    bounces = control[1:][np.any(np.diff(folds, axis=0) != 0, axis=1)]
    bounces = bounces[bounces < num_samples]
    audio = 0.35 * _tone(shape, freq, sample_rate, rng.uniform(0, 2 * math.pi))
    audio += 0.5 * _clicks(rng, bounces, sample_rate, num_samples)
    audio += 0.005 * rng.standard_normal(num_samples, dtype=np.float32)

    bounce = np.zeros(frames, bool)
    bounce[np.minimum(bounces * fps // sample_rate, frames - 1).astype(int)] = True
    return {
        "video": np.round(np.clip(video, 0, 1) * 255).astype(np.uint8),
        "audio": np.clip(audio, -1, 1).astype(np.float32),
        "label": label,
        "has_audio": True,
        "main_x": main_x.astype(np.float32),
        "main_y": main_y.astype(np.float32),
        "pitch_hz": height_to_pitch(main_y, pitch_low_hz, pitch_high_hz).astype(np.float32),
        "bounce": bounce,
    }


# --------------------------------------------------------------------------------
# TFDS builder
# --------------------------------------------------------------------------------


class MovingShapesConfig(tfds.core.BuilderConfig):
    """Size of the generated dataset; every number that shapes the data lives here."""

    def __init__(
        self,
        *,
        frames: int,
        resolution: int,
        fps: float = 8.0,
        sample_rate: int = 16000,
        num_train: int,
        num_test: int,
        seed: int = 0,
        max_distractors: int = 2,
        pitch_low_hz: float = PITCH_LOW_HZ,
        pitch_high_hz: float = PITCH_HIGH_HZ,
        background: str = "texture",
        main_scale: float = 1.0,
        **kwargs,
    ):
        kwargs.setdefault(
            "description",
            f"{frames} frames x {resolution}^2 at {fps:g} fps, {sample_rate} Hz audio, "
            f"{num_train} train / {num_test} test clips, seed {seed}",
        )
        super().__init__(**kwargs)
        self.frames, self.resolution, self.fps, self.sample_rate = frames, resolution, fps, sample_rate
        self.num_train, self.num_test, self.seed = num_train, num_test, seed
        if background not in BACKGROUNDS:  # checked here too: before anything is generated
            raise ValueError(f"moving_shapes_av background must be one of {BACKGROUNDS}, not {background!r}")
        if not 0.25 <= main_scale <= 2.0:  # radius 0.4 at most: the shape still moves inside the frame
            raise ValueError(f"moving_shapes_av main_scale must be in [0.25, 2], not {main_scale!r}")
        self.max_distractors, self.background, self.main_scale = max_distractors, background, main_scale
        self.pitch_low_hz, self.pitch_high_hz = pitch_low_hz, pitch_high_hz

    @property
    def num_samples(self) -> int:
        return round(self.frames / self.fps * self.sample_rate)


BUILDER_CONFIGS = (
    MovingShapesConfig(name="tiny", frames=9, resolution=32, num_train=2000, num_test=200),
    MovingShapesConfig(name="small", frames=17, resolution=64, num_train=4000, num_test=400),
    MovingShapesConfig(name="default", frames=17, resolution=128, num_train=4000, num_test=400),
)


class MovingShapesAv(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes with a sound track tied to the picture (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # random access, no TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        raw = tfds.features.Encoding.BYTES  # stored as raw bytes: fast to write and read
        t = cfg.frames
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(t, cfg.resolution, cfg.resolution, 3), dtype=np.uint8, encoding=raw),
                "audio": tfds.features.Tensor(shape=(cfg.num_samples,), dtype=np.float32, encoding=raw),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "has_audio": tfds.features.Scalar(dtype=np.bool_),
                "main_x": tfds.features.Tensor(shape=(t,), dtype=np.float32),
                "main_y": tfds.features.Tensor(shape=(t,), dtype=np.float32),
                "pitch_hz": tfds.features.Tensor(shape=(t,), dtype=np.float32),
                "bounce": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
            }),
            metadata=tfds.core.MetadataDict(
                fps=cfg.fps, sample_rate=cfg.sample_rate,
                pitch_low_hz=cfg.pitch_low_hz, pitch_high_hz=cfg.pitch_high_hz,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples(split_index=0, count=cfg.num_train),
            "test": self._generate_examples(split_index=1, count=cfg.num_test),
        }

    def _generate_examples(self, split_index: int, count: int):
        cfg = self.builder_config
        for i in range(count):
            rng = np.random.default_rng((cfg.seed, split_index, i))
            yield i, generate_clip(
                rng, frames=cfg.frames, resolution=cfg.resolution, fps=cfg.fps, sample_rate=cfg.sample_rate,
                max_distractors=cfg.max_distractors, pitch_low_hz=cfg.pitch_low_hz, pitch_high_hz=cfg.pitch_high_hz,
                background=cfg.background, main_scale=cfg.main_scale,
            )

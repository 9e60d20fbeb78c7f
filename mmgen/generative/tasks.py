"""The task registry: every generation task as data, and what it conditions on.

A task (MAGVIT's multi-task setup, extended to audio; docs/ALGORITHMS.md "Masked
multi-task transformer") says, per modality, which latent positions are
**condition** (given), which are **targets** (generated) and whether the modality
is **absent**, plus whether the condition token is the class label. Training draws
tasks by weight per example and sampling takes a task name; both read the same
``condition_region``, so a task means the same thing in both (MAGVIT's "one mask
function serves training and decoding").

Regions are stated in latent coordinates:

* ``first`` / ``last``: the leading / trailing fraction of latent frames given
  (rounded, at least one frame given and one generated).
* ``box``: ``(top, left, height, width)`` as fractions of ``H'`` and ``W'``; with
  ``box_given`` the box is the condition (outpainting), otherwise the box is the
  target and everything around it is given (inpainting).
* ``dynamic``: the box is drawn per example from an rng (side lengths uniform in
  ``box_size`` as fractions of ``H'`` / ``W'``) and moves linearly from a random
  start to a random end position over the clip. Jittable.

For COMMIT (MAGVIT) the condition is also built in pixel space, tokenized by the
frozen tokenizer, and its tokens fill masked positions inside the region:
``build_condition_video`` keeps the pixels of the region (with the same rng as
``condition_region``), pads the rest of a partly kept frame with ``fill``, and fills
frames with nothing kept by repeating the last frame that had something kept (so
frame prediction repeats the last given frame). The causal tokenizer maps latent
frame 0 to pixel frame 0 and latent frame ``i > 0`` to pixel frames
``factor*(i-1)+1 .. factor*i`` (``factor = 4`` for MAGVIT-v2).

Choices made where the papers leave room: ``outpainting_horizontal`` gives the
central vertical strip (half the width) and generates left and right;
``outpainting_vertical`` gives the central horizontal band and generates top and
bottom; frame prediction gives 40% of latent frames (2 of 5 = 5 of 17 pixel
frames, MAGVIT's setting); audio-visual continuation gives 30% of the audio frames,
the same time span as the 5 given video frames of 17.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("absent", "target", "condition", "partial")
_ABSENT, _TARGET, _CONDITION, _PARTIAL = range(4)
_BOX_NONE, _BOX_GIVEN, _BOX_TARGET = range(3)


@dataclasses.dataclass(frozen=True)
class Role:
    """What one modality is in a task (see the module docstring for the fields)."""

    kind: str = "target"
    first: float = 0.0
    last: float = 0.0
    box: tuple[float, float, float, float] | None = None
    box_given: bool = True
    dynamic: bool = False
    box_size: tuple[float, float] = (0.25, 0.5)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"role kind {self.kind!r} is not one of {KINDS}")


@dataclasses.dataclass(frozen=True)
class Task:
    """One named task: a role per modality and the kind of condition token."""

    name: str
    video: Role
    audio: Role
    class_label: bool = False
    description: str = ""

    def role(self, modality: str) -> Role:
        return getattr(self, modality)

    @property
    def index(self) -> int:
        return TASK_NAMES.index(self.name)

    def modalities(self) -> tuple[str, ...]:
        """The modalities in this task's sequence (absent ones left out)."""
        return tuple(m for m in ("video", "audio") if self.role(m).kind != "absent")


_ABS, _GEN, _GIVEN = Role("absent"), Role("target"), Role("condition")
_CENTRAL = (0.25, 0.25, 0.5, 0.5)

_REGISTRY = (
    Task("class_conditional", _GEN, _ABS, class_label=True, description="video from a class label"),
    Task("unconditional", _GEN, _ABS, description="video from nothing"),
    Task("frame_prediction", Role("partial", first=0.4), _ABS, description="future frames from the first ones"),
    Task(
        "frame_interpolation",
        Role("partial", first=0.2, last=0.2),
        _ABS,
        description="middle frames from the first and last ones",
    ),
    Task("outpainting_central", Role("partial", box=_CENTRAL), _ABS, description="surroundings of a central box"),
    Task(
        "outpainting_horizontal",
        Role("partial", box=(0.0, 0.25, 1.0, 0.5)),
        _ABS,
        description="left and right of a central vertical strip",
    ),
    Task(
        "outpainting_vertical",
        Role("partial", box=(0.25, 0.0, 0.5, 1.0)),
        _ABS,
        description="top and bottom of a central horizontal band",
    ),
    Task(
        "outpainting_dynamic",
        Role("partial", dynamic=True, box_size=(0.5, 0.75)),
        _ABS,
        description="surroundings of a random moving box",
    ),
    Task(
        "inpainting_central",
        Role("partial", box=_CENTRAL, box_given=False),
        _ABS,
        description="a central box from its surroundings",
    ),
    Task(
        "inpainting_dynamic",
        Role("partial", dynamic=True, box_given=False, box_size=(0.25, 0.5)),
        _ABS,
        description="a random moving box from its surroundings",
    ),
    Task("audio_to_video", _GEN, _GIVEN, description="video for a sound track"),
    Task("video_to_audio", _GIVEN, _GEN, description="sound track for a video"),
    Task("audio_video", _GEN, _GEN, description="video and sound together"),
    Task("audio_continuation", _ABS, Role("partial", first=0.5), description="the rest of a sound"),
    Task(
        "audio_video_continuation",
        Role("partial", first=0.4),
        Role("partial", first=0.3),
        description="the rest of a video with its sound",
    ),
)

TASKS: dict[str, Task] = {t.name: t for t in _REGISTRY}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError listing the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def task_id(name: str) -> int:
    return get_task(name).index


def check_tasks(names: Sequence[str], modalities: Sequence[str]) -> None:
    """Raise if a task is unknown or needs a modality the model does not have."""
    for name in names:
        missing = [m for m in get_task(name).modalities() if m not in modalities]
        if missing:
            raise ValueError(f"task {name!r} needs {missing} but the model only has {list(modalities)}")


# ----------------------------------------------------------------------------
# Per-example regions (jittable; task ids may differ within a batch).
# ----------------------------------------------------------------------------


def _frame_count(fraction: float, frames: int) -> int:
    if fraction <= 0:
        return 0
    return min(max(int(round(fraction * frames)), 1), max(frames - 1, 1))


def _static_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    top, left, h, w = box
    rows = min(max(int(round(h * height)), 1), height)
    cols = min(max(int(round(w * width)), 1), width)
    return (min(int(round(top * height)), height - rows), min(int(round(left * width)), width - cols), rows, cols)


def _role_table(modality: str, grid: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-task numbers of one modality for this latent grid (indexed by task id)."""
    frames = grid[0]
    height, width = (grid[1], grid[2]) if len(grid) >= 3 else (1, 1)
    rows = []
    for task in _REGISTRY:
        r = task.role(modality)
        box_mode = _BOX_NONE if (r.box is None and not r.dynamic) else (_BOX_GIVEN if r.box_given else _BOX_TARGET)
        box = _static_box(r.box, height, width) if r.box is not None else (0, 0, height, width)
        rows.append(
            (KINDS.index(r.kind), _frame_count(r.first, frames), _frame_count(r.last, frames), box_mode, *box,
             int(r.dynamic), *r.box_size)
        )
    a = np.asarray(rows, np.float64)
    ints = a[:, :9].astype(np.int32)
    return dict(
        kind=ints[:, 0], first=ints[:, 1], last=ints[:, 2], box_mode=ints[:, 3], box=ints[:, 4:8],
        dynamic=ints[:, 8].astype(bool), box_size=a[:, 9:11].astype(np.float32),
    )


def _moving_boxes(rng, batch: int, grid, size_range) -> jax.Array:
    """Random boxes ``[B, T', 4]`` (top, left, rows, cols) moving linearly in time."""
    frames, height, width = grid
    u = jax.random.uniform(rng, (batch, 3, 2))  # one draw: (size, start, end) x (rows, cols)
    lo, hi = size_range[:, None, 0], size_range[:, None, 1]
    size = lo + (hi - lo) * u[:, 0]
    extent = jnp.asarray([height, width], jnp.float32)
    rows_cols = jnp.clip(jnp.round(size * extent), 1, extent).astype(jnp.int32)  # [B, 2]
    room = (extent - rows_cols + 1).astype(jnp.float32)
    start = jnp.minimum(jnp.floor(u[:, 1] * room), room - 1)
    end = jnp.minimum(jnp.floor(u[:, 2] * room), room - 1)
    progress = jnp.arange(frames, dtype=jnp.float32) / max(frames - 1, 1)  # [T']
    corner = jnp.round(start[:, None] + (end - start)[:, None] * progress[None, :, None]).astype(jnp.int32)
    return jnp.concatenate([corner, jnp.broadcast_to(rows_cols[:, None], corner.shape)], axis=-1)


def condition_region(task_ids: jax.Array, modality: str, grid: Sequence[int], rng: jax.Array | None = None) -> jax.Array:
    """bool ``[B, *grid]``: True at latent positions given as condition.

    ``grid`` is ``(T', H', W')`` for video, ``(T_a,)`` for audio (RVQ levels share
    their frame's region). ``rng`` (required for video) draws the dynamic
    tasks' boxes; the same key gives the same boxes as ``build_condition_video``.
    """
    grid = tuple(int(n) for n in grid)
    table = {k: jnp.asarray(v) for k, v in _role_table(modality, grid).items()}
    ids = jnp.asarray(task_ids, jnp.int32)
    batch, frames = ids.shape[0], grid[0]
    kind, box_mode = table["kind"][ids], table["box_mode"][ids]

    t = jnp.arange(frames)
    temporal = (t[None] < table["first"][ids][:, None]) | (t[None] >= frames - table["last"][ids][:, None])
    partial = temporal.reshape((batch, frames) + (1,) * (len(grid) - 1))
    if len(grid) >= 3:
        if rng is None:
            raise ValueError("video regions need an rng: the dynamic tasks draw their box from it")
        boxes = jnp.broadcast_to(table["box"][ids][:, None], (batch, frames, 4))
        moving = _moving_boxes(rng, batch, grid[:3], table["box_size"][ids])
        boxes = jnp.where(table["dynamic"][ids][:, None, None], moving, boxes)
        top, left, rows, cols = (boxes[..., i][:, :, None, None] for i in range(4))
        h = jnp.arange(grid[1])[None, None, :, None]
        w = jnp.arange(grid[2])[None, None, None, :]
        in_box = (h >= top) & (h < top + rows) & (w >= left) & (w < left + cols)  # [B, T', H', W']
        mode = box_mode[:, None, None, None]
        box_part = jnp.where(mode == _BOX_GIVEN, in_box, jnp.where(mode == _BOX_TARGET, ~in_box, False))
        partial = partial | box_part
    partial = jnp.broadcast_to(partial, (batch, *grid))
    kind = kind.reshape((batch,) + (1,) * len(grid))
    return jnp.where(kind == _CONDITION, True, jnp.where(kind == _PARTIAL, partial, False))


def modality_present(task_ids: jax.Array, modality: str) -> jax.Array:
    """bool ``[B]``: the modality is part of the example's task."""
    kinds = jnp.asarray([KINDS.index(t.role(modality).kind) for t in _REGISTRY], jnp.int32)
    return kinds[jnp.asarray(task_ids, jnp.int32)] != _ABSENT


def uses_class_label(task_ids: jax.Array) -> jax.Array:
    """bool ``[B]``: the condition token is the class label (else UNCOND)."""
    flags = jnp.asarray([t.class_label for t in _REGISTRY])
    return flags[jnp.asarray(task_ids, jnp.int32)]


# ----------------------------------------------------------------------------
# Drawing tasks during training (classifier-free-guidance dropout is in masking.py).
# ----------------------------------------------------------------------------


def task_probabilities(weights: Mapping[str, float]) -> np.ndarray:
    """Normalised probabilities over ``TASK_NAMES`` from a dict task -> weight."""
    probs = np.zeros(len(TASK_NAMES), np.float64)
    for name, weight in dict(weights).items():
        if float(weight) < 0:
            raise ValueError(f"task weight for {name!r} is {weight}; weights must be >= 0")
        probs[task_id(name)] = float(weight)
    if probs.sum() <= 0:
        raise ValueError(f"task weights {dict(weights)} give no task a positive weight")
    return probs / probs.sum()


def sample_task_ids(rng: jax.Array, batch_size: int, weights: Mapping[str, float]) -> jax.Array:
    """int32 ``[B]`` task ids drawn independently with probability proportional to weight."""
    probs = task_probabilities(weights)
    logits = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf).astype(np.float32)
    return jax.random.categorical(rng, jnp.asarray(logits), shape=(batch_size,)).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Pixel-space condition clips for COMMIT.
# ----------------------------------------------------------------------------


def pixel_frames(latent_frames: int, temporal_factor: int = 4) -> int:
    """Pixel frames of a causal tokenizer's ``latent_frames`` (``1 + factor * (n - 1)``)."""
    return 1 + temporal_factor * (latent_frames - 1)


def latent_frame_of_pixel(frame, temporal_factor: int = 4):
    """Latent frame holding a pixel frame: 0 -> 0, ``factor*(i-1)+1 .. factor*i`` -> ``i``."""
    return (frame + temporal_factor - 1) // temporal_factor


def build_condition_video(
    video: jax.Array,
    task_ids: jax.Array,
    rng: jax.Array | None,
    latent_grid: Sequence[int],
    *,
    temporal_factor: int = 4,
    fill: float = 0.0,
    region: jax.Array | None = None,
) -> jax.Array:
    """The COMMIT condition clip ``[B, T, H, W, C]`` of each example's task.

    ``video`` is float ``[-1, 1]``; kept pixels are those whose latent cell is in
    ``condition_region`` (same ``rng``); the rest of a partly kept frame is ``fill``
    and a frame with nothing kept repeats the last frame that had something kept
    (``fill`` everywhere before the first one). ``region`` (bool ``[B, T', H', W']``)
    replaces that ``condition_region`` call, e.g. with this host's rows of the region
    drawn for the global batch, so that the train step's draw agrees.
    """
    frames, height, width = (int(n) for n in latent_grid)
    _, t_px, h_px, w_px, _ = video.shape
    if t_px != pixel_frames(frames, temporal_factor) or h_px % height or w_px % width:
        raise ValueError(
            f"a {t_px}x{h_px}x{w_px} clip does not map onto the {frames}x{height}x{width} latent grid "
            f"(needs 1 + {temporal_factor}*(frames-1) frames and sides divisible by the latent sides)"
        )
    if region is None:
        region = condition_region(task_ids, "video", (frames, height, width), rng)  # [B, T', H', W']
    lt = latent_frame_of_pixel(jnp.arange(t_px), temporal_factor)
    keep = region[:, lt]  # [B, T, H', W']
    keep = jnp.repeat(jnp.repeat(keep, h_px // height, axis=2), w_px // width, axis=3)[..., None]
    padded = jnp.where(keep, video, jnp.asarray(fill, video.dtype))
    has_kept = jnp.any(keep, axis=(2, 3, 4))  # [B, T]
    source = jax.lax.cummax(jnp.where(has_kept, jnp.arange(t_px)[None], -1), axis=1)
    repeated = jnp.take_along_axis(padded, jnp.maximum(source, 0)[:, :, None, None, None], axis=1)
    return jnp.where((source >= 0)[:, :, None, None, None], repeated, jnp.asarray(fill, video.dtype))


def build_condition_audio(audio: jax.Array, task_ids: jax.Array, latent_len: int) -> jax.Array:
    """The COMMIT condition sound ``[B, S]``: samples of given latent frames kept, silence elsewhere."""
    samples = audio.shape[1]
    if samples % latent_len:
        raise ValueError(f"{samples} audio samples do not split into {latent_len} latent frames")
    region = condition_region(task_ids, "audio", (latent_len,))  # [B, T_a]
    keep = jnp.repeat(region, samples // latent_len, axis=1)
    return jnp.where(keep, audio, jnp.zeros((), audio.dtype))

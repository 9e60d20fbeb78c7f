"""The task registry: every generation task as data, and what it conditions on.

A task (MAGVIT's multi-task setup, Yu et al. 2023, extended to audio) says, per
modality, which latent positions are **condition** (given), which are **targets**
(generated) and whether the modality is **absent**, plus whether the condition token
is the class label. Training draws tasks by weight per example and sampling takes a
task name; both read the same ``condition_region``, so a task means the same thing in
both (MAGVIT's "one mask function serves training and decoding").

Regions are stated as fractions, so one definition serves the latent grid
``(T', H', W')`` and the pixel grid ``(T, H, W)``:

* ``first`` / ``last``: the leading / trailing fraction of latent frames given
  (rounded, at least one frame given and one generated).
* ``box``: ``(top, left, height, width)`` as fractions of the height and width; the
  box covers rows ``floor(top*H) .. floor((top+height)*H) - 1`` and likewise columns
  (so ``(0.25, 0.25, 0.5, 0.5)`` is rows ``H//4 .. 3H//4 - 1``, as in MAGVIT's
  ``cond_utils``); with ``box_given`` the box is the condition (outpainting),
  otherwise the box is the target and everything around it is given (inpainting).
* ``motion``: ``"none"`` (the box stays put); ``"sweep"`` (MAGVIT's dynamic tasks,
  the default): the box's left edge on frame ``t`` of ``n`` is
  ``round(linspace(floor(left*W), floor(sweep_to*W), n))[t]`` (round half to even),
  deterministic, computed over the frames and columns of the grid at hand (pixel
  frames for the condition clip, latent frames for the tokens, as MAGVIT does);
  ``"random"`` (mmgen's earlier augmentation, kept as an option): the box is drawn
  per example from an rng, side lengths uniform in ``box_size`` (fractions of
  ``H'`` / ``W'``), moving linearly from a random start to a random end position
  over the latent frames. To train with it, set ``motion="random"`` on the dynamic
  tasks' roles below.

MAGVIT's ten video tasks (``videogvt/train_lib/cond_utils.py`` and the multi-task
config of google-research/magvit), with ``w = W`` and ``h = H`` of the grid:

* ``outpainting_horizontal`` (``rectangle_horizontal``): the central horizontal band
  (rows ``h//4 .. 3h//4``, full width) is given, top and bottom are generated;
* ``outpainting_vertical`` (``rectangle_vertical``): the central vertical strip;
* ``outpainting_central`` / ``inpainting_central`` (``rectangle_central``): the
  central ``h/2 x w/2`` box given / generated;
* ``outpainting_dynamic`` (``dynamic_vertical``): a ``w//2``-wide full-height strip
  is given, its left edge moving from column 0 to ``w//2`` over the clip;
* ``inpainting_dynamic`` (``dynamic_central``): rows ``h//4 .. 3h//4`` of a
  ``w//2``-wide strip moving the same way are generated, the rest is given.

For COMMIT (MAGVIT) the condition is also built in pixel space, tokenized by the
frozen tokenizer, and its tokens fill masked positions inside the region:
``build_condition_video`` keeps the pixels of ``pixel_condition_region``, pads the
rest of a partly kept frame with ``fill``, and fills frames with nothing kept by
repeating the last frame that had something kept (so frame prediction repeats the
last given frame). The causal tokenizer maps latent frame 0 to pixel frame 0 and
latent frame ``i > 0`` to pixel frames ``factor*(i-1)+1 .. factor*i`` (``factor = 4``
for MAGVIT-v2); the given pixel frames are those of the given latent frames.

Choices made where the papers leave room: frame prediction gives 40% of latent
frames (2 of 5 = 5 of 17 pixel frames, MAGVIT's setting); frame interpolation gives
the first and last latent frame (pixel frames 0 and 13..16 of 17); audio-visual
continuation gives 30% of the audio frames, the same time span as the 5 given video
frames of 17.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("absent", "target", "condition", "partial")
MOTIONS = ("none", "sweep", "random")
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
    motion: str = "none"
    sweep_to: float = 0.5
    box_size: tuple[float, float] = (0.25, 0.5)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"role kind {self.kind!r} is not one of {KINDS}")
        if self.motion not in MOTIONS:
            raise ValueError(f"role motion {self.motion!r} is not one of {MOTIONS}")
        if self.motion == "sweep" and self.box is None:
            raise ValueError("a sweeping box needs its box (top, left, height, width) at the first frame")

    @property
    def dynamic(self) -> bool:
        """The box moves over the clip (``sweep`` or ``random``)."""
        return self.motion != "none"


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
        Role("partial", box=(0.25, 0.0, 0.5, 1.0)),
        _ABS,
        description="top and bottom of a central horizontal band",
    ),
    Task(
        "outpainting_vertical",
        Role("partial", box=(0.0, 0.25, 1.0, 0.5)),
        _ABS,
        description="left and right of a central vertical strip",
    ),
    Task(
        "outpainting_dynamic",
        Role("partial", box=(0.0, 0.0, 1.0, 0.5), motion="sweep", box_size=(0.5, 0.75)),
        _ABS,
        description="surroundings of a half-width strip sweeping left to right",
    ),
    Task(
        "inpainting_central",
        Role("partial", box=_CENTRAL, box_given=False),
        _ABS,
        description="a central box from its surroundings",
    ),
    Task(
        "inpainting_dynamic",
        Role("partial", box=(0.25, 0.0, 0.5, 0.5), box_given=False, motion="sweep", box_size=(0.25, 0.5)),
        _ABS,
        description="a half-height, half-width box sweeping left to right, from its surroundings",
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


def _span(start: float, size: float, extent: int) -> tuple[int, int]:
    """``(first, count)`` of the cells ``floor(start*n) .. floor((start+size)*n) - 1`` (at least one)."""
    first = min(int(np.floor(start * extent)), extent - 1)
    count = min(max(int(np.floor((start + size) * extent)) - first, 1), extent - first)
    return first, count


def _box_track(role: Role, frames: int, height: int, width: int) -> np.ndarray:
    """int ``[frames, 4]``: (top, left, rows, cols) of the role's box on every frame of this grid."""
    if role.box is None:
        return np.tile(np.asarray([0, 0, height, width]), (frames, 1))
    top, left, h, w = role.box
    top_cell, rows = _span(top, h, height)
    left_cell, cols = _span(left, w, width)
    lefts = np.full(frames, left_cell)
    if role.motion == "sweep":  # MAGVIT: round(linspace(start, end, frames)), half to even like jnp.round
        end = min(int(np.floor(role.sweep_to * width)), width - cols)
        lefts = np.round(np.linspace(left_cell, end, frames)).astype(np.int64)
    track = np.zeros((frames, 4), np.int64)
    track[:, 0], track[:, 1], track[:, 2], track[:, 3] = top_cell, lefts, rows, cols
    return track


@functools.lru_cache(maxsize=None)
def _role_table(modality: str, grid: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-task numbers of one modality for this grid (indexed by task id; numpy, not to be mutated)."""
    frames = grid[0]
    height, width = (grid[1], grid[2]) if len(grid) >= 3 else (1, 1)
    kind, first, last, box_mode, random, size, boxes = [], [], [], [], [], [], []
    for task in _REGISTRY:
        r = task.role(modality)
        kind.append(KINDS.index(r.kind))
        first.append(_frame_count(r.first, frames))
        last.append(_frame_count(r.last, frames))
        has_box = r.box is not None or r.motion == "random"
        box_mode.append(_BOX_NONE if not has_box else (_BOX_GIVEN if r.box_given else _BOX_TARGET))
        random.append(r.motion == "random")
        size.append(r.box_size)
        boxes.append(_box_track(r, frames, height, width))
    ints = lambda v: np.asarray(v, np.int32)
    return dict(
        kind=ints(kind), first=ints(first), last=ints(last), box_mode=ints(box_mode),
        random=np.asarray(random, bool), box_size=np.asarray(size, np.float32), box=ints(boxes),
    )


def _moving_boxes(rng, batch: int, grid, size_range) -> jax.Array:
    """Random boxes ``[B, T', 4]`` (top, left, rows, cols) moving linearly in time (``motion="random"``)."""
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


def _temporal_part(ids, table, frames: int) -> jax.Array:
    """bool ``[B, frames]``: the given leading / trailing frames."""
    t = jnp.arange(frames)
    return (t[None] < jnp.asarray(table["first"])[ids][:, None]) | (
        t[None] >= frames - jnp.asarray(table["last"])[ids][:, None]
    )


def _box_part(ids, table, grid, rng) -> jax.Array:
    """bool ``[B, T, H, W]``: the box (outpainting) or its complement (inpainting), else False.

    ``rng`` draws the boxes of ``motion="random"`` tasks; with ``rng=None`` those
    rows are left to the caller (they hold the box of the first frame, unmoved).
    """
    frames, height, width = grid
    batch = ids.shape[0]
    boxes = jnp.asarray(table["box"])[ids]  # [B, T, 4]
    if rng is not None and table["random"].any():
        moving = _moving_boxes(rng, batch, grid, jnp.asarray(table["box_size"])[ids])
        boxes = jnp.where(jnp.asarray(table["random"])[ids][:, None, None], moving, boxes)
    top, left, rows, cols = (boxes[..., i][:, :, None, None] for i in range(4))
    h = jnp.arange(height)[None, None, :, None]
    w = jnp.arange(width)[None, None, None, :]
    in_box = (h >= top) & (h < top + rows) & (w >= left) & (w < left + cols)  # [B, T, H, W]
    mode = jnp.asarray(table["box_mode"])[ids][:, None, None, None]
    return jnp.where(mode == _BOX_GIVEN, in_box, jnp.where(mode == _BOX_TARGET, ~in_box, False))


def _by_kind(ids, table, partial: jax.Array) -> jax.Array:
    kind = jnp.asarray(table["kind"])[ids].reshape((ids.shape[0],) + (1,) * (partial.ndim - 1))
    return jnp.where(kind == _CONDITION, True, jnp.where(kind == _PARTIAL, partial, False))


def _needs_rng(modality: str) -> bool:
    return any(t.role(modality).motion == "random" for t in _REGISTRY)


def condition_region(task_ids: jax.Array, modality: str, grid: Sequence[int], rng: jax.Array | None = None) -> jax.Array:
    """bool ``[B, *grid]``: True at latent positions given as condition.

    ``grid`` is ``(T', H', W')`` for video, ``(T_a,)`` for audio (RVQ levels share
    their frame's region). ``rng`` draws the boxes of tasks with ``motion="random"``
    (required only when the registry has one; the default registry has none, its
    dynamic tasks sweep deterministically); the same key gives the same boxes as
    ``build_condition_video``.
    """
    grid = tuple(int(n) for n in grid)
    table = _role_table(modality, grid)
    ids = jnp.asarray(task_ids, jnp.int32)
    batch, frames = ids.shape[0], grid[0]
    partial = _temporal_part(ids, table, frames).reshape((batch, frames) + (1,) * (len(grid) - 1))
    if len(grid) >= 3:
        if rng is None and _needs_rng(modality):
            raise ValueError("video regions need an rng: a task with motion='random' draws its box from it")
        partial = partial | _box_part(ids, table, grid[:3], rng)
    return _by_kind(ids, table, jnp.broadcast_to(partial, (batch, *grid)))


def pixel_condition_region(
    task_ids: jax.Array,
    latent_grid: Sequence[int],
    pixel_grid: Sequence[int],
    *,
    temporal_factor: int = 4,
    rng: jax.Array | None = None,
    region: jax.Array | None = None,
) -> jax.Array:
    """bool ``[B, T, H, W]``: the pixels the COMMIT condition clip keeps.

    As in MAGVIT's ``cond_utils``, the boxes are computed in pixel coordinates (a
    sweep moves over the ``T`` pixel frames and ``W`` pixel columns); the given frames
    are the pixel frames of the given latent frames (causal mapping). Tasks with
    ``motion="random"`` keep the pixels of their latent region instead (``region``,
    bool ``[B, T', H', W']``, or ``condition_region`` with ``rng``), so that pixels and
    tokens agree on the drawn box.
    """
    frames, height, width = (int(n) for n in latent_grid)
    t_px, h_px, w_px = (int(n) for n in pixel_grid)
    ids = jnp.asarray(task_ids, jnp.int32)
    latent_table = _role_table("video", (frames, height, width))
    pixel_table = _role_table("video", (t_px, h_px, w_px))
    lt = latent_frame_of_pixel(jnp.arange(t_px), temporal_factor)
    temporal = _temporal_part(ids, latent_table, frames)[:, lt]  # [B, T]
    partial = temporal[:, :, None, None] | _box_part(ids, pixel_table, (t_px, h_px, w_px), None)
    keep = _by_kind(ids, pixel_table, partial)
    if latent_table["random"].any():
        if region is None:
            region = condition_region(ids, "video", (frames, height, width), rng)
        up = jnp.repeat(jnp.repeat(region[:, lt], h_px // height, axis=2), w_px // width, axis=3)
        keep = jnp.where(jnp.asarray(latent_table["random"])[ids][:, None, None, None], up, keep)
    return keep


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

    ``video`` is float ``[-1, 1]``; kept pixels are those of ``pixel_condition_region``
    (boxes in pixel coordinates, as MAGVIT builds its condition clips); the rest of a
    partly kept frame is ``fill`` and a frame with nothing kept repeats the last frame
    that had something kept (``fill`` everywhere before the first one). ``rng`` /
    ``region`` (bool ``[B, T', H', W']``, e.g. this host's rows of the region drawn for
    the global batch) matter only for tasks with ``motion="random"``, whose pixels
    follow their latent region so that the train step's draw agrees.
    """
    frames, height, width = (int(n) for n in latent_grid)
    _, t_px, h_px, w_px, _ = video.shape
    if t_px != pixel_frames(frames, temporal_factor) or h_px % height or w_px % width:
        raise ValueError(
            f"a {t_px}x{h_px}x{w_px} clip does not map onto the {frames}x{height}x{width} latent grid "
            f"(needs 1 + {temporal_factor}*(frames-1) frames and sides divisible by the latent sides)"
        )
    keep = pixel_condition_region(task_ids, (frames, height, width), (t_px, h_px, w_px),
                                  temporal_factor=temporal_factor, rng=rng, region=region)[..., None]
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

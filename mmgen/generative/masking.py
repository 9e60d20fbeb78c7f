"""Mask schedules, training inputs/targets/weights, and the masked token loss.

MaskGIT / MAGVIT training (Chang et al. 2022; Yu et al. 2023, whose released code,
google-research/magvit ``videogvt/train_lib/mask_utils.py``, gives the defaults here),
per example:

1. the task (``mmgen.generative.tasks``) gives the condition region of every
   modality and which modalities are absent;
2. a mask ratio ``r = schedule(u)``, ``u ~ U(0, 1]`` (cosine ``cos(pi/2 u)`` by
   default), masks ``n`` of the ``N`` maskable elements, drawn uniformly and jointly
   over the modalities: ``mask_count="floor"`` (default, MAGVIT's ``random_mask``):
   ``n = clip(floor(r * N), 1, N)``; ``"ceil"`` (mmgen's earlier rule):
   ``n = clip(ceil(r * N), 1, N)``;
3. conditioning mode:

   * ``commit`` (MAGVIT's COMMIT, ``condition_mode="cond->input"``): every element is
     maskable; a masked element inside the condition region shows the condition token
     (from tokenizing the task's condition clip, ``tasks.build_condition_video``)
     instead of ``[MASK]``;
   * ``prefix`` (the baseline, MAGVIT's ``"input->input"``): condition elements always
     show the real token and only target elements are maskable;

4. classifier-free guidance dropout with probability ``cfg_dropout``: the class
   label becomes UNCOND and every element that would show a condition token shows
   ``[MASK]`` (the very input the unconditional pass sees at sampling);
5. the loss weights ``loss_on``:

   * ``all`` (default; MAGVIT's ``weight_mode="mask+refine+recons"``, the setting of
     its multi-task config): every maskable present element, i.e. the masked ones,
     the refined condition tokens and the unmasked ones the model reconstructs (in
     ``commit`` mode every present element; in ``prefix`` mode the condition region,
     which shows its own tokens, is left out);
   * ``masked`` (MAGVIT's ``"mask+refine"``): the elements whose input was replaced;
   * ``masked+cond`` (mmgen's): those and the whole condition region.

The loss is the factorised cross-entropy (sum of the group cross-entropies, with
label smoothing per group) averaged over weighted elements of the global batch.
Everything here is a pure, jittable function of arrays and an rng.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmgen.generative import tasks as tasks_lib
from mmgen.generative.transformer import ModalitySpec, group_digits, modality_specs

SCHEDULES = ("cosine", "linear", "square", "exp")
LOSS_ON = ("all", "masked", "masked+cond")
MASK_COUNTS = ("floor", "ceil")
MODES = ("commit", "prefix")


def mask_ratio(u: jax.Array, schedule: str = "cosine", total: jax.Array | int | None = None) -> jax.Array:
    """Fraction of maskable elements masked at progress ``u`` in [0, 1] (1 -> 0).

    ``cosine``: ``cos(pi/2 u)``; ``linear``: ``1 - u``; ``square``: ``1 - u^2``;
    ``exp`` (MaskGIT's public code): ``1 - total^-(1 - u)``, which needs ``total``, the
    number of maskable elements.
    """
    u = jnp.asarray(u, jnp.float32)
    if schedule == "cosine":
        return jnp.cos(0.5 * jnp.pi * u)
    if schedule == "linear":
        return 1.0 - u
    if schedule == "square":
        return 1.0 - u**2
    if schedule == "exp":
        if total is None:
            raise ValueError("the exp schedule needs the number of maskable elements (total)")
        return 1.0 - jnp.power(jnp.maximum(jnp.asarray(total, jnp.float32), 1.0), -(1.0 - u))
    raise ValueError(f"mask schedule {schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")


def _check_choice(value: str, choices, what: str):
    if value not in choices:
        raise ValueError(f"{what}={value!r} is unknown; choose one of {', '.join(choices)}")


class MaskedExample(NamedTuple):
    """One training batch for the transformer (a pytree).

    ``inputs`` / ``targets``: dict modality -> int32 tokens (inputs use ``[MASK] =
    vocab``); ``weights``: dict modality -> float32 loss weight per element;
    ``labels``: int32 ``[B]`` condition token (class id or UNCOND); ``task_ids``:
    int32 ``[B]``; ``present``: dict modality -> bool ``[B]``; ``masked``: dict
    modality -> bool, elements whose input was replaced.
    """

    inputs: dict
    targets: dict
    weights: dict
    labels: jax.Array
    task_ids: jax.Array
    present: dict
    masked: dict


def element_regions(specs: Mapping[str, ModalitySpec], task_ids, region_rng) -> dict[str, jax.Array]:
    """Condition region per modality, broadcast over RVQ levels: bool ``[B, *spec.shape]``."""
    out = {}
    for m, spec in specs.items():
        region = tasks_lib.condition_region(task_ids, m, spec.grid, region_rng)
        if spec.levels > 1:
            region = jnp.broadcast_to(region[..., None], region.shape + (spec.levels,))
        out[m] = region
    return out


def mask_count(ratio: jax.Array, count: jax.Array, rule: str = "floor") -> jax.Array:
    """int32 number of elements to mask of ``count`` maskable ones at ``ratio``.

    ``floor`` (MAGVIT's ``random_mask``): ``clip(floor(ratio * count), 1, count)``;
    ``ceil`` (mmgen's earlier rule): ``clip(ceil(ratio * count), 1, count)``; 0 when
    nothing is maskable.
    """
    _check_choice(rule, MASK_COUNTS, "mask_count")
    raw = ratio * count
    n = jnp.floor(raw) if rule == "floor" else jnp.ceil(raw)
    return jnp.clip(n, jnp.minimum(count, 1), count).astype(jnp.int32)


def choose_masked(scores: jax.Array, candidates: dict, ratio: jax.Array, rule: str = "floor") -> dict:
    """Mask ``mask_count(ratio, N, rule)`` of each example's ``N`` candidate elements.

    ``candidates``: dict modality -> bool ``[B, ...]``; ``scores``: uniform ``[B,
    total elements]`` in modality order; the lowest-scoring candidates are masked,
    so the draw is uniform over the candidates of all modalities together.
    Returns dict modality -> bool.
    """
    names = list(candidates)
    batch = ratio.shape[0]
    flat = jnp.concatenate([candidates[m].reshape(batch, -1) for m in names], axis=1)
    n_mask = mask_count(ratio, flat.sum(axis=1), rule)
    rank = jnp.argsort(jnp.argsort(jnp.where(flat, scores, 2.0), axis=1), axis=1)
    chosen = rank < n_mask[:, None]
    out, start = {}, 0
    for m in names:
        size = candidates[m][0].size
        out[m] = chosen[:, start : start + size].reshape(candidates[m].shape)
        start += size
    return out


def loss_weights(
    masked: jax.Array, region: jax.Array, present: jax.Array, loss_on: str = "all", maskable: jax.Array | None = None
) -> jax.Array:
    """float32 loss weight per element, times ``present``.

    ``all``: ``maskable`` (every element when None); ``masked``: ``masked``;
    ``masked+cond``: ``masked | region``.
    """
    _check_choice(loss_on, LOSS_ON, "loss_on")
    if loss_on == "masked":
        w = masked
    elif loss_on == "masked+cond":
        w = masked | region
    else:
        w = jnp.ones_like(masked) if maskable is None else jnp.broadcast_to(maskable, masked.shape)
    return (w & present).astype(jnp.float32)


def make_training_example(
    cfg,
    tokens: Mapping[str, jax.Array],
    task_ids: jax.Array,
    rng: jax.Array,
    *,
    labels: jax.Array | None = None,
    condition_tokens: Mapping[str, jax.Array] | None = None,
    has_audio: jax.Array | None = None,
    region_rng: jax.Array | None = None,
    mode: str = "commit",
    schedule: str = "cosine",
    loss_on: str = "all",
    cfg_dropout: float = 0.1,
    ratio: jax.Array | None = None,
    mask_count: str = "floor",
) -> MaskedExample:
    """Inputs, targets and weights for a batch of (tokens, task) pairs.

    * ``cfg``: the model config (token layout, ``num_classes``).
    * ``tokens``: dict modality -> ground-truth int32 tokens.
    * ``condition_tokens``: COMMIT only: tokens of the condition clips built with
      ``tasks.build_condition_video`` / ``build_condition_audio`` (same shapes).
    * ``region_rng``: the key given to ``build_condition_video`` so that the random
      boxes agree (derived from ``rng`` when None).
    * ``has_audio``: bool ``[B]``; False makes audio absent for that example.
    * ``ratio``: optional ``[B]`` mask ratios overriding the schedule draw.
    * ``loss_on`` / ``mask_count``: see the module docstring (defaults: MAGVIT's).
    """
    _check_choice(mode, MODES, "mode")
    _check_choice(mask_count, MASK_COUNTS, "mask_count")
    _check_choice(schedule, SCHEDULES, "schedule")
    _check_choice(loss_on, LOSS_ON, "loss_on")
    all_specs = modality_specs(cfg)
    unknown = set(tokens) - set(all_specs)
    if unknown:
        raise ValueError(f"tokens for {sorted(unknown)} but the model config has modalities {list(all_specs)}")
    specs = {m: all_specs[m] for m in all_specs if m in tokens}
    if mode == "commit":
        missing = [m for m in specs if condition_tokens is None or m not in condition_tokens]
        if missing:
            raise ValueError(f"mode='commit' needs condition_tokens for {missing} (tokens of the condition clips)")

    task_ids = jnp.asarray(task_ids, jnp.int32)
    batch = task_ids.shape[0]
    k_draw, k_region = jax.random.split(rng)
    region_rng = k_region if region_rng is None else region_rng
    n_elements = sum(int(np.prod(s.shape)) for s in specs.values())
    # One uniform draw for (ratio, CFG dropout, element scores): each RNG op costs compile time.
    draw = jax.random.uniform(k_draw, (batch, 2 + n_elements))

    present = {m: tasks_lib.modality_present(task_ids, m) for m in specs}
    if has_audio is not None and "audio" in present:
        present["audio"] = present["audio"] & jnp.asarray(has_audio, bool)
    regions = element_regions(specs, task_ids, region_rng)
    expand = lambda flag, ref: flag.reshape((batch,) + (1,) * (ref.ndim - 1))

    candidates = {}
    for m in specs:
        maskable = jnp.ones_like(regions[m]) if mode == "commit" else ~regions[m]
        candidates[m] = maskable & expand(present[m], regions[m])
    total = sum(c.reshape(batch, -1).sum(axis=1) for c in candidates.values())
    if ratio is None:
        ratio = mask_ratio(1.0 - draw[:, 0], schedule, total)  # u ~ U(0, 1]
    masked = choose_masked(draw[:, 2:], candidates, jnp.asarray(ratio, jnp.float32), mask_count)

    dropped = draw[:, 1] < cfg_dropout  # classifier-free guidance: condition dropped
    uncond = int(cfg.num_classes)
    given_labels = jnp.full((batch,), uncond, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    labels_in = jnp.where(tasks_lib.uses_class_label(task_ids) & ~dropped, given_labels, uncond)

    inputs, weights = {}, {}
    for m, spec in specs.items():
        target, region = tokens[m], regions[m]
        mask_tok = jnp.full_like(target, spec.mask_id)
        drop = expand(dropped, region)
        if mode == "commit":
            shown = jnp.where(region & ~drop, condition_tokens[m].astype(target.dtype), mask_tok)
            x = jnp.where(masked[m], shown, target)
        else:
            x = jnp.where(region, jnp.where(drop, mask_tok, target), jnp.where(masked[m], mask_tok, target))
        is_present = expand(present[m], region)
        inputs[m] = jnp.where(is_present, x, mask_tok)
        weights[m] = loss_weights(masked[m], region, is_present, loss_on, candidates[m])
    return MaskedExample(
        inputs=inputs,
        targets={m: tokens[m] for m in specs},
        weights=weights,
        labels=labels_in,
        task_ids=task_ids,
        present=present,
        masked=masked,
    )


def token_cross_entropy(logits: jax.Array, targets: jax.Array, spec: ModalitySpec, label_smoothing: float = 0.0):
    """Per-element factorised cross-entropy ``[...]``: sum over groups of

    ``(1 - eps) * (-log p_g(digit_g)) + eps * mean_v(-log p_g(v))``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [..., G, v]
    digits = group_digits(jnp.minimum(targets, spec.vocab - 1), spec)
    nll = -jnp.take_along_axis(logp, digits[..., None], axis=-1)[..., 0]
    smooth = -logp.mean(axis=-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).sum(axis=-1)


def masked_token_loss(logits: Mapping[str, jax.Array], example: MaskedExample, specs, label_smoothing: float = 0.1):
    """Weighted mean cross-entropy over all modalities; returns ``(loss, metrics)``.

    ``metrics``: ``loss``, ``accuracy`` (argmax token == target over weighted
    elements) and ``weight`` (number of weighted elements).
    """
    total, denom, correct = 0.0, 0.0, 0.0
    for m, lg in logits.items():
        w = example.weights[m]
        ce = token_cross_entropy(lg, example.targets[m], specs[m], label_smoothing)
        hit = jnp.all(jnp.argmax(lg, axis=-1) == group_digits(example.targets[m], specs[m]), axis=-1)
        total += jnp.sum(w * ce)
        correct += jnp.sum(w * hit)
        denom += jnp.sum(w)
    denom_safe = jnp.maximum(denom, 1.0)
    loss = total / denom_safe
    return loss, {"loss": loss, "accuracy": correct / denom_safe, "weight": denom}


def loss_fn(model, example: MaskedExample, *, label_smoothing: float = 0.1, rng=None, train: bool = True):
    """Forward the model on ``example`` and score it: ``(loss, metrics)``."""
    logits = model(
        example.inputs,
        example.task_ids,
        {"label": example.labels},
        train=train,
        present=example.present,
        rng=rng,
    )
    return masked_token_loss(logits, example, model.specs, label_smoothing)

"""Iterative MaskGIT decoding for any task, with classifier-free guidance.

MaskGIT (Chang et al. 2022) as MAGVIT's released decoder runs it
(google-research/magvit ``videogvt/train_lib/parallel_decode.py``; google-research/
maskgit), for ``T = steps`` and ``t = 0..T-1``:

1. build the input: decoded elements show their token; still-masked elements show
   ``[MASK]``, except that in ``commit`` mode masked elements inside the task's
   condition region show the condition token (re-inserted every step); in
   ``prefix`` mode the condition region is never masked and always shows the
   condition tokens;
2. logits = ``cond + s * (cond - uncond)`` (``s = guidance``); the unconditional pass
   sees UNCOND for the label and ``[MASK]`` wherever a condition token is shown;
   with ``s = 0`` only the conditional pass runs;
3. sample every masked element from ``softmax(logits / temperature)`` (per factor
   group; ``temperature = 0`` is greedy) and score it with
   ``confidence = log p(sampled) + choice_temperature * a_t * Gumbel``, with ``log p``
   the (guided, untempered) factorised log-probability and the annealing
   ``a_t = 1 - (t+1)/T`` (``choice_anneal="maskgit"``, the default: the released
   MaskGIT / MAGVIT decoders, noise-free at the last step) or ``a_t = 1 - t/T``
   (``"step_start"``, mmgen's earlier form, one step more noise);
4. keep the most confident and re-mask the rest so that
   ``n_{t+1} = clip(floor(N_0 * schedule((t+1)/T)), 0, n_t - 1)`` elements stay
   masked (at least one revealed per step; ``n_T = 0``). ``N_0`` counts the
   elements masked at the start (targets; in ``commit`` mode also the condition
   region, whose tokens are refined) over all modalities of the task together.

The whole loop is one ``jax.lax.fori_loop`` inside one ``jax.jit``, compiled once per
(model graph, task, shapes, steps, schedule, mode, guidance on/off, annealing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mmgen.generative import tasks as tasks_lib
from mmgen.generative.masking import MODES, SCHEDULES, element_regions, mask_ratio
from mmgen.generative.transformer import combine_digits, token_log_prob

CHOICE_ANNEALS = ("maskgit", "step_start")


def choice_noise_scale(t, steps: int, choice_temperature, anneal: str = "maskgit"):
    """Scale of the Gumbel noise added to the confidence at step ``t`` of ``steps``.

    ``maskgit``: ``choice_temperature * (1 - (t+1)/steps)`` (released MaskGIT / MAGVIT);
    ``step_start``: ``choice_temperature * (1 - t/steps)``. Works on python numbers and
    traced arrays alike.
    """
    if anneal not in CHOICE_ANNEALS:
        raise ValueError(f"choice_anneal {anneal!r} is unknown; choose one of {', '.join(CHOICE_ANNEALS)}")
    done = t + 1 if anneal == "maskgit" else t
    return choice_temperature * (1.0 - done / steps)


def guided_logits(model, inputs, task_ids, labels, uncond_inputs=None, uncond_labels=None, guidance=0.0):
    """``cond + guidance * (cond - uncond)`` logits by modality (one batched forward pass).

    Without ``uncond_inputs`` this is the plain conditional forward pass.
    """
    if uncond_inputs is None:
        return model(inputs, task_ids, {"label": labels})
    batch = task_ids.shape[0]
    both = {m: jnp.concatenate([inputs[m], uncond_inputs[m]], axis=0) for m in inputs}
    logits = model(both, jnp.concatenate([task_ids, task_ids]), {"label": jnp.concatenate([labels, uncond_labels])})
    out = {}
    for m, lg in logits.items():
        cond, uncond = lg[:batch], lg[batch:]
        out[m] = cond + guidance * (cond - uncond)
    return out


def decoding_mask_counts(initial: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Elements still masked after each of ``steps`` steps for ``initial`` masked ones (python)."""
    counts, now = [], initial
    for t in range(steps):
        target = int(jnp.floor(initial * mask_ratio((t + 1) / steps, schedule, initial)))
        now = 0 if t == steps - 1 else min(max(target, 0), max(now - 1, 0))
        counts.append(now)
    return counts


def _flat(tree: dict, names, batch):
    return jnp.concatenate([tree[m].reshape(batch, -1) for m in names], axis=1)


def _unflat(flat, like: dict, names, batch):
    out, start = {}, 0
    for m in names:
        size = like[m][0].size
        out[m] = flat[:, start : start + size].reshape(like[m].shape)
        start += size
    return out


@functools.partial(
    jax.jit, static_argnames=("graphdef", "modalities", "steps", "schedule", "mode", "use_guidance", "choice_anneal")
)
def _decode(
    graphdef,
    state,
    cond_tokens,
    labels,
    task_index,
    rng,
    region_rng,
    guidance,
    temperature,
    choice_temperature,
    *,
    modalities: tuple[str, ...],
    steps: int,
    schedule: str,
    mode: str,
    use_guidance: bool,
    choice_anneal: str,
):
    # The task is data (its index; the condition regions are computed from it), only its
    # modalities shape the program: the tasks over the same modalities share one compile
    # (the 15 tasks of the multi-task model: 3 compiles, not 15).
    model = nnx.merge(graphdef, state)  # for static facts; the loop body merges its own copy
    names = list(modalities)
    specs = {m: model.specs[m] for m in names}
    batch = labels.shape[0]
    task_ids = jnp.full((batch,), task_index, jnp.int32)
    uncond_labels = jnp.full((batch,), model.uncond_label, jnp.int32)
    regions = element_regions(specs, task_ids, region_rng)
    masks = {m: jnp.full(specs[m].shape, specs[m].mask_id, jnp.int32)[None] for m in names}

    def show(current, unknown, with_condition: bool):
        out = {}
        for m in names:
            cond = cond_tokens[m] if with_condition else masks[m]
            if mode == "commit":
                shown = jnp.where(regions[m], cond, masks[m])
                out[m] = jnp.where(unknown[m], shown, current[m])
            else:
                out[m] = jnp.where(regions[m], cond, jnp.where(unknown[m], masks[m], current[m]))
        return out

    unknown0 = {m: jnp.ones_like(regions[m]) if mode == "commit" else ~regions[m] for m in names}
    current0 = {m: jnp.where(regions[m], cond_tokens[m], masks[m]) for m in names}
    n0 = _flat(unknown0, names, batch).sum(axis=1)  # [B]

    def step(t, carry):
        state, current, unknown, counts, scales = carry
        inputs = show(current, unknown, True)
        # NNX transforms need the parameters traced at the loop's level: they ride in the carry.
        model = nnx.merge(graphdef, state)
        if use_guidance:
            logits = guided_logits(model, inputs, task_ids, labels, show(current, unknown, False), uncond_labels, guidance)
        else:
            logits = guided_logits(model, inputs, task_ids, labels)
        # One Gumbel draw per step for sampling and choosing (each RNG op costs compile time).
        sizes = [logits[m][0].size for m in names]
        flat_unknown = _flat(unknown, names, batch)
        gumbel = jax.random.gumbel(jax.random.fold_in(rng, t), (batch, sum(sizes) + flat_unknown.shape[1]))
        sampled, logp, start = {}, {}, 0
        for m, size in zip(names, sizes):
            g = gumbel[:, start : start + size].reshape(logits[m].shape)
            start += size
            digits = jnp.argmax(logits[m] + temperature * g, axis=-1)
            sampled[m] = combine_digits(digits, specs[m])
            logp[m] = token_log_prob(logits[m], sampled[m], specs[m])
        noise = gumbel[:, start:]
        scale = choice_noise_scale(t, steps, choice_temperature, choice_anneal)
        confidence = _flat(logp, names, batch) + scale * noise
        confidence = jnp.where(flat_unknown, confidence, jnp.inf)

        n_now = flat_unknown.sum(axis=1)
        target = jnp.floor(n0 * mask_ratio((t + 1) / steps, schedule, n0)).astype(jnp.int32)
        n_next = jnp.clip(target, 0, jnp.maximum(n_now - 1, 0))
        n_next = jnp.where(t == steps - 1, 0, n_next)
        rank = jnp.argsort(jnp.argsort(confidence, axis=1), axis=1)
        still = _unflat(rank < n_next[:, None], unknown, names, batch)
        current = {m: jnp.where(unknown[m] & ~still[m], sampled[m], current[m]) for m in names}
        return state, current, still, counts.at[t].set(n_next), scales.at[t].set(scale)

    counts0 = jnp.zeros((steps, batch), jnp.int32)
    scales0 = jnp.zeros((steps,), jnp.float32)
    carry0 = (state, current0, unknown0, counts0, scales0)
    _, current, _, counts, scales = jax.lax.fori_loop(0, steps, step, carry0)
    return current, {"num_masked": counts, "initial_masked": n0, "region": regions, "noise_scale": scales}


def sample(
    model,
    task: str,
    condition: dict | None,
    rng: jax.Array,
    steps: int = 12,
    guidance: float = 0.0,
    *,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    choice_anneal: str = "maskgit",
    schedule: str = "cosine",
    mode: str = "commit",
    batch_size: int | None = None,
    region_rng: jax.Array | None = None,
    return_trace: bool = False,
):
    """Generate the tokens of ``task`` by iterative decoding.

    * ``condition``: dict with ``"label"`` (int32 ``[B]``, used by class-conditional
      tasks) and, for every modality the task conditions on, its condition tokens
      (same shape as the model's tokens: in ``commit`` mode the tokens of the
      condition clip from ``tasks.build_condition_video``; in ``prefix`` mode real
      tokens, of which the condition region is used).
    * ``choice_anneal``: ``maskgit`` (default) or ``step_start``, see the module
      docstring.
    * ``region_rng``: the key the condition clip was built with (tasks with
      ``motion="random"`` only); derived from ``rng`` when None. ``batch_size`` is needed only when
      ``condition`` holds nothing to read it from.

    Returns dict modality -> int32 tokens for the task's modalities; with
    ``return_trace`` also ``{"num_masked": [steps, B], "initial_masked": [B],
    "region": dict modality -> bool}``.
    """
    task_obj = tasks_lib.get_task(task)
    tasks_lib.check_tasks([task], list(model.specs))
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if choice_anneal not in CHOICE_ANNEALS:
        raise ValueError(f"choice_anneal {choice_anneal!r} is unknown; choose one of {', '.join(CHOICE_ANNEALS)}")
    condition = dict(condition or {})
    names = task_obj.modalities()
    needs = [m for m in names if task_obj.role(m).kind in ("condition", "partial")]
    missing = [m for m in needs if m not in condition]
    if missing:
        raise ValueError(f"task {task!r} conditions on {missing}: pass their tokens in condition")

    sizes = {int(v.shape[0]) for v in condition.values()} | ({batch_size} if batch_size else set())
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the batch size: condition and batch_size give {sorted(sizes) or 'nothing'}")
    batch = sizes.pop()
    cond_tokens = {}
    for m in names:
        spec = model.specs[m]
        if m in needs:
            tok = jnp.asarray(condition[m], jnp.int32)
            if tuple(tok.shape) != (batch, *spec.shape):
                raise ValueError(f"condition {m} tokens have shape {tuple(tok.shape)}; expected {(batch, *spec.shape)}")
            cond_tokens[m] = tok
        else:
            cond_tokens[m] = jnp.full((batch, *spec.shape), spec.mask_id, jnp.int32)
    labels = condition.get("label") if task_obj.class_label else None
    labels = jnp.full((batch,), model.uncond_label, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)

    rng, derived_region_rng = jax.random.split(rng)
    region_rng = derived_region_rng if region_rng is None else region_rng
    graphdef, state = nnx.split(model)
    tokens, trace = _decode(
        graphdef,
        state,
        cond_tokens,
        labels,
        jnp.int32(task_obj.index),
        rng,
        region_rng,
        jnp.float32(guidance),
        jnp.float32(temperature),
        jnp.float32(choice_temperature),
        modalities=tuple(names),
        steps=int(steps),
        schedule=schedule,
        mode=mode,
        use_guidance=bool(guidance != 0.0),
        choice_anneal=choice_anneal,
    )
    return (tokens, trace) if return_trace else tokens

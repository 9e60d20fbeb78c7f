"""Folding and merging adapters (LoRA paper section 4.1; task arithmetic; TIES; Model Breadcrumbs; DARE; FlyLoRA section 5).

* ``fold_lora(model)``: every LoRA becomes its base ``nnx.Linear`` with
  W' = W + (alpha / r) B A. ``nnx.Linear`` stores ``kernel [in, out]`` (x @ kernel),
  so the kernel gains ``(alpha / r) (B A)^T``; stacked kernels ``[*stack, in, out]``
  get one update per layer. The scale alpha / r is kept (several public ports dropped
  it when merging and produced wrong weights).
* ``merge_lora_adapters(model, states, weights, method=..., options=...)``: folds
  W' = W + tau into every LoRA's base, where tau merges the task vectors
  tau_i = (alpha / r) B_i A_i (the *folded* deltas, in kernel layout) of adapter states
  saved for the same adapted model, by ``merge_task_vectors`` below. The default,
  ``method="sum"`` with weights 1, is task arithmetic.
* ``merge_flylora_adapters(model, states, weights, shared_a=..., method=..., options=...)``:
  FlyLoRA cannot be folded (its gate depends on x). Its task vector is B_i: B starts at
  zero and A is frozen, so B_i is exactly what fine-tuning changed. Two layouts:
    - independent A's (default, ``shared_a=False``): every FlyLoRA becomes a
      ``FlyLoRASum`` holding one branch (A_i, B_i', d_i) per task, whose outputs add,
      ``base(x) + sum_i c w_i (alpha / r) B_i' (A_i x * mask_i)``. The near-orthogonality
      of independent sparse random A_i's is what keeps the tasks from interfering.
      Entry (p, j) of B_1 and of B_2 multiplies row j of *different* random A's, so the
      B_i share no coordinates: the per-task steps of a method apply (Breadcrumbs' mask,
      DARE's drop-and-rescale: B_i' = that step of B_i; B_i' = B_i for sum and average)
      and the combine must be a sum (c = 1 for sum, 1 / sum_j w_j for average, alpha
      for Breadcrumbs, lambda for DARE); TIES' sign election across tasks (and DARE combined by TIES) has nothing to
      elect over and raises.
    - shared A (``shared_a=True``; all tasks trained from the same seed): one FlyLoRA
      with that A, B = merge_task_vectors(B_1..B_N) (every method applies: the B_i are
      the same parameters) and d the mean of the d_i. The A's must be bit-identical,
      else this raises. Without a method: the average (the FlyLoRA paper's merge), or
      sum_i w_i B_i when weights are given.

Merging task vectors (``merge_task_vectors``; one task vector = ``{layer name: array
[*stack, rows, cols]}``; a *layer* is one matrix over the last two axes, so a stacked
kernel holds one layer per leading index). With weights w_i (default 1), tau_i <- w_i tau_i first:

* ``sum`` (task arithmetic, Ilharco et al. 2023, "Editing models with task
  arithmetic"): tau = sum_i tau_i.
* ``average``: tau = sum_i tau_i / sum_i w_i (the weighted mean; 1/N without weights).
* ``ties`` (TIES-Merging, Yadav et al. 2023, "Resolving interference when merging
  models"), options ``k``, ``lam``, ``scope``:
    1. trim: keep the round(k d) entries of largest |tau_i| (d entries of the whole task
       vector for ``scope="model"``, as the paper; of each layer for ``"layer"``), zero the rest;
    2. elect: gamma = sgn(sum_i trim(tau_i)) per entry (the sign of larger total mass);
    3. disjoint mean: tau = lam * sum_{i in A} trim(tau_i) / |A|, A = {i: sgn(trim(tau_i)) = gamma}
       (0 where A is empty). Paper defaults k = 0.2, lam = 1.
* ``breadcrumbs`` (Model Breadcrumbs, Davari & Belilovsky 2023, "Scaling multi-task
  model merging with sparse masks"), options ``keep``, ``drop_largest``, ``alpha``: per
  layer, rank the entries of tau_i by |.|; mask the round(drop_largest d) largest
  (outliers) and every entry below the next round(keep d) (the 1 - keep - drop_largest
  smallest, negligible perturbations); tau = alpha * sum_i mask_i * tau_i. Defaults
  keep = 0.15, drop_largest = 0.006, alpha = 0.2: the starting point of the authors'
  released hyper-parameter search ("middle_keep": beta = 0.15 kept after removing the
  top gamma = 0.006, alpha = 0.2), i.e. the bottom 84.4% and top 0.6% masked.
* ``dare`` (DARE, Yu et al. 2023, "Language models are Super Mario"), options ``p``,
  ``combine``, ``lam``, ``seed``: tau_i' = m_i * tau_i / (1 - p), m_i ~ Bernoulli(1 - p)
  per entry (E[tau_i'] = tau_i), drawn from numpy's PCG64 keyed by (seed, i, crc32 of the
  layer name), so a merge is reproducible and every task and layer has its own mask;
  then ``combine="sum"``: tau = lam * sum_i tau_i', or ``"ties"``: TIES' election and
  disjoint mean (steps 2-3, no trim) times lam. Defaults p = 0.9, sum, lam = 1.

With one task vector and weight 1, sum, average, ties with k = 1 (lam = 1),
breadcrumbs with keep = 1, drop_largest = 0, alpha = 1 and dare with p = 0 return it.

A merged LoRA delta is in general of full rank (trimming and masking are not low-rank
operations): ``lora_factors`` re-factorises it as the rank-R LoRA closest in Frobenius
norm (truncated SVD, Eckart-Young) and reports the relative residual; folding it into
the base (``merge_lora_adapters``) is exact.

All model-level functions work in place on a model that already has the adapters
applied (the same ``apply_adapters`` config the adapters were trained with) and return
the model. States are what ``mmgen.adapters.surgery.adapter_state`` returns (or the
same tree as plain nested dicts, e.g. restored from a checkpoint).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.adapters.flylora import FlyLoRA, FlyLoRASum
from mmgen.adapters.lora import LoRA
from mmgen.adapters.surgery import path_name, set_submodule


def lora_kernel_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``(alpha/r) (B A)^T`` in kernel layout: A ``[*stack, r, n]``, B ``[*stack, m, r]`` -> ``[*stack, n, m]``."""
    return scale * jnp.einsum("...mr,...rn->...nm", b.astype(jnp.float32), a.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


def _modules(model: nnx.Module, cls: type) -> list[tuple[tuple, Any]]:
    """``(path, module)`` of every ``cls`` module, excluding branches already inside a ``FlyLoRASum``."""
    inside_sum = {id(b) for _, m in nnx.iter_modules(model) if isinstance(m, FlyLoRASum) for b in m.branches}
    return [(tuple(p), m) for p, m in nnx.iter_modules(model)
            if type(m) is cls and id(m) not in inside_sum]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> nnx.Module:
    """Put ``new`` at ``path``; returns the (possibly new) root."""
    if not path:
        return new
    set_submodule(model, path, new)
    return model


def _add_to_kernel(base: nnx.Linear, delta: jax.Array) -> None:
    kernel = base.kernel[...]
    base.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _flat_values(state: Any) -> dict[tuple[str, ...], Any]:
    """``{path (str parts): array}`` of an ``nnx.State`` or nested dict of arrays/variables."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, nnx.Variable):
            out[prefix] = node.get_value()
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, prefix + (str(key),))
        else:
            out[prefix] = node

    walk(state, ())
    return out


def _take(flat: dict, path: tuple, name: str, expected_shape: tuple, which: int) -> jax.Array:
    key = tuple(str(p) for p in path) + (name,)
    if key not in flat:
        raise ValueError(f"adapter state {which} has no {'.'.join(key)}: was it trained with the same targets?")
    value = flat[key]
    if tuple(np.shape(value)) != tuple(expected_shape):
        raise ValueError(f"adapter state {which}: {'.'.join(key)} has shape {np.shape(value)}, "
                         f"the model expects {tuple(expected_shape)} (different rank or base?)")
    return jnp.asarray(value)


def _weights(weights: Sequence[float] | None, n: int, default: float) -> tuple[float, ...]:
    weights = (default,) * n if weights is None else tuple(float(w) for w in weights)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} merge weights for {n} adapter states")
    return weights


# ------------------------------------------------------------------------ task vectors
MERGE_METHODS = ("sum", "average", "ties", "breadcrumbs", "dare")
TIES_SCOPES = ("model", "layer")
DARE_COMBINES = ("sum", "ties")
# The options each method reads (their defaults live in configs/adapters: ``cfg.merge``).
METHOD_OPTIONS = {"sum": (), "average": (), "ties": ("k", "lam", "scope"),
                  "breadcrumbs": ("keep", "drop_largest", "alpha"), "dare": ("p", "combine", "lam", "seed")}

TaskVector = Mapping[str, np.ndarray]


def check_merge_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options ``method`` reads, checked (``ValueError``, one line, for a missing or bad one)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is not one of {', '.join(MERGE_METHODS)}")
    options = dict(options or {})
    missing = [k for k in METHOD_OPTIONS[method] if k not in options]
    if missing:
        raise ValueError(f"merge method {method!r} needs the options {', '.join(missing)}")
    out = {k: options[k] for k in METHOD_OPTIONS[method]}

    def fraction(key, low_open=False):
        v = float(out[key])
        if not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0):
            raise ValueError(f"{method}.{key}={v} must be in {'(0' if low_open else '[0'}, 1]")
        out[key] = v

    if method == "ties":
        fraction("k", low_open=True)
        out["lam"] = float(out["lam"])
        if out["scope"] not in TIES_SCOPES:
            raise ValueError(f"ties.scope={out['scope']!r} is not one of {', '.join(TIES_SCOPES)}")
    elif method == "breadcrumbs":
        fraction("keep", low_open=True)
        fraction("drop_largest")
        if out["keep"] + out["drop_largest"] > 1.0:
            raise ValueError(f"breadcrumbs.keep + breadcrumbs.drop_largest = {out['keep'] + out['drop_largest']} "
                             "exceeds 1")
        out["alpha"] = float(out["alpha"])
    elif method == "dare":
        p = float(out["p"])
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dare.p={p} must be in [0, 1) (the drop probability)")
        out["p"] = p
        if out["combine"] not in DARE_COMBINES:
            raise ValueError(f"dare.combine={out['combine']!r} is not one of {', '.join(DARE_COMBINES)}")
        out["lam"], out["seed"] = float(out["lam"]), int(out["seed"])
    return out


def _layers(x: np.ndarray) -> np.ndarray:
    """``[*stack, rows, cols] -> [layers, rows * cols]`` (one row per layer)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"a task vector entry must be at least 2-d ([*stack, rows, cols]), got shape {x.shape}")
    return x.reshape(-1, x.shape[-2] * x.shape[-1])


def magnitude_ranks(groups: np.ndarray) -> np.ndarray:
    """Rank of every entry's |value| within its row of ``groups [g, d]``: 0 = largest (ties: first wins)."""
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(groups.shape[-1]), groups.shape), axis=-1)
    return ranks


def ties_trim(vector: TaskVector, k: float, scope: str = "model") -> dict[str, np.ndarray]:
    """TIES step 1: keep the round(k d) largest-|.| entries of the task vector (``"model"``) or of each layer."""
    names = list(vector)
    if scope == "layer":
        out = {}
        for name in names:
            groups = _layers(vector[name])
            keep = magnitude_ranks(groups) < int(round(k * groups.shape[-1]))
            out[name] = np.where(keep, groups, 0.0).reshape(np.shape(vector[name]))
        return out
    flat = np.concatenate([np.asarray(vector[n], np.float32).ravel() for n in names])
    keep = magnitude_ranks(flat[None])[0] < int(round(k * flat.size))
    kept, out, start = np.where(keep, flat, 0.0), {}, 0
    for name in names:
        size = int(np.size(vector[name]))
        out[name] = kept[start:start + size].reshape(np.shape(vector[name]))
        start += size
    return out


def elect_and_disjoint_mean(stacked: np.ndarray) -> np.ndarray:
    """TIES steps 2-3 over ``stacked [tasks, ...]``: the mean of the entries whose sign is sgn(sum) (0 if none)."""
    elected = np.sign(stacked.sum(axis=0))
    agree = (np.sign(stacked) == elected) & (elected != 0)
    count = agree.sum(axis=0)
    total = np.where(agree, stacked, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def breadcrumbs_mask(x: np.ndarray, keep: float, drop_largest: float) -> np.ndarray:
    """Model Breadcrumbs' per-layer mask of ``x [*stack, rows, cols]``: 1 where the |.| rank (0 = largest)
    is in [round(drop_largest d), round(drop_largest d) + round(keep d))."""
    groups = _layers(x)
    d = groups.shape[-1]
    first = int(round(drop_largest * d))
    ranks = magnitude_ranks(groups)
    mask = (ranks >= first) & (ranks < first + int(round(keep * d)))
    return mask.reshape(np.shape(x))


def dare_mask(shape: Sequence[int], p: float, seed: int, task: int, name: str) -> np.ndarray:
    """DARE's keep mask (True with probability 1 - p), drawn from (seed, task, crc32(name))."""
    rng = np.random.default_rng([int(seed), int(task), zlib.crc32(name.encode())])
    return rng.random(tuple(shape)) >= p


def prepare_task_vectors(tasks: Sequence[TaskVector], method: str, options: Mapping[str, Any] | None = None,
                         weights: Sequence[float] | None = None) -> list[dict[str, np.ndarray]]:
    """The per-task step of ``method`` on w_i tau_i: TIES' trim, Breadcrumbs' mask, DARE's drop-and-rescale
    (nothing for sum and average). Every task vector must have the same layers and shapes."""
    opts = check_merge_options(method, options)
    if not tasks:
        raise ValueError("merging needs at least one task vector")
    weights = _weights(weights, len(tasks), 1.0)
    names = list(tasks[0])
    for i, t in enumerate(tasks[1:], 1):
        if list(t) != names or any(np.shape(t[n]) != np.shape(tasks[0][n]) for n in names):
            raise ValueError(f"task vector {i} has other layers or shapes than task vector 0")
    out = []
    for i, (task, w) in enumerate(zip(tasks, weights)):
        scaled = {n: w * np.asarray(task[n], np.float32) for n in names}
        if method == "ties":
            scaled = ties_trim(scaled, opts["k"], opts["scope"])
        elif method == "breadcrumbs":
            scaled = {n: np.where(breadcrumbs_mask(v, opts["keep"], opts["drop_largest"]), v, 0.0)
                      for n, v in scaled.items()}
        elif method == "dare":
            scaled = {n: np.where(dare_mask(v.shape, opts["p"], opts["seed"], i, n), v / (1.0 - opts["p"]), 0.0)
                      for n, v in scaled.items()}
        out.append({n: np.asarray(v, np.float32) for n, v in scaled.items()})
    return out


def additive_scale(method: str, options: Mapping[str, Any] | None, weights: Sequence[float] | None,
                   n: int) -> float | None:
    """c with merged = c sum_i prepared_i when the combine is a sum; None for TIES' disjoint mean."""
    opts = check_merge_options(method, options)
    if method == "ties" or (method == "dare" and opts["combine"] == "ties"):
        return None
    if method == "average":
        total = sum(_weights(weights, n, 1.0))
        if total == 0:
            raise ValueError("average merge: the weights sum to 0")
        return 1.0 / total
    return {"sum": 1.0, "breadcrumbs": opts.get("alpha"), "dare": opts.get("lam")}[method]


def merge_task_vectors(tasks: Sequence[TaskVector], method: str, options: Mapping[str, Any] | None = None,
                       weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """One merged task vector ``{layer name: float32 array}`` (formulas in the module docstring)."""
    prepared = prepare_task_vectors(tasks, method, options, weights)
    scale = additive_scale(method, options, weights, len(tasks))
    out = {}
    for name in prepared[0]:
        stacked = np.stack([p[name] for p in prepared])
        if scale is None:
            out[name] = float(check_merge_options(method, options)["lam"]) * elect_and_disjoint_mean(stacked)
        else:
            out[name] = scale * stacked.sum(axis=0)
        out[name] = out[name].astype(np.float32)
    return out


def lora_factors(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The rank-``rank`` LoRA closest to a kernel-layout delta ``[*stack, n, m]`` (truncated SVD).

    With (1/scale) delta^T = U S V^T per layer: B = U_R S_R^(1/2) ``[*stack, m, R]``,
    A = S_R^(1/2) V_R^T ``[*stack, R, n]``, so scale (B A)^T is the best rank-R
    approximation in Frobenius norm. Returns (A, B, ||delta - scale (B A)^T||_F / ||delta||_F)
    (0 for a zero delta); exact for R >= min(n, m). ``rank`` above min(n, m) pads with zeros.
    """
    target = np.swapaxes(np.asarray(delta, np.float64), -1, -2) / scale  # [*stack, m, n]
    m, n = target.shape[-2:]
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    used = min(int(rank), min(m, n))
    root = np.sqrt(s[..., :used])
    b = np.zeros(target.shape[:-2] + (m, rank))
    a = np.zeros(target.shape[:-2] + (rank, n))
    b[..., :used] = u[..., :, :used] * root[..., None, :]
    a[..., :used, :] = root[..., :, None] * vt[..., :used, :]
    norm = float(np.linalg.norm(target))
    residual = float(np.linalg.norm(target - b @ a)) / norm if norm > 0 else 0.0
    return a.astype(np.float32), b.astype(np.float32), residual


# ------------------------------------------------------------------------ models
def lora_task_vectors(model: nnx.Module, states: Sequence[Any]) -> tuple[list[tuple[tuple, LoRA]],
                                                                        list[dict[str, np.ndarray]]]:
    """``(layers, task vectors)``: every LoRA ``(path, module)`` of ``model`` and, per state, its
    folded deltas ``{path name: (alpha/r) (B_i A_i)^T [*stack, n, m]}``."""
    if not states:
        raise ValueError("merging LoRA adapters needs at least one adapter state")
    flats = [_flat_values(s) for s in states]
    layers = _modules(model, LoRA)
    vectors = []
    for i, flat in enumerate(flats):
        vector = {}
        for path, lora in layers:
            a = _take(flat, path, "A", lora.A[...].shape, i)
            b = _take(flat, path, "B", lora.B[...].shape, i)
            vector[path_name(path)] = np.asarray(lora_kernel_delta(a, b, lora.scale))
        vectors.append(vector)
    return layers, vectors


def fold_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA into its base kernel (exact up to float rounding); returns the plain model."""
    for path, lora in _modules(model, LoRA):
        _add_to_kernel(lora.base, lora_kernel_delta(lora.A[...], lora.B[...], lora.scale))
        model = _replace(model, path, lora.base)
    return model


def merge_lora_adapters(model: nnx.Module, states: Sequence[Any], weights: Sequence[float] | None = None, *,
                        method: str = "sum", options: Mapping[str, Any] | None = None) -> nnx.Module:
    """Fold the merged task vector of the LoRA states (``merge_task_vectors``) into every LoRA's base;
    returns the plain model. The default is task arithmetic, ``sum_i w_i (alpha/r) B_i A_i``."""
    layers, vectors = lora_task_vectors(model, states)
    merged = merge_task_vectors(vectors, method, options, weights)
    for path, lora in layers:
        _add_to_kernel(lora.base, jnp.asarray(merged[path_name(path)]))
        model = _replace(model, path, lora.base)
    return model


def merge_flylora_adapters(model: nnx.Module, states: Sequence[Any],
                           weights: Sequence[float] | None = None, *,
                           shared_a: bool = False, method: str | None = None,
                           options: Mapping[str, Any] | None = None) -> nnx.Module:
    """Merge FlyLoRA adapters of several tasks (see the module docstring for both layouts)."""
    if not states:
        raise ValueError("merge_flylora_adapters needs at least one adapter state")
    if method is None:  # the FlyLoRA paper's merges: summed branches, or the average of a shared A's B's
        method = "sum" if (not shared_a or weights is not None) else "average"
    opts = check_merge_options(method, options)
    flats = [_flat_values(s) for s in states]
    n = len(states)
    scale = additive_scale(method, opts, weights, n)
    if not shared_a and scale is None:
        raise ValueError("TIES' sign election needs parameters the tasks share, and FlyLoRA adapters with "
                         "independent A's share none (B_i's columns multiply different random A's): merge "
                         "them with sum, average, breadcrumbs or dare with combine=sum, or train them with "
                         "one adapter.seed")
    layers = _modules(model, FlyLoRA)
    parts = {path: [(_take(f, path, "A", fly.A[...].shape, i), _take(f, path, "B", fly.B[...].shape, i),
                     _take(f, path, "d", fly.d[...].shape, i)) for i, f in enumerate(flats)]
             for path, fly in layers}
    # sum and average stay in jax (``build_model`` traces this with placeholder states); the sparsifying
    # methods need the values on the host.
    linear = method in ("sum", "average")
    weighted = _weights(weights, n, 1.0)

    def task_vectors():
        return [{path_name(path): np.asarray(parts[path][i][1]) for path, _ in layers} for i in range(n)]

    if shared_a:
        for path, _ in layers:
            a0 = np.asarray(parts[path][0][0])
            if not all(np.array_equal(a0, np.asarray(a)) for a, _, _ in parts[path][1:]):
                raise ValueError(f"shared-A FlyLoRA merge: the adapters disagree on A at {path_name(path)}; "
                                 "they were trained from different seeds, merge them with shared_a=False")
        merged = None if linear else merge_task_vectors(task_vectors(), method, opts, weights)
        for path, fly in layers:
            fly.A[...] = parts[path][0][0].astype(fly.A[...].dtype)
            b = (scale * sum(w * b for w, (_, b, _) in zip(weighted, parts[path])) if linear
                 else jnp.asarray(merged[path_name(path)]))
            fly.B[...] = b.astype(fly.B[...].dtype)
            fly.d[...] = jnp.mean(jnp.stack([d for _, _, d in parts[path]]), axis=0)
            fly.counts[...] = jnp.zeros_like(fly.counts[...])
        return model
    # Independent A's: each branch keeps its own A and d, and B_i' = the per-task step of the method on
    # B_i (a mask by |.| or a random drop: the same for w_i B_i), with branch weight c w_i.
    prepared = None if linear else prepare_task_vectors(task_vectors(), method, opts)
    branch_weights = [scale * w for w in weighted]
    for path, fly in layers:
        branches = []
        for i, (a, _, d) in enumerate(parts[path]):
            branch = FlyLoRA(fly.base, fly.rank, fly.k, fly.alpha, select=fly.select, bias_lr=fly.bias_lr,
                             deterministic=fly.deterministic, projection=a)
            b = parts[path][i][1] if linear else jnp.asarray(prepared[i][path_name(path)])
            branch.B[...] = b.astype(branch.B[...].dtype)
            branch.d[...] = d.astype(branch.d[...].dtype)
            branches.append(branch)
        model = _replace(model, path, FlyLoRASum(fly.base, branches, branch_weights))
    return model

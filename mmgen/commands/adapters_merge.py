"""``mmgen adapters merge --workdirs A B ... --out DIR [--method M] [--weights w ...] [--fold] [--config.merge.M.key=v]``.

Combines task adapters trained on one base (adapter workdirs of ``mmgen.families.adapters``)
into one workdir that ``sample``, ``eval`` and ``init_from`` read like any other
(docs/ALGORITHMS.md "Adapters"; LoRA merging, Hu et al. 2021 sec. 4.1; task
arithmetic, Ilharco et al. 2023; TIES-Merging, Yadav et al. 2023; Model Breadcrumbs,
Davari & Belilovsky 2023; DARE, Yu et al. 2023; FlyLoRA's multi-task merging, 2025).
``--method`` is one of ``sum``, ``average``, ``ties``, ``breadcrumbs``, ``dare``
(formulas: ``mmgen.adapters.merge``); its options are the ``merge`` block of the first
workdir's config (``configs/adapters/adapter_common.py``: the papers' defaults; the
shipped config's block for a workdir older than it), changed with
``--config.merge.<method>.<key>=value``. ``--weights`` w_i scale each task vector first
(default 1). Without ``--method``: ``sum`` (``average`` for FlyLoRA adapters sharing A).

* LoRA with ``--fold``: ``W' = W + tau``, tau the method's merge of the folded deltas
  ``tau_i = (alpha/r) B_i A_i``, folded into the base weights (exact).
  ``--out`` is a *generative* workdir holding the whole merged model: it no longer
  needs the base workdir.
* LoRA without ``--fold``, ``--out`` an *adapters* workdir that loads the base like its
  inputs did:
    - sum / average: one LoRA of rank ``N r``, ``A = [A_1; ...; A_N]``,
      ``B = [c w_1 B_1, ..., c w_N B_N]`` (c = 1, or 1 / sum w for the average; same
      scale ``alpha / r``: alpha becomes ``N alpha``), equal to the folded model up to
      float rounding;
    - ties / breadcrumbs / dare: trimming, masking and dropping make tau full-rank in
      general, so it is stored as the rank-R LoRA closest to it in Frobenius norm
      (truncated SVD per layer, ``lora_factors``), R = ``merge.svd_rank`` (0: ``N r``,
      the concatenation's rank), at most min(in, out) where it is exact; the worst
      relative residual ``||tau - tau_R||_F / ||tau||_F`` is printed and recorded in
      ``merge.json``. ``--fold`` gives the exact merge.
* FlyLoRA (never folded: its top-k gate depends on x), ``--out`` an adapters workdir:
  adapters with independent A's (different seeds) become one ``FlyLoRASum`` per layer,
  whose branches hold the per-task step of the method on their own B_i (Breadcrumbs'
  mask, DARE's drop) and add with weights c w_i; TIES (and DARE combined by TIES) is
  refused, as the B_i of independent A's share no parameters to elect a sign over.
  Adapters sharing A (bit-identical, trained from one seed) become one FlyLoRA whose B
  is the method's merge of their B's (B starts at zero, so B_i is the task vector) and
  d the mean of their d's.

The merged config takes its data and trainer keys from the first workdir and
``task_weights`` = the sum of every adapter's normalised task weights; ``DIR/merge.json``
records the inputs, the method and its options. The merged checkpoint's step is the
largest input step. Adapters of different bases (base workdir, step or fingerprint),
of different kinds or shapes, ``--fold`` for FlyLoRA, a method that does not apply
and a bad option are one-line errors, before anything is written.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmgen.adapters.flylora import FlyLoRASum, RoutingCount
from mmgen.adapters.lora import LoRA
from mmgen.adapters.merge import (
    additive_scale,
    check_merge_options,
    lora_factors,
    lora_task_vectors,
    merge_flylora_adapters,
    merge_lora_adapters,
    merge_task_vectors,
)
from mmgen.adapters.surgery import adapter_state_filter
from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import adapters as adapters_family
from mmgen.families import generative
from mmgen.parallel import mesh as mesh_lib
from mmgen.parallel import sharding as sharding_lib
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import Checkpointer, NoUsableCheckpoint

FAMILY = adapters_family.FAMILY

# Adapter settings that must agree for adapters to merge (the seed may differ).
SHAPE_KEYS = ("kind", "targets", "rank", "alpha", "k", "select", "init")


# ------------------------------------------------------------------------ inputs
def read_adapter_config(workdir: str) -> ml_collections.ConfigDict:
    cfg = workdir_lib.read_config(workdir, ("adapters",), "an adapter run (family 'adapters')")
    if int(cfg.adapter.get("branches", 1)) > 1:
        raise UserError(f"{workdir} is already a merge of {cfg.adapter.branches} adapters; merge the task "
                        "adapters it came from instead")
    return cfg


def _base_of(cfg) -> str:
    return f"{cfg.base_workdir} step {cfg.base_step} (fingerprint {str(cfg.base_fingerprint)[:12]})"


def check_mergeable(workdirs, cfgs, weights, fold: bool) -> None:
    """One line for every way the inputs cannot be merged."""
    bases = {(c.base_workdir, int(c.base_step), c.base_fingerprint) for c in cfgs}
    if len(bases) > 1:
        listing = "; ".join(f"{w} on {_base_of(c)}" for w, c in zip(workdirs, cfgs))
        raise UserError(f"the adapters were trained on different bases ({listing}): merge adapters of one base only")
    first = cfgs[0].adapter
    for w, c in zip(workdirs[1:], cfgs[1:]):
        differ = [k for k in SHAPE_KEYS if c.adapter.get(k) != first.get(k)]
        if differ:
            raise UserError(f"{w} differs from {workdirs[0]} in adapter {', '.join(differ)} "
                            f"({', '.join(f'{k}={c.adapter.get(k)!r} vs {first.get(k)!r}' for k in differ)}); "
                            "only adapters of one kind and shape merge")
    if fold and first.kind != "lora":
        raise UserError("--fold needs LoRA adapters: FlyLoRA cannot be folded into the base weights (its top-k "
                        "gate depends on the input); merge without --fold")
    if weights is not None and len(weights) != len(workdirs):
        raise UserError(f"--weights gives {len(weights)} weights for {len(workdirs)} workdirs")


def merged_task_weights(cfgs) -> dict[str, float]:
    """Sum over adapters of each adapter's task weights normalised to 1."""
    out: dict[str, float] = {}
    for c in cfgs:
        w = {k: float(v) for k, v in c.task_weights.items()}
        total = sum(v for v in w.values() if v > 0)
        for k, v in w.items():
            out[k] = out.get(k, 0.0) + (v / total if v > 0 else 0.0)
    return out


def restore_adapters(cfg, workdir: str, mesh) -> tuple[nnx.State, int]:
    """The adapter workdir's trained model variables (no base) and its step."""
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    _, abstract = loop.abstract_state(FAMILY, cfg)
    trained, _ = loop.split_frozen(FAMILY, abstract)
    shardings = sharding_lib.state_shardings(trained, mesh, rules)
    ckpt = Checkpointer(workdir, read_only=True)
    target = loop.with_shardings(trained, shardings)
    try:
        if cfg.get("weights_only"):  # a weights-only adapter workdir holds the model part only
            step = ckpt.latest_step()
            found = None if step is None else (step, ckpt.restore_parts(step, target, ("model",)), False)
        else:  # the newest step that restores and verifies (a damaged newer one is named in a warning)
            found = ckpt.restore_newest(target)
    except NoUsableCheckpoint as e:
        raise UserError(str(e)) from None
    finally:
        ckpt.close()
    if found is None:
        raise UserError(f"no checkpoint in {workdir}/checkpoints: train the adapters first")
    step, state, _ = found
    return state["model"], int(step)


# ------------------------------------------------------------------------ outputs
def _flat(state) -> dict[tuple[str, ...], jax.Array]:
    return {tuple(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def weights_state(family, cfg, mesh, values: dict, prefixes=("model",)) -> nnx.State:
    """The weights of ``family``'s state for ``cfg`` (its ``prefixes`` entries only): ``values``.

    A variable without a value is an error, except FlyLoRA's routing counts (statistics of
    a training batch, which start at zero). Built without compiling the random
    initialisation; nothing else of a training state (no optimizer) is made up.
    """
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    _, abstract = loop.abstract_state(family, cfg)
    trained, _ = loop.split_frozen(family, abstract)
    trained = nnx.State({p: trained[p] for p in prefixes})
    shardings = nnx.to_flat_state(sharding_lib.state_shardings(trained, mesh, rules))
    used, flat = set(), []
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(trained), shardings):
        key = tuple(str(p) for p in path)
        target, where = var.get_value(), sharding.get_value()
        if key[1:] in values:
            value = values[key[1:]]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"merged {'.'.join(key)} has shape {value.shape}, the workdir expects {target.shape}")
            used.add(key[1:])
        elif isinstance(var, RoutingCount):
            value = np.zeros(target.shape, target.dtype)
        else:
            raise ValueError(f"the merged state has no value for {'.'.join(key)}")
        if value.dtype != target.dtype:
            value = value.astype(target.dtype)
        flat.append((path, var.replace(jax.device_put(value, where))))
    missing = set(values) - used
    if missing:
        raise ValueError(f"merged variables with no place in the output state: {sorted(missing)[:3]}")
    return nnx.from_flat_state(flat)


def write_workdir(family, cfg, out: str, step: int, values: dict, mesh, prefixes=("model",)) -> None:
    """config.json (``weights_only``) + one checkpoint holding ``family``'s weights ``values``.

    ``sample``, ``eval`` and ``init_from`` read it (``loop.load_state``,
    ``loop.load_warm_start``); ``train`` refuses to resume it, since it holds no optimizer.
    """
    state = weights_state(family, cfg, mesh, values, prefixes)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.weights_only = True
    workdir_lib.write_config(cfg, out)
    ckpt = Checkpointer(out, async_save=False)
    ckpt.save(step, state, force=True)
    ckpt.close()


def generative_config(cfg, task_weights, step) -> ml_collections.ConfigDict:
    """The adapter config as a generative run (what the folded model is)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in adapters_family.ADAPTER_KEYS + ("merge",)}
    d.update(family="generative", task_weights=task_weights, total_steps=step)
    return ml_collections.ConfigDict(d)


def adapter_run_config(cfg, task_weights, step, **adapter) -> ml_collections.ConfigDict:
    d = cfg.to_dict()
    d.update(task_weights=task_weights, total_steps=step)
    d["adapter"] = {**d["adapter"], **adapter}
    return ml_collections.ConfigDict(d)


def lora_concat_values(model, flats, weights) -> dict:
    """Per LoRA layer: A = [A_1; ...; A_N] (rank axis), B = [w_1 B_1, ..., w_N B_N]."""
    values = {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, LoRA):
            continue
        key = tuple(str(p) for p in path)
        values[key + ("A",)] = jnp.concatenate([f[key + ("A",)] for f in flats], axis=-2)
        values[key + ("B",)] = jnp.concatenate([w * f[key + ("B",)] for f, w in zip(flats, weights)], axis=-1)
    return values


# ------------------------------------------------------------------------ method options
def merge_options(cfg, overrides=()) -> ml_collections.ConfigDict:
    """The ``merge`` block (every method's options) of ``cfg``, or of the shipped config of its
    adapter kind when ``cfg`` predates it, with ``merge.*`` overrides applied."""
    if "merge" in cfg:
        block = cfg.merge.to_dict()
    else:
        block = config_lib.load_config(f"configs/adapters/{cfg.adapter.kind}.py:tiny").merge.to_dict()
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith("merge.")]
    if bad:
        raise UserError(f"adapters merge takes only --config.merge.* overrides (the merge options), got "
                        f"--config.{bad[0]}: the merged config comes from the workdirs")
    holder = ml_collections.ConfigDict({"merge": block})
    config_lib.apply_overrides(holder, overrides)
    return holder.merge


def resolve_method(method, options, kind: str, shared_a: bool, n: int, weights) -> tuple[str, dict]:
    """The method actually run (the default when ``method`` is None) and its checked options."""
    if method is None:
        method = "average" if (kind == "flylora" and shared_a and weights is None) else "sum"
    try:
        opts = check_merge_options(method, options.get(method, {}))
        if kind == "flylora" and not shared_a and additive_scale(method, opts, weights, n) is None:
            raise ValueError(f"--method {method}{' (combine=ties)' if method == 'dare' else ''} elects one sign "
                             "per parameter across tasks, but FlyLoRA adapters with independent A's (different "
                             "adapter.seed) share no parameters: use sum, average, breadcrumbs or dare with "
                             "combine=sum, or train the adapters with one adapter.seed")
        if method == "average":
            additive_scale(method, opts, weights, n)
    except ValueError as e:
        raise UserError(str(e)) from None
    return method, opts


def svd_rank(options, n: int, rank: int, model) -> int:
    """R for the SVD re-factorisation: ``merge.svd_rank`` (0: N r), capped at min(in, out) of every layer."""
    wanted = int(options.get("svd_rank", 0)) or n * rank
    if wanted < 0:
        raise UserError(f"merge.svd_rank={wanted} must be >= 0 (0: N x rank)")
    full = min(min(m.A[...].shape[-1], m.B[...].shape[-2]) for _, m in nnx.iter_modules(model) if isinstance(m, LoRA))
    return min(wanted, full)


# ------------------------------------------------------------------------ command
def merge(workdirs, out: str, weights=None, fold: bool = False, method: str | None = None,
          overrides=()) -> dict:
    """Merge ``workdirs`` into ``out``; returns what ``merge.json`` records."""
    workdirs = [os.path.abspath(w) for w in workdirs]
    out = os.path.abspath(out)
    for w in workdirs:
        if not os.path.isdir(w):
            raise UserError(f"{w}: no such workdir")
    cfgs = [read_adapter_config(w) for w in workdirs]
    check_mergeable(workdirs, cfgs, weights, fold)
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} exists and is not empty: give a new folder")
    options = merge_options(cfgs[0], overrides)
    if method is not None:  # bad option values stop here, before anything is restored or compiled
        try:
            check_merge_options(method, options.to_dict().get(method, {}))
        except ValueError as e:
            raise UserError(str(e)) from None

    first = cfgs[0]
    mesh = mesh_lib.make_mesh(first.mesh)
    loop.check_batch_divides(first, mesh)
    restored = [restore_adapters(c, w, mesh) for c, w in zip(cfgs, workdirs)]
    states = [s for s, _ in restored]
    flats = [_flat(s) for s in states]
    step = max(s for _, s in restored)
    tasks = merged_task_weights(cfgs)
    n = len(workdirs)
    kind = first.adapter.kind
    shared_a = kind == "flylora" and all(np.array_equal(np.asarray(flats[0][k]), np.asarray(f[k]))
                                         for f in flats[1:] for k in flats[0] if k[-1] == "A")
    method, opts = resolve_method(method, options.to_dict(), kind, shared_a, n, weights)
    # The first run's model with the base loaded and checked against its fingerprint.
    model = loop.load_state(FAMILY, first, workdirs[0], mesh=mesh).model
    extra = {}

    if kind == "lora" and fold:
        mode = "lora_fold"
        model = merge_lora_adapters(model, states, weights, method=method, options=opts)
        cfg = generative_config(first, tasks, step)
        write_workdir(generative.FAMILY, cfg, out, step, _flat(nnx.state(model, nnx.Param)), mesh,
                      prefixes=("model",) + (("ema",) if float(cfg.get("ema_decay", 0.0)) > 0 else ()))
    elif kind == "lora" and method in ("sum", "average"):
        mode = "lora_concat"
        c = additive_scale(method, opts, weights, n)
        w = [c * x for x in ([1.0] * n if weights is None else list(weights))]
        values = lora_concat_values(model, flats, w)
        cfg = adapter_run_config(first, tasks, step, rank=n * int(first.adapter.rank),
                                 alpha=n * float(first.adapter.alpha))
        write_workdir(FAMILY, cfg, out, step, values, mesh)
    elif kind == "lora":
        mode = "lora_svd"
        layers, vectors = lora_task_vectors(model, states)
        merged = merge_task_vectors(vectors, method, opts, weights)
        rank = svd_rank(options, n, int(first.adapter.rank), model)
        scale = float(first.adapter.alpha) / int(first.adapter.rank)
        values, residuals = {}, {}
        for path, _ in layers:
            key = tuple(str(p) for p in path)
            a, b, residuals[".".join(key)] = lora_factors(merged[".".join(key)], rank, scale)
            values[key + ("A",)], values[key + ("B",)] = a, b
        cfg = adapter_run_config(first, tasks, step, rank=rank, alpha=scale * rank)
        write_workdir(FAMILY, cfg, out, step, values, mesh)
        extra = {"svd_rank": rank, "svd_relative_residual": residuals}
    elif shared_a:
        mode = "flylora_shared_a"
        try:
            model = merge_flylora_adapters(model, states, weights, shared_a=True, method=method, options=opts)
        except ValueError as e:
            raise UserError(str(e)) from None
        cfg = adapter_run_config(first, tasks, step)
        write_workdir(FAMILY, cfg, out, step, _flat(nnx.state(model, adapter_state_filter)), mesh)
    else:
        mode = "flylora_sum"
        model = merge_flylora_adapters(model, states, weights, method=method, options=opts)
        branch_weights = next(list(m.weights) for _, m in nnx.iter_modules(model) if isinstance(m, FlyLoRASum))
        cfg = adapter_run_config(first, tasks, step, branches=n, branch_weights=branch_weights)
        write_workdir(FAMILY, cfg, out, step, _flat(nnx.state(model, adapter_state_filter)), mesh)

    record = {"mode": mode, "method": method, "options": opts, "workdirs": workdirs,
              "weights": None if weights is None else list(weights),
              "fold": bool(fold), "base_workdir": first.base_workdir, "base_step": int(first.base_step),
              "base_fingerprint": first.base_fingerprint, "step": step, "family": cfg.family, **extra}
    if jax.process_index() == 0:
        with open(os.path.join(out, "merge.json"), "w") as f:
            json.dump(record, f, indent=2)
    return record


def main(args, overrides) -> int:
    record = merge(args.workdirs, args.out, args.weights, args.fold, getattr(args, "method", None), overrides)
    if jax.process_index() == 0:
        worst = max(record.get("svd_relative_residual", {}).values(), default=None)
        note = "" if worst is None else (f"; stored as rank-{record['svd_rank']} LoRA, worst relative SVD "
                                         f"residual {worst:.3g} (--fold is exact)")
        print(f"merged {len(record['workdirs'])} adapters ({record['method']}, {record['mode']}) into {args.out}: "
              f"a {record['family']} workdir at step {record['step']}{note}")
    return 0

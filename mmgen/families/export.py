"""Exporting a run: its inference weights, resolved config and a model card, nothing else.

``export_run(workdir, out, step)`` (``mmgen export``, ``mmgen.export``) writes the export
directory ``mmgen.train.export`` describes: ``model.safetensors`` (the EMA model where the
run kept one, read alone from the checkpoint: ``loop.load_inference_model``),
``config.json`` and ``README.md``. A generative run's tokenizers are exported beside it
into ``tokenizers/video`` and ``tokenizers/audio`` (an export given as a tokenizer is
copied), and its ``config.json`` names them relative to the export directory, so the
directory moves and loads as one piece (``mmgen.load_generator``).

The directory appears whole or not at all: everything is written into a temporary
sibling that is renamed to ``out`` at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
from flax import nnx

from mmgen.errors import UserError
from mmgen.families import generative as generative_family
from mmgen.families import tokenizer as tokenizer_family
from mmgen.generative.tokens import task_weights, tokenizer_workdir
from mmgen.parallel import mesh as mesh_lib
from mmgen.train import export as export_lib
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib

FAMILIES = ("tokenizer", "generative")


def check_out(out: str) -> None:
    """``out`` must not exist yet, or be an empty directory (one line otherwise)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} already exists and is not an empty directory: export into a new one")


def export_run(workdir: str, out: str, step: int | None = None) -> dict:
    """Export ``workdir`` (checkpoint ``step``, default the newest that verifies) into ``out``.

    Returns ``{"out", "family", "step", "parameters", "weights_bytes", "tokenizers"}``.
    """
    cfg = workdir_lib.read_config(workdir)
    family = cfg.get("family", "")
    if family not in FAMILIES:
        hint = " (merge adapters with `mmgen adapters merge --fold` first)" if family == "adapters" else ""
        raise UserError(f"{workdir} holds a {family!r} run; export takes {' or '.join(FAMILIES)} runs{hint}")
    check_out(out)
    workdir_lib.check_step(workdir, step)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        info = _export_into(cfg, workdir, tmp, step, out)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, **info}


def _one_device_mesh():
    return mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}),
                              devices=[jax.local_devices()[0]])


def _export_into(cfg, workdir: str, directory: str, step: int | None, name: str) -> dict:
    """Write the export of ``workdir`` into ``directory``, which will be ``name``."""
    tokenizers = {}
    if cfg.family == "tokenizer":
        loaded = tokenizer_family.load(workdir, step=step, devices=jax.local_devices()[0])
        model, step = loaded.model, loaded.step
    else:
        model, step = loop.load_inference_model(generative_family.FAMILY, cfg, workdir, mesh=_one_device_mesh(),
                                                step=step)
        cfg = cfg.copy_and_resolve_references()
        for m in ("video", "audio"):
            source = tokenizer_workdir(cfg, m)
            if not source:
                continue
            if not os.path.isdir(source):
                raise UserError(f"config.tokenizers.{m}_workdir={source!r} of {workdir} is not a directory (a path "
                                f"relative to where the run was trained: export from there, or fix config.json)")
            target = os.path.join(directory, "tokenizers", m)
            if export_lib.is_export(source):
                shutil.copytree(source, target)
            else:
                os.makedirs(target)
                _export_into(workdir_lib.read_config(source, ("tokenizer",), "a tokenizer"), source, target, None,
                             os.path.join(name, "tokenizers", m))
            cfg.tokenizers[f"{m}_workdir"] = os.path.join("tokenizers", m)  # relative to the export directory
            tokenizers[m] = os.path.abspath(source)
    state = nnx.state(model)
    params = nnx.state(model, nnx.Param)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
    path = export_lib.save_weights(state, directory, {
        "family": cfg.family, "modality": cfg.get("modality", ""), "step": int(step),
        "source": os.path.abspath(workdir)})
    workdir_lib.write_config(cfg, directory)
    info = {"family": cfg.family, "step": int(step), "parameters": n_params, "parameter_bytes": param_bytes,
            "weights_bytes": os.path.getsize(path), "tokenizers": tokenizers}
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(model_card(cfg, workdir, info, model, name))
    return info


def _eval_metrics(workdir: str, step: int) -> tuple[str, dict] | None:
    """(file name, scalar metrics) of the workdir's evaluation of ``step``, newest first; None without one."""
    for path in (workdir_lib.output_paths(workdir, step)[0], workdir_lib.output_paths(workdir)[0]):
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            continue
        scalars = {}

        def walk(prefix, value):
            if isinstance(value, bool):
                return
            if isinstance(value, (int, float)):
                scalars[prefix] = value
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}/{k}" if prefix else str(k), v)

        walk("", result)
        return os.path.basename(path), scalars
    return None


def model_card(cfg, workdir: str, info: dict, model, name: str) -> str:
    """The export's README.md: what the model is, what it was trained on, how far, its metrics, how to load it."""
    d = cfg.dataset
    kind = f"{cfg.modality} tokenizer" if cfg.family == "tokenizer" else "masked multi-task generative transformer"
    weights = f"EMA (decay {cfg.ema_decay:g})" if cfg.get("ema_decay", 0.0) else "raw (the run kept no EMA)"
    lines = [f"# mmgen {kind}", "",
             f"Exported by `mmgen export` on {datetime.date.today().isoformat()} from `{os.path.abspath(workdir)}`.", "",
             "| | |", "| --- | --- |",
             f"| family | `{cfg.family}`" + (f", `{cfg.modality}`" if cfg.family == "tokenizer" else "") + " |",
             f"| trained on | `{d.name}` ({int(d.frames)} frames of {int(d.resolution)}x{int(d.resolution)} at "
             f"{float(d.fps):g} fps, sound at {int(d.sample_rate)} Hz) |",
             f"| steps | {info['step']} of {cfg.total_steps} (batch {cfg.batch_size}) |",
             f"| parameters | {info['parameters']:,} ({info['parameter_bytes'] / 2**20:.1f} MiB) |",
             f"| weights | {weights}; `model.safetensors` {info['weights_bytes'] / 2**20:.1f} MiB |"]
    if cfg.family == "tokenizer":
        lines.append(f"| vocabulary | {model.vocab_size} codes x {model.quantizer.num_levels} level(s) |")
    else:
        m = cfg.model
        lines.append(f"| model | width {m.width}, depth {m.depth}, {m.num_heads} heads |")
        lines.append(f"| tasks | {', '.join(f'`{t}`' for t in task_weights(cfg))} |")
        for name, source in info["tokenizers"].items():
            lines.append(f"| {name} tokenizer | `tokenizers/{name}` (exported from `{source}`) |")
    metrics = _eval_metrics(workdir, info["step"])
    lines += ["", "## Metrics", ""]
    if metrics is None:
        lines.append("No `mmgen eval` result in the workdir at export time.")
    else:
        source, scalars = metrics
        lines += [f"From `{source}`:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(scalars.items())]
    if cfg.family == "tokenizer":
        signal = tokenizer_family.tokenizer_kind(cfg)
        load = (f"tok = mmgen.load_tokenizer({{where}})\ntokens = tok.encode({signal.name})   # {signal.signal_doc}\n"
                f"{signal.name} = tok.decode(tokens)")
    else:
        load = "gen = mmgen.load_generator({where})\nresult = gen.sample(task=\"frame_prediction\", inputs=\"clip.mp4\", num=2)"
    load = load.format(where=repr(name))
    lines += ["", "## Use", "", "```python", "import mmgen", "", load, "```", "",
              "`config.json` is the run's resolved config; `model.safetensors` holds the inference weights only "
              "(no optimizer state), one tensor per variable, named by its path in the model.", ""]
    return "\n".join(lines)

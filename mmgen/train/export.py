"""Exported models: the inference weights as safetensors, beside the run's config.

An export directory (written by ``mmgen export``, ``mmgen.families.export``) holds

- ``model.safetensors``: every variable of the inference model (the EMA copy where the
  run kept one) except its RNG state, one tensor per variable named by its path in the
  model joined with ``/`` (``encoder/blocks/0/conv/kernel``), stored as on device
  (float32 parameters; integer quantizer counters); the header's metadata says
  ``format`` (``mmgen-export/1``), ``family``, ``modality``, ``step`` and ``source``;
- ``config.json``: the run's resolved config;
- ``README.md``: a model card.

No optimizer moments, no discriminator, no step counters: the file is the parameters'
bytes plus a header of a few kB. ``load_weights`` reads it onto the shapes and shardings
of an abstract model (``nnx.eval_shape``), so nothing else is ever allocated.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from flax import nnx

from mmgen.errors import UserError

WEIGHTS = "model.safetensors"
FORMAT = "mmgen-export/1"


def is_export(path: str) -> bool:
    """Whether ``path`` is an export directory (holds ``model.safetensors``)."""
    return os.path.isfile(os.path.join(str(path), WEIGHTS))


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def inference_variables(state: nnx.State) -> dict:
    """``{name: Variable}`` of what an export holds: every variable but the RNG state."""
    return {_name(path): var for path, var in nnx.to_flat_state(state)
            if not isinstance(var, nnx.RngState)}


def save_weights(state: nnx.State, directory: str, metadata: dict) -> str:
    """Write ``state``'s variables (RNG state left out) to ``directory/model.safetensors``.

    Written to a temporary file and renamed, so the file is whole or absent. Returns its path.
    """
    from safetensors.numpy import save_file

    arrays = {}
    for name, var in inference_variables(state).items():
        value = np.asarray(jax.device_get(var.get_value()))
        if value.dtype.name not in ("float32", "float16", "float64", "int32", "int64", "uint32", "uint8", "bool",
                                    "int8", "int16", "uint16"):
            raise UserError(f"variable {name} has dtype {value.dtype}, which the export format does not store")
        arrays[name] = np.ascontiguousarray(value)
    meta = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}
    path = os.path.join(directory, WEIGHTS)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(directory: str) -> dict:
    """The safetensors header's metadata of an export (``format``, ``family``, ``step``, ...)."""
    from safetensors import safe_open

    with safe_open(os.path.join(directory, WEIGHTS), framework="numpy") as f:
        return dict(f.metadata() or {})


def load_weights(directory: str, abstract: nnx.State) -> nnx.State:
    """The export's tensors on ``abstract``'s shapes and shardings (``ShapeDtypeStruct``s with
    ``sharding``); its RNG state, which exports leave out, is a fresh key per stream.

    A tensor the model lacks, or one of another shape or dtype, is a ``UserError`` naming it.
    """
    from safetensors import safe_open

    path = os.path.join(directory, WEIGHTS)
    out = []
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not an mmgen export (format {meta.get('format')!r}, want {FORMAT!r})")
        stored = set(f.keys())
        wanted = set()
        for p, var in nnx.to_flat_state(abstract):
            target = var.get_value()
            sharding = getattr(target, "sharding", None)
            name = _name(p)
            if isinstance(var, nnx.RngState):
                if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
                    value = jax.random.split(jax.random.key(0), target.shape) if target.shape else jax.random.key(0)
                else:
                    value = np.zeros(target.shape, target.dtype)
            else:
                wanted.add(name)
                if name not in stored:
                    raise UserError(f"{path} lacks {name} {tuple(target.shape)}: exported from another model config")
                value = f.get_tensor(name)
                if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
                    raise UserError(f"{path}: {name} is {value.dtype}{list(value.shape)}, the model has "
                                    f"{target.dtype}{list(target.shape)}")
            out.append((p, var.replace(jax.device_put(value, sharding))))
        extra = sorted(stored - wanted)
        if extra:
            raise UserError(f"{path} holds {len(extra)} tensor(s) the model lacks, e.g. {extra[0]}: "
                            f"exported from another model config")
    return nnx.from_flat_state(out)

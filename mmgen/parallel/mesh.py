"""Device mesh from config axes (MaxText-style ICI x DCN, ``-1`` = fill).

``cfg.mesh`` names the size of each axis inside a slice/host (``data``, ``fsdp``,
``tensor``) and across slices/hosts (``dcn_data``, ``dcn_fsdp``, ``dcn_tensor``).
The mesh axis sizes are the products ICI x DCN. FSDP belongs on the fast
interconnect (ICI / NVLink), data parallelism across the slow one (DCN); tensor
parallelism only inside a host. One ``-1`` per group is filled with what is left.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from mmgen.errors import UserError

AXES = ("data", "fsdp", "tensor")


def _fill(sizes: dict[str, int], total: int, what: str) -> list[int]:
    sizes = {k: int(v) for k, v in sizes.items()}
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise UserError(f"mesh: at most one {what} axis may be -1, got {unknown}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise UserError(f"mesh: {what} axis sizes must be positive or -1, got {sizes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    desc = " x ".join(f"{k}={v}" for k, v in sizes.items())
    if unknown:
        if total % known:
            raise UserError(f"mesh {desc} does not divide {total} {what} devices")
        sizes[unknown[0]] = total // known
    elif known != total:
        raise UserError(f"mesh {desc} uses {known} {what} devices but {total} are available")
    return [sizes[a] for a in AXES]


def mesh_shapes(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[list[int], list[int]]:
    """(ici_shape, dcn_shape) over ``AXES`` for the given device and slice counts."""
    dcn = {a: mesh_cfg.get(f"dcn_{a}", 1) for a in AXES}
    dcn_total = math.prod(v for v in dcn.values() if v != -1)
    if any(v == -1 for v in dcn.values()) or dcn_total > 1 or num_slices > 1:
        dcn_shape = _fill(dcn, num_slices, "slice/host (DCN)")
    else:
        dcn_shape = [1, 1, 1]
    per_slice, rem = divmod(num_devices, math.prod(dcn_shape))
    if rem:
        raise UserError(f"{num_devices} devices do not split into {math.prod(dcn_shape)} slices")
    ici_shape = _fill({a: mesh_cfg.get(a, 1) for a in AXES}, per_slice, "per-slice")
    return ici_shape, dcn_shape


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` (Auto axis types)."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = {a: mesh_cfg.get(f"dcn_{a}", 1) for a in AXES}
    multi = any(v != 1 for v in dcn.values())
    num_slices, process_is_granule = 1, False
    if multi:
        # DCN units are TPU slices when the devices know theirs; otherwise (GPU hosts,
        # CPU processes, which all report slice 0) the processes.
        slice_ids = {getattr(d, "slice_index", None) for d in devices}
        num_slices = len(slice_ids)
        if None in slice_ids or num_slices == 1:
            num_slices = len({d.process_index for d in devices})
            process_is_granule = True
    ici_shape, dcn_shape = mesh_shapes(mesh_cfg, len(devices), num_slices)
    shape = [i * d for i, d in zip(ici_shape, dcn_shape)]
    if math.prod(dcn_shape) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=process_is_granule)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items())

"""Which kernel forms the layers' ``impl="auto"`` choices take.

Some layers have a second way to compute the same thing that XLA:CPU runs much faster
(``mmgen.nn.conv.conv3d``: 3D convolution as per-tap 2D convolutions;
``mmgen.nn.attention.attention``: heads-major score matmuls), while GPU and TPU are
best served by XLA's own op (cuDNN, the TPU convolution unit, fused attention). Every
such choice asks ``cpu_forms()``, so there is one place that decides.

The choice follows the platform the computation is *for*: the default backend, unless
``target_platform`` says otherwise. ``plan`` compiles an H100 or TPU step on CPU
stand-ins inside ``target_platform("gpu")`` / ``("tpu")``, so it measures the forms
that the accelerator will run, not the CPU's.
"""

from __future__ import annotations

import contextlib
import threading

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_target = threading.local()


@contextlib.contextmanager
def target_platform(platform: str):
    """Inside the block, ``impl="auto"`` layers trace the kernel forms of ``platform``."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is not one of {PLATFORMS}")
    previous = getattr(_target, "platform", None)
    _target.platform = platform
    try:
        yield
    finally:
        _target.platform = previous


def platform() -> str:
    """The platform the computation is for: ``target_platform``'s, else the default backend."""
    return getattr(_target, "platform", None) or jax.default_backend()


def cpu_forms() -> bool:
    """True when the computation is for the CPU (``"auto"`` takes the CPU forms)."""
    return platform() == "cpu"


def cudnn_kernels() -> bool:
    """True when cuDNN's fused kernels can be called: the computation is for a GPU and
    really runs on an NVIDIA one (a CPU stand-in inside ``target_platform("gpu")`` has
    none, so ``plan`` traces XLA's form there and its memory figure is an upper bound)."""
    if platform() != "gpu" or jax.default_backend() != "gpu":
        return False
    return jax.local_devices()[0].device_kind.upper().startswith("NVIDIA")

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


def cpu_forms() -> bool:
    """True when the computation is for the CPU (``"auto"`` takes the CPU forms)."""
    platform = getattr(_target, "platform", None) or jax.default_backend()
    return platform == "cpu"

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


# CPU forms that can be switched off one by one (``without_cpu_forms``), so a benchmark can
# compile a step with and without them in one process: ``mmgen.nn.conv.conv`` and
# ``causal_conv_transpose1d``'s stride-1 rewrites, ``BlurPool3d``'s separable filter,
# ``conv3d``'s per-tap convs with the weight gradient summed over batch chunks, and
# ``conv3d`` by the hand-written kernels (``mmgen.nn.cpu_kernels``).
SWITCHABLE_FORMS = ("phases", "separable_blur", "chunked_weight_grad", "conv_kernels")


@contextlib.contextmanager
def without_cpu_forms(*names: str):
    """Inside the block, ``cpu_forms(name)`` is False for each of ``names`` (XLA's op is traced)."""
    unknown = set(names) - set(SWITCHABLE_FORMS)
    if unknown:
        raise ValueError(f"unknown CPU forms {sorted(unknown)}; expected some of {SWITCHABLE_FORMS}")
    previous = getattr(_target, "disabled", frozenset())
    _target.disabled = previous | frozenset(names)
    try:
        yield
    finally:
        _target.disabled = previous


def cpu_forms(name: str | None = None) -> bool:
    """True when the computation is for the CPU (``"auto"`` takes the CPU forms), and the
    form ``name`` (one of ``SWITCHABLE_FORMS``) is not switched off by ``without_cpu_forms``."""
    return platform() == "cpu" and name not in getattr(_target, "disabled", frozenset())


def cudnn_kernels() -> bool:
    """True when cuDNN's fused kernels can be called: the computation is for a GPU and
    really runs on an NVIDIA one (a CPU stand-in inside ``target_platform("gpu")`` has
    none, so ``plan`` traces XLA's form there and its memory figure is an upper bound)."""
    if platform() != "gpu" or jax.default_backend() != "gpu":
        return False
    return jax.local_devices()[0].device_kind.upper().startswith("NVIDIA")

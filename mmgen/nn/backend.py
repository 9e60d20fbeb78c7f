"""Which kernel forms the layers' ``impl="auto"`` choices take.

Some layers have a second way to compute the same thing that XLA:CPU runs much faster
(``mmgen.nn.conv.conv3d``: 3D convolution as per-tap 2D convolutions;
``mmgen.nn.attention.attention``: heads-major score matmuls), while GPU and TPU are
best served by XLA's own op (cuDNN, the TPU convolution unit, fused attention). Every
such choice asks ``cpu_forms()``, so there is one place that decides.
"""

from __future__ import annotations

import jax


def cpu_forms() -> bool:
    """True when the default backend is the CPU, i.e. ``"auto"`` should take the CPU forms."""
    return jax.default_backend() == "cpu"

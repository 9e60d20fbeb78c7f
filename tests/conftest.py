"""Test-wide settings (8 fake CPU devices so sharding is exercised without hardware) and
shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def random_i3d():
    """An I3D with seeded random weights (every array non-trivial), for FVD plumbing tests."""
    from flax import nnx

    from mmgen.eval import i3d

    # Random weights filled in from numpy: an eager nnx init would compile each of
    # the 230 initialiser calls separately (minutes on 2 CPU cores).
    model = nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(6)
    for key, var in model.named_arrays().items():
        shape = var.get_value().shape
        if key.endswith("/w"):
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif key.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        else:  # conv bias, batch-norm beta and moving mean: non-trivial on purpose
            value = rng.normal(0, 0.1, shape)
        var.set_value(value.astype(np.float32))
    return model

"""Hand-written CPU kernels (``cpu_kernels.cc``), called from JAX through XLA's FFI.

XLA:CPU leaves the tokenizers' convolutions far below the machine's speed: the video
tokenizer's 3D convolutions ran at 16-100 GFLOP/s on two cores (as per-tap 2D convolutions)
and their weight gradients at 10-85, where the same sums as register-blocked multiply-adds
run at 80-210 (BENCHMARKS.md "Hand-written CPU kernels"). Three kernels:

* ``conv``: a channels-last 3D convolution with strides, dilations and zero padding (never
  written out); ``mmgen.nn.conv.conv3d`` / ``conv`` build a convolution with its gradients
  from it and ``conv_weight_grad`` (1D and 2D convolutions as 3D with unit axes);
* ``conv_weight_grad``: that convolution's weight gradient;
* ``group_norm_swish`` / ``group_norm_swish_grad``: ``swish(GroupNorm(x))`` with the affine
  transform, forward and backward (``mmgen.nn.conv.GroupNorm.swish``).

The kernels here are compiled from ``cpu_kernels.cc`` with the host's C++ compiler
(``$CXX``, else ``c++`` / ``g++`` / ``clang++``; ``-O3 -march=native``) the first time a
CPU computation asks for one, against the FFI headers that ship with jaxlib, and cached
under ``$MMGEN_KERNEL_CACHE`` (default ``~/.cache/mmgen/kernels``), keyed by the source,
the jaxlib version, the compiler and the CPU's instruction-set flags (a cache shared by
different CPUs holds one build per kind). The build is written to a temporary name and
renamed, so processes that start together never load half a file.

Without a compiler, or with ``MMGEN_CPU_KERNELS=0``, ``available()`` is False and the
layers keep XLA's forms (one log line says why). GPU and TPU never call these kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
CONV = "mmgen_conv"
CONV_WEIGHT_GRAD = "mmgen_conv_weight_grad"
GROUP_NORM_SWISH = "mmgen_group_norm_swish"
GROUP_NORM_SWISH_GRAD = "mmgen_group_norm_swish_grad"
LANES = 8  # the kernels' narrower vector of output channels: C_out is padded to a multiple of it

_lock = threading.Lock()
_available: bool | None = None


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$MMGEN_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mmgen/kernels``."""
    if os.environ.get("MMGEN_KERNEL_CACHE"):
        return Path(os.environ["MMGEN_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmgen" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (``-march=native`` builds differ by them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build() -> Path:
    """The compiled library for this host, compiling it if the cache has none.

    Raises ``RuntimeError`` (naming the compiler's first error line) when it cannot be built.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (set $CXX, or install g++ or clang++)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, importlib.metadata.version("jaxlib").encode(), compiler.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".partial")
    os.close(fd)
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise RuntimeError(f"{Path(compiler).name} failed: {first[:300]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def available() -> bool:
    """True when the kernels are built and registered with XLA (once per process)."""
    global _available
    if _available is None:
        with _lock:
            if _available is None:
                _available = _register()
    return _available


def _register() -> bool:
    if os.environ.get("MMGEN_CPU_KERNELS", "1") == "0":
        log.info("MMGEN_CPU_KERNELS=0: the layers use XLA's forms on CPU")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, RuntimeError) as error:
        log.warning("mmgen's CPU kernels are unavailable (%s); the layers use XLA's forms, slower on CPU", error)
        return False
    jax.ffi.register_ffi_target(CONV, jax.ffi.pycapsule(library.MmgenConv), platform="cpu")
    jax.ffi.register_ffi_target(CONV_WEIGHT_GRAD, jax.ffi.pycapsule(library.MmgenConvWeightGrad), platform="cpu")
    jax.ffi.register_ffi_target(GROUP_NORM_SWISH, jax.ffi.pycapsule(library.MmgenGroupNormSwish), platform="cpu")
    jax.ffi.register_ffi_target(GROUP_NORM_SWISH_GRAD, jax.ffi.pycapsule(library.MmgenGroupNormSwishGrad),
                                platform="cpu")
    return True


def _check_float32(*arrays) -> None:
    if any(a.dtype != jnp.float32 for a in arrays):
        raise TypeError(f"mmgen's CPU kernels take float32, got {[str(a.dtype) for a in arrays]}")


Pairs = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
NO_PADDING: Pairs = ((0, 0), (0, 0), (0, 0))


def _geometry(strides, dilations, padding) -> dict:
    return dict(strides=np.asarray(strides, np.int64), dilations=np.asarray(dilations, np.int64),
                padding=np.asarray(padding, np.int64).reshape(6))


def output_shape(x_shape, kernel_shape, strides, dilations, padding) -> tuple[int, int, int]:
    """``(T', H', W')`` of the convolution of an input of ``x_shape`` (``[N, T, H, W, C]``)."""
    out = []
    for a in range(3):
        padded = x_shape[1 + a] + padding[a][0] + padding[a][1]
        span = (kernel_shape[a] - 1) * dilations[a] + 1
        out.append((padded - span) // strides[a] + 1 if padded >= span else 0)
    return tuple(out)


def _pad_channels(a: jax.Array) -> jax.Array:
    """``a`` with zero channels appended to its last axis up to a multiple of ``LANES``."""
    extra = -a.shape[-1] % LANES
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)]) if extra else a


def conv(x: jax.Array, w: jax.Array, strides=(1, 1, 1), dilations=(1, 1, 1), padding: Pairs = NO_PADDING) -> jax.Array:
    """``y [N, T', H', W', C_out]``, the channels-last 3D convolution of ``x [N, T, H, W, C_in]``
    zero-padded by ``padding`` (a ``(low, high)`` pair per axis; a negative one crops) with
    ``w [K_t, K_h, K_w, C_in, C_out]``:
    ``y[n, t, y, x] = sum padded[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w] w[a, b, c]``.

    float32 only, on CPU, after ``available()``. The padding is never written out; ``C_out`` is
    padded with zero channels to a multiple of 8 for the kernel and sliced off. No gradient of
    its own.
    """
    _check_float32(x, w)
    out = (x.shape[0],) + output_shape(x.shape, w.shape, strides, dilations, padding) + (w.shape[-1],)
    w = _pad_channels(w)
    call = jax.ffi.ffi_call(CONV, jax.ShapeDtypeStruct(out[:-1] + (w.shape[-1],), jnp.float32))
    return call(x, w, **_geometry(strides, dilations, padding))[..., : out[-1]]


def conv_weight_grad(x: jax.Array, dy: jax.Array, kernel_size: tuple[int, int, int], strides=(1, 1, 1),
                     dilations=(1, 1, 1), padding: Pairs = NO_PADDING) -> jax.Array:
    """``dw [K_t, K_h, K_w, C_in, C_out]``, the weight gradient of ``conv(x, w, strides,
    dilations, padding)`` whose output gradient is ``dy [N, T', H', W', C_out]``:
    ``dw[a, b, c] = sum padded[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w]^T dy[n, t, y, x]``.

    float32 only, on CPU, after ``available()``. ``C_out`` is padded with zero channels to a
    multiple of 8 for the kernel and the padding sliced off.
    """
    _check_float32(x, dy)
    expected = output_shape(x.shape, kernel_size, strides, dilations, padding)
    if dy.shape[1:4] != expected or dy.shape[0] != x.shape[0]:
        raise ValueError(f"conv_weight_grad: dy {dy.shape} does not match the output {expected} of x {x.shape}")
    c_out = dy.shape[-1]
    dy = _pad_channels(dy)
    shape = tuple(int(k) for k in kernel_size) + (x.shape[-1], dy.shape[-1])
    call = jax.ffi.ffi_call(CONV_WEIGHT_GRAD, jax.ShapeDtypeStruct(shape, jnp.float32))
    return call(x, dy, **_geometry(strides, dilations, padding))[..., :c_out]


def group_norm_swish(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, slab_dims: int,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``y = swish(xhat scale + bias)`` with ``xhat`` ``x [..., C]`` normalised per slab (its
    last ``slab_dims`` axes, the channels included: e.g. 3 for a frame ``[H, W, C]``) and group
    of ``C / num_groups`` channels; also the ``mean`` and ``inv_std`` per slab and group
    (``[count, num_groups]``) for ``group_norm_swish_grad``. float32, after ``available()``."""
    _check_float32(x, scale, bias)
    count = int(np.prod(x.shape[: x.ndim - slab_dims]))
    stats = jax.ShapeDtypeStruct((count, num_groups), jnp.float32)
    call = jax.ffi.ffi_call(GROUP_NORM_SWISH, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats))
    return call(x, scale, bias, slab_dims=np.int64(slab_dims), groups=np.int64(num_groups),
                epsilon=np.float32(epsilon))


def group_norm_swish_grad(x, dy, scale, bias, mean, inv_std, num_groups: int, slab_dims: int):
    """``(dx, dscale, dbias)`` of ``group_norm_swish`` for the output gradient ``dy``."""
    _check_float32(x, dy, scale, bias, mean, inv_std)
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
              jax.ShapeDtypeStruct(bias.shape, jnp.float32))
    call = jax.ffi.ffi_call(GROUP_NORM_SWISH_GRAD, shapes)
    return call(x, dy, scale, bias, mean, inv_std, slab_dims=np.int64(slab_dims), groups=np.int64(num_groups))

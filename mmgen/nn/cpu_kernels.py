"""Hand-written CPU kernels (``cpu_kernels.cc``), called from JAX through XLA's FFI.

XLA:CPU leaves the tokenizers' convolutions far below the machine's speed: the video
tokenizer's 3D convolutions ran at 16-100 GFLOP/s on two cores (as per-tap 2D convolutions)
and their weight gradients at 10-45, where the same sums as register-blocked multiply-adds
run at 120-210 (BENCHMARKS.md "Convolution kernels"). ``conv`` and ``conv_weight_grad``
are the two kernels; ``mmgen.nn.conv.conv3d`` builds a convolution with its gradients from
them.
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
LANES = 16  # the kernels' vector of output channels: C_out is padded to a multiple of it

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
    return True


def _check_float32(*arrays) -> None:
    if any(a.dtype != jnp.float32 for a in arrays):
        raise TypeError(f"mmgen's CPU kernels take float32, got {[str(a.dtype) for a in arrays]}")


def _geometry(strides, dilations) -> dict:
    (st, sh, sw), (dt, dh, dw) = strides, dilations
    return dict(stride_t=np.int64(st), stride_h=np.int64(sh), stride_w=np.int64(sw),
                dilation_t=np.int64(dt), dilation_h=np.int64(dh), dilation_w=np.int64(dw))


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int, int] = (1, 1, 1),
         dilations: tuple[int, int, int] = (1, 1, 1)) -> jax.Array:
    """``y [N, T', H', W', C_out]``, the ``VALID`` channels-last 3D convolution of the padded
    ``x [N, T, H, W, C_in]`` with ``w [K_t, K_h, K_w, C_in, C_out]``:
    ``y[n, t, y, x] = sum x[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w] w[a, b, c]``.

    float32 only, on CPU, after ``available()``. ``C_out`` is padded with zero channels to a
    multiple of 16 for the kernel and the padding sliced off. No gradient of its own.
    """
    _check_float32(x, w)
    c_out = w.shape[-1]
    padded = -(-c_out // LANES) * LANES
    if padded != c_out:
        w = jnp.pad(w, [(0, 0)] * 4 + [(0, padded - c_out)])
    out = tuple((x.shape[1 + a] - (w.shape[a] - 1) * dilations[a] - 1) // strides[a] + 1 for a in range(3))
    call = jax.ffi.ffi_call(CONV, jax.ShapeDtypeStruct((x.shape[0],) + out + (padded,), jnp.float32))
    return call(x, w, **_geometry(strides, dilations))[..., :c_out]


def conv_weight_grad(x: jax.Array, dy: jax.Array, kernel_size: tuple[int, int, int],
                     strides: tuple[int, int, int] = (1, 1, 1),
                     dilations: tuple[int, int, int] = (1, 1, 1)) -> jax.Array:
    """``dw [K_t, K_h, K_w, C_in, C_out]`` of a ``VALID`` channels-last 3D convolution of the
    padded ``x [N, T, H, W, C_in]`` whose output gradient is ``dy [N, T', H', W', C_out]``:
    ``dw[a, b, c] = sum x[n, t s_t + a d_t, y s_h + b d_h, x s_w + c d_w]^T dy[n, t, y, x]``.

    float32 only, on CPU, after ``available()``. ``C_out`` is padded with zero channels to a
    multiple of 16 for the kernel and the padding sliced off.
    """
    _check_float32(x, dy)
    c_in, c_out = x.shape[-1], dy.shape[-1]
    padded = -(-c_out // LANES) * LANES
    if padded != c_out:
        dy = jnp.pad(dy, [(0, 0)] * 4 + [(0, padded - c_out)])
    shape = tuple(int(k) for k in kernel_size) + (c_in, padded)
    call = jax.ffi.ffi_call(CONV_WEIGHT_GRAD, jax.ShapeDtypeStruct(shape, jnp.float32))
    return call(x, dy, **_geometry(strides, dilations))[..., :c_out]

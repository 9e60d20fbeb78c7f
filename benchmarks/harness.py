"""Timing that a noisy machine cannot fool: alternate every measurement with its reference.

A shared VM's speed drifts by tens of percent within minutes (other jobs, clocks), so a
throughput divided by a peak read minutes earlier can read 95% "MFU". Here a measured
call never stands alone:

- ``alternate(fns, reps)`` calls several functions in turn, ``a b c a b c ...``, so
  each repetition of each one sees the same machine as its neighbours; ratios between
  them are taken per round and summarised as median with min and max.
- ``bracketed(step, flops, peak_fn, reps)`` alternates a step with the matmul peak
  (``peak, step, peak, step, ..., peak``): every repetition's fraction of peak divides by
  the larger of the two peak readings either side of it (so it never flatters), the
  row keeps the first and last peak reading and their spread, and a row whose peak
  readings spread by more than ``tolerance`` is marked unreliable instead of printed
  as a clean number.

Peak and spread: ``spread = (max(p) - min(p)) / max(p)`` over all of a row's peak
readings ``p``. Fraction of peak per repetition ``i``:
``flops / t_i / max(p_i, p_{i+1})``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np

DEFAULT_TOLERANCE = 0.15  # peak readings of one row may differ by at most this fraction


def _block(tree):
    import jax

    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def summary(values: Sequence[float]) -> dict:
    """Median with min and max (the spread a reader needs to trust a median)."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def alternate(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds of every call of each of ``fns``, called in turn ``reps`` times.

    Returns ``times[k][i]``: the i-th repetition of ``fns[k]``. Each function is warmed
    up first (compilation, caches), then the rounds run ``fns[0], fns[1], ...`` so a
    drift of the machine falls on all of them alike.
    """
    for fn in fns:
        for _ in range(warmup):
            _block(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            t = clock()
            _block(fn())
            times[k].append(clock() - t)
    return times


def ratio_per_round(times_a: Sequence[float], times_b: Sequence[float]) -> dict:
    """``b / a`` per round (how many times faster ``a`` is than ``b``), summarised."""
    return summary([b / a for a, b in zip(times_a, times_b)])


def ratio_text(ratio: dict) -> str:
    """A ``ratio_per_round`` result as the tables print it: ``1.23x (1.10-1.31)``."""
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def bracket_readings(step_s: Sequence[float], peak_flops: Sequence[float], flops: float,
                     tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """A row from step times ``t_0..t_{n-1}`` and peak readings ``p_0..p_n`` taken around them.

    ``p_i`` was read right before step ``i`` and ``p_{i+1}`` right after it.
    """
    if len(peak_flops) != len(step_s) + 1:
        raise ValueError(f"need one more peak reading than steps, got {len(peak_flops)} and {len(step_s)}")
    fractions = [flops / t / max(peak_flops[i], peak_flops[i + 1]) for i, t in enumerate(step_s)]
    spread = (max(peak_flops) - min(peak_flops)) / max(peak_flops)
    return {"step_s": summary(step_s), "fraction_of_peak": summary(fractions),
            "peak_before": float(peak_flops[0]), "peak_after": float(peak_flops[-1]),
            "peak_spread": float(spread), "reliable": bool(spread <= tolerance), "tolerance": tolerance}


def bracketed(step: Callable[[], object], flops: float, peak_call: Callable[[], object], peak_flop_count: float,
              reps: int, warmup: int = 1, tolerance: float = DEFAULT_TOLERANCE, peak_calls: int = 3,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time ``step`` (``flops`` model FLOPs per call) between readings of the matmul peak.

    A peak reading is the best of ``peak_calls`` calls of ``peak_call`` (which does
    ``peak_flop_count`` FLOPs); one is taken before the first repetition and one after
    every repetition.
    """
    for _ in range(warmup):
        _block(step())
        _block(peak_call())

    def read_peak():
        best = float("inf")
        for _ in range(peak_calls):
            t = clock()
            _block(peak_call())
            best = min(best, clock() - t)
        return peak_flop_count / best

    peaks, times = [read_peak()], []
    for _ in range(reps):
        t = clock()
        _block(step())
        times.append(clock() - t)
        peaks.append(read_peak())
    return bracket_readings(times, peaks, flops, tolerance)


def matmul_call(dtype, n: int):
    """``(call, flop_count)``: one jitted ``n x n @ n x n`` matmul, the reference peak."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return (lambda: f(a, b)), 2.0 * n**3


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads() -> dict:
    """Cores this process may run on, the machine's count, and the load when measured."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"usable_cores": usable, "machine_cores": os.cpu_count(), "load_1min": load}

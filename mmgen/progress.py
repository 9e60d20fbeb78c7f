"""Progress of long work: a tqdm bar on a terminal, periodic log lines anywhere else.

Every loop that shows progress (training, evaluation, sampling, token caches, dataset
checks) makes it here, so one place decides. A bar's carriage returns make one line per
refresh in a file (a SLURM log, ``> train.log``), so when the bar's stream (stderr) is not
a terminal, ``progress`` gives a ``LogProgress`` instead: one log line
``<desc>: <n>/<total> (<pct>%), <rate>/s, <postfix>`` every ``MMGEN_PROGRESS_SECONDS``
seconds (default 60) and one at the end. Same calls either way: iterate, ``update``,
``set_postfix``, ``close``, ``with``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("mmgen.progress")


def interval_s() -> float:
    """Seconds between two log lines when the output is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("MMGEN_PROGRESS_SECONDS", "60")))
    except ValueError:
        return 60.0


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class LogProgress:
    """tqdm's interface, reporting as periodic log lines (see the module docstring)."""

    def __init__(self, iterable=None, *, total=None, desc: str = "", initial: int = 0, disable: bool = False,
                 unit: str = "it", every_s: float | None = None, **_):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc or "progress", unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self._start_n = total, int(initial), int(initial)
        self.every_s = interval_s() if every_s is None else every_s
        self._t0 = self._last = time.monotonic()
        self.postfix = ""
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or self.desc

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed
        return f"{self.desc}: {done}{pct}, {rate:.3g} {self.unit}/s" + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if not self.disable and now - self._last >= self.every_s:
            self._last = now
            log.info("%s", self.line())

    def refresh(self):
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n > self._start_n:
            log.info("%s (done in %.1fs)", self.line(), time.monotonic() - self._t0)


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` on a terminal, else ``LogProgress(iterable, **kwargs)``."""
    if is_terminal() or "ipykernel" in sys.modules:  # a terminal, or a notebook's widget
        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, **kwargs)

"""Learning-rate schedules: short runs (smoke tests) and the recipe values."""

from __future__ import annotations

import os

import numpy as np
import optax
import pytest

from mmgen import config as config_lib
from mmgen.families import get_family
from mmgen.train import loop, optim

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py")
LR = 3e-3


def lrs(name, warmup_steps, total_steps, end_lr_factor=0.0):
    schedule = optim.make_schedule(optim.default_optimizer_config(lr=LR),
                                   optim.default_schedule_config(name=name, warmup_steps=warmup_steps,
                                                                 end_lr_factor=end_lr_factor), total_steps)
    return np.array([float(schedule(step)) for step in range(total_steps + 1)])


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear"])
@pytest.mark.parametrize("warmup_steps", [0, 1, 5000])
def test_one_step_run_trains_its_step_at_the_peak_lr(name, warmup_steps):
    # --config.total_steps=1 clamps the warm-up to 0 steps, so the only step is at the peak.
    np.testing.assert_allclose(lrs(name, warmup_steps, total_steps=1), [LR, 0.0], rtol=1e-6)


def test_warmup_cosine_is_optax_recipe_when_the_warmup_fits():
    expected = optax.warmup_cosine_decay_schedule(0.0, LR, 5, 20, 0.1 * LR)
    np.testing.assert_allclose(lrs("warmup_cosine", 5, 20, end_lr_factor=0.1),
                               [float(expected(s)) for s in range(21)], rtol=1e-6)


def test_warmup_steps_zero_starts_at_the_peak_and_decays_over_every_step():
    cosine = lrs("warmup_cosine", 0, 4)
    np.testing.assert_allclose(cosine, LR * 0.5 * (1 + np.cos(np.pi * np.arange(5) / 4)), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lrs("warmup_linear", 0, 4), LR * (1 - np.arange(5) / 4), rtol=1e-6, atol=1e-12)


def test_toy_smoke_run_of_one_step_trains_with_the_default_warmup(tmp_path):
    cfg = config_lib.load_config(TOY + ":tiny", ["async_checkpointing=False", "tensorboard=False", "log_every=1",
                                                 "total_steps=1", "schedule.warmup_steps=5000"])
    out = loop.run(get_family("toy"), cfg, str(tmp_path))
    assert out["step"] == 1
    assert np.isfinite(out["loss"])

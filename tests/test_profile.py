"""``config.profile``: a jax.profiler trace of the configured steps, with step annotations,
lands in ``workdir/profile`` (and ``tools/profile_summary.py`` reads its top ops)."""

import glob
import gzip
import json
import os
import subprocess
import sys

import pytest

from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["progress=False", "tensorboard=False", "async_checkpointing=False", "eval_every=0", "total_steps=5"]


def _trace_events(path):
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def test_a_profile_of_the_configured_steps_appears_in_the_workdir(tmp_path):
    workdir = str(tmp_path / "toy")
    cfg = config_lib.load_config(os.path.join(ROOT, "configs/toy.py:tiny"),
                                 RUN + ["profile.start_step=2", "profile.num_steps=2"])
    loop.run(get_family("toy"), cfg, workdir)
    runs = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*"))
    assert len(runs) == 1  # one trace, for the one window
    xplane = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    assert len(xplane) == 1 and os.path.getsize(xplane[0]) > 0  # TensorBoard's / XProf's input
    perfetto = os.path.join(runs[0], "perfetto_trace.json.gz")
    events = _trace_events(perfetto)
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e)
    assert steps == [2, 3]  # exactly the window's updates, annotated with their step numbers
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "profile_summary.py"), workdir,
                              "--top", "1000"], capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    assert "2 steps" in summary.stdout and "dot" in summary.stdout  # the toy MLP's matmuls are among its ops


def test_no_profile_block_or_zero_steps_writes_nothing(tmp_path):
    workdir = str(tmp_path / "toy")
    cfg = config_lib.load_config(os.path.join(ROOT, "configs/toy.py:tiny"), RUN + ["total_steps=2"])
    assert cfg.profile.num_steps == 0  # off by default
    loop.run(get_family("toy"), cfg, workdir)
    assert not os.path.exists(os.path.join(workdir, "profile"))


@pytest.mark.parametrize("override", ["profile.start_step=0", "profile.num_steps=-1"])
def test_a_bad_profile_window_is_one_line_before_compiling(override):
    cfg = config_lib.load_config(os.path.join(ROOT, "configs/toy.py:tiny"),
                                 RUN + ["profile.num_steps=2", override])
    with pytest.raises(UserError, match="config.profile"):
        loop.validate(get_family("toy"), cfg)

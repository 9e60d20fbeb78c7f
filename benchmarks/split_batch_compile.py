"""Compile time of the tiny video tokenizer's train step on 8 fake CPU devices, with the
3D convs' weight gradient chunked over the batch (as before) or not (as now, for a batch
split over devices).

    python -m benchmarks.split_batch_compile [--rounds 2]

Each round runs both forms, each in its own fresh process (the flags must be set before
JAX starts): 2 steps of ``configs/tokenizer/video.py:tiny,gan=0`` with 8 base channels on
5x16x16 clips, batch 8 over ``data`` x ``fsdp``, at ``--xla_backend_optimization_level=0``
(the test suite's setting). Prints the step's compile seconds (``JAX_LOG_COMPILES``) and
the run's wall seconds per form.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, tempfile, time
from mmgen import config as config_lib
from mmgen.families import get_family
from mmgen.nn import conv
from mmgen.train import loop
if sys.argv[1] == "chunked":
    conv.batch_split = lambda: 1  # chunk whatever the mesh
cfg = config_lib.load_config("configs/tokenizer/video.py:tiny,gan=0", [
    "total_steps=2", "eval_every=0", "checkpoint_every=2", "batch_size=8", "model.base_channels=8",
    "model.channel_multipliers=(1,2)", "model.temporal_downsample=(True,)", "dataset.resolution=16",
    "dataset.frames=5", "async_checkpointing=False", "tensorboard=False", "progress=False",
    f"dataset.data_dir={sys.argv[2]}", "dataset.builder_overrides={'num_train': 8, 'num_test': 4}"])
start = time.perf_counter()
loop.run(get_family("tokenizer"), cfg, tempfile.mkdtemp())
print(f"RUN {time.perf_counter() - start:.1f}")
"""


def run_once(form: str, data_dir: str) -> tuple[float, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    res = subprocess.run([sys.executable, "-c", CHILD, form, data_dir], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    log = res.stdout + res.stderr
    compile_s = float(re.search(r"compilation of jit\(step_fn\) in ([0-9.]+) sec", log).group(1))
    return compile_s, float(re.search(r"RUN ([0-9.]+)", log).group(1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    data_dir = tempfile.mkdtemp()
    for r in range(args.rounds):
        for form in ("chunked", "unchunked"):
            compile_s, run_s = run_once(form, data_dir)
            print(f"round {r}  {form:9s}  step compile {compile_s:6.1f} s  2-step run {run_s:6.1f} s", flush=True)


if __name__ == "__main__":
    main()

"""README.md's "Use from Python" and "Export a model" blocks run as written.

Each block is marked ``<!-- readme-test: python|bash -->`` on the line before its fence. They
run in a scratch directory where ``runs/vtok`` is the tiny video tokenizer, ``runs/gen`` a
1-layer transformer over it and the tiny audio tokenizer (numpy weights, 2 MaskGIT steps)
and ``clip.mp4`` a 9-frame clip with sound, in a fresh interpreter (``python`` is this one's).
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mmgen.data import media
from mmgen.families import get_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"<!-- readme-test: (python|bash) -->\n```(python|bash)\n(.*?)```", re.S)


def readme_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return [(kind, body) for kind, fence, body in BLOCK.findall(f.read()) if kind == fence]


def test_the_readme_marks_the_python_and_the_export_blocks():
    blocks = readme_blocks()
    assert [kind for kind, _ in blocks] == ["python", "bash"]
    assert "mmgen.load_tokenizer(" in blocks[0][1] and "gen.sample(task=" in blocks[0][1]
    assert "mmgen export --workdir" in blocks[1][1]


@pytest.mark.slow
def test_the_readme_blocks_run(tokenizers, data_dir, generative_config, write_numpy_initialised, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(tokenizers["video"], runs / "vtok")
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=["sampling.steps=2"])
    write_numpy_initialised(get_family("generative"), cfg, str(runs / "gen"), seed=2)
    rng = np.random.default_rng(0)
    media.write_video(str(tmp_path / "clip.mp4"), rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), fps=8.0,
                      audio=rng.uniform(-0.3, 0.3, 18000).astype(np.float32), sample_rate=16000)
    env = dict(os.environ)  # one CPU device, as a user has; the suite's compile flags (conftest.py)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    bin_dir = os.path.dirname(sys.executable)  # `python` is this interpreter (its virtual environment's)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    for kind, body in readme_blocks():
        cmd = [sys.executable, "-c", body] if kind == "python" else ["bash", "-e", "-c", body]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{kind} block failed:\n{res.stderr[-3000:]}"
        if kind == "python":
            assert "(2, 9, 32, 32, 3) (2, 3, 8, 8)" in res.stdout
            assert sorted(os.listdir(tmp_path / "samples"))[:2] == ["frame_prediction.png", "frame_prediction_000.mp4"]
        else:
            assert "(1, 3, 8, 8)" in res.stdout  # the generative export sampled with its own tokenizers
    for path in ("exports/vtok/model.safetensors", "exports/gen/model.safetensors",
                 "exports/gen/tokenizers/video/model.safetensors", "exports/gen/tokenizers/audio/config.json",
                 "recon.mp4"):
        assert os.path.isfile(tmp_path / path), path

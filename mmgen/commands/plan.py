"""Ahead-of-time plan of a training run: memory per device and FLOPs, nothing allocated.

    mmgen plan --config configs/toy.py:small --devices 64 [--accelerator h100] [--config.k=v]

Compiles the family's real train step (``loop.make_train_step``: same shardings,
same donation) for ``N`` devices with ``jax.jit(...).lower(...).compile()`` on
``jax.ShapeDtypeStruct``s: the state's shapes come from ``loop.abstract_state``
(``nnx.eval_shape``), its shardings from ``sharding.state_shardings`` and the
config's logical-axis rules, the batch's shapes from the family (MaxText's AOT check,
on the Family interface). No parameter is ever materialised, so a 1B-parameter plan
for 64 devices runs on a laptop.

Devices. With at least ``N`` local devices the plan compiles for them (a GPU host
gives the GPU compiler's numbers). With fewer it re-runs itself in a subprocess on
``N`` fake CPU devices (``--xla_force_host_platform_device_count=N``): the XLA flag
must be set before JAX initialises its backend, which the parent has already done.
CPU numbers are the CPU compiler's: the sharded bytes of parameters and optimizer
state are exact on any backend; temporaries depend on the backend's fusion and
scheduling and are an estimate of what a GPU/TPU compile reports. The step is traced
with the accelerator's kernel forms (``mmgen.nn.backend.target_platform``: XLA's 3D
convolution and ``jax.nn.dot_product_attention``, not the CPU forms that training on a
CPU takes).

Reported per device: parameters, optimizer state, other state and the frozen
parameters of a family that has them (a base model under adapters: an input of the
step, never trained) from the shardings, exact; batch, temporaries (activations, gradients, workspace:
``compiled.memory_analysis().temp_size_in_bytes``), outputs not donated, a peak
estimate (arguments + temporaries + undonated outputs + code) and the step's FLOPs
(``compiled.cost_analysis()``, per device). The peak is checked against the
accelerator's HBM times ``USABLE_FRACTION``; a plan that does not fit is flagged and
the command exits with status 1. The compiler's log is read too: each "Involuntary
full rematerialization" (the SPMD partitioner meeting two layouts it can only
reconcile by replicating a tensor, a sign of an unconstrained activation) is counted
and reported, unless ``TF_CPP_MIN_LOG_LEVEL`` (2 or more) keeps XLA from logging it.

Batch shapes come from the family: ``family.example_batch(cfg)`` (the proposed
``Family`` field: a dict of global-batch ``ShapeDtypeStruct``s or arrays) when it
has one, else one batch pulled from ``family.make_data`` as process 0 of 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import tempfile

from mmgen.errors import UserError

# HBM per chip in GiB (vendor figures) and dense bf16 peak FLOP/s (the same figures
# as ``mmgen.train.loop.PEAK_FLOPS``).
ACCELERATORS: dict[str, tuple[float, float]] = {
    "h100": (80.0, 989e12),
    "h200": (141.0, 989e12),
    "a100": (80.0, 312e12),
    "v4": (32.0, 275e12),
    "v5e": (16.0, 197e12),
    "v5p": (95.0, 459e12),
}
GPUS = ("h100", "h200", "a100")  # the others are TPUs


def accelerator_platform(key: str) -> str:
    """The JAX platform of an ``ACCELERATORS`` key: whose kernel forms the plan traces."""
    return "gpu" if key in GPUS else "tpu"


# Share of HBM a plan may use: what the launch scripts give XLA
# (XLA_PYTHON_CLIENT_MEM_FRACTION=0.90), leaving room for the runtime, collective
# buffers and fragmentation.
USABLE_FRACTION = 0.90
GIB = 1024**3
# XLA:CPU expands remat's optimization barriers early, before its later CSE passes,
# which then merge the recomputed forward back into the saved one: remat (``jax.checkpoint``,
# ``nnx.remat``) outside a loop saves nothing on CPU. GPU and TPU compilers expand them
# only after scheduling. Plans on CPU stand-ins keep the barriers, as those do.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
_CHILD_ENV = "MMGEN_PLAN_CHILD"
# What XLA's SPMD partitioner logs when it must replicate a tensor to change its layout.
INVOLUNTARY_REMAT = "Involuntary full rematerialization"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def accelerator_spec(name: str) -> tuple[str, float, float]:
    """``"H100"``, ``"tpu-v5e"``, ``"TPU v4"`` -> (key, HBM bytes, peak FLOP/s)."""
    key = name.lower().replace("nvidia", "").replace("tpu", "")
    key = "".join(c for c in key if c.isalnum())
    if key == "v5litepod" or key == "v5lite":
        key = "v5e"
    if key not in ACCELERATORS:
        raise UserError(f"--accelerator {name!r} is unknown; choose one of {', '.join(ACCELERATORS)}")
    hbm_gib, peak = ACCELERATORS[key]
    return key, hbm_gib * GIB, peak


def num_slices(mesh_cfg) -> int:
    """Slices/hosts a plan stands for: the product of the explicit ``dcn_*`` sizes."""
    sizes = [int(mesh_cfg.get(f"dcn_{a}", 1)) for a in ("data", "fsdp", "tensor")]
    return 1 if -1 in sizes else math.prod(sizes)


@dataclasses.dataclass
class Plan:
    """Everything ``plan`` measured; byte counts are per device."""

    config: str
    family: str
    devices: int
    platform: str
    mesh: dict[str, int]
    num_params: int
    param_bytes: int
    opt_bytes: int
    other_state_bytes: int
    batch_bytes: int
    argument_bytes: int | None
    temp_bytes: int | None
    undonated_output_bytes: int | None
    code_bytes: int | None
    flops_per_device: float | None
    model_flops_per_step: float | None
    accelerator: str
    hbm_bytes: float
    peak_flops: float
    # The family's frozen part (a base model under adapters): an input of every step,
    # never trained, so neither gradients nor optimizer state; its parameters are
    # counted in ``num_params``, not in ``param_bytes``.
    frozen_bytes: int = 0
    num_frozen_params: int = 0
    batch_size: int = 0  # global
    grad_accum_steps: int = 1
    # "Involuntary full rematerialization" warnings in the compiler's log (None: not read).
    involuntary_remats: int | None = None

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes + self.other_state_bytes + self.frozen_bytes

    @property
    def peak_bytes(self) -> int:
        args = self.argument_bytes if self.argument_bytes is not None else self.state_bytes + self.batch_bytes
        return args + (self.temp_bytes or 0) + (self.undonated_output_bytes or 0) + (self.code_bytes or 0)

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes * USABLE_FRACTION

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes


# ---------------------------------------------------------------- sizes
def _itemsize(dtype) -> int:
    import jax
    import numpy as np

    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key is two uint32 words
    return np.dtype(dtype).itemsize


def _shard_bytes(shape, dtype, sharding) -> int:
    shard = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
    return math.prod(shard) * _itemsize(dtype)


def state_bytes_by_kind(abstract, shardings) -> tuple[dict[str, int], int]:
    """Per-device bytes of ``parameters`` / ``optimizer`` / ``other`` state, and the parameter count.

    ``nnx.Param`` leaves (EMA copies included) are parameters, ``nnx.optimizer.OptState``
    leaves (moments, counters) optimizer state, the rest (RNG counters, statistics) other.
    """
    import jax
    from flax import nnx

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    out = {"parameters": 0, "optimizer": 0, "other": 0}
    count = 0
    for var, sh in zip(jax.tree.leaves(abstract, is_leaf=is_var), jax.tree.leaves(shardings, is_leaf=is_var)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        sharding = sh.get_value() if hasattr(sh, "get_value") else sh.value
        nbytes = _shard_bytes(value.shape, value.dtype, sharding)
        if isinstance(var, nnx.Param):
            out["parameters"] += nbytes
            count += math.prod(value.shape)
        elif isinstance(var, nnx.optimizer.OptState):
            out["optimizer"] += nbytes
        else:
            out["other"] += nbytes
    return out, count


# ---------------------------------------------------------------- the plan
def example_batch(family, cfg) -> dict:
    """Global-batch shapes: ``family.example_batch(cfg)`` or one batch from ``make_data``."""
    hook = getattr(family, "example_batch", None)
    if hook is not None:
        return dict(hook(cfg))
    try:
        it = family.make_data(cfg, split="train", train=True, seed=cfg.seed, batch_size=cfg.batch_size,
                              process_index=0, process_count=1)
        return next(iter(it))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any data failure means the same thing here
        raise UserError(
            f"family {family.name!r} has no example_batch(cfg) and one batch could not be read from its "
            f"data ({type(e).__name__}: {e}); prepare config.dataset or give the family an example_batch") from None


@contextlib.contextmanager
def compiler_log():
    """Collect what the process writes to file descriptor 2 (XLA's C++ log) inside the block.

    Yields a list that holds the text once the block ends; the text is written on to
    the real stderr as well, so nothing the compiler says is hidden.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            out.append(text)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


def compiler_warnings_logged() -> bool:
    """Whether XLA logs warnings in this process (``TF_CPP_MIN_LOG_LEVEL`` below 2)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() or "0"
    return not level.isdigit() or int(level) < 2


def plan_mesh(mesh_cfg, devices):
    """The training mesh's shape over ``devices``; multi-slice shapes are laid out in one process."""
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from mmgen.parallel import mesh as mesh_lib

    slices = num_slices(mesh_cfg)
    if slices == 1:
        return mesh_lib.make_mesh(mesh_cfg, devices)
    ici, dcn = mesh_lib.mesh_shapes(mesh_cfg, len(devices), slices)
    shape = [i * d for i, d in zip(ici, dcn)]
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, mesh_lib.AXES, axis_types=(AxisType.Auto,) * len(mesh_lib.AXES))


def make_plan(cfg, num_devices: int, accelerator: str = "h100", *, config_name: str = "", devices=None,
              family=None) -> Plan:
    """Compile ``cfg``'s train step for ``num_devices`` devices and measure it (in-process).

    ``family`` defaults to ``cfg.family``'s; pass one to plan a family object directly.
    """
    import jax

    from mmgen.families import get_family
    from mmgen.nn import backend
    from mmgen.parallel import runtime
    from mmgen.parallel import sharding as sharding_lib
    from mmgen.train import loop, optim

    runtime.set_flags()
    acc, hbm, peak = accelerator_spec(accelerator)
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < num_devices:
        raise UserError(f"{num_devices} devices asked for but only {len(devices)} exist in this process")
    devices = devices[:num_devices]
    if family is None:
        family = get_family(cfg.get("family", ""))
    loop.validate(family, cfg)
    mesh = plan_mesh(cfg.mesh, devices)
    loop.check_batch_divides(cfg, mesh)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)

    graphdef, abstract = loop.abstract_state(family, cfg)
    abstract, abstract_frozen = loop.split_frozen(family, abstract)
    shardings = sharding_lib.state_shardings(abstract, mesh, rules)
    frozen_shardings = sharding_lib.state_shardings(abstract_frozen, mesh, rules)
    state_sds = loop.with_shardings(abstract, shardings)
    frozen_args = () if getattr(family, "frozen", None) is None else (
        loop.with_shardings(abstract_frozen, frozen_shardings),)
    batch = example_batch(family, cfg)
    batch_sh = {k: sharding_lib.batch_sharding(mesh, len(v.shape), rules) for k, v in batch.items()}
    # Host numpy batches may hold float64; on devices they are canonical (float32 without x64).
    batch_sds = {k: jax.ShapeDtypeStruct(tuple(v.shape), jax.dtypes.canonicalize_dtype(v.dtype), sharding=batch_sh[k])
                 for k, v in batch.items()}
    rng_sds = jax.eval_shape(lambda: jax.random.key(0))

    step = loop.make_train_step(family, cfg, graphdef, shardings, batch_sh, mesh, frozen_shardings)
    options = CPU_COMPILER_OPTIONS if devices[0].platform == "cpu" else None
    with compiler_log() as log:
        with backend.target_platform(accelerator_platform(acc)):  # the accelerator's conv/attention forms
            lowered = step.lower(state_sds, batch_sds, rng_sds, *frozen_args)
        compiled = lowered.compile(compiler_options=options)

    by_kind, num_params = state_bytes_by_kind(abstract, shardings)
    frozen_by_kind, num_frozen = state_bytes_by_kind(abstract_frozen, frozen_shardings)
    batch_bytes = sum(_shard_bytes(s.shape, s.dtype, s.sharding) for s in batch_sds.values())
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    model_flops = None
    if getattr(family, "flops_per_example", None) is not None:
        model_flops = float(family.flops_per_example(cfg)) * cfg.batch_size

    def stat(name):
        return int(getattr(mem, name)) if mem is not None else None

    undonated = None
    if mem is not None:
        undonated = max(stat("output_size_in_bytes") - stat("alias_size_in_bytes"), 0)
    return Plan(
        config=config_name, family=family.name, devices=num_devices, platform=devices[0].platform,
        mesh=dict(mesh.shape), num_params=num_params + num_frozen, param_bytes=by_kind["parameters"],
        opt_bytes=by_kind["optimizer"], other_state_bytes=by_kind["other"], batch_bytes=batch_bytes,
        argument_bytes=stat("argument_size_in_bytes"), temp_bytes=stat("temp_size_in_bytes"),
        undonated_output_bytes=undonated, code_bytes=stat("generated_code_size_in_bytes"),
        flops_per_device=flops, model_flops_per_step=model_flops, accelerator=acc, hbm_bytes=hbm,
        peak_flops=peak, frozen_bytes=sum(frozen_by_kind.values()), num_frozen_params=num_frozen,
        batch_size=int(cfg.batch_size), grad_accum_steps=optim.grad_accum_steps(cfg),
        involuntary_remats=log[0].count(INVOLUNTARY_REMAT) if compiler_warnings_logged() else None)


# ---------------------------------------------------------------- report
def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_flops(f: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= size:
            return f"{f / size:.3g} {unit}"
    return f"{f:.0f} FLOP"


def format_plan(p: Plan) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    where = p.platform if p.platform != "cpu" else f"cpu stand-ins for {p.accelerator}"
    per_device = p.batch_size // max(p.mesh.get("data", 1) * p.mesh.get("fsdp", 1), 1)
    batch = f"global batch {p.batch_size} ({per_device} per data shard"
    if p.grad_accum_steps > 1:
        batch += f", in {p.grad_accum_steps} micro-batches of {per_device // p.grad_accum_steps}"
    lines = [
        f"plan {p.config} (family {p.family}): {p.devices} devices ({where}), mesh {mesh}, {batch})",
        f"parameters: {p.num_params:,}" + (f" ({p.num_frozen_params:,} frozen)" if p.num_frozen_params else ""),
        "per device:",
    ]

    def row(label, value):
        if value is None:
            lines.append(f"  {label:<34} unavailable")
        else:
            lines.append(f"  {label:<34} {int(value):>16,} B  {human_bytes(value):>11}")

    row("parameters", p.param_bytes)
    row("optimizer state", p.opt_bytes)
    row("other state", p.other_state_bytes)
    if p.frozen_bytes:
        row("frozen parameters (not trained)", p.frozen_bytes)
    row("batch", p.batch_bytes)
    row("arguments (compiler)", p.argument_bytes)
    row("temporaries (activations, grads)", p.temp_bytes)
    row("outputs not donated", p.undonated_output_bytes)
    row("generated code", p.code_bytes)
    row("peak estimate", p.peak_bytes)
    if p.flops_per_device is not None:
        t = p.flops_per_device / p.peak_flops
        lines.append(f"compute: {human_flops(p.flops_per_device)} per device per step, "
                     f"{human_flops(p.flops_per_device * p.devices)} in all; "
                     f"{t * 1e3:.3g} ms per step at the {p.accelerator}'s bf16 peak")
        if p.grad_accum_steps > 1:
            lines.append(f"  (XLA counts a loop body once: this is one of the {p.grad_accum_steps} micro-batches)")
    if p.model_flops_per_step is not None:
        lines.append(f"model FLOPs per step (family's count): {human_flops(p.model_flops_per_step)}")
    if p.involuntary_remats:
        lines.append(f"layouts: XLA replicated a tensor to change its sharding {p.involuntary_remats} time(s) "
                     f"(\"{INVOLUNTARY_REMAT}\" above): an activation its rules leave unconstrained")
    elif p.involuntary_remats == 0:
        lines.append("layouts: no involuntary full rematerialization")
    else:
        lines.append("layouts: not checked (TF_CPP_MIN_LOG_LEVEL keeps XLA's warnings out of the log)")
    usable = human_bytes(p.usable_bytes)
    share = p.peak_bytes / p.usable_bytes
    if p.fits:
        lines.append(f"fits {p.accelerator}: peak {human_bytes(p.peak_bytes)} is {share:.1%} of "
                     f"{usable} usable ({USABLE_FRACTION:.0%} of {human_bytes(p.hbm_bytes)})")
    else:
        lines.append(f"DOES NOT FIT {p.accelerator}: peak {human_bytes(p.peak_bytes)} > {usable} usable "
                     f"({USABLE_FRACTION:.0%} of {human_bytes(p.hbm_bytes)}); raise mesh.fsdp or "
                     f"grad_accum_steps, turn on remat, or lower batch_size")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line
def _check_before_compiling(cfg, num_devices: int) -> None:
    """Mesh and batch mistakes, found without touching JAX devices."""
    from mmgen.parallel import mesh as mesh_lib
    from mmgen.train import loop

    ici, dcn = mesh_lib.mesh_shapes(cfg.mesh, num_devices, num_slices(cfg.mesh))
    sizes = dict(zip(mesh_lib.AXES, (i * d for i, d in zip(ici, dcn))))
    axes = loop.batch_mesh_axes(cfg, sizes)
    loop.batch_divides(cfg, math.prod(sizes[a] for a in axes), f"{num_devices} devices", axes)


def _rerun_with_fake_devices(args, overrides, num_devices: int) -> int:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    cmd = [sys.executable, "-m", "mmgen", "plan", "--config", args.config, "--devices", str(num_devices),
           "--accelerator", args.accelerator, *(f"--config.{o}" for o in overrides)]
    return subprocess.run(cmd, env=env).returncode


def main(args, overrides) -> int:
    from mmgen import config as config_lib

    if args.devices < 1:
        raise UserError(f"--devices {args.devices} must be at least 1")
    accelerator_spec(args.accelerator)
    cfg = config_lib.load_config(args.config, overrides)
    _check_before_compiling(cfg, args.devices)

    import jax

    if jax.device_count() < args.devices:
        if os.environ.get(_CHILD_ENV):
            raise UserError(f"could not create {args.devices} fake CPU devices (got {jax.device_count()})")
        return _rerun_with_fake_devices(args, overrides, args.devices)
    plan = make_plan(cfg, args.devices, args.accelerator, config_name=args.config)
    print(format_plan(plan), flush=True)
    return 0 if plan.fits else 1

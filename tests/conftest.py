"""Test-wide settings, and the fixtures more than one test file uses.

8 fake CPU devices so sharding is exercised without hardware, and XLA's LLVM backend at
optimisation level 0 (``TEST_XLA_FLAGS``): the suite compiles far more than it runs, and
LLVM's optimisation was ~40% of its time (four of the heaviest tests: 260 -> 148 s). Only
the machine code is less optimised: XLA's HLO passes (fusion, layouts, the SPMD
partitioner) run as always, so the tests check the program users run. Test files never import
each other (tests/test_layers.py holds that): a helper two files need lives here as a
fixture, or, where tests call it with arguments, as a fixture that returns the function.
The expensive ones are session-scoped, so every file that needs them shares one build:
``data_dir`` (moving_shapes_av is built there once per builder config, on first use) and
``tokenizers`` (the tiny video and audio tokenizer workdirs, numpy-initialised).
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"  # also given to the processes tests launch
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402  (after the environment above: it must be set before jax loads)

from mmgen.parallel import runtime  # noqa: E402

runtime.set_flags()  # what every run sets where it starts (the CLI, the loop, the API loaders)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATIVE = os.path.join(ROOT, "configs", "generative", "multitask.py")
ADAPTERS = os.path.join(ROOT, "configs", "adapters")
SMALL_DATA = "{'num_train': 16, 'num_test': 8}"


# ------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir for the session: each moving_shapes_av config is built in it once."""
    return str(tmp_path_factory.mktemp("tfds"))


# ------------------------------------------------------------------ generative (test_generative_*.py, test_sample_cli.py, ...)
def _small_model_overrides():
    return ["model.depth=1", "model.width=32", "model.mlp_dim=64", "model.num_heads=2", "model.remat_policy='none'"]


def _generative_config(variant="tiny", extra=(), data_dir=None, tokenizers=None):
    from mmgen import config as config_lib

    overrides = _small_model_overrides() + ["batch_size=8", "log_every=1", "eval_every=0", "progress=False",
                                            "tensorboard=False", "async_checkpointing=False"]
    if data_dir:
        overrides += [f"dataset.data_dir={data_dir}", f"dataset.builder_overrides={SMALL_DATA}"]
    if tokenizers:
        overrides += [f"tokenizers.video_workdir={tokenizers['video']}", f"tokenizers.audio_workdir={tokenizers['audio']}"]
    return config_lib.load_config(f"{GENERATIVE}:{variant}", overrides + list(extra))


def _write_numpy_initialised(family, cfg, workdir, seed=0, std=0.05, step=1):
    """A workdir (config.json + one checkpoint) whose weights come from a seeded numpy generator."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmgen.train import loop
    from mmgen.train import workdir as workdir_lib
    from mmgen.train.checkpoint import Checkpointer

    workdir_lib.write_config(cfg, workdir)
    _, abstract = loop.abstract_state(family, cfg)
    rng = np.random.default_rng(seed)

    def init(path, x):
        name = jax.tree_util.keystr(path)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), x.shape) if x.shape else jax.random.key(seed)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.zeros(x.shape, x.dtype)
        if "scale" in name:
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    state = jax.tree_util.tree_map_with_path(init, abstract)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, state, force=True)
    ckpt.close()
    return workdir


@pytest.fixture(scope="session")
def generative_config():
    """``generative_config(variant="tiny", extra=(), data_dir=None, tokenizers=None)``: the
    multitask config with a 1-layer, width-32 model (and the small dataset, the tokenizers)."""
    return _generative_config


@pytest.fixture(scope="session")
def write_numpy_initialised():
    """``write_numpy_initialised(family, cfg, workdir, seed=0, std=0.05, step=1)`` -> workdir."""
    return _write_numpy_initialised


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory, data_dir):
    """Video + audio tokenizer workdirs (numpy weights; the tiny layout: video 3x8x8 of 1024
    ids, audio 57 frames x 4 RVQ levels of 256) on ``data_dir``'s small dataset."""
    from mmgen import config as config_lib
    from mmgen.families import get_family

    root = str(tmp_path_factory.mktemp("tokenizers"))
    base = [f"dataset.data_dir={data_dir}", f"dataset.builder_overrides={SMALL_DATA}", "async_checkpointing=False"]
    vcfg = config_lib.load_config(os.path.join(ROOT, "configs/tokenizer/video.py:tiny,gan=0"),
                                  base + ["model.base_channels=8"])
    acfg = config_lib.load_config(os.path.join(ROOT, "configs/tokenizer/audio.py:tiny,gan=0"), base)
    family = get_family("tokenizer")
    return {"video": _write_numpy_initialised(family, vcfg, os.path.join(root, "video_tokenizer")),
            "audio": _write_numpy_initialised(family, acfg, os.path.join(root, "audio_tokenizer"), seed=1)}


# ------------------------------------------------------------------ adapters (test_adapter_runs.py, test_plan.py)
ADAPTER_RUN = ["batch_size=8", "log_every=1", "eval_every=0", "progress=False", "tensorboard=False",
               "async_checkpointing=False", "total_steps=2"]
ADAPTER_BASE_MODEL = ["model.depth=1", "model.width=32", "model.mlp_dim=64", "model.num_heads=2",
                      "model.remat_policy='none'", "model.video_grid=(2,4,4)", "model.video_vocab=64",
                      "model.audio_len=8", "model.audio_levels=2", "model.audio_vocab=16"]


def _adapter_config(kind, base, variant="tiny,tasks=frame_prediction,data_source=random_tokens", extra=()):
    from mmgen import config as config_lib

    return config_lib.load_config(os.path.join(ADAPTERS, f"{kind}.py:{variant}"),
                                  ADAPTER_RUN + [f"base_workdir={base}"] + list(extra))


def _write_numpy_base(workdir, step=2, seed=0, std=0.05):
    """A generative workdir (config.json + a checkpoint at ``step``) with numpy-drawn weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmgen import config as config_lib
    from mmgen.families import get_family
    from mmgen.train import loop
    from mmgen.train import workdir as workdir_lib
    from mmgen.train.checkpoint import Checkpointer

    cfg = config_lib.load_config(f"{GENERATIVE}:tiny,data_source=random_tokens", ADAPTER_BASE_MODEL + ADAPTER_RUN)
    workdir_lib.write_config(cfg, workdir)
    _, abstract = loop.abstract_state(get_family("generative"), cfg)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "optimizer" in name or jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray((1.0 if "scale" in name else 0.0) + rng.normal(0.0, std, x.shape), x.dtype)

    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, jax.tree_util.tree_map_with_path(draw, abstract), force=True)
    ckpt.close()


@pytest.fixture(scope="session")
def adapter_config():
    """``adapter_config(kind, base, variant=..., extra=())``: the shipped LoRA / FlyLoRA config
    (``kind``) for a 2-step run on the base workdir ``base``."""
    return _adapter_config


@pytest.fixture(scope="session")
def adapter_base(tmp_path_factory):
    """The base adapters fine-tune: a 1-layer, width-32 generative workdir (checkpoint at step 2,
    numpy-drawn weights). Read only: a test that changes a base changes a copy."""
    workdir = str(tmp_path_factory.mktemp("adapter_base") / "base")
    _write_numpy_base(workdir)
    return workdir


# ------------------------------------------------------------------ transformer (test_transformer.py, test_sampling.py)
def _small_transformer_config(**overrides):
    from mmgen.generative import transformer as tr

    cfg = tr.model_config("tiny")
    cfg.update(
        dict(width=32, mlp_dim=64, num_heads=2, video_grid=(3, 4, 4), video_vocab=2**6, video_vocab_groups=2,
             audio_len=8, audio_levels=2, audio_vocab=16, num_classes=5)
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def small_transformer_config():
    """``small_config(**overrides)``: one tiny transformer layout for the transformer and
    sampling specs (width 32, 2 layers; video 3 x 4 x 4 of 2^6 ids in 2 groups, audio 8
    frames x 2 RVQ levels of 16 codes)."""
    return _small_transformer_config


# ------------------------------------------------------------------ FVD
@pytest.fixture(scope="session")
def random_i3d():
    """An I3D with seeded random weights (every array non-trivial), for FVD plumbing tests."""
    from flax import nnx

    from mmgen.eval import i3d

    # Random weights filled in from numpy: an eager nnx init would compile each of
    # the 230 initialiser calls separately (minutes on 2 CPU cores).
    model = nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(6)
    for key, var in model.named_arrays().items():
        shape = var.get_value().shape
        if key.endswith("/w"):
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif key.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        else:  # conv bias, batch-norm beta and moving mean: non-trivial on purpose
            value = rng.normal(0, 0.1, shape)
        var.set_value(value.astype(np.float32))
    return model


# ------------------------------------------------------------------ runs (test_spine, test_reliability, test_multi*)
TOY = os.path.join(ROOT, "configs", "toy.py")


def _toy_config(*overrides):
    from mmgen import config as config_lib

    base = ["async_checkpointing=False", "tensorboard=False", "log_every=1"]
    return config_lib.load_config(TOY + ":tiny", base + list(overrides))


def _losses(workdir):
    from mmgen.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def _launch(num_processes, devices_each, *args, timeout=900):
    import subprocess
    import sys

    env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS=str(devices_each), XLA_FLAGS_EXTRA=TEST_XLA_FLAGS)
    env.pop("XLA_FLAGS", None)  # each process is given its own fake devices
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "cpu_multiprocess.sh"), str(num_processes), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="session")
def toy_config():
    """``toy_config(*overrides)``: configs/toy.py:tiny, synchronous checkpoints, no TensorBoard, a log line a step."""
    return _toy_config


@pytest.fixture(scope="session")
def losses():
    """``losses(workdir)``: the run's training loss per step, from its metrics.jsonl."""
    return _losses


@pytest.fixture(scope="session")
def launch():
    """``launch(num_processes, devices_each, *mmgen_args, timeout=900)``: one mmgen command as that many
    local processes with that many fake CPU devices each (launch/cpu_multiprocess.sh); asserts it succeeded."""
    return _launch


# ------------------------------------------------------------------ sharding (test_*_tokenizer.py)
def _constrained_matches_one_device(loss, params, x):
    """Gradients of ``loss(params, x)`` (``x``: batch first) on a data=2 x fsdp=2 x tensor=2 mesh,
    activations constrained by logical name (the train step's context), must equal one unconstrained
    device's (loss to 1e-5, each gradient leaf to 1e-3 of its largest entry: the sums run in
    another order). Returns the compiled step's sharding constraints as (spec, tensor type) pairs,
    e.g. ``('[{"data", "fsdp"}, {}, {}]', "4x1280x1xf32")``."""
    import re

    import jax

    from mmgen.parallel.sharding import DEFAULT_RULES, axis_rules, batch_sharding, replicated, state_shardings

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def constrained(params, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axis_rules(DEFAULT_RULES):
            return jax.value_and_grad(loss)(params, x)

    loss_1, grads_1 = jax.jit(jax.value_and_grad(loss))(params, x)
    shardings = state_shardings(params, mesh, DEFAULT_RULES)
    args = (jax.device_put(params, shardings), jax.device_put(x, batch_sharding(mesh, x.ndim)))
    lowered = jax.jit(constrained, out_shardings=(replicated(mesh), shardings)).lower(*args)
    loss_8, grads_8 = lowered.compile()(*args)
    assert float(loss_8) == pytest.approx(float(loss_1), rel=1e-5)
    for g1, g8 in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8), strict=True):
        g1, g8 = np.asarray(g1), np.asarray(g8)
        np.testing.assert_allclose(g8, g1, rtol=1e-3, atol=1e-3 * float(np.abs(g1).max()))
    return set(re.findall(r"sdy\.sharding_constraint %[\w#.]+ <@\w+, (\[.*?\])> : tensor<([^>]*)>", lowered.as_text()))


@pytest.fixture(scope="session")
def constrained_matches_one_device():
    """``constrained_matches_one_device(loss, params, x) -> constraints``: see ``_constrained_matches_one_device``."""
    return _constrained_matches_one_device
# ------------------------------------------------------------------ TensorBoard and the gallery (test_gallery.py, test_sample_cli.py, ...)
def _event_summaries(logdir):
    """Every summary value in the event files under ``logdir``: ``{tag: [(step, kind, value proto)]}``.

    Reads the TFRecord framing itself (u64 length, u32 crc, data, u32 crc) and parses each
    record with tensorboardX's ``Event`` proto; ``kind`` is the value's oneof field
    (``simple_value``, ``image``, ``audio``, ...).
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for root, _, names in os.walk(logdir):
        for name in sorted(n for n in names if "tfevents" in n):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            pos = 0
            while pos + 12 <= len(data):
                (length,) = struct.unpack("<Q", data[pos:pos + 8])
                event = Event.FromString(data[pos + 12:pos + 12 + length])
                pos += 12 + length + 4
                for value in event.summary.value:
                    kind = value.WhichOneof("value")
                    out.setdefault(value.tag, []).append((event.step, kind, getattr(value, kind)))
    return out


@pytest.fixture(scope="session")
def event_summaries():
    """``event_summaries(logdir)`` -> ``{tag: [(step, kind, value)]}`` of every TensorBoard
    event file under ``logdir`` (kind: ``simple_value``, ``image``, ``audio``)."""
    return _event_summaries


def _check_gallery(out_dir):
    """Parse ``out_dir/index.html``: every media/token file of the folder is named there and every
    file it names exists. Returns ``{"videos": [...], "audios": [...], "images": [...], "links": [...]}``."""
    from html.parser import HTMLParser
    from urllib.parse import unquote

    found = {"videos": [], "audios": [], "images": [], "links": []}

    class Page(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            kind = {"video": "videos", "audio": "audios", "img": "images"}.get(tag)
            if kind and attrs.get("src"):
                found[kind].append(unquote(attrs["src"]))
            elif tag == "a" and attrs.get("href"):
                found["links"].append(unquote(attrs["href"]))

    with open(os.path.join(out_dir, "index.html")) as f:
        Page().feed(f.read())
    named = {n for names in found.values() for n in names}
    for name in named:
        assert "/" not in name and os.path.isfile(os.path.join(out_dir, name)), name  # relative, beside the page
    files = {n for n in os.listdir(out_dir) if n.endswith((".mp4", ".wav", ".png", ".npz"))}
    assert files and files <= named, sorted(files - named)
    return found


@pytest.fixture(scope="session")
def check_gallery():
    """``check_gallery(out_dir)``: asserts ``index.html`` names every sample file there and only
    files that exist; returns the page's ``{"videos", "audios", "images", "links"}`` sources."""
    return _check_gallery


# ------------------------------------------------------------------ kernel forms (test_conv.py, test_cpu_kernels.py)
def _same_values_and_gradients(fn, x, k, impl):
    """``fn(x, k, impl)`` equals ``fn(x, k, "xla")``, and so do its gradients in ``x`` and ``k``."""
    import jax
    import jax.numpy as jnp

    weights = jnp.asarray(np.random.default_rng(9).normal(size=fn(x, k, "xla").shape), jnp.float32)

    def loss(impl, x, k):
        y = fn(x, k, impl)
        return jnp.sum(jnp.sin(y) * weights), y

    (_, y_form), g_form = jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1), has_aux=True)(x, k)
    (_, y_xla), g_xla = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1), has_aux=True)(x, k)
    assert y_form.shape == y_xla.shape
    np.testing.assert_allclose(y_form, y_xla, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_form, g_xla):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="session")
def same_values_and_gradients():
    return _same_values_and_gradients

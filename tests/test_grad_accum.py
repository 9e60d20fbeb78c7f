"""Gradient accumulation (``config.grad_accum_steps``): k micro-batches, one update, same result.

The accumulated step must give the parameters one pass over the whole batch gives
(to float32 rounding), for the toy and the generative families on a sharded 2 x 4
mesh of fake CPU devices; a micro-batch must stay spread over the data-parallel
devices; a batch that does not split is a one-line error before anything compiles.
The host batch's layout, its divisibility and the eval step's active rules all come from
the config's ``"batch"`` sharding rule.
Optimizers here are plain SGD at a constant rate: Adam's first step is ``lr * sign(g)``
and the default schedules start at 0, either of which would hide a wrong gradient.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mmgen  # noqa: F401
from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.errors import UserError
from mmgen.families import get_family
from mmgen.families.toy import MLP
from mmgen.parallel import mesh as mesh_lib
from mmgen.parallel import sharding as sharding_lib
from mmgen.train import loop, optim

SGD = ["optimizer.name='sgd'", "optimizer.b1=0.0", "optimizer.grad_clip=0.0", "schedule.name='constant'"]


def _flat_params(state, parts=("model",)) -> dict:
    return {(part, *path): np.asarray(v) for part in parts for path, v in nnx.to_flat_state(jax.device_get(state[part]))
            if not jnp.issubdtype(np.asarray(v).dtype, jax.dtypes.prng_key)}


def _numpy_state(abstract, seed=0, std=0.1):
    """Host values for an abstract state without compiling an initialiser (slow for conv nets on CPU):
    weights from a seeded normal (norm scales 1), everything else zero."""
    rng = np.random.default_rng(seed)

    def init(path, x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), x.shape) if x.shape else jax.random.key(seed)
        name = jax.tree_util.keystr(path)
        if "optimizer" in name or "lecam" in name or jnp.issubdtype(x.dtype, jnp.integer):
            return np.zeros(x.shape, x.dtype)
        return np.ones(x.shape, x.dtype) if "scale" in name else rng.normal(0.0, std, x.shape).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(init, abstract)


def _one_step(family, cfg, steps: int = 1, batch=None, parts=("model",), numpy_init=False):
    """Parameters (of ``state[part]`` for each of ``parts``) before and after, and the metrics
    of ``steps`` updates on ``batch`` (default: the family's first batch)."""
    mesh = mesh_lib.make_mesh(cfg.mesh)
    loop.check_batch_divides(cfg, mesh)
    graphdef, abstract = loop.abstract_state(family, cfg)
    shardings = sharding_lib.state_shardings(abstract, mesh, tuple(tuple(r) for r in cfg.sharding_rules))
    if numpy_init:
        state = jax.device_put(_numpy_state(abstract), shardings)
    else:
        state = loop.init_state(family, cfg, mesh, shardings)
    before = _flat_params(state, parts)
    if batch is None:
        batch = next(family.make_data(cfg, split="train", train=True, seed=cfg.seed, batch_size=cfg.batch_size,
                                      process_index=0, process_count=1))
    step = loop.make_train_step(family, cfg, graphdef, shardings, loop.batch_shardings_for(batch, mesh), mesh)
    for i in range(steps):
        state, metrics = step(state, loop.global_batch(batch, mesh), jax.random.key(i))
    return before, _flat_params(state, parts), {k: float(v) for k, v in metrics.items()}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_micro_batches_are_strided_rows_that_stay_on_their_devices():
    mesh = mesh_lib.make_mesh(config_lib.load_config("configs/toy.py:tiny", ["mesh.data=2", "mesh.fsdp=4"]).mesh)
    x = jax.device_put(jnp.arange(32 * 3).reshape(32, 3), NamedSharding(mesh, P(("data", "fsdp"))))

    @jax.jit
    def split(x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            micro = optim.split_micro_batches(x, 2)
            return micro, optim.merge_micro_batches(micro)

    micro, merged = split(x)
    assert micro.shape == (2, 16, 3)
    np.testing.assert_array_equal(np.asarray(micro[1])[:, 0], np.arange(1, 32, 2) * 3)  # rows 1, 3, 5, ...
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(x))
    held = {shard.device: set(np.asarray(shard.data)[:, 0].tolist()) for shard in x.addressable_shards}
    for shard in micro.addressable_shards:  # each device's part of every micro-batch is rows it already held
        rows = np.asarray(shard.data)[:, :, 0]
        assert rows.shape == (2, 2), rows.shape  # 2 micro-batches x 16 rows / 8 devices
        assert set(rows.ravel().tolist()) <= held[shard.device]


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients():
    cfg = config_lib.load_config("configs/toy.py:tiny", ["grad_accum_steps=4"])
    model = MLP(4, 16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "y": jnp.asarray(rng.normal(size=(8, 4)))}

    def loss_fn(model, micro, rng):
        err = model(micro["x"]) - micro["y"]
        loss = jnp.mean(err**2)
        size = jnp.full((micro["x"].shape[0],), micro["x"].shape[0])
        return loss, ({"loss": loss, "max_err": jnp.max(jnp.abs(err))}, {"row": micro["x"][:, 0], "size": size})

    loss, metrics, outputs, grads = optim.accumulate_gradients(cfg, loss_fn, (model,), batch, None)
    # The loss function saw micro-batches of 8 / 4 = 2 rows; outputs come back in batch order.
    np.testing.assert_array_equal(outputs["size"], np.full(8, 2))
    np.testing.assert_array_equal(outputs["row"], batch["x"][:, 0])
    parts = []
    for i in range(4):
        micro = {k: v[i::4] for k, v in batch.items()}
        parts.append(nnx.value_and_grad(lambda m, b: loss_fn(m, b, None)[0])(model, micro))
    expected = jax.tree.map(lambda *g: sum(g) / 4, *[g for _, g in parts])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, np.mean([float(v) for v, _ in parts]), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    full_loss = float(jnp.mean((model(batch["x"]) - batch["y"]) ** 2))
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)  # equal-sized micro-batches: mean of means


def test_toy_step_with_two_micro_batches_matches_one_pass():
    base = ["mesh.data=2", "mesh.fsdp=4", "batch_size=32", "optimizer.lr=0.5", *SGD]
    before, one, m1 = _one_step(get_family("toy"), config_lib.load_config("configs/toy.py:tiny", base), steps=2)
    _, two, m2 = _one_step(get_family("toy"), config_lib.load_config("configs/toy.py:tiny",
                                                                      base + ["grad_accum_steps=2"]), steps=2)
    assert _max_difference(before, one) > 1e-2  # the steps really move the weights ...
    assert _max_difference(one, two) < 1e-5  # ... and the same way with accumulation
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)


@pytest.mark.slow
def test_generative_step_with_two_micro_batches_matches_one_pass(generative_config):
    """Masks are drawn for the whole batch and the loss is the whole batch's weighted mean,
    so accumulating changes nothing but the order of the float32 sums."""
    family = get_family("generative")
    extra = ["data_source='random_tokens'", "mesh.data=2", "mesh.fsdp=4", "batch_size=16", "model.dropout=0.0",
             "optimizer.lr=1.0", *SGD]
    before, one, m1 = _one_step(family, generative_config("tiny,modalities=video", extra))
    _, two, m2 = _one_step(family, generative_config("tiny,modalities=video", extra + ["grad_accum_steps=2"]))
    assert _max_difference(before, one) > 1e-3  # the step really moves the weights ...
    assert _max_difference(one, two) < 1e-5  # ... and the same way with accumulation
    for key in ("loss", "accuracy", "weight", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_tokenizer_gan_step_with_two_micro_batches_matches_one_pass():
    """Generator, then discriminator, each over the same two micro-batches. FSQ (no batch
    statistics) and LeCAM off (its EMA anchors move once per micro-batch), so that the two
    agree exactly; GAN on from step 0."""
    shrink = ["dataset.frames=3", "dataset.resolution=8", "model.base_channels=8", "model.channel_multipliers=(1,)",
              "model.temporal_downsample=()", "discriminator.base_channels=8", "discriminator.channel_multipliers=(1,)",
              "discriminator.temporal_downsample=(True,)", "discriminator.frames=3", "discriminator.height=8",
              "discriminator.width=8"]
    extra = [*shrink, "mesh.data=2", "mesh.fsdp=4", "batch_size=16", "gan.start_step=0", "loss.lecam_weight=0.0",
             "ema_decay=0.0", *SGD, "optimizer.lr=0.5", "disc_optimizer.name='sgd'", "disc_optimizer.b1=0.0",
             "disc_optimizer.grad_clip=0.0", "disc_optimizer.lr=0.5"]
    video = np.random.default_rng(0).integers(0, 256, (16, 3, 8, 8, 3), dtype=np.uint8)
    family = get_family("tokenizer")
    runs = [_one_step(family, config_lib.load_config("configs/tokenizer/video.py:tiny,quantizer=fsq", extra + more),
                      batch={"video": video}, parts=("model", "disc"), numpy_init=True)
            for more in ([], ["grad_accum_steps=2"])]
    (before, one, m1), (_, two, m2) = runs
    for part in ("model", "disc"):  # both players move, and the same way with accumulation
        moved = max(float(np.max(np.abs(one[k] - before[k]))) for k in one if k[0] == part)
        apart = max(float(np.max(np.abs(one[k] - two[k]))) for k in one if k[0] == part)
        assert moved > 1e-3 and apart < 1e-5, (part, moved, apart)
    for key in ("loss", "rec_loss", "g_adv_loss", "d_loss", "d_real_logit", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("argv, message", [
    (["--devices", "8", "--config.batch_size=16", "--config.grad_accum_steps=4"],
     ("config.batch_size=16 does not split into grad_accum_steps=4 micro-batches over data x fsdp = 8 shards "
      "(8 devices): it must be a multiple of 32; try 32")),
    (["--devices", "8", "--config.grad_accum_steps=0"], "config.grad_accum_steps=0 must be at least 1"),
])
def test_batch_that_does_not_split_into_micro_batches_is_one_line(capsys, argv, message):
    rc = cli.main(["plan", "--config", "configs/toy.py:small", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    cfg = config_lib.load_config("configs/toy.py:small", ["mesh.data=2", "mesh.fsdp=4", "batch_size=24",
                                                          "grad_accum_steps=2"])
    with pytest.raises(UserError, match="multiple of 16; try 32"):
        loop.check_batch_divides(cfg, mesh_lib.make_mesh(cfg.mesh))


# ------------------------------------------------------------------ the batch axes come from the config's rules
def _with_batch_rule(axes, more=()):
    cfg = config_lib.load_config("configs/toy.py:small", ["mesh.data=2", "mesh.fsdp=4", *more])
    cfg.sharding_rules = [[name, list(axes) if name == "batch" else rule] for name, rule in cfg.sharding_rules]
    return cfg, mesh_lib.make_mesh(cfg.mesh)


@pytest.mark.parametrize("axes, spec, per_device", [(("data",), P("data", None), 4),
                                                    (("data", "fsdp"), P(("data", "fsdp"), None), 1)])
def test_host_batch_and_eval_step_follow_the_configs_batch_rule(axes, spec, per_device):
    cfg, mesh = _with_batch_rule(axes, ["batch_size=8"])
    loop.check_batch_divides(cfg, mesh)
    batch = {"x": np.arange(16, dtype=np.float32).reshape(8, 2), "name": np.array([b"a"] * 8)}
    arrays = loop.global_batch(batch, mesh, cfg.sharding_rules)
    assert set(arrays) == {"x"} and arrays["x"].sharding.spec == spec
    assert {s.data.shape for s in arrays["x"].addressable_shards} == {(per_device, 2)}
    np.testing.assert_array_equal(np.asarray(arrays["x"]), batch["x"])
    assert loop.batch_shardings_for(batch, mesh, cfg.sharding_rules) == {"x": arrays["x"].sharding}

    # The eval step runs inside the config's rules, like the train step: the model sees its batch axes.
    seen = []
    toy = get_family("toy")

    def eval_step(cfg, state, batch, rng):
        seen.append(sharding_lib.batch_axes())
        return toy.eval_step(cfg, state, batch, rng)

    family = dataclasses.replace(toy, eval_step=eval_step)
    graphdef, abstract = loop.abstract_state(family, cfg)
    shardings = sharding_lib.state_shardings(abstract, mesh, cfg.sharding_rules)
    state = loop.init_state(family, cfg, mesh, shardings)
    it = family.make_data(cfg, split="test", train=False, seed=0, batch_size=8, process_index=0, process_count=1)
    first = next(it)
    step = loop.make_eval_step(family, cfg, graphdef, shardings, loop.batch_shardings_for(first, mesh,
                                                                                          cfg.sharding_rules), mesh)
    metrics = step(state, loop.global_batch(first, mesh, cfg.sharding_rules), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and seen == [axes]


def test_batch_divisibility_counts_the_rules_axes():
    cfg, mesh = _with_batch_rule(("data",), ["batch_size=2"])
    loop.check_batch_divides(cfg, mesh)  # 2 examples over data = 2 shards
    cfg, mesh = _with_batch_rule(("data",), ["batch_size=3"])
    with pytest.raises(UserError, match=r"batch_size=3 does not divide over data = 2 shards .*; try 4"):
        loop.check_batch_divides(cfg, mesh)
    cfg, mesh = _with_batch_rule(("data", "fsdp"), ["batch_size=2"])
    with pytest.raises(UserError, match=r"batch_size=2 does not divide over data x fsdp = 8 shards"):
        loop.check_batch_divides(cfg, mesh)

"""Specification of adapter runs (mmgen/families/adapters.py) and ``mmgen adapters merge``.

One tiny base per session: a 1-layer, width-32 masked transformer workdir whose
weights are drawn with numpy (no init compile; what the adapters see is the same as
after training). The shipped LoRA and FlyLoRA configs (LoRA r=16, FlyLoRA r=32, k=8
on the attention projections) fine-tune it for 2 steps on frame prediction with
random tokens. A second FlyLoRA workdir for merging (audio continuation, an
independent A) is written directly with numpy-drawn weights.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmgen  # noqa: F401  (process-wide JAX settings)
from mmgen import commands as cli
from mmgen import config as config_lib
from mmgen.adapters import (
    FlyLoRA,
    FlyLoRASum,
    LoRA,
    adapter_state,
    base_fingerprint,
    merge_flylora_adapters,
)
from mmgen.errors import UserError
from mmgen.families import adapters as adapters_family
from mmgen.families import get_family
from mmgen.generative import tasks as tasks_lib
from mmgen.train import loop
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTERS = os.path.join(ROOT, "configs", "adapters")
# adapter_config and adapter_base (the numpy-drawn base workdir): tests/conftest.py

pytestmark = pytest.mark.slow  # every test reads the session's two adapter training runs


def saved_config(workdir):
    return config_lib.from_json_file(os.path.join(workdir, "config.json"))


def load(workdir):
    cfg = saved_config(workdir)
    return loop.load_state(get_family(cfg.family), cfg, workdir)


def checkpoint_keys(workdir, step=2):
    with open(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA")) as f:
        meta = json.load(f)
    return [tuple(eval(k)) for k in meta["tree_metadata"]]  # keys are tuple reprs, e.g. "('model', 'x', 'value')"


def write_other_flylora(trained_workdir, workdir, seed=1):
    """A FlyLoRA workdir like ``trained_workdir``'s but for audio continuation, with an
    independent sparse A (another seed) and numpy-drawn B."""
    from mmgen.adapters import sparse_projection
    from mmgen.commands.adapters_merge import write_workdir
    from mmgen.parallel import mesh as mesh_lib

    cfg = saved_config(trained_workdir)
    cfg.adapter.seed = seed
    for name in cfg.task_weights:
        cfg.task_weights[name] = 1.0 if name == "audio_continuation" else 0.0
    rng = np.random.default_rng(seed)
    values = {}
    for i, (path, fly) in enumerate(nnx.iter_modules(load(trained_workdir).model)):
        if isinstance(fly, FlyLoRA):
            key = tuple(map(str, path))
            a_shape, b_shape = fly.A[...].shape, fly.B[...].shape
            values[key + ("A",)] = sparse_projection(seed * 1000 + i, fly.rank, a_shape[-1], fly.k, a_shape[:-2])
            values[key + ("B",)] = rng.normal(0.0, 0.05, b_shape).astype(np.float32)
            values[key + ("d",)] = np.zeros(fly.d[...].shape, np.float32)
    write_workdir(get_family("adapters"), cfg, workdir, 2, values, mesh_lib.make_mesh(cfg.mesh))


@pytest.fixture(scope="session")
def runs(tmp_path_factory, adapter_base, adapter_config):
    root = tmp_path_factory.mktemp("adapter_runs")
    out = {"base": adapter_base, **{name: str(root / name) for name in ("lora", "flylora", "flylora_other")}}
    for kind in ("lora", "flylora"):
        # On one device (no 8-way partitioning to compile); loading below restores onto all 8
        # devices of the mesh (a resharding restore of the base and the adapters).
        loop.run(get_family("adapters"), adapter_config(kind, out["base"]), out[kind], devices=jax.devices()[:1])
    write_other_flylora(out["flylora"], out["flylora_other"])
    return out


@pytest.fixture(scope="session")
def probe_inputs():
    """A fixed masked batch of the tiny layout for comparing logits."""
    rng = np.random.default_rng(0)
    tokens = {"video": rng.integers(0, 65, (2, 2, 4, 4)).astype(np.int32),
              "audio": rng.integers(0, 17, (2, 8, 2)).astype(np.int32)}
    task_ids = np.asarray([tasks_lib.task_id("frame_prediction"), tasks_lib.task_id("audio_video")], np.int32)
    return tokens, task_ids


@nnx.jit
def logits_of(model, tokens, task_ids):
    return model(tokens, task_ids)


def assert_logits_close(a, b, atol=1e-5):
    for m in a:
        np.testing.assert_allclose(np.asarray(a[m]), np.asarray(b[m]), atol=atol, rtol=0)


# ------------------------------------------------------------------------ runs
def test_adapter_checkpoint_holds_adapters_and_their_optimizer_state_only(runs):
    for name, trained in (("lora", {"A", "B"}), ("flylora", {"B"})):
        keys = checkpoint_keys(runs[name])
        model_keys = [k for k in keys if k[0] == "model"]
        assert model_keys and {k[-2] for k in model_keys} == (trained | ({"A", "d", "counts"} if name == "flylora" else set()))
        assert all(k[1:4] == ("blocks", "layers", "attention") for k in model_keys)  # adapted layers only
        assert not [k for k in keys if "base" in k or "kernel" in k or "embedding" in " ".join(map(str, k))]
        moments = [k for k in keys if k[0] == "optimizer" and k[-2] in ("A", "B", "d", "counts")]
        assert moments and {k[-2] for k in moments} == trained  # only trainable adapter weights have Adam moments
    cfg = saved_config(runs["flylora"])
    assert cfg.base_workdir == os.path.abspath(runs["base"]) and cfg.base_step == 2
    assert cfg.base_fingerprint == base_fingerprint(load(runs["base"]).model)
    assert dict(cfg.model) == dict(saved_config(runs["base"]).model)  # the base decides the model


def test_base_weights_stay_bit_identical_while_adapters_train(runs):
    base = nnx.to_flat_state(nnx.state(load(runs["base"]).model, nnx.Param))
    for name in ("lora", "flylora"):
        model = load(runs[name]).model
        frozen = {".".join(map(str, p)).replace(".base.", "."): v.get_value()
                  for p, v in nnx.to_flat_state(nnx.state(model, adapters_family.frozen_filter))}
        assert len(frozen) == len(base)
        for path, var in base:
            np.testing.assert_array_equal(np.asarray(frozen[".".join(map(str, path))]), np.asarray(var.get_value()))
        adapters = [m for _, m in nnx.iter_modules(model) if isinstance(m, (LoRA, FlyLoRA))]
        assert len(adapters) == 4 and all(np.abs(np.asarray(a.B[...])).max() > 0 for a in adapters)
    fly = next(m for _, m in nnx.iter_modules(load(runs["flylora"]).model) if isinstance(m, FlyLoRA))
    assert np.abs(np.asarray(fly.d[...])).max() > 0  # the routing bias moved by the load-balancing rule


def test_a_wrong_or_changed_base_is_one_clear_error(runs, tmp_path, capsys, adapter_config):
    with pytest.raises(UserError, match="does not exist"):
        adapters_family.validate(adapter_config("lora", str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="holds a 'adapters' run"):
        adapters_family.validate(adapter_config("lora", runs["lora"]))
    code = cli.main(["train", "--config", os.path.join(ADAPTERS, "lora.py:tiny"), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "config.base_workdir is empty" in err

    # The base step the adapters were trained on is gone (the base was retrained and pruned).
    cfg = saved_config(runs["flylora"])
    cfg.base_step = 7
    with pytest.raises(UserError, match="no longer holds checkpoint step 7"):
        loop.load_state(get_family("adapters"), cfg, runs["flylora"])

    # Same path and step, other weights: the fingerprint refuses it.
    changed = str(tmp_path / "base_retrained")
    shutil.copytree(runs["base"], changed)
    base_cfg = saved_config(runs["base"])
    state = nnx.state(load(runs["base"]))
    state["model"]["final_norm"]["scale"].set_value(state["model"]["final_norm"]["scale"].get_value() + 1e-3)
    shutil.rmtree(os.path.join(changed, "checkpoints", "2"))
    ckpt = Checkpointer(changed, async_save=False)
    ckpt.save(2, state, force=True)
    ckpt.close()
    assert base_cfg.family == "generative"
    cfg = saved_config(runs["flylora"])
    cfg.base_workdir = changed
    with pytest.raises(UserError, match="fingerprint"):
        loop.load_state(get_family("adapters"), cfg, runs["flylora"])


# ------------------------------------------------------------------------ merging
def test_folded_lora_gives_the_adapter_models_logits(runs, tmp_path, probe_inputs):
    folded = str(tmp_path / "folded")
    assert cli.main(["adapters", "merge", "--workdirs", runs["lora"], "--out", folded, "--fold"]) == 0
    assert saved_config(folded).family == "generative"
    plain = load(folded).model
    assert not [m for _, m in nnx.iter_modules(plain) if isinstance(m, LoRA)]
    adapted = load(runs["lora"]).model
    want = logits_of(adapted, *probe_inputs)
    assert_logits_close(logits_of(plain, *probe_inputs), want)
    base = logits_of(load(runs["base"]).model, *probe_inputs)
    assert max(float(jnp.abs(want[m] - base[m]).max()) for m in want) > 1e-4  # the adapter changed something

    # Two task adapters: folded task arithmetic == the unfolded rank-2r LoRA over the base.
    both, concat = str(tmp_path / "both_folded"), str(tmp_path / "both")
    args = ["adapters", "merge", "--workdirs", runs["lora"], runs["lora"], "--weights", "0.5", "1.5"]
    assert cli.main(args + ["--out", both, "--fold"]) == 0 and cli.main(args + ["--out", concat]) == 0
    unfolded = load(concat).model
    rank = {m.rank for _, m in nnx.iter_modules(unfolded) if isinstance(m, LoRA)}
    assert rank == {32} and saved_config(concat).family == "adapters"
    want = logits_of(unfolded, *probe_inputs)
    assert_logits_close(logits_of(load(both).model, *probe_inputs), want)
    # ... which is the single adapter with twice its update (0.5 + 1.5): not the single adapter.
    assert max(float(jnp.abs(want[m] - logits_of(adapted, *probe_inputs)[m]).max()) for m in want) > 1e-5


def test_a_merge_holds_weights_only_and_fine_tunes_through_init_from(runs, tmp_path, capsys, probe_inputs):
    merged = str(tmp_path / "merged")
    assert cli.main(["adapters", "merge", "--workdirs", runs["lora"], runs["lora"], "--out", merged]) == 0
    keys = checkpoint_keys(merged)
    assert keys and {k[0] for k in keys} == {"model"}  # no optimizer state was made up
    assert saved_config(merged).weights_only
    # train cannot resume it (no optimizer): one line naming the way to fine-tune it
    code = cli.main(["train", "--workdir", merged])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"--config.init_from={merged}" in err
    # a fresh run starts from its weights: the first step's model is the merged one
    tuned = str(tmp_path / "tuned")
    start = load(merged).model
    cfg = saved_config(merged)
    cfg.update(init_from=merged, weights_only=False, total_steps=int(cfg.total_steps) + 1)
    loop.run(get_family("adapters"), cfg, tuned, stop_after=1, devices=jax.devices()[:1])
    assert {k[0] for k in checkpoint_keys(tuned, step=1)} >= {"model", "optimizer"}
    moved = logits_of(load(tuned).model, *probe_inputs)
    want = logits_of(start, *probe_inputs)
    assert max(float(jnp.abs(moved[m] - want[m]).max()) for m in want) < 0.05  # one small step away


def test_flylora_merges_load_as_summed_branches_or_averaged_shared_a(runs, tmp_path, probe_inputs):
    out = str(tmp_path / "fly_sum")
    assert cli.main(["adapters", "merge", "--workdirs", runs["flylora"], runs["flylora_other"], "--out", out]) == 0
    cfg = saved_config(out)
    assert cfg.family == "adapters" and cfg.adapter.branches == 2
    assert cfg.task_weights.frame_prediction == 1.0 and cfg.task_weights.audio_continuation == 1.0
    merged = load(out).model
    assert len([m for _, m in nnx.iter_modules(merged) if isinstance(m, FlyLoRASum)]) == 4
    first, other = load(runs["flylora"]).model, load(runs["flylora_other"]).model
    expected = merge_flylora_adapters(first, [adapter_state(first), adapter_state(other)])
    assert_logits_close(logits_of(merged, *probe_inputs), logits_of(expected, *probe_inputs))

    # The same adapter twice shares A: the average of two equal B's is the adapter itself.
    same = str(tmp_path / "fly_same")
    assert cli.main(["adapters", "merge", "--workdirs", runs["flylora"], runs["flylora"], "--out", same]) == 0
    with open(os.path.join(same, "merge.json")) as f:
        assert json.load(f)["mode"] == "flylora_shared_a"
    assert_logits_close(logits_of(load(same).model, *probe_inputs),
                        logits_of(load(runs["flylora"]).model, *probe_inputs))


def test_merging_refuses_different_bases_kinds_and_folded_flylora(runs, tmp_path, capsys):
    other = str(tmp_path / "lora_other_base")
    shutil.copytree(runs["lora"], other)
    cfg = saved_config(other)
    cfg.base_fingerprint = "0" * 64
    workdir_lib.write_config(cfg, other)
    cases = [([runs["lora"], other], [], "different bases"),
             ([runs["lora"], runs["flylora"]], [], "differs from"),
             ([runs["flylora"], runs["flylora_other"]], ["--fold"], "FlyLoRA cannot be folded"),
             ([runs["lora"], runs["base"]], [], "not an adapter run")]
    for i, (workdirs, flags, message) in enumerate(cases):
        code = cli.main(["adapters", "merge", "--workdirs", *workdirs, "--out", str(tmp_path / f"m{i}"), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, err
        assert not os.path.exists(tmp_path / f"m{i}")


def write_other_lora(trained_workdir, workdir, seed=1):
    """A LoRA workdir like ``trained_workdir``'s (same base) with numpy-drawn A and B."""
    from mmgen.commands.adapters_merge import write_workdir
    from mmgen.parallel import mesh as mesh_lib

    cfg = saved_config(trained_workdir)
    rng = np.random.default_rng(seed)
    values = {}
    for path, lora in nnx.iter_modules(load(trained_workdir).model):
        if isinstance(lora, LoRA):
            key = tuple(map(str, path))
            values[key + ("A",)] = rng.normal(0.0, 1.0 / lora.rank, lora.A[...].shape).astype(np.float32)
            values[key + ("B",)] = rng.normal(0.0, 0.05, lora.B[...].shape).astype(np.float32)
    write_workdir(get_family("adapters"), cfg, workdir, 2, values, mesh_lib.make_mesh(cfg.mesh))


def test_ties_merges_fold_exactly_and_store_unfolded_as_an_svd_lora(runs, tmp_path, probe_inputs):
    other = str(tmp_path / "lora_other")
    write_other_lora(runs["lora"], other)
    both = ["adapters", "merge", "--workdirs", runs["lora"], other, "--method", "ties"]
    folded, svd, low = (str(tmp_path / n) for n in ("ties_folded", "ties_svd", "ties_rank4"))
    assert cli.main(both + ["--out", folded, "--fold", "--config.merge.ties.k=0.5"]) == 0
    assert cli.main(both + ["--out", svd, "--config.merge.ties.k=0.5"]) == 0
    with open(os.path.join(svd, "merge.json")) as f:
        record = json.load(f)
    # 2 adapters of rank 16 on 32 x 32 projections: the rank-32 SVD LoRA is exact
    assert record["mode"] == "lora_svd" and record["method"] == "ties" and record["options"]["k"] == 0.5
    assert record["svd_rank"] == 32 and max(record["svd_relative_residual"].values()) < 1e-4
    assert saved_config(svd).adapter.rank == 32 and saved_config(svd).weights_only
    want = logits_of(load(folded).model, *probe_inputs)
    assert_logits_close(logits_of(load(svd).model, *probe_inputs), want, atol=1e-4)
    # the merge is not the plain sum (trim + election changed something)
    summed = str(tmp_path / "sum_folded")
    assert cli.main(["adapters", "merge", "--workdirs", runs["lora"], other, "--out", summed, "--fold"]) == 0
    plain = logits_of(load(summed).model, *probe_inputs)
    assert max(float(jnp.abs(want[m] - plain[m]).max()) for m in want) > 1e-4
    # a lower rank is an approximation, its residual recorded
    assert cli.main(both + ["--out", low, "--config.merge.svd_rank=4"]) == 0
    with open(os.path.join(low, "merge.json")) as f:
        record = json.load(f)
    assert record["svd_rank"] == 4 and min(record["svd_relative_residual"].values()) > 1e-3
    assert {m.rank for _, m in nnx.iter_modules(load(low).model) if isinstance(m, LoRA)} == {4}


def test_flylora_breadcrumbs_merge_loads_as_masked_branches(runs, tmp_path, probe_inputs):
    out = str(tmp_path / "fly_crumbs")
    args = ["adapters", "merge", "--workdirs", runs["flylora"], runs["flylora_other"], "--out", out,
            "--method", "breadcrumbs", "--config.merge.breadcrumbs.alpha=0.5"]
    assert cli.main(args) == 0
    assert list(saved_config(out).adapter.branch_weights) == [0.5, 0.5]
    first, other = load(runs["flylora"]).model, load(runs["flylora_other"]).model
    options = dict(saved_config(runs["flylora"]).merge.breadcrumbs.to_dict(), alpha=0.5)
    expected = merge_flylora_adapters(first, [adapter_state(first), adapter_state(other)], method="breadcrumbs",
                                      options=options)
    assert_logits_close(logits_of(load(out).model, *probe_inputs), logits_of(expected, *probe_inputs))


def test_merge_methods_refuse_what_does_not_apply_with_one_line(runs, tmp_path, capsys):
    cases = [([runs["flylora"], runs["flylora_other"]], ["--method", "ties"], "share no parameters"),
             ([runs["flylora"], runs["flylora_other"]], ["--method", "dare", "--config.merge.dare.combine=ties"],
              "share no parameters"),
             ([runs["lora"], runs["lora"]], ["--method", "ties", "--config.merge.ties.k=0"], "ties.k"),
             ([runs["lora"], runs["lora"]], ["--method", "dare", "--config.merge.dare.p=1.5"], "dare.p"),
             ([runs["lora"], runs["lora"]], ["--config.merge.ties.kk=1"], "no key"),
             ([runs["lora"], runs["lora"]], ["--config.total_steps=3"], "only --config.merge.*")]
    for i, (workdirs, flags, message) in enumerate(cases):
        code = cli.main(["adapters", "merge", "--workdirs", *workdirs, "--out", str(tmp_path / f"r{i}"), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, err
        assert not os.path.exists(tmp_path / f"r{i}")

"""One benchmark run: matmul peak, train steps (transformer, tokenizers), sampling, compile.

    python -m benchmarks.run [--quick] [--out BENCHMARKS.md] [--json benchmarks/results.json]

Everything is measured in this one process, so ratios (MFU = achieved model FLOP/s
over the same run's matmul peak; sampling overhead; compile scaling) compare like
with like. MFU counts model FLOPs only (6 * matmul params + attention per token for
the transformer, docs/ALGORITHMS.md "Scale"; XLA's cost model of the forward x 3 for
the tokenizers), so rematerialised recomputation lowers it, as it should.
Timings come from wall clock after a warm-up step, with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import mmgen
from mmgen.generative import masking, sampling, tasks
from mmgen.generative import transformer as tr
from mmgen.nn import cpu_kernels
from mmgen.nn.backend import without_cpu_forms
from mmgen.parallel import runtime
from mmgen.train import optim

from benchmarks import harness


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA's cost analysis counts in a compiled step (None where the backend has none)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:
        return None


def peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:
        return None


# ------------------------------------------------------------------ transformer
def transformer_config(width=512, depth=4, heads=8, grid=(4, 16, 16), vocab=1024, dtype="float32",
                       remat="none") -> ml_collections.ConfigDict:
    cfg = tr.model_config("tiny")
    cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim = width, depth, heads, 4 * width
    cfg.video_grid, cfg.video_vocab = tuple(grid), vocab
    cfg.dtype, cfg.remat_policy, cfg.dropout = dtype, remat, 0.0
    return cfg


class _TrainState(nnx.Module):
    def __init__(self, cfg, rngs):
        self.model = tr.MaskedTransformer(cfg, rngs=rngs)
        opt = optim.default_optimizer_config()
        sched = optim.default_schedule_config(warmup_steps=10)
        self.optimizer = optim.make_optimizer(self.model, opt, sched, 1000)


def masked_token_step(cfg, graphdef, task_ids):
    """``step(state, tokens, rng) -> (state, loss)``: masking + forward + backward + AdamW."""

    def step(st, tokens, rng):
        s = nnx.merge(graphdef, st)
        ex = masking.make_training_example(cfg, {"video": tokens}, task_ids, rng, mode="prefix")
        (loss, _), grads = nnx.value_and_grad(lambda m: masking.loss_fn(m, ex, train=True), has_aux=True)(s.model)
        s.optimizer.update(s.model, grads)
        return nnx.state(s), loss

    return step


def transformer_step_bench(cfg, batch: int) -> dict:
    """Masked-token training step (masking + fwd + bwd + AdamW) on video tokens only.

    Returns the row's facts and ``call``: one step on the compiled function, for the
    harness to time between readings of the peak.
    """
    seq = 2 + int(np.prod(cfg.video_grid))  # task + condition + video; no audio in this benchmark
    t0 = time.perf_counter()
    state = nnx.jit(lambda: _TrainState(cfg, nnx.Rngs(0)))()
    graphdef, st = nnx.split(state)
    tokens = jax.random.randint(jax.random.key(1), (batch, *cfg.video_grid), 0, cfg.video_vocab)
    task_ids = jnp.full((batch,), tasks.task_id("unconditional"), jnp.int32)

    jstep = jax.jit(masked_token_step(cfg, graphdef, task_ids), donate_argnums=0)
    compiled = jstep.lower(st, tokens, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    holder = {"st": st}

    def call():
        holder["st"], loss = compiled(holder["st"], tokens, jax.random.key(2))
        return loss

    return {"seq_len": seq, "batch": batch, "params": tr.param_count(cfg), "units": batch * seq, "unit": "tokens",
            "flops": tr.flops_per_token(cfg, seq) * batch * seq, "first_compile_s": compile_s,
            "peak_bytes": peak_bytes(compiled), "call": call}


def compile_time(cfg, batch: int) -> float:
    t0 = time.perf_counter()
    state = nnx.eval_shape(lambda: _TrainState(cfg, nnx.Rngs(0)))
    graphdef, st = nnx.split(state)
    tokens = jax.ShapeDtypeStruct((batch, *cfg.video_grid), jnp.int32)
    task_ids = jnp.zeros((batch,), jnp.int32)

    jax.jit(masked_token_step(cfg, graphdef, task_ids)).lower(st, tokens, jax.random.key(0)).compile()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ sampling
def sampling_bench(cfg, batch: int, steps: int, reps: int) -> dict:
    """MaskGIT sampling vs ``steps`` bare forward passes, alternated call by call."""
    model = nnx.jit(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0)))()
    rng = jax.random.key(0)
    tokens = jnp.full((batch, *cfg.video_grid), cfg.video_vocab, jnp.int32)
    task_ids = jnp.full((batch,), tasks.task_id("unconditional"), jnp.int32)

    graphdef, params = nnx.split(model)

    @jax.jit
    def bare_forwards(params, tokens):
        def body(i, carry):  # parameters ride in the carry, as in sampling's loop
            params, tokens = carry
            logits = nnx.merge(graphdef, params)({"video": tokens}, task_ids)["video"]
            # Feed the prediction back so XLA cannot hoist the forward out of the loop.
            return params, jnp.argmax(logits[..., 0, :], axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (params, tokens))[1]

    sample = lambda: sampling.sample(model, "unconditional", None, rng, steps=steps, batch_size=batch)["video"]
    sample_t, fwd_t = harness.alternate([sample, lambda: bare_forwards(params, tokens)], reps)
    return {"steps": steps, "batch": batch, "sample_s": harness.summary(sample_t),
            "bare_forwards_s": harness.summary(fwd_t), "overhead": harness.ratio_per_round(fwd_t, sample_t)}


# ------------------------------------------------------------------ tokenizers
def tokenizer_step_bench(spec: str, batch: int, overrides: tuple[str, ...] = ()) -> dict:
    """One compiled tokenizer train step of ``spec`` (GAN on from step 0 where the config
    has one), ready to time; ``overrides`` are ``key=value`` config overrides."""
    from mmgen import config as config_lib
    from mmgen.families import tokenizer as tok
    from mmgen.train import loop

    cfg = config_lib.load_config(spec, [f"batch_size={batch}", "gan.start_step=0", *overrides])
    graphdef, abstract = loop.abstract_state(tok.FAMILY, cfg)
    t0 = time.perf_counter()
    st = jax.jit(lambda: nnx.state(tok.create_state(cfg, nnx.Rngs(0))))()
    shape = tok.input_shape(cfg)
    if cfg.modality == "video":
        batch_np = {"video": np.random.default_rng(0).integers(0, 255, (batch, *shape[1:]), dtype=np.uint8)}
    else:
        batch_np = {"audio": np.random.default_rng(0).uniform(-0.5, 0.5, (batch, shape[1])).astype(np.float32)}

    def step(st, b, rng):
        s = nnx.merge(graphdef, st)
        m = tok.train_step(cfg, s, b, rng)
        return nnx.state(s), m["loss"]

    compiled = jax.jit(step, donate_argnums=0).lower(st, batch_np, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    holder = {"st": st}

    def call():
        holder["st"], loss = compiled(holder["st"], batch_np, jax.random.key(1))
        return loss

    return {"config": spec, "batch": batch, "units": batch, "unit": "clips",
            "flops": tok.flops_per_example(cfg) * batch, "first_compile_s": compile_s,
            "compiled_flops": compiled_flops(compiled), "peak_bytes": peak_bytes(compiled),
            "params": sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, st).model, nnx.Param))),
            "call": call}


def _label(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def trace_calls(call, trace_dir: str, calls: int = 3) -> None:
    """``calls`` calls of ``call`` traced with ``jax.profiler`` into ``trace_dir`` (one step
    annotation each; viewable in TensorBoard's profile plugin or Perfetto). Run apart from
    the timed repetitions, so tracing never slows a measured call."""
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        for i in range(calls):
            with jax.profiler.StepTraceAnnotation(os.path.basename(trace_dir), step_num=i):
                jax.block_until_ready(call())
    finally:
        jax.profiler.stop_trace()


def timed_row(prepared: dict, peak: tuple, reps: int, tolerance: float, profile: str | None = None) -> dict:
    """A prepared row timed between peak readings (``benchmarks.harness.bracketed``), then
    traced into ``profile`` when given."""
    call, peak_count = peak
    row = {k: v for k, v in prepared.items() if k != "call"}
    row.update(harness.bracketed(prepared["call"], prepared["flops"], call, peak_count, reps=reps,
                                 tolerance=tolerance))
    row["step_s_median"] = row["step_s"]["median"]
    row["units_per_s"] = prepared["units"] / row["step_s"]["median"]
    row["flops_per_s"] = prepared["flops"] / row["step_s"]["median"]
    if profile:
        trace_calls(prepared["call"], profile)
    return row


def measured(bench, *args) -> dict:
    """``bench(*args)``, or ``{"error": ...}`` when it fails (e.g. out of memory): one
    configuration that does not fit is a result, and the run goes on to the others."""
    try:
        return bench(*args)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        print(f"  failed: {error}", flush=True)
        return {"error": error}


# ------------------------------------------------------------------ report
def _fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _range(summ: dict, scale: float = 1.0, fmt: str = ".3f", pct: bool = False) -> str:
    """``median (min-max)`` of a ``harness.summary``."""
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: format(v * scale, fmt))
    return f"{f(summ['median'])} ({f(summ['min'])}-{f(summ['max'])})"


def _peaks(t: dict) -> str:
    flag = "" if t["reliable"] else f" **unreliable** (> {t['tolerance']:.0%})"
    return f"{t['peak_before'] / 1e9:.0f} / {t['peak_after'] / 1e9:.0f} ({t['peak_spread']:.0%}){flag}"


def _fraction(t: dict) -> str:
    """The fraction of peak, struck through when the row's peak readings disagree."""
    text = _range(t["fraction_of_peak"], pct=True)
    return text if t["reliable"] else f"~~{text}~~"


def write_markdown(results: dict, path: str) -> None:
    r = results
    th = r["threads"]
    lines = [
        "# Benchmarks",
        "",
        "Every figure below was measured by `python -m benchmarks.run"
        + (" --quick" if r["quick"] else "") + "` in one process (`benchmarks/harness.py`). Each row's "
        "repetitions alternate with readings of the matmul peak (CPU: fp32; GPU: bf16): its fraction of peak "
        "divides each repetition's model FLOP/s by the larger of the two peak readings either side of it, and "
        "the table gives the median with min-max, the first and last peak reading (GFLOP/s) and the spread of "
        f"all of the row's readings. A row whose readings spread by more than {r['tolerance']:.0%} is marked "
        "unreliable and its fraction struck through: the machine changed speed while it ran. Comparisons "
        "alternate the two sides call by call and give the per-round ratio.",
        "",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}; CPU: {r['cpu_model']}",
        f"- threads: {th['usable_cores']} usable of {th['machine_cores']} cores; 1-minute load at the start "
        f"{th['load_1min']:.1f}" if th["load_1min"] is not None else f"- threads: {th['usable_cores']} usable",
        f"- devices: {r['devices']}",
        f"- versions: jax {r['versions']['jax']}, flax {r['versions']['flax']}, mmgen {r['versions']['mmgen']}",
        f"- matmul peak ({r['peak_dtype']}, {r['matmul_n']}^3), read around every row",
        "",
        "## Transformer train step (masking + forward + backward + AdamW)",
        "",
        "| config | params | batch x seq | step (s) | tokens/s | MFU | peak before / after GFLOP/s (spread) | "
        "first compile (s) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in r["transformer"].items():
        if "error" in t:
            lines.append(f"| {name} | failed: {t['error']} |")
            continue
        lines.append(f"| {name} | {t['params'] / 1e6:.1f}M | {t['batch']} x {t['seq_len']} | {_range(t['step_s'])} | "
                     f"{t['units_per_s']:.0f} | {_fraction(t)} | {_peaks(t)} | "
                     f"{t['first_compile_s']:.1f} | {_fmt_bytes(t['peak_bytes'])} |")
    for name, c in r.get("comparisons", {}).items():
        lines += ["", f"- {name}: " + ("failed: " + c["error"] if "error" in c else
                  f"**{_range(c['ratio'], fmt='.2f')}x** faster ({c['a']} {_range(c['a_s'])} s vs "
                  f"{c['b']} {_range(c['b_s'])} s per step, {c['ratio']['n']} alternating rounds)")]
    c = r["compile_scaling"]
    lines += ["", "## Compile time vs depth (layers under `nnx.scan`)", "",
              f"- 4 layers: {c['depth4_s']:.1f} s; 24 layers: {c['depth24_s']:.1f} s; ratio **{c['ratio']:.2f}x**", ""]
    s = r["sampling"]
    lines += ["## Sampling (MaskGIT, decoding loop inside one jit)", ""]
    if "error" in s:
        lines += [f"- failed: {s['error']}", ""]
    else:
        lines += [(f"- {s['steps']} decoding steps, batch {s['batch']}: {_range(s['sample_s'])} s; {s['steps']} bare "
                   f"forward passes: {_range(s['bare_forwards_s'])} s, alternated; overhead "
                   f"**{_range(s['overhead'], fmt='.2f')}x**"), ""]
    lines += ["## Tokenizer train steps (generator + discriminator + EMA)", "",
              "| config | batch | step (s) | clips/s | fraction of matmul peak | peak before / after GFLOP/s (spread) | "
              "first compile (s) | peak memory |",
              "|---|---|---|---|---|---|---|---|"]
    for name, t in r["tokenizers"].items():
        if "error" in t:
            lines.append(f"| {name} | failed: {t['error']} |")
            continue
        lines.append(f"| {t['config']} | {t['batch']} | {_range(t['step_s'])} | {t['units_per_s']:.2f} | "
                     f"{_fraction(t)} | {_peaks(t)} | {t['first_compile_s']:.1f} | {_fmt_bytes(t['peak_bytes'])} |")
    if os.path.exists(path):  # hand-kept sections (GPU figures, notes) stay as they are
        with open(path) as f:
            old = f.read()
        kept = [old.index(m) for m in ("\n## GPU", "\n## Notes and history") if m in old]
        if kept:
            lines += [old[min(kept) + 1:]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and rows (a smoke run)")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--json", default="benchmarks/results.json")
    p.add_argument("--skip-tokenizers", action="store_true")
    p.add_argument("--tolerance", type=float, default=harness.DEFAULT_TOLERANCE,
                   help="largest spread of a row's peak readings before it is marked unreliable")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="after timing, trace 3 calls of each train-step row with jax.profiler into DIR/<row>")
    args = p.parse_args(argv)
    runtime.set_flags()
    profile = (lambda name: os.path.join(args.profile, _label(name))) if args.profile else (lambda name: None)
    reps = 3 if args.quick else 7
    gpu = jax.default_backend() == "gpu"
    peak_dtype = jnp.bfloat16 if gpu else jnp.float32
    n = 8192 if gpu else 2048
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu_model": harness.cpu_model(),
        "threads": harness.threads(), "tolerance": args.tolerance,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "versions": {"jax": jax.__version__, "flax": __import__("flax").__version__, "mmgen": mmgen.__version__},
        "quick": args.quick, "peak_dtype": jnp.dtype(peak_dtype).name, "matmul_n": n,
    }
    peak = harness.matmul_call(peak_dtype, n)

    def save_partial():  # after each section, so a run cut short keeps what it measured
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)

    dt = "bfloat16" if gpu else "float32"
    before = transformer_config(512, 4, 8, (4, 16, 16), dtype=dt)
    before.attention_impl = "dot_product_attention"  # the form every backend used before heads_major
    configs = {"tiny (128x2)": (transformer_config(128, 2, 4, (3, 8, 8), dtype=dt), 8),
               "w512 x 4 layers, seq 1026": (transformer_config(512, 4, 8, (4, 16, 16), dtype=dt), 4),
               "w512 x 4 layers, 4 heads of 128, seq 1026": (transformer_config(512, 4, 4, (4, 16, 16), dtype=dt), 4)}
    heads_major = transformer_config(512, 4, 8, (4, 16, 16), dtype=dt)
    heads_major.attention_impl = "heads_major"  # what "auto" ran on CPU before blockwise
    unrolled = transformer_config(512, 4, 8, (4, 16, 16), dtype=dt)
    unrolled.scan_unroll = unrolled.depth  # the layer loop unrolled (model.scan_unroll)
    # Each comparison: (a, b) timed alternately; the ratio is b's step time over a's. Each side
    # is a name and a function that builds its compiled step.
    def step(cfg, batch):
        return lambda: transformer_step_bench(cfg, batch)

    def tokenizer_step(spec, *switched_off):  # the tokenizer step, without the CPU forms named
        def build():
            with without_cpu_forms(*switched_off):
                return tokenizer_step_bench(spec, 8)
        return build

    comparisons = {"heads-major attention vs `jax.nn.dot_product_attention` (w512 x 4, seq 1026)":
                   (("heads-major", step(heads_major, 4)), ("dot_product_attention", step(before, 4))),
                   "blockwise attention (CPU default) vs heads-major (w512 x 4, seq 1026)":
                   (("blockwise", step(*configs["w512 x 4 layers, seq 1026"])), ("heads-major", step(heads_major, 4))),
                   "unrolled layer loop vs the rolled default (w512 x 4, seq 1026)":
                   (("unrolled", step(unrolled, 4)), ("rolled", step(*configs["w512 x 4 layers, seq 1026"])))}
    if not args.skip_tokenizers and cpu_kernels.available():
        for spec in ("configs/tokenizer/video.py:tiny", "configs/tokenizer/audio.py:tiny"):
            comparisons[f"CPU convolution kernels (the default) vs XLA's forms ({spec}, batch 8)"] = (
                ("kernels", tokenizer_step(spec)), ("XLA's forms", tokenizer_step(spec, "conv_kernels")))
    if gpu:
        big = {"grid": (5, 16, 16), "vocab": 2**10 * 16, "dtype": dt}
        remat = "dots_with_no_batch_dims_saveable"
        xla_attention = transformer_config(1024, 24, 16, remat=remat, **big)
        xla_attention.attention_impl = "dot_product_attention"  # what "auto" ran on GPU before cuDNN
        # L several ways, to say what bounds it: no remat (nothing recomputed: the
        # model-FLOP ceiling of this step), twice the batch.
        configs = {"B (768x12)": (transformer_config(768, 12, 12, remat="none", **big), 32),
                   "L (1024x24)": (transformer_config(1024, 24, 16, remat=remat, **big), 32),
                   "L, no remat": (transformer_config(1024, 24, 16, remat="none", **big), 32),
                   "L, batch 64": (transformer_config(1024, 24, 16, remat=remat, **big), 64)}
        comparisons = {"L: cuDNN attention vs attention in XLA": (("cuDNN", step(*configs["L (1024x24)"])),
                                                                  ("XLA", step(xla_attention, 32)))}
    if args.quick:
        configs = dict(list(configs.items())[:1])
        comparisons = {}
    results["transformer"] = {}
    for name, (cfg, batch) in configs.items():
        print(f"transformer {name} ...", flush=True)
        results["transformer"][name] = t = measured(
            lambda: timed_row(transformer_step_bench(cfg, batch), peak, reps, args.tolerance,
                              profile("transformer_" + name)))
        if "error" not in t:
            print(f"  {t['step_s']['median']:.4f} s/step, {t['units_per_s']:.0f} tokens/s, MFU "
                  f"{t['fraction_of_peak']['median']:.1%} (peak spread {t['peak_spread']:.0%}"
                  f"{'' if t['reliable'] else ', unreliable'}), compile {t['first_compile_s']:.1f} s", flush=True)
        save_partial()
    results["comparisons"] = {}
    for name, ((a_name, build_a), (b_name, build_b)) in comparisons.items():
        print(f"comparison {name} ...", flush=True)

        def compare():
            a, b = build_a(), build_b()
            a_t, b_t = harness.alternate([a["call"], b["call"]], reps)
            return {"a": a_name, "b": b_name, "a_s": harness.summary(a_t), "b_s": harness.summary(b_t),
                    "ratio": harness.ratio_per_round(a_t, b_t)}

        results["comparisons"][name] = measured(compare)
        save_partial()
    print("compile scaling ...", flush=True)
    d4 = compile_time(transformer_config(256, 4, 4, (3, 8, 8)), 2)
    d24 = compile_time(transformer_config(256, 24, 4, (3, 8, 8)), 2)
    results["compile_scaling"] = {"depth4_s": d4, "depth24_s": d24, "ratio": d24 / d4}
    save_partial()
    print("sampling ...", flush=True)
    # On a GPU the tiny model's decoding steps are kernel-launch bound (7 ms vs 3 ms on an
    # H200): sample the B model there, where the step's compute decides the ratio.
    if gpu:
        sample_cfg, sample_batch = transformer_config(768, 12, 12, **big), 16
    else:
        sample_cfg, sample_batch = transformer_config(256, 4, 4, (3, 8, 8), dtype=dt), 4
    results["sampling"] = measured(lambda: sampling_bench(sample_cfg, sample_batch, 12, reps))
    save_partial()
    results["tokenizers"] = {}
    if not args.skip_tokenizers:
        for spec in ("configs/tokenizer/video.py:tiny", "configs/tokenizer/audio.py:tiny"):
            print(f"tokenizer {spec} ...", flush=True)
            results["tokenizers"][spec] = measured(
                lambda: timed_row(tokenizer_step_bench(spec, 8), peak, max(3, reps // 2), args.tolerance,
                                  profile("tokenizer_" + os.path.basename(spec))))
            save_partial()
    write_markdown(results, args.out)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One benchmark run: matmul peak, train steps (transformer, tokenizers), sampling, compile.

    python -m benchmarks.run [--quick] [--out BENCHMARKS.md] [--json benchmarks/results.json] [--profile DIR]

Everything is measured in this one process, so ratios (MFU = achieved model FLOP/s
over the same run's matmul peak; sampling overhead; compile scaling) compare like
with like. MFU counts model FLOPs only (6 * matmul params + attention per token for
the transformer, docs/ALGORITHMS.md "Scale"; XLA's cost model of the forward x 3 for
the tokenizers), so rematerialised recomputation lowers it, as it should.
Timings come from wall clock after a warm-up step, with ``block_until_ready``.
``--profile DIR`` also traces each timed train-step section with ``jax.profiler``
(``DIR/<section>/``, one ``StepTraceAnnotation`` per call; ``tools/profile_summary.py DIR/<section>``
lists its top ops); those timings then include the profiler's overhead.
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
from mmgen.parallel import runtime
from mmgen.generative import masking, sampling, tasks
from mmgen.generative import transformer as tr
from mmgen.train import optim


def _block(tree):
    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


PROFILE_DIR = None  # --profile: the timed calls of a section with a label are traced into PROFILE_DIR/<label>


def time_calls(fn, *args, warmup=1, iters=5, label=None):
    """Best and median wall seconds per call of ``fn(*args)`` after ``warmup`` calls.

    With ``--profile`` and a ``label``, the timed calls are traced (one step annotation each).
    """
    for _ in range(warmup):
        _block(fn(*args))
    trace = os.path.join(PROFILE_DIR, label) if PROFILE_DIR and label else None
    if trace:
        jax.profiler.start_trace(trace, create_perfetto_trace=True)
    times = []
    try:
        for i in range(iters):
            t = time.perf_counter()
            with jax.profiler.StepTraceAnnotation(label or "call", step_num=i):
                _block(fn(*args))
            times.append(time.perf_counter() - t)
    finally:
        if trace:
            jax.profiler.stop_trace()
    return float(np.min(times)), float(np.median(times))


def _label(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:
        return None


# ------------------------------------------------------------------ matmul peak
def matmul_peak(dtype, n: int, iters: int) -> float:
    """FLOP/s of a square n^3 matmul in ``dtype`` (best of ``iters``): the reference peak."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a, b: a @ b)
    best, _ = time_calls(f, a, b, warmup=2, iters=iters)
    return 2.0 * n**3 / best


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


def transformer_step_bench(cfg, batch: int, iters: int, label: str | None = None) -> dict:
    """Masked-token training step (masking + fwd + bwd + AdamW) on video tokens only."""
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

    def run_once():
        holder["st"], loss = compiled(holder["st"], tokens, jax.random.key(2))
        return loss

    best, median = time_calls(run_once, warmup=1, iters=iters, label=label)
    flops = tr.flops_per_token(cfg, seq) * batch * seq
    return {"seq_len": seq, "batch": batch, "params": tr.param_count(cfg), "step_s": best, "step_s_median": median,
            "tokens_per_s": batch * seq / best, "flops_per_s": flops / best, "first_compile_s": compile_s,
            "peak_bytes": peak_bytes(compiled)}


def compile_time(cfg, batch: int) -> float:
    t0 = time.perf_counter()
    state = nnx.eval_shape(lambda: _TrainState(cfg, nnx.Rngs(0)))
    graphdef, st = nnx.split(state)
    tokens = jax.ShapeDtypeStruct((batch, *cfg.video_grid), jnp.int32)
    task_ids = jnp.zeros((batch,), jnp.int32)

    jax.jit(masked_token_step(cfg, graphdef, task_ids)).lower(st, tokens, jax.random.key(0)).compile()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ sampling
def sampling_bench(cfg, batch: int, steps: int, iters: int) -> dict:
    model = nnx.jit(lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0)))()
    rng = jax.random.key(0)
    sampling.sample(model, "unconditional", None, rng, steps=steps, batch_size=batch)  # compile
    sample_s, _ = time_calls(lambda: sampling.sample(model, "unconditional", None, rng, steps=steps,
                                                     batch_size=batch)["video"], warmup=1, iters=iters)
    tokens = jnp.full((batch, *cfg.video_grid), cfg.video_vocab, jnp.int32)
    task_ids = jnp.full((batch,), tasks.task_id("unconditional"), jnp.int32)

    graphdef, params = nnx.split(model)

    @jax.jit
    def twelve_forwards(params, tokens):
        def body(i, carry):  # parameters ride in the carry, as in sampling's loop
            params, tokens = carry
            logits = nnx.merge(graphdef, params)({"video": tokens}, task_ids)["video"]
            # Feed the prediction back so XLA cannot hoist the forward out of the loop.
            return params, jnp.argmax(logits[..., 0, :], axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (params, tokens))[1]

    fwd_s, _ = time_calls(twelve_forwards, params, tokens, warmup=1, iters=iters)
    return {"steps": steps, "batch": batch, "sample_s": sample_s, "bare_forwards_s": fwd_s,
            "overhead": sample_s / fwd_s}


# ------------------------------------------------------------------ tokenizers
def tokenizer_step_bench(spec: str, batch: int, iters: int, label: str | None = None) -> dict:
    from mmgen import config as config_lib
    from mmgen.families import tokenizer as tok
    from mmgen.train import loop

    cfg = config_lib.load_config(spec, [f"batch_size={batch}", "gan.start_step=0"])
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

    def run_once():
        holder["st"], loss = compiled(holder["st"], batch_np, jax.random.key(1))
        return loss

    best, median = time_calls(run_once, warmup=1, iters=iters, label=label)
    flops = tok.flops_per_example(cfg) * batch
    return {"config": spec, "batch": batch, "step_s": best, "step_s_median": median, "clips_per_s": batch / best,
            "model_flops_per_s": flops / best, "first_compile_s": compile_s, "peak_bytes": peak_bytes(compiled)}


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


def write_markdown(results: dict, path: str) -> None:
    r = results
    peak = r["matmul_peak_flops"]
    lines = [
        "# Benchmarks",
        "",
        "Every figure below was measured by `python -m benchmarks.run"
        + (" --quick" if r["quick"] else "") + "` in one process; MFU is achieved model FLOP/s over the "
        "matmul peak measured in the same run (CPU: fp32; GPU: bf16). Timing is the best of several calls "
        "after a warm-up; the machine may have been shared, so compare ratios from one run.",
        "",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- devices: {r['devices']}",
        f"- versions: jax {r['versions']['jax']}, flax {r['versions']['flax']}, mmgen {r['versions']['mmgen']}",
        f"- matmul peak ({r['peak_dtype']}, {r['matmul_n']}^3): **{peak / 1e9:.1f} GFLOP/s** (the larger of the "
        f"readings at the start, {r.get('matmul_peak_flops_start', peak) / 1e9:.1f}, and the end, "
        f"{r.get('matmul_peak_flops_end', peak) / 1e9:.1f})",
        "",
        "## Transformer train step (masking + forward + backward + AdamW)",
        "",
        "| config | params | batch x seq | step (s) | tokens/s | GFLOP/s | MFU | first compile (s) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in r["transformer"].items():
        if "error" in t:
            lines.append(f"| {name} | failed: {t['error']} |")
            continue
        lines.append(f"| {name} | {t['params'] / 1e6:.1f}M | {t['batch']} x {t['seq_len']} | {t['step_s']:.3f} | "
                     f"{t['tokens_per_s']:.0f} | {t['flops_per_s'] / 1e9:.1f} | {t['flops_per_s'] / peak:.1%} | "
                     f"{t['first_compile_s']:.1f} | {_fmt_bytes(t['peak_bytes'])} |")
    c = r["compile_scaling"]
    lines += ["", "## Compile time vs depth (layers under `nnx.scan`)", "",
              f"- 4 layers: {c['depth4_s']:.1f} s; 24 layers: {c['depth24_s']:.1f} s; ratio **{c['ratio']:.2f}x**", ""]
    s = r["sampling"]
    lines += ["## Sampling (MaskGIT, decoding loop inside one jit)", ""]
    if "error" in s:
        lines += [f"- failed: {s['error']}", ""]
    else:
        lines += [(f"- {s['steps']} decoding steps, batch {s['batch']}: {s['sample_s']:.3f} s; {s['steps']} bare "
                   f"forward passes: {s['bare_forwards_s']:.3f} s; overhead **{s['overhead']:.2f}x**"), ""]
    lines += ["## Tokenizer train steps (generator + discriminator + EMA)", "",
              "| config | batch | step (s) | clips/s | model GFLOP/s | fraction of matmul peak | first compile (s) | peak memory |",
              "|---|---|---|---|---|---|---|---|"]
    for name, t in r["tokenizers"].items():
        if "error" in t:
            lines.append(f"| {name} | failed: {t['error']} |")
            continue
        lines.append(f"| {t['config']} | {t['batch']} | {t['step_s']:.3f} | {t['clips_per_s']:.2f} | "
                     f"{t['model_flops_per_s'] / 1e9:.2f} | {t['model_flops_per_s'] / peak:.1%} | "
                     f"{t['first_compile_s']:.1f} | {_fmt_bytes(t['peak_bytes'])} |")
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
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--json", default="benchmarks/results.json")
    p.add_argument("--skip-tokenizers", action="store_true")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="trace each train-step section's timed calls with jax.profiler into DIR/<section>")
    args = p.parse_args(argv)
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    runtime.set_flags()
    iters = 2 if args.quick else 5
    gpu = jax.default_backend() == "gpu"
    peak_dtype = jnp.bfloat16 if gpu else jnp.float32
    n = 8192 if gpu else 2048
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "versions": {"jax": jax.__version__, "flax": __import__("flax").__version__, "mmgen": mmgen.__version__},
        "quick": args.quick, "peak_dtype": jnp.dtype(peak_dtype).name, "matmul_n": n,
    }

    def save_partial():  # after each section, so a run cut short keeps what it measured
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)

    print("matmul peak ...", flush=True)
    results["matmul_peak_flops"] = matmul_peak(peak_dtype, n, iters=max(iters, 5))
    dt = "bfloat16" if gpu else "float32"
    before = transformer_config(512, 4, 8, (4, 16, 16), dtype=dt)
    before.attention_impl = "dot_product_attention"  # the form every backend used before heads_major
    configs = {"tiny (128x2)": (transformer_config(128, 2, 4, (3, 8, 8), dtype=dt), 8),
               "w512 x 4 layers, seq 1026": (transformer_config(512, 4, 8, (4, 16, 16), dtype=dt), 4),
               "same, attention via jax.nn.dot_product_attention": (before, 4),
               "w512 x 4 layers, 4 heads of 128, seq 1026": (transformer_config(512, 4, 4, (4, 16, 16), dtype=dt), 4)}
    if gpu:
        big = {"grid": (5, 16, 16), "vocab": 2**10 * 16, "dtype": dt}
        remat = "dots_with_no_batch_dims_saveable"
        xla_attention = transformer_config(1024, 24, 16, remat=remat, **big)
        xla_attention.attention_impl = "dot_product_attention"  # what "auto" ran on GPU before cuDNN
        # L several ways, to say what bounds it: attention (cuDNN vs XLA), no remat (nothing
        # recomputed: the model-FLOP ceiling of this step), twice the batch.
        configs = {"B (768x12)": (transformer_config(768, 12, 12, remat="none", **big), 32),
                   "L (1024x24)": (transformer_config(1024, 24, 16, remat=remat, **big), 32),
                   "L, attention in XLA (before)": (xla_attention, 32),
                   "L, no remat": (transformer_config(1024, 24, 16, remat="none", **big), 32),
                   "L, batch 64": (transformer_config(1024, 24, 16, remat=remat, **big), 64)}
    results["transformer"] = {}
    for name, (cfg, batch) in configs.items():
        print(f"transformer {name} ...", flush=True)
        results["transformer"][name] = t = measured(transformer_step_bench, cfg, batch, iters,
                                                     "transformer_" + _label(name))
        if "error" not in t:
            print(f"  {t['step_s']:.4f} s/step, {t['tokens_per_s']:.0f} tokens/s, "
                  f"MFU {t['flops_per_s'] / results['matmul_peak_flops']:.1%}, compile {t['first_compile_s']:.1f} s",
                  flush=True)
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
    results["sampling"] = measured(sampling_bench, sample_cfg, sample_batch, 12, iters)
    save_partial()
    results["tokenizers"] = {}
    if not args.skip_tokenizers:
        for spec in ("configs/tokenizer/video.py:tiny", "configs/tokenizer/audio.py:tiny"):
            print(f"tokenizer {spec} ...", flush=True)
            results["tokenizers"][spec] = measured(tokenizer_step_bench, spec, 8, max(2, iters // 2),
                                                   "tokenizer_" + _label(os.path.basename(spec)))
    # The peak again at the end: the machine's speed drifts (load, clocks), and MFU divides
    # by the larger of the two readings, so it never flatters.
    results["matmul_peak_flops_start"] = results["matmul_peak_flops"]
    results["matmul_peak_flops_end"] = matmul_peak(peak_dtype, n, iters=max(iters, 5))
    results["matmul_peak_flops"] = max(results["matmul_peak_flops_start"], results["matmul_peak_flops_end"])
    save_partial()
    write_markdown(results, args.out)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""mmgen's masked-token train step against a PyTorch transformer of the same shape.

    pip install -r benchmarks/peers/requirements.txt        # torch (CPU) for this script
    python -m benchmarks.peers.transformer_torch [--width 512 --depth 4 --heads 8 --batch 4 --reps 7]

One driver, one process, both libraries on the same cores: after a warm-up the two
steps alternate call by call (``benchmarks.harness.alternate``), so a machine that
changes speed slows both alike, and the ratio is taken per round (median, min-max).

The peer is ``torch.nn.TransformerEncoder`` (pre-norm, GELU, MLP 4x width, no dropout)
between a token embedding (vocabulary + [MASK]) with learned positions and a linear
head, trained with AdamW on the cross-entropy of every position: the same matmuls as
mmgen's step, which additionally draws the MaskGIT mask, embeds the task and condition
tokens, and scores the masked positions. Both are charged the same model FLOPs
(``mmgen.generative.transformer.flops_per_token``), so the MFU columns compare like with
like; float32 on both sides. PyTorch uses as many threads as this process may run on
(restrict both with ``taskset -c 0`` for a one-core comparison).
"""

from __future__ import annotations

import argparse
import os

# PyTorch's OpenMP workers sleep between its steps instead of spinning on the cores the
# alternating JAX step needs (unset, they slowed mmgen's step by 1.3-1.4x on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from benchmarks import harness


def torch_step(width: int, depth: int, heads: int, seq: int, vocab: int, batch: int):
    """One AdamW step of the PyTorch peer, as a zero-argument call."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(harness.threads()["usable_cores"])

    class Peer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab + 1, width)
            self.pos = torch.nn.Parameter(torch.zeros(seq, width))
            layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                     batch_first=True, norm_first=True)
            self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, ids):
            return self.head(self.norm(self.blocks(self.embed(ids) + self.pos)))

    model = Peer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = np.random.default_rng(0)
    ids = torch.as_tensor(gen.integers(0, vocab, (batch, seq)))
    targets = torch.as_tensor(gen.integers(0, vocab, (batch, seq)))

    def call():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), help="video token grid T H W")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--scan-unroll", type=int, default=1,
                   help="mmgen's model.scan_unroll (layers per iteration of its layer loop; >= depth unrolls it)")
    args = p.parse_args(argv)

    from benchmarks import run
    from mmgen.parallel import runtime

    runtime.set_flags()
    cfg = run.transformer_config(args.width, args.depth, args.heads, tuple(args.grid), vocab=args.vocab)
    cfg.scan_unroll = args.scan_unroll
    ours = run.transformer_step_bench(cfg, args.batch)
    seq = ours["seq_len"]
    peer = torch_step(args.width, args.depth, args.heads, seq, args.vocab, args.batch)
    peak_call, peak_count = harness.matmul_call("float32", 2048)
    mmgen_t, torch_t, peak_t = harness.alternate([ours["call"], peer, peak_call], args.reps)
    peaks = [peak_count / t for t in peak_t]
    th = harness.threads()
    print(f"CPU: {harness.cpu_model()}; {th['usable_cores']} usable cores of {th['machine_cores']}; "
          f"load {th['load_1min']:.1f}; torch threads {th['usable_cores']}")
    print(f"shape: width {args.width} x {args.depth} layers x {args.heads} heads, seq {seq}, batch {args.batch}, fp32; "
          f"mmgen's scan_unroll {args.scan_unroll}")
    print(f"model FLOPs per step (charged to both): {ours['flops'] / 1e9:.1f} GFLOP")
    peak = max(peaks)
    for name, t in (("mmgen", mmgen_t), ("torch", torch_t)):
        s = harness.summary(t)
        print(f"{name}: {s['median']:.3f} s/step ({s['min']:.3f}-{s['max']:.3f}), "
              f"{ours['units'] / s['median']:.0f} tokens/s, {ours['flops'] / s['median'] / peak:.1%} of the run's "
              f"matmul peak")
    spread = (max(peaks) - min(peaks)) / max(peaks)
    r = harness.ratio_per_round(mmgen_t, torch_t)
    print(f"matmul peak (2048^3 fp32) read {args.reps}x between rounds: {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} "
          f"GFLOP/s (spread {spread:.0%}{', unreliable' if spread > harness.DEFAULT_TOLERANCE else ''})")
    print(f"mmgen's tokens/s over torch's, per round: {harness.ratio_text(r)}, "
          f"{r['n']} rounds")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    raise SystemExit(main())

"""mmgen's video tokenizer train step against magvit2-pytorch's at the same clip shape.

    python -m venv peer && peer/bin/pip install -r benchmarks/peers/requirements-magvit2.txt -e .
    peer/bin/python -m benchmarks.peers.tokenizer_magvit2 [--frames 17 --size 64 --batch 4 --reps 5]

One driver, one process, both libraries on the same cores (PyTorch gets as many threads
as this process may run on; ``taskset -c 0`` restricts both): after a warm-up the two
steps and a 2048^3 float32 matmul peak reading alternate call by call
(``benchmarks.harness.alternate``), and the speed ratio is taken per round.

Both steps are the generator half of tokenizer training, float32, Adam: encode, quantize
with LFQ over 2^10 codes, decode, reconstruction loss plus the quantizer's entropy and
commitment terms, backward, update. No GAN and no perceptual loss on either side.

- mmgen: ``configs/tokenizer/video.py:tiny,gan=0`` at ``frames x size x size`` (three
  levels of 16, 32, 32 channels, one residual block of two 3x3x3 causal convs per level,
  strided 3D convs down by 2 in time and space twice: 17x64x64 -> 5x16x16).
- magvit2-pytorch (``VideoTokenizer``, its own default residual unit: a 3x3x3 causal
  conv, a 1x1x1 conv and squeeze-excite): the same widths and downsampling, one of its
  residual units where mmgen has a block (``--peer-units``; 104 GFLOP per step at
  17x64x64 against mmgen's 93, so the peer does slightly more work), its ``compress_space`` and
  ``compress_time`` layers, 3x3x3 input and output convs, ``use_gan=False``,
  ``perceptual_loss_weight=0``.

Each side's convolution and matmul FLOPs per step (fwd + bwd) are printed, so a reader
sees whether the two did the same work: ``torch.utils.flop_counter`` for the peer,
``mmgen.families.tokenizer.flops_per_example`` for mmgen (the same convention: 2 FLOPs
per multiply-add of every conv and matmul, backward twice the forward), with XLA's cost
analysis of the compiled step beside it.
"""

from __future__ import annotations

import argparse
import os

# PyTorch's OpenMP workers sleep between its steps instead of spinning on the cores the
# alternating JAX step needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from benchmarks import harness


def peer_step(frames: int, size: int, batch: int, units: int):
    """One Adam step of magvit2-pytorch's tokenizer, as a zero-argument call, and its FLOPs."""
    import torch
    from magvit2_pytorch import VideoTokenizer
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    torch.set_num_threads(harness.threads()["usable_cores"])
    res = ("consecutive_residual", units)
    model = VideoTokenizer(
        image_size=size, init_dim=16, codebook_size=2 ** 10,
        layers=(res, ("compress_space", 32), "compress_time", res, ("compress_space", 32), "compress_time", res),
        input_conv_kernel_size=(3, 3, 3), output_conv_kernel_size=(3, 3, 3),
        use_gan=False, perceptual_loss_weight=0.0, flash_attn=False,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    video = torch.as_tensor(np.random.default_rng(0).uniform(-1, 1, (batch, 3, frames, size, size)),
                            dtype=torch.float32)

    def call():
        opt.zero_grad(set_to_none=True)
        loss, _ = model(video, return_loss=True)
        loss.backward()
        opt.step()
        return loss.item()

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model(video, return_loss=True)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    return call, counter.get_total_flops(), params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peer-units", type=int, default=1, help="magvit2-pytorch residual units per mmgen block")
    args = p.parse_args(argv)

    from benchmarks import run
    from mmgen.parallel import runtime

    runtime.set_flags()
    spec = "configs/tokenizer/video.py:tiny,gan=0"
    ours = run.tokenizer_step_bench(spec, args.batch, (f"dataset.frames={args.frames}",
                                                       f"dataset.resolution={args.size}"))
    ours_flops = ours["flops"]
    peer, peer_flops, peer_params = peer_step(args.frames, args.size, args.batch, args.peer_units)
    peak_call, peak_count = harness.matmul_call("float32", 2048)
    mmgen_t, peer_t, peak_t = harness.alternate([ours["call"], peer, peak_call], args.reps)
    peaks = [peak_count / t for t in peak_t]
    peak = max(peaks)
    th = harness.threads()
    print(f"CPU: {harness.cpu_model()}; {th['usable_cores']} usable cores of {th['machine_cores']}; "
          f"load {th['load_1min']:.1f}; torch threads {th['usable_cores']}")
    print(f"clip {args.frames}x{args.size}x{args.size}, batch {args.batch}, float32, generator step (no GAN)")
    print(f"mmgen: {spec}, {ours['params'] / 1e6:.2f} M parameters, {ours_flops / 1e9:.1f} GFLOP per step "
          f"(convs and matmuls, fwd + bwd; XLA's cost analysis of the compiled step: "
          f"{(ours['compiled_flops'] or float('nan')) / 1e9:.1f}); compile {ours['first_compile_s']:.0f} s")
    print(f"magvit2-pytorch: {peer_params / 1e6:.2f} M parameters, {peer_flops / 1e9:.1f} GFLOP per step "
          f"(torch flop counter, fwd + bwd)")
    for name, t, flops in (("mmgen", mmgen_t, ours_flops), ("magvit2-pytorch", peer_t, peer_flops)):
        s = harness.summary(t)
        print(f"{name}: {s['median']:.3f} s/step ({s['min']:.3f}-{s['max']:.3f}), "
              f"{args.batch / s['median']:.2f} clips/s, {flops / s['median'] / peak:.1%} of the run's matmul peak")
    spread = (max(peaks) - min(peaks)) / max(peaks)
    r = harness.ratio_per_round(mmgen_t, peer_t)
    print(f"matmul peak (2048^3 fp32) read {args.reps}x between rounds: {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} "
          f"GFLOP/s (spread {spread:.0%}{', unreliable' if spread > harness.DEFAULT_TOLERANCE else ''})")
    print(f"mmgen's clips/s over magvit2-pytorch's, per round: {harness.ratio_text(r)}, "
          f"{r['n']} rounds")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    raise SystemExit(main())

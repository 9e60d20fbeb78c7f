"""Plot of the LFQ vocabulary ablation (docs/RESULTS.md "LFQ vocabulary size").

    python docs/results/lfq_vocab_plot.py OUT.png BITS=WORKDIR [BITS=WORKDIR ...]

Reads each tokenizer workdir's ``eval.json`` (written by ``python -m mmgen eval``) and
draws test PSNR (with its standard error), SSIM and codebook usage against the number of
LFQ bits K (vocabulary 2^K).
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from evals import read_evals


def main(out: str, pairs: list[str]) -> None:
    points = sorted(((int(bits), e) for bits, e in read_evals(pairs)), key=lambda p: p[0])
    bits = [b for b, _ in points]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].errorbar(bits, [e["psnr"] for _, e in points], yerr=[e["psnr_stderr"] for _, e in points],
                     marker="o", capsize=3)
    axes[0].set_ylabel("test PSNR (dB)")
    axes[1].plot(bits, [e["ssim"] for _, e in points], marker="o")
    axes[1].set_ylabel("test SSIM")
    axes[2].plot(bits, [100 * e["codebook_usage"] for _, e in points], marker="o", label="usage %")
    axes[2].set_ylabel("codebook usage (%)")
    for ax in axes:
        ax.set_xlabel("LFQ bits K (vocabulary 2^K)")
        ax.set_xticks(bits)
        ax.grid(alpha=0.3)
    fig.suptitle(f"tiny video tokenizer, LFQ, step {points[0][1].get('step')} (moving_shapes_av/tiny test split)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Spectrograms of original and reconstructed sounds side by side, one row per pair.

    python docs/results/audio_spectrograms.py OUT.png ORIG.wav RECON.wav [ORIG.wav RECON.wav ...]

e.g. with the wavs ``mmgen eval`` writes for an audio tokenizer workdir:
``runs/atok/eval/clip{0..3}_{orig,recon}.wav``.
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmgen.data.media import read_wav  # noqa: E402


def main(out: str, paths: list[str]) -> None:
    if not paths or len(paths) % 2:
        raise SystemExit("give pairs of ORIG.wav RECON.wav")
    pairs = list(zip(paths[::2], paths[1::2]))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 2.2 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        for ax, path, title in zip(row, pair, ("original", "reconstruction")):
            audio, rate = read_wav(path)
            ax.specgram(np.asarray(audio, np.float64).reshape(-1), NFFT=512, Fs=rate, noverlap=384, cmap="magma",
                        vmin=-120)
            ax.set_ylim(0, 4000)
            ax.set_title(f"{title}: {path.rsplit('/', 1)[-1]}", fontsize=8)
            ax.set_xlabel("s", fontsize=7)
            ax.set_ylabel("Hz", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

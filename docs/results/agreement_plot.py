"""Does the picture set the sound and the sound the picture? Heights read from generated
samples against the true heights, for a generative workdir trained on the audio-visual tasks.

    python docs/results/agreement_plot.py WORKDIR OUT.png [NUM_CLIPS]

Samples ``video_to_audio`` and ``audio_to_video`` on the first NUM_CLIPS (default 64)
test clips (seed 1, as ``mmgen eval``), reads the height from the generated sound's pitch
and from the generated video's main shape (``mmgen.eval.generative_eval``'s estimators),
and plots them per frame against the true height, next to the same with the clips
shuffled (what no agreement looks like), plus four clips' trajectories.
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mmgen.eval import generative_eval as ge
from mmgen.families.generative import load_generator
from mmgen.generative.generator import read_split


def main(workdir: str, out: str, num: int = 64) -> None:
    g = load_generator(workdir)
    d = g.cfg.dataset
    clips = read_split(g.cfg, "test", num, extra_features="main_y")
    truth = clips["main_y"][:num]
    sound = g.sample_task("video_to_audio", num, seed=1, clips=clips, progress=True)
    picture = g.sample_task("audio_to_video", num, seed=1, clips=clips, progress=True)
    heights = {"height from the generated sound (video_to_audio)":
               ge.audio_heights(sound.audio, int(d.frames), float(d.fps), int(d.sample_rate)),
               "height of the generated shape (audio_to_video)": ge.video_heights(picture.video)}
    shuffled = np.roll(truth, 1, axis=0)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (title, est) in zip(axes[:2], heights.items()):
        for ref, colour, label in ((shuffled, "0.7", "another clip's height"), (truth, "C0", "own clip's height")):
            ok = np.isfinite(est)
            mae = float(np.mean(np.abs(est[ok] - ref[ok])))
            ax.scatter(ref[ok], est[ok], s=4, alpha=0.5, color=colour, label=f"{label}: MAE {mae:.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="true height (0 = top)", ylabel="height read from the sample")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    sound_h, video_h = heights.values()
    t = np.arange(truth.shape[1])
    for i in range(4):
        c = f"C{i}"
        axes[2].plot(t, truth[i], color=c, lw=1.5)
        axes[2].plot(t, sound_h[i], "o", color=c, ms=4)
        axes[2].plot(t, video_h[i], "x", color=c, ms=5)
    axes[2].set(ylim=(1, 0), xlabel="frame", ylabel="height (0 = top)")
    axes[2].set_title("4 clips: true height (line), read from the\ngenerated sound (o) and generated shape (x)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))

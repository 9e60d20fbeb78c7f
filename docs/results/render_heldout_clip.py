"""Render the held-out clip the tokenizer results use with ``python -m mmgen tokenize``.

A ``moving_shapes_av`` clip drawn from a seed no split uses, at a size and rates the
tiny tokenizers never saw (64x64 pixels, 24 fps, 2 s, 44.1 kHz sound), so ``tokenize``
has to resample, resize and cut it like any user's file:

    python docs/results/render_heldout_clip.py /tmp/heldout.mp4 /tmp/heldout.wav
"""

import sys

import numpy as np

from mmgen.data import media
from mmgen.data.builders.moving_shapes_av import generate_clip

SEED = 20250  # the splits draw from (0, split, i)
FPS, SECONDS, RESOLUTION, SAMPLE_RATE = 24, 2, 64, 44100


def main(mp4_path: str, wav_path: str) -> None:
    clip = generate_clip(np.random.default_rng(SEED), frames=FPS * SECONDS, resolution=RESOLUTION, fps=FPS,
                         sample_rate=SAMPLE_RATE)
    media.write_video(mp4_path, clip["video"], fps=FPS, audio=clip["audio"], sample_rate=SAMPLE_RATE)
    stereo = np.stack([clip["audio"], 0.5 * clip["audio"]], axis=1)  # a stereo file, as users have
    media.write_wav(wav_path, stereo, sample_rate=SAMPLE_RATE)
    print(f"wrote {mp4_path} and {wav_path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Does a video tokenizer carry the main shape's height? Token probe and pixel estimator on its round trip.

    python docs/results/video_height_probe.py VIDEO_TOKENIZER_WORKDIR DATA_DIR ["{'max_distractors': 0}"]

On ``moving_shapes_av/tiny`` (with the builder overrides given, built in DATA_DIR when
missing): a ridge probe (``HeightProbe``) from the code vectors of 1024 train clips'
tokens to the main shape's height, read out on 200 test clips; the pixel height
estimator (``video_heights``) on the real test clips and on the tokenizer's round trip
of them; the round trip's PSNR. Each line is ``agreement``'s dict (error, shuffled,
r, paired gain). Used in docs/RESULTS.md ("From frames to clips", "Agreement: more
distinct clips, a plainer picture").
"""

import ast
import sys

import jax
import numpy as np

from mmgen.data.builders import sources
from mmgen.eval.generative_eval import (
    HeightProbe,
    agreement,
    token_features,
    video_heights,
)
from mmgen.families import tokenizer as tokenizers
from mmgen.parallel import runtime

CHUNK = 50


def read(data_dir: str, overrides: dict, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    name = f"moving_shapes_av/{sources.derived_config_name('tiny', overrides)}"
    if sources.find_prepared(name, data_dir) is None:
        sources.build("moving_shapes_av", data_dir, config="tiny", overrides=overrides)
    source, _ = sources.open_split(name, split, data_dir)
    rows = [source[i] for i in range(num)]
    return np.stack([r["video"] for r in rows]), np.stack([r["main_y"] for r in rows])


def main(workdir: str, data_dir: str, overrides: str = "{}") -> None:
    overrides = ast.literal_eval(overrides)
    tokenizer = tokenizers.load(workdir, devices=jax.devices()[0])

    def encode(video):
        tokens, recons = [], []
        for i in range(0, len(video), CHUNK):
            t, _ = tokenizer.encode(video[i:i + CHUNK].astype(np.float32) / 127.5 - 1)
            tokens.append(np.asarray(t))
            recons.append(np.asarray(tokenizer.decode(t)))
        return np.concatenate(tokens), np.concatenate(recons)

    train_video, train_y = read(data_dir, overrides, "train", 1024)
    test_video, test_y = read(data_dir, overrides, "test", 200)
    train_tokens, _ = encode(train_video)
    test_tokens, recon = encode(test_video)
    probe = HeightProbe(token_features(tokenizer, train_tokens), train_y)
    show = lambda d: {k: round(v, 3) for k, v in d.items()}
    print("token probe", show(agreement(probe(token_features(tokenizer, test_tokens)), test_y)))
    print("pixels of real clips", show(agreement(video_heights(test_video), test_y)))
    recon_u8 = np.clip((recon + 1) * 127.5, 0, 255).round().astype(np.uint8)
    print("pixels of round trip", show(agreement(video_heights(recon_u8), test_y)))
    psnr = 10 * np.log10(1.0 / np.mean(((recon + 1) / 2 - test_video / 255.0) ** 2, axis=(1, 2, 3, 4)))
    print(f"round-trip psnr {psnr.mean():.2f}")


if __name__ == "__main__":
    runtime.set_flags()  # what every mmgen run sets where it starts
    main(*sys.argv[1:])

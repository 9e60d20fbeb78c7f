"""Workdirs on any filesystem (``mmgen.fs``): a ``gs://`` workdir is never mangled into a local path.

There is no bucket here, so ``fake_bucket`` stands one in: etils.epath's ``gs`` backend
(what every ``mmgen.fs`` call and Orbax's own file handling go through) and Orbax's
TensorStore spec for ``gs://`` paths (its array data) are pointed at a temporary folder,
``gs://bucket/x`` <-> ``ROOT/bucket/x``. Like an object store it has no append (``open(.., "a")``
fails). Everything mmgen does with the workdir string itself is the real code path, so a
``./gs:/bucket/...`` folder in the working directory, a failed append or a path that
skipped epath would show.
"""

import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

import mmgen  # noqa: F401
from mmgen import commands as cli
from mmgen import fs
from mmgen.errors import UserError
from mmgen.train import metrics as metrics_lib
from mmgen.train import workdir as workdir_lib


class _BucketBackend(epath_backend._OsPathBackend):
    """``gs://B/K`` as ``root/B/K``; as on a real object store, no append and no folder needed to write a key."""

    def __init__(self, root: str):
        self.root = root

    def local(self, p) -> str:
        s = os.fspath(p)
        assert s.startswith("gs://"), s
        return os.path.join(self.root, s[len("gs://"):])

    def url(self, local) -> str:
        return "gs://" + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise OSError(f"{path}: an object store cannot open {mode!r}")
        if "w" in mode:  # a key needs no folder before it
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.url(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for folder, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(folder), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """(root folder standing in for ``gs://``, working directory) with the ``gs`` backends patched."""
    root = tmp_path / "gcs"
    root.mkdir()
    backend = _BucketBackend(str(root))
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": backend.local(p)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return root, cwd


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fs.normalize("gs://bucket/run/") == "gs://bucket/run"
    assert fs.join("gs://bucket/run", "checkpoints", "3") == "gs://bucket/run/checkpoints/3"
    assert str(fs.path("gs://bucket/run") / "config.json") == "gs://bucket/run/config.json"
    assert fs.normalize("runs/x") == str(tmp_path / "runs" / "x")
    assert workdir_lib.output_paths("gs://bucket/run", 4) == ("gs://bucket/run/eval_step4.json",
                                                               "gs://bucket/run/eval_step4")
    with pytest.raises(UserError, match=r"^memory://x/run: no filesystem for memory://"):
        workdir_lib.check_workdir("memory://x/run")


def test_side_files_of_a_url_workdir_land_in_the_bucket(fake_bucket):
    root, cwd = fake_bucket
    url = "gs://bucket/side"
    workdir_lib.check_workdir(url)  # a probe written and removed through epath
    with workdir_lib.WorkdirLock(url) as lock:
        assert json.loads((root / "bucket/side/train.lock").read_text())["token"] == lock.token
        with pytest.raises(workdir_lib.WorkdirLocked, match="is in use by another train run"):
            workdir_lib.WorkdirLock(url).acquire()
    assert not (root / "bucket/side/train.lock").exists()
    writer = metrics_lib.MetricsWriter(url, tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    assert [r["step"] for r in metrics_lib.read_metrics(url)] == [1, 2, 3]
    metrics_lib.trim_metrics(url, 2)
    assert [r["step"] for r in metrics_lib.read_metrics(url)] == [1, 2]
    events = list((root / "bucket/side/tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents") and events[0].stat().st_size > 0
    assert sorted(p.name for p in (root / "bucket/side").iterdir()) == ["metrics.jsonl", "tensorboard"]
    assert os.listdir(cwd) == []


def test_unseen_workdir_names_the_processes_that_cannot_see_it():
    assert workdir_lib.unseen_message("/scratch/run", [True, True], ["a", "b"]) is None
    line = workdir_lib.unseen_message("/scratch/run", [True, False, True, False], ["h0", "h1", "h2", "h3"])
    assert line.startswith("--workdir /scratch/run is not shared by every host: processes 1 (h1), 3 (h3) of 4 "
                           "cannot see what process 0 (h0) writes there") and "\n" not in line


@pytest.mark.slow
def test_url_workdir_round_trips_through_train_resume_and_sample(fake_bucket, tokenizers):
    """train 2 steps into gs://bucket/run, resume to 3, sample from it into the bucket."""
    root, cwd = fake_bucket
    url = "gs://bucket/run"
    common = ["--config.model.depth=1", "--config.model.width=32", "--config.model.mlp_dim=64",
              "--config.model.num_heads=2", "--config.model.remat_policy='none'", "--config.batch_size=8",
              "--config.log_every=1", "--config.eval_every=0", "--config.progress=False",
              f"--config.tokenizers.video_workdir={tokenizers['video']}",
              f"--config.tokenizers.audio_workdir={tokenizers['audio']}"]
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs/generative/multitask.py:tiny,data_source=random_tokens")
    assert cli.main(["train", "--config", config, "--workdir", url, "--config.total_steps=2", *common]) == 0
    assert cli.main(["train", "--workdir", url, "--config.total_steps=3"]) == 0  # resumes with its config.json
    assert cli.main(["sample", "--workdir", url, "--task", "audio_video", "--num", "1", "--steps", "2",
                     "--out", f"{url}/samples"]) == 0

    run = root / "bucket" / "run"
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "3"]
    assert json.loads((run / "config.json").read_text())["total_steps"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert sorted(os.listdir(run / "samples")) == ["audio_video.gallery.json", "audio_video.png", "audio_video_000.mp4",
                                                   "audio_video_tokens.npz", "index.html"]  # the page too
    with np.load(run / "samples" / "audio_video_tokens.npz") as tokens:
        assert tokens["video_tokens"].shape == (1, 3, 8, 8)
    assert not (run / "train.lock").exists()
    assert os.listdir(cwd) == []  # nothing like ./gs:/bucket/run

"""``python -m mmgen prepare``: build a dataset into a TFDS data directory.

``prepare("moving_shapes_av", data_dir, config="tiny")`` generates the synthetic
audio-visual dataset; ``prepare("video_folder", data_dir, path=DIR, config="small")``
turns a folder of videos into clips; any other registered TFDS name is downloaded
and prepared by TFDS in ArrayRecord format (needs the network, and TensorFlow for
most video datasets). Progress is shown by tqdm bars (TFDS's example counter, and
per-video bars for folders) on a terminal, and by periodic log lines otherwise
(``mmgen.progress``); at the end one line says where the dataset went and
how many examples each split holds, then (folders) how the test split was made and the
files that were skipped and why.
Errors end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds

from mmgen.data import media
from mmgen.data.builders import sources, video_folder
from mmgen.progress import is_terminal


def _fail(message: str) -> int:
    print(f"mmgen prepare: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(args, overrides) -> int:
    return prepare(args.dataset, args.data_dir, path=args.path, config=args.builder_config)


def prepare(dataset: str, data_dir: str, path: str | None = None, config: str | None = None) -> int:
    """Build ``dataset`` (optionally "name/config") into ``data_dir``; returns an exit code."""
    try:
        base, config = sources.split_name(dataset, config)
    except ValueError as e:
        return _fail(str(e))
    if base == "video_folder" and not path:
        return _fail("video_folder needs --path DIR, the folder of videos (one subfolder per class)")
    if path and base != "video_folder":
        return _fail(f"--path is only used by video_folder, not {base}")
    name = f"{base}/{config}" if config else base
    if not is_terminal():  # TFDS's own bars would flood a log file; the per-video ones log lines (mmgen.progress)
        tfds.disable_progress_bar()
    if base in sources.OUR_BUILDERS and not config:
        name = f"{base}/{sources.OUR_BUILDERS[base].DEFAULT_BUILDER_CONFIG_NAME}"
    existing = sources.find_prepared(name, data_dir)
    if existing is not None:
        print(f"{name} is already prepared in {existing}; nothing to do (delete that folder to rebuild)")
        return 0
    print(f"preparing {name} in {data_dir} ...", flush=True)
    try:
        builder = sources.build(base, data_dir, config=config, path=path)
    except tfds.core.registered.DatasetNotFoundError:
        return _fail(
            f"TFDS has no builder {base!r} here (video datasets' builders need TensorFlow); prepare it on a "
            f"machine with TensorFlow: tfds build {base} --data_dir={data_dir} --file_format=array_record"
        )
    except (video_folder.VideoFolderError, media.MediaError, ValueError) as e:
        return _fail(str(e).splitlines()[0])
    except ImportError as e:
        return _fail(f"building {base} needs {e.name or e}; prepare it where that is installed, in ArrayRecord format")
    except OSError as e:
        return _fail(f"building {base} failed: {e}")
    splits = {name_: info.num_examples for name_, info in builder.info.splits.items()}
    counts = ", ".join(f"{split} {count} examples" for split, count in sorted(splits.items()))
    print(f"prepared {name} in {builder.data_dir}: {counts}")
    skipped = getattr(builder, "skipped", [])
    if base == "video_folder":
        print(builder.held_out)
        print(f"skipped {len(skipped)} file(s)" + (":" if skipped else ""))
        for relpath, reason in skipped:
            print(f"  {relpath}: {reason}")
    return 0

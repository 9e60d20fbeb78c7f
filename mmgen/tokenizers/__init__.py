"""Tokenizers: quantizers, the video (MAGVIT-v2) and audio (SoundStream) tokenizers.

``load(workdir)`` gives a trained tokenizer's API to everything downstream (the
generative trainer, ``sample``, ``tokenize``, ``eval``) from its workdir alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmgen.errors import UserError


@dataclasses.dataclass
class LoadedTokenizer:
    """A trained tokenizer (EMA weights when the run kept them), jitted once per shape.

    ``encode(x) -> (tokens, aux)`` and ``decode(tokens) -> x`` as in DESIGN.md; video
    ``x`` is float32 [-1, 1] ``[B, T, H, W, 3]``, audio float32 ``[B, S]``.
    """

    modality: str
    model: Any
    cfg: Any
    workdir: str
    step: int

    def __post_init__(self):
        self._encode = jax.jit(lambda m, x: m.encode(x, train=False))
        self._decode = jax.jit(lambda m, t: m.decode(t))

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def num_levels(self) -> int:
        return self.model.quantizer.num_levels

    def latent_shape(self, input_shape) -> tuple[int, ...]:
        return self.model.latent_shape(tuple(input_shape))

    def encode(self, x):
        x = jnp.asarray(x, jnp.float32)
        if self.modality == "video":
            self.model.check_video_shape(x.shape)
        else:
            self.model.check_audio_shape(x.shape)
        return self._encode(self.model, x)

    def decode(self, tokens):
        return self._decode(self.model, jnp.asarray(tokens, jnp.int32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        from mmgen.train.tokenizer import input_shape

        return input_shape(self.cfg)


def load(workdir: str, step: int | None = None, devices=None) -> LoadedTokenizer:
    """The tokenizer trained in ``workdir`` (newest checkpoint unless ``step``).

    ``devices`` says where the weights go: ``None`` lays them out as the run was
    trained (``cfg.mesh`` over every device); a ``jax.Device`` or a sequence of them
    puts them on a ``data``-only mesh of those devices (replicated, unless the run's
    sharding rules split weights over ``data``), e.g. a frozen tokenizer on one device
    beside the training step; a ``jax.sharding.Mesh`` lays them out on that mesh by the
    run's sharding rules.
    Encoding and decoding then run where the weights are.
    """
    from mmgen import config as config_lib
    from mmgen.parallel import mesh as mesh_lib
    from mmgen.train import loop
    from mmgen.train import tokenizer as family_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir} is not a tokenizer workdir (no config.json)")
    cfg = config_lib.from_json_file(path)
    if cfg.get("family") != "tokenizer":
        raise UserError(f"{workdir} holds a {cfg.get('family')!r} run, not a tokenizer")
    if devices is None or isinstance(devices, Mesh):
        mesh = devices
    else:
        mesh = mesh_lib.make_mesh({"data": -1}, [devices] if isinstance(devices, jax.Device) else devices)
    state = loop.load_state(family_lib.FAMILY, cfg, workdir, mesh=mesh, step=step)
    from mmgen.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, read_only=True)
    step = step if step is not None else ckpt.latest_step()
    ckpt.close()
    return LoadedTokenizer(cfg.modality, family_lib.inference_model(state), cfg, workdir, int(step))

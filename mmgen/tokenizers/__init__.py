"""Tokenizers: quantizers, the video (MAGVIT-v2) and audio (SoundStream) tokenizers.

``build(cfg, rngs)`` makes the tokenizer a config describes (``kinds``: one object per
kind of tokenizer, picked by ``cfg.modality``); ``LoadedTokenizer`` is a
trained one's API for everything downstream (``encode``/``decode``/``latent_shape``/
``vocab_size``). ``mmgen.families.tokenizer.load(workdir)`` gives one from a workdir or an
export directory alone; ``mmgen.load_tokenizer`` wraps it for uint8 clips (``mmgen.api.Tokenizer``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mmgen.parallel.distributed import host_value
from mmgen.tokenizers.kinds import TokenizerKind, kind


def build(cfg, rngs: nnx.Rngs):
    """The (untrained) tokenizer of a tokenizer config: ``cfg.modality`` picks its kind."""
    return kind(cfg.modality).build(cfg.model, rngs)


def input_shape(cfg) -> tuple[int, ...]:
    """One example's input shape: ``(1, T, H, W, 3)`` for video, ``(1, S)`` for audio."""
    return kind(cfg.modality).input_shape(cfg.dataset)


@dataclasses.dataclass
class LoadedTokenizer:
    """A trained tokenizer (EMA weights when the run kept them), jitted once per shape.

    ``encode(x) -> (tokens, aux)`` and ``decode(tokens) -> x``; video
    ``x`` is float32 [-1, 1] ``[B, T, H, W, 3]``, audio float32 ``[B, S]``. Weights spread
    over several processes give results whole on every process (``host_value``).
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
    def kind(self) -> TokenizerKind:
        return kind(self.modality)

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
        self.kind.check_input(self.model, x.shape)
        return jax.tree.map(host_value, self._encode(self.model, x))

    def decode(self, tokens):
        return host_value(self._decode(self.model, jnp.asarray(tokens, jnp.int32)))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return input_shape(self.cfg)

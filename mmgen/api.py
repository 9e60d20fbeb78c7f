"""The Python API, for notebooks and scripts: load trained models, use them, export them.

    import mmgen
    tok = mmgen.load_tokenizer("runs/vtok")        # a workdir or an export directory
    tokens = tok.encode(video)                     # uint8 [T, H, W, 3] or [B, T, H, W, 3]
    video = tok.decode(tokens)                     # uint8, the same shape
    gen = mmgen.load_generator("runs/gen")         # its tokenizers come along
    result = gen.sample(task="frame_prediction", inputs="clip.mp4", num=2)
    gen.save(result, "samples/")                   # mp4 with sound + PNG grid + tokens
    mmgen.export("runs/vtok", "exports/vtok")      # safetensors + config.json + README.md

``mmgen`` re-exports these names lazily (``import mmgen`` imports no JAX and changes no
setting); the loaders set the process-wide flags runs use (``mmgen.parallel.runtime``)
before building a model, so a notebook gets the command line's numbers. Errors a user
can fix (a path that is not a run, a wrong shape) are ``mmgen.errors.UserError`` with
one line saying what to do.
"""

from __future__ import annotations

import numpy as np

from mmgen.families import export as export_family
from mmgen.families import generative as generative_family
from mmgen.families import tokenizer as tokenizer_family
from mmgen.generative.generator import Generator
from mmgen.parallel import runtime
from mmgen.tokenizers import LoadedTokenizer


class Tokenizer:
    """A trained video or audio tokenizer (its EMA weights), for arrays in their natural ranges.

    Video: ``encode`` takes uint8 ``[T, H, W, 3]`` or ``[B, T, H, W, 3]`` (float input is taken
    as already in [-1, 1]) and gives int32 tokens ``[B, t, h, w]`` (``[t, h, w]`` for one clip);
    ``decode`` gives uint8 clips back. Audio: float32 ``[S]`` or ``[B, S]`` in [-1, 1] and int32
    tokens ``[B, frames, levels]``. ``loaded`` is the underlying ``LoadedTokenizer``
    (``encode`` -> ``(tokens, aux)`` on model-range floats), ``step`` the checkpoint step.
    """

    def __init__(self, loaded: LoadedTokenizer):
        self.loaded = loaded
        self.modality, self.cfg, self.step = loaded.modality, loaded.cfg, loaded.step

    def __repr__(self):
        return (f"Tokenizer({self.modality}, {self.loaded.workdir!r}, step {self.step}, "
                f"vocab {self.vocab_size} x {self.loaded.num_levels} level(s))")

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape the run was trained on: ``(1, T, H, W, 3)`` or ``(1, S)``."""
        return self.loaded.input_shape

    def _model_input(self, x) -> tuple[np.ndarray, bool]:
        x = np.asarray(x)
        one = x.ndim == self.loaded.kind.signal_ndim
        return np.asarray(self.loaded.kind.from_user(x[None] if one else x), np.float32), one

    def encode(self, x) -> np.ndarray:
        """Clips (or sounds) -> int32 tokens (see the class docstring for shapes)."""
        x, one = self._model_input(x)
        tokens, _ = self.loaded.encode(x)
        tokens = np.asarray(tokens)
        return tokens[0] if one else tokens

    def decode(self, tokens) -> np.ndarray:
        """Tokens -> uint8 clips ``[B, T, H, W, 3]`` (video) or float32 sounds ``[B, S]`` (audio)."""
        tokens = np.asarray(tokens)
        one = tokens.ndim == self.loaded.kind.token_ndim(self.loaded.model)
        out = self.loaded.kind.to_user(np.asarray(self.loaded.decode(tokens[None] if one else tokens)))
        return out[0] if one else out


def load_tokenizer(path: str, step: int | None = None, devices=None) -> Tokenizer:
    """The tokenizer of a workdir (checkpoint ``step``, default the newest that verifies) or an
    export directory; only its inference weights are read. ``devices``: as
    ``mmgen.families.tokenizer.load`` (default: the run's own layout over every device)."""
    runtime.set_flags()
    return Tokenizer(tokenizer_family.load(str(path), step=step, devices=devices))


def load_generator(path: str, step: int | None = None, overrides=()) -> Generator:
    """The ``Generator`` (``mmgen.generative.generator``) of a generative or adapter workdir, or of a
    generative export, with its tokenizers; ``overrides`` are ``"key=value"`` config changes
    (e.g. ``"sampling.steps=8"``). ``gen.sample(task=..., inputs=...)`` samples, ``gen.save`` writes files."""
    runtime.set_flags()
    return generative_family.load_generator(str(path), overrides=tuple(overrides), step=step)


def export(workdir: str, out: str, step: int | None = None) -> dict:
    """``mmgen export``: the run's inference weights (``model.safetensors``), ``config.json`` and a
    model card into the new directory ``out``; returns what was written (see ``mmgen.families.export``)."""
    runtime.set_flags()
    return export_family.export_run(str(workdir), str(out), step=step)

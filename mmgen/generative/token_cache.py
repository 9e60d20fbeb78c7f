"""Tokens computed once: the generative transformer's input without a tokenizer in the loop.

``data_source="token_cache"`` trains on the frozen tokenizers' tokens of every clip of
the split, computed once into ``cfg.token_cache`` (built on first use, or with
``build``), instead of tokenizing each batch on the fly. At tiny scale this makes a
step ~10x cheaper, since the tokenizers' encoders cost far more than the
transformer; at scale it is how MAGVIT-style models are trained.

What changes against ``data_source="tokenizers"``:

* the clips get the evaluation preprocessing (centre crop, no flip, no temporal
  jitter): one token array per clip, so no augmentation;
* each batch draws ``batch_size`` distinct clips at random (``default_rng([seed, i])``
  for batch ``i``: resuming gives the same batches);
* COMMIT needs the tokens of each task's condition clip. For a task whose every
  modality is given whole, generated or absent (``audio_to_video``,
  ``video_to_audio``, ``audio_video``, ``class_conditional``, ``unconditional``) that
  clip is the clip itself, so the cached tokens serve; a task with a partial condition
  (frame prediction, outpainting, continuation, ...) builds a different clip in pixel
  space and is refused (train it with ``data_source=tokenizers`` or
  ``conditioning=prefix``).

Files: ``<token_cache>/<split>.npz`` (``<m>_tokens``, ``label``, ``has_audio``) and
``<split>.json``, which records what made them (tokenizer workdirs and steps, dataset
layout); a cache made by other tokenizers or for other clips is an error, never reused.
Written to a temporary name and renamed, so a half-written cache is never read.
"""

from __future__ import annotations

import io
import json

import numpy as np

from mmgen import fs
from mmgen.data import pipeline
from mmgen.errors import UserError
from mmgen.generative import tasks as tasks_lib
from mmgen.generative import tokens as gen
from mmgen.progress import progress
from mmgen.train import workdir as workdir_lib

CHUNK = 64  # clips tokenized at once while building
DATASET_KEYS = ("name", "builder_config", "path", "data_dir", "frames", "resolution", "fps", "sample_rate")


def whole_modality_tasks() -> tuple[str, ...]:
    """Tasks whose COMMIT condition clip is the clip itself (no partial region anywhere)."""
    return tuple(name for name, task in tasks_lib.TASKS.items()
                 if all(task.role(m).kind != "partial" for m in ("video", "audio")))


def check_tasks(cfg, weights: dict) -> None:
    """``UserError`` for a trained task the cache cannot serve under COMMIT."""
    if cfg.conditioning != "commit":
        return
    refused = [name for name in weights if name not in whole_modality_tasks()]
    if refused:
        raise UserError(
            f"data_source=token_cache cannot build COMMIT condition clips for {refused} (their condition is part "
            f"of a clip); give them weight 0, or use data_source=tokenizers or conditioning=prefix")


def _origin(cfg, split: str) -> dict:
    """What a cache of ``split`` must have been made from to serve ``cfg``."""
    tokenizers = {}
    for m in gen.specs_of(cfg):
        workdir = fs.normalize(gen.tokenizer_workdir(cfg, m))
        tokenizers[m] = {"workdir": workdir, "step": workdir_lib.latest_step(workdir)}
    dataset = {k: cfg.dataset.get(k) for k in DATASET_KEYS}
    dataset["builder_overrides"] = pipeline.builder_overrides(cfg.dataset)
    return {"split": split, "tokenizers": tokenizers, "dataset": dataset}


def paths(cfg, split: str) -> tuple[str, str]:
    if not cfg.get("token_cache"):
        raise UserError("data_source=token_cache needs config.token_cache: a directory for the tokens "
                        "(built there on first use)")
    root = fs.normalize(cfg.token_cache)
    return fs.join(root, f"{split}.npz"), fs.join(root, f"{split}.json")


def check(cfg, split: str) -> bool:
    """True when the cache of ``split`` exists and was made for ``cfg``; ``UserError`` when it is stale."""
    tokens_path, origin_path = paths(cfg, split)
    if not fs.exists(tokens_path):
        return False
    want = _origin(cfg, split)
    have = json.loads(fs.read_text(origin_path))
    if have != want:
        diff = [k for k in want if have.get(k) != want[k]]
        raise UserError(f"the token cache {tokens_path} was made from other {' and '.join(diff)} "
                        f"({have.get(diff[0])} != {want[diff[0]]}); delete it or set another config.token_cache")
    return True


def build(cfg, split: str, load_tokenizers) -> str:
    """Tokenize every clip of ``split`` (evaluation preprocessing) into the cache; returns its path.

    ``load_tokenizers(cfg)`` gives the frozen tokenizers (modality -> ``LoadedTokenizer``);
    it is called only when the cache has to be built.
    """
    if check(cfg, split):
        return paths(cfg, split)[0]
    tokens_path, origin_path = paths(cfg, split)
    fs.makedirs(fs.normalize(cfg.token_cache))
    tokenizers = load_tokenizers(cfg)
    dataset = gen.clip_dataset_config(cfg)
    source, _ = pipeline.open_dataset(dataset, split)
    clips = pipeline.make_iterator(dataset, split=split, global_batch_size=1, seed=0, train=False,
                                   process_index=0, process_count=1, num_epochs=1)
    parts, pending = [], []

    def flush():
        batch = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        ids = np.zeros(len(pending), np.int32)  # no condition clips: the clip's own tokens serve
        toks = gen.tokenize_clips(cfg, tokenizers, batch.get("video"), batch.get("audio"), ids, None,
                                  with_condition=False)
        parts.append({**toks, "label": batch["label"].astype(np.int32), "has_audio": batch["has_audio"].astype(bool)})
        pending.clear()

    for clip in progress(clips, total=len(source), desc=f"token cache ({split})", unit="clip"):
        pending.append(clip)
        if len(pending) == CHUNK:
            flush()
    if pending:
        flush()
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fs.write_text(origin_path, json.dumps(_origin(cfg, split), indent=1))
    fs.write_bytes(tokens_path, buffer.getvalue())  # last, whole: the tokens exist only once complete
    return tokens_path


def load(cfg, split: str, load_tokenizers) -> dict:
    """The cached arrays of ``split`` (built first when missing, see ``build``)."""
    path = build(cfg, split, load_tokenizers)
    with np.load(io.BytesIO(fs.read_bytes(path))) as f:
        return {k: f[k] for k in f.files}


class CachedTokenBatches(gen.IndexedBatches):
    """Batches of cached tokens with tasks drawn as ``TokenBatches`` draws them; resumable.

    Training: batch ``i`` is ``batch_size`` distinct clips drawn by ``default_rng([seed, i])``.
    Evaluation (``num_batches``): consecutive clips from the start of the split.
    """

    def __init__(self, cfg, arrays: dict, *, seed: int, batch_size: int, process_index: int, process_count: int,
                 num_batches: int | None = None):
        super().__init__(cfg, seed=seed, batch_size=batch_size, process_index=process_index,
                         process_count=process_count, num_batches=num_batches)
        self.arrays = arrays
        self.num_clips = len(arrays["label"])
        if self.num_clips < self.global_batch:
            raise UserError(f"the token cache holds {self.num_clips} clips, fewer than batch_size={self.global_batch}")
        self.commit = cfg.conditioning == "commit"
        self.modalities = list(gen.specs_of(cfg))

    def __next__(self) -> dict:
        if self._exhausted():
            raise StopIteration
        if self.num_batches is None:
            rows = np.random.default_rng([self.seed, self.index, 2]).choice(self.num_clips, self.global_batch,
                                                                             replace=False)
        else:
            rows = np.arange(self.index * self.global_batch, (self.index + 1) * self.global_batch) % self.num_clips
        rows = rows[self.start:self.start + self.local_batch]
        ids, key_data = gen.draw_tasks(self.cfg, self.seed, self.index, self.global_batch)
        out = {}
        for m in self.modalities:
            out[f"{m}_tokens"] = self.arrays[f"{m}_tokens"][rows]
            if self.commit:
                out[f"{m}_condition"] = out[f"{m}_tokens"]
        out.update(gen.host_task_fields(key_data, ids, self.start, self.local_batch), label=self.arrays["label"][rows],
                   has_audio=self.arrays["has_audio"][rows])
        self.index += 1
        return out

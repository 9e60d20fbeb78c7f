"""A generative workdir whose token embeddings and heads start from the tokenizers' code vectors.

    python docs/results/codebook_embeddings.py OUT runs/gen/config.json
    python -m mmgen train --config ... --config.init_from=OUT      # the same model config

Each modality's embedding row of token ``i`` (per RVQ level for audio) becomes a fixed
random projection of the standardised code vector its tokenizer decodes ``i`` to, at the
transformer's embedding scale (std 0.02); the output head starts as the transposed table
at Xavier's scale, so logits rank codes by similarity in code space. Everything else is
the config's own initialisation. Used in docs/RESULTS.md ("Do picture and sound agree?").
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen import config as config_lib
from mmgen.families import generative as gen
from mmgen.families import tokenizer as tokenizers
from mmgen.generative import tokens
from mmgen.train import workdir as workdir_lib
from mmgen.train.checkpoint import Checkpointer
from mmgen.parallel import runtime


def code_vectors(cfg, modality: str) -> list[np.ndarray]:
    """One ``[vocab, code_dim]`` array per level (VQ / LFQ / FSQ: one; RVQ: one per level)."""
    quantizer = tokenizers.load(tokens.tokenizer_workdir(cfg, modality), devices=jax.devices()[0]).model.quantizer
    vocab = int(cfg.model[f"{modality}_vocab"])
    subs = list(quantizer.quantizers) if hasattr(quantizer, "quantizers") else [quantizer]
    return [np.asarray(q.indices_to_codes(jnp.arange(vocab)), np.float64) for q in subs]


def main(out: str, config_json: str) -> None:
    cfg = config_lib.from_json_file(config_json)
    state = gen.create_state(cfg, nnx.Rngs(cfg.seed))
    rng = np.random.default_rng(0)
    width = int(cfg.model.width)
    for m in tokens.specs_of(cfg):
        rows, levels = [], code_vectors(cfg, m)
        for codes in levels:
            z = (codes - codes.mean(0)) / (codes.std(0) + 1e-8)
            rows.append(0.02 * z @ rng.normal(0, 1 / np.sqrt(z.shape[1]), (z.shape[1], width)))
        table = np.concatenate(rows).astype(np.float32)
        state.model.token_embeddings[m].table.embedding.value = jnp.asarray(table)
        xavier = np.sqrt(2.0 / (width + table.shape[0]))
        state.model.heads[m].head.kernel.value = jnp.asarray(table.T * (xavier / table.std()), jnp.float32)
        print(f"{m}: {table.shape[0]} embedding rows from code vectors of {[c.shape for c in levels]}")
    workdir_lib.write_config(cfg, out)
    ckpt = Checkpointer(out, async_save=False)
    ckpt.save(0, nnx.state(state), force=True)
    ckpt.close()
    print(f"wrote {out}: train with --config.init_from={out}")


if __name__ == "__main__":
    runtime.set_flags()  # what every mmgen run sets where it starts
    main(*sys.argv[1:3])

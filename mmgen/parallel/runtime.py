"""The two process-wide JAX/Flax settings mmgen's numbers rely on, set where a run starts.

- ``flax_always_shard_variable=False``: parameters are created unsharded; their logical
  axis names are only recorded as metadata (``mmgen.parallel.sharding`` turns them into
  ``NamedSharding``s and the trainer initialises the state directly on devices).
- ``jax_threefry_partitionable=True``: PRNG keys split identically however the
  computation is partitioned, so a run gives the same numbers on 1 device and on a mesh
  of 8 (JAX's default since 0.5; set anyway, so an older default or a user's change
  cannot alter a run).

``import mmgen`` changes nothing; the command line (``mmgen.commands.main``), the Python
API's loaders (``mmgen.load_tokenizer`` / ``load_generator``), the training loop
(``mmgen.train.loop.run``, ``load_state_and_step``), ``plan`` and the benchmarks call
``set_flags()`` before they build a model.

``one_shot()`` gives the ``compiler_options`` for a function compiled to run once or a
few times (initialising the state, the finiteness check before a save, an eval's
pictures): on the CPU, XLA then skips LLVM's optimisation of the generated code, which
dominated those compiles (BENCHMARKS.md "Start-up of a run": the tiny video tokenizer's
state initialiser 9.2 s -> 2.7 s) and buys nothing for one call. XLA's own passes still
run. Other platforms compile as before.
"""

from __future__ import annotations

import flax
import jax


def one_shot(platform: str | None = None) -> dict:
    """``jax.jit``'s ``compiler_options`` for a function run once (``platform``: default JAX's backend)."""
    return {"xla_backend_optimization_level": 0} if (platform or jax.default_backend()) == "cpu" else {}


def set_flags() -> None:
    """Set both flags for this process (idempotent; cheap)."""
    flax.config.update("flax_always_shard_variable", False)
    jax.config.update("jax_threefry_partitionable", True)

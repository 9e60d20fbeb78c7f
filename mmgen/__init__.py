"""mmgen: multi-modal, multi-task masked generation of video and audio in JAX.

Importing the package fixes two process-wide settings every module relies on:
parameters are created unsharded (their logical axis names are only recorded as
metadata; ``mmgen.parallel.sharding`` turns them into ``NamedSharding``s and the
trainer initialises them directly on devices), and PRNG keys split identically
however the computation is partitioned (``jax_threefry_partitionable``), so a run
gives the same numbers on 1 device and on a mesh of 8.
"""

import flax
import jax

flax.config.update("flax_always_shard_variable", False)
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"

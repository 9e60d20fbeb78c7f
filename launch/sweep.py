#!/usr/bin/env python
"""Run, resume or summarise a hyper-parameter sweep (the same as ``mmgen sweep``; see ``mmgen.commands.sweep``).

    python launch/sweep.py --config configs/toy.py:tiny --root /tmp/sweep --parallel 2
    python launch/sweep.py --config configs/toy.py:tiny --root /tmp/sweep --summarize
    python launch/sweep.py --config configs/X.py --root /scratch/sweep --slurm   # writes submit_slurm.sh

Each point of the config's ``get_sweep()`` trains in ``ROOT/<point name>`` with
``python -m mmgen train --config C --workdir W --config.k=v ...``; a re-run only
trains the points whose workdir holds no ``DONE``. ``--train-cmd`` (or
``$MMGEN_SWEEP_TRAIN_CMD``) replaces the train program.
"""

import sys

from mmgen.commands.sweep import run

if __name__ == "__main__":
    sys.exit(run())

"""``python -m mmgen`` entry point; see ``mmgen/cli.py``."""

import sys

from mmgen.cli import main

sys.exit(main())

"""``python -m mmgen`` entry point; see ``mmgen/commands/__init__.py``."""

import sys

from mmgen.commands import main

sys.exit(main())

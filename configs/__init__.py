"""The shipped configs (installed as ``mmgen.configs``); see ``common.py``."""

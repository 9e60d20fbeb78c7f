"""mmgen: multi-modal, multi-task masked generation of video and audio in JAX.

The Python API (``mmgen.api``, imported on first use so ``import mmgen`` stays cheap and
changes no JAX/Flax setting)::

    import mmgen
    tok = mmgen.load_tokenizer("runs/vtok")      # a workdir or an export directory
    tokens = tok.encode(video)                   # uint8 [T, H, W, 3] or [B, T, H, W, 3]
    video = tok.decode(tokens)
    gen = mmgen.load_generator("runs/gen")
    result = gen.sample(task="frame_prediction", inputs="clip.mp4", num=2)
    mmgen.export("runs/vtok", "exports/vtok")    # safetensors + config.json + README.md

The process-wide settings runs rely on are set where runs start
(``mmgen.parallel.runtime.set_flags``), not here.
"""

__version__ = "0.1.0"

_API = ("load_tokenizer", "load_generator", "export", "Tokenizer")


def __getattr__(name):
    if name in _API:
        from mmgen import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmgen' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])

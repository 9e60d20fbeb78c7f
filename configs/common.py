"""What every config starts from: the keys every trainer honours, and variant parsing.

Config files are python files with ``get_config(arg)`` returning an
``ml_collections.ConfigDict`` (big_vision style); ``path.py:arg`` passes ``arg``. They
live in the repository's ``configs/`` and are installed as the package
``mmgen.configs``, so a config imports its shared pieces as ``mmgen.configs....`` and
``--config generative/multitask.py:B`` finds the shipped file from any directory.
"""

import ml_collections

from mmgen.parallel.sharding import DEFAULT_RULES
from mmgen.train.optim import default_optimizer_config, default_schedule_config


def parse_variant(arg, default: str = "tiny", options: tuple[str, ...] | None = None,
                  why: str = "") -> tuple[str, dict[str, str]]:
    """``"tiny,a=1,b=x"`` -> ``("tiny", {"a": "1", "b": "x"})``.

    ``options`` (when given) are the option names the config knows; another name is a
    ``KeyError`` (``why`` may say why it is missing), which ``mmgen.config.load_config``
    turns into one line naming the variant.
    """
    parts = [p for p in (arg or default).split(",") if p]
    size, found = parts[0], {}
    for p in parts[1:]:
        if "=" not in p:
            raise KeyError(f"variant option {p!r} must look like key=value")
        key, value = p.split("=", 1)
        found[key] = value
    unknown = sorted(set(found) - set(options)) if options is not None else []
    if unknown:
        raise KeyError(f"unknown variant options {unknown}; choose from {sorted(options)}{why}")
    return size, found


def base_config(**overrides) -> ml_collections.ConfigDict:
    """The keys every trainer honours, with defaults; config files start from this."""
    cfg = ml_collections.ConfigDict()
    cfg.family = ""
    cfg.seed = 0
    cfg.total_steps = 1000
    cfg.batch_size = 8
    cfg.grad_accum_steps = 1  # micro-batches per update: batch_size / grad_accum_steps examples at once
    cfg.checkpoint_every = 500
    cfg.keep_checkpoints = 3
    cfg.keep_best = 0
    cfg.best_metric = ""
    cfg.best_mode = "min"
    cfg.async_checkpointing = True
    cfg.log_every = 50
    cfg.eval_every = 0
    cfg.eval_batches = 4
    cfg.eval_split = "test"
    cfg.progress = True
    cfg.tensorboard = True
    cfg.peak_flops = 0.0  # FLOP/s per device for MFU; 0 = look the device up
    # jax.profiler trace of updates start_step .. start_step + num_steps - 1 into workdir/profile
    # (num_steps=0: off; start after step 1, which compiles). perfetto: also perfetto_trace.json.gz.
    cfg.profile = ml_collections.ConfigDict(dict(start_step=3, num_steps=0, perfetto=True))
    cfg.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    cfg.sharding_rules = [list(r) if isinstance(r[1], str) or r[1] is None else [r[0], list(r[1])]
                          for r in DEFAULT_RULES]
    cfg.optimizer = default_optimizer_config()
    cfg.schedule = default_schedule_config()
    cfg.init_from = ""  # a workdir whose model weights start a fresh run (fine-tuning); see loop.load_warm_start
    cfg.init_from_step = -1  # its checkpoint to take; -1 = the latest
    cfg.dataset = ml_collections.ConfigDict()
    cfg.update(overrides)
    return cfg

"""Training infrastructure every family shares: the one loop (``loop``), Orbax
checkpoints (``checkpoint``), optimizers and schedules (``optim``), metrics files
(``metrics``) and the workdir's side files (``workdir``). Model families live in
``mmgen.families``."""

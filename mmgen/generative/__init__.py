"""The masked multi-task generative transformer: model, task registry, masking, decoding.

``transformer`` (the network and size presets), ``tasks`` (what each task
conditions on), ``masking`` (training inputs, schedules, loss), ``sampling``
(iterative MaskGIT decoding with classifier-free guidance), ``tokens`` (clips ->
tokens and batch streams on the host), ``token_cache`` (tokens computed once),
``generator`` (a model and its tokenizers -> samples as media files).
"""

from mmgen.generative.masking import (
    MaskedExample,
    loss_fn,
    make_training_example,
    mask_ratio,
)
from mmgen.generative.sampling import sample
from mmgen.generative.tasks import TASK_NAMES, TASKS, Task, get_task, task_id
from mmgen.generative.transformer import (
    MaskedTransformer,
    flops_per_token,
    modality_specs,
    model_config,
)

__all__ = [
    "MaskedExample",
    "MaskedTransformer",
    "TASKS",
    "TASK_NAMES",
    "Task",
    "flops_per_token",
    "get_task",
    "loss_fn",
    "make_training_example",
    "mask_ratio",
    "modality_specs",
    "model_config",
    "sample",
    "task_id",
]

"""Parameter-efficient adapters for trained mmgen models: LoRA and FlyLoRA.

``apply_adapters(model, cfg)`` wraps the configured ``nnx.Linear`` layers in place;
train with ``nnx.Optimizer(model, tx, wrt=adapter_filter)`` (and, for FlyLoRA, call
``update_flylora_biases(model)`` after each optimizer step); save
``adapter_state(model)`` with ``base_fingerprint(model)``; fold or merge with
``fold_lora`` / ``merge_lora_adapters`` / ``merge_flylora_adapters``.
"""

from mmgen.adapters.flylora import (
    FlyLoRA,
    FlyLoRAProjection,
    FlyLoRASum,
    RoutingBias,
    RoutingCount,
    sparse_projection,
    update_flylora_biases,
)
from mmgen.adapters.lora import AdapterParam, LoRA
from mmgen.adapters.merge import (
    fold_lora,
    lora_kernel_delta,
    merge_flylora_adapters,
    merge_lora_adapters,
)
from mmgen.adapters.surgery import (
    AdapterReport,
    adapter_filter,
    adapter_state,
    adapter_state_filter,
    apply_adapters,
    base_fingerprint,
    count_params,
    frozen_filter,
)

__all__ = [
    "AdapterParam",
    "AdapterReport",
    "FlyLoRA",
    "FlyLoRAProjection",
    "FlyLoRASum",
    "LoRA",
    "RoutingBias",
    "RoutingCount",
    "adapter_filter",
    "adapter_state",
    "adapter_state_filter",
    "apply_adapters",
    "base_fingerprint",
    "count_params",
    "fold_lora",
    "frozen_filter",
    "lora_kernel_delta",
    "merge_flylora_adapters",
    "merge_lora_adapters",
    "sparse_projection",
    "update_flylora_biases",
]

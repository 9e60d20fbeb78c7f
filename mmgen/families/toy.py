"""A two-layer MLP regressor on a synthetic, seeded dataset: the smallest real family.

It exists so that the shared loop (sharding, resume, preemption, multi-process) and
the sweep runner are tested on a model that compiles in a second; everything it does
goes through exactly the code paths the tokenizer and transformer trainers use.
Target: y = sin(x @ W*) for a fixed random W*, so the loss really goes down.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.errors import UserError
from mmgen.train import optim
from mmgen.train.loop import Family


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)), rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class ToyState(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.model = MLP(cfg.model.dim, cfg.model.hidden, rngs=rngs)
        self.optimizer = optim.make_optimizer(self.model, cfg.optimizer, cfg.schedule, cfg.total_steps)
        self.ema = nnx.data(nnx.clone(self.model) if cfg.get("ema_decay", 0) else None)


def create_state(cfg, rngs: nnx.Rngs) -> ToyState:
    return ToyState(cfg, rngs)


def _loss(model, batch):
    pred = model(batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


def train_step(cfg, state: ToyState, batch, rng) -> dict:
    loss, _, _, grads = optim.accumulate_gradients(
        cfg, lambda model, micro, rng: (_loss(model, micro), ({}, None)), (state.model,), batch, rng)
    state.optimizer.update(state.model, grads)
    if state.ema is not None:
        optim.ema_update(state.ema, state.model, cfg.ema_decay)
    return {"loss": loss, "grad_norm": optim.global_norm(grads)}


def eval_step(cfg, state: ToyState, batch, rng) -> dict:
    return {"loss": _loss(state.ema if state.ema is not None else state.model, batch)}


class SyntheticIterator:
    """Batch i of the global stream is a pure function of (seed, i); this process
    yields its slice. State = number of batches consumed (JSON bytes)."""

    def __init__(self, dim: int, batch_size: int, seed: int, process_index: int, process_count: int):
        self.dim, self.seed = dim, seed
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.batch_size = batch_size
        self.position = 0
        self.w = np.random.default_rng(12345).normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.position])
        x = rng.normal(size=(self.batch_size, self.dim)).astype(np.float32)
        x = x[self.offset:self.offset + self.local]
        self.position += 1
        return {"x": x, "y": np.sin(x @ self.w)}

    def get_state(self) -> bytes:
        return json.dumps({"position": self.position}).encode()

    def set_state(self, state: bytes) -> None:
        self.position = json.loads(state)["position"]

    def skip_batches(self, n: int) -> None:
        self.position = n


def make_data(cfg, *, split, train, seed, batch_size, process_index, process_count):
    if split != "train":
        seed = seed + 1_000_003
    return SyntheticIterator(cfg.model.dim, batch_size, seed, process_index, process_count)


def validate(cfg) -> None:
    if cfg.model.hidden % 2:
        raise UserError(f"config.model.hidden={cfg.model.hidden} must be even")


def flops_per_example(cfg) -> float:
    return 6.0 * 2 * cfg.model.dim * cfg.model.hidden


FAMILY = Family(name="toy", create_state=create_state, train_step=train_step, make_data=make_data,
                validate=validate, eval_step=eval_step, flops_per_example=flops_per_example)

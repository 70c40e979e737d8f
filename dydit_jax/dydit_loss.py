"""The DyDiT fine-tuning objective (DESIGN.md 1): diffusion losses plus the FLOPs constraint.

Stage 1: L = L_DiT(dynamic) + L_DiT(complete model, same x_t, t, y) + L_flops
Stage 2: L = L_DiT(dynamic) + L_flops
L_DiT is the full ADM loss (eps MSE + VLB with a detached mean); L_flops = 2 (mean_b r_b - target)^2
with r_b the per-sample FLOPs ratio of the masks (`flops.flops_ratio`, the release's constants
A = 4ND^2 + 2N^2D, M = 8ND^2). The target is 1.0 for `hold_steps` steps, then ramps linearly to
lambda over `warmup_steps`, then stays at lambda (the release's schedule).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dydit_jax import flops


def flops_target(step, target: float, warmup_steps: int, hold_steps: int = 100):
    """1.0 for `hold_steps`, then a linear ramp to `target` over `warmup_steps`, then `target`."""
    progress = jnp.clip((step - hold_steps) / max(warmup_steps, 1), 0.0, 1.0)
    return 1.0 + (target - 1.0) * progress


def dydit_loss_fn(model, diffusion, dc) -> Callable:
    """loss(params, batch, rng, step) -> (scalar, metrics) for a `dynamic=True` DiT.

    `dc` is `config.dynamic` (target, warmup_steps, hold_steps, stage). Metrics: the loss terms,
    the batch-mean FLOPs ratio and its target, and per block [L] the active head, group and
    token fractions.
    """
    if not model.dynamic:
        raise ValueError("the DyDiT objective needs DiT(dynamic=True)")
    if dc.stage not in (1, 2):
        raise ValueError(f"config.dynamic.stage={dc.stage}; valid: 1 (with the complete-model "
                         f"loss) or 2 (without)")
    num_tokens, hidden = model.num_patches, model.hidden_size

    def loss_fn(params, batch, rng, step):
        k_t, k_noise, k_drop, k_gumbel = jax.random.split(rng, 4)
        x, y = batch["image"], batch["label"]
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)
        rngs = {"label_dropout": k_drop, "gumbel": k_gumbel}

        def dynamic_fn(x_t, t_model, y):
            return model.apply({"params": params}, x_t, t_model, y, train=True, rngs=rngs)

        terms = diffusion.training_losses(dynamic_fn, x, t, model_kwargs={"y": y}, rng=k_noise)
        aux = terms["extra"]
        ratio = flops.flops_ratio(aux["head_masks"], aux["group_masks"],
                                  aux.get("token_masks"), num_tokens, hidden)
        target = flops_target(step, dc.target, dc.warmup_steps, dc.hold_steps)
        l_flops = 2.0 * jnp.square(jnp.mean(ratio) - target)
        loss = jnp.mean(terms["loss"]) + l_flops
        metrics = {"loss_dynamic": jnp.mean(terms["loss"]), "mse": jnp.mean(terms["mse"]),
                   "vb": jnp.mean(terms["vb"]), "loss_flops": l_flops,
                   "flops_ratio": jnp.mean(ratio), "flops_target": target,
                   "head_width": jnp.mean(aux["head_masks"], axis=(0, 2)),
                   "group_width": jnp.mean(aux["group_masks"], axis=(0, 2))}
        if "token_masks" in aux:
            metrics["token_fraction"] = jnp.mean(aux["token_masks"], axis=(0, 2))
        if dc.stage == 1:
            # Same x_t (same noise key), t and dropped labels; routers get no gradient here.
            def complete_fn(x_t, t_model, y):
                out, _ = model.apply({"params": params}, x_t, t_model, y, train=True,
                                     complete=True, rngs=rngs)
                return out

            complete = diffusion.training_losses(complete_fn, x, t, model_kwargs={"y": y},
                                                 rng=k_noise)
            loss = loss + jnp.mean(complete["loss"])
            metrics["loss_complete"] = jnp.mean(complete["loss"])
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn

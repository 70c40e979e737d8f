"""The DyDiT fine-tuning objective (DESIGN.md 1): diffusion losses plus the FLOPs constraint.

Stage 1: L = L_DiT(dynamic) + L_DiT(complete model, same x_t, t, y) + L_flops
Stage 2: L = L_DiT(dynamic) + L_flops
L_DiT is the batch mean of a per-sample loss `per_sample_loss(model_fn, x, rng) -> (loss [B],
terms)`: the full ADM loss (eps MSE + VLB with a detached mean; `diffusion_per_sample_loss`) or
the flow-matching loss of a SiT (`flow_loss.transport_per_sample_loss`). The same `rng` gives
the same t and noise, hence the same x_t for the complete model. L_flops = 2 (mean_b r_b - target)^2
with r_b the per-sample FLOPs ratio of the masks (`flops.flops_ratio`, the release's constants
A = 4ND^2 + 2N^2D, M = 8ND^2; per block for a Latte, `flops.model_block_costs`). The target is
1.0 for `hold_steps` steps, then ramps linearly to lambda over `warmup_steps`, then stays at lambda
(the release's schedule).
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


def diffusion_per_sample_loss(diffusion) -> Callable:
    """`per_sample_loss(model_fn, x, rng) -> (loss [B], terms)` of an ADM diffusion.

    t ~ U{0, ..., T-1} and the noise are drawn from `rng`; `model_fn(x_t, t)` is called with the
    model's timesteps. `terms` is `diffusion.training_losses`' dict: "mse", "vb" and the
    model's aux under "extra" (a dynamic model's masks).
    """

    def per_sample_loss(model_fn, x, rng):
        k_t, k_noise = jax.random.split(rng)
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)
        terms = diffusion.training_losses(model_fn, x, t, rng=k_noise)
        return terms["loss"], terms

    return per_sample_loss


def as_per_sample_loss(source) -> Callable:
    """A per-sample loss from an ADM diffusion, a flow-matching `Transport` or a callable."""
    from dydit_jax.transport import Transport
    if isinstance(source, Transport):
        from dydit_jax.flow_loss import transport_per_sample_loss
        return transport_per_sample_loss(source)
    if hasattr(source, "training_losses"):
        return diffusion_per_sample_loss(source)
    if callable(source):
        return source
    raise TypeError(f"expected a diffusion, a Transport or per_sample_loss(model_fn, x, rng), "
                    f"got {type(source).__name__}")


def dydit_loss_fn(model, per_sample_loss, dc) -> Callable:
    """loss(params, batch, rng, step) -> (scalar, metrics) for a `dynamic=True` DiT or SiT.

    `per_sample_loss`: `per_sample_loss(model_fn, x, rng) -> (loss [B], terms)` with
    `model_fn(x_t, t)` the model (labels bound) and the model's aux (masks) in
    `terms["extra"]`; or an ADM diffusion / a flow-matching `Transport`, for which it is built
    (`as_per_sample_loss`). `dc` is `config.dynamic` (target, warmup_steps, hold_steps, stage).
    Metrics: the loss terms (with the diffusion's "mse" and "vb" when it has them), the
    batch-mean FLOPs ratio and its target, and per block [L] the active head, group and token
    fractions.
    """
    if not model.dynamic:
        raise ValueError("the DyDiT objective needs a dynamic model (dynamic=True)")
    if dc.stage not in (1, 2):
        raise ValueError(f"config.dynamic.stage={dc.stage}; valid: 1 (with the complete-model "
                         f"loss) or 2 (without)")
    per_sample_loss = as_per_sample_loss(per_sample_loss)
    # Per-block constants: equal for a DiT's blocks, spatial vs temporal for a Latte's.
    num_tokens, hidden = model.tokens_per_sample, model.hidden_size
    costs = flops.model_block_costs(model)

    def loss_fn(params, batch, rng, step):
        k_loss, k_drop, k_gumbel = jax.random.split(rng, 3)
        x, y = batch["image"], (batch["label"] if model.conditional else None)
        rngs = {"label_dropout": k_drop, "gumbel": k_gumbel}

        def dynamic_fn(x_t, t_model):
            return model.apply({"params": params}, x_t, t_model, y, train=True, rngs=rngs)

        dyn_loss, terms = per_sample_loss(dynamic_fn, x, k_loss)
        aux = terms["extra"]
        ratio = flops.flops_ratio(aux["head_masks"], aux["group_masks"],
                                  aux.get("token_masks"), num_tokens, hidden, costs=costs)
        target = flops_target(step, dc.target, dc.warmup_steps, dc.hold_steps)
        l_flops = 2.0 * jnp.square(jnp.mean(ratio) - target)
        loss = jnp.mean(dyn_loss) + l_flops
        metrics = {"loss_dynamic": jnp.mean(dyn_loss), "loss_flops": l_flops,
                   "flops_ratio": jnp.mean(ratio), "flops_target": target,
                   "head_width": jnp.mean(aux["head_masks"], axis=(0, 2)),
                   "group_width": jnp.mean(aux["group_masks"], axis=(0, 2))}
        metrics.update({k: jnp.mean(terms[k]) for k in ("mse", "vb") if k in terms})
        if "token_masks" in aux:
            metrics["token_fraction"] = jnp.mean(aux["token_masks"], axis=(0, 2))
        if dc.stage == 1:
            # Same x_t (same loss key), t and dropped labels; routers get no gradient here.
            def complete_fn(x_t, t_model):
                out, _ = model.apply({"params": params}, x_t, t_model, y, train=True,
                                     complete=True, rngs=rngs)
                return out

            complete_loss, _ = per_sample_loss(complete_fn, x, k_loss)
            loss = loss + jnp.mean(complete_loss)
            metrics["loss_complete"] = jnp.mean(complete_loss)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn

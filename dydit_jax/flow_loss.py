"""The flow-matching (SiT) training objective for the training loop.

    transport = train.build_transport(config)          # create_transport("Linear", "velocity")
    loss_fn = flow_loss_fn(model, transport)           # model: a SiT
    loss, metrics = loss_fn(params, batch, rng, step)  # as train.diffusion_loss_fn

The loss is the batch mean of `transport.training_losses` (for a velocity model the MSE to
u_t = x1 - x0 on the Linear path, at t ~ U[t0, t1] and x0 ~ N(0, I)), as the release's
train.py computes it. The model is called as `model(x_t, t, y)` with a continuous t in [0, 1];
labels are dropped for classifier-free guidance with the "label_dropout" rng, as in training a
DiT. The DyDiT objective uses the same per-sample loss (`transport_per_sample_loss`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def transport_per_sample_loss(transport) -> Callable:
    """`per_sample_loss(model_fn, x, rng) -> (loss [B], terms)` of a flow-matching transport.

    t and x0 are drawn from `rng`; `model_fn(x_t, t)` may return `(out, aux)` (a dynamic
    model), then `terms["extra"]` is the aux. `terms` is `transport.training_losses`' dict.
    """

    def per_sample_loss(model_fn, x, rng):
        terms = transport.training_losses(model_fn, x, rng=rng)
        return terms["loss"], terms

    return per_sample_loss


def flow_loss_fn(model, transport) -> Callable:
    """loss(params, batch, rng, step) -> (scalar, metrics) for a (static) SiT."""
    per_sample_loss = transport_per_sample_loss(transport)

    def loss_fn(params, batch, rng, step):
        k_loss, k_drop = jax.random.split(rng)
        x, y = batch["image"], batch["label"]

        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, y, train=True,
                               rngs={"label_dropout": k_drop})

        loss, _ = per_sample_loss(model_fn, x, k_loss)
        loss = jnp.mean(loss)
        return loss, {"loss": loss}

    return loss_fn

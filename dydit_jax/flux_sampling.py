"""The FLUX flow-matching sampler (`flux/src/flux/sampling.py`): the time-shifted schedule and
the Euler denoise loop.

FLUX integrates the velocity from t = 1 (noise) to t = 0 (data): x <- x + (t_prev - t_curr)
v(x, t_curr). The schedule is linspace(1, 0, steps + 1), shifted towards t = 1 for long image
sequences: t' = e^mu / (e^mu + (1/t - 1)), mu linear in the image token count (0.5 at 256
tokens, 1.15 at 4096). FLUX.1-dev takes the guidance as an input (distilled guidance, no CFG);
`true_cfg` > 1 adds a real classifier-free guidance pass with negative text inputs.

`denoise` is one `lax.scan` over the steps: the schedule is data, so one executable serves
every schedule of the same length (and every guidance value).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def time_shift(mu: float, sigma: float, t):
    """e^mu / (e^mu + (1/t - 1)^sigma): t = 1 stays 1, t = 0 stays 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    """The line through (x1, y1) and (x2, y2): mu as a function of the image token count."""
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + (y1 - m * x1)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5,
                 max_shift: float = 1.15, shift: bool = True) -> np.ndarray:
    """num_steps + 1 times from 1 to 0 (float32), shifted for `image_seq_len` tokens unless
    `shift=False` (schnell's command line)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.linspace(1, 0, num_steps + 1, dtype=np.float32)
    if shift:
        mu = lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        with np.errstate(divide="ignore"):
            t = np.where(t > 0, time_shift(mu, 1.0, np.where(t > 0, t, 1.0)), 0.0)
    return t.astype(np.float32)


def denoise(model, variables, img, img_ids, txt, txt_ids, vec, timesteps,
            guidance: Optional[float] = 4.0, true_cfg: float = 1.0, neg_txt=None,
            neg_txt_ids=None, neg_vec=None):
    """Euler steps over `timesteps` [S + 1] from `img` [B, L, C] (noise) to the latents.

    `guidance` feeds a guidance-embedding model (dev); it is ignored by one without
    (schnell). With `true_cfg` > 1 each step also runs the negative prompt (neg_txt, neg_txt_ids,
    neg_vec) and uses v_neg + true_cfg (v - v_neg). A dynamic model's aux is dropped.
    """
    b = img.shape[0]
    g = (jnp.full((b,), guidance, jnp.float32)
         if getattr(model, "guidance_embed", False) else None)

    def velocity(x, t, txt_, ids_, vec_):
        out = model.apply(variables, x, img_ids, txt_, ids_, jnp.full((b,), t, x.dtype), vec_,
                          g)
        return out[0] if isinstance(out, tuple) else out

    def step(x, pair):
        t_curr, t_prev = pair
        v = velocity(x, t_curr, txt, txt_ids, vec)
        if true_cfg != 1.0:
            v_neg = velocity(x, t_curr, neg_txt, neg_txt_ids, neg_vec)
            v = v_neg + true_cfg * (v - v_neg)
        return x + (t_prev - t_curr).astype(x.dtype) * v.astype(x.dtype), None

    timesteps = jnp.asarray(timesteps)
    pairs = (timesteps[:-1], timesteps[1:])
    return jax.lax.scan(step, img, pairs)[0]

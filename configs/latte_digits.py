"""Latte on moving digits: a small class-conditional video DiT trained and sampled on CPU.

Clips of F = 8 frames on a 16x16 canvas, each one digit of scikit-learn's 8x8 set moving and
bouncing (`dydit_jax/data/moving_digits.py`; class = the digit; no download). A Latte with
D=96, depth 4 (two spatial + temporal pairs), 4 heads, patch 2 (64 tokens per frame, 512 per
clip), ADM diffusion with learned sigma, AdamW 1e-3, EMA 0.995, batch 16; samples with 50 DDIM
steps and CFG 3 on the gray channel.

    python -m dydit_jax.main --config=configs/latte_digits.py --workdir=runs/latte_digits

writes `runs/latte_digits/samples/<step>-ddim50-cfg3/`: `grid.png` (one row per clip),
`samples.gif` (all clips animated) and `samples.npz` (uint8 [N, F, H, W, C]). Expected: see
README "Latte on moving digits" (loss, wall time, samples). Args: steps, batch, frames.
"""
from dydit_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, steps=3000, batch=16, frames=8, size=20, scale=2)
    c = config_lib.base_config()
    c.model.update(name="custom", family="latte", hidden_size=96, depth=4, num_heads=4,
                   patch_size=2, input_size=args.size, in_channels=1, num_classes=10,
                   num_frames=args.frames, extras=2)
    c.data.update(name="moving_digits", image_size=args.size, digit_scale=args.scale,
                  channels=1, num_classes=10,
                  num_frames=args.frames, num_examples=8 * 1797, max_speed=1.5)
    c.train.update(batch_size=args.batch, num_steps=args.steps, lr=1e-3, ema_decay=0.995,
                   grad_clip=1.0, log_every=50, checkpoint_every=500, keep_period=0)
    c.sample.update(sampler="ddim", num_steps=50, cfg_scale=3.0, per_class=2, batch_size=20,
                    classes=tuple(range(10)), guide_channels=-1)
    return c

"""The embedded default: a class-conditional DiT on scikit-learn's 8x8 digits, in pixel space.

1,797 real images (no download), upsampled to 16x16 (nearest), one channel, 10 classes.
A small DiT (D=96, depth 4, 4 heads, patch 2 -> 64 tokens) trained from scratch with the DiT
recipe (AdamW, constant lr, EMA, ADM diffusion with learned sigma).

    python -m dydit_jax.main --config=configs/digits.py --workdir=runs/digits

Expected on a 2-core CPU: 2 minutes for 2,000 steps at batch 32 and the sample grid on a quiet
machine (measured, install included; much longer on a busy one); the loss (eps MSE + VLB)
falls to about 0.05 (0.047 measured), and `runs/digits/samples/grid.png` shows recognisable digits
(rows = classes 0..9, 50 DDIM steps, CFG 3.0).
Variants: `configs/digits.py:steps=500` (quick smoke run), `:size=32`.
"""
from dydit_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, steps=2000, size=16, batch=32)
    c = config_lib.base_config()
    c.model.update(name="custom", hidden_size=96, depth=4, num_heads=4, patch_size=2,
                   input_size=args.size, in_channels=1, num_classes=10)
    c.data.update(name="digits", image_size=args.size, channels=1, num_classes=10)
    # EMA 0.995: DiT's 0.9999 needs ~100k steps to forget the initialisation.
    c.train.update(batch_size=args.batch, num_steps=args.steps, lr=1e-3, ema_decay=0.995,
                   grad_clip=1.0, log_every=50, checkpoint_every=500, keep_period=0)
    # One gray channel: guide it (the release's 3-of-4-channel rule is for SD-VAE latents).
    # DDIM 50 at CFG 3 gives cleaner digits than 100 DDPM steps with this small model's learned
    # variance (compare with --config.sample.sampler=ddpm --config.sample.num_steps=250).
    c.sample.update(sampler="ddim", num_steps=50, cfg_scale=3.0, per_class=8, batch_size=80,
                    classes=tuple(range(10)), guide_channels=-1)
    return c

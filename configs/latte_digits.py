"""Latte on moving digits: a small class-conditional video DiT trained and sampled on CPU.

Clips of F = 8 frames on a 20x20 canvas, each one digit of scikit-learn's 8x8 set, upsampled to
16x16 (nearest, `scale=2`), moving and bouncing in steps of 2 px (`step=2`: every source pixel
stays on one 2x2 patch, as in the image digits; `dydit_jax/data/moving_digits.py`; class = the
digit; no download). A Latte with D=96, depth 8 (four spatial + temporal pairs), 4 heads, patch
2 (100 tokens per frame, 800 per clip), ADM diffusion with learned sigma, EMA 0.995; samples
with 50 DDIM steps and CFG 3 on the gray channel.

Two stages in one run, as Latte starts a video model from an image model (`config.pretrain`):
1. image stage in `<workdir>/pretrain`: the same model on single frames (F = 1: each digit at
   a random place on the canvas), `image_steps` (8,000) at batch 32, AdamW 1e-3. A small
   transformer learns to draw a digit anywhere slowly: trained on 8-frame clips from scratch
   (3,000 steps, 71 min) it drew broken strokes; with the room of the canvas taken away
   (16x16) 2,000 image steps draw digits (README "Latte on moving digits");
2. video stage: the 8-frame clips from the image stage's EMA, `steps` (2,000) at batch 16,
   AdamW 5e-4 (`lr`).

    python -m dydit_jax.main --config=configs/latte_digits.py --workdir=runs/latte_digits

writes `runs/latte_digits/samples/<step>-ddim50-cfg3/`: `grid.png` (one row per clip),
`samples.gif` (all clips animated) and `samples.npz` (uint8 [N, F, H, W, C]); the image stage
samples into `runs/latte_digits/pretrain/samples/`. Expected: see README "Latte on moving
digits" (loss, wall time, samples). Args: steps, batch, lr, image_steps (0: no image stage,
the video model from scratch), image_batch, frames, size (canvas), scale (digit upsampling),
step (motion grid, px), speed (px per frame).

Dynamic Latte (DyDiT++ on video): `:lam=0.5` fine-tunes the run above (`init`, default
runs/latte_digits) with the DyDiT recipe of `digits_dydit.py`: heads and groups sorted by
importance, stage 1, target 1.0 for 100 steps, a ramp to lambda over `warmup` steps, AdamW
3e-4, `steps` default 800; TDW routers in every block and SDT token routers where `tokens`
says (both | spatial | temporal):

    python -m dydit_jax.main --config=configs/latte_digits.py:lam=0.5 \
        --workdir=runs/latte_digits_dydit

`:lam=0.5,peft=tdlora` (or `lora`) is the DyDiT++ PEFT recipe on video: the base frozen,
TD-LoRA adapters and the routers trained at `peft_lr` (1e-3).
"""
import ml_collections

from dydit_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, steps=2000, batch=16, lr=5e-4, image_steps=8000,
                                image_batch=32, frames=8, size=20, scale=2, step=2,
                                speed=2.0, lam=0.0,
                                init="runs/latte_digits", warmup=300, tokens="both",
                                peft="none", peft_lr=1e-3)
    c = config_lib.base_config()
    c.model.update(name="custom", family="latte", hidden_size=96, depth=8, num_heads=4,
                   patch_size=2, input_size=args.size, in_channels=1, num_classes=10,
                   num_frames=args.frames, extras=2, token_blocks=args.tokens)
    c.data.update(name="moving_digits", image_size=args.size, digit_scale=args.scale,
                  channels=1, num_classes=10,
                  num_frames=args.frames, num_examples=8 * 1797, max_speed=args.speed,
                  motion_step=args.step)
    c.train.update(batch_size=args.batch, num_steps=args.steps, lr=args.lr, ema_decay=0.995,
                   grad_clip=1.0, log_every=50, checkpoint_every=500, keep_period=0)
    if args.image_steps > 0 and args.lam == 0:
        c.pretrain = ml_collections.ConfigDict(dict(
            model=dict(num_frames=1), data=dict(num_frames=1),
            train=dict(num_steps=args.image_steps, batch_size=args.image_batch, lr=1e-3)))
    c.sample.update(sampler="ddim", num_steps=50, cfg_scale=3.0, per_class=2, batch_size=20,
                    classes=tuple(range(10)), guide_channels=-1)
    if args.lam > 0:
        c.dynamic.update(enabled=True, target=args.lam, warmup_steps=args.warmup,
                         hold_steps=100, stage=1, reorder=True)
        c.train.update(num_steps=args.steps if "steps" in (arg or "") else 800,
                       init_from=args.init, lr=3e-4)
        config_lib.apply_peft_arg(c, args.peft, args.peft_lr)
    elif args.peft != "none":
        raise config_lib.ConfigError(f"peft={args.peft} is the DyDiT++ PEFT recipe: it "
                                     "fine-tunes a trained run with lam=, e.g. "
                                     "latte_digits.py:lam=0.5,peft=tdlora")
    return c

"""Text-to-image on CPU: a tiny FLUX trained on captioned digits, sampled from prompts; DyFLUX.

Data: scikit-learn's digits at 16x16 (one channel, pixel space: no autoencoder), each with a
caption built from the digit and two attributes measured from the image ("a bold handwritten
seven", "the digit slanted two, thin"; `data/captioned_digits.py`). Text: a small seeded T5
v1.1 encoder and CLIP text model (width 32, 2 layers, frozen) with a word-level tokenizer made
by the `tokenizers` library from the captions' words (`text_conditioning`, 12 tokens each).
Model: FLUX with 2 double-stream and 4 single-stream blocks, hidden 96, 4 heads (RoPE axes
4/10/10), 2x2 packing -> 64 image tokens of 4 channels, no guidance embedding (schnell-like);
rectified flow with logit-normal t and FLUX's time shift, AdamW 1e-3, EMA 0.995, batch 32;
10 % of the captions are dropped to the empty prompt, for true CFG. Samples: 28 Euler steps on
FLUX's shifted schedule, true CFG 3.0, one row per prompt ("a handwritten zero" ... "nine").

    python -m dydit_jax.main --config=configs/flux_digits.py --workdir=runs/flux_digits

DyFLUX fine-tuning of the trained model (`lam`: the kept image-token fraction to reach; token
routers in all 6 blocks, stage 1, target 1.0 for 100 steps then a ramp over `warmup` steps):

    python -m dydit_jax.main --config=configs/flux_digits.py:lam=0.5,init=runs/flux_digits \
        --workdir=runs/flux_digits_dyflux

Precomputed shards instead (`config.mode=extract`: the pixels with each caption's T5 / CLIP
embeddings and the empty prompt's, no flip copies; then training runs no text encoder):

    python -m dydit_jax.main --config=configs/flux_digits.py --workdir=runs/flux_extract \
        --config.mode=extract --config.extract.output_dir=latents/flux_digits
    python -m dydit_jax.main --config=configs/flux_digits.py --workdir=runs/flux_shards \
        --config.data.name=latents --config.data.path=latents/flux_digits

Sample other prompts with `--config.mode=sample --config.sample.prompts='("a bold
handwritten three", "a thin slanted seven")'`; the engine with
`--config.sample.engine=gathered`. Expected results and times: README "FLUX".

DyFLUX with TDW as well (`tdw=1`: head / MLP-group routers on the timestep embedding; the
target then bounds the FLOPs ratio):

    python -m dydit_jax.main --config=configs/flux_digits.py:lam=0.5,tdw=1,init=runs/flux_digits \
        --workdir=runs/flux_digits_dyflux_tdw

The engine's token capacities here are quarters of the 64 image tokens (sixteenths, the
engine's default, compiled 16 branches per block kind: minutes of XLA time for a CPU demo).

Args: steps (2000; 800 with lam), batch (32), lam (> 0: DyFLUX), tdw (0), init, warmup (300),
distill (0: no distillation from the every-token velocity).
"""
from dydit_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, steps=2000, batch=32, lam=0.0, init="", warmup=300,
                                distill=0.0, tdw=0)
    c = config_lib.base_config()
    c.model.update(name="custom", family="flux", hidden_size=96, depth=2,
                   depth_single_blocks=4, num_heads=4, patch_size=2, input_size=16,
                   in_channels=1, num_classes=10, guidance_embed=False)
    c.data.update(name="captioned_digits", image_size=16, channels=1, num_classes=10)
    c.text.update(encoders="local", width=32, layers=2, heads=2, t5_max_length=12,
                  clip_max_length=12, dropout=0.1)
    c.train.update(batch_size=args.batch, num_steps=args.steps, lr=1e-3, ema_decay=0.995,
                   grad_clip=1.0, log_every=50, checkpoint_every=500, keep_period=0)
    c.flux.update(true_cfg=3.0, distill=args.distill, tdw=bool(args.tdw),
                  capacities=(0.25, 0.5, 0.75))
    c.sample.update(num_steps=28, per_class=8, batch_size=80)
    c.extract.update(flip=False, shard_size=512)   # a mirrored digit contradicts its caption
    if args.lam > 0:
        config_lib.apply_finetune_args(c, args, arg, "flux_digits.py", reorder=False)
    return c

"""Latte-XL/2 on UCF-101: 16-frame 256x256 clips (frame stride 3, Latte's class-conditional
UCF setting) in SD-VAE latent space (clips of 16x32x32x4); DyDiT-Latte-XL/2 with `lam`.

1. Latents, once (mode=extract; UCF-101 prepared for tfds as dydit_jax/data/ucf101.py says; one
   clip per video of all 13,320, and its mirror image):

    python -m dydit_jax.main --config=configs/latte_xl.py:data=ucf101,ucf=~/tensorflow_datasets \
        --workdir=runs/extract_ucf --config.mode=extract --config.evaluate.vae_dir=sd-vae-ft-ema \
        --config.data.path=gs://BUCKET/ucf101_16x256_latents

2. Train Latte-XL/2, or fine-tune it to DyDiT-Latte-XL/2 (lambda = 0.5) from the release's
   UCF-101 weights (converted once):

    LATENTS=gs://BUCKET/ucf101_16x256_latents
    python -m dydit_jax.main --config=configs/latte_xl.py:latents=$LATENTS \
        --workdir=gs://BUCKET/runs/latte_xl --config.mesh.fsdp=8
    python -m dydit_jax.convert --checkpoint ucf101.pt --model Latte-XL/2 --num-frames 16 \
        --num-classes 101 --out latte_xl2_ucf
    python -m dydit_jax.main \
        --config=configs/latte_xl.py:lam=0.5,init=latte_xl2_ucf,latents=$LATENTS \
        --workdir=gs://BUCKET/runs/dydit_latte_xl_0.5 --config.mesh.fsdp=8

3. FVD (2048 samples against the first 2048 real clips of UCF-101's epoch-0 order; the
   training args with `data=ucf101` for the reference; per-frame FID given the Inception):

    ARGS=lam=0.5,init=latte_xl2_ucf,data=ucf101,ucf=~/tensorflow_datasets
    python -m dydit_jax.main --config=configs/latte_xl.py:$ARGS \
        --workdir=gs://BUCKET/runs/dydit_latte_xl_0.5 --config.mode=evaluate \
        --config.evaluate.vae_dir=sd-vae-ft-ema --config.evaluate.i3d_path=i3d_400.npz \
        --config.evaluate.inception_path=inception_fid.npz

Args: batch (global, default 40: the release's local_batch_size 5 on 8 devices), steps (the
release's 1M; DyDiT fine-tuning 200k unless given), data=latents (training: shards of
mode=extract, dir `latents`) | ucf101 (tfds data dir `ucf`: the clips mode=extract encodes and
the evaluate mode's reference), dtype, fsdp, lam (> 0: the DyDiT recipe from the Latte given
by init, `config_lib.apply_dydit_arg`), init, tokens (dynamic Latte's SDT routers: both |
spatial | temporal blocks), peft (none | lora | tdlora), peft_lr.

The release's recipe (Vchitect/Latte configs/ucf101/ucf101_train.yaml, ucf101_sample.yaml,
sample/sample_ddp.py): AdamW lr 1e-4 without weight decay, EMA 0.9999, learned sigma; samples
with 250 DDPM steps and CFG 7.0 on all 4 eps channels, labels uniform over the 101 classes
for FVD. Not modelled: its gradient clipping at 0.1 that starts at step 100k
(`train.grad_clip=0.1` clips from the first step). Blocks are rematerialised and not scanned
(a scanned Latte stacks one parameter tree for all blocks, which `tokens=spatial|temporal`
routers do not have; `--config.model.scan_layers=True` works with `tokens=both`).
Expected: the Latte paper's UCF-101 FVD for the release weights; DyDiT-Latte has no published
number. Neither is reproduced here (no accelerator or UCF-101 in CI).
"""
from dydit_jax import config_lib

NUM_FRAMES = 16
IMAGE_SIZE = 256
NUM_CLASSES = 101


def get_config(arg=None):
    args = config_lib.parse_arg(arg, batch=40, steps=1_000_000, data="latents", latents="",
                                ucf="", dtype="bfloat16", fsdp=1, lam=0.0, init="",
                                tokens="both", peft="none", peft_lr=1e-4)
    if args.data not in ("latents", "ucf101"):
        raise config_lib.ConfigError(f"config arg data={args.data!r}; valid: latents (VAE "
                                     f"latent shards of mode=extract), ucf101 (tfds clips)")
    c = config_lib.base_config()
    latent = IMAGE_SIZE // 8
    c.model.update(name="Latte-XL/2", family="latte", input_size=latent, in_channels=4,
                   num_classes=NUM_CLASSES, num_frames=NUM_FRAMES, extras=2,
                   token_blocks=args.tokens, dtype=args.dtype, scan_layers=False, remat=True)
    if args.data == "latents":
        # The shards hold each clip's mirror image already (extract.flip): no flips here.
        c.data.update(name="latents", image_size=latent, channels=4, latent_flip=False)
        if args.latents:
            c.data.path = args.latents
    else:
        c.data.update(name="ucf101", image_size=IMAGE_SIZE, channels=3, random_flip=False,
                      data_dir=args.ucf or None, split="train+test")
    c.data.update(num_classes=NUM_CLASSES, num_frames=NUM_FRAMES, frame_stride=3,
                  num_workers=8, prefetch=4)
    c.extract.update(batch_size=8, shard_size=256)   # clips (x16 frames through the VAE)
    c.train.update(batch_size=args.batch, num_steps=args.steps, init_from=args.init)
    c.mesh.fsdp = args.fsdp
    config_lib.apply_dydit_arg(c, args.lam, args.init, arg)
    config_lib.apply_peft_arg(c, args.peft, args.peft_lr)
    c.sample.update(sampler="ddpm", num_steps=250, cfg_scale=7.0, guide_channels=-1,
                    per_class=1, batch_size=8, classes=tuple(range(10)))
    # FVD on 2048 clips (StyleGAN-V's protocol; the release's sampler and guidance), 8 per
    # batch: 128 frames through the VAE decoder, 8 clips through the I3D at 224x224.
    c.evaluate.update(num_samples=2048, chunk_size=256, batch_size=8, sampler="ddpm",
                      num_steps=250, cfg_scale=7.0)
    return c

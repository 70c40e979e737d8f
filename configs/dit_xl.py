"""DiT-XL/2 on ImageNet 256 (latent space, 32x32x4 SD-VAE latents); DyDiT-XL/2 with `lam`.

DyDiT-XL/2 (lambda = 0.5), fine-tuned from the official DiT-XL/2 (converted once):

    python -m dydit_jax.convert --checkpoint DiT-XL-2-256x256.pt --model DiT-XL/2 --out dit_xl2
    python -m dydit_jax.main --config=configs/dit_xl.py:lam=0.5,init=dit_xl2,latents=LATENTS \
        --workdir=gs://BUCKET/runs/dydit_xl_0.5 --config.mesh.fsdp=8

Expected (paper): 57.88 GFLOPs (ratio ~0.49 of 118.64), FID-50K 2.07 with 250 DDPM steps and
CFG 1.5 after ~200k iterations at batch 256. Not reproduced here (no TPU/ImageNet in CI).

Training the DiT itself:

    python -m dydit_jax.main --config=configs/dit_xl.py:latents=gs://BUCKET/imagenet256_latents \
        --workdir=gs://BUCKET/runs/dit_xl

Args: batch (global, default 256), steps (400k), data=latents|imagenet|synthetic, dtype, fsdp.
AdamW lr 1e-4, no weight decay, EMA 0.9999, bfloat16 compute with float32 parameters,
scanned + rematerialised blocks. Latents come from the evaluation tooling's extractor
(`dydit_jax.data.write_latent_shards` format). Expected: the DiT paper's training curve for
DiT-XL/2 (FID-50K at 400k steps without guidance as in its Table 4); not reproduced on CPU here.
Quick CPU smoke run: `--config=configs/dit_xl.py:data=synthetic,batch=8,steps=2,dtype=float32`.
"""
from dydit_jax import config_lib


def get_config(arg=None):
    return config_lib.imagenet_config("DiT-XL/2", arg)

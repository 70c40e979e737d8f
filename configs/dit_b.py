"""DiT-B/2 on ImageNet 256 (latent space, 32x32x4 SD-VAE latents), the DiT paper's recipe.

    python -m dydit_jax.main --config=configs/dit_b.py:latents=gs://BUCKET/imagenet256_latents \
        --workdir=gs://BUCKET/runs/dit_b

Args: batch (global, default 256), steps (400k), data=latents|imagenet|synthetic, dtype, fsdp.
AdamW lr 1e-4, no weight decay, EMA 0.9999, bfloat16 compute with float32 parameters,
scanned + rematerialised blocks. Latents come from the evaluation tooling's extractor
(`dydit_jax.data.write_latent_shards` format). Expected: the DiT paper's training curve for
DiT-B/2 (FID-50K at 400k steps without guidance as in its Table 4); not reproduced on CPU here.
Quick CPU smoke run: `--config=configs/dit_b.py:data=synthetic,batch=8,steps=2,dtype=float32`.
"""
from dydit_jax import config_lib


def get_config(arg=None):
    return config_lib.imagenet_config("DiT-B/2", arg)

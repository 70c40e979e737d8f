"""SiT-XL/2 on ImageNet 256 (latent space, 32x32x4 SD-VAE latents): flow matching; DyDiT with `lam`.

SiT (Ma et al. 2024) is DiT-XL/2's backbone trained with flow matching: Linear path
x_t = t x1 + (1 - t) x0, velocity prediction, t ~ U[0, 1], the DiT recipe otherwise (AdamW
1e-4, no weight decay, EMA 0.9999, batch 256, label dropout 0.1). Sampling: the release's SDE
(Euler-Maruyama over 250 points, diffusion w(t) = sigma_t, a "Mean" last step of 0.04), or its
ODE with `--config.transport.sampler=ode --config.transport.method=dopri5`.

    python -m dydit_jax.main --config=configs/sit_xl.py:latents=gs://BUCKET/imagenet256_latents \
        --workdir=gs://BUCKET/runs/sit_xl

Expected (SiT paper, Table 7): FID-50K 2.06 with the SDE sampler and CFG 1.5 (2.15 with the
ODE) after 7M steps at batch 256 (`steps=7000000`); sample the 50K images with
`--config.mode=sample --config.sample.cfg_scale=1.5` (the grid default is 4.0) and score them
with the evaluation tooling. Not reproduced here (no TPU/ImageNet in CI).

Dynamic SiT-XL/2 (lambda = 0.5), fine-tuned from the official SiT-XL/2 (SiT has DiT's
parameters and names, so the converter reads its checkpoint):

    python -m dydit_jax.convert --checkpoint SiT-XL-2-256x256.pt --model SiT-XL/2 --out sit_xl2
    python -m dydit_jax.main --config=configs/sit_xl.py:lam=0.5,init=sit_xl2,latents=LATENTS \
        --workdir=gs://BUCKET/runs/dysit_xl_0.5 --config.mesh.fsdp=8

(the DyDiT recipe of configs/dit_xl.py with the flow-matching loss; no published number).
Args: batch (global, default 256), steps (400k), data=latents|imagenet|synthetic, dtype, fsdp,
latents, lam, init. Quick CPU smoke run:
`--config=configs/sit_xl.py:data=synthetic,batch=8,steps=2,dtype=float32`.
"""
from dydit_jax import config_lib


def get_config(arg=None):
    return config_lib.imagenet_config("SiT-XL/2", arg)

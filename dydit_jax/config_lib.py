"""Defaults shared by every experiment config, and `:arg` parsing.

A config file (`configs/<name>.py`) calls `base_config()`, overrides what differs and returns it.
Every key that any mode reads is defined here, so an unknown `--config.x.y=` override is an error
that names the key (ml_collections refuses keys that do not exist), and a typo in a config file
is caught by `validate`.
"""
from __future__ import annotations

import ml_collections

MODES = ("train", "sample", "plot", "evaluate", "extract")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"
    c.seed = 0
    # Multi-host: call jax.distributed.initialize() (TPU pod launch scripts set this).
    c.distributed = False

    c.model = ml_collections.ConfigDict(dict(
        name="DiT-S/2",           # DiT-{S,B,L,XL}/{2,4,8}, or "custom" with the sizes below
        input_size=32,
        in_channels=4,
        num_classes=1000,
        learn_sigma=True,
        class_dropout_prob=0.1,
        hidden_size=0, depth=0, num_heads=0, patch_size=2,   # only for name="custom"
        mlp_ratio=4.0,
        scan_layers=False,
        remat=False,
        remat_policy="nothing_saveable",   # with remat: what a block keeps (dit.REMAT_POLICIES)
        dtype="float32",          # compute dtype: float32 or bfloat16 (params stay float32)
    ))

    # DyDiT (DESIGN.md 1): routers in the model and the FLOPs-constrained objective.
    c.dynamic = ml_collections.ConfigDict(dict(
        enabled=False,
        tokens=True,             # SDT token routers as well as TDW width routers
        target=0.5,              # lambda: the FLOPs ratio to reach
        warmup_steps=1000,       # linear ramp from 1.0 to lambda (1k for 0.5, 5k for 0.7)
        hold_steps=100,          # target 1.0 for these first steps
        stage=1,                 # 1: + complete-model loss; 2: without
        reorder=True,            # sort heads/groups by importance when starting from a DiT
    ))

    c.diffusion = ml_collections.ConfigDict(dict(
        noise_schedule="linear",
        diffusion_steps=1000,
        learn_sigma=True,
    ))

    # A placeholder is a FieldReference: one shared object would link every key holding it
    # (setting data.data_dir would also set data.path), so each key gets its own.
    opt_str = lambda: ml_collections.config_dict.placeholder(str)  # noqa: E731
    opt_float = lambda: ml_collections.config_dict.placeholder(float)  # noqa: E731
    # Flow matching (SiT, dydit_jax/transport): when enabled the model is a SiT, training uses
    # the transport's loss (instead of `diffusion`) and sampling its ODE/SDE samplers (instead
    # of sample.sampler/num_steps/eta; the rest of `sample` applies as is). Defaults: the
    # release's (train_utils.py), except sampling with a 50-step Euler ODE.
    c.transport = ml_collections.ConfigDict(dict(
        enabled=False,
        path_type="Linear",      # Linear | GVP | VP
        prediction="velocity",   # velocity | noise | score
        loss_weight=opt_str(),   # None | velocity | likelihood (noise and score models)
        train_eps=opt_float(),   # None: create_transport's defaults (0 for Linear velocity)
        sample_eps=opt_float(),
        sampler="ode",           # ode | sde
        method="euler",          # ode: euler | heun2 | midpoint | heun3 | rk4 | dopri5 | ...
                                 # sde: euler | heun (case-insensitive)
        num_steps=50,            # grid points (fixed methods take num_steps - 1 steps)
        atol=1e-6, rtol=1e-3,    # adaptive ODE methods
        diffusion_form="sigma",  # sde: w(t), see transport.DIFFUSION_FORMS
        diffusion_norm=1.0,
        last_step="Mean",        # sde: Mean | Tweedie | Euler | None
        last_step_size=0.04,
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="synthetic",        # digits | imagenet | latents | synthetic (see dydit_jax/data)
        image_size=32,
        channels=4,              # digits: 1 or 3; synthetic: any
        num_classes=1000,        # synthetic labels
        num_examples=100_000,    # synthetic
        pool_size=16,            # synthetic: distinct random images
        seed=0,
        shuffle=True,
        random_flip=False,       # horizontal flips (digits, imagenet)
        resize="nearest",        # digits upsampling: nearest | bilinear
        tfds_name="imagenet2012",
        data_dir=opt_str(),
        manual_dir=opt_str(),
        download_and_prepare=False,
        split="train",
        host_split="tfds",       # imagenet: tfds (even file splits) | global (one permutation)
        decode="pil",
        num_workers=1,           # decoding threads
        prefetch=2,              # batches prepared ahead
        path=opt_str(),          # latents: directory of .npz shards
        latent_flip=False,
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=256,          # global batch
        num_steps=400_000,
        lr=1e-4,
        weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=0.0,           # global-norm clip; 0 disables
        ema_decay=0.9999,
        log_every=100,
        checkpoint_every=5_000,
        keep_checkpoints=3,      # the last N
        keep_period=50_000,      # plus every K-th step forever (0: none)
        async_checkpointing=True,
        sample_every=0,          # write a sample grid every K steps (0: only at the end)
        init_from="",            # orbax params dir or official .pt/.safetensors to start from
        max_steps_per_run=0,     # stop after this many steps in this process (0: no limit)
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                 # -1: all devices not used by fsdp
        fsdp=1,
        # (regex on "a/b/c" parameter paths, rule): rule "fsdp" shards the largest axis that the
        # fsdp axis divides, "replicate" keeps a full copy. First match wins.
        rules=(("kernel$|embedding$", "fsdp"), (".*", "replicate")),
    ))

    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddpm",          # ddpm | ddim
        num_steps=250,           # respacing of the sampler
        eta=0.0,
        cfg_scale=4.0,           # 1.0 disables guidance
        guide_channels=3,        # the release guides eps channels 0..2; -1 guides all
        per_class=4,
        classes=(),              # empty: 0..min(num_classes, 10)-1
        batch_size=64,
        checkpoint="",           # empty: the workdir's latest; or orbax params dir / .pt file
        use_ema=True,
        clip_denoised=False,
        engine="masked",         # dynamic models: masked (the release's path) | gathered (the
                                 # engine: same samples, fewer FLOPs) | static (complete model)
    ))

    # mode=evaluate (dydit_jax/evaluate.py): FID-50K etc. of the `sample.checkpoint` weights
    # (sample.eta/guide_channels/clip_denoised/engine/use_ema apply; flow models use
    # `transport`'s sampler). Defaults: the DiT paper's FID protocol (250 DDPM steps, CFG 1.5).
    c.evaluate = ml_collections.ConfigDict(dict(
        vae_dir=opt_str(),       # diffusers AutoencoderKL folder (latent models; also extract)
        inception_path=opt_str(),   # FID Inception weights (.npz, evaluation/inception.py)
        reference_batch=opt_str(),  # ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz); None:
                                    # a reference drawn from the training data source
        num_samples=50_000,
        batch_size=64,           # global sampling / Inception batch
        chunk_size=1_000,        # samples per resumable chunk (eval/chunk_NNNNN.npz)
        cfg_scale=1.5,
        sampler="ddpm",          # ddpm | ddim (diffusion models)
        num_steps=250,
        seed=0,
    ))

    # mode=extract (dydit_jax/extract_latents.py): tfds images -> VAE latent shards for
    # data.name=latents (the tfds keys of `data` pick the dataset, evaluate.vae_dir the VAE).
    c.extract = ml_collections.ConfigDict(dict(
        output_dir=opt_str(),    # None: data.path, else <workdir>/latents
        shard_size=4_096,        # source images per shard (2x latents with flip copies)
        flip=True,               # also store each image's horizontally flipped latent
        batch_size=64,           # global encoder batch
        image_size=0,            # pixels; 0: model.input_size * the VAE's downsampling
    ))
    c.compilation_cache_dir = ""
    return c


def imagenet_config(model_name: str, arg: str | None) -> ml_collections.ConfigDict:
    """DiT on ImageNet 256 (the paper's setting): latent space by default. A "SiT-..." model
    name gives the SiT (flow matching, Linear path, velocity; the release's SDE sampler).

    Args (`configs/dit_xl.py:batch=64,data=imagenet`): batch (global), steps, image_size,
    data=latents (SD-VAE latents extracted once, 32x32x4 for 256 px) | imagenet (pixel space,
    3 channels; ADM-style training without a VAE) | synthetic (benchmarks), dtype, fsdp,
    latents (dir of latent shards), lam (> 0: DyDiT fine-tuning to this FLOPs ratio from the
    DiT given by init, e.g. `lam=0.5,init=converted/DiT-XL-2-256`), init.
    """
    args = parse_arg(arg, batch=256, steps=400_000, image_size=256, data="latents",
                     dtype="bfloat16", fsdp=1, latents="", lam=0.0, init="")
    c = base_config()
    latent = args.data in ("latents", "synthetic")
    size = args.image_size // 8 if latent else args.image_size
    channels = 4 if latent else 3
    c.model.update(name=model_name, input_size=size, in_channels=channels, num_classes=1000,
                   dtype=args.dtype, scan_layers=True, remat=True)
    # Flips: pixel-space training flips images; latent shards from `mode=extract` already hold
    # each image's flipped copy (extract.flip), and flipping a latent only approximates the
    # flipped image's latent, so latents are not flipped again.
    c.data.update(name=args.data, image_size=size, channels=channels, num_classes=1000,
                  random_flip=not latent, latent_flip=False, num_workers=8, prefetch=4)
    if args.latents:
        c.data.path = args.latents
    c.train.update(batch_size=args.batch, num_steps=args.steps, init_from=args.init)
    c.mesh.fsdp = args.fsdp
    if args.lam > 0:
        # DyDiT recipe (paper/code): from a trained DiT, AdamW 1e-4, stage 1, target schedule
        # 1.0 for 100 steps then a ramp over 1k (lambda 0.5) or 5k (lambda 0.7) steps.
        if not args.init:
            raise ValueError("DyDiT fine-tuning (lam>0) starts from a trained DiT/SiT: pass "
                             "init=<converted params dir, .pt file or workdir>")
        c.dynamic.update(enabled=True, target=args.lam, stage=1, hold_steps=100,
                         warmup_steps=1000 if args.lam <= 0.5 else 5000)
        if "steps" not in (arg or ""):
            c.train.num_steps = 200_000
    c.sample.update(num_steps=250, cfg_scale=4.0, per_class=4, batch_size=32,
                    classes=(207, 360, 387, 974, 88, 979, 417, 279))
    if model_name.startswith("SiT"):
        # The sampler of SiT-XL/2's FID (the release's sample_ddp.py SDE defaults):
        # Euler-Maruyama over 250 points, w(t) = sigma_t, a "Mean" last step of 0.04.
        c.transport.update(enabled=True, path_type="Linear", prediction="velocity",
                           sampler="sde", method="Euler", num_steps=250,
                           diffusion_form="sigma", last_step="Mean", last_step_size=0.04)
    return c


def parse_arg(arg: str | None, **defaults):
    """Parses "a=1,b=x" into a ConfigDict over `defaults` (values take the defaults' types)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if "=" not in item:
            raise ValueError(f"config arg {item!r} is not key=value; valid keys: "
                             f"{sorted(defaults)}")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise KeyError(f"unknown config arg {key!r}; valid keys: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config against `base_config()`: no key that the code does not know."""
    _compare(config, base_config(), "config")
    if config.mode not in MODES:
        raise ValueError(f"config.mode={config.mode!r}; valid: {MODES}")


def _compare(cfg, ref, prefix):
    for key in cfg.keys():
        if key not in ref:
            raise KeyError(f"unknown config key {prefix}.{key}; valid keys of {prefix}: "
                           f"{sorted(ref.keys())}")
        if isinstance(ref[key], ml_collections.ConfigDict):
            _compare(cfg[key], ref[key], f"{prefix}.{key}")

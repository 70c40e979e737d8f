"""Defaults shared by every experiment config, and `:arg` parsing.

A config file (`configs/<name>.py`) calls `base_config()`, overrides what differs and returns it.
Every key that any mode reads is defined here, so an unknown `--config.x.y=` override is an error
that names the key and the closest one (`unknown_key_error`), and a typo in a config file is
caught by `validate`, which also checks every value before a run starts (`check_sources`: the
files a mode reads; `check_devices`: the mesh). Their errors are `ConfigError`s.
"""
from __future__ import annotations

import difflib
import inspect
import math
import os
import re

import ml_collections

MODES = ("train", "sample", "plot", "evaluate", "extract", "export")


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
        # official (facebookresearch/DiT) | diffusers (DiTTransformer2DModel: other timestep
        # frequencies, pre-MLP LayerNorm eps 1e-5; the same weights): dit.NUMERICS
        numerics="official",
        family="",               # "" : from the name's prefix (custom: dit, or sit with
                                 # transport); dit | sit | latte (dydit_jax/families.py)
        num_frames=16,           # latte: frames per clip
        extras=2,                # latte: 2 class-conditional, 1 unconditional
        token_blocks="both",     # dynamic latte: SDT token routers in both/spatial/temporal blocks
        # flux (family "flux": presets flux-dev / flux-schnell / flux-lite-8b, or "custom" with
        # hidden_size, depth = double blocks, num_heads and these); in_channels is the latent
        # (or pixel) channels, packed 2x2 into 4x as many
        depth_single_blocks=0,
        axes_dim=(),             # RoPE widths per position axis; (): from the head size
        context_in_dim=0,        # T5 width; 0: config.text.width (local encoders)
        vec_in_dim=0,            # CLIP width; 0: config.text.width (local encoders)
        guidance_embed=False,    # FLUX.1-dev style guidance input (config.flux.guidance)
        qkv_bias=True,
    ))

    # FLUX training and sampling (dydit_jax/flux_loss.py, flux_pipeline.py).
    c.flux = ml_collections.ConfigDict(dict(
        time_sampling="logit_normal",   # logit_normal | uniform training times
        logit_mean=0.0, logit_std=1.0,
        shift=True,              # FLUX's resolution-dependent time shift (training and sampling)
        guidance=3.5,            # the guidance input of guidance_embed models
        true_cfg=1.0,            # sampling: > 1 also runs the empty prompt (real CFG)
        distill=0.0,             # DyFLUX: weight of the MSE to the every-token velocity
        tdw=False,               # DyFLUX + TDW: head / MLP-group routers on time_in(t) (the
                                 # paper's figure, not released; the FLOPs target then bounds
                                 # the MACs ratio instead of the kept-token fraction)
        capacities=(),           # the engine's token capacity buckets (fractions of the image
                                 # tokens); empty: sixteenths (engine.flux.FLUX_CAPACITIES)
        width_grid=(),           # the engine's TDW width buckets (fractions of H); empty: quarters
    ))

    # FLUX's text encoders (dydit_jax/text_conditioning.py).
    c.text = ml_collections.ConfigDict(dict(
        encoders="local",        # local (small seeded T5 + CLIP, word-level tokenizer of the
                                 # captioned digits) | hf (transformers folders below)
        t5_dir="", clip_dir="",  # hf: config.json, *.safetensors, tokenizer.json
        t5_max_length=12, clip_max_length=12,   # FLUX.1: 512 (dev) / 256 (schnell), 77
        width=32, layers=2, heads=2, seed=0,    # local encoders
        dropout=0.1,             # training: a caption becomes the empty prompt (for true CFG)
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

    # Parameter-efficient fine-tuning (dydit_jax/peft): the base stays frozen (rebuilt from
    # train.init_from, never saved again), adapters on the `targets` Dense layers train, and
    # with them the base leaves `trainable` names (the DyDiT routers). tdlora mixes `experts`
    # rank-`rank` LoRAs by softmax/sigmoid(E_t W_r / tau) per layer or per block.
    c.peft = ml_collections.ConfigDict(dict(
        method="none",           # none | lora | tdlora
        rank=4,
        alpha=0.0,               # delta scaled by alpha / rank; 0: alpha = rank (scale 1)
        experts=3,               # tdlora's K
        mixing="softmax",        # softmax | sigmoid
        scope="layer",           # layer (a router per target) | block (one per block)
        tau=1.0,
        targets=r"blocks(_\d+)?/(attn/(qkv|proj)|mlp/(fc1|fc2))$",   # regex on Dense paths
        adaln=False,             # also adapt every block's adaLN_modulation
        block_pattern=r"^[^/]*blocks(_\d+)?",
        time_module="t_embedder",
        trainable=r"(head_router|group_router|token_router)/",   # base leaves that train
        # how the train step holds the frozen base: float32 | bfloat16 | compute (model.dtype).
        # A bfloat16 model computes the same from a bfloat16 copy (tested); on XLA:CPU the step
        # then needs more memory, not less (BENCHMARKS.md "PEFT"), so float32 by default.
        base_dtype="float32",
        # mode=export: the workdir's latest plain-LoRA adapters as a PEFT folder (official or
        # diffusers module names), in export_dir (empty: <workdir>/adapters/<step>-<naming>).
        export_naming="official",
        export_dir="",
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
        name="synthetic",        # digits | captioned_digits | caption_folder | tfds_captions |
                                 # moving_digits | imagenet | ucf101 | video_folder | latents |
                                 # synthetic (see dydit_jax/data)
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
        data_dir=opt_str(),      # tfds data dir (imagenet, ucf101, tfds_captions);
                                 # video_folder: the videos; caption_folder: the images + .txt
        manual_dir=opt_str(),
        download_and_prepare=False,
        split="train",
        host_split="tfds",       # imagenet: tfds (even file splits) | global (one permutation)
        decode="pil",
        image_key="image",       # tfds_captions: the image feature
        caption_key="caption",   # tfds_captions: the text feature ("a/b" nested; a list: first)
        num_workers=1,           # decoding threads
        prefetch=2,              # batches prepared ahead
        path=opt_str(),          # latents: directory of .npz shards
        latent_flip=False,
        num_frames=8,            # moving_digits, ucf101, video_folder: frames per clip
        frame_stride=3,          # ucf101, video_folder: frames between clip frames (Latte: 3)
        ucf101_config="ucf101_1",   # ucf101: the tfds builder config (ucf101_1/_2/_3 splits)
        digit_scale=1,           # moving_digits: 1 = the 8x8 digit, 2 = 16x16
        max_speed=1.5,           # moving_digits: pixels per frame per axis
        motion_step=1,           # moving_digits: positions on a grid of this many pixels
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

    # A first training stage (empty: none). Its keys are overrides of this config's sections
    # (e.g. pretrain.data.num_frames=1): mode train first trains that config in
    # <workdir>/pretrain, then this one from its EMA (train.init_from), as Latte starts a
    # video model from an image model. `pretrain_config` builds the stage's config.
    c.pretrain = ml_collections.ConfigDict()

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
        vae_dir=opt_str(),       # latent models: the SD-VAE folder that decodes the samples to
                                 # pictures (None: evaluate.vae_dir; neither: latents.npz only)
        output_dir="",           # empty: <workdir>/samples/<weights>-<sampler>-cfg<s>[-engine]
        overwrite=False,         # rewrite a samples folder that already holds these samples
        # A plain LoRA in the PEFT / diffusers safetensors format (a folder with
        # adapter_model.safetensors, or the file) put on the `checkpoint` weights (peft.method
        # "lora"; rank and scale come from the file).
        adapters="",
        prompts=(),              # text-to-image models: the prompts (per_class images each)
        prompt_file="",          # or a text file, one prompt per line
    ))

    # mode=evaluate (dydit_jax/evaluate.py): FID-50K etc. of the `sample.checkpoint` weights,
    # FVD (and per-frame FID) for video models (sample.eta/guide_channels/clip_denoised/
    # engine/use_ema apply; flow models use `transport`'s sampler). Defaults: the DiT paper's
    # FID protocol (250 DDPM steps, CFG 1.5).
    c.evaluate = ml_collections.ConfigDict(dict(
        vae_dir=opt_str(),       # diffusers AutoencoderKL folder (latent models; also extract)
        inception_path=opt_str(),   # FID Inception weights (.npz, evaluation/inception.py);
                                    # video models: per-frame FID when set
        i3d_path=opt_str(),      # video models: FVD's Kinetics-400 I3D (.npz, evaluation/i3d.py)
        reference_batch=opt_str(),  # ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz; video:
                                    # arr_0 clips [N, F, H, W, 3]); None: a reference drawn
                                    # from the data source (config.data)
        num_reference=0,         # images/clips that reference draws from the data source (its
                                 # epoch-0 order); 0: min(num_samples, 10,000)
        num_samples=50_000,
        batch_size=64,           # global sampling / Inception batch
        chunk_size=1_000,        # samples per resumable chunk (eval/chunk_NNNNN.npz)
        cfg_scale=1.5,
        sampler="ddpm",          # ddpm | ddim (diffusion models)
        num_steps=250,
        seed=0,
    ))

    # mode=extract (dydit_jax/extract_latents.py): tfds images -> VAE latent shards for
    # data.name=latents (the tfds keys of `data` pick the dataset, evaluate.vae_dir the VAE);
    # for FLUX captioned images -> latents (or pixels, without a VAE) + T5 / CLIP embeddings.
    c.extract = ml_collections.ConfigDict(dict(
        output_dir=opt_str(),    # None: data.path, else <workdir>/latents
        shard_size=4_096,        # source images per shard (2x latents with flip copies)
        flip=True,               # also store each image's horizontally flipped latent
        batch_size=64,           # global encoder batch
        image_size=0,            # pixels; 0: model.input_size * the VAE's downsampling
    ))
    # JAX's persistent compilation cache: "auto" = <workdir>/xla_cache, so a second run of the
    # same workdir starts warm (entries are keyed by the compiled program); "" disables.
    c.compilation_cache_dir = "auto"
    return c


def imagenet_config(model_name: str, arg: str | None) -> ml_collections.ConfigDict:
    """DiT on ImageNet 256 (the paper's setting): latent space by default. A "SiT-..." model
    name gives the SiT (flow matching, Linear path, velocity; the release's SDE sampler).

    Args (`configs/dit_xl.py:batch=64,data=imagenet`): batch (global), steps, image_size,
    data=latents (SD-VAE latents extracted once, 32x32x4 for 256 px) | imagenet (pixel space,
    3 channels; ADM-style training without a VAE) | synthetic (benchmarks), dtype, fsdp,
    latents (dir of latent shards), lam (> 0: DyDiT fine-tuning to this FLOPs ratio from the
    DiT given by init, e.g. `lam=0.5,init=converted/DiT-XL-2-256`), init, peft (none | lora |
    tdlora: the DyDiT++ PEFT recipe, base frozen; `lam=0.5,init=...,peft=tdlora`), peft_lr.
    """
    args = parse_arg(arg, batch=256, steps=400_000, image_size=256, data="latents",
                     dtype="bfloat16", fsdp=1, latents="", lam=0.0, init="", peft="none",
                     peft_lr=1e-4)
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
    apply_dydit_arg(c, args.lam, args.init, arg)
    c.sample.update(num_steps=250, cfg_scale=4.0, per_class=4, batch_size=32,
                    classes=(207, 360, 387, 974, 88, 979, 417, 279))
    if args.peft != "none" and not args.init:
        raise ConfigError(f"peft={args.peft} fine-tunes a trained model with its weights frozen: "
                          f"pass init=<converted params dir, .pt file or workdir>")
    apply_peft_arg(c, args.peft, args.peft_lr)
    if model_name.startswith("SiT"):
        # The sampler of SiT-XL/2's FID (the release's sample_ddp.py SDE defaults):
        # Euler-Maruyama over 250 points, w(t) = sigma_t, a "Mean" last step of 0.04.
        c.transport.update(enabled=True, path_type="Linear", prediction="velocity",
                           sampler="sde", method="Euler", num_steps=250,
                           diffusion_form="sigma", last_step="Mean", last_step_size=0.04)
    return c


def apply_dydit_arg(c: ml_collections.ConfigDict, lam: float, init: str, arg: str | None
                    ) -> None:
    """A config file's `lam=` argument (> 0): the DyDiT recipe (paper/code) from the trained
    model `init`: AdamW 1e-4, stage 1, target schedule 1.0 for 100 steps then a ramp over 1k
    (lambda 0.5) or 5k (lambda 0.7) steps, 200k steps unless `arg` sets steps."""
    if lam <= 0:
        return
    if not init:
        raise ConfigError(f"DyDiT fine-tuning (lam={lam}) starts from a trained DiT/SiT/Latte: "
                          f"pass init=<converted params dir, .pt file or workdir>")
    c.dynamic.update(enabled=True, target=lam, stage=1, hold_steps=100,
                     warmup_steps=1000 if lam <= 0.5 else 5000)
    if "steps" not in (arg or ""):
        c.train.num_steps = 200_000


def apply_finetune_args(c: ml_collections.ConfigDict, args, arg: str | None, base: str,
                        reorder: bool) -> None:
    """A CPU demo config's DyDiT fine-tune (`lam > 0`): from the trained run `args.init`
    (required; `base` names the config that trains it), stage 1, target 1.0 for 100 steps then
    a ramp over `args.warmup` steps, AdamW 3e-4, 800 steps unless `steps=` is given."""
    if not args.init:
        raise ConfigError(f"fine-tuning (lam>0) starts from a trained model: pass "
                          f"init=<workdir of configs/{base}>")
    c.dynamic.update(enabled=True, target=args.lam, warmup_steps=args.warmup,
                     hold_steps=100, stage=1, reorder=reorder)
    c.train.update(init_from=args.init, lr=3e-4)
    if "steps" not in (arg or ""):
        c.train.num_steps = 800


def apply_peft_arg(c: ml_collections.ConfigDict, method: str, lr: float) -> None:
    """A config file's `peft=` argument: LoRA / TD-LoRA on the defaults of `config.peft`, at
    learning rate `lr` (adapters start at zero and take a larger one than full fine-tuning)."""
    if method == "none":
        return
    if method not in ("lora", "tdlora"):
        raise ConfigError(f"config arg peft={method!r}; valid: none, lora, tdlora")
    c.peft.method = method
    c.train.lr = lr


def parse_arg(arg: str | None, **defaults):
    """Parses "a=1,b=x" into a ConfigDict over `defaults` (values take the defaults' types)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if "=" not in item:
            raise ConfigError(f"config arg {item!r} is not key=value; valid keys: "
                              f"{sorted(defaults)}")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise UnknownKeyError(f"unknown config arg {key!r}; valid keys: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


# ----------------------------------------------------------------------------------------------
# Checks: every key and value a run reads, before anything is compiled or a workdir is made.
# `validate` (keys and values) and `check_sources` (the files a mode reads) are plain Python;
# `check_devices` needs the device count. main.run calls them in that order (check_sources
# for the command line).
# ----------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config key or value that a run cannot use. The message names the key, the value and
    what would be valid; the command line prints it as one line."""


class UnknownKeyError(ConfigError, KeyError):
    """A key the code does not know (also a KeyError, as ml_collections raises for one)."""
    __str__ = ValueError.__str__   # KeyError's str() would quote the message


DTYPES = ("float32", "bfloat16")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config before anything runs (nothing is traced or compiled): every key is one
    of `base_config()`'s and every value that the modes read is in its valid range. Raises
    ConfigError (UnknownKeyError for a key) naming the key, the value and what would be valid.
    Imports the model and transport modules for their name tables (jax is imported, its
    backend is not started, so `jax.distributed.initialize()` may still follow)."""
    _compare(config, base_config(), "", _flat_keys(base_config()))
    _check_pretrain(config)
    _check_choice(config, "mode", MODES)
    _check_model(config)
    _check_positive(config, "diffusion.diffusion_steps", "train.batch_size", "train.num_steps",
                    "train.log_every", "train.checkpoint_every", "sample.per_class",
                    "sample.batch_size", "evaluate.batch_size", "evaluate.chunk_size",
                    "extract.shard_size", "extract.batch_size")
    _check_sample(config)
    _check_evaluate(config)
    if not 0 < config.dynamic.target <= 1:
        _fail("dynamic.target", config.dynamic.target,
              "the FLOPs ratio to reach must be in (0, 1]")
    _check_data(config)
    if config.transport.enabled:
        _check_transport(config)
    _check_peft(config)
    _check_flux(config)


def _check_flux(config) -> None:
    """The FLUX family's model sizes, `flux`, `text` and prompt keys."""
    from dydit_jax import families
    from dydit_jax.data import CAPTION_SOURCES
    family = families.family_of(config)
    captioned = config.data.name in CAPTION_SOURCES
    if not family.text:
        if captioned and config.mode in ("train", "extract"):
            _fail("data.name", config.data.name, "captioned data trains a text-to-image model: "
                  "set config.model.family=flux (or a flux-* preset)")
        return
    for key in ("capacities", "width_grid"):
        bad = [f for f in config.flux[key] if not 0 < float(f) <= 1]
        if bad:
            _fail(f"flux.{key}", tuple(config.flux[key]), "fractions must lie in (0, 1] "
                  "(e.g. (0.25, 0.5, 0.75)); empty for the engine's defaults")
    if config.flux.tdw and not config.dynamic.enabled:
        _fail("flux.tdw", True, "TDW is part of DyFLUX: set config.dynamic.enabled=True too "
              "(or a config's lam= argument)")
    if config.transport.enabled:
        _fail("transport.enabled", True, "FLUX trains with its own rectified flow "
              "(config.flux); leave config.transport off")
    if config.peft.method != "none":
        _fail("peft.method", config.peft.method, "PEFT is not wired for FLUX yet")
    mc = config.model
    if mc.name == "custom":
        if mc.depth_single_blocks < 0:
            _fail("model.depth_single_blocks", mc.depth_single_blocks, "must be >= 0")
        head = mc.hidden_size // mc.num_heads
        if mc.axes_dim and sum(mc.axes_dim) != head:
            _fail("model.axes_dim", tuple(mc.axes_dim), f"must sum to the head size "
                  f"hidden_size / num_heads = {head}")
        if not mc.axes_dim:
            try:
                families.default_axes_dim(head)
            except ValueError as e:
                _fail("model.num_heads", mc.num_heads, str(e))
    from dydit_jax.flux_loss import TIME_SAMPLING
    _check_choice(config, "flux.time_sampling", TIME_SAMPLING)
    if config.flux.logit_std <= 0:
        _fail("flux.logit_std", config.flux.logit_std, "must be > 0")
    if config.flux.distill < 0:
        _fail("flux.distill", config.flux.distill, "must be >= 0 (0: no distillation)")
    if config.flux.true_cfg < 1:
        _fail("flux.true_cfg", config.flux.true_cfg, "must be >= 1 (1: no true CFG)")
    tc = config.text
    _check_choice(config, "text.encoders", ("local", "hf"))
    _check_positive(config, "text.t5_max_length", "text.clip_max_length")
    if tc.encoders == "local":
        _check_positive(config, "text.width", "text.layers", "text.heads")
        if tc.width % tc.heads:
            _fail("text.width", tc.width, f"must be divisible by config.text.heads={tc.heads}")
    elif not (tc.t5_dir and tc.clip_dir):
        _fail("text.encoders", "hf", "needs config.text.t5_dir and config.text.clip_dir "
              "(transformers folders with config.json, *.safetensors, tokenizer.json)")
    if not 0 <= tc.dropout < 1:
        _fail("text.dropout", tc.dropout, "must be in [0, 1)")
    sources = ", ".join(CAPTION_SOURCES)
    if config.mode == "train" and not captioned and config.data.name != "latents":
        _fail("data.name", config.data.name, f"FLUX trains on captioned data ({sources}) or "
              f"on the latent shards with text embeddings that mode=extract writes from such "
              f"data (latents)")
    if config.mode == "extract":
        if not captioned:
            _fail("data.name", config.data.name, f"mode=extract for FLUX stores each image's "
                  f"latent with its caption's embeddings: an image-caption source ({sources})")
        if config.data.name == "captioned_digits" and config.extract.flip:
            _fail("extract.flip", True, "a mirrored digit would not match its caption: set "
                  "config.extract.flip=False")
    if config.data.name == "tfds_captions":
        for key in ("data.image_key", "data.caption_key"):
            if not _get(config, key):
                _fail(key, _get(config, key), "names a feature of the tfds dataset")
    if (config.mode == "sample" and not (config.sample.vae_dir or config.evaluate.vae_dir)
            and config.model.in_channels not in (1, 3)):
        _fail("sample.vae_dir", config.sample.vae_dir,
              f"a FLUX of {config.model.in_channels} latent channels decodes its samples "
              "through the FLUX autoencoder: set config.sample.vae_dir (a vae/ folder or "
              "ae.safetensors); only 1- or 3-channel pixel models sample without")
    if config.sample.prompts and config.sample.prompt_file:
        _fail("sample.prompt_file", config.sample.prompt_file, "set sample.prompts or "
              "sample.prompt_file, not both")
    if config.sample.prompt_file and _is_local(config.sample.prompt_file) and \
            not os.path.isfile(config.sample.prompt_file):
        _fail("sample.prompt_file", config.sample.prompt_file, "no such file")


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The first stage of a config with `pretrain` overrides: a copy with them applied
    section by section, in train mode, without a stage of its own and without init_from."""
    stage = ml_collections.ConfigDict(config.to_dict())
    overrides = config.pretrain.to_dict()
    stage.pretrain = ml_collections.ConfigDict()
    stage.mode = "train"
    stage.train.init_from = ""

    def apply(target, values):
        for key, value in values.items():
            if isinstance(value, dict):
                apply(target[key], value)
            else:
                target[key] = value
    apply(stage, overrides)
    return stage


def _check_pretrain(config) -> None:
    if not config.pretrain.keys():
        return
    stage = config.pretrain.to_dict()
    for key in ("pretrain", "mode"):
        if key in stage:
            _fail(f"pretrain.{key}", stage[key], "a pretrain stage trains, and has no stage of "
                  "its own")
    if config.train.init_from:
        _fail("train.init_from", config.train.init_from, "with a pretrain stage the run starts "
              "from that stage's EMA: set one or the other")
    ref = base_config()
    _compare(ml_collections.ConfigDict(stage), ref, "pretrain.",
             ["pretrain." + k for k in _flat_keys(ref)])
    try:
        validate(pretrain_config(config))
    except ConfigError as e:
        raise type(e)(f"in the pretrain stage (the config with config.pretrain applied): "
                      f"{e}") from None


def _check_evaluate(config) -> None:
    """The sample and reference counts of `evaluate`, and for a video model in evaluate mode
    clips that FVD's I3D can take."""
    ec = config.evaluate
    if ec.num_samples < 2:
        _fail("evaluate.num_samples", ec.num_samples,
              "FID needs >= 2 samples for its covariance (the protocol uses 50000)")
    n = ec.num_reference
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n == 1:
        _fail("evaluate.num_reference", n, "0 (min(num_samples, 10000) from the data) or >= 2 "
              "(the covariance needs 2)")
    from dydit_jax import families
    from dydit_jax.evaluation.i3d import MIN_FRAMES, NUM_FRAMES
    frames = config.model.num_frames
    if config.mode == "evaluate" and families.family_of(config).video and frames < MIN_FRAMES:
        _fail("model.num_frames", frames, f"FVD's I3D needs clips of >= {MIN_FRAMES} frames "
              f"(its temporal strides); evaluate a model of config.model.num_frames >= "
              f"{MIN_FRAMES} (and data.num_frames alike; the FVD protocol uses {NUM_FRAMES}): "
              f"shorter clips, like the 8-frame moving-digits demo's, have no FVD")


def check_sources(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Checks the files and directories that `config.mode` reads and the workdir, so that a
    wrong path fails at once instead of after the model is built (and leaves no workdir).
    Only local paths are checked: gs:// and other URLs are left to their readers; tfds finds
    its data in its default directory when `data.data_dir` is None. Raises ConfigError."""
    mode, dc, ec = config.mode, config.data, config.evaluate
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} exists and is not a directory")
    if mode in ("sample", "plot", "evaluate"):
        _check_weights(config, workdir)
    if mode == "export" and not os.path.isdir(os.path.join(workdir, "checkpoints")) and \
            _is_local(workdir):
        _fail("mode", mode, f"export writes the adapters of --workdir={workdir}'s latest "
              f"checkpoint, and it has none: train there first")
    if mode == "train":
        _check_exists(config, "train.init_from", "it should be a training workdir, an orbax "
                      "params directory or an official .pt / .safetensors file")
    reads_data = mode in ("train", "plot") or (mode == "evaluate" and not ec.reference_batch)
    if reads_data and dc.name == "latents":
        extract_first = ("data.name=latents reads the VAE latent shards that mode=extract "
                         "writes: run mode=extract first (dydit_jax/extract_latents.py) and set "
                         "config.data.path to its output directory")
        if not dc.path:
            _fail("data.path", dc.path, extract_first)
        _check_exists(config, "data.path", extract_first)
    if dc.name == "video_folder" and (reads_data or mode == "extract"):
        _check_exists(config, "data.data_dir", "it should be the folder of video files "
                      "(class subfolders, or the videos directly for one class)")
    elif dc.name == "caption_folder" and (reads_data or mode == "extract"):
        hint = "it should be the folder of images with same-stem .txt captions"
        if not dc.data_dir:
            _fail("data.data_dir", dc.data_dir, f"data.name=caption_folder reads a folder: {hint}")
        _check_exists(config, "data.data_dir", hint)
    elif (reads_data and dc.name in ("imagenet", "ucf101", "tfds_captions")) or \
            mode == "extract":
        held = "ucf101/" + dc.ucf101_config if dc.name == "ucf101" else repr(dc.tfds_name)
        _check_exists(config, "data.data_dir", "it should be the tfds data directory that "
                      f"holds {held} (None: tfds's default directory)")
        if dc.download_and_prepare:
            _check_exists(config, "data.manual_dir", "it should hold the manually downloaded "
                          "archives that tfds prepares (ILSVRC2012_img_train.tar for ImageNet)")
    vae_hint = "it should be a diffusers AutoencoderKL folder, e.g. sd-vae-ft-ema"
    if mode in ("sample", "evaluate", "extract"):
        _check_exists(config, "evaluate.vae_dir", vae_hint)
    if mode in ("sample", "train"):   # train mode samples at the end
        _check_exists(config, "sample.vae_dir", vae_hint)
    latent_samples = config.model.in_channels not in (1, 3)   # pictures have 1 or 3 channels
    from dydit_jax import families
    family = families.family_of(config)
    # A pixel-space FLUX (1 or 3 channels unpacked, the digits demo) extracts its pixels.
    pixel_flux = family.text and family.build(config).in_channels // 4 in (1, 3)
    if mode == "extract" and not ec.vae_dir and not pixel_flux:
        _fail("evaluate.vae_dir", ec.vae_dir, f"mode=extract for a latent model needs the "
              f"VAE that makes its latents: {vae_hint}" + (
                  " (FLUX's: its vae/ folder or BFL's ae.safetensors)" if family.text else ""))
    if mode == "evaluate" and dc.name == "latents" and not ec.vae_dir:
        _fail("evaluate.vae_dir", ec.vae_dir, f"mode={mode} with data.name={dc.name} needs the "
              f"VAE of the latents: {vae_hint}")
    if mode == "evaluate" and latent_samples and not ec.vae_dir:
        _fail("evaluate.vae_dir", ec.vae_dir, f"mode=evaluate decodes the model's "
              f"{config.model.in_channels}-channel latent samples to pictures with the VAE of "
              f"its latents: {vae_hint}")
    if mode == "evaluate":
        video = family.video
        if video and not ec.i3d_path:
            _fail("evaluate.i3d_path", ec.i3d_path, "mode=evaluate of a video model needs "
                  "FVD's Kinetics-400 I3D weights (.npz; see dydit_jax/evaluation/i3d.py)")
        _check_exists(config, "evaluate.i3d_path", "it should be the I3D weights (.npz; see "
                      "dydit_jax/evaluation/i3d.py)")
        if not ec.inception_path and not video:
            _fail("evaluate.inception_path", ec.inception_path, "mode=evaluate needs the FID "
                  "Inception weights (.npz; see dydit_jax/evaluation/inception.py)")
        _check_exists(config, "evaluate.inception_path", "it should be the FID Inception "
                      "weights (.npz; see dydit_jax/evaluation/inception.py)")
        _check_exists(config, "evaluate.reference_batch", "it should be an ADM reference .npz "
                      "(e.g. VIRTUAL_imagenet256_labeled.npz; video: clips), or None to draw "
                      "the reference from the training data")


def check_devices(config: ml_collections.ConfigDict, device_count: int,
                  process_count: int = 1) -> None:
    """Checks `config.mesh` against the devices, and the global train batch against the batch
    shards (mesh.data * mesh.fsdp: all devices), which `sharding.create_mesh` and the train
    loop would otherwise refuse only after the model is built. Raises ConfigError."""
    mc = config.mesh
    divisors = [d for d in range(1, device_count + 1) if device_count % d == 0]
    if mc.fsdp not in divisors:
        _fail("mesh.fsdp", mc.fsdp, f"must divide the {device_count} devices: valid: "
              f"{', '.join(map(str, divisors))}")
    if mc.data != -1 and mc.data * mc.fsdp != device_count:
        _fail("mesh.data", mc.data, f"mesh.data * mesh.fsdp = {mc.data} * {mc.fsdp} must equal "
              f"the {device_count} devices: set config.mesh.data={device_count // mc.fsdp} or -1 "
              f"(all the devices that mesh.fsdp leaves)")
    multiple = math.lcm(device_count, process_count)
    batch = config.train.batch_size
    if config.mode == "train" and batch % multiple:
        below, above = batch // multiple * multiple, (batch // multiple + 1) * multiple
        works = f"{below} or {above}" if below else f"{above}"
        _fail("train.batch_size", batch, f"the global batch must be divisible by the "
              f"{device_count} batch shards (mesh.data * mesh.fsdp = all devices) and the "
              f"{process_count} hosts: e.g. {works}")


def unknown_key_error(config: ml_collections.ConfigDict, key: str):
    """The UnknownKeyError of an override `--config.<key>=...` that `config` has no key for,
    naming the closest key; None when the key exists."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return UnknownKeyError(f"unknown config key config.{key}"
                                   + _did_you_mean(key, _flat_keys(config)))
        node = node[part]
    return None


def config_lines(config: ml_collections.ConfigDict) -> list:
    """`key = value  # comment` for every key of `config` (what `--config.help` prints); the
    comments are `base_config()`'s."""
    comments = _key_comments()
    lines = []
    for key in _flat_keys(config):
        value = _get(config, key)
        if not isinstance(value, ml_collections.ConfigDict):
            comment = f"  # {comments[key]}" if key in comments else ""
            lines.append(f"{key} = {value!r}{comment}")
    return lines


def _key_comments() -> dict:
    """{"sample.cfg_scale": "1.0 disables guidance", ...}: the comment on each key's line in
    `base_config()` (plus the comment lines that continue it, indented past the key)."""
    comments, section, last, indent = {}, "", [], 0
    for line in inspect.getsource(base_config).splitlines():
        code, _, comment = line.partition("#")
        opened = re.match(r"\s*c\.(\w+) = ml_collections\.ConfigDict", code)
        if opened:
            section = opened.group(1) + "."
        keys = [section + k for k in re.findall(r"\b(\w+)=(?!=)", code)]
        if code.strip() or not comment:
            last, indent = keys, len(code) - len(code.lstrip())
            for key in keys:
                if comment.strip():
                    comments[key] = comment.strip()
        elif last and line.index("#") > indent + 4:   # a comment continuing the last key's
            for key in last:
                comments[key] = f"{comments.get(key, '')} {comment.strip()}".strip()
        else:
            last = []
    return comments


def _flat_keys(config, prefix: str = "") -> list:
    """Every key of `config` as a dotted path ("sample.cfg_scale"), sections included."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _flat_keys(value, f"{prefix}{key}.")
    return keys


def _did_you_mean(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, candidates, n=1)
    return f"; did you mean config.{match[0]}?" if match else "; --config.help lists the keys"


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _fail(key: str, value, why: str):
    raise ConfigError(f"config.{key}={value!r}: {why}")


def _check_choice(config, key: str, valid) -> None:
    value = _get(config, key)
    if value not in valid:
        _fail(key, value, f"valid: {', '.join(map(repr, valid))}")


def _check_positive(config, *keys: str) -> None:
    for key in keys:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(key, value, "must be a positive integer")


def _is_local(path: str) -> bool:
    return "://" not in path


def _check_exists(config, key: str, hint: str) -> None:
    """A path key, when set and local, names something that exists."""
    path = _get(config, key)
    if path and _is_local(path) and not os.path.exists(os.path.expanduser(path)):
        _fail(key, path, f"no such file or directory; {hint}")


def _check_weights(config, workdir: str) -> None:
    """The weights of sample / plot / evaluate: `sample.checkpoint`, else the workdir's."""
    if config.sample.adapters:
        _check_exists(config, "sample.adapters", "it should be a PEFT adapter folder "
                      "(adapter_model.safetensors + adapter_config.json) or the .safetensors")
        if not config.sample.checkpoint:
            _fail("sample.adapters", config.sample.adapters, "adapters go on a base model: set "
                  "--config.sample.checkpoint to it (params dir, .pt or diffusers folder)")
    if config.sample.checkpoint:
        _check_exists(config, "sample.checkpoint", "it should be an orbax params directory (the "
                      "converter's output), a training workdir, a diffusers folder or an "
                      "official .pt / .safetensors file")
    elif _is_local(workdir) and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        _fail("sample.checkpoint", "", f"mode={config.mode} then reads the latest checkpoint of "
              f"--workdir={workdir}, which has none: train there first (mode=train), or set "
              f"--config.sample.checkpoint=<params directory, .pt or .safetensors file>")


def _check_model(config) -> None:
    from dydit_jax.models import dit

    mc = config.model
    if mc.name == "custom":
        _check_positive(config, "model.hidden_size", "model.depth", "model.num_heads",
                        "model.patch_size")
        if mc.hidden_size % mc.num_heads:
            _fail("model.hidden_size", mc.hidden_size, f"must be divisible by "
                  f"config.model.num_heads={mc.num_heads}")
        patch = mc.patch_size
    else:
        from dydit_jax import families
        sizes = f"{{{','.join(dit.SIZES)}}}/{{2,4,8}}"
        names = ", ".join(f"{f.prefix}-{sizes}" for f in families.FAMILIES.values())
        try:
            family = families.family_of(config)
            patch = family.sizes(mc.name)["patch_size"]
        except ValueError:
            _fail("model.name", mc.name, f"valid: {names}, or 'custom' with "
                  f"config.model.hidden_size/depth/num_heads/patch_size")
        if family.flow and not config.transport.enabled:
            _fail("model.name", mc.name, "a SiT is a flow-matching model: set "
                  "config.transport.enabled=True")
    from dydit_jax import families
    from dydit_jax.data import VIDEO_SOURCES
    try:
        family = families.family_of(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.dynamic.enabled and not family.dynamic:
        _fail("dynamic.enabled", True, f"the {family.name} family has no dynamic mode yet")
    if family.video:
        _check_positive(config, "model.num_frames")
        _check_choice(config, "model.extras", (1, 2))
        from dydit_jax.models.latte import TOKEN_BLOCKS
        _check_choice(config, "model.token_blocks", TOKEN_BLOCKS)
        if config.data.name in VIDEO_SOURCES and config.data.num_frames != mc.num_frames:
            _fail("data.num_frames", config.data.num_frames, f"the clips must have the "
                  f"model's config.model.num_frames={mc.num_frames} frames")
        if mc.name == "custom" and mc.depth % 2:
            _fail("model.depth", mc.depth, "Latte's blocks come in (spatial, temporal) pairs: "
                  "the depth must be even")
    _check_positive(config, "model.input_size", "model.in_channels", "model.num_classes")
    if mc.input_size % patch:
        _fail("model.input_size", mc.input_size, f"must be divisible by the patch size {patch}")
    _check_choice(config, "model.dtype", DTYPES)
    _check_choice(config, "model.remat_policy", dit.REMAT_POLICIES)
    _check_choice(config, "model.numerics", tuple(dit.NUMERICS))


def _check_peft(config) -> None:
    pc = config.peft
    _check_choice(config, "peft.method", ("none", "lora", "tdlora"))
    _check_choice(config, "peft.export_naming", ("official", "diffusers"))
    _check_choice(config, "peft.base_dtype", ("compute", "float32", "bfloat16"))
    if config.sample.adapters and pc.method != "lora":
        _fail("peft.method", pc.method, "sample.adapters holds a plain LoRA: set "
              "--config.peft.method=lora")
    if config.mode == "export" and pc.method != "lora":
        _fail("peft.method", pc.method, "mode=export writes plain LoRA adapters (the PEFT "
              "format has no timestep mixing): a peft.method=lora run's workdir")
    if pc.method == "none":
        return
    try:
        peft_spec(config)
    except ValueError as e:
        raise ConfigError(f"config.{str(e)}") from None
    if config.mode == "train" and not config.train.init_from:
        _fail("train.init_from", config.train.init_from,
              f"peft.method={pc.method!r} fine-tunes a trained model with its weights frozen: "
              f"set train.init_from to it (a workdir, converted params or an official file)")


def peft_spec(config):
    """The `LoraSpec` of `config.peft`, or None for method "none"."""
    pc = config.peft
    if pc.method == "none":
        return None
    from dydit_jax.peft import ADALN_TARGETS, LoraSpec
    spec = LoraSpec.from_config(pc)
    if pc.adaln:
        import dataclasses
        spec = dataclasses.replace(spec, targets=f"({spec.targets})|({ADALN_TARGETS})")
    return spec


def _check_sample(config) -> None:
    """`sample` and the sampler keys of `evaluate`."""
    from dydit_jax import sampling

    sc, n = config.sample, config.model.num_classes
    bad = [c for c in sc.classes if isinstance(c, bool) or not isinstance(c, int)
           or not 0 <= c < n]
    if bad:
        _fail("sample.classes", sc.classes, f"class ids must be in [0, num_classes={n}) "
              f"(config.model.num_classes); not {', '.join(map(repr, bad))}")
    if sc.eta < 0:
        _fail("sample.eta", sc.eta, "DDIM's eta must be >= 0 (0: deterministic; 1: DDPM-like)")
    _check_choice(config, "sample.engine", sampling.SAMPLE_ENGINES)
    if sc.engine == "gathered" and not config.dynamic.enabled:
        _fail("sample.engine", sc.engine, "the gathered engine runs a dynamic model: set "
              "config.dynamic.enabled=True, or use engine=masked")
    for section in ("sample", "evaluate"):   # each has a sampler, num_steps and cfg_scale
        cfg_key = f"{section}.cfg_scale"
        if _get(config, cfg_key) < 0:
            _fail(cfg_key, _get(config, cfg_key), "the guidance scale must be >= 0 (1.0 "
                  "disables guidance, as any value <= 1 does; > 1 guides)")
        _check_choice(config, f"{section}.sampler", sampling.SAMPLERS)
        if not config.transport.enabled:   # flow models sample with config.transport's solver
            _check_num_steps(config, section)


def _check_num_steps(config, section: str) -> None:
    """`<section>.num_steps` respaces the diffusion's steps: 1..diffusion_steps, and for DDIM
    a count that an integer stride gives (`space_timesteps("ddimN")`)."""
    from dydit_jax.diffusion import space_timesteps

    key, total = f"{section}.num_steps", config.diffusion.diffusion_steps
    steps, sampler = _get(config, key), _get(config, f"{section}.sampler")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        _fail(key, steps, f"the {sampler} sampler's steps must be in [1, {total}] "
              f"(config.diffusion.diffusion_steps)")
    if sampler == "ddim":
        try:
            space_timesteps(total, f"ddim{steps}")
        except ValueError:
            counts = {len(range(0, total, k)) for k in range(1, total)}
            near = min(counts, key=lambda c: abs(c - steps))
            _fail(key, steps, f"DDIM takes every k-th of the {total} diffusion steps, which "
                  f"never gives {steps} steps: e.g. {near}")


def _check_data(config) -> None:
    from dydit_jax.data import SOURCES
    from dydit_jax.data.digits import NUM_CLASSES as DIGITS_CLASSES

    dc, n = config.data, config.model.num_classes
    _check_choice(config, "data.name", SOURCES)
    if config.mode not in ("train", "plot"):   # the modes that feed data labels to the model
        return
    if dc.name == "synthetic" and not 1 <= dc.num_classes <= n:
        _fail("data.num_classes", dc.num_classes, f"synthetic labels must be in [0, "
              f"num_classes={n}) (config.model.num_classes): 1..{n} classes")
    if dc.name == "digits" and n < DIGITS_CLASSES:
        _fail("model.num_classes", n, f"data.name=digits has labels 0..{DIGITS_CLASSES - 1}: "
              f"needs >= {DIGITS_CLASSES}")


def _check_transport(config) -> None:
    from dydit_jax import sampling, transport

    tc = config.transport
    _check_choice(config, "transport.path_type", tuple(transport.PATH_TYPES))
    _check_choice(config, "transport.prediction", tuple(transport.PREDICTIONS))
    _check_choice(config, "transport.loss_weight", tuple(transport.LOSS_WEIGHTS))
    _check_choice(config, "transport.sampler", sampling.FLOW_SAMPLERS)
    try:
        sampling.canonical_flow_method(tc.sampler, tc.method)
    except ValueError as e:
        _fail("transport.method", tc.method, f"{e} (case-insensitive)")
    if isinstance(tc.num_steps, bool) or not isinstance(tc.num_steps, int) or tc.num_steps < 2:
        _fail("transport.num_steps", tc.num_steps, "counts the solver's time grid points: "
              "must be >= 2")
    _check_choice(config, "transport.diffusion_form", transport.DIFFUSION_FORMS)
    if tc.last_step is not None and str(tc.last_step).lower() not in ("none", ""):
        _check_choice(config, "transport.last_step", transport.LAST_STEPS)


def _compare(cfg, ref, prefix: str, candidates) -> None:
    for key in cfg.keys():
        name = prefix + key
        if name == "pretrain":   # overrides of the config's own sections (_check_pretrain)
            continue
        if key not in ref:
            raise UnknownKeyError(f"unknown config key config.{name}"
                                  + _did_you_mean(name, candidates))
        if isinstance(ref[key], ml_collections.ConfigDict):
            _compare(cfg[key], ref[key], f"{name}.", candidates)

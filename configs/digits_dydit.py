"""DyDiT on the digits: fine-tune the digits DiT (configs/digits.py) to half its FLOPs.

First train the DiT, then fine-tune it with TDW + SDT routers and the FLOPs loss (lambda = 0.5):

    python -m dydit_jax.main --config=configs/digits.py --workdir=runs/digits
    python -m dydit_jax.main --config=configs/digits_dydit.py --workdir=runs/digits_dydit

The second run starts from the EMA weights of runs/digits (routers fresh: everything on, heads
and MLP groups sorted by importance), holds the FLOPs target at 1.0 for 100 steps, ramps it to
lambda over 300 steps and trains on at lambda (stage 1: dynamic + complete-model diffusion
losses + FLOPs loss). Expected: the logged flops_ratio reaches the target within 0.02 and the
sample grid (masked path) still shows recognisable digits. Args: lam, steps, init (workdir),
warmup, peft (none | lora | tdlora: the DyDiT++ PEFT recipe, base frozen, adapters + routers
trained at lr `peft_lr`; README "Digits DyDiT with TD-LoRA"):

    python -m dydit_jax.main --config=configs/digits_dydit.py:peft=tdlora \
        --workdir=runs/digits_dydit_tdlora
"""
from dydit_jax import config_lib


def get_config(arg=None):
    import importlib.util
    import os

    args = config_lib.parse_arg(arg, lam=0.5, steps=800, init="runs/digits", warmup=300,
                                peft="none", peft_lr=1e-3)
    spec = importlib.util.spec_from_file_location(
        "digits", os.path.join(os.path.dirname(__file__), "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    c = digits.get_config()
    c.dynamic.update(enabled=True, target=args.lam, warmup_steps=args.warmup, hold_steps=100,
                     stage=1, reorder=True)
    c.train.update(num_steps=args.steps, init_from=args.init, lr=3e-4)
    config_lib.apply_peft_arg(c, args.peft, args.peft_lr)
    return c

"""Flow matching on the digits: the digits model of configs/digits.py as a SiT; DyDiT on it.

Same data (scikit-learn's 8x8 digits upsampled to 16x16, one channel, 10 classes), model size
(D=96, depth 4, 4 heads, patch 2) and recipe (AdamW 1e-3, EMA 0.995, batch 32) as
configs/digits.py, trained with SiT's flow matching instead of the ADM diffusion: Linear path
x_t = t x1 + (1 - t) x0, the model regresses the velocity x1 - x0 at t ~ U[0, 1]. The model
keeps only its C prediction channels (learn_sigma off: a velocity model has no variance).
Samples: a 50-point Euler ODE from t = 0 (noise) to t = 1 (data), CFG 3.0 on the gray channel.

    python -m dydit_jax.main --config=configs/digits_sit.py --workdir=runs/digits_sit

Expected (measured on a busy 2-core CPU: 20 minutes for 2,000 steps): the loss (velocity MSE)
averages 0.94 over the first 50 steps and 0.23 over the last 50, and
`runs/digits_sit/samples/grid.png` shows recognisable digits (rows = classes 0..9); so does the
SDE sampler (`:sampler=sde`, Euler-Maruyama, w(t) = sigma_t, 50 points).

Args: steps (2000), size (16), batch (32), sampler (ode | sde), method (ode: euler | heun2 |
midpoint | rk4 | dopri5; sde: euler | heun), sample_steps (50), and for DyDiT fine-tuning of
the trained SiT: lam (> 0: the FLOPs ratio to reach), init (its workdir), warmup (300), peft
(none | lora | tdlora: base frozen, adapters + routers trained at lr peft_lr):

    python -m dydit_jax.main --config=configs/digits_sit.py:lam=0.5,init=runs/digits_sit \
        --workdir=runs/digits_sit_dydit

(the recipe of configs/digits_dydit.py: 800 steps at lr 3e-4, stage 1, target 1.0 for 100
steps then a ramp to lam over `warmup` steps; the flow-matching loss replaces the ADM one).
Expected (measured, 3.5 min on a quiet 2-core CPU after 6.7 min for the SiT): FLOPs ratio 0.505
at step 800 (target 0.5), velocity loss 0.232 (complete model 0.222); the last block's token
router keeps ~22 % of the tokens. The EMA lags the ramp (noise-free ratio 0.73 vs 0.50 for the
raw parameters): sample with `--config.sample.use_ema=False`, through the engine with
`--config.sample.engine=gathered`.
"""
import importlib.util
import os

from dydit_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, steps=2000, size=16, batch=32, sampler="ode",
                                method="euler", sample_steps=50, lam=0.0, init="", warmup=300,
                                peft="none", peft_lr=1e-3)
    spec = importlib.util.spec_from_file_location(
        "digits", os.path.join(os.path.dirname(__file__), "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    c = digits.get_config(f"steps={args.steps},size={args.size},batch={args.batch}")
    c.model.learn_sigma = False
    c.transport.update(enabled=True, path_type="Linear", prediction="velocity",
                       sampler=args.sampler, method=args.method, num_steps=args.sample_steps)
    if args.lam > 0:
        config_lib.apply_finetune_args(c, args, arg, "digits_sit.py", reorder=True)
    config_lib.apply_peft_arg(c, args.peft, args.peft_lr)
    return c

"""Sampling: one jitted function per (model, diffusion, sampler, batch shape), plus image output.

    sample = make_sample_fn(model, diffusion, sampler="ddpm")      # CFG, release layout
    x0 = sample(variables, jax.random.PRNGKey(0), labels, 4.0)     # [B, H, W, C] float32
    images = to_uint8(vae_decode(x0 / 0.18215))                    # [B, H', W', 3] uint8
    save_grid_png(images, "sample.png", nrow=4)
    save_npz(images, "samples.npz", labels=labels)                 # ADM evaluator layout

Flow-matching SiTs sample through `make_flow_sample_fn(model, transport, sampler="ode")` (the
transport's ODE / SDE samplers), with the same call, CFG layout and output helpers.

Classifier-free guidance follows the release's sample.py / sample_ddp.py: z is drawn once for
the B requested samples and duplicated, the labels become [y; null] with null = num_classes,
the loop runs `model.forward_with_cfg` on the 2B rows and the conditional half is returned.

Compilation: `make_sample_fn` builds ONE `jax.jit` whose traced arguments are the parameters,
the rng key, the labels and `cfg_scale`. A full 250-step DDPM loop is a single `lax.scan`, so
it compiles once per batch size; a new seed, new label values or a new guidance scale reuse
the compiled program (`cfg_scale` is always passed as a float32 array, never a static value).

Randomness: with `rng`, x_T = normal(split_loop_key(rng)[0], [B, H, W, C]) (the same x_T as
the unguided sampler) and step i uses `loop_step_noise(step_key, i, [2B, H, W, C])` (the
loop's own noise, for all 2B rows, as the release's `randn_like` on the doubled batch). Under
JAX's partitionable threefry (`jax_threefry_partitionable`, the default since JAX 0.5) the
first B rows of a [2B, ...] draw equal a [B, ...] draw, so a guided run at `cfg_scale=1` with
`guide_channels` covering the guided channels follows the unguided run for the same `rng`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.diffusion import split_loop_key
from dydit_jax.models.dit import check_labels

__all__ = ["make_sample_fn", "make_flow_sample_fn", "check_finite", "sample_shardings", "to_uint8", "make_grid", "save_grid_png",
           "save_npz"]

SAMPLERS = ("ddpm", "ddim")
# config.sample.engine: masked (the release's path) | static (complete model) | gathered
# (the dynamic inference engine, dydit_jax/engine)
SAMPLE_ENGINES = ("masked", "static", "gathered")


def _pair(size) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def model_latent_shape(model, latent_shape: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """The per-sample shape a sampler draws: `latent_shape` if given, else the model's
    (H, W, in_channels)."""
    if latent_shape is None:
        latent_shape = tuple(model.dummy_inputs(1)[0].shape[1:])   # video: (F, H, W, C)
    return tuple(int(s) for s in latent_shape)


def _as_variables(params):
    """Accept either Flax variables {"params": ...} or the bare parameter tree."""
    if isinstance(params, dict) or hasattr(params, "keys"):
        if "params" in params:
            return params
    return {"params": params}


def make_sample_fn(
    model,
    diffusion,
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = False,
    guide_channels: Optional[int] = 3,
    use_cfg: bool = True,
    latent_shape: Optional[Sequence[int]] = None,
    progress: bool = False,
    complete: bool = False,
    in_shardings: Any = None,
    out_shardings: Any = None,
) -> Callable:
    """Build `sample(params, rng, labels, cfg_scale) -> x0 [B, H, W, C]` (float32).

    :param model: a Flax DiT (or any module with `__call__(x, t, y)`, `forward_with_cfg(x, t, y,
        cfg_scale, guide_channels=...)`, `input_size`, `in_channels`, `num_classes`).
    :param diffusion: a `GaussianDiffusion` / `SpacedDiffusion` (`create_diffusion("250")` for
        DDPM, `create_diffusion("ddim25")` + `sampler="ddim"` for DDIM).
    :param sampler: "ddpm" (`p_sample_loop`) or "ddim" (`ddim_sample_loop` with `eta`).
    :param clip_denoised: clip predicted x0 to [-1, 1] (False in the release's sample_ddp.py).
    :param guide_channels: eps channels guided by CFG; 3 reproduces the release, None guides all
        `in_channels` (see `DiT.forward_with_cfg`).
    :param use_cfg: False runs the plain conditional model on the B rows (`cfg_scale` is then
        accepted and ignored), as sample_ddp.py does for `cfg_scale <= 1`.
    :param latent_shape: (H, W, C) of one sample; default from `model.input_size` and
        `model.in_channels`.
    :param progress: host-side progress bar at every step (a `jax.debug.callback`).
    :param complete: for a dynamic (DyDiT) model, run the complete (static) path instead of the
        masked one.
    :param in_shardings, out_shardings: passed to `jax.jit` unchanged, for the arguments
        `(variables, rng, labels, cfg_scale)` and the output; see :func:`sample_shardings`.
        The first entry applies to the variables dict `{"params": ...}` (bare params are
        wrapped before the call): a single sharding, or a pytree prefix of the variables.
        None (default) is a plain `jax.jit`.

    `params` is Flax variables (`{"params": ...}`, as `convert.from_pytorch` returns) or the bare
    parameter tree. `labels` is int [B] (values in [0, num_classes)), `cfg_scale` a float.
    The returned callable has attributes `jitted` (the `jax.jit` object: `.lower(...)`,
    `._cache_size()`), `trace_count()` (how many times it has been traced, i.e. compiled) and
    `latent_shape`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    latent_shape = model_latent_shape(model, latent_shape)
    null_label = int(model.num_classes)
    counter = {"traces": 0}
    dynamic = bool(getattr(model, "dynamic", False))
    # A dynamic model runs its masked path, or with complete=True its static path; the masks
    # it also returns are dropped here (the width plan engine uses them).
    dyn_kw = {"complete": complete} if dynamic else {}

    def _output(out):
        return out[0] if dynamic else out

    def run_loop(model_fn, shape, rng, noise):
        kw = dict(model_kwargs=None, clip_denoised=clip_denoised, progress=progress,
                  noise=noise, dtype=jnp.float32)
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, shape, rng, **kw)
        return diffusion.ddim_sample_loop(model_fn, shape, rng, eta=eta, **kw)

    def sample_impl(variables, rng, labels, cfg_scale):
        counter["traces"] += 1  # Python side effect: runs once per trace (= per compile)
        b = labels.shape[0]
        shape = (b,) + latent_shape
        if not use_cfg:
            def model_fn(x, t):
                return _output(model.apply(variables, x, t, labels if model.conditional else None,
                                           **dyn_kw))
            return run_loop(model_fn, shape, rng, None)

        z = jax.random.normal(split_loop_key(rng)[0], shape, jnp.float32)
        z = jnp.concatenate([z, z], axis=0)
        y = jnp.concatenate([labels, jnp.full((b,), null_label, labels.dtype)], axis=0)

        def model_fn(x, t):
            return _output(model.apply(variables, x, t, y, cfg_scale,
                                       guide_channels=guide_channels,
                                       method="forward_with_cfg", **dyn_kw))
        samples = run_loop(model_fn, z.shape, rng, z)
        return samples[:b]  # drop the null-class half

    return _jitted_sample_fn(sample_impl, counter, latent_shape, use_cfg, in_shardings,
                             out_shardings, model)


def _jitted_sample_fn(sample_impl, counter, latent_shape, use_cfg, in_shardings,
                      out_shardings, model) -> Callable:
    """`sample(params, rng, labels, cfg_scale)` around ONE `jax.jit` of `sample_impl`; concrete
    labels are checked against `model`'s label table first (inside the jit an id outside it
    would silently read a clamped row). The null label is a valid (unconditional) label."""
    allow_null = getattr(model, "class_dropout_prob", 0.0) > 0
    jit_kw = {}
    if in_shardings is not None:
        jit_kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        jit_kw["out_shardings"] = out_shardings
    jitted = jax.jit(sample_impl, **jit_kw)

    def sample(params, rng, labels, cfg_scale=1.0):
        # Normalise dtypes so that a Python float, a numpy scalar or an int label list all hit
        # the same compiled program (a weak-typed Python float would be a different signature).
        if isinstance(labels, jax.Array):
            labels = labels.astype(jnp.int32) if labels.dtype != jnp.int32 else labels
        else:
            labels = np.asarray(labels).astype(np.int32)
        if labels.ndim != 1:
            raise ValueError(f"labels must have shape [B], got {tuple(labels.shape)}")
        if not isinstance(labels, jax.core.Tracer) and getattr(labels, "is_fully_addressable",
                                                                True):
            check_labels(labels, model.num_classes, allow_null)
        if isinstance(cfg_scale, jax.Array):
            cfg_scale = cfg_scale.astype(jnp.float32).reshape(())
        else:
            cfg_scale = np.float32(cfg_scale)
        return jitted(_as_variables(params), rng, labels, cfg_scale)

    sample.jitted = jitted
    sample.latent_shape = latent_shape
    sample.use_cfg = use_cfg
    sample.trace_count = lambda: counter["traces"]
    return sample


FLOW_SAMPLERS = ("ode", "sde")


def canonical_flow_method(sampler: str, method: str) -> str:
    """The transport's spelling of a flow sampler method (names are case-insensitive)."""
    from dydit_jax.transport import ADAPTIVE_METHODS, FIXED_GRID_METHODS, SDE_METHODS

    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r}; expected one of {FLOW_SAMPLERS}")
    methods = SDE_METHODS if sampler == "sde" else FIXED_GRID_METHODS + ADAPTIVE_METHODS
    by_name = {m.lower(): m for m in methods}
    if str(method).lower() not in by_name:
        raise ValueError(f"unknown {sampler} method {method!r}; expected one of {methods}")
    return by_name[str(method).lower()]


def make_flow_solver(transport, *, sampler: str = "ode", method: str = "euler",
                     num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
                     diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
                     last_step: Optional[str] = "Mean", last_step_size: float = 0.04) -> Callable:
    """`solve(init, model_fn, **kw) -> [num_steps, rows, ...]` of `transport.Sampler` (the last
    entry is the sample; the SDE one takes `rng=`). Arguments as in :func:`make_flow_sample_fn`.
    Shared by the masked sampler and the gathered engine, so both integrate identically.
    `solve.with_stats(init, model_fn, **kw)` also returns the solver's step counts
    (`num_accepted_steps`, `num_rejected_steps`: int32 scalars)."""
    from dydit_jax.transport import Sampler

    method = canonical_flow_method(sampler, method)
    flow = Sampler(transport)
    if sampler == "ode":
        return flow.sample_ode(sampling_method=method, num_steps=num_steps, atol=atol,
                               rtol=rtol)
    if last_step is not None and str(last_step).lower() in ("none", ""):
        last_step = None
    solve = flow.sample_sde(sampling_method=method, diffusion_form=diffusion_form,
                            diffusion_norm=diffusion_norm, last_step=last_step,
                            last_step_size=last_step_size, num_steps=num_steps)

    def with_stats(init, model_fn, **kw):  # a fixed grid: num_steps - 1 stochastic steps
        return solve(init, model_fn, **kw), {"num_accepted_steps": jnp.int32(num_steps - 1),
                                             "num_rejected_steps": jnp.int32(0)}
    solve.with_stats = with_stats
    return solve


def make_flow_sample_fn(
    model,
    transport,
    *,
    sampler: str = "ode",
    method: str = "euler",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: Optional[str] = "Mean",
    last_step_size: float = 0.04,
    guide_channels: Optional[int] = 3,
    use_cfg: bool = True,
    latent_shape: Optional[Sequence[int]] = None,
    complete: bool = False,
    in_shardings: Any = None,
    out_shardings: Any = None,
    return_stats: bool = False,
) -> Callable:
    """Build `sample(params, rng, labels, cfg_scale) -> x1 [B, H, W, C]` (float32) for a
    flow-matching SiT, with the samplers of `dydit_jax.transport.Sampler`; with
    `return_stats`, `(x1, stats)`: the solver's accepted and rejected step counts.

    :param model: a Flax SiT (`__call__(x, t, y)` with t in [0, 1] returning C channels,
        `forward_with_cfg`); a dynamic one runs its masked path, or its static path with
        `complete=True`.
    :param transport: `create_transport(...)` (the model's path and prediction).
    :param sampler: "ode" (`Sampler.sample_ode`) or "sde" (`Sampler.sample_sde`).
    :param method: ode: "euler", "heun2", "midpoint", "heun3", "rk4" (fixed grid) or
        "dopri5", ... (adaptive, `atol`/`rtol`); sde: "Euler" (Euler-Maruyama) or "Heun".
        Case-insensitive.
    :param num_steps: points of the time grid (noise at t ~ 0 to data at t ~ 1).
    :param diffusion_form, diffusion_norm, last_step, last_step_size: the SDE's diffusion
        coefficient and final deterministic step (`last_step` None or "None": none).
    :param guide_channels, use_cfg, latent_shape, in_shardings, out_shardings: as in
        :func:`make_sample_fn`.

    Classifier-free guidance follows the SiT release's sample.py / sample_ddp.py: z is drawn
    once for the B samples and duplicated, the labels become [y; null], the sampler integrates
    `model.forward_with_cfg` on the 2B rows and the conditional half is returned. ONE `jax.jit`
    (a fixed-grid solver is one `lax.scan`); `cfg_scale`, the labels and the rng are traced.
    Randomness: `k_z, k_sde = split(rng)`; z = normal(k_z, [B, H, W, C]); the SDE draws its
    step noise from `k_sde` for all (2B) rows.
    """
    solve = make_flow_solver(transport, sampler=sampler, method=method, num_steps=num_steps,
                             atol=atol, rtol=rtol, diffusion_form=diffusion_form,
                             diffusion_norm=diffusion_norm, last_step=last_step,
                             last_step_size=last_step_size)
    latent_shape = model_latent_shape(model, latent_shape)
    null_label = int(model.num_classes)
    counter = {"traces": 0}
    dyn_kw = {"complete": complete} if getattr(model, "dynamic", False) else {}

    def sample_impl(variables, rng, labels, cfg_scale):
        counter["traces"] += 1  # Python side effect: runs once per trace (= per compile)
        b = labels.shape[0]
        k_z, k_sde = jax.random.split(rng)
        z = jax.random.normal(k_z, (b,) + latent_shape, jnp.float32)
        if use_cfg:
            z = jnp.concatenate([z, z], axis=0)
            y = jnp.concatenate([labels, jnp.full((b,), null_label, labels.dtype)], axis=0)

            def model_fn(x, t):
                return model.apply(variables, x, t, y, cfg_scale, guide_channels=guide_channels,
                                   method="forward_with_cfg", **dyn_kw)
        else:
            def model_fn(x, t):
                return model.apply(variables, x, t, labels if model.conditional else None,
                                   **dyn_kw)
        kw = {"rng": k_sde} if sampler == "sde" else {}
        # xs: [num_steps, rows, H, W, C]; the last is the sample
        xs, stats = solve.with_stats(z, model_fn, **kw)
        x1 = xs[-1][:b].astype(jnp.float32)  # drop the null-class half
        return (x1, stats) if return_stats else x1

    if return_stats and out_shardings is not None:
        out_shardings = (out_shardings, None)  # the step counts: wherever XLA puts them
    return _jitted_sample_fn(sample_impl, counter, latent_shape, use_cfg, in_shardings,
                             out_shardings, model)


def check_finite(samples, config=None):
    """`samples` unchanged, or FloatingPointError if any value is NaN or inf (checked before the
    uint8 conversion clips them away). With `config`, the message names the likely cause."""
    if bool(jnp.all(jnp.isfinite(jnp.asarray(samples)))):
        return samples
    hint = " The model or the sampler diverged."
    if config is not None and config.transport.enabled:
        from dydit_jax.transport import ADAPTIVE_METHODS
        method = str(config.transport.method).lower()
        if config.transport.sampler == "ode" and method in ADAPTIVE_METHODS:
            hint = (f" The adaptive ODE solver {method!r} fills the points it did not reach "
                    "with inf when it runs out of steps (4096): loosen config.transport.atol / "
                    "rtol or use a fixed-grid method (euler, heun2, rk4).")
        elif config.transport.diffusion_form == "SBDM":
            hint = (" diffusion_form='SBDM' divides by t and is infinite at t0 = 0 for Linear "
                    "and GVP paths: use config.transport.diffusion_form='sigma'.")
    raise FloatingPointError("sampling produced non-finite values." + hint)


def sample_shardings(mesh, batch_axes: Union[str, Tuple[str, ...]] = "data",
                     params_sharding: Any = None):
    """`dict(in_shardings=..., out_shardings=...)` for :func:`make_sample_fn` (and
    :func:`make_flow_sample_fn`) on `mesh`.

    Labels and the output are split over `batch_axes` on their leading axis; the rng key and
    `cfg_scale` are replicated; `params_sharding` (one sharding, or a pytree of them matching
    the params or the variables) defaults to replicated. The batch size must divide by the number of devices along
    `batch_axes` (and the CFG batch 2B then does too).
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(batch_axes))
    if params_sharding is None:
        params = replicated
    elif isinstance(params_sharding, jax.sharding.Sharding):
        params = params_sharding
    else:  # a pytree of shardings for the bare params or for the variables
        params = _as_variables(params_sharding)
    return dict(in_shardings=(params, replicated, batch, replicated), out_shardings=batch)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

def to_uint8(x):
    """Images in [-1, 1] (float, NHWC) -> uint8 NHWC, exactly as the release's sample_ddp.py:

        torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)

    i.e. floor(clip(127.5 x + 128, 0, 255)) in float32 (the uint8 cast truncates), which is
    round-half-up of (x + 1) * 127.5. sample.py's `save_image(normalize=True,
    value_range=(-1, 1))` computes floor(clip((clip(x, -1, 1) + 1) / 2 * 255 + 0.5, 0, 255)):
    the same rounding, different float32 arithmetic, so the two can differ by one level only
    where 127.5 (x + 1) is within an ulp of a half-integer. This follows sample_ddp.py (the
    FID path), bit for bit in numpy, eagerly and under jit. NaN maps to 0. A jax array (also
    inside jit) gives a jax array, anything else numpy.
    """
    if isinstance(x, jax.Array):
        # Under jit, XLA:CPU contracts `127.5 * x + 128` into an FMA (one rounding instead of
        # torch's two), which moves ~1 value in 1e5 by one level. 128x and 0.5x are exact, so
        # 128x - 0.5x is float32(127.5 x) whether or not it is contracted.
        x = x.astype(jnp.float32)
        v = jnp.clip((128.0 * x - 0.5 * x) + 128.0, 0.0, 255.0)
        return jnp.nan_to_num(v, nan=0.0).astype(jnp.uint8)
    v = np.clip(np.float32(127.5) * np.asarray(x, np.float32) + np.float32(128.0), 0.0, 255.0)
    return np.nan_to_num(v, nan=0.0).astype(np.uint8)


def _check_uint8_nhwc(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images (use to_uint8 first), got {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    return images


def make_grid(images_uint8, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """torchvision's `make_grid` layout on uint8 NHWC: `nrow` images per row, `padding` pixels
    of `pad_value` around and between them; a single image is returned unpadded and one-channel
    images become RGB, as torchvision does. Returns [H', W', C] uint8."""
    images = _check_uint8_nhwc(images_uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    xmaps = min(int(nrow), n)
    ymaps = int(math.ceil(n / xmaps))
    hh, ww = h + padding, w + padding
    grid = np.full((hh * ymaps + padding, ww * xmaps + padding, c), pad_value, np.uint8)
    for k in range(n):
        y, x = divmod(k, xmaps)
        grid[y * hh + padding: y * hh + padding + h, x * ww + padding: x * ww + padding + w] = \
            images[k]
    return grid


def save_grid_png(images_uint8, path: Union[str, os.PathLike], nrow: int = 8,
                  padding: int = 2, pad_value: int = 0) -> str:
    """Save uint8 NHWC images as one PNG grid (sample.py's `save_image(..., nrow=nrow)` layout,
    see :func:`make_grid`). Returns the path."""
    from PIL import Image

    grid = make_grid(images_uint8, nrow=nrow, padding=padding, pad_value=pad_value)
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_video_files(videos_uint8, out_dir: Union[str, os.PathLike], labels=None,
                     nrow: int = 8, fps: int = 4) -> Tuple[str, ...]:
    """Clips uint8 [N, F, H, W, C] as `grid.png` (a strip grid: one row per clip, its F
    frames left to right), `samples.gif` (an animated grid of all clips, `nrow` per row,
    looping at `fps`) and `samples.npz` (`arr_0` [N, F, H, W, C] uint8, `arr_1` labels).
    Returns the file names."""
    from PIL import Image
    videos = np.asarray(videos_uint8)
    if videos.ndim != 5 or videos.dtype != np.uint8:
        raise ValueError(f"expected uint8 clips [N, F, H, W, C], got {videos.dtype} "
                         f"{videos.shape}")
    n, f = videos.shape[:2]
    out_dir = os.fspath(out_dir)
    save_grid_png(videos.reshape((n * f,) + videos.shape[2:]), os.path.join(out_dir, "grid.png"),
                  nrow=f)
    frames = [Image.fromarray(make_grid(videos[:, j], nrow=nrow)) for j in range(f)]
    frames[0].save(os.path.join(out_dir, "samples.gif"), save_all=True,
                   append_images=frames[1:], duration=int(1000 / fps), loop=0)
    arrays = {"arr_0": videos}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels).astype(np.int64)
    np.savez(os.path.join(out_dir, "samples.npz"), **arrays)
    return ("grid.png", "samples.gif", "samples.npz")


def save_npz(images_uint8, path: Union[str, os.PathLike], labels=None) -> str:
    """Save samples in the ADM evaluation layout: `arr_0` uint8 [N, H, W, C] and, if given,
    `arr_1` the int64 labels [N] (as guided-diffusion's image_sample.py writes them). The ADM
    evaluator (`evaluations/evaluator.py`) reads `arr_0`. Returns the written path (numpy
    appends ".npz" when missing)."""
    images = _check_uint8_nhwc(images_uint8)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}")
        arrays["arr_1"] = labels
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return path

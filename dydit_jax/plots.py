"""Plots of a dynamic model's routing: width vs timestep, and token masks over a sample.

    python -m dydit_jax.main --config=configs/digits_dydit.py --workdir=runs/digits_dydit \
        --config.mode=plot

writes `plots/<weights>/width_heatmap.png` (active heads and MLP groups of every block for
t = 0..T-1) and `plots/<weights>/token_masks.png` (which tokens of a few samples run the MLP,
per block, at a few timesteps along a sampling trajectory's noise levels), `<weights>` being
e.g. `step000800`.

A video model (Latte: spatial and temporal blocks, clips [B, F, H, W, C]) labels its blocks
S0, T1, S2, ... in the heat map, and its token figure has one panel per clip and t: the noisy
input frames on top and below them one row of F per-frame token maps per block.

Flow-matching models (`config.transport.enabled`, a dynamic SiT) have a continuous time
t in [0, 1] with t = 0 the noise and t = 1 the data: the heat map then spans a dense grid of
[0, 1] and the token masks are those of points x_t of the transport's path between a noise
draw and the data, at a few t in (0, 1).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.models.dit import DiTBlock, eval_width_masks
from dydit_jax.transport import Transport

# Times of the token-mask figure: ADM timesteps (0 = clean) and flow times (1 = data).
DIFFUSION_TIMES = (50, 250, 500, 750, 950)
FLOW_TIMES = (0.05, 0.25, 0.5, 0.75, 0.95)


def width_masks_over_t(model, params, timesteps):
    """Eval-mode head and group masks [T, L, H] (bool, index 0 included) for the timesteps."""
    logits = model.apply({"params": params}, jnp.asarray(timesteps), method=model.width_logits)
    return tuple(np.asarray(m) for m in eval_width_masks(*logits, tau=DiTBlock.tau))


def heatmap_times(num_timesteps: int = 1000, flow: bool = False) -> np.ndarray:
    """The heat map's t axis: the ADM's integer timesteps 0..T-1, or for a flow model
    `num_timesteps` points spanning its continuous time [0, 1] (float32, as its samplers
    pass t)."""
    if flow:
        return np.linspace(0.0, 1.0, num_timesteps, dtype=np.float32)
    return np.arange(num_timesteps)


def block_labels(model):
    """Block names by kind, e.g. ["S0", "T1", "S2", "T3"] for a Latte; None for a model whose
    blocks are all of one kind (DiT, SiT: the plots number them 0..L-1)."""
    kinds = model.block_kinds
    if len(kinds) == 1:
        return None
    return [f"{kinds[l % len(kinds)][0].upper()}{l}" for l in range(model.depth)]


def plot_width_heatmap(model, params, path: str, num_timesteps: int = 1000,
                       flow: bool = False):
    """Active heads and MLP groups per block over t (`heatmap_times`). Returns the times and
    the masks plotted: (t [T], head masks [T, L, H], group masks [T, L, H])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = heatmap_times(num_timesteps, flow)
    heads, groups = width_masks_over_t(model, params, t)
    fig, axes = plt.subplots(2, 1, figsize=(10, 1.2 + 0.35 * model.depth * 2), sharex=True)
    labels = block_labels(model)
    kinds = "" if labels is None else "; blocks S spatial, T temporal"
    for ax, masks, name in ((axes[0], heads, "attention heads"), (axes[1], groups, "MLP groups")):
        active = masks.sum(-1).T  # [L, T]
        im = ax.imshow(active, aspect="auto", cmap="viridis", vmin=1, vmax=model.num_heads,
                       extent=(t[0], t[-1], model.depth - 0.5, -0.5),
                       interpolation="nearest")
        ax.set_ylabel("block")
        if labels is not None:
            ax.set_yticks(range(model.depth))
            ax.set_yticklabels(labels, fontsize=7)
        ax.set_title(f"active {name} (of {model.num_heads}{kinds})")
        fig.colorbar(im, ax=ax)
    axes[1].set_xlabel("flow time t (0 = noise, 1 = data)" if flow else
                       "diffusion timestep t (0 = clean, noise grows to the right)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return t, heads, groups


def noisy_images(process, images, t, rng):
    """x_t of the data `images` at times t [B]: the ADM diffusion's `q_sample` (integer t), or
    for a flow `Transport` its path between a noise draw x0 and the data x1 (float t)."""
    if isinstance(process, Transport):
        x0 = jax.random.normal(rng, images.shape, images.dtype)
        return process.path_sampler.compute_xt(t, x0, images)
    return process.q_sample(images, t, rng=rng)


def plot_token_masks(model, params, process, images, labels, path: str, timesteps=None,
                     seed: int = 0):
    """Token masks of every block for noisy versions x_t of `images` (NHWC in [-1, 1], or clips
    [B, F, H, W, C] for a video model).

    `process`: the ADM diffusion or a flow model's transport (`noisy_images`); `timesteps`
    default to `DIFFUSION_TIMES` or `FLOW_TIMES`; `labels` are not passed to an unconditional
    model (`model.conditional` False).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow = isinstance(process, Transport)
    if timesteps is None:
        timesteps = FLOW_TIMES if flow else DIFFUSION_TIMES
    gh, gw = model.grid_size
    clips = np.ndim(images) == 5
    n, depth = len(images), model.depth
    frames = np.shape(images)[1] if clips else 1
    y = jnp.asarray(labels) if model.conditional else None
    rng = jax.random.PRNGKey(seed)
    apply = jax.jit(model.apply)   # one compile for all t
    noisy, masks = [], []   # per t: x_t [n, (F,) H, W, C], token masks [n, L, F, gh, gw]
    for j, t_orig in enumerate(timesteps):
        t = jnp.full((n,), t_orig, jnp.float32 if flow else jnp.int32)
        x_t = noisy_images(process, jnp.asarray(images), t, jax.random.fold_in(rng, j))
        _, aux = apply({"params": params}, x_t, t, y)
        noisy.append(np.asarray(x_t))
        masks.append(np.asarray(aux["token_masks"]).reshape(n, depth, frames, gh, gw))
    if clips:
        fig, image = _clip_token_figure(plt, model, noisy, masks, timesteps)
    else:
        fig, image = _image_token_figure(plt, noisy, masks, timesteps)
    total = float(np.mean([m.mean() for m in masks]))
    if total == 1.0:
        headline = ("every token runs the MLP in every block at these t: the token routers "
                    "skip nothing here (the savings are the TDW widths)")
    else:
        headline = (f"tokens that run the MLP (bright = kept, dark = skipped): "
                    f"{total:.1%} overall")
    fig.suptitle(headline, fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.92, 0.98))
    bar = fig.add_axes((0.94, 0.3, 0.015, 0.4))
    fig.colorbar(image, cax=bar, ticks=(0, 1)).ax.set_yticklabels(["skipped", "kept"],
                                                                  fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"token masks: {headline}")
    return timesteps


def _image_token_figure(plt, noisy, masks, timesteps):
    """Rows (t, sample), columns: x_t, then block 0..L-1's token map. Returns (fig, the last
    mask image, for the colour bar)."""
    n, depth = masks[0].shape[:2]
    fig, axes = plt.subplots(n * len(timesteps), depth + 1,
                             figsize=(1.4 * (depth + 1), 1.4 * n * len(timesteps)))
    axes = np.asarray(axes).reshape(n * len(timesteps), depth + 1)
    image = None
    for j, t_orig in enumerate(timesteps):
        token = masks[j][:, :, 0]
        for i in range(n):
            row = axes[j * n + i]
            row[0].imshow(noisy[j][i].mean(-1), cmap="gray")
            row[0].set_title(f"x_t, t={t_orig}", fontsize=7)
            for l in range(depth):
                image = row[l + 1].imshow(token[i, l], cmap="magma", vmin=0, vmax=1)
                row[l + 1].set_title(f"block {l}: {token[i, l].mean():.0%}", fontsize=7)
            for ax in row:
                ax.axis("off")
    return fig, image


# Inches per frame in the clip figure.
TILE_INCHES = 0.4


def clip_panel(clip: np.ndarray, token: np.ndarray, cmap) -> np.ndarray:
    """One clip's token figure panel as an RGB image [rows, cols, 3] on white: the frames of
    `clip` [F, H, W] (x_t averaged over channels, gray over the clip's range) left to right,
    and below them one row per block of the token maps `token` [L, F, gh, gw] (in `cmap`,
    each token drawn over the p x p pixels of its patch, so a frame's maps sit under it)."""
    f, h, w = clip.shape
    depth, _, gh, gw = token.shape
    gap = max(1, h // 8)
    lo, hi = float(clip.min()), float(clip.max())
    gray = (clip - lo) / (hi - lo) if hi > lo else np.zeros_like(clip)
    rows = [np.repeat(gray[..., None], 3, -1)]
    for l in range(depth):
        maps = np.repeat(np.repeat(token[l], h // gh, axis=1), w // gw, axis=2)
        rows.append(np.asarray(cmap(maps))[..., :3])
    out = np.ones(((depth + 1) * (h + gap) + gap, f * (w + gap) - gap, 3), np.float32)
    for r, row in enumerate(rows):
        top = r * (h + gap) + (2 * gap if r else 0)   # a wider gap under the frames
        for i in range(f):
            out[top:top + h, i * (w + gap):i * (w + gap) + w] = row[i]
    return out


def _clip_token_figure(plt, model, noisy, masks, timesteps):
    """Panels rows = clips, columns = t (`clip_panel`), the block rows labelled with the block
    (S/T) and its share of kept tokens. Returns (fig, the mask colour scale for the bar)."""
    import matplotlib
    n, depth, frames = masks[0].shape[:3]
    h, w = noisy[0].shape[2:4]
    gap = max(1, h // 8)
    names = block_labels(model) or [f"block {l}" for l in range(depth)]
    cmap = matplotlib.colormaps["magma"]
    fig, axes = plt.subplots(n, len(timesteps), squeeze=False,
                             figsize=(len(timesteps) * (frames * TILE_INCHES + 0.9) + 0.6,
                                      n * ((depth + 1) * TILE_INCHES + 0.7) + 0.4))
    for i in range(n):
        for j, t_orig in enumerate(timesteps):
            ax, token = axes[i, j], masks[j][i]                           # [L, F, gh, gw]
            ax.imshow(clip_panel(noisy[j][i].mean(-1), token, cmap), interpolation="nearest")
            ax.set_title(f"clip {i}, t={t_orig}", fontsize=7)
            centres = [h / 2] + [r * (h + gap) + 2 * gap + h / 2 for r in range(1, depth + 1)]
            ax.set_yticks(np.asarray(centres) - 0.5)
            ax.set_yticklabels(["x_t"] + [f"{names[l]} {token[l].mean():.0%}"
                                          for l in range(depth)], fontsize=6)
            ax.set_xticks(np.arange(frames) * (w + gap) + w / 2 - 0.5)
            ax.set_xticklabels(range(frames), fontsize=6)
            ax.set_xlabel("frame", fontsize=7)
            ax.tick_params(length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap)
    return fig, scale


def plot_from_workdir(config, workdir: str):
    """The mode `plot`: both figures for the workdir's latest (EMA) parameters.

    Returns what was plotted: {"width_t", "head_masks", "group_masks"} of the heat map and
    "token_t", the times of the token masks.
    """
    from dydit_jax import data as data_lib
    from dydit_jax.generate import load_weights
    from dydit_jax.train import build_diffusion, build_model, build_transport

    model = build_model(config)
    if not model.dynamic:
        raise ValueError("plots show a dynamic model's routing: set config.dynamic.enabled")
    weights = load_weights(config, workdir, model)
    params = weights.params
    # One folder per weights (step-stamped for workdir checkpoints): plots of a later step
    # land beside the earlier ones instead of over them.
    out = os.path.join(workdir, "plots", weights.name)
    if os.path.isdir(out) and os.listdir(out):
        print(f"{out} already holds plots of these weights: rewriting them (same weights, "
              f"same figures)")
    os.makedirs(out, exist_ok=True)
    flow = config.transport.enabled
    if flow:
        process, num_timesteps = build_transport(config), 1000
    else:
        process = build_diffusion(config)
        num_timesteps = process.num_timesteps
    width_t, heads, groups = plot_width_heatmap(
        model, params, os.path.join(out, "width_heatmap.png"), num_timesteps, flow=flow)
    source = data_lib.create_source(config.data, local_batch_size=2)
    batch = source.next()
    source.close()
    from dydit_jax.config_lib import peft_spec
    from dydit_jax.peft import PeftModel, has_adapters
    # Token routers read the residual stream, which adapters change (width routers read E_t,
    # which they do not): the token maps run the adapted model.
    token_model = PeftModel(model, peft_spec(config)) if has_adapters(params) else model
    token_t = plot_token_masks(token_model, params, process, batch["image"], batch.get("label"),
                               os.path.join(out, "token_masks.png"))
    print(f"wrote {out}/width_heatmap.png and {out}/token_masks.png")
    return dict(width_t=width_t, head_masks=heads, group_masks=groups, token_t=token_t)

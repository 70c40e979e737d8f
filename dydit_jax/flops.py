"""FLOPs accounting for DiT / DyDiT, in MACs (multiply-accumulates), the DiT paper's convention.

The DiT paper's "Gflops" are MACs of one forward pass of one sample: DiT-XL/2 at 256 px
(latent 32x32x4) is 118.64 "Gflops" although a matmul-only count gives 118.62 G
*multiply-accumulates* (2x that in FLOPs). Everything here counts MACs; multiply by 2 for
FLOPs in the hardware sense (what XLA's `cost_analysis()["flops"]` reports for dots).

What is counted (`static_macs`): every matmul and convolution, nothing else.
- embedders: the patch conv (N * p*p*C * D), the timestep MLP (256*D + D*D; the sin/cos
  features are not MACs), the label embedding (a table lookup: 0);
- per block: adaLN (D * 6D, once per sample: it reads c, not the tokens), attention
  qkv (N*D*3D), q@k^T (N*N*D), attn@v (N*N*D), proj (N*D*D), MLP fc1 (N*D*4D), fc2 (N*4D*D);
- final layer: adaLN (D * 2D) and the linear (N * D * p*p*C_out).
Softmax, LayerNorm, GELU, modulate, gates, residual adds and bias adds are elementwise, not
MACs, and are not counted.

Check against the paper. Source: Peebles & Xie, "Scalable Diffusion Models with Transformers",
arXiv:2212.09748v2, Appendix A, Table 4 ("Details of all DiT models", the "Flops (G)" column,
256x256 images = 32x32 latents). Ours (matmul/conv only) against the paper:

    model      ours (G)   paper    diff          model      ours (G)   paper    diff
    DiT-S/8     0.3580     0.36   -0.56 % (*)    DiT-L/8     5.0114     5.01   +0.03 %
    DiT-S/4     1.4126     1.41   +0.18 %        DiT-L/4    19.6957    19.70   -0.02 %
    DiT-S/2     6.0557     6.06   -0.07 %        DiT-L/2    80.6976    80.71   -0.02 %
    DiT-B/8     1.4175     1.42   -0.17 %        DiT-XL/8    7.3924     7.39   +0.03 %
    DiT-B/4     5.5652     5.56   +0.09 %        DiT-XL/4   29.0437    29.05   -0.02 %
    DiT-B/2    23.0051    23.01   -0.02 %        DiT-XL/2  118.6214   118.64   -0.02 %

(*) The paper prints two decimals: 0.36 stands for [0.355, 0.365), and 0.3580 is inside that
interval; the relative 0.5 % band is finer than the table's own precision for this one entry.
Every other entry agrees to <= 0.2 %, i.e. within the table's rounding. The remaining small
positive residual of the large models (XL/2: +18.6 M at 256 px, +62 M of 524.60 G at 512 px)
scales like ~2 * N * D per block: the paper's counter apparently also counted two elementwise
[N, D] ops per block (e.g. the two residual adds). They are not MACs, so we leave them out; the
effect is <= 0.02 % on every model whose number is printed with enough digits to see it.

DyDiT (see DESIGN.md section 1):
- `block_costs` / `flops_ratio`: the released FLOPs loss's per-block constants
  A = 4ND^2 + 2N^2D (attention: qkv + proj + the two attention matmuls) and M = 8ND^2 (MLP),
  and the per-sample ratio r_b that enters L_flops (jnp, differentiable, jit-able);
- `dynamic_macs` / `macs_ratio`: whole-model MACs of a dynamic execution (what actually runs
  in a width/token-gathered forward) and its ratio to the static model. This is the number the
  inference engine reports as the "FLOPs ratio by our counter". It is larger than r_b because
  embedders, adaLN, the final layer (and the routers) always run at full cost.

`jaxpr_macs(fn, *args)` counts the MACs of the `dot_general` and convolution ops of any JAX
function from its jaxpr (scans multiplied by their length), so compiled buckets can be counted
exactly; XLA's own `cost_analysis()` counts a while/scan body only once and adds elementwise ops.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# DiT paper, arXiv:2212.09748v2, Appendix A, Table 4, "Flops (G)" at 256x256 (32x32 latents).
PAPER_GFLOPS_256 = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}

# The parts `static_macs` reports, in forward order. Summing them gives "total".
PARTS = (
    "patch_embed", "t_embedder", "y_embedder",
    "adaLN",
    "attn_qkv", "attn_qk", "attn_av", "attn_proj",
    "mlp_fc1", "mlp_fc2",
    "final_adaLN", "final_linear",
)
ATTENTION_PARTS = ("attn_qkv", "attn_qk", "attn_av", "attn_proj")
MLP_PARTS = ("mlp_fc1", "mlp_fc2")
ROUTER_PARTS = ("width_routers", "token_router")

# Constructor defaults of `dydit_jax.models.dit.DiT` for the fields the count depends on.
_DEFAULTS = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, learn_sigma=True, frequency_embedding_size=256,
                 num_frames=0,   # num_frames > 0: a Latte (video) clip of that many frames
                 token_blocks="both",   # a dynamic Latte's blocks with SDT token routers
                 dynamic_tokens=True)   # False: no SDT token routers at all


# ----------------------------------------------------------------------------------------------
# Config handling
# ----------------------------------------------------------------------------------------------

def _resolve(model_or_config: Any) -> Dict[str, Any]:
    """A DiT module, a dict of its constructor args, or a name ("DiT-XL/2") -> the fields we use."""
    if isinstance(model_or_config, str):
        from dydit_jax.models.dit import dit_config
        given = dit_config(model_or_config)
    elif isinstance(model_or_config, Mapping):
        given = dict(model_or_config)
    else:
        given = {k: getattr(model_or_config, k) for k in _DEFAULTS
                 if hasattr(model_or_config, k)}
    cfg = {**_DEFAULTS, **{k: v for k, v in given.items() if k in _DEFAULTS}}
    size = cfg["input_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    p = int(cfg["patch_size"])
    if h % p or w % p:
        raise ValueError(f"input_size {(h, w)} is not divisible by patch_size {p}")
    d, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
    if d % heads:
        raise ValueError(f"hidden_size {d} is not divisible by num_heads {heads}")
    c = int(cfg["in_channels"])
    return dict(
        num_tokens=(h // p) * (w // p), patch_size=p, in_channels=c,
        out_channels=2 * c if cfg["learn_sigma"] else c, hidden_size=d,
        depth=int(cfg["depth"]), num_heads=heads,
        mlp_hidden=int(d * cfg["mlp_ratio"]), freq_dim=int(cfg["frequency_embedding_size"]),
        frames=int(cfg["num_frames"] or 0), token_blocks=str(cfg["token_blocks"]),
        dynamic_tokens=bool(cfg["dynamic_tokens"]),
    )


def block_shapes(model_or_config: Any):
    """Per block l: (tokens T, attention length S_l, has a token router) of one sample. A DiT:
    (N, N, dynamic_tokens) for every block; a Latte clip: T = F*N tokens, S = N in spatial
    blocks (even l; F groups of N) and S = F in temporal ones (N groups of F); SDT where
    `token_blocks` says (the rule of `Latte.block_has_token_router`, here for configs too)."""
    k = _resolve(model_or_config)
    n, f, routed = k["num_tokens"], k["frames"], k["dynamic_tokens"]
    if not f:
        return [(n, n, routed)] * k["depth"]
    from dydit_jax.models.latte import BLOCK_KINDS
    return [(f * n, n if BLOCK_KINDS[l % 2] == "spatial" else f,
             routed and k["token_blocks"] in ("both", BLOCK_KINDS[l % 2]))
            for l in range(k["depth"])]


# ----------------------------------------------------------------------------------------------
# Static model
# ----------------------------------------------------------------------------------------------

def static_macs(model_or_config: Any) -> Dict[str, int]:
    """MACs of one forward pass of one sample of a (static) DiT, per part, plus "total".

    `model_or_config`: a `DiT` module, a dict of its constructor arguments (missing ones take
    DiT's defaults, e.g. input_size 32 = 256 px), or a name such as "DiT-XL/2". Values are
    Python ints, per sample: a batch of B costs B times as much (classifier-free guidance runs
    a doubled batch). Blocks are summed over depth. Keys: `PARTS` and "total".
    """
    k = _resolve(model_or_config)
    if k["frames"]:
        return _latte_static_macs(k)
    n, d, depth = k["num_tokens"], k["hidden_size"], k["depth"]
    p, hid = k["patch_size"], k["mlp_hidden"]
    out = {
        "patch_embed": n * (p * p * k["in_channels"]) * d,
        "t_embedder": k["freq_dim"] * d + d * d,
        "y_embedder": 0,  # a table lookup
        "adaLN": depth * d * 6 * d,
        "attn_qkv": depth * n * d * 3 * d,
        "attn_qk": depth * n * n * d,
        "attn_av": depth * n * n * d,
        "attn_proj": depth * n * d * d,
        "mlp_fc1": depth * n * d * hid,
        "mlp_fc2": depth * n * hid * d,
        "final_adaLN": d * 2 * d,
        "final_linear": n * d * (p * p * k["out_channels"]),
    }
    out["total"] = sum(out[name] for name in PARTS)
    return out


def _latte_static_macs(k) -> Dict[str, int]:
    """`static_macs` of one Latte clip (F frames of N tokens, as our Latte computes it):
    blocks alternate spatial (attention over N tokens per frame: F * N^2 * D per product) and
    temporal (over F frames per position: N * F^2 * D); token-wise matmuls run on all F * N
    tokens; adaLN once per clip in every block and the final layer (the release computes it
    on the conditioning repeated per frame / position, F or N rows, the same values: we
    repeat its output instead, `dit.per_row`); the timestep MLP once per clip."""
    n, f, d, depth = k["num_tokens"], k["frames"], k["hidden_size"], k["depth"]
    p, hid = k["patch_size"], k["mlp_hidden"]
    pairs = depth // 2
    tokens = f * n
    out = {
        "patch_embed": tokens * (p * p * k["in_channels"]) * d,
        "t_embedder": k["freq_dim"] * d + d * d,
        "y_embedder": 0,
        "adaLN": depth * d * 6 * d,
        "attn_qkv": depth * tokens * d * 3 * d,
        "attn_qk": pairs * (f * n * n + n * f * f) * d,
        "attn_av": pairs * (f * n * n + n * f * f) * d,
        "attn_proj": depth * tokens * d * d,
        "mlp_fc1": depth * tokens * d * hid,
        "mlp_fc2": depth * tokens * hid * d,
        "final_adaLN": d * 2 * d,
        "final_linear": tokens * d * (p * p * k["out_channels"]),
    }
    out["total"] = sum(out[name] for name in PARTS)
    return out


# ----------------------------------------------------------------------------------------------
# DyDiT FLOPs loss (the released DynamicLoss._get_token_loss)
# ----------------------------------------------------------------------------------------------

def block_costs(num_tokens: int, hidden_size: int) -> Tuple[int, int]:
    """Per-block MAC constants of the released FLOPs loss: (A, M).

    A = 4ND^2 + 2N^2D: attention (qkv 3ND^2 + proj ND^2 + q@k N^2D + attn@v N^2D);
    M = 8ND^2: the MLP (fc1 + fc2 with mlp_ratio 4). DiT-S/2: A = 0.2013 G, M = 0.3020 G.
    """
    n, d = int(num_tokens), int(hidden_size)
    return 4 * n * d * d + 2 * n * n * d, 8 * n * d * d


def model_block_costs(model_or_config: Any) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The FLOPs loss's constants per block (A_l, M_l), each a tuple of length L: the released
    A = 4TD^2 + 2 T S_l D, M = 8TD^2 with T tokens and attention length S_l per block
    (`block_shapes`): for a DiT every block has `block_costs(N, D)`; a Latte clip's spatial
    blocks attend over S = N (F * N^2 * D per product), its temporal ones over S = F."""
    d = _resolve(model_or_config)["hidden_size"]
    shapes = block_shapes(model_or_config)
    return (tuple(4 * t * d * d + 2 * t * s * d for t, s, _ in shapes),
            tuple(8 * t * d * d for t, _, _ in shapes))


def flops_ratio(head_masks, group_masks, token_masks, num_tokens: int, hidden_size: int,
                costs=None):
    """Per-sample FLOPs ratio of the DyDiT loss. Returns [B] (jnp, differentiable).

    r_b = sum_l [ (heads_on/H) * A + (groups_on/H) * (tokens_on/N) * M ] / (L * (A + M))

    head_masks, group_masks: [B, L, H] 0/1 (soft STE values work too), index 0 included (the
    always-on head/group counts). token_masks: [B, L, N] or [B, L, N, 1], or None for "all
    tokens"; tokens_on/N is the mean over the mask's own token axis. `num_tokens` and
    `hidden_size` only set the constants A and M (`block_costs`): the release uses a model's
    constants even when the masks come from a smaller config, and so can the caller.
    The batch mean of this is what L_flops = 2 * (mean_b r_b - target)^2 uses.
    `costs`: per-block constants (A_l, M_l) (`model_block_costs`, a Latte's), overriding
    `num_tokens`/`hidden_size`; then r_b = sum_l [h_l A_l + g_l t_l M_l] / sum_l (A_l + M_l).
    """
    if costs is not None and (len(set(costs[0])) > 1 or len(set(costs[1])) > 1):
        a, m = (np.asarray(v, np.float64) for v in costs)
        total = float(np.sum(a + m)) / len(a)
        wa, wm = jnp.asarray(a / total, jnp.float32), jnp.asarray(m / total, jnp.float32)
    else:
        a, m = ((costs[0][0], costs[1][0]) if costs is not None
                else block_costs(num_tokens, hidden_size))
        wa, wm = a / (a + m), m / (a + m)   # in Python: no float32 overflow or cancellation
    head_masks = jnp.asarray(head_masks)
    group_masks = jnp.asarray(group_masks)
    if head_masks.ndim != 3 or group_masks.shape != head_masks.shape:
        raise ValueError(f"head_masks and group_masks must both be [B, L, H], got "
                         f"{head_masks.shape} and {group_masks.shape}")
    num_heads = head_masks.shape[-1]
    dtype = jnp.result_type(head_masks.dtype, jnp.float32)
    head_frac = jnp.sum(head_masks.astype(dtype), axis=-1) / num_heads        # [B, L]
    group_frac = jnp.sum(group_masks.astype(dtype), axis=-1) / num_heads      # [B, L]
    if token_masks is None:
        token_frac = jnp.ones_like(group_frac)
    else:
        token_masks = jnp.asarray(token_masks)
        if token_masks.ndim == 4:
            if token_masks.shape[-1] != 1:
                raise ValueError(f"token_masks must be [B, L, N] or [B, L, N, 1], got "
                                 f"{token_masks.shape}")
            token_masks = token_masks[..., 0]
        if token_masks.ndim != 3 or token_masks.shape[:2] != head_masks.shape[:2]:
            raise ValueError(f"token_masks must be [B, L, N] matching the head masks' [B, L] = "
                             f"{head_masks.shape[:2]}, got {token_masks.shape}")
        token_frac = jnp.mean(token_masks.astype(dtype), axis=-1)            # [B, L]
    per_block = wa * head_frac + wm * group_frac * token_frac
    return jnp.mean(per_block, axis=-1)


def flops_loss(head_masks, group_masks, token_masks, num_tokens: int, hidden_size: int,
               target: float):
    """L_flops = 2 * (mean_b r_b - target)^2, as in the release (scalar, jnp)."""
    r = flops_ratio(head_masks, group_masks, token_masks, num_tokens, hidden_size)
    return 2.0 * jnp.square(jnp.mean(r) - target)


# ----------------------------------------------------------------------------------------------
# Dynamic execution: whole-model MACs
# ----------------------------------------------------------------------------------------------

def counts_from_masks(head_masks, group_masks, token_masks=None):
    """0/1 masks -> per-block active counts (numpy float64): heads [B, L], groups [B, L],
    tokens [B, L] (None when `token_masks` is None). Index 0 is counted like any other."""
    heads = np.asarray(head_masks, np.float64).sum(-1)
    groups = np.asarray(group_masks, np.float64).sum(-1)
    tokens = None
    if token_masks is not None:
        t = np.asarray(token_masks, np.float64)
        if t.ndim == 4:
            t = t[..., 0]
        tokens = t.sum(-1)
    return heads, groups, tokens


def dynamic_macs(model_or_config: Any, head_counts, group_counts, token_counts=None,
                 include_routers: bool = True) -> Dict[str, Any]:
    """MACs of one dynamic forward pass of one sample, per part (same keys as `static_macs`,
    plus "width_routers" and "token_router") and "total".

    head_counts, group_counts: active heads / MLP groups per block, index 0 included: shape
    [L] or [B, L] (or a scalar for every block); G = H groups of mlp_hidden/H channels.
    token_counts: tokens that run the MLP per block, [L] or [B, L]; None = all tokens (N;
    a Latte clip: F*N, see `block_shapes`, whose attention lengths the attention terms use).
    Values are floats (numpy arrays with the batch shape when the counts have one).

    Cost model, per block: attention scales with the active heads h as a whole
    (qkv 3*N*D*(h*hd), q@k and attn@v N*N*(h*hd) each, proj N*(h*hd)*D: attention always sees
    all N tokens); the MLP runs t tokens through g groups (fc1 t*D*(g*hid/H), fc2 the same).
    Embedders, adaLN and the final layer always run in full. With `include_routers` the DyDiT
    routers are added: the two width routers (2 * D*(H-1) per block per sample; computed once
    per timestep, tiny) and the token router (N * (D*D//16 + D//16) per block that has one,
    on every token). With full counts and include_routers=False this equals `static_macs`.
    """
    k = _resolve(model_or_config)
    d, depth, heads = k["hidden_size"], k["depth"], k["num_heads"]
    hid = k["mlp_hidden"]
    hd, group_width = d // heads, hid // heads
    if hid % heads:
        raise ValueError(f"MLP hidden size {hid} is not divisible into {heads} groups")
    shapes = block_shapes(model_or_config)
    tokens = np.asarray([s[0] for s in shapes], np.float64)      # [L]: T
    seq = np.asarray([s[1] for s in shapes], np.float64)         # [L]: attention length
    routed = np.asarray([s[2] for s in shapes], np.float64)      # [L]: has a token router
    n = int(tokens.max())

    def per_block(counts, name, upper):
        c = np.asarray(counts, np.float64)
        if c.ndim == 0:
            c = np.full((depth,), float(c))
        if c.shape[-1] != depth:
            raise ValueError(f"{name} must have a last axis of depth {depth}, got {c.shape}")
        if np.any(c < 0) or np.any(c > upper):
            raise ValueError(f"{name} must lie in [0, {upper}]")
        return c

    h = per_block(head_counts, "head_counts", heads)
    g = per_block(group_counts, "group_counts", heads)
    t = per_block(tokens if token_counts is None else token_counts, "token_counts", n)
    width = h * hd  # active attention width per block

    static = static_macs(model_or_config)
    out: Dict[str, Any] = {name: float(static[name]) for name in
                           ("patch_embed", "t_embedder", "y_embedder", "adaLN",
                            "final_adaLN", "final_linear")}
    out["attn_qkv"] = (tokens * d * 3 * width).sum(-1)
    out["attn_qk"] = (tokens * seq * width).sum(-1)   # T/S groups of S x S, per active width
    out["attn_av"] = (tokens * seq * width).sum(-1)
    out["attn_proj"] = (tokens * width * d).sum(-1)
    out["mlp_fc1"] = (t * d * g * group_width).sum(-1)
    out["mlp_fc2"] = (t * g * group_width * d).sum(-1)
    if include_routers:
        r = d // 16
        out["width_routers"] = float(depth * 2 * d * (heads - 1))
        out["token_router"] = float((routed * tokens * (d * r + r)).sum())
    else:
        out["width_routers"] = 0.0
        out["token_router"] = 0.0
    out["total"] = sum(out[name] for name in PARTS + ROUTER_PARTS)
    return out


def macs_ratio(model_or_config: Any, head_counts, group_counts, token_counts=None,
               include_routers: bool = True):
    """Whole-model MACs ratio, dynamic / static (float, or an array with the counts' batch
    shape). The inference engine reports this as the "FLOPs ratio by our counter"."""
    dyn = dynamic_macs(model_or_config, head_counts, group_counts, token_counts,
                       include_routers=include_routers)["total"]
    return dyn / static_macs(model_or_config)["total"]


# ----------------------------------------------------------------------------------------------
# Counting MACs of any JAX function from its jaxpr
# ----------------------------------------------------------------------------------------------

def _dot_macs(eqn) -> int:
    lhs = eqn.invars[0].aval.shape
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval.shape
    return math.prod(out) * math.prod(lhs[i] for i in lhs_contract)


def _conv_macs(eqn) -> int:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]
    # Each output element reads (kernel spatial) x (input features per group) weights.
    return math.prod(out) * (math.prod(rhs) // rhs[out_feature_dim])


def _sub_jaxprs(value):
    """Jaxprs held by an equation parameter (a jaxpr, a closed jaxpr or a tuple of them)."""
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "cond":
            # Only one branch runs; count the most expensive (an upper bound).
            total += max(_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["branches"]))
        elif name == "while":
            raise ValueError("jaxpr_macs cannot count a while loop (unknown trip count); "
                             "use lax.scan or a Python loop")
        else:
            subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
            macs = sum(_jaxpr_macs(j) for j in subs)
            if name == "scan":
                macs *= int(eqn.params["length"])
            total += macs
    return total


# ----------------------------------------------------------------------------------------------
# FLUX / DyFLUX
# ----------------------------------------------------------------------------------------------

FLUX_PARTS = ("embed", "modulation", "double_qkv", "double_attention", "double_proj",
              "double_img_ffn", "double_txt_ffn", "single_kv", "single_q_mlp",
              "single_attention", "single_linear2", "routers", "final")


def flux_macs(model, n_img: int, n_txt: int, kept=None, heads=None, groups=None,
              txt_groups=None) -> Dict[str, float]:
    """MACs of one FLUX forward of one sample (n_img image and n_txt text tokens), per part
    (`FLUX_PARTS`) plus "total".

    kept: None for the static model (every token, no routers), or per block (double blocks,
    then single blocks) the kept image tokens of one sample (means allowed): what the engine
    (`engine.flux`) runs. A double block skips only the image FFN of skipped tokens; a single
    block still computes every token's keys and values, and runs queries, the MLP part of
    linear1, the attention rows and linear2 for the text and kept image tokens. Routers:
    linear_t (D x 4D per sample) and the logit Dense on the image tokens.

    TDW (`dynamic_width`): heads / groups per block (active counts of H, means allowed) and
    txt_groups per double block; a gathered block computes q/k/v, attention and the
    projections of its active heads only and the FFN columns of its active groups only (plus
    the width routers, D x (H-1) each). None: every head and group.
    """
    nd, ns = model.depth, model.depth_single_blocks
    if kept is not None:
        kept = np.asarray(kept, np.float64).reshape(-1)
        if kept.size != nd + ns:
            raise ValueError(f"kept needs one count per block ({nd} double + {ns} single), "
                             f"got {kept.size}")
    width = [heads, groups, txt_groups]
    for i, (name, a, size) in enumerate(zip(("heads", "groups", "txt_groups"), width,
                                            (nd + ns, nd + ns, nd))):
        if a is not None:
            a = np.asarray(a, np.float64).reshape(-1)
            if a.size != size:
                raise ValueError(f"{name} needs one count per block ({size}), got {a.size}")
            width[i] = a
    out = _flux_parts(model, n_img, n_txt, kept, *width, xp=np)
    out = {name: float(np.sum(v)) for name, v in out.items()}
    out["total"] = sum(out[name] for name in FLUX_PARTS)
    return out


def _flux_parts(model, n_img, n_txt, kept, heads, groups, txt_groups, xp):
    """`flux_macs`' parts, each an array over blocks (or a scalar), in numpy or jax.numpy:
    the counts may be traced arrays (the DyFLUX objective differentiates through them)."""
    d, f, h = model.hidden_size, int(model.hidden_size * model.mlp_ratio), model.num_heads
    nd, ns = model.depth, model.depth_single_blocks
    n, t = n_img, n_txt
    length = n + t
    routers = 0.0
    if kept is None:
        kept = xp.full((nd + ns,), float(n))
    else:
        routers = (nd + ns) * (d * 4 * d + n * d)
    if heads is not None or groups is not None or txt_groups is not None:
        routers = routers + (nd * 3 + ns * 2) * d * (h - 1)

    def frac(a, size):          # active fraction per block (1 when absent)
        return xp.ones((size,)) if a is None else a / h
    fh, fg, ft = frac(heads, nd + ns), frac(groups, nd + ns), frac(txt_groups, nd)
    kd, ks = kept[:nd], kept[nd:]
    hd, hs, gd, gs = fh[:nd], fh[nd:], fg[:nd], fg[nd:]
    embeddings = 256 * d + d * d
    return {
        "embed": (n * model.in_channels * d + t * model.context_in_dim * d
                  + embeddings * (2 if model.guidance_embed else 1)
                  + model.vec_in_dim * d + d * d),
        "modulation": nd * 2 * d * 6 * d + ns * d * 3 * d,
        "double_qkv": length * d * 3 * d * hd,
        "double_attention": 2 * length * length * d * hd,
        "double_proj": length * d * d * hd,
        "double_img_ffn": kd * 2 * d * f * gd,
        "double_txt_ffn": t * 2 * d * f * ft,
        "single_kv": length * d * 2 * d * hs,
        "single_q_mlp": (t + ks) * d * (d * hs + f * gs),
        "single_attention": 2 * (t + ks) * length * d * hs,
        "single_linear2": (t + ks) * (d * hs + f * gs) * d,
        "routers": routers,
        "final": d * 2 * d + n * d * model.out_dim,
    }


def flux_macs_ratio(model, n_img: int, n_txt: int, kept, heads=None, groups=None,
                    txt_groups=None) -> float:
    """Dynamic over static `flux_macs` totals (counts per block of one sample)."""
    return (flux_macs(model, n_img, n_txt, kept, heads, groups, txt_groups)["total"]
            / flux_macs(model, n_img, n_txt)["total"])


def flux_macs_ratio_fn(model, n_img: int, n_txt: int) -> Callable:
    """ratio(kept [blocks, B], heads=None, groups=None, txt_groups=None) -> [B]:
    `flux_macs_ratio` per sample as a traceable function of the counts (or soft mask sums;
    heads / groups [blocks, B], txt_groups [depth, B]), for the DyFLUX objective."""
    static = flux_macs(model, n_img, n_txt)["total"]

    def total(*counts):   # one sample's counts per block (None: every head / group)
        return sum(jnp.sum(v) for v in _flux_parts(model, n_img, n_txt, *counts,
                                                   xp=jnp).values())

    def ratio(kept, heads=None, groups=None, txt_groups=None):
        args = [None if a is None else jnp.asarray(a, jnp.float32)
                for a in (kept, heads, groups, txt_groups)]
        # vmap over the sample axis; a None argument is an empty tree and stays None.
        return jax.vmap(total, in_axes=1)(*args) / static

    return ratio


def jaxpr_macs(fn, *args, **kwargs) -> int:
    """MACs of the matmuls (`dot_general`) and convolutions of `fn(*args, **kwargs)`, counted
    exactly from its jaxpr (nothing is run: abstract args such as `jax.ShapeDtypeStruct` work).
    Scans count `length` times, conds their most expensive branch; elementwise ops count 0.
    For `DiT.apply` with a batch of one this equals `static_macs(model)["total"]`."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _jaxpr_macs(closed.jaxpr)


def xla_flops(compiled) -> float:
    """`compiled.cost_analysis()["flops"]`; handles the list-of-dicts (older jax) and dict
    (newer jax) return forms. XLA counts 2 flops per MAC for dots and one per elementwise op,
    and counts a while/scan body once regardless of its trip count."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if cost is None or "flops" not in cost:
        raise ValueError(f"cost_analysis() returned no 'flops': {cost!r}")
    return float(cost["flops"])


__all__ = [
    "PAPER_GFLOPS_256", "PARTS", "ATTENTION_PARTS", "MLP_PARTS", "ROUTER_PARTS",
    "static_macs", "block_shapes", "block_costs", "model_block_costs", "flops_ratio",
    "flops_loss", "counts_from_masks",
    "dynamic_macs", "macs_ratio", "jaxpr_macs", "xla_flops", "FLUX_PARTS", "flux_macs",
    "flux_macs_ratio", "flux_macs_ratio_fn",
]

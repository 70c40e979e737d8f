"""Text conditioning for FLUX: tokenizers and the two text encoders -> (txt, vec) per prompt.

    text = TextEncoders(t5=(t5, t5_vars, t5_tokenizer), clip=(clip, clip_vars, clip_tokenizer),
                        t5_max_length=512, clip_max_length=77)
    txt, vec = text.encode(["a bold handwritten seven"])   # [B, 512, d_t5], [B, d_clip]

- Tokenizers are `tokenizers.Tokenizer` objects (a `tokenizer.json`); prompts are padded /
  truncated to the max lengths and, as BFL's `HFEmbedder`, run without attention masks.
- Embeddings are cached per prompt (`cache`, in memory; `save_cache` / `load_cache` write and
  read an .npz): a run that repeats prompts encodes each once, and training on a captioned set
  (`BatchConditioner`) encodes each distinct caption once, on the host, not per step. `embed`
  runs the encoders without the cache in batches of one shape (mode=extract stores the
  embeddings of every example with its latent; `EmbeddingDropout` is the caption dropout of
  training on them).
- `from_config(config.text)` builds them: `encoders="hf"` reads transformers folders
  (`t5_dir`, `clip_dir`: config.json, model.safetensors or its shards, tokenizer.json);
  `encoders="local"` builds the digits demo's: a small T5 v1.1 encoder and CLIP text model
  initialised from `seed` (frozen, never trained: a fixed random map of the tokens, which
  is all a set of templated captions needs) and a word-level tokenizer of the captions'
  words (`word_tokenizer`).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, pad_id: int = 0) -> np.ndarray:
    """[B, max_length] int32 ids of `prompts` (truncated, right-padded with `pad_id`)."""
    out = np.full((len(prompts), max_length), pad_id, np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(prompts))):
        ids = enc.ids[:max_length]
        out[i, :len(ids)] = ids
    return out


def word_tokenizer(words: Sequence[str]):
    """A `tokenizers` word-level tokenizer of `words`: [PAD] = 0, [UNK] = 1, the words, then
    [EOS] with the highest id (appended to every prompt; CLIP pools at the highest id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}",
                                                       special_tokens=[(EOS, vocab[EOS])])
    return tok


class TextEncoders:
    """See the module docstring. t5 / clip: (module, variables, tokenizer) triples."""

    def __init__(self, t5: Tuple, clip: Tuple, t5_max_length: int = 512,
                 clip_max_length: int = 77):
        if t5_max_length < 1 or clip_max_length < 1:
            raise ValueError("t5_max_length and clip_max_length must be positive")
        self.t5, self.clip = t5, clip
        self.t5_max_length, self.clip_max_length = t5_max_length, clip_max_length
        self.cache: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self._encoders = (jax.jit(lambda v, ids: t5[0].apply(v, ids)),
                          jax.jit(lambda v, ids: clip[0].apply(v, ids)[1]))

    @property
    def widths(self) -> Tuple[int, int]:
        """(d_t5, d_clip): FLUX's context_in_dim and vec_in_dim for these encoders."""
        return self.t5[0].config.d_model, self.clip[0].config.hidden_size

    def encode(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(txt [B, t5_max_length, d_t5], vec [B, d_clip]) float32 for `prompts`."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo:
            txt, vec = self.embed(todo)
            for i, p in enumerate(todo):
                self.cache[p] = (txt[i], vec[i])
        txt, vec = zip(*(self.cache[p] for p in prompts))
        return np.stack(txt), np.stack(vec)

    def embed(self, prompts: Sequence[str], batch_size: int = 0
              ) -> Tuple[np.ndarray, np.ndarray]:
        """`encode` without the cache: the encoders run now on `prompts`, in calls of
        `batch_size` prompts (the last padded with empty prompts, so that every call has one
        shape and compiles once; 0: one call of all)."""
        (_, t5_vars, t5_tok), (_, clip_vars, clip_tok) = self.t5, self.clip
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to embed")
        size = batch_size or len(prompts)
        txt, vec = [], []
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            chunk += [""] * (size - len(chunk))
            txt.append(np.asarray(self._encoders[0](
                t5_vars, tokenize(t5_tok, chunk, self.t5_max_length)), np.float32))
            vec.append(np.asarray(self._encoders[1](
                clip_vars, tokenize(clip_tok, chunk, self.clip_max_length)), np.float32))
        n = len(prompts)
        return np.concatenate(txt)[:n], np.concatenate(vec)[:n]

    def save_cache(self, path) -> None:
        prompts = sorted(self.cache)
        np.savez(path, prompts=np.asarray(prompts, dtype=object),
                 txt=np.stack([self.cache[p][0] for p in prompts]),
                 vec=np.stack([self.cache[p][1] for p in prompts]))

    def load_cache(self, path) -> None:
        with np.load(path, allow_pickle=True) as f:
            for p, t, v in zip(f["prompts"], f["txt"], f["vec"]):
                self.cache[str(p)] = (t, v)


def dropout_rows(n: int, dropout: float, seed: int, step: int) -> np.ndarray:
    """bool [n]: which rows of training step `step`'s batch become the empty prompt, each with
    probability `dropout`, drawn from (seed, step) alone (a resumed run drops the same)."""
    return np.random.default_rng([seed, int(step)]).random(n) < dropout


class BatchConditioner:
    """Adds "txt" [b, L, d_t5] and "vec" [b, d_clip] to a captioned batch (its "caption"
    indices into `captions`), from embeddings computed once per caption; with `dropout`, a
    caption is replaced by the empty prompt with that probability (drawn from the batch's
    `step` and `seed`, so a resumed run drops the same ones), which trains the unconditional
    velocity that true classifier-free guidance needs."""

    def __init__(self, text: TextEncoders, captions: Sequence[str], dropout: float = 0.0,
                 seed: int = 0):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"config.text.dropout must be in [0, 1), got {dropout}")
        self.txt, self.vec = text.encode(list(captions) + [""])
        self.dropout, self.seed = dropout, seed

    def __call__(self, batch: Mapping[str, np.ndarray], step: int) -> Dict[str, np.ndarray]:
        if "caption" not in batch:
            raise ValueError("a text-conditioned model needs captioned batches ('caption' "
                             "indices, e.g. config.data.name=captioned_digits) or batches "
                             "that carry 'txt' and 'vec' (latent shards written by "
                             "config.mode=extract)")
        ids = np.asarray(batch["caption"])
        if self.dropout:
            drop = dropout_rows(len(ids), self.dropout, self.seed, step)
            ids = np.where(drop, len(self.txt) - 1, ids)
        out = {k: v for k, v in batch.items() if k != "caption"}
        out.update(txt=self.txt[ids], vec=self.vec[ids])
        return out


class EmbeddingDropout:
    """Caption dropout for batches that carry their "txt" / "vec" already (latent shards of
    `config.mode=extract`): a row becomes the empty prompt's embeddings (`empty`: (txt [L,
    d_t5], vec [d_clip]), stored by the extractor) with probability `dropout`, drawn as
    `BatchConditioner` draws (`dropout_rows`)."""

    def __init__(self, empty: Tuple[np.ndarray, np.ndarray], dropout: float, seed: int = 0):
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"config.text.dropout must be in (0, 1) here, got {dropout}")
        self.empty_txt, self.empty_vec = (np.asarray(a, np.float32) for a in empty)
        self.dropout, self.seed = dropout, seed

    def __call__(self, batch: Mapping[str, np.ndarray], step: int) -> Dict[str, np.ndarray]:
        if "txt" not in batch or "vec" not in batch:
            raise ValueError(f"EmbeddingDropout needs batches with 'txt' and 'vec', got "
                             f"{sorted(batch)}")
        if batch["txt"].shape[1:] != self.empty_txt.shape:
            raise ValueError(f"the empty prompt's txt {self.empty_txt.shape} does not match "
                             f"the batch's {batch['txt'].shape[1:]}")
        drop = dropout_rows(len(batch["txt"]), self.dropout, self.seed, step)
        out = dict(batch)
        out["txt"] = np.where(drop[:, None, None], self.empty_txt, batch["txt"])
        out["vec"] = np.where(drop[:, None], self.empty_vec, batch["vec"])
        return out


def text_settings(tc) -> Dict:
    """What fixes the embeddings of `config.text` (`tc`), JSON-able: recorded by mode=extract
    next to the embeddings it stores, and compared when a run trains on them."""
    keys = ["encoders", "t5_max_length", "clip_max_length"]
    keys += ["width", "layers", "heads", "seed"] if tc.encoders == "local" else []
    out = {k: tc[k] for k in keys}
    if tc.encoders == "hf":
        out.update(t5_dir=os.path.abspath(tc.t5_dir), clip_dir=os.path.abspath(tc.clip_dir))
    return out


def local_encoders(tc, words: Sequence[str]) -> TextEncoders:
    """The small seeded T5 / CLIP of `config.text` (width, layers, heads, seed) with a
    word-level tokenizer of `words`."""
    from dydit_jax.models.text_encoders import (CLIPTextConfig, CLIPTextModel, T5Config,
                                                T5Encoder)
    tok = word_tokenizer(words)
    vocab = tok.get_vocab_size()
    d, heads = tc.width, tc.heads
    t5 = T5Encoder(T5Config(vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=2 * d,
                            num_layers=tc.layers, num_heads=heads,
                            relative_attention_num_buckets=8,
                            relative_attention_max_distance=16))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d,
                                        num_hidden_layers=tc.layers, num_attention_heads=heads,
                                        max_position_embeddings=max(tc.clip_max_length, 1)))
    k_t5, k_clip = jax.random.split(jax.random.PRNGKey(tc.seed))
    ids = jnp.zeros((1, 2), jnp.int32)
    return TextEncoders((t5, t5.init(k_t5, ids), tok), (clip, clip.init(k_clip, ids), tok),
                        tc.t5_max_length, tc.clip_max_length)


def _hf_folder(path: str, kind: str):
    """(module, variables, tokenizer) of a transformers T5 encoder / CLIP text folder."""
    from tokenizers import Tokenizer

    from dydit_jax.models import text_encoders as te
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.text.{kind}_dir={path!r} is not a folder")
    need = [os.path.join(path, n) for n in ("config.json", "tokenizer.json")]
    missing = [n for n in need if not os.path.exists(n)]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if missing or not files:
        raise FileNotFoundError(
            f"config.text.{kind}_dir={path!r} needs config.json, tokenizer.json and "
            f"*.safetensors; missing: {', '.join(missing) or '*.safetensors'} (a hub folder "
            f"without tokenizer.json: save one with transformers' AutoTokenizer(...)"
            f".save_pretrained(<dir>))")
    with open(need[0]) as f:
        hf_config = json.load(f)
    from safetensors.numpy import load_file
    state = {}
    for name in files:
        state.update(load_file(name))
    if kind == "t5":
        module = te.T5Encoder(te.T5Config.from_hf(hf_config))
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    else:
        module = te.CLIPTextModel(te.CLIPTextConfig.from_hf(hf_config))
    return module, te.load_hf_state(module, state), Tokenizer.from_file(need[1])


def from_config(tc, words: Optional[Sequence[str]] = None) -> TextEncoders:
    """The text encoders of `config.text` (see the module docstring). `words`: the local
    tokenizer's vocabulary (default: the captioned digits' words)."""
    if tc.encoders == "local":
        if words is None:
            from dydit_jax.data.captioned_digits import WORDS as words
        return local_encoders(tc, words)
    if tc.encoders == "hf":
        if not tc.t5_dir or not tc.clip_dir:
            raise ValueError("config.text.encoders='hf' needs config.text.t5_dir and "
                             "config.text.clip_dir (transformers folders)")
        return TextEncoders(_hf_folder(tc.t5_dir, "t5"), _hf_folder(tc.clip_dir, "clip"),
                            tc.t5_max_length, tc.clip_max_length)
    raise ValueError(f"config.text.encoders={tc.encoders!r}; valid: local, hf")

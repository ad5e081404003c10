"""Generation: prefill once, then one token at a time over the static KV cache.

Small functions in the gpt-fast shape: `prefill` (vision tower + prompt, once), `decode_one` (one compiled
graph per token), `sample` (host-side NumPy: penalties, temperature, top-k, top-p, seeded), and `generate`
(stop rules, the thinking budget, streaming). The model knows nothing of tokenizers: the ids of the thinking
tags come from the checkpoint's tokenizer files (read as plain JSON) or from the caller.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
from mindspore import Tensor

from .model import _np, cache_bucket, prompt_bucket


class GenerationError(ValueError):
    """Bad generation arguments, or a prompt that does not fit the model's context."""


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 8192   # the official demo's: a thinking model needs room
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0               # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    max_thinking_tokens: int | None = None
    seed: int | None = None

    @classmethod
    def from_pretrained(cls, folder: str, fallback_eos=()) -> "GenerationConfig":
        """Defaults from generation_config.json (eos ids, sampling); the config's eos ids where it has none."""
        d = {}
        p = os.path.join(folder, "generation_config.json")
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise GenerationError(f"{p}: not valid JSON ({e})") from None
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        eos = kw.get("eos_token_id", fallback_eos)
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(**kw)

    def updated(self, **kw) -> "GenerationConfig":
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - {f.name for f in fields(self)}
        if unknown:
            raise GenerationError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        if "eos_token_id" in kw and not isinstance(kw["eos_token_id"], (list, tuple)):
            kw["eos_token_id"] = (kw["eos_token_id"],)
        cfg = replace(self, **kw)
        cfg.validate()
        return cfg

    def validate(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
                  (not self.do_sample or self.temperature > 0, "temperature must be > 0 when sampling"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.max_thinking_tokens is None or self.max_thinking_tokens >= 0, "max_thinking_tokens must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise GenerationError(msg)


def thinking_ids(folder: str) -> dict:
    """Ids of <think>, </think>, <answer>, </answer> from the checkpoint's tokenizer.json (added tokens)."""
    p = os.path.join(folder, "tokenizer.json")
    try:
        with open(p, encoding="utf-8") as f:
            added = json.load(f).get("added_tokens", [])
    except (OSError, ValueError):
        return {}
    want = {"<think>", "</think>", "<answer>", "</answer>"}
    return {t["content"]: t["id"] for t in added if t.get("content") in want}


def sample(logits: np.ndarray, history: np.ndarray, step: int, cfg: GenerationConfig, rng) -> np.ndarray:
    """Next token per row from float32 logits (B, V). history (B, n): prompt and generated ids (-1 = none).
    The processor order of transformers: repetition penalty, min length, temperature, top-k, top-p."""
    x = logits.astype(np.float32, copy=True)
    B = x.shape[0]
    if cfg.repetition_penalty != 1.0:
        for b in range(B):
            seen = np.unique(history[b][history[b] >= 0])
            v = x[b, seen]
            x[b, seen] = np.where(v < 0, v * cfg.repetition_penalty, v / cfg.repetition_penalty)
    if step < cfg.min_new_tokens and cfg.eos_token_id:
        x[:, list(cfg.eos_token_id)] = -np.inf
    if not cfg.do_sample:
        return x.argmax(-1)
    x /= cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        x[x < kth] = -np.inf
    if cfg.top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        sx = np.take_along_axis(x, order, -1)
        p = np.exp(sx - sx[:, :1])
        p /= p.sum(-1, keepdims=True)
        drop = np.cumsum(p, -1) - p > cfg.top_p          # keep the smallest prefix reaching top_p (>= 1 token)
        sx[drop] = -np.inf
        np.put_along_axis(x, order, sx, -1)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[1], p=p[b]) for b in range(B)])


@dataclass
class State:
    """What the decode loop carries: the cache, which slots are real, the next slot and positions."""
    dec: object
    kv_valid: np.ndarray     # (B, S) bool
    slot: int                # next cache slot
    next_pos: np.ndarray     # (B,) next text position, rope delta included
    timings: dict = field(default_factory=dict)


def prefill(model, inputs: dict, max_len: int, chunk: int | None = None):
    """Run the prompt (vision tower once) into a fresh cache of max_len slots. Returns (last logits (B, V), State).
    `chunk` splits the prompt into pieces of that many tokens (same result; bounds prefill memory)."""
    t0 = time.perf_counter()
    h, pos3, mask, deltas, _ = model.prompt(**{k: inputs.get(k) for k in (
        "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
        "inputs_embeds")})
    B, L = mask.shape
    dec = model.decoder(B, max_len)
    kv_valid = np.zeros((B, max_len), bool)
    kv_valid[:, :L] = mask
    step = chunk or L
    for s in range(0, L, step):
        logits = model.run(dec, h[:, s:s + step], pos3[:, :, s:s + step], s, kv_valid, last_only=True)
    logits = logits.asnumpy()[:, -1]   # the host copy also waits for the device
    st = State(dec, kv_valid, L, mask.sum(1) + deltas, {"prefill_s": time.perf_counter() - t0})
    return logits, st


def decode_one(model, st: State, tokens: np.ndarray) -> np.ndarray:
    """Feed one token per row at the next slot; return the next logits (B, V)."""
    B = tokens.shape[0]
    h = model.text.embed(Tensor(tokens.reshape(B, 1).astype(np.int32)))
    st.kv_valid[:, st.slot] = True
    pos3 = np.broadcast_to(st.next_pos[None, :, None], (3, B, 1))
    logits = model.run(st.dec, h, pos3, st.slot, st.kv_valid, last_only=True).asnumpy()[:, -1]
    st.slot += 1
    st.next_pos = st.next_pos + 1
    return logits


def _emit(streamer, tokens):
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)


def generate(model, inputs: dict, cfg: GenerationConfig, think_ids: dict | None = None, streamer=None):
    """Token ids (B, prompt + new) as numpy int64, as transformers' generate returns them.

    Rows that finished (an eos id after min_new_tokens) are filled with the pad id. With max_thinking_tokens,
    a row that has made that many tokens without </think> is made to continue with </think><answer>."""
    ids = _np(inputs["input_ids"], np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    B, L = ids.shape
    ctx = model.config.text.max_position_embeddings
    if L >= ctx:
        raise GenerationError(f"the prompt has {L} tokens; the model's context is {ctx}")
    force = []
    if cfg.max_thinking_tokens is not None:
        think_ids = think_ids or {}
        if "</think>" not in think_ids:
            raise GenerationError("max_thinking_tokens needs the </think> token id (not in the tokenizer)")
        force = [think_ids["</think>"]] + ([think_ids["<answer>"]] if "<answer>" in think_ids else [])
    new = min(cfg.max_new_tokens, ctx - L)
    max_len = cache_bucket(prompt_bucket(L) + new)   # the prompt sits left-padded to its bucket
    rng = np.random.default_rng(cfg.seed)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)
    eos = np.array(cfg.eos_token_id or [-1])

    logits, st = prefill(model, inputs, max_len)
    history = np.full((B, L + new), -1, np.int64)
    history[:, :L] = np.where(_np(inputs.get("attention_mask", np.ones((B, L))), np.int64).reshape(B, L) > 0, ids, -1)
    out = np.full((B, new), pad, np.int64)
    done = np.zeros(B, bool)
    thinking = np.zeros(B, np.int64)           # tokens made while no </think> yet
    closed = np.zeros(B, bool)
    forced = np.zeros(B, bool)
    queued = [[] for _ in range(B)]            # forced tokens waiting, per row
    t0 = t1 = time.perf_counter()
    n = 0
    for step in range(new):
        tok = sample(logits, history, step, cfg, rng)
        for b in range(B):
            if queued[b]:
                tok[b] = queued[b].pop(0)
        tok = np.where(done, pad, tok)
        out[:, step] = tok
        history[:, L + step] = np.where(done, -1, tok)
        n = step + 1
        _emit(streamer, tok)
        if force:
            closed |= tok == force[0]
            thinking += ~closed & ~done
            for b in np.nonzero((thinking >= cfg.max_thinking_tokens) & ~closed & ~done & ~forced)[0]:
                queued[b], forced[b] = list(force), True
        done |= np.isin(tok, eos)
        if done.all() or step == new - 1:
            break
        logits = decode_one(model, st, tok)
        if step == 0:   # the first step may compile the decode graph: timed apart from the steady state
            t1 = time.perf_counter()
            st.timings["first_step_s"] = t1 - t0
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    end = time.perf_counter()
    # decode_s: the steps after the first (n - 2 of them produce tokens 3..n); 0 when there were none
    st.timings.update(decode_s=end - t1 if n > 2 else 0.0, decode_steps=max(n - 2, 0), new_tokens=n, prompt_tokens=L)
    model.last_timings = st.timings
    return np.concatenate([ids, out[:, :n]], 1)

"""Choosing the next token on the host (NumPy): the logits processors (shared by sampling and beam search), then
greedy or seeded sampling with temperature, top-k and top-p, in transformers' order."""
from __future__ import annotations

import numpy as np

from .generation_config import GenerationConfig


def process_logits(x: np.ndarray, history: np.ndarray, step: int, cfg: GenerationConfig) -> np.ndarray:
    """The logits processors that apply with or without sampling, in place on x (rows, V) (logits or
    log-probabilities): repetition penalty over each row's ids in `history` (rows, n; -1 = none), then
    min_new_tokens (no eos id before `step` reaches it)."""
    if cfg.repetition_penalty != 1.0:
        for r in range(x.shape[0]):
            seen = np.unique(history[r][history[r] >= 0])
            v = x[r, seen]
            x[r, seen] = np.where(v < 0, v * cfg.repetition_penalty, v / cfg.repetition_penalty)
    if step < cfg.min_new_tokens and cfg.eos_token_id:
        x[:, list(cfg.eos_token_id)] = -np.inf
    return x


def sample(logits: np.ndarray, history: np.ndarray, step: int, cfg: GenerationConfig, rng) -> np.ndarray:
    """Next token per row from float32 logits (B, V). history (B, n): prompt and generated ids (-1 = none).
    The processor order of transformers: repetition penalty, min length, temperature, top-k, top-p."""
    x = process_logits(logits.astype(np.float32, copy=True), history, step, cfg)
    B = x.shape[0]
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

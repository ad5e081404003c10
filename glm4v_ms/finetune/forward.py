"""The training forward: the same decoder layers as inference, taken the other way through (no KV cache: each
layer attends over the step's own keys and values under a causal + padding mask), and the loss.

Host side (NumPy, as for inference): embeddings with the frozen vision tower's features written in (computed
without gradient), M-RoPE positions from the attention mask (model.positions), the mask, and the rows that
predict a trained token. Device side: the decoder, the final norm, the head over those rows only, and the sum of
their cross-entropies. The loss is that sum over the step's trained tokens (transformers' Trainer:
num_items_in_batch, over every micro-batch of gradient accumulation), so the caller divides.

Shapes are bucketed (length to a multiple of 64, trained rows likewise) so that a compiled training step is
reused across batches: padded positions are masked keys with no label, padded rows have weight 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from .. import rope
from ..attention import rms_norm, training_mask

IGNORE = -100
_mm_nt = ops.MatMul(transpose_b=True)


def bucket(n: int, step: int = 64) -> int:
    return max(step, -(-int(n) // step) * step)


@dataclass
class Step:
    h: Tensor          # (B, L, D) input embeddings (vision features written in)
    cos: Tensor        # (B, L, R)
    sin: Tensor
    seen: Tensor       # (B, L, L) bool: causal and key padding
    rows: Tensor       # (n,) int32: flat positions b * L + t whose next token is trained
    targets: Tensor    # (n,) int32: that next token
    weight: Tensor     # (n,) float32: 1, or 0 for bucket padding
    tokens: int        # trained tokens (the real rows)
    length: int        # real (unbucketed) length


def prepare(model, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, pad_to_bucket: bool = True) -> Step:
    ids = np.asarray(input_ids, np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    B, L = ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool).reshape(B, L)
    lab = np.full((B, L), IGNORE, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(B, L)
    h = model.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    pos3, _ = model.positions(ids, mask, image_grid_thw, video_grid_thw)
    Lb = bucket(L) if pad_to_bucket else L
    if Lb > L:   # right padding: masked keys, no labels
        h = ops.cat([h, ops.zeros((B, Lb - L, h.shape[-1]), h.dtype)], 1)
        pos3 = np.pad(pos3, ((0, 0), (0, 0), (0, Lb - L)))
        mask = np.pad(mask, ((0, 0), (0, Lb - L)))
        lab = np.pad(lab, ((0, 0), (0, Lb - L)), constant_values=IGNORE)
    t = model.config.text
    cos, sin = rope.text_cos_sin(pos3, t.rotary_dim, t.rope_theta, t.mrope_section)
    seen = np.tril(np.ones((Lb, Lb), bool))[None] & mask[:, None, :]
    nxt = np.concatenate([lab[:, 1:], np.full((B, 1), IGNORE)], 1)   # position t predicts token t + 1
    b, s = np.nonzero(nxt != IGNORE)
    n = len(b)
    nb = bucket(n, 16) if pad_to_bucket else n
    rows = np.zeros(nb, np.int32)
    rows[:n] = b * Lb + s
    targets = np.zeros(nb, np.int32)
    targets[:n] = nxt[b, s]
    weight = np.zeros(nb, np.float32)
    weight[:n] = 1
    return Step(h, Tensor(cos), Tensor(sin), Tensor(seen), Tensor(rows), Tensor(targets), Tensor(weight), n, L)


def hidden(model, h, cos, sin, seen):
    """The decoder without a cache, then the final norm: (B, L, D)."""
    text = model.text
    cos, sin = cos.astype(h.dtype), sin.astype(h.dtype)
    L = h.shape[1]
    mask = training_mask(seen)   # once for every layer
    for layer in text.layers:
        h = layer(h, cos, sin, mask, None, None, None, None, L)
    return rms_norm(h, text.norm.weight, text.cfg.rms_norm_eps)


def loss_sum(model, h, cos, sin, seen, rows, targets, weight):
    """Sum of the cross-entropies of the trained rows (float32), the head run over those rows only."""
    x = hidden(model, h, cos, sin, seen)
    x = ops.gather(x.reshape(-1, x.shape[-1]), rows, 0)
    return ce_sum(_mm_nt(x, model.lm_head.weight), targets, weight)   # the head in the model's dtype, as the reference


def ce_sum(logits, targets, weight):
    logits = logits.astype(ms.float32)
    lse = ops.logsumexp(logits, -1)
    picked = ops.gather_elements(logits, 1, targets.reshape(-1, 1).astype(ms.int64)).reshape(-1)
    return ((lse - picked) * weight).sum()


def forward_with_loss(model, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                      pixel_values_videos=None, video_grid_thw=None):
    """`model(**inputs, labels=labels)`: logits of every position and the mean cross-entropy over the shifted
    trained tokens (transformers' ForCausalLMLoss), through the training path."""
    from ..outputs import Output
    st = prepare(model, input_ids, attention_mask, labels, pixel_values, image_grid_thw, pixel_values_videos,
                 video_grid_thw, pad_to_bucket=False)
    x = hidden(model, st.h, st.cos, st.sin, st.seen)
    logits = _mm_nt(x.reshape(-1, x.shape[-1]), model.lm_head.weight).reshape(x.shape[:2] + (-1,))
    total = ce_sum(ops.gather(logits.reshape(-1, logits.shape[-1]), st.rows, 0), st.targets, st.weight)
    loss = total / max(st.tokens, 1) if st.tokens else total * float("nan")
    ids = np.asarray(input_ids).reshape(logits.shape[0], -1)
    _, deltas = model.positions(ids, None if attention_mask is None else np.asarray(attention_mask), image_grid_thw,
                                video_grid_thw)
    return Output(logits=logits, rope_deltas=deltas, loss=loss)


class Grad:
    """(sum of the trained rows' cross-entropies, gradients of `params`) for one prepared micro-batch:
    mindspore.value_and_grad over the training forward, compiled (ms.jit) unless `jit` is False."""

    def __init__(self, model, params, jit: bool = True):
        self.model, self.params = model, list(params)

        def fn(h, cos, sin, seen, rows, targets, weight):
            return loss_sum(model, h, cos, sin, seen, rows, targets, weight)
        self.vg = ms.value_and_grad(fn, None, self.params)
        self.run = ms.jit(self.vg) if jit else self.vg

    def __call__(self, st: Step):
        loss, grads = self.run(st.h, st.cos, st.sin, st.seen, st.rows, st.targets, st.weight)
        return loss, list(grads)

"""Attention and the small numeric kernels shared by the vision tower and the decoder: one dispatch.

Three modes, fixed per process before the first graph is compiled (model.select_device sets it):
- "plain"    (CPU): matmul + softmax in float32, norms and rotary written out.
- "ascend"   (NPU): the fused kernels: fused_infer_attention_score over the static cache (prompt and incremental
             branches), the FlashAttentionScore primitive in varlen "TH" layout for the vision tower's
             per-image attention, rms_norm, rotary_position_embedding.
- "emulated" (CPU, tests): the Ascend code path, calling emulations of those four kernels (ascend_emulation.py)
             that implement and check their documented contracts; argument mistakes show up without hardware.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from . import ascend_emulation as emu

NEG = -1e30  # additive mask: finite, so a fully masked row (a padding query) softmaxes to uniform, not NaN
MODES = ("plain", "ascend", "emulated")
_MODE = "plain"

_bmm_nt = ops.BatchMatMul(transpose_b=True)   # q @ k^T without materialising k^T
VISION_SCORES_BUDGET = 256 << 20   # bytes of one (heads, query block, segment) float32 score tensor (plain path)


def set_mode(mode: str):
    global _MODE
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    _MODE = mode


def mode() -> str:
    return _MODE


def _flash_attention_score_th(query, key, value, head_num, scale_value=1.0, input_layout="TH", sparse_mode=0,
                              attn_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None):
    """The FlashAttentionScore primitive, called as its emulation is (construction arguments, then inputs)."""
    fa = FlashAttentionScore(head_num=head_num, scale_value=scale_value, input_layout=input_layout,
                             sparse_mode=sparse_mode)
    return fa(query, key, value, None, None, None, attn_mask, None, actual_seq_qlen, actual_seq_kvlen)[3]


def _kernels():
    """The fused kernels, real or emulated (the emulations take the same arguments)."""
    if _MODE == "ascend":
        return ops.fused_infer_attention_score, _flash_attention_score_th, ops.rms_norm, ops.rotary_position_embedding
    return (emu.fused_infer_attention_score, emu.flash_attention_score_th, emu.rms_norm,
            emu.rotary_position_embedding)


def rms_norm(x, weight, eps):
    """Statistics in float32, cast back, then scale by the weight (the reference's order). The fused kernel
    multiplies before its single rounding: identical in fp32, within one bf16 rounding otherwise."""
    if _MODE != "plain":
        return _kernels()[2](x, weight, eps)[0]
    x32 = x.astype(ms.float32)
    y = x32 * ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps)
    return y.astype(x.dtype) * weight


def layer_norm(x, weight, bias, eps):
    x32 = x.astype(ms.float32)
    mu = x32.mean(-1, keep_dims=True)
    d = x32 - mu
    y = d * ops.rsqrt((d * d).mean(-1, keep_dims=True) + eps)
    return y.astype(x.dtype) * weight + bias


def rope(x, cos, sin):
    """Rotate-half rotary over the last dim of x (B, S, N, D), cos/sin broadcastable as (B|1, S, 1, D)."""
    if _MODE != "plain":
        return _kernels()[3](x, cos, sin, 0)
    x1, x2 = ops.split(x, x.shape[-1] // 2, -1)
    return x * cos + ops.cat([-x2, x1], -1) * sin


def decoder_attention(q, k_cache, v_cache, seen, kv_len, scale):
    """Grouped-query attention of new queries over the static cache.

    q (B, L, H, D); caches (B, Hkv, S, D), S the slots attended over (a prompt chunk: the filled ones only);
    seen (B, L, S) bool, True where a query may attend; kv_len (B,) int64,
    the slots filled so far (the fused kernel stops there; the mask alone is enough for the maths).
    Returns (B, L, H*D)."""
    B, L, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if _MODE != "plain":
        # BNSD; the mask marks what to *discard*; a left-padding query row is all discarded, so the prompt branch
        # asks for row-wise invalidity correction (inner_precise 2), which the incremental branch does not take.
        out, _ = _kernels()[0](q.transpose(0, 2, 1, 3), k_cache, v_cache, atten_mask=~seen[:, None],
                               actual_seq_lengths_kv=kv_len, num_heads=H, num_key_value_heads=Hkv, scale=scale,
                               input_layout="BNSD",
                               sparse_mode=0, inner_precise=2 if L > 1 else 0)
        return out.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    return _plain_attention(q, k_cache, v_cache, seen, scale)


def causal_attention(q, k, v, mask, scale):
    """Training: attention of a whole sequence over its own keys/values, no cache. q (B, L, H, D), k/v (B, L, Hkv, D).
    mask (made once for all layers, outside the gradient; `training_mask`): plain mode, the additive float32
    (B, L, L), 0 where a query may attend (causal and padding), NEG elsewhere; otherwise the flash-attention
    kernel's (B, 1, L, L) bool, True = discard: FlashAttentionScore (BNSD, sparse_mode 0) has a backward on
    Ascend, where the inference kernel has none. Returns (B, L, H*D)."""
    B, L, H, D = q.shape
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if _MODE == "plain":
        return _plain_attention(q, k, v, None, scale, mask)
    fa = emu.flash_attention_score_bnsd if _MODE == "emulated" else _flash_attention_score_bnsd
    o = fa(q.transpose(0, 2, 1, 3), k, v, H, scale_value=scale, attn_mask=mask, sparse_mode=0)
    return o.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def training_mask(seen):
    """seen (B, L, L) bool (may attend) -> the mask causal_attention takes in this mode."""
    if _MODE == "plain":
        return ops.stop_gradient((1.0 - seen.astype(ms.float32)) * NEG)
    return ops.stop_gradient(~seen[:, None])


def _flash_attention_score_bnsd(query, key, value, head_num, scale_value=1.0, attn_mask=None, sparse_mode=0):
    fa = FlashAttentionScore(head_num=head_num, scale_value=scale_value, input_layout="BNSD", sparse_mode=sparse_mode)
    return fa(query, key, value, None, None, None, attn_mask.astype(ms.uint8), None, None, None)[3]


def _plain_attention(q, k_cache, v_cache, seen, scale, bias=None):
    B, L, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    # query heads sharing a KV head are stacked along the length axis: one batched matmul, no repeated K/V
    g = H // Hkv
    qg = q.reshape(B, L, Hkv, g, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * L, D)
    s = _bmm_nt(qg, k_cache).astype(ms.float32) * scale                   # (B, Hkv, g*L, S)
    bias = ((1.0 - seen.astype(ms.float32)) * NEG)[:, None, None] if bias is None else bias[:, None, None]
    p = ops.softmax(s.reshape(B, Hkv, g, L, S) + bias, -1).astype(q.dtype)
    o = ops.matmul(p.reshape(B, Hkv, g * L, S), v_cache)                  # (B, Hkv, g*L, D)
    return o.reshape(B, Hkv, g, L, D).transpose(0, 3, 1, 2, 4).reshape(B, L, H * D)


def vision_attention(q, k, v, seg_lens, scale, between=None):
    """Non-causal attention isolated per segment (one image, or one temporal patch of a video).

    q, k, v (N, H, D); seg_lens a list of Python ints summing to N. `between()`: called between two query blocks
    (plain path; the serving engine decodes its other rows there)."""
    if _MODE != "plain":
        T, H, D = q.shape
        cu = tuple(int(c) for c in np.cumsum(seg_lens))
        key = (H, float(scale), cu)
        if key not in _VARLEN:
            _VARLEN.clear()   # one image layout at a time: the graphs are small, compiling one is cheap
            _VARLEN[key] = _VarlenAttention(*key)
        return _VARLEN[key](q.reshape(T, H * D), k.reshape(T, H * D), v.reshape(T, H * D))
    # Segment by segment: a block-diagonal mask over all N patches would cost N^2 memory (a 4K image is ~24000),
    # and within a segment queries in blocks whose float32 scores fit VISION_SCORES_BUDGET (a 4K image in one
    # segment: 2 heads x 24128^2 x 4 bytes = 4.7 GB at once otherwise). Each query row sees all its keys either
    # way: the same result.
    out = []
    H = q.shape[1]
    for qs, ks, vs in zip(*(ops.split(t.transpose(1, 0, 2), list(seg_lens), 1) for t in (q, k, v))):  # (H, n, D)
        n = qs.shape[1]
        step = max(1, VISION_SCORES_BUDGET // (H * n * 4))
        for qb in (ops.split(qs, step, 1) if step < n else (qs,)):
            if out and between is not None:
                between()
            s = _bmm_nt(qb, ks).astype(ms.float32) * scale
            out.append(ops.matmul(ops.softmax(s, -1).astype(q.dtype), vs))
    o = (out[0] if len(out) == 1 else ops.cat(out, 1)).transpose(1, 0, 2)
    return o.reshape(o.shape[0], -1)


_VARLEN = {}


class _VarlenAttention(nn.Cell):
    """Flash attention over concatenated segments (one per image / temporal patch) in the varlen "TH" layout,
    without a mask: non-causal within each segment, nothing across. TH rather than TND: the documentation ties TND
    to causal masks (sparse_mode 2/3, next_tokens 0), and TH is what vllm-mindspore runs for GLM-4.1V's vision
    tower. Compiled, because vllm-mindspore reports that TH does not run in PyNative; the segment lengths are
    constants of the graph, so all blocks of one image share it."""

    def __init__(self, heads, scale, cu):
        super().__init__()
        self.heads, self.scale, self.cu = heads, scale, cu

    @ms.jit
    def construct(self, q, k, v):
        return _kernels()[1](q, k, v, self.heads, scale_value=self.scale, input_layout="TH", sparse_mode=0,
                             actual_seq_qlen=self.cu, actual_seq_kvlen=self.cu)

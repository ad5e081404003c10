"""Attention and the small numeric kernels shared by the vision tower and the decoder: one dispatch.

Three modes, fixed per process before the first graph is compiled (model.select_device sets it):
- "plain"    (CPU): matmul + softmax in float32, norms and rotary written out.
- "ascend"   (NPU): the fused kernels: fused_infer_attention_score over the static cache (prompt and incremental
             branches), the FlashAttentionScore primitive in a varlen layout for the vision tower's per-image
             attention, rms_norm, rotary_position_embedding.
- "emulated" (CPU, tests): the Ascend code path, calling emulations of those four kernels (ascend_emulation.py)
             that implement and check their documented contracts; argument mistakes show up without hardware.
In "ascend" and "emulated" mode each kernel runs fused only where the model's configuration (dtype, head counts
and sizes, chip) fits the kernel's documented limits (kernel_limits.py): choose_kernels decides when a model is
built; past a limit that kernel runs the plain maths, as vllm-mindspore falls back.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from . import ascend_emulation as emu
from . import kernel_limits as limits

NEG = -1e30  # additive mask: finite, so a fully masked row (a padding query) softmaxes to uniform, not NaN
MODES = ("plain", "ascend", "emulated")
_MODE = "plain"

_bmm_nt = ops.BatchMatMul(transpose_b=True)   # q @ k^T without materialising k^T
VISION_SCORES_BUDGET = 256 << 20   # bytes of one (heads, query block, segment) float32 score tensor (plain path)


_FUSED = ()          # the kernels that run fused (choose_kernels); a tuple: read as a constant inside graphs
_VARLEN_LAYOUT = "TND"
KERNELS = ("decoder_attention", "vision_attention", "rms_norm", "rope")


def set_mode(mode: str):
    global _MODE, _FUSED
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    _MODE = mode
    _FUSED = () if mode == "plain" else KERNELS   # until a model's configuration is checked (choose_kernels)


def mode() -> str:
    return _MODE


def fused(kernel: str) -> bool:
    return kernel in _FUSED


def choose_kernels(cfg, dtype, world: int = 1) -> dict:
    """Which kernels run fused for this model (Glm4vConfig, weight dtype, tensor-parallel ranks); returns the
    reason for each that runs plain. Called when a model is built, before anything is compiled."""
    global _FUSED, _VARLEN_LAYOUT
    if _MODE == "plain":
        _FUSED = ()
        return {}
    emulated = _MODE == "emulated"
    chip = limits.soc(emulated)
    t, v = cfg.text, cfg.vision
    heads, kv = t.num_attention_heads // world, max(1, t.num_key_value_heads // world)
    why = {"decoder_attention": limits.fused_infer_attention(heads, kv, t.head_dim, dtype, chip, emulated),
           "vision_attention": limits.flash_attention_varlen(v.num_heads, v.num_heads, v.head_dim, dtype, chip,
                                                             emulated),
           # the vision rotary runs in float32 (as the reference), the text one in the weights' dtype
           "rope": limits.rotary_position_embedding(max(heads, kv, v.num_heads), t.rotary_dim, dtype, chip, emulated)
                   or limits.rotary_position_embedding(v.num_heads, v.head_dim, ms.float32, chip, emulated),
           "rms_norm": limits.rms_norm(dtype, chip, emulated)}
    _FUSED = tuple(k for k in KERNELS if why[k] is None)
    # the varlen rule depends on which kernel MindSpore selects [kernel_limits: ms-aclnn, ms-int]: its internal
    # kernel (infer_boost only) reads per-segment lengths in "TH" (vllm-mindspore's GLM-4.1V); without infer_boost
    # only "TND" reaches a varlen kernel, aclnnFlashAttentionVarLenScore, with cumulative ends (vllm-mindspore's
    # Qwen2.5-VL, which disables the internal kernel to get it)
    _VARLEN_LAYOUT = "TH" if limits.internal_kernels("FlashAttentionScore") else "TND"
    return {k: r for k, r in why.items() if r is not None}


def _flash_attention_score(query, key, value, head_num, scale_value=1.0, input_layout="TND", sparse_mode=0,
                           attn_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None):
    """The FlashAttentionScore primitive, called as its emulation is (construction arguments, then inputs)."""
    fa = FlashAttentionScore(head_num=head_num, scale_value=scale_value, input_layout=input_layout,
                             sparse_mode=sparse_mode)
    return fa(query, key, value, None, None, None, attn_mask, None, actual_seq_qlen, actual_seq_kvlen)[3]


def _kernels():
    """The fused kernels, real or emulated (the emulations take the same arguments)."""
    if _MODE == "ascend":
        return ops.fused_infer_attention_score, _flash_attention_score, ops.rms_norm, ops.rotary_position_embedding
    return (emu.fused_infer_attention_score, emu.flash_attention_score, emu.rms_norm,
            emu.rotary_position_embedding)


def rms_norm(x, weight, eps):
    """Statistics in float32, cast back, then scale by the weight (the reference's order). The fused kernel
    multiplies before its single rounding: identical in fp32, within one bf16 rounding otherwise."""
    if fused("rms_norm"):
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
    if fused("rope"):
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
    if fused("decoder_attention"):
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
    if fused("vision_attention") and limits.varlen_segments(seg_lens) is None:
        T, H, D = q.shape
        th = _VARLEN_LAYOUT == "TH"
        seqs = tuple(int(n) for n in (seg_lens if th else np.cumsum(seg_lens)))   # lengths / cumulative ends
        key = (H, float(scale), _VARLEN_LAYOUT, seqs)
        if key not in _VARLEN:
            _VARLEN.clear()   # one image layout at a time: the graphs are small, compiling one is cheap
            _VARLEN[key] = _VarlenAttention(*key)
        if th:
            q, k, v = (t.reshape(T, H * D) for t in (q, k, v))
        return _VARLEN[key](q, k, v).reshape(T, H * D)
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


def vision_segment_mask(seg):
    """Per-patch segment ids (N,) int32 -> the mask vision_attention_masked takes in this mode, made once for every
    block, outside the gradient: where the fused kernel runs, FlashAttentionScore's (N, N) bool, True = discard
    (a patch sees only its own segment); otherwise the additive float32 (N, N), 0 within a segment, NEG across."""
    same = seg[:, None] == seg[None, :]
    if fused("vision_attention"):
        return ops.stop_gradient(~same)
    return ops.stop_gradient((1.0 - same.astype(ms.float32)) * NEG)


def vision_attention_masked(q, k, v, mask, scale):
    """vision_attention with the segments as data (vision_segment_mask), so that one compiled graph takes every
    image layout of N patches (the training graph). The varlen kernel's segment ends are not data here: MindSpore
    documents FlashAttentionScore's actual_seq_qlen / kvlen as List / Tuple[int64], which reach
    aclnnFlashAttentionVarLenScore as a host aclIntArray [kernel_limits: ms-fas, ms-aclnn], so they would be
    graph constants again. Fused: the same primitive in "BNSD" (B = 1) with the block-diagonal mask, sparse_mode
    0 (aclnnFlashAttentionScore: no sequence lengths; it has a backward, as causal_attention uses it). Plain: the
    masked scores in query blocks of VISION_SCORES_BUDGET. Either way every pair of the N patches is scored
    (N^2, where the varlen path costs the sum of the segments' squares). q, k, v (N, H, D); returns (N, H*D)."""
    N, H, D = q.shape
    if fused("vision_attention"):
        fa = emu.flash_attention_score_bnsd if _MODE == "emulated" else _flash_attention_score_bnsd
        o = fa(*(t.transpose(1, 0, 2)[None] for t in (q, k, v)), H, scale_value=scale, attn_mask=mask, sparse_mode=0)
        return o[0].transpose(1, 0, 2).reshape(N, H * D)
    qs, ks, vs = (t.transpose(1, 0, 2) for t in (q, k, v))   # (H, N, D)
    step = max(1, VISION_SCORES_BUDGET // (H * N * 4))
    blocks = zip(ops.split(qs, step, 1), ops.split(mask, step, 0)) if step < N else ((qs, mask),)
    out = []
    for qb, mb in blocks:
        s = _bmm_nt(qb, ks).astype(ms.float32) * scale + mb
        out.append(ops.matmul(ops.softmax(s, -1).astype(q.dtype), vs))
    o = (out[0] if len(out) == 1 else ops.cat(out, 1)).transpose(1, 0, 2)
    return o.reshape(N, H * D)


_VARLEN = {}


class _VarlenAttention(nn.Cell):
    """Flash attention over concatenated segments (one per image / temporal patch), no mask: non-causal within
    each segment, nothing across (with no mask the kernel attends in full within each sequence [kernel_limits:
    cann-vl]). "TND": q/k/v (T, N, D), cumulative segment ends; "TH": (T, N*D), segment lengths (see
    choose_kernels). Compiled, because vllm-mindspore reports that TH does not run in PyNative; the segments are
    constants of the graph, so all blocks of one image share it."""

    def __init__(self, heads, scale, layout, seqs):
        super().__init__()
        self.heads, self.scale, self.layout, self.seqs = heads, scale, layout, seqs

    @ms.jit
    def construct(self, q, k, v):
        return _kernels()[1](q, k, v, self.heads, scale_value=self.scale, input_layout=self.layout, sparse_mode=0,
                             actual_seq_qlen=self.seqs, actual_seq_kvlen=self.seqs)

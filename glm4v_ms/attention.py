"""Attention and the small numeric kernels shared by the vision tower and the decoder.

One place decides how attention runs. The plain path (CPU) is written with matmul + softmax in float32.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

NEG = -1e30  # additive mask: finite, so a fully masked row (a padding query) softmaxes to uniform, not NaN

_bmm_nt = ops.BatchMatMul(transpose_b=True)   # q @ k^T without materialising k^T


def rms_norm(x, weight, eps):
    """Statistics in float32, cast back, then scale by the weight (the reference's order)."""
    x32 = x.astype(ms.float32)
    y = x32 * ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps)
    return y.astype(x.dtype) * weight


def layer_norm(x, weight, bias, eps):
    x32 = x.astype(ms.float32)
    mu = x32.mean(-1, keep_dims=True)
    d = x32 - mu
    y = d * ops.rsqrt((d * d).mean(-1, keep_dims=True) + eps)
    return y.astype(x.dtype) * weight + bias


def rotate_half_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin over the last dim, rotate_half = cat(-x2, x1)."""
    h = x.shape[-1] // 2
    return x * cos + ops.cat([-x[..., h:], x[..., :h]], -1) * sin


def decoder_attention(q, k_cache, v_cache, bias, scale):
    """Grouped-query attention of new queries over the whole static cache.

    q (B, L, H, D); caches (B, Hkv, S, D); bias (B, 1, 1, L, S) additive. Query heads sharing a KV head are
    stacked along the length axis so one batched matmul serves the group without repeating K/V."""
    B, L, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    g = H // Hkv
    qg = q.reshape(B, L, Hkv, g, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * L, D)
    s = _bmm_nt(qg, k_cache).astype(ms.float32) * scale                   # (B, Hkv, g*L, S)
    p = ops.softmax(s.reshape(B, Hkv, g, L, S) + bias, -1).astype(q.dtype)
    o = ops.matmul(p.reshape(B, Hkv, g * L, S), v_cache)                  # (B, Hkv, g*L, D)
    return o.reshape(B, Hkv, g, L, D).transpose(0, 3, 1, 2, 4).reshape(B, L, H * D)


def vision_attention(q, k, v, seg_lens, scale):
    """Non-causal attention isolated per segment (one image, or one temporal patch of a video).

    q, k, v (N, H, D); seg_lens a list of Python ints summing to N. Runs segment by segment: a block-diagonal
    mask over all N patches would cost N^2 memory (a 4K image alone is ~6000 merged tokens, 24000 patches)."""
    out, start = [], 0
    for n in seg_lens:
        qs, ks, vs = (t[start:start + n].transpose(1, 0, 2) for t in (q, k, v))   # (H, n, D)
        s = _bmm_nt(qs, ks).astype(ms.float32) * scale
        p = ops.softmax(s, -1).astype(q.dtype)
        out.append(ops.matmul(p, vs).transpose(1, 0, 2))
        start += n
    o = out[0] if len(out) == 1 else ops.cat(out, 0)
    return o.reshape(o.shape[0], -1)

"""EMULATIONS of five Ascend kernels, for CPU tests of the Ascend code path. Not used on an NPU.

Each function takes the same arguments as the MindSpore 2.10 op of the same name, checks them against the op's
documented contract (layouts, head counts, head size, mask shape and meaning, sequence-length arguments; the
limits and their sources are in kernel_limits.py) and computes the documented result with plain ops.
Deliberate difference: float32 inputs are accepted (the real kernels take float16/bfloat16 only for attention),
because CPU has no bfloat16 kernels.
Only hardware can confirm speed, the kernels' own rounding, and contract details the documentation leaves open.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from . import kernel_limits as lim

_ATTN_DTYPES = (ms.float16, ms.bfloat16, ms.float32)   # float32: emulation only
_bmm_nt = ops.BatchMatMul(transpose_b=True)


def _check(cond, msg):
    """An argument the real kernel would reject or misread. (A plain ValueError: graph mode raises only the
    standard exception types.)"""
    if not cond:
        raise ValueError("Ascend kernel contract: " + msg)


def _softmax_attend(q, k, v, discard, scale):
    """q (..., Sq, D), k/v (..., Skv, D), discard broadcastable to (..., Sq, Skv) or None."""
    s = _bmm_nt(q, k).astype(ms.float32) * scale
    if discard is not None:
        s = s + discard.astype(ms.float32) * -1e30
    return ops.matmul(ops.softmax(s, -1).astype(q.dtype), v)


def fused_infer_attention_score(query, key, value, *, atten_mask=None, actual_seq_lengths_kv=None, num_heads=1,
                                scale=1.0, input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=1,
                                **unused):
    """PromptFlashAttention (Q_S > 1) / IncreFlashAttention (Q_S == 1) in one op; BNSD layout only here.
    Returns (attention_out, softmax_lse placeholder of shape (1,))."""
    _check(input_layout == "BNSD", f"emulation covers input_layout BNSD, got {input_layout}")
    _check(query.ndim == 4 and key.ndim == 4 and value.shape == key.shape, "BNSD needs 4D query/key/value, key == value shape")
    B, N, Sq, D = query.shape
    Bk, Nkv, Skv, Dk = key.shape
    _check(query.dtype in _ATTN_DTYPES and key.dtype == query.dtype, f"dtype {query.dtype} / {key.dtype}")
    _check(N == num_heads, f"num_heads={num_heads} but query has N={N}")
    nkv = num_key_value_heads or N
    _check(nkv == Nkv, f"num_key_value_heads={num_key_value_heads} but key has N={Nkv} (BNSD requires equality)")
    _check(N % nkv == 0 and N // nkv <= 64, f"num_heads {N} / kv heads {nkv}: must divide, ratio <= 64")
    _check(Bk == B and Dk == D, f"key {key.shape} does not fit query {query.shape}")
    # [kernel_limits: ms-fia] N <= 256, D <= 512 and 16-aligned (float16/bfloat16), B <= 65535
    _check(N <= 256 and D <= 512 and D % 16 == 0, f"N={N} (<= 256), D={D} (<= 512, a multiple of 16)")
    _check(B <= lim.FIA_MAX_BATCH, f"batch {B} > {lim.FIA_MAX_BATCH}")
    _check(sparse_mode in (0, 1), f"sparse_mode {sparse_mode}: only 0/1 take a full user mask")
    if Sq == 1:
        _check(inner_precise in (0, 1), f"inner_precise {inner_precise} is not allowed when Q_S is 1")
    else:
        _check(inner_precise in (0, 1, 2, 3), f"inner_precise {inner_precise}")
    g = N // nkv
    qg = query.reshape(B, nkv, g * Sq, D)           # heads h = kv * g + j share kv head `kv`
    discard = None
    if atten_mask is not None:
        _check(atten_mask.dtype in (ms.bool_, ms.uint8, ms.int8), f"atten_mask dtype {atten_mask.dtype}")
        ok = ((B, 1, 1, Skv), (B, 1, Skv), (B, Skv)) if Sq == 1 else ((Sq, Skv), (B, Sq, Skv), (1, Sq, Skv),
                                                                     (B, 1, Sq, Skv), (1, 1, Sq, Skv))
        _check(tuple(atten_mask.shape) in ok, f"atten_mask shape {atten_mask.shape} not among {ok} for Q_S={Sq}")
        m4 = atten_mask.reshape((-1, 1, Sq, Skv))                     # every allowed shape, as (B|1, 1, Sq, Skv)
        discard = m4[:, :, None].broadcast_to((B, 1, g, Sq, Skv)).reshape(B, 1, g * Sq, Skv)
    if actual_seq_lengths_kv is not None:   # per batch row: key/value slots at or past it are not read
        _check(actual_seq_lengths_kv.dtype == ms.int64 and tuple(actual_seq_lengths_kv.shape) == (B,),
               f"actual_seq_lengths_kv: int64 of shape ({B},), got {actual_seq_lengths_kv.dtype} {actual_seq_lengths_kv.shape}")
        beyond = ops.arange(0, Skv, 1, dtype=ms.int64)[None, :] >= actual_seq_lengths_kv[:, None]     # (B, Skv)
        beyond = beyond[:, None, None, :]
        discard = beyond if discard is None else discard | beyond
    out = _softmax_attend(qg, key, value, discard, scale).reshape(B, N, Sq, D)
    return out, ops.zeros((1,), ms.float32)


def flash_attention_score(query, key, value, head_num, scale_value=1.0, input_layout="TND", sparse_mode=0,
                          attn_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None):
    """The FlashAttentionScore primitive (its construction arguments, then its inputs) in a varlen layout, no mask:
    non-causal attention inside each segment (the vision tower's call). Returns attention_out, the primitive's
    fourth output, shaped as query. The two layouts reach different kernels with different rules
    (kernel_limits.py):
      "TND" (T, N, D), aclnnFlashAttentionVarLenScore: actual_seq_* are cumulative segment ends, increasing, the
            last equal to T [ms-fas, ms-aclnn];
      "TH"  (T, N*D), the internal kernel (infer_boost only): actual_seq_* are per-segment lengths summing to T
            [ms-int], as vllm-mindspore's GLM-4.1V passes repeat_interleave(h*w, t)."""
    _check(input_layout in ("TND", "TH"), f"emulation covers the varlen layouts TND and TH, got {input_layout}")
    tnd = input_layout == "TND"
    _check(query.ndim == (3 if tnd else 2) and key.ndim == query.ndim and value.shape == key.shape,
           f"{input_layout} needs {'(T, N, D)' if tnd else '(T, N*D)'} query/key/value, got {query.shape}")
    T1, T2 = query.shape[0], key.shape[0]
    _check(query.dtype in _ATTN_DTYPES and key.dtype == query.dtype, f"dtype {query.dtype}")
    if tnd:
        N1, D = query.shape[1], query.shape[2]
        _check(N1 == head_num and key.shape[2] == D, f"head_num {head_num}, query {query.shape}, key {key.shape}")
        N2 = key.shape[1]
    else:
        _check(query.shape[1] % head_num == 0, f"hidden {query.shape[1]} is not a multiple of head_num {head_num}")
        N1, D = head_num, query.shape[1] // head_num
        _check(key.shape[1] % D == 0, "key hidden is not a multiple of the head size")
        N2 = key.shape[1] // D
    _check(N1 % N2 == 0 and N1 <= 256, f"heads {N1} / kv heads {N2}: kv heads divide, <= 256")
    _check(D % 16 == 0 and D <= 512, f"head size {D}: must be a multiple of 16, <= 512")
    _check(attn_mask is None and sparse_mode == 0, "non-causal varlen: no mask, sparse_mode 0")
    bounds = []
    for name, seq, T in (("actual_seq_qlen", actual_seq_qlen, T1), ("actual_seq_kvlen", actual_seq_kvlen, T2)):
        _check(seq is not None, f"{input_layout} requires {name}")
        seq = [int(c) for c in seq]
        _check(1 <= len(seq) <= lim.VARLEN_MAX_SEGMENTS and T <= lim.VARLEN_MAX_TOKENS,
               f"{name}: 1 to {lim.VARLEN_MAX_SEGMENTS} segments, T <= {lim.VARLEN_MAX_TOKENS}")
        if tnd:
            _check(all(b > a for a, b in zip([0] + seq, seq)),
                   f"TND: {name} must be cumulative ends, increasing, no empty segment: {seq[:8]}")
            _check(seq[-1] == T, f"TND: {name} ends at {seq[-1]}, the tensor has T={T}")
            ends = seq
        else:
            ends, total = [], 0
            for n in seq:
                total += n
                ends.append(total)
            _check(all(n > 0 for n in seq) and total == T,
                   f"TH: {name} must be per-segment lengths summing to T={T}, got {seq[:8]} (sum {total})")
        bounds.append(ends)
    _check(bounds[0] == bounds[1], "self-attention: q and kv segments coincide")
    outs, start = [], 0
    for end in bounds[0]:
        q = query[start:end].reshape(end - start, N1, D).transpose(1, 0, 2)
        k, v = (t[start:end].reshape(end - start, N2, D).transpose(1, 0, 2) for t in (key, value))
        if N2 != N1:
            k, v = (ops.repeat_interleave(t, N1 // N2, 0) for t in (k, v))
        outs.append(_softmax_attend(q, k, v, None, scale_value).transpose(1, 0, 2).reshape(query[start:end].shape))
        start = end
    return outs[0] if len(outs) == 1 else ops.cat(outs, 0)


def flash_attention_score_bnsd(query, key, value, head_num, scale_value=1.0, attn_mask=None, sparse_mode=0):
    """The FlashAttentionScore primitive in the "BNSD" layout with a full user mask (sparse_mode 0): query
    (B, N1, S1, D), key/value (B, N2, S2, D), N2 dividing N1; attn_mask bool (B, 1, S1, S2), True = discard (the
    training decoder's causal + padding mask). Returns attention_out (B, N1, S1, D), the fourth output. Written in
    differentiable ops: the emulated training path takes its gradient as the real kernel's backward would."""
    _check(query.ndim == 4 and key.ndim == 4 and value.shape == key.shape, "BNSD needs 4-D query/key/value")
    B, N1, S1, D = query.shape
    Bk, N2, S2, Dk = key.shape
    _check(query.dtype in _ATTN_DTYPES and key.dtype == query.dtype, f"dtype {query.dtype} / {key.dtype}")
    _check(head_num == N1, f"head_num={head_num} but query has N1={N1}")
    _check(Bk == B and Dk == D and N1 % N2 == 0, f"key {key.shape} does not fit query {query.shape}")
    _check(D % 16 == 0 and D <= 512, f"head size {D}: must be a multiple of 16, <= 512")
    _check(sparse_mode == 0 and attn_mask is not None, "emulation covers sparse_mode 0 with a full mask")
    _check(attn_mask.dtype in (ms.bool_, ms.uint8) and tuple(attn_mask.shape) in ((B, 1, S1, S2), (S1, S2)),
           f"attn_mask {attn_mask.shape} {attn_mask.dtype}: (B, 1, S1, S2) or (S1, S2), bool or uint8")
    g = N1 // N2
    q = query.reshape(B, N2, g * S1, D)   # query heads sharing a KV head stacked along the length axis
    m = attn_mask if attn_mask.ndim == 4 else attn_mask[None, None]
    s = _bmm_nt(q, key).astype(ms.float32) * scale_value
    s = s.reshape(B, N2, g, S1, S2) + m[:, :, None].astype(ms.float32) * -1e30
    p = ops.softmax(s, -1).astype(query.dtype).reshape(B, N2, g * S1, S2)
    return ops.matmul(p, value).reshape(B, N1, S1, D)


def rms_norm(x, gamma, epsilon=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * gamma, statistics in float32; returns (y, rstd)."""
    _check(x.dtype in (ms.float16, ms.float32, ms.bfloat16) and gamma.dtype == x.dtype, f"dtypes {x.dtype}/{gamma.dtype}")
    _check(0 < epsilon <= 1, f"epsilon {epsilon}")
    _check(gamma.ndim <= x.ndim and tuple(gamma.shape) == tuple(x.shape[x.ndim - gamma.ndim:]), "gamma shape")
    x32 = x.astype(ms.float32)
    rstd = ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + epsilon)
    return (x32 * rstd * gamma.astype(ms.float32)).astype(x.dtype), rstd


def rotary_position_embedding(x, cos, sin, mode=0):
    """mode 0: x * cos + rotate_half(x) * sin (NeoX); mode 1: interleaved pairs (GPT-J). x is 4D."""
    _check(x.ndim == 4 and cos.ndim == 4 and sin.shape == cos.shape, "x, cos, sin must be 4D, cos == sin shape")
    _check(cos.dtype == x.dtype, f"cos dtype {cos.dtype} != x dtype {x.dtype}")
    D = x.shape[-1]
    _check(D % 2 == 0 and D < 896 and cos.shape[-1] == D, f"head size {D} (even, < 896, == cos's)")
    # [kernel_limits: ms-rope] "B, N < 1000"; our calls are BSND (cos 1S1D / BS1D)
    _check(x.shape[0] < lim.ROPE_MAX_BN and x.shape[2] < lim.ROPE_MAX_BN, f"x {x.shape}: B, N < {lim.ROPE_MAX_BN}")
    _check(cos.shape[2] == 1, f"cos {cos.shape}: BS1D / 1S1D for a BSND x")
    _check(all(c in (1, s) for c, s in zip(cos.shape, x.shape)), f"cos {cos.shape} does not broadcast to x {x.shape}")
    _check(mode in (0, 1), f"mode {mode}")
    if mode == 0:
        h = D // 2
        return x * cos + ops.cat([-x[..., h:], x[..., :h]], -1) * sin
    pairs = x.reshape(x.shape[:-1] + (D // 2, 2))
    rot = ops.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * cos + rot * sin


# ----------------------------------------------------------------------------------------------- weight-only quant
def _int4_values_host(b):
    # numpy, on the host: CPU has no kernel that reads qint4x2 (not even a cast), so its bytes come here
    b = np.asarray(b).view(np.int8)
    lo = (b << 4).astype(np.int8) >> 4
    return np.stack([lo, b >> 4], -1).reshape(b.shape[0], -1).astype(np.int8)


# qint4x2 (K, N/2) -> int8 (K, N): byte j holds column 2j in its low nibble and 2j+1 in its high one
_int4_values = ops.Custom(_int4_values_host, out_shape=lambda s: [s[0], s[1] * 2], out_dtype=lambda d: ms.int8,
                          func_type="pyfunc")


def weight_quant_batch_matmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                              bias=None, transpose_x=False, transpose_weight=False, antiquant_group_size=0):
    """WeightQuantBatchMatmul (aclnnWeightQuantBatchMatmulV2): y = x @ ((weight + offset) * scale) + bias, the
    weight int8 (k, n) or qint4x2 (k, n/2), scale/offset per channel (n,)/(1, n) or per group (ceil(k/gs), n).
    Emulation covers the non-transposed layout (the one the documentation recommends per group) and no output
    quantization (quant_scale/quant_offset: W8A16/W4A16 only). float32 x is accepted (emulation only)."""
    _check(x.ndim == 2 and weight.ndim == 2, f"x and weight must be 2-D, got {x.shape} and {weight.shape}")
    _check(x.dtype in _ATTN_DTYPES, f"x dtype {x.dtype}")
    _check(weight.dtype in (ms.int8, ms.qint4x2), f"weight dtype {weight.dtype} (int8 or qint4x2)")
    _check(not transpose_x and not transpose_weight, "emulation covers transpose_x = transpose_weight = False")
    _check(quant_scale is None and quant_offset is None, "weight-only: no quant_scale/quant_offset")
    m, k = x.shape
    int4 = weight.dtype == ms.qint4x2
    n = weight.shape[1] * (2 if int4 else 1)
    _check(weight.shape[0] == k, f"weight {weight.shape} does not fit x {x.shape} (k, n layout)")
    _check(1 <= k <= 65535 and 1 <= n <= 65535, f"k={k}, n={n}: each must lie in [1, 65535]")
    _check(antiquant_scale.dtype == x.dtype, f"antiquant_scale dtype {antiquant_scale.dtype} != x dtype {x.dtype}")
    gs = antiquant_group_size
    G = -(-k // gs) if gs else 1
    if gs:
        _check(gs % 32 == 0 and 32 <= gs <= k - 1, f"antiquant_group_size {gs}: a multiple of 32 in [32, k-1={k - 1}]")
        _check(tuple(antiquant_scale.shape) == (G, n), f"per-group scale {antiquant_scale.shape}, expected ({G}, {n})")
    else:
        _check(tuple(antiquant_scale.shape) in ((n,), (1, n), (1,)), f"per-channel/tensor scale {antiquant_scale.shape}")
    if antiquant_offset is not None:
        _check(antiquant_offset.shape == antiquant_scale.shape and antiquant_offset.dtype == x.dtype,
               f"antiquant_offset {antiquant_offset.shape} {antiquant_offset.dtype}: the scale's shape, x's dtype")
    if bias is not None:
        want = ms.float32 if x.dtype == ms.bfloat16 else x.dtype
        _check(tuple(bias.shape) == (n,) and bias.dtype == want, f"bias {bias.shape} {bias.dtype}: ({n},) {want}")
    w = (_int4_values(weight) if int4 else weight).astype(ms.float32)
    s = antiquant_scale.astype(ms.float32).reshape(-1, n if antiquant_scale.shape[-1] == n else 1)
    o = None if antiquant_offset is None else antiquant_offset.astype(ms.float32).reshape(s.shape)
    if gs:   # one row of scales per group of gs input rows (the last group may be short)
        s = s[:, None].broadcast_to((G, gs, n)).reshape(G * gs, n)[:k]
        o = None if o is None else o[:, None].broadcast_to((G, gs, n)).reshape(G * gs, n)[:k]
    dq = ((w if o is None else w + o) * s).astype(x.dtype)
    y = ops.matmul(x, dq)
    return y if bias is None else y + bias.astype(y.dtype)

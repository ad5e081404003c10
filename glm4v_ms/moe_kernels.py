"""The MoE block's Ascend path: fused router, token permutation by expert, grouped matmul, unpermute.

Ops, as vllm-mindspore's GLM-4.5 MoE calls them (../shared/GLM45V.md §3):
  FusedAddTopKDiv   sigmoid(logits) + bias -> group-limited top-k -> weights from the unbiased scores,
                    renormalised, times `scale`. The scale is passed explicitly as routed_scaling_factor (the op's
                    default is 2.5, and nothing multiplies the routed output afterwards);
  MoeInitRoutingV2  the (token, choice) pairs sorted by expert: expanded tokens, where each pair went, counts;
  GroupedMatmulV4   one matmul per expert over its contiguous rows (split_item 3, group_type 0, counts);
  MoeTokenUnpermute each token's k expert outputs gathered back and summed with the routing weights.
Expert parallelism (whole experts per rank) keeps the ops' shapes static: choices of another rank's experts
point at local expert 0 with weight 0 (vllm-mindspore's TP_MIX_EP trick), so the sum over ranks is exact.

"ascend" mode calls the real ops; "emulated" mode (CPU tests) calls the EMULATIONS below, which take the same
arguments, check them against the documented contracts and compute the documented result with plain ops.
Each part runs fused only where the model's configuration fits the op's documented limits (`choose`, at build
time; kernel_limits.py has the limits and sources), else the plain maths of moe.py, as vllm-mindspore does:
  router     FusedAddTopKDiv: <= 32 experts per group and 8 groups from 32 experts on, and an internal kernel
             (needs infer_boost). GLM-4.5V (128 experts, 1 group) always takes the plain sigmoid + top-k.
  experts    MoeInitRoutingV2 + GroupedMatmulV4 (float16/bfloat16/float32);
  unpermute  MoeTokenUnpermute: bfloat16 only, Atlas A2 only; otherwise the same gather + weighted sum in plain
             ops after the grouped matmul.
Deliberate difference: float32 is accepted (CPU has no bfloat16 kernels). Only hardware can confirm the real
ops' exact index conventions (documented tersely for MoeInitRoutingV2's expanded_row_idx) and rounding.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops
from mindspore.ops import auto_generate as _ag

from . import attention
from . import kernel_limits as lim
from .ascend_emulation import _check


# ----------------------------------------------------------------------------------------------- the Ascend path
def _kernels():
    if attention.mode() == "ascend":
        return _ag.fused_add_topk_div, ops.moe_init_routing_v2, _ag.grouped_matmul_v4, ops.moe_token_unpermute
    return fused_add_topk_div, moe_init_routing_v2, grouped_matmul_v4, moe_token_unpermute


def choose(cfg, dtype) -> dict:
    """The reason each MoE part ("router", "experts", "unpermute") runs plain for this configuration; a part
    not named runs fused. All plain in plain mode."""
    if attention.mode() == "plain":
        return {"router": "plain mode", "experts": "plain mode", "unpermute": "plain mode"}
    emulated = attention.mode() == "emulated"
    chip = lim.soc(emulated)
    why = {"router": lim.fused_add_topk_div(cfg.n_routed_experts, cfg.n_group, cfg.topk_group,
                                            cfg.num_experts_per_tok, chip, lim.internal_kernels("FusedAddTopKDiv")),
           "experts": lim.moe_init_routing(dtype, emulated) or lim.grouped_matmul(dtype, emulated),
           "unpermute": lim.moe_token_unpermute(dtype, cfg.num_experts_per_tok, chip, emulated)}
    return {k: r for k, r in why.items() if r is not None}


def route_fused(x, weight, bias, cfg):
    """The router through FusedAddTopKDiv: (weights (T, k) float32, expert ids (T, k) int32)."""
    logits = ops.dense(x.astype(ms.float32), weight)
    w, idx = _kernels()[0](logits, bias, cfg.n_group, cfg.topk_group, 2, cfg.num_experts_per_tok, 0,
                           cfg.norm_topk_prob, cfg.routed_scaling_factor)
    return w, idx.astype(ms.int32)


def routed_experts(t, w, idx, gate_up, down, e0: int, n_local: int, n_experts: int, fused_unpermute: bool = True):
    """Sum over the local experts of weight x SwiGLU expert(token), for tokens t (T, H)."""
    _, init_routing, gmm, unpermute = _kernels()
    T, k = idx.shape
    if n_local != n_experts:   # EP: foreign choices -> local expert 0, weight 0
        mine = (idx >= e0) & (idx < e0 + n_local)
        idx = ops.where(mine, idx - e0, ops.zeros_like(idx))
        w = ops.where(mine, w, ops.zeros_like(w))
    xs, row_idx, counts, _ = init_routing(t, idx, active_num=T * k, expert_capacity=0, expert_num=n_local,
                                          drop_pad_mode=0, expert_tokens_count_or_cumsum_flag=2,
                                          expert_tokens_before_capacity_flag=False)
    counts = counts.astype(ms.int64)
    gu = gmm([xs], [gate_up], group_list=counts, split_item=3, group_type=0, group_list_type=1)[0]
    g, u = ops.split(gu, gu.shape[-1] // 2, -1)
    y = gmm([ops.silu(g) * u], [down], group_list=counts, split_item=3, group_type=0, group_list_type=1)[0]
    if fused_unpermute:
        return unpermute(y, row_idx, w.astype(y.dtype))
    rows = ops.gather(y, row_idx, 0).reshape(T, k, -1)   # pair n*k+s sits at row_idx[n*k+s]
    return (rows * w[..., None].astype(rows.dtype)).sum(1)


# ----------------------------------------------------------------------------------------------- EMULATIONS
def fused_add_topk_div(x, add_num, group_num, group_topk, n, k, activate_type=0, is_norm=True, scale=2.5,
                       mapping_num=None, mapping_table=None, enable_expert_mapping=False):
    """EMULATION. x (T, E) float32 router logits, add_num (E,) the selection bias. Returns (weights (T, k) float32,
    ids (T, k) int32): groups scored by the sum of their top-n biased scores, the best group_topk kept."""
    _check(x.ndim == 2 and x.dtype == ms.float32 and add_num.shape == (x.shape[1],), "x (T, E) float32, add_num (E,)")
    E = x.shape[1]
    _check(activate_type == 0, "activate_type 0 (sigmoid) only")
    # [kernel_limits: akg-fatd] b % groupNum == 0, groupTopk <= groupNum, k <= b, b >= groupNum * n,
    # b <= groupNum * 32, and groupNum == 8 when b >= 32
    _check(group_num > 0 and E % group_num == 0 and 0 < group_topk <= group_num, f"groups {group_num}/{group_topk}")
    _check(n == 2 and 0 < k <= group_topk * (E // group_num) and E >= group_num * n, f"n {n} (top-2 sum), k {k}")
    _check(E <= group_num * lim.FATD_MAX_PER_GROUP, f"{E} experts in {group_num} groups: at most "
                                                    f"{lim.FATD_MAX_PER_GROUP} experts per group")
    _check(E < 32 or group_num == lim.FATD_GROUPS_AT_32, f"{E} experts (>= 32) need group_num "
                                                         f"{lim.FATD_GROUPS_AT_32}, got {group_num}")
    _check(not enable_expert_mapping and mapping_table is None, "expert mapping is not used")
    scores = ops.sigmoid(x)
    choice = scores + add_num
    if group_topk < group_num:
        grp = ops.topk(choice.reshape(-1, group_num, E // group_num), n)[0].sum(-1)
        kth = ops.topk(grp, group_topk)[0][:, -1:]
        keep = (grp >= kth)[:, :, None].broadcast_to((grp.shape[0], group_num, E // group_num)).reshape(-1, E)
        choice = ops.where(keep, choice, ops.full_like(choice, float("-inf")))
    idx = ops.topk(choice, k)[1]
    w = ops.gather_elements(scores, 1, idx)
    if is_norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * scale, idx.astype(ms.int32)


def moe_init_routing_v2(x, expert_idx, active_num, expert_capacity, expert_num, drop_pad_mode,
                        expert_tokens_count_or_cumsum_flag, expert_tokens_before_capacity_flag):
    """EMULATION, dropless mode. x (N, H), expert_idx (N, k) int32 in [0, expert_num). The N*k pairs, numbered
    j = n*k + s, are sorted by expert (stably). Returns expanded_x (N*k, H) with pair rows in that order,
    expanded_row_idx (N*k,) int32 = the sorted position of pair j, per-expert token counts (flag 2) or their
    cumulative sum (flag 1) as int64, and a placeholder for the before-capacity counts."""
    _check(x.ndim == 2 and expert_idx.ndim == 2 and expert_idx.shape[0] == x.shape[0], "x (N, H), expert_idx (N, k)")
    _check(expert_idx.dtype == ms.int32, f"expert_idx int32, got {expert_idx.dtype}")
    N, k = expert_idx.shape
    _check(drop_pad_mode == 0 and expert_capacity == 0, "dropless: drop_pad_mode 0, expert_capacity 0")
    _check(active_num in (0, N * k), f"active_num {active_num}: 0 or every pair (N*k = {N * k})")
    _check(expert_tokens_count_or_cumsum_flag in (1, 2), "flag 1 (cumsum) or 2 (count)")
    _check(not expert_tokens_before_capacity_flag, "no before-capacity counts in dropless mode")
    flat = expert_idx.reshape(-1)
    j = ops.arange(0, N * k, 1, dtype=ms.int32)
    order = ops.sort((flat * (N * k) + j).astype(ms.float32))[1].astype(ms.int32)   # stable by construction
    expanded_x = ops.gather(x, order // k, 0)
    row_idx = ops.zeros((N * k,), ms.int32)
    row_idx = ops.tensor_scatter_update(row_idx, order[:, None], j)          # pair order[i] sits at i
    counts = ops.one_hot(flat, expert_num, ops.ones((), ms.int32), ops.zeros((), ms.int32)).sum(0).astype(ms.int64)
    if expert_tokens_count_or_cumsum_flag == 1:
        counts = ops.cumsum(counts, 0)
    return expanded_x, row_idx, counts, ops.zeros((expert_num,), ms.int64)


def grouped_matmul_v4(x, weight, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                      pre_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                      activation_quant_offset=None, split_item=0, group_type=-1, group_list_type=0, act_type=0,
                      output_dtype=None):
    """EMULATION of the one-tensor grouping (split_item 3, group_type 0): x [(M, K)], weight [(E, K, N)],
    group_list (E,) int64 row counts (group_list_type 1) or their cumsum (0). Rows of group e use weight[e].
    Returns [(M, N)]."""
    _check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)) and len(x) == 1 and len(weight) == 1,
           "x and weight are lists of one tensor each")
    a, w = x[0], weight[0]
    _check(split_item == 3 and group_type == 0, "split_item 3 (one output), group_type 0 (grouped on M)")
    _check(a.ndim == 2 and w.ndim == 3 and a.shape[1] == w.shape[1], f"x {a.shape} and weight {w.shape}: (M, K), (E, K, N)")
    _check(a.dtype == w.dtype, f"dtypes {a.dtype} / {w.dtype}")
    _check(all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, pre_token_scale,
                                    activation_input, activation_quant_scale, activation_quant_offset)),
           "no quantisation inputs on this path")
    _check(group_list is not None and group_list.dtype == ms.int64 and group_list.shape == (w.shape[0],),
           f"group_list int64 of shape ({w.shape[0]},)")
    _check(group_list_type in (0, 1) and act_type == 0, "group_list_type 0/1, no fused activation")
    ends = group_list if group_list_type == 0 else ops.cumsum(group_list, 0)
    rows = ops.arange(0, a.shape[0], 1, dtype=ms.int64)
    group = (rows[:, None] >= ends[None, :]).astype(ms.int32).sum(-1)       # the group of each row
    group = ops.minimum(group, w.shape[0] - 1)   # rows past the last group: the kernel leaves them undefined
    return [ops.bmm(a[:, None, :], ops.gather(w, group, 0))[:, 0]]


def moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """EMULATION. permuted_tokens (N*k, H) in expert order, sorted_indices (N*k,) int32 = where pair j sits (the
    expanded_row_idx of moe_init_routing_v2), probs (N, k). Returns (N, H): sum_s probs[n, s] * row of pair n*k+s."""
    _check(not padded_mode and restore_shape is None, "padded_mode False")
    _check(sorted_indices.dtype == ms.int32 and sorted_indices.shape == (permuted_tokens.shape[0],),
           "sorted_indices int32, one per permuted row")
    _check(probs is not None and probs.ndim == 2 and probs.shape[0] * probs.shape[1] == permuted_tokens.shape[0],
           "probs (N, k) with N*k permuted rows")
    _check(probs.shape[1] <= 512, "topk <= 512")
    # [kernel_limits: ms-unp] bfloat16 only (float32 stands in for it on CPU, never float16)
    _check(permuted_tokens.dtype in (ms.bfloat16, ms.float32) and probs.dtype == permuted_tokens.dtype,
           f"permuted_tokens / probs dtype {permuted_tokens.dtype} / {probs.dtype}: bfloat16 only")
    N, k = probs.shape
    rows = ops.gather(permuted_tokens, sorted_indices, 0).reshape(N, k, -1)
    return (rows * probs[..., None].astype(rows.dtype)).sum(1)

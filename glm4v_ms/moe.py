"""GLM-4.5V's mixture-of-experts MLP: sigmoid router with a selection-only bias, routed experts, shared expert.

Router (float32 whatever the model's dtype, as the reference keeps gate.weight and e_score_correction_bias):
  scores = sigmoid(x W^T); choice = scores + bias (the bias steers which experts are picked, never their weight);
  experts are grouped into n_group groups scored by the sum of their two best choices, only the topk_group best
  groups stay eligible; the top num_experts_per_tok eligible experts are picked; their weights are the unbiased
  scores, divided by their sum when norm_topk_prob, then times routed_scaling_factor (exactly once: the
  fused Ascend router takes the factor as an argument, so nothing multiplies it again afterwards).
Experts: SwiGLU per expert, stored as gate_up (E, H, 2I) and down (E, I, H): the (E, K, N) layout of the grouped
matmul kernel. The plain (CPU) path runs every local expert on every token and weights the results with a dense
(T, E) combine matrix: exact, and simple enough to compile once, but E/k times the work of the routed tokens;
it is the reference path for tests and small models. The Ascend path (and its CPU emulation) permutes the
tokens by expert and runs the grouped matmul: see moe_kernels.py.
Parallel: each rank holds a slice of every expert (TP) or whole experts (EP) and a slice of the shared expert;
the block returns this rank's partial sum and one all-reduce adds the ranks' routed and shared parts together.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .config import TextConfig
from .layers import MLP, _param   # the shared expert is the dense MLP, column/row split
from .moe_kernels import choose, route_fused, routed_experts
from .parallel import Layout, all_reduce, to_ranks

NEG_INF = float("-inf")


def route(x, weight, bias, cfg: TextConfig):
    """(T, H) tokens -> (topk weights (T, k) float32, topk expert ids (T, k) int32)."""
    scores = ops.sigmoid(ops.dense(x.astype(ms.float32), weight))            # (T, E)
    choice = scores + bias
    E, G = cfg.n_routed_experts, cfg.n_group
    if cfg.topk_group < G:
        group = ops.topk(choice.reshape(-1, G, E // G), 2)[0].sum(-1)        # (T, G): each group's best two
        kth = ops.topk(group, cfg.topk_group)[0][:, -1:]
        keep = (group >= kth)[:, :, None].broadcast_to((group.shape[0], G, E // G)).reshape(-1, E)
        choice = ops.where(keep, choice, ops.full_like(choice, NEG_INF))
    idx = ops.topk(choice, cfg.num_experts_per_tok)[1]
    w = ops.gather_elements(scores, 1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(ms.int32)


class MoE(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype, lay: Layout = Layout()):
        super().__init__()
        self.cfg = cfg
        E, H = cfg.n_routed_experts, cfg.hidden_size
        I = cfg.moe_intermediate_size // lay.expert_tp
        ex = lay.experts(E)
        self.e0, self.n_local = ex.start, ex.stop - ex.start
        self.router_weight = _param((E, H), ms.float32)
        self.router_bias = _param((E,), ms.float32)
        self.gate_up = _param((self.n_local, H, 2 * I), dtype)
        self.down = _param((self.n_local, I, H), dtype)
        self.inter = I
        self.shared = MLP(H, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, lay, reduce=False) \
            if cfg.n_shared_experts else None
        self.reduce = all_reduce(lay)
        self.enter = to_ranks(lay)   # the router runs whole on every rank, its scores feed this rank's experts only
        plain = choose(cfg, dtype)   # fused Ascend kernels where the documented limits allow (moe_kernels.py)
        self.fused_router, self.fused_experts = "router" not in plain, "experts" not in plain
        self.fused_unpermute = "unpermute" not in plain

    def construct(self, x):
        B, L, H = x.shape
        if self.enter is not None:
            x = self.enter(x)
        t = x.reshape(B * L, H)
        if self.fused_router:   # the fused kernels (moe_kernels.py), real on Ascend, emulated in CPU tests
            w, idx = route_fused(t, self.router_weight, self.router_bias, self.cfg)
        else:
            w, idx = route(t, self.router_weight, self.router_bias, self.cfg)
        if self.fused_experts:
            y = routed_experts(t, w, idx, self.gate_up, self.down, self.e0, self.n_local, self.cfg.n_routed_experts,
                               self.fused_unpermute)
        else:
            y = self._routed_plain(t, w, idx)
        y = y.reshape(B, L, H)
        if self.shared is not None:
            y = y + self.shared(x)
        return y if self.reduce is None else self.reduce(y)

    def _routed_plain(self, t, w, idx):
        E = self.cfg.n_routed_experts
        comb = (ops.one_hot(idx, E, ops.ones((), ms.float32), ops.zeros((), ms.float32)) * w[..., None]).sum(1)
        comb = comb[:, self.e0:self.e0 + self.n_local].astype(t.dtype)      # (T, E_local)
        xe = ops.broadcast_to(t[None], (self.n_local,) + t.shape)           # (E_local, T, H)
        gu = ops.bmm(xe, self.gate_up)
        g, u = ops.split(gu, self.inter, -1)
        y = ops.bmm(ops.silu(g) * u, self.down)                             # (E_local, T, H)
        return (y * comb.T[:, :, None]).sum(0)

"""GLM-4.5V's MoE on the Ascend code path, through EMULATIONS of the fused MoE kernels (glm4v_ms/moe_kernels.py):
FusedAddTopKDiv, MoeInitRoutingV2, GroupedMatmulV4, MoeTokenUnpermute.

What this proves: the arguments our Ascend MoE path passes satisfy the kernels' documented contracts, the routing
scale is applied once, expert parallelism's masking is exact, and the documented maths gives the reference's
logits. What only hardware can confirm: the real kernels' index conventions, rounding and speed.
"""
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from glm4v_ms import attention, kernel_limits as lim, moe_kernels as mk
from glm4v_ms.config import TextConfig
from glm4v_ms.moe import MoE, route

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(0)
CFG = TextConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, moe_intermediate_size=6)
# GLM-4.5V's router (../shared/GLM45V.md §1.2): 128 experts in 1 group, top-8; tiny widths
GLM45V = TextConfig(hidden_size=16, n_routed_experts=128, num_experts_per_tok=8, n_group=1, topk_group=1,
                    routed_scaling_factor=1.0, moe_intermediate_size=4, n_shared_experts=1)


def t(*shape, scale=1.0):
    return Tensor((scale * rng.standard_normal(shape)).astype(np.float32))


def plain_experts(x, w, idx, gate_up, down):
    """numpy: sum_s w[n, s] * SwiGLU_{idx[n, s]}(x[n])."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for s in range(idx.shape[1]):
            gu = x[n] @ gate_up[idx[n, s]]
            g, u = np.split(gu, 2)
            out[n] += w[n, s] * ((g / (1 + np.exp(-g)) * u) @ down[idx[n, s]])
    return out


def test_fused_router_equals_plain_router():
    x, W, b = t(30, 16), t(8, 16, scale=0.5), t(8, scale=0.2)
    w0, i0 = route(x, W, b, CFG)
    w1, i1 = mk.route_fused(x, W, b, CFG)   # emulated: the mode is "plain" here, so the emulations are called
    np.testing.assert_array_equal(i1.asnumpy(), i0.asnumpy())
    np.testing.assert_allclose(w1.asnumpy(), w0.asnumpy(), rtol=1e-6)
    np.testing.assert_allclose(w1.asnumpy().sum(1), 2.5, rtol=1e-5)   # scaled once, by the config's factor


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("fused_unpermute", [True, False])
def test_routed_experts_and_expert_parallel_masking(parts, fused_unpermute):
    """The permute -> grouped matmul -> unpermute chain (the fused unpermute, or its plain gather + sum where the
    kernel's dtype rule excludes the model's) equals the per-token sum; split over `parts` ranks of whole
    experts (foreign choices masked to local expert 0 with weight 0), the partial sums add up to it."""
    E, H, I, N, k = 8, 16, 6, 11, 3
    x, gate_up, down = t(N, H), t(E, H, 2 * I, scale=0.3), t(E, I, H, scale=0.3)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32)
    w = rng.random((N, k)).astype(np.float32)
    want = plain_experts(x.asnumpy(), w, idx, gate_up.asnumpy(), down.asnumpy())
    n = E // parts
    got = sum(mk.routed_experts(x, Tensor(w), Tensor(idx), gate_up[r * n:(r + 1) * n], down[r * n:(r + 1) * n],
                                r * n, n, E, fused_unpermute).asnumpy() for r in range(parts))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_init_routing_layout():
    """Pairs sorted by expert, stably; expanded_row_idx[j] = where pair j went; counts per expert."""
    x = Tensor(np.arange(3 * 2, dtype=np.float32).reshape(3, 2))
    idx = Tensor(np.array([[2, 0], [0, 1], [2, 1]], np.int32))
    xs, row, counts, _ = mk.moe_init_routing_v2(x, idx, 6, 0, 3, 0, 2, False)
    # pairs j: (0,e2) (0,e0) (1,e0) (1,e1) (2,e2) (2,e1) -> order by expert: j=1,2 | 3,5 | 0,4
    np.testing.assert_array_equal(xs.asnumpy()[:, 0], [0, 2, 2, 4, 0, 4])
    np.testing.assert_array_equal(row.asnumpy(), [4, 0, 1, 2, 5, 3])
    np.testing.assert_array_equal(counts.asnumpy(), [2, 2, 2])


CALLS = {
    "router_scale_type": lambda: mk.fused_add_topk_div(t(4, 8), t(8), 4, 2, 2, 3, activate_type=1),
    "router_groups": lambda: mk.fused_add_topk_div(t(4, 8), t(8), 3, 2, 2, 3),
    "routing_dropping": lambda: mk.moe_init_routing_v2(t(4, 8), Tensor(np.zeros((4, 2), np.int32)), 8, 4, 8, 1, 2, False),
    "routing_int64_ids": lambda: mk.moe_init_routing_v2(t(4, 8), Tensor(np.zeros((4, 2), np.int64)), 8, 0, 8, 0, 2, False),
    "gmm_group_list": lambda: mk.grouped_matmul_v4([t(5, 4)], [t(3, 4, 2)], group_list=Tensor(np.array([5, 0], np.int64)),
                                                   split_item=3, group_type=0, group_list_type=1),
    "gmm_k_mismatch": lambda: mk.grouped_matmul_v4([t(5, 4)], [t(2, 3, 2)], group_list=Tensor(np.array([5, 0], np.int64)),
                                                   split_item=3, group_type=0, group_list_type=1),
    "unpermute_probs": lambda: mk.moe_token_unpermute(t(6, 4), Tensor(np.arange(6, dtype=np.int32)), t(4, 2)),
    "unpermute_float16": lambda: mk.moe_token_unpermute(t(6, 4).astype(ms.float16),
                                                        Tensor(np.arange(6, dtype=np.int32)), t(3, 2).astype(ms.float16)),
    # GLM-4.5V's router forced onto the fused kernel: 128 experts in one group (at most 32 per group, 8 groups
    # from 32 experts on)
    "router_glm45v": lambda: mk.fused_add_topk_div(t(4, 128), t(128), 1, 1, 2, 8, 0, True, 1.0),
    "router_64_in_4_groups": lambda: mk.fused_add_topk_div(t(4, 64), t(64), 4, 4, 2, 8),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_contract_violations_are_caught(call):
    with pytest.raises(ValueError, match="Ascend kernel contract"):
        CALLS[call]()


def test_glm45v_router_takes_the_plain_path(monkeypatch):
    """Built in emulated mode with internal kernels on (the fused router's only kernel), GLM-4.5V's router
    configuration is past FusedAddTopKDiv's limits: the MoE block routes with the plain sigmoid + top-k (and
    still runs the fused permute / grouped matmul / unpermute), and its output is the plain mode's."""
    monkeypatch.setenv("MS_ENABLE_INTERNAL_KERNELS", "on")
    x = t(1, 5, 16)
    blocks = []
    for mode in ("plain", "emulated"):
        attention.set_mode(mode)
        try:
            blocks.append(MoE(GLM45V, ms.float32))
        finally:
            attention.set_mode("plain")
    plain, emu = blocks
    assert (emu.fused_router, emu.fused_experts, emu.fused_unpermute) == (False, True, True)
    assert "128 experts per group > 32" in mk_reasons(GLM45V, ms.float32)["router"]
    for p, q in zip(plain.get_parameters(), emu.get_parameters()):
        q.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
        p.set_data(q.value())
    attention.set_mode("emulated")
    try:
        got = emu(x).asnumpy()
    finally:
        attention.set_mode("plain")
    np.testing.assert_allclose(got, plain(x).asnumpy(), rtol=1e-5, atol=1e-5)


def mk_reasons(cfg, dtype):
    attention.set_mode("emulated")
    try:
        return mk.choose(cfg, dtype)
    finally:
        attention.set_mode("plain")


def test_router_and_unpermute_choices(monkeypatch):
    """The tiny grouped router fits FusedAddTopKDiv but needs its internal kernel; float16 experts run the
    plain unpermute (bfloat16 only), and so does any chip but an Atlas A2."""
    monkeypatch.delenv("MS_ENABLE_INTERNAL_KERNELS", raising=False)
    assert "infer_boost" in mk_reasons(CFG, ms.float32)["router"]
    monkeypatch.setenv("MS_ENABLE_INTERNAL_KERNELS", "on")
    assert mk_reasons(CFG, ms.float32) == {}
    assert set(mk_reasons(CFG, ms.float16)) == {"unpermute"}
    assert "documented: BFloat16)" in mk_reasons(CFG, ms.float16)["unpermute"]
    assert lim.moe_token_unpermute(ms.bfloat16, 8, lim.A2, False) is None
    assert "Atlas A2 only" in lim.moe_token_unpermute(ms.bfloat16, 8, lim.A3, False)
    assert "> 512" in lim.moe_token_unpermute(ms.bfloat16, 513, lim.A2, False)
    assert "8 groups" in lim.fused_add_topk_div(64, 4, 4, 8, lim.A2, True)
    assert lim.fused_add_topk_div(256, 8, 4, 8, lim.A2, True) is None       # DeepSeek-V3's shape fits
    assert lim.grouped_matmul(ms.float64, False) and lim.moe_init_routing(ms.float64, False)


def test_moe_model_parity_through_the_emulated_path():
    """GLM-4.5V (grouped routing, scaling 2.5) in emulated mode, in its own process (the mode is fixed per
    process), against transformers: forward logits on an image prompt and a padded batch, greedy generation.
    With internal kernels on (MS_ENABLE_INTERNAL_KERNELS=on), so the fused router runs and the vision tower
    takes the internal kernel's TH rule (per-segment lengths)."""
    script = r"""
import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import conftest, tempfile, tinyref, tinymoe
from glm4v_ms import AutoModelForImageTextToText, attention
d = tempfile.mkdtemp()
ref = tinymoe.build(d, seed=31, routing="grouped")
m = AutoModelForImageTextToText.from_pretrained(d)
assert attention.mode() == "emulated", attention.mode()
assert attention._VARLEN_LAYOUT == "TH"
assert [getattr(c, "fused_router", None) for _, c in m.cells_and_names() if hasattr(c, "fused_router")] == [True] * 2
err = tinyref.check_batch_and_greedy(ref, m, 10)
print("EMULATED-OK", err)
"""
    env = dict(os.environ, GLM4V_MS_KERNELS="emulated", GLM4V_MS_DEVICE="cpu", MS_ENABLE_INTERNAL_KERNELS="on")
    p = subprocess.run([sys.executable, "-c", script, ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "EMULATED-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]

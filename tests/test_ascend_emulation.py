"""The Ascend code path on CPU, through EMULATIONS of the fused kernels (glm4v_ms/ascend_emulation.py).

What this proves: the arguments our Ascend path passes (layouts, head counts, masks and their meaning, sequence
lengths) satisfy the kernels' documented contracts, and the documented maths gives the reference's logits.
What only hardware can confirm: that the real kernels behave as documented, their rounding, and their speed.
"""
import os
import subprocess
import sys

from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from glm4v_ms import ascend_emulation as emu
from glm4v_ms import attention
from glm4v_ms import kernel_limits as lim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(0)


def t(*shape):
    return Tensor(rng.standard_normal(shape).astype(np.float32))


def test_emulated_decoder_attention_equals_plain():
    B, L, H, Hkv, S, D = 2, 3, 4, 2, 16, 32
    q, k, v = t(B, L, H, D), t(B, Hkv, S, D), t(B, Hkv, S, D)
    seen = rng.random((B, L, S)) > 0.3
    seen[:, :, 0] = True
    outs = []
    for mode in ("plain", "emulated"):
        attention.set_mode(mode)
        try:
            kv_len = Tensor(np.full((B,), S - 3, np.int64))   # the last 3 slots unwritten, so unseen as well
            seen_written = seen.copy()
            seen_written[:, :, S - 3:] = False
            outs.append(attention.decoder_attention(q, k, v, Tensor(seen_written), kv_len, D ** -0.5).asnumpy())
        finally:
            attention.set_mode("plain")
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


@pytest.mark.parametrize("layout", ["TND", "TH"])
def test_emulated_vision_attention_equals_plain(layout, monkeypatch):
    """Three segments (several images / a video's temporal patches) through either varlen rule: TND with
    cumulative ends (the aclnn kernel, our default) and TH with lengths (the internal kernel, infer_boost)."""
    q, k, v = t(40, 2, 32), t(40, 2, 32), t(40, 2, 32)
    outs = []
    for mode in ("plain", "emulated"):
        attention.set_mode(mode)
        monkeypatch.setattr(attention, "_VARLEN_LAYOUT", layout)
        try:
            outs.append(attention.vision_attention(q, k, v, [16, 4, 20], 32 ** -0.5).asnumpy())
        finally:
            attention.set_mode("plain")
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_old_cumulative_th_call_is_rejected():
    """The call this port made before: TH with cumulative ends. With one segment the end is the length, so it
    passed; with several the internal kernel reads ends as lengths and runs past the last row."""
    q = t(40, 64)
    with pytest.raises(ValueError, match="TH: actual_seq_qlen must be per-segment lengths"):
        emu.flash_attention_score(q, q, q, 2, input_layout="TH", actual_seq_qlen=[16, 20, 40],
                                  actual_seq_kvlen=[16, 20, 40])
    emu.flash_attention_score(q, q, q, 2, input_layout="TH", actual_seq_qlen=[40], actual_seq_kvlen=[40])


def test_varlen_layout_follows_the_selected_kernel(monkeypatch):
    """TND (cumulative ends) by default; TH (lengths) when MindSpore would pick its internal kernel."""
    cfg = SimpleNamespace(text=SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                               rotary_dim=16),
                          vision=SimpleNamespace(num_heads=2, head_dim=32))
    attention.set_mode("emulated")
    try:
        monkeypatch.delenv("MS_ENABLE_INTERNAL_KERNELS", raising=False)
        assert attention.choose_kernels(cfg, ms.float32) == {} and attention._VARLEN_LAYOUT == "TND"
        monkeypatch.setenv("MS_ENABLE_INTERNAL_KERNELS", "on")
        attention.choose_kernels(cfg, ms.float32)
        assert attention._VARLEN_LAYOUT == "TH"
        monkeypatch.setenv("MS_DISABLE_INTERNAL_KERNELS_LIST", "FlashAttentionScore")
        attention.choose_kernels(cfg, ms.float32)
        assert attention._VARLEN_LAYOUT == "TND"
    finally:
        attention.set_mode("plain")
        attention._VARLEN_LAYOUT = "TND"


def test_a_config_past_a_limit_runs_the_plain_path(monkeypatch):
    """Vision head size 40 (not a multiple of 16) and text heads 300 (> 256): those kernels run plain; the
    emulation is never called, and the result is the plain one."""
    cfg = SimpleNamespace(text=SimpleNamespace(num_attention_heads=300, num_key_value_heads=300, head_dim=32,
                                               rotary_dim=16),
                          vision=SimpleNamespace(num_heads=2, head_dim=40))
    q, k, v = t(20, 2, 40), t(20, 2, 40), t(20, 2, 40)
    want = attention.vision_attention(q, k, v, [12, 8], 40 ** -0.5).asnumpy()
    attention.set_mode("emulated")
    try:
        why = attention.choose_kernels(cfg, ms.float32)
        assert set(why) == {"vision_attention", "decoder_attention"}, why
        assert "head size 40" in why["vision_attention"] and "300 heads" in why["decoder_attention"]
        assert attention.fused("rms_norm") and not attention.fused("vision_attention")
        monkeypatch.setattr(emu, "flash_attention_score", None)   # would fail if called
        got = attention.vision_attention(q, k, v, [12, 8], 40 ** -0.5).asnumpy()
    finally:
        attention.set_mode("plain")
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_real_configs_fit_every_attention_kernel():
    """GLM-4.1V (32/2 heads) and GLM-4.5V (96/8) at 128 wide, vision 12 x 128, bfloat16 on an Atlas A2: fused."""
    for heads, kv in ((32, 2), (96, 8)):
        for world in (1, 2, 8):
            h, g = heads // world, max(1, kv // world)
            assert lim.fused_infer_attention(h, g, 128, ms.bfloat16, lim.A2, False) is None
            assert lim.rotary_position_embedding(h, 64, ms.bfloat16, lim.A2, False) is None
    assert lim.flash_attention_varlen(12, 12, 128, ms.bfloat16, lim.A2, False) is None
    assert lim.rms_norm(ms.bfloat16, lim.A2, False) is None


# one configuration past each documented limit (kernel_limits.py names the source of each)
PAST_LIMITS = {
    "varlen_fp32_on_npu": lambda: lim.flash_attention_varlen(12, 12, 128, ms.float32, lim.A2, False),
    "varlen_head_size_24": lambda: lim.flash_attention_varlen(12, 12, 24, ms.bfloat16, lim.A2, False),
    "varlen_head_size_528": lambda: lim.flash_attention_varlen(12, 12, 528, ms.bfloat16, lim.A2, False),
    "varlen_272_heads": lambda: lim.flash_attention_varlen(272, 272, 128, ms.bfloat16, lim.A2, False),
    "varlen_on_a3": lambda: lim.flash_attention_varlen(12, 12, 128, ms.bfloat16, lim.A3, False),
    "varlen_1025_segments": lambda: lim.varlen_segments([4] * 1025),
    "varlen_over_1M_tokens": lambda: lim.varlen_segments([1 << 20, 1]),
    "fia_fp32_on_npu": lambda: lim.fused_infer_attention(32, 2, 128, ms.float32, lim.A2, False),
    "fia_head_size_24": lambda: lim.fused_infer_attention(32, 2, 24, ms.bfloat16, lim.A2, False),
    "fia_head_size_528": lambda: lim.fused_infer_attention(32, 2, 528, ms.bfloat16, lim.A2, False),
    "fia_272_heads": lambda: lim.fused_infer_attention(272, 272, 128, ms.bfloat16, lim.A2, False),
    "fia_gqa_ratio_96": lambda: lim.fused_infer_attention(96, 1, 128, ms.bfloat16, lim.A2, False),
    "fia_kv_not_dividing": lambda: lim.fused_infer_attention(32, 3, 128, ms.bfloat16, lim.A2, False),
    "rope_head_size_896": lambda: lim.rotary_position_embedding(32, 896, ms.bfloat16, lim.A2, False),
    "rope_odd_head_size": lambda: lim.rotary_position_embedding(32, 63, ms.bfloat16, lim.A2, False),
    "rope_1000_heads": lambda: lim.rotary_position_embedding(1000, 64, ms.bfloat16, lim.A2, False),
    "rope_on_atlas_inference": lambda: lim.rotary_position_embedding(32, 64, ms.float16, "ascend310p", False),
    "rms_norm_float64": lambda: lim.rms_norm(ms.float64, lim.A2, False),
    "wqbmm_fp32_on_npu": lambda: lim.weight_quant_batch_matmul(4096, 4096, 128, ms.float32, False),
    "wqbmm_k_65536": lambda: lim.weight_quant_batch_matmul(65536, 4096, 128, ms.bfloat16, False),
    "wqbmm_group_48": lambda: lim.weight_quant_batch_matmul(4096, 4096, 48, ms.bfloat16, False),
}


@pytest.mark.parametrize("case", list(PAST_LIMITS))
def test_each_documented_limit_is_enforced(case):
    assert isinstance(PAST_LIMITS[case](), str)


def test_emulated_norm_and_rotary_equal_plain():
    x, w, cos, sin = t(2, 5, 3, 16), t(16), t(2, 5, 1, 16), t(2, 5, 1, 16)
    outs = []
    for mode in ("plain", "emulated"):
        attention.set_mode(mode)
        try:
            outs.append((attention.rms_norm(x, w, 1e-5).asnumpy(), attention.rope(x, cos, sin).asnumpy()))
        finally:
            attention.set_mode("plain")
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize("call", [
    lambda: emu.fused_infer_attention_score(t(1, 4, 1, 32), t(1, 2, 8, 32), t(1, 2, 8, 32), num_heads=2,
                                            num_key_value_heads=2, input_layout="BNSD"),          # wrong num_heads
    lambda: emu.fused_infer_attention_score(t(1, 4, 1, 32), t(1, 2, 8, 32), t(1, 2, 8, 32), num_heads=4,
                                            num_key_value_heads=2, input_layout="BSH"),           # wrong layout
    lambda: emu.fused_infer_attention_score(t(1, 4, 1, 32), t(1, 2, 8, 32), t(1, 2, 8, 32), num_heads=4,
                                            num_key_value_heads=2, input_layout="BNSD", inner_precise=2),  # Q_S=1
    lambda: emu.fused_infer_attention_score(t(1, 4, 3, 32), t(1, 2, 8, 32), t(1, 2, 8, 32), num_heads=4,
                                            num_key_value_heads=2, input_layout="BNSD",
                                            atten_mask=Tensor(np.zeros((1, 1, 8, 3), bool))),     # mask transposed
    lambda: emu.fused_infer_attention_score(t(1, 4, 3, 32), t(1, 2, 8, 32), t(1, 2, 8, 32), num_heads=4,
                                            num_key_value_heads=2, input_layout="BNSD",
                                            atten_mask=Tensor(np.zeros((1, 1, 3, 8), np.float32))),  # float mask
    lambda: emu.flash_attention_score(t(10, 2, 32), t(10, 2, 32), t(10, 2, 32), 2, actual_seq_qlen=[4, 6],
                                      actual_seq_kvlen=[4, 6]),                                    # TND: lengths
    lambda: emu.flash_attention_score(t(10, 2, 32), t(10, 2, 32), t(10, 2, 32), 2, actual_seq_qlen=[4, 8],
                                      actual_seq_kvlen=[4, 8]),                                    # ends before T
    lambda: emu.flash_attention_score(t(10, 2, 24), t(10, 2, 24), t(10, 2, 24), 2, actual_seq_qlen=[10],
                                      actual_seq_kvlen=[10]),                                      # D=24
    lambda: emu.flash_attention_score(t(10, 64), t(10, 64), t(10, 64), 2, actual_seq_qlen=[10],
                                      actual_seq_kvlen=[10]),                                      # TH shapes as TND
    lambda: emu.flash_attention_score(t(10, 2, 32), t(10, 2, 32), t(10, 2, 32), 2, input_layout="TH",
                                      actual_seq_qlen=[10], actual_seq_kvlen=[10]),                # TND shapes as TH
    lambda: emu.flash_attention_score(t(10, 2, 32), t(10, 2, 32), t(10, 2, 32), 2, input_layout="BSH",
                                      actual_seq_qlen=[10], actual_seq_kvlen=[10]),                # not varlen
    lambda: emu.flash_attention_score(t(1025, 1, 16), t(1025, 1, 16), t(1025, 1, 16), 1,
                                      actual_seq_qlen=list(range(1, 1026)),
                                      actual_seq_kvlen=list(range(1, 1026))),                      # 1025 segments
    lambda: emu.fused_infer_attention_score(t(1, 4, 3, 24), t(1, 2, 8, 24), t(1, 2, 8, 24), num_heads=4,
                                            num_key_value_heads=2, input_layout="BNSD"),          # D not 16-aligned
    lambda: emu.rotary_position_embedding(t(1, 2, 1000, 4), t(1, 2, 1, 4), t(1, 2, 1, 4), 0),    # N = 1000
    lambda: emu.fused_infer_attention_score(t(2, 4, 1, 32), t(2, 2, 8, 32), t(2, 2, 8, 32), num_heads=4,
                                            num_key_value_heads=2, input_layout="BNSD",
                                            actual_seq_lengths_kv=Tensor(np.array([8, 8], np.int32))),  # not int64
    lambda: emu.rotary_position_embedding(t(2, 5, 3, 16), t(2, 5, 1, 8), t(2, 5, 1, 8), 0),     # cos width
    lambda: emu.rms_norm(t(2, 8), t(4), 1e-5),                                                   # gamma shape
])
def test_contract_violations_are_caught(call):
    with pytest.raises(ValueError, match="Ascend kernel contract"):
        call()


def test_model_parity_through_the_emulated_path():
    """The whole model (vision TND attention over several images and a video's frames, decoder prompt +
    incremental branches) in emulated mode, in its own
    process (the mode is fixed per process), against transformers: forward logits and greedy generation."""
    script = r"""
import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import conftest, numpy as np, tempfile, tinyref
from glm4v_ms import Glm4vForConditionalGeneration, attention
d = tempfile.mkdtemp()
ref = tinyref.build(d, seed=21)
m = Glm4vForConditionalGeneration.from_pretrained(d)
assert attention.mode() == "emulated", attention.mode()
assert m.plain_kernels == {} and attention._VARLEN_LAYOUT == "TND", (m.plain_kernels, attention._VARLEN_LAYOUT)
err = tinyref.check_batch_and_greedy(ref, m, 12)
vid = tinyref.Prompt(3).text(2).video(2, 8, 4).text(3).inputs()
rv, ov = tinyref.reference_logits(ref, vid), m(**vid).logits.asnumpy()
assert np.abs(ov - rv).max() / np.abs(rv).max() < 1e-4
print("EMULATED-OK", err)
"""
    env = dict(os.environ, GLM4V_MS_KERNELS="emulated", GLM4V_MS_DEVICE="cpu")
    p = subprocess.run([sys.executable, "-c", script, ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "EMULATED-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]

"""The Ascend code path on CPU, through EMULATIONS of the fused kernels (glm4v_ms/ascend_emulation.py).

What this proves: the arguments our Ascend path passes (layouts, head counts, masks and their meaning, sequence
lengths) satisfy the kernels' documented contracts, and the documented maths gives the reference's logits.
What only hardware can confirm: that the real kernels behave as documented, their rounding, and their speed.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

from glm4v_ms import ascend_emulation as emu
from glm4v_ms import attention

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


def test_emulated_vision_attention_equals_plain():
    q, k, v = t(40, 2, 32), t(40, 2, 32), t(40, 2, 32)
    outs = []
    for mode in ("plain", "emulated"):
        attention.set_mode(mode)
        try:
            outs.append(attention.vision_attention(q, k, v, [16, 4, 20], 32 ** -0.5).asnumpy())
        finally:
            attention.set_mode("plain")
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


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
    lambda: emu.flash_attention_score_th(t(10, 64), t(10, 64), t(10, 64), 2, actual_seq_qlen=[4, 6],
                                         actual_seq_kvlen=[4, 6]),                                 # lengths, not cumulative
    lambda: emu.flash_attention_score_th(t(10, 64), t(10, 64), t(10, 64), 2, actual_seq_qlen=[4, 8],
                                         actual_seq_kvlen=[4, 8]),                                 # does not end at T
    lambda: emu.flash_attention_score_th(t(10, 48), t(10, 48), t(10, 48), 2, actual_seq_qlen=[10],
                                         actual_seq_kvlen=[10]),                                   # D=24, not a multiple of 16
    lambda: emu.flash_attention_score_th(t(10, 2, 32), t(10, 2, 32), t(10, 2, 32), 2, actual_seq_qlen=[10],
                                         actual_seq_kvlen=[10]),                                   # TND shapes given as TH
    lambda: emu.flash_attention_score_th(t(10, 64), t(10, 64), t(10, 64), 2, input_layout="TND",
                                         actual_seq_qlen=[10], actual_seq_kvlen=[10]),             # layout
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
    """The whole model (vision TND attention, decoder prompt + incremental branches) in emulated mode, in its own
    process (the mode is fixed per process), against transformers: forward logits and greedy generation."""
    script = r"""
import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import conftest, numpy as np, tempfile, tinyref
from glm4v_ms import Glm4vForConditionalGeneration, attention
d = tempfile.mkdtemp()
ref = tinyref.build(d, seed=21)
m = Glm4vForConditionalGeneration.from_pretrained(d)
assert attention.mode() == "emulated", attention.mode()
err = tinyref.check_batch_and_greedy(ref, m, 12)
vid = tinyref.Prompt(3).text(2).video(2, 8, 4).text(3).inputs()
rv, ov = tinyref.reference_logits(ref, vid), m(**vid).logits.asnumpy()
assert np.abs(ov - rv).max() / np.abs(rv).max() < 1e-4
print("EMULATED-OK", err)
"""
    env = dict(os.environ, GLM4V_MS_KERNELS="emulated", GLM4V_MS_DEVICE="cpu")
    p = subprocess.run([sys.executable, "-c", script, ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "EMULATED-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]

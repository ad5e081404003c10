"""GPTQ checkpoints (glm4v_ms/quant.py) against transformers' float model holding the same weights dequantized by
the documented formula (tests/gptq_fixtures.py packs the checkpoints in the exact on-disk format with numpy).

Variants: 4 and 8 bits mixed through `dynamic` (`+:` and bare keys), a module kept float with `-:`, act-order
(desc_act, g_idx a permutation) and plain order, symmetric and asymmetric zero points, the v1 and v2 formats,
group sizes 32/64 and -1; transformers' fused MLP layout and GPTQModel's split one (gate_proj / up_proj, their
`dynamic` rules naming the halves: differing bits, agreeing ones, one half float). Criterion: logits rel <= 1e-4 with identical argmax (fp32, CPU), greedy tokens equal.
"""
import numpy as np
import pytest
import torch

import gptq_fixtures
import tinyref
from glm4v_ms import Glm4vForConditionalGeneration

TOL = 1e-4
L1 = r".*\.layers\.1\."
VARIANTS = {
    # 4-bit act-order base, layer 1's MLP in 8 bits, layer 0's o_proj float: the Int4/Int8-mix shape
    "mix_v1_sym_act_order": dict(bits=4, group_size=32, desc_act=True, sym=True, checkpoint_format="gptq",
                                 dynamic={"+:" + L1 + r"mlp\..*": {"bits": 8},
                                          r"-:.*\.layers\.0\.self_attn\.o_proj": {}}),
    # 8-bit asymmetric v2, plain order; the attention in 4 bits with one group per column
    "v2_asym_plain": dict(bits=8, group_size=64, desc_act=False, sym=False, checkpoint_format="gptq_v2",
                          dynamic={r".*self_attn\.[qkvo]_proj": {"bits": 4, "group_size": -1}}),
    # asymmetric v1 act-order; layer 1's k_proj in 8 bits: its q/k/v cannot share one quantized matmul
    "v1_asym_split_qkv": dict(bits=4, group_size=64, desc_act=True, sym=False, checkpoint_format="gptq",
                              dynamic={L1 + r"self_attn\.k_proj": {"bits": 8, "group_size": 32}}),
    # GPTQModel's layout (the MLP split into gate_proj/up_proj, rules naming the halves): act-order 4-bit, layer 1's
    # up_proj in 8 bits, so its gate and up run as two matmuls; layer 0's halves agree and fuse
    "gm_gate_up_differ": dict(bits=4, group_size=32, desc_act=True, sym=True, checkpoint_format="gptq",
                              dynamic={"+:" + L1 + r"mlp\.up_proj": {"bits": 8},
                                       r"-:.*\.layers\.0\.self_attn\.o_proj": {}}),
    # GPTQModel's layout, 8-bit asymmetric v2: layer 1's halves both 4-bit group 32 (one matmul); layer 0's up_proj
    # kept float while its gate_proj is quantized
    "gm_agree_v2_asym": dict(bits=8, group_size=64, desc_act=False, sym=False, checkpoint_format="gptq_v2",
                             dynamic={"+:" + L1 + r"mlp\.(gate|up)_proj": {"bits": 4, "group_size": 32},
                                      r"-:.*\.layers\.0\.mlp\.up_proj": {}}),
}


SHARED_QKV_ORDER = {"mix_v1_sym_act_order"}   # q/k/v share their act-order permutation, as GPTQ makes them
GPTQMODEL_LAYOUT = {"gm_gate_up_differ", "gm_agree_v2_asym"}


def build(name, folder, seed=3):
    return gptq_fixtures.build(folder, VARIANTS[name], seed=seed, share_qkv_order=name in SHARED_QKV_ORDER,
                               layout="gptqmodel" if name in GPTQMODEL_LAYOUT else "fused")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref, folder = build(request.param, str(d / "gptq"))
    return request.param, ref, folder


def check(ref, ours, inputs):
    return tinyref.check_logits(ref, ours, inputs, TOL)


def test_logits_and_greedy_equal_the_dequantized_float_model(variant):
    name, ref, folder = variant
    ours = Glm4vForConditionalGeneration.from_pretrained(folder)
    inputs = tinyref.Prompt(11).text(4).image(6, 8).text(9).inputs()
    check(ref, ours, inputs)
    n = 10
    got = ours.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.no_grad():
        want = ref.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False).numpy()
    assert np.array_equal(got, want)


def test_gptqmodel_fixtures_are_in_its_layout(variant):
    """What GPTQModel writes for glm4v: no fused gate_up_proj, both halves, its quantization_config twice."""
    import json
    import os
    from safetensors import safe_open
    name, ref, folder = variant
    if name not in GPTQMODEL_LAYOUT:
        return
    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        keys = set(f.keys())
    L = "model.language_model.layers."
    assert not any("gate_up_proj" in k for k in keys)
    assert {L + "1.mlp.gate_proj.qweight", L + "1.mlp.up_proj.qweight", L + "0.mlp.gate_proj.g_idx"} <= keys
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    assert qc == json.load(open(os.path.join(folder, "quantize_config.json")))
    assert qc["dynamic"] == VARIANTS[name]["dynamic"] and qc["meta"]["quantizer"][0].startswith("gptqmodel:")


def test_dequantized_weights_differ_from_the_float_ones(variant):
    """The fixture really quantizes (a parity that holds with the float weights would prove nothing)."""
    name, ref, folder = variant
    float_ref = tinyref.build(folder + "-float-again", seed=3)
    a = ref.state_dict()["model.language_model.layers.1.mlp.down_proj.weight"]
    b = float_ref.state_dict()["model.language_model.layers.1.mlp.down_proj.weight"]
    assert 0 < (a - b).abs().max() < 0.2 * b.abs().max()

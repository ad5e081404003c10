"""The converter on quantized checkpoints (glm4v_ms/convert.py + quant.py), as a user runs it (its CLI entry):
- a GPTQ folder repacked into the kernel layout loads with no repacking, logits bit-identical to the GPTQ folder;
- --dtype dequantizes into a plain float checkpoint (float32: bit-identical; bfloat16: its rounding);
- a folder in GPTQModel's layout (split MLP) repacks alike;
- --quantize int4|int8 writes the GPTQ on-disk format in GPTQModel's layout, which loads back in glm4v_ms and, dequantized by the
  documented formula, in transformers' float model, with equal logits."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import gptq_fixtures
import test_gptq
import tinyref
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.convert.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = tinyref.Prompt(12).text(5).image(4, 8).text(6).inputs()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq_convert")
    ref, folder = gptq_fixtures.build(str(d / "gptq"), test_gptq.VARIANTS["v1_asym_split_qkv"], seed=4)
    return ref, folder, d


def logits(folder):
    return Glm4vForConditionalGeneration.from_pretrained(str(folder))(**PROMPT).logits.asnumpy()


def dtypes(folder):
    out = {}
    for fn in os.listdir(folder):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "np") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def test_repack_loads_bit_identical(split):
    ref, folder, d = split
    assert main(["--src", folder, "--dst", str(d / "rep"), "--verify"]) == 0
    t = dtypes(d / "rep")
    assert t["text.layers.0.mlp.gate_up.qweight"] == "I8" and t["text.layers.0.mlp.gate_up.scales"] == "F16"
    assert t["text.layers.0.mlp.gate_up.perm"] == "I32"                   # act-order
    assert "text.layers.1.attn.qkv.parts.1.qweight" in t        # layer 1's 8-bit k_proj: its own matmul
    assert not any(k.endswith((".qzeros", ".g_idx")) for k in t)
    mods = json.load(open(d / "rep" / "config.json"))["quantization_config"]["modules"]
    assert [p["bits"] for p in mods["text.layers.1.attn.qkv"]] == [4, 8, 4]
    assert np.array_equal(logits(d / "rep"), logits(folder))
    test_gptq.check(ref, Glm4vForConditionalGeneration.from_pretrained(str(d / "rep")), PROMPT)


def test_repack_gptqmodel_layout(tmp_path):
    """GPTQModel's split MLP: layer 1's 4-bit gate and 8-bit up stored as two parts, layer 0's agreeing halves as one
    fused act-order matmul; logits bit-identical to the GPTQ folder and at the float reference's."""
    ref, folder = test_gptq.build("gm_gate_up_differ", str(tmp_path / "gptq"), seed=4)
    assert main(["--src", folder, "--dst", str(tmp_path / "rep"), "--verify"]) == 0
    t = dtypes(tmp_path / "rep")
    assert "text.layers.1.mlp.gate_up.parts.1.qweight" in t and "text.layers.0.mlp.gate_up.perm" in t
    mods = json.load(open(tmp_path / "rep" / "config.json"))["quantization_config"]["modules"]
    assert [p["bits"] for p in mods["text.layers.1.mlp.gate_up"]] == [4, 8]
    assert [p["bits"] for p in mods["text.layers.0.mlp.gate_up"]] == [4]
    assert np.array_equal(logits(tmp_path / "rep"), logits(folder))
    test_gptq.check(ref, Glm4vForConditionalGeneration.from_pretrained(str(tmp_path / "rep")), PROMPT)


def test_dequantize(split):
    ref, folder, d = split
    assert main(["--src", folder, "--dst", str(d / "f32"), "--dtype", "float32", "--verify"]) == 0
    assert "quantization_config" not in json.load(open(d / "f32" / "config.json"))
    assert set(dtypes(d / "f32").values()) == {"F32"}
    assert np.array_equal(logits(d / "f32"), logits(folder))
    assert main(["--src", folder, "--dst", str(d / "bf16"), "--dtype", "bfloat16"]) == 0
    assert set(dtypes(d / "bf16").values()) == {"BF16"}
    r, o = tinyref.reference_logits(ref, PROMPT), logits(d / "bf16")
    assert np.abs(o - r).max() / np.abs(r).max() < 0.05   # bf16 weights, fp32 compute


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantize_round_trip(tmp_path, kind):
    ref = tinyref.build(str(tmp_path / "float"), seed=6)
    assert main(["--src", str(tmp_path / "float"), "--dst", str(tmp_path / "q"), "--quantize", kind,
                 "--group-size", "64", "--keep-float", r".*layers\.0\.mlp\.down_proj",
                 "--keep-float", r".*layers\.1\.mlp\.up_proj"]) == 0
    qc = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == int(kind[3:]) and qc["checkpoint_format"] == "gptq"
    t = dtypes(tmp_path / "q")
    L = "model.language_model.layers."
    assert t[L + "0.mlp.down_proj.weight"] == "F32" and L + "0.mlp.down_proj.qweight" not in t
    # GPTQModel's layout: the MLP split into gate_proj / up_proj, --keep-float naming a half
    assert not any("gate_up_proj" in k for k in t) and t[L + "0.mlp.gate_proj.qweight"] == "I32"
    assert t[L + "1.mlp.up_proj.weight"] == "F32" and t[L + "1.mlp.gate_proj.qweight"] == "I32"
    assert t[L + "1.mlp.down_proj.qweight"] == "I32" and t[L + "1.mlp.down_proj.scales"] == "F16"
    assert "model.visual.blocks.0.attn.qkv.weight" in t and "lm_head.weight" in t     # vision, head: float
    # transformers' float model holding the dequantized weights
    deq = gptq_fixtures.dequantized_state(str(tmp_path / "q"))
    float_sd = ref.state_dict()
    with torch.no_grad():
        for k, v in deq.items():
            float_sd[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    moved = np.abs(deq[L + "1.self_attn.o_proj.weight"] - tinyref.build(str(tmp_path / "again"), seed=6)
                   .state_dict()[L + "1.self_attn.o_proj.weight"].numpy()).max()
    assert moved > 0                                                              # it really quantized
    test_gptq.check(ref, Glm4vForConditionalGeneration.from_pretrained(str(tmp_path / "q")), PROMPT)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "glm4v_ms.convert", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_quantize_bad_input(split, tmp_path):
    ref, folder, d = split
    p = run_cli("--src", str(d / "gptq-float"), "--dst", str(tmp_path / "a"), "--quantize", "int4", "--group-size", "48")
    assert p.returncode == 1 and "--group-size 48 does not divide" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "a")
    p = run_cli("--src", folder, "--dst", str(tmp_path / "b"), "--quantize", "int8")
    assert p.returncode == 1 and "already quantized" in p.stderr and not os.path.exists(tmp_path / "b")
    p = run_cli("--src", str(d / "gptq-float"), "--dst", str(tmp_path / "c"), "--quantize", "int4", "--keep-float", "(")
    assert p.returncode == 1 and "--keep-float" in p.stderr and not os.path.exists(tmp_path / "c")


def test_config_and_layout_must_agree(split, tmp_path):
    """A repacked folder whose config.json was put back to the GPTQ one (or the reverse): one line, no guessing."""
    ref, folder, d = split
    assert main(["--src", folder, "--dst", str(tmp_path / "rep")]) == 0
    gptq_cfg = json.load(open(os.path.join(folder, "config.json")))
    json.dump(gptq_cfg, open(tmp_path / "rep" / "config.json", "w"))
    from glm4v_ms.quant import QuantError
    with pytest.raises(QuantError, match="this port's layout"):
        Glm4vForConditionalGeneration.from_pretrained(str(tmp_path / "rep"))

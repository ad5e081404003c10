"""Bad GPTQ checkpoints: one clear line naming the field or tensor, through from_pretrained and generate.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

import gptq_fixtures
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.demo import build as build_demo
from glm4v_ms.quant import QuantError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QC = dict(bits=4, group_size=32, desc_act=False, sym=True, checkpoint_format="gptq")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """demo-tiny (it has the tokenizer and processor files generate.py needs), quantized as GPTQModel does."""
    d = tmp_path_factory.mktemp("gptq_errors")
    build_demo(str(d / "float"), "demo-tiny")
    gptq_fixtures.quantize_folder(str(d / "float"), str(d / "gptq"), QC, layout="gptqmodel")
    return d / "gptq"


def variant(good, tmp_path, config=None, tensors=None):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    if config:
        cfg = json.load(open(d / "config.json"))
        config(cfg["quantization_config"])
        json.dump(cfg, open(d / "config.json", "w"))
    if tensors:
        t = load_file(str(d / "model.safetensors"))
        tensors(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def error_of(d):
    with pytest.raises(QuantError) as e:
        Glm4vForConditionalGeneration.from_pretrained(str(d))
    assert "\n" not in str(e.value)
    return str(e.value)


L0 = "model.language_model.layers.0."
CASES = {
    "awq": (lambda q: q.update(quant_method="awq"), None, ["'awq'", "not supported"]),
    "bitsandbytes": (lambda q: q.update(quant_method="bitsandbytes"), None, ["'bitsandbytes'", "not supported"]),
    "fp8": (lambda q: q.update(quant_method="fp8"), None, ["'fp8'", "not supported"]),
    "bits_3": (lambda q: q.update(bits=3), None, ["bits = 3", "4 or 8"]),
    "dynamic_bits_2": (lambda q: q.update(dynamic={r".*o_proj": {"bits": 2}}), None, ["dynamic", "bits = 2"]),
    "group_not_dividing": (lambda q: q.update(group_size=48), None, ["group_size 48", "128"]),
    "format_marlin": (lambda q: q.update(checkpoint_format="marlin"), None, ["checkpoint_format", "marlin"]),
    "rule_keeps_a_quantized_module_float": (lambda q: q.update(dynamic={r"-:.*layers\.0\.mlp\.down_proj": {}}),
                                            None, [L0 + "mlp.down_proj", "keeps it float"]),
    "missing_qzeros": (None, lambda t: t.pop(L0 + "self_attn.o_proj.qzeros"), [L0 + "self_attn.o_proj.qzeros", "missing"]),
    "missing_scales": (None, lambda t: t.pop(L0 + "mlp.down_proj.scales"), [L0 + "mlp.down_proj.scales", "missing"]),
    "wrong_bits_for_the_tensors": (lambda q: q.update(dynamic={r".*layers\.0\.mlp\.down_proj": {"bits": 8}}), None,
                                   [L0 + "mlp.down_proj.qweight", "shape"]),
    "split_mlp_half_missing": (None, lambda t: [t.pop(k) for k in list(t) if k.startswith(L0 + "mlp.up_proj.")],
                               [L0 + "mlp.up_proj.qweight", "missing", "both halves"]),
    "split_mlp_half_kept_float_by_rule": (lambda q: q.update(dynamic={r"-:.*layers\.0\.mlp\.gate_proj": {}}), None,
                                          [L0 + "mlp.gate_proj", "keeps it float"]),
    "quantized_vision": (None, lambda t: t.update({"model.visual.blocks.0.attn.proj.qweight": t[L0 + "self_attn.o_proj.qweight"]}),
                         ["model.visual.blocks.0.attn.proj.qweight", "text linears only"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_gptq_checkpoint(good, tmp_path, case):
    config, tensors, words = CASES[case]
    msg = error_of(variant(good, tmp_path, config, tensors))
    for w in words:
        assert w in msg, msg


def test_fused_layer_partly_float(tmp_path):
    """A dynamic rule keeping k_proj float while q/v are quantized: q/k/v form one fused layer."""
    d = tmp_path / "gptq"
    gptq_fixtures.build(str(d), dict(QC, dynamic={r"-:.*layers\.1\.self_attn\.k_proj": {}}))
    msg = error_of(d)
    assert "layers.1.self_attn.k_proj is float" in msg and "fused" in msg and "dynamic" in msg, msg


def test_cli_exit_code(good, tmp_path):
    d = variant(good, tmp_path, lambda q: q.update(quant_method="awq"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_name", str(d), "--prompt", "hi",
                        "--max_new_tokens", "2"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, GLM4V_MS_DEVICE="cpu"))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and "'awq'" in lines[-1] and "not supported" in lines[-1], p.stderr


def test_cli_runs_a_good_gptq_folder(good):
    """generate.py started as the README writes it, on a folder in GPTQModel's layout (split MLP), with an image."""
    p = subprocess.run([sys.executable, "generate.py", "--model_name", str(good), "--image", "examples/scene.png",
                        "--prompt", "Describe this image.", "--max_new_tokens", "3", "--greedy"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=dict(os.environ, GLM4V_MS_DEVICE="cpu"))
    assert p.returncode == 0 and p.stdout.strip(), p.stderr[-2000:]


def test_parity_harness_runs_on_a_gptq_folder(tmp_path):
    """`parity run --model GPTQ_DIR` on a folder in GPTQModel's layout: the reference side dequantizes into transformers' float model (its own code,
    torch only), ours loads the folder; fp32 tolerance."""
    import test_parity_harness as h
    d = tmp_path / "gptq"
    h.build_checkpoint(str(tmp_path / "float"), seed=2)
    gptq_fixtures.quantize_folder(str(tmp_path / "float"), str(d), dict(QC, bits=8, desc_act=True,
                                                                        dynamic={r".*mlp\.(gate|down)_proj": {"bits": 4}}),
                                  layout="gptqmodel")   # the layout GPTQModel writes: split MLP, halves differing
    rc, out, err = h.run_cli("run", "--model", d, "--report", tmp_path / "r.json")
    assert rc == 0, out[-3000:] + err
    rep = json.load(open(tmp_path / "r.json"))
    assert rep["pass"] and len(rep["cases"]) == 4

"""The quantized linear's Ascend path on CPU: the EMULATED WeightQuantBatchMatmul (glm4v_ms/ascend_emulation.py)
checks each call against the kernel's documented contract; the model runs through it with its GPTQ weights kept
quantized (int8, int4 as qint4x2), against transformers' float model holding the dequantized weights.
What only hardware can confirm: the kernel itself (its nibble order for qint4x2 as documented, its rounding in
bf16/fp16, its speed)."""
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from glm4v_ms import ascend_emulation as emu
from glm4v_ms import quant, quant_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(0)


def operands(bits, k=128, n=64, gs=32):
    G = k // gs if gs else 1
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = rng.integers(lo, hi + 1, (k, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (G, n)).astype(np.float32)
    offset = rng.integers(-3, 4, (G, n)).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    weight = Tensor(quant.pack_int4(w), ms.qint4x2) if bits == 4 else Tensor(w, ms.int8)
    return x, w, weight, scale, offset


@pytest.mark.parametrize("bits,gs", [(4, 32), (8, 64), (4, 0), (8, 0)])
def test_emulation_computes_the_documented_formula(bits, gs):
    x, w, weight, scale, offset = operands(bits, gs=gs)
    y = emu.weight_quant_batch_matmul(Tensor(x), weight, Tensor(scale), Tensor(offset), antiquant_group_size=gs)
    g = np.arange(128) // (gs or 128)
    want = x @ ((w + offset[g]) * scale[g])
    np.testing.assert_allclose(y.asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_int4_packing_matches_the_qint4x2_layout():
    """Column 2j in the low nibble, 2j+1 in the high one, two's complement (the layout the kernel documents)."""
    w = np.array([[1, -2, 7, -8]], np.int8)
    b = quant.pack_int4(w)
    assert b.view(np.uint8).tolist() == [[0xE1, 0x87]]
    assert np.array_equal(quant.unpack_int4(b), w)


def _call(bits=4, gs=32, **over):
    x, w, weight, scale, offset = operands(bits, gs=gs or 32)
    args = dict(x=Tensor(x), weight=weight, antiquant_scale=Tensor(scale), antiquant_offset=Tensor(offset),
                antiquant_group_size=gs)
    args.update(over)
    return lambda: emu.weight_quant_batch_matmul(**args)


@pytest.mark.parametrize("call", [
    _call(gs=48),                                                            # group not a multiple of 32
    _call(gs=128),                                                           # group == k: must be < k
    _call(antiquant_scale=Tensor(np.ones((4, 64), np.float16))),             # scale dtype != x dtype
    _call(antiquant_scale=Tensor(np.ones((64, 4), np.float32))),             # scale transposed
    _call(antiquant_offset=Tensor(np.ones((2, 64), np.float32))),            # offset shape != scale shape
    _call(transpose_weight=True),                                            # layout outside the emulation
    _call(weight=Tensor(np.ones((128, 64), np.int32))),                     # weight dtype
    _call(weight=Tensor(np.ones((64, 64), np.int8))),                       # (n, k): not the (k, n) layout
    _call(bias=Tensor(np.ones((32,), np.float32))),                         # bias width: n is 64 (unpacked)
    _call(quant_scale=Tensor(np.ones((64,), np.float32))),                  # output quantization: not W4A16
])
def test_contract_violations_are_caught(call):
    with pytest.raises(ValueError, match="Ascend kernel contract"):
        call()


def test_model_keeps_weights_quantized_through_the_emulated_kernel():
    """Every fixture variant in emulated mode (its own process: the mode is fixed per process): which linears are
    quantized and how, logits against the dequantized float reference, greedy tokens, the memory plan."""
    script = r"""
import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import conftest; conftest.pytest_sessionstart(None)
import numpy as np, tempfile, torch, mindspore as ms
import tinyref, test_gptq
from glm4v_ms import Glm4vForConditionalGeneration, attention
import json
from glm4v_ms.quant import GPTQConfig, estimate_bytes
from glm4v_ms.quant_layers import QuantLinear, SplitLinear, weight_bytes
assert attention.mode() == "emulated", attention.mode()
inp = tinyref.Prompt(11).text(4).image(6, 8).text(9).inputs()
for name, qc in test_gptq.VARIANTS.items():
    ref, folder = test_gptq.build(name, tempfile.mkdtemp() + "/gptq")
    m = Glm4vForConditionalGeneration.from_pretrained(folder)
    cells = {n: c for n, c in m.cells_and_names() if isinstance(c, (QuantLinear, SplitLinear))}
    kinds = {n: (type(c).__name__, str(c.qweight.dtype) if isinstance(c, QuantLinear) else None) for n, c in cells.items()}
    if name == "mix_v1_sym_act_order":   # q/k/v share one act-order: one fused matmul with a gather
        assert "text.layers.0.attn.o" not in cells                                   # kept float by "-:"
        assert kinds["text.layers.1.mlp.down"] == ("QuantLinear", "Int8"), kinds
        assert kinds["text.layers.0.mlp.down"] == ("QuantLinear", "Int4"), kinds
        assert kinds["text.layers.0.attn.qkv"] == ("QuantLinear", "Int4") and cells["text.layers.0.attn.qkv"].perm is not None
        assert cells["text.layers.0.mlp.down"].perm is not None
    if name == "v2_asym_plain":          # plain order, one format for q/k/v: one fused matmul, per channel
        assert kinds["text.layers.0.attn.qkv"] == ("QuantLinear", "Int4") and cells["text.layers.0.attn.qkv"].group == 0
        assert kinds["text.layers.0.mlp.gate_up"] == ("QuantLinear", "Int8") and cells["text.layers.0.mlp.gate_up"].perm is None
    if name == "v1_asym_split_qkv":      # each module its own act-order; layer 1's k_proj in 8 bits
        assert kinds["text.layers.0.attn.qkv"][0] == kinds["text.layers.1.attn.qkv"][0] == "SplitLinear"
        assert str(cells["text.layers.1.attn.qkv.parts.1"].qweight.dtype) == "Int8"
    if name == "gm_gate_up_differ":      # GPTQModel's split MLP: layer 1's 4-bit gate and 8-bit up, two matmuls
        assert kinds["text.layers.1.mlp.gate_up"][0] == "SplitLinear", kinds
        assert [str(cells[f"text.layers.1.mlp.gate_up.parts.{j}"].qweight.dtype) for j in (0, 1)] == ["Int4", "Int8"]
        assert kinds["text.layers.0.mlp.gate_up"] == ("QuantLinear", "Int4"), kinds     # agreeing halves: fused
        assert cells["text.layers.0.mlp.gate_up"].perm is not None and "text.layers.0.attn.o" not in cells
    if name == "gm_agree_v2_asym":       # halves agree in layer 1; layer 0's up_proj float: that layer dequantized
        assert kinds["text.layers.1.mlp.gate_up"] == ("QuantLinear", "Int4") and cells["text.layers.1.mlp.gate_up"].group == 32
        assert "text.layers.0.mlp.gate_up" not in cells and kinds["text.layers.0.mlp.down"] == ("QuantLinear", "Int8")
    assert len(cells) >= 7, kinds
    total, q = weight_bytes(m)
    assert 0 < q < total and "quantized linears" in m.memory_plan(64)
    if name != "v1_asym_split_qkv":      # the estimate from the config alone (the 9B figure) is these bytes
        qc = GPTQConfig.from_dict(json.load(open(folder + "/config.json"))["quantization_config"])
        assert estimate_bytes(m.config, qc, item=4) == (total, q), (estimate_bytes(m.config, qc, item=4), total, q)
    err = test_gptq.check(ref, m, inp)
    if name == "mix_v1_sym_act_order":   # greedy decode through the compiled incremental graph
        got = m.generate(**inp, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with torch.no_grad():
            want = ref.generate(**{k: torch.from_numpy(v) for k, v in inp.items()}, max_new_tokens=8,
                                min_new_tokens=8, do_sample=False).numpy()
        assert (got == want).all(), name
    if name in ("v1_asym_split_qkv", "gm_gate_up_differ"):   # the repacked folder: the same cells, stored integers
        from glm4v_ms.convert.__main__ import main
        assert main(["--src", folder, "--dst", folder + "-rep"]) == 0
        rep = Glm4vForConditionalGeneration.from_pretrained(folder + "-rep")
        assert {n for n, c in rep.cells_and_names() if isinstance(c, (QuantLinear, SplitLinear))} == set(cells)
        assert np.array_equal(rep(**inp).logits.asnumpy(), m(**inp).logits.asnumpy())
    print(name, "rel", err)
print("EMULATED-OK")
"""
    env = dict(os.environ, GLM4V_MS_KERNELS="emulated", GLM4V_MS_DEVICE="cpu")
    p = subprocess.run([sys.executable, "-c", script, ROOT], env=env, capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
    assert p.returncode == 0 and "EMULATED-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
    print(p.stdout)


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16, ms.bfloat16])
def test_quant_linear_parameters_follow_the_contract(dtype):
    """Scale and offset in the compute dtype (x's), int4 packed as qint4x2 (k, n/2), one group -> per channel."""
    w = rng.integers(-8, 8, (64, 32)).astype(np.int8)
    p = quant.Packed(4, w, np.full((2, 32), 0.5, np.float16), np.ones((2, 32), np.float16), None)
    c = quant_layers.QuantLinear(p, dtype, True)
    assert (c.scales.dtype, c.offsets.dtype, c.bias.dtype) == (dtype, dtype, dtype)
    assert c.qweight.dtype == ms.qint4x2 and c.qweight.shape == (64, 16) and c.group == 32
    one = quant_layers.QuantLinear(quant.Packed(8, w, np.ones((1, 32), np.float16), np.zeros((1, 32), np.float16), None),
                            dtype, False)
    assert one.qweight.dtype == ms.int8 and one.group == 0 and one.scales.shape == (1, 32)


def test_modules_the_kernel_cannot_take_are_named(tmp_path, monkeypatch):
    """Group size 16 (the kernel needs multiples of 32): those linears stay float, and install() says so once."""
    import warnings
    import gptq_fixtures
    from glm4v_ms import Glm4vForConditionalGeneration, attention
    d = str(tmp_path / "g16")
    gptq_fixtures.build(d, dict(bits=4, group_size=16, desc_act=False, sym=True,
                                            checkpoint_format="gptq"), seed=4)
    monkeypatch.setattr(attention, "_MODE", "emulated")   # install() only builds cells: no op runs here
    from glm4v_ms.config import Glm4vConfig
    m = Glm4vForConditionalGeneration(Glm4vConfig.from_pretrained(d))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        skip = quant_layers.install(m, d)
    assert not skip
    msgs = [str(x.message) for x in w if "GPTQ" in str(x.message)]
    assert len(msgs) == 1 and "dequantized" in msgs[0] and "multiple of 32" in msgs[0], msgs

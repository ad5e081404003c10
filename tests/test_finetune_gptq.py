"""LoRA on a quantized (GPTQ) base against transformers + PEFT on the float model holding the same dequantized
weights (fp32, CPU; rel <= 1e-4).

The base: a tiny GPTQ checkpoint in GPTQModel's layout (MLP split into gate_proj / up_proj), act-order, a 4/8-bit
`dynamic` mix chosen so that every kind of quantized linear carries LoRA: layer 0's q/k/v as one int4 matmul with a
gather, layer 1's q/k/v as three (k_proj int8), layer 0's gate/up fused int4, layer 1's split int4/int8, an int8 and
an int4 down_proj, layer 0's o_proj kept float. The reference: transformers' float Glm4vForConditionalGeneration
holding the fixture's own dequantization (tests/gptq_fixtures.py: the float source fake-quantized with numpy, not
glm4v_ms.quant), saved and loaded back, with PEFT on top.

Paths: plain kernels (CPU's default: every weight dequantized at load, the float model), and the emulated Ascend
path (GLM4V_MS_KERNELS=emulated: the weights stay quantized in QuantLinear / SplitLinear and run through the emulated
WeightQuantBatchMatmul, the backward through quant_layers' bprop), eager and compiled. Then `python -m
glm4v_ms.finetune` on a GPTQ folder as a user runs it, its adapter in PEFT on the dequantized float model."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import gptq_fixtures
import tinylora
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
L0, L1 = r".*\.layers\.0\.", r".*\.layers\.1\."
MIX = dict(bits=4, group_size=32, desc_act=True, sym=True, checkpoint_format="gptq",
           dynamic={"+:" + L1 + r"self_attn\.k_proj": {"bits": 8},
                    "+:" + L1 + r"mlp\.up_proj": {"bits": 8},
                    "+:" + L0 + r"mlp\.down_proj": {"bits": 8},
                    "-:" + L0 + r"self_attn\.o_proj": {}})
# all int8 (act-order, per group): what the emulation can run under recompute per layer (its int4 read is a host
# callback, which MindSpore 2.10 cannot recompute: "The prim is not a PrimitivePy")
INT8 = dict(bits=8, group_size=32, desc_act=True, sym=True, checkpoint_format="gptq", dynamic={})
LR = 0.5


def build(folder, qc=MIX):
    """(the GPTQ folder, the dequantized float folder transformers loads)."""
    ref, gptq = gptq_fixtures.build(os.path.join(folder, "gptq"), qc, seed=3, layout="gptqmodel")
    deq = os.path.join(folder, "dequantized")
    ref.save_pretrained(deq)
    return gptq, deq


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("lora_gptq")))


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def step_against_peft(gptq, deq, jit, recompute=False):
    """From the same PEFT adapter (nonzero B) on both: the loss, every LoRA gradient and one SGD step of a padded
    batch of two image samples. Returns the worst relative errors and what was compared."""
    from glm4v_ms import AutoModelForImageTextToText
    from glm4v_ms.finetune import adapter, forward, lora, optim
    pm = tinylora.peft_model("v", deq)
    ad = os.path.join(os.path.dirname(gptq), f"adapter-{jit}")
    pm.save_pretrained(ad)
    ours = AutoModelForImageTextToText.from_pretrained(gptq)
    adapter.load(ours, ad)
    if recompute:   # as the trainer sets it up outside plain mode (gradient checkpointing)
        for layer in ours.text.layers:
            layer.recompute()
    x, y = tinylora.padded_batch()
    ref_loss, ref_grads = tinylora.peft_loss_and_grads(pm, x, y)
    st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
    params = lora.trainable(ours)
    total, grads = forward.Grad(ours, params, jit=jit)(st)
    grads = [g / st.tokens for g in grads]
    worst, n, zero = 0.0, 0, []
    for lo in ours.loras:
        for mod in lo.targets:
            ga, gb = lo.peft(mod, grads[2 * n].asnumpy(), grads[2 * n + 1].asnumpy())
            for name, got in (("lora_A", ga), ("lora_B", gb)):
                want = ref_grads[f"base_model.model.{mod}.{name}.weight"]
                if not np.abs(want).max() > 0:
                    zero.append(f"{mod}.{name}")
                worst = max(worst, rel(got, want))
            n += 1
    opt = optim.Optimizer(params, "sgd")
    opt.step(grads, LR)
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR).step()
    mine = adapter.peft_tensors(ours)
    sgd = max(rel(mine[k.replace(".default", "")], p.detach().numpy())
              for k, p in pm.named_parameters() if "lora_" in k)
    from glm4v_ms.quant_layers import QuantLinear, SplitLinear
    kinds = {lo.site.ours: type(lo.site.linear).__name__ for lo in ours.loras}
    return {"loss": float(total.asnumpy()) / st.tokens, "ref": ref_loss, "worst": worst, "sgd": sgd, "n": n,
            "n_ref": len(ref_grads) // 2, "zero": zero, "kinds": kinds,
            "quantized": sum(isinstance(c, (QuantLinear, SplitLinear)) for _, c in ours.cells_and_names())}


def check(out, path):
    assert out["n"] == out["n_ref"] == 12 and not out["zero"], out   # q, k, v, o, gate_up, down x 2 layers
    assert out["worst"] <= TOL and out["sgd"] <= TOL, (path, out)
    assert abs(out["loss"] - out["ref"]) <= TOL * abs(out["ref"]), (path, out)


def test_plain_path_dequantized_at_load(base):
    """CPU's default: the GPTQ weights dequantized into float linears, which differentiate as they are; the loss,
    every gradient (through GPTQModel's split gate/up, read as the fused layer, and the q/k/v fusion) and one SGD
    step equal PEFT's on the float model."""
    out = step_against_peft(*base, jit=False)
    check(out, "plain")
    assert out["quantized"] == 0 and set(out["kinds"].values()) == {"Linear"}, out


_EMULATED = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from glm4v_ms.model import select_device
select_device("cpu")
from glm4v_ms import attention
assert attention.mode() == "emulated", attention.mode()
import test_finetune_gptq as t
gptq, deq = t.build(sys.argv[2])
out = {name: t.step_against_peft(gptq, deq, name == "compiled") for name in ("eager", "compiled")}
out["recompute_int8"] = t.step_against_peft(*t.build(sys.argv[2] + "/int8", t.INT8), True, recompute=True)
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.finetune import lora, plan
from glm4v_ms.quant_layers import weight_bytes
m = AutoModelForImageTextToText.from_pretrained(gptq)
base, quant = weight_bytes(m)
lora.inject(m, lora.select(m, "all"), 8, 16)
n = sum(int(p.size) for p in lora.trainable(m))
p = plan.parts(m.config, 4, weight_bytes(m)[0], 1, 64, n, "adamw_torch")
from glm4v_ms.weights import hf_shapes
import numpy as np
out["plan"] = {"frozen": p["frozen"], "base": base, "quant": quant,
               "float": 4 * sum(int(np.prod(s)) for s in hf_shapes(m.config).values())}
from glm4v_ms.quant import GPTQConfig
from glm4v_ms.finetune.args import FinetuneArgs
from glm4v_ms.quant_layers import backward_peak, backward_peak_estimate
qc = GPTQConfig.from_dict(json.load(open(gptq + "/config.json"))["quantization_config"])
out["plan"].update(dequant=backward_peak(m), estimate=backward_peak_estimate(m.config, qc, 4),
                   line=plan.training_plan(m, FinetuneArgs(per_device_train_batch_size=1, cutoff_len=64), n))
# inference with that adapter on the quantized cells (the compiled decode graph): logits and greedy tokens
import os, torch, tinyref, tinylora
from peft import PeftModel
ad = os.path.join(os.path.dirname(gptq), "adapter-True")
pm = PeftModel.from_pretrained(tinylora.reference("v", deq), ad).eval()
g = AutoModelForImageTextToText.from_pretrained(gptq)
g.load_adapter(ad)
x = tinyref.Prompt(4).text(4).image(8, 8).text(6).inputs()
with torch.no_grad():
    want = pm(**tinylora.torch_inputs(x)).logits.float().numpy()
    wt = pm.generate(**tinylora.torch_inputs(x), max_new_tokens=6, min_new_tokens=6, do_sample=False).numpy()
got = g(**x).logits.asnumpy()
gt = g.generate(**x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
out["infer"] = {"rel": t.rel(got, want), "argmax": bool((got.argmax(-1) == want.argmax(-1)).all()),
                "greedy": bool(np.array_equal(gt, wt))}
print("RESULT " + json.dumps(out))
"""


def test_emulated_kernel_path(tmp_path):
    """GLM4V_MS_KERNELS=emulated (the Ascend code path on CPU): the GPTQ weights stay quantized (int4 qint4x2 and
    int8, per group, act-order gathers), LoRA sits on QuantLinear / SplitLinear, and the gradient reaches the
    earlier layers through their backward; eagerly and compiled (the trainer's way), the loss, every gradient and
    one SGD step equal PEFT's; compiled with recompute per layer on an all-int8 base too. The training plan counts
    the quantized weights at their bytes, and the backward's dequantized copy as the config-only estimate (the
    README's 9B figure) does. The adapter then generates on the quantized base as PEFT does on the float one."""
    env = dict(os.environ, GLM4V_MS_KERNELS="emulated", GLM4V_MS_DEVICE="cpu", GLOG_v="3")
    r = subprocess.run([sys.executable, "-c", _EMULATED, ROOT, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print({k: {m: v[m] for m in ("loss", "ref", "worst", "sgd")} for k, v in out.items() if k not in ("plan", "infer")},
          out["infer"])
    check(out["recompute_int8"], "recompute_int8")
    assert set(out["recompute_int8"]["kinds"].values()) == {"QuantLinear"}, out["recompute_int8"]["kinds"]
    for path in ("eager", "compiled"):
        check(out[path], path)
        kinds = out[path]["kinds"]
        # every kind of quantized site carries LoRA; layer 0's o_proj was kept float by its "-:" rule
        assert kinds["text.layers.0.attn.qkv"] == "QuantLinear" and kinds["text.layers.1.attn.qkv"] == "SplitLinear"
        assert kinds["text.layers.0.mlp.gate_up"] == "QuantLinear"
        assert kinds["text.layers.1.mlp.gate_up"] == "SplitLinear"
        assert kinds["text.layers.0.mlp.down"] == kinds["text.layers.1.attn.o"] == "QuantLinear"
        assert kinds["text.layers.0.attn.o"] == "Linear", kinds
    inf = out["infer"]   # the trained adapter served on the quantized base: PEFT's logits and greedy tokens
    assert inf["rel"] <= TOL and inf["argmax"] and inf["greedy"], inf
    p = out["plan"]
    assert p["frozen"] == p["base"] and 0 < p["quant"] < p["base"] < p["float"], p
    # the backward's transient: the largest dequant(W) (+ identity for int4), layer 0's fused int4 gate/up
    assert p["dequant"] == p["estimate"] == 4 * (128 * 384 + 128 * 128) and "quantized backward" in p["line"], p


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (4, 0), (8, 0)])
def test_quantized_matmul_backward(bits, group):
    """quant_layers' bprop, eager and compiled: dx = dy @ dequant(W)^T, dequant the documented (w + offset) *
    scale per group; through the act-order gather too (QuantLinear's input permutation)."""
    from glm4v_ms import quant
    from glm4v_ms.quant_layers import QuantLinear
    rng = np.random.default_rng(bits + group)
    k, n = 128, 48
    G = k // group if group else 1
    w = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (k, n)).astype(np.int8)
    p = quant.Packed(bits, w, rng.uniform(0.01, 0.1, (G, n)).astype(np.float16),
                     rng.integers(-3, 4, (G, n)).astype(np.float16), rng.permutation(k).astype(np.int32))
    cell = QuantLinear(p, ms.float32, False)
    W = p.dequantize()                                  # (n, k), rows in input order
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    dy = rng.standard_normal((2, 3, n)).astype(np.float32)

    def f(x):
        return (cell(x) * Tensor(dy)).sum()
    for run in (ms.grad(f), ms.jit(ms.grad(f))):
        dx = run(Tensor(x)).asnumpy()
        assert rel(dx, dy @ W) <= 1e-6
    assert rel(cell(Tensor(x)).asnumpy(), x @ W.T) <= 1e-6


def demo_prompt():
    """An image prompt in demo-tiny's token ids (tinyref's prompt builder, its structure ids mapped)."""
    import tinyref
    from glm4v_ms.processing import tiny
    x = tinyref.Prompt(4).text(4).image(8, 8).text(6).inputs()
    ids = x["input_ids"]
    for k, v in (("image_token_id", tiny.IMAGE_TOKEN_ID), ("image_start_token_id", tiny.IMAGE_START_TOKEN_ID),
                 ("image_end_token_id", tiny.IMAGE_END_TOKEN_ID)):
        ids[ids == tinyref.IDS[k]] = v
    return x


def test_finetune_command_on_a_gptq_base(tmp_path):
    """The README's recipe with `model_name_or_path` a GPTQ folder (demo-tiny quantized by the fixture in GPTQModel's
    layout, tokenizer and processor files copied), on the emulated Ascend path: it trains a few steps and writes a
    PEFT adapter for the float model's module names; PeftModel.from_pretrained on transformers' float model holding
    the fixture's dequantized weights gives our logits (ours: the GPTQ folder + that adapter)."""
    from glm4v_ms import AutoModelForImageTextToText, demo
    from transformers import Glm4vForConditionalGeneration
    from peft import PeftModel
    float_dir, gptq = str(tmp_path / "demo-tiny"), str(tmp_path / "demo-tiny-gptq")
    demo.build(float_dir, "demo-tiny")
    deq = gptq_fixtures.quantize_folder(float_dir, gptq, MIX, layout="gptqmodel")
    out = str(tmp_path / "out")
    env = dict(os.environ, GLM4V_MS_KERNELS="emulated", GLM4V_MS_DEVICE="cpu", GLOG_v="3",
               GLM4V_MS_COMPILE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "glm4v_ms.finetune", "examples/finetune/demo_tiny_lora.yaml",
                        "--model_name_or_path", gptq, "--output_dir", out, "--max_steps", "2", "--save_steps", "100",
                        "--plot_loss", "false", "--learning_rate", "0.05", "--disable_gradient_checkpointing", "true"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "[memory: frozen weights" in r.stderr, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert any(m.endswith("mlp.gate_up_proj") for m in cfg["target_modules"]), cfg["target_modules"]
    assert not any(m.endswith(("gate_proj", "up_proj")) and "gate_up" not in m for m in cfg["target_modules"])

    ref = Glm4vForConditionalGeneration.from_pretrained(float_dir).eval()
    with torch.no_grad():
        sd = ref.state_dict()
        for name, d in deq.items():
            sd[name].copy_(torch.from_numpy(d))
    pm = PeftModel.from_pretrained(ref, out).eval()
    assert max(float(p.abs().max()) for n, p in pm.named_parameters() if "lora_B" in n) > 0   # it trained
    ours = AutoModelForImageTextToText.from_pretrained(gptq)
    ours.load_adapter(out)
    x = demo_prompt()
    with torch.no_grad():
        want = pm(**tinylora.torch_inputs(x)).logits.float().numpy()
    got = ours(**x).logits.asnumpy()
    assert rel(got, want) <= TOL and (got.argmax(-1) == want.argmax(-1)).all()


def test_readme_plan_row_for_the_9b_int4_int8_mix():
    """The README's 9B row on the GPTQ base is what config_plan gives (bf16, rank 8, batch 1, recompute) for an Int4
    (group 128, act-order) base with its attention or its MLP down_proj in Int8."""
    from glm4v_ms.config import Glm4vConfig
    from glm4v_ms.finetune import plan
    from glm4v_ms.quant import GPTQConfig
    cfg = Glm4vConfig()   # the 9B model's shapes
    base = dict(quant_method="gptq", bits=4, group_size=128, desc_act=True, sym=True)
    figs = []
    for dyn in ({r".*\.self_attn\..*": {"bits": 8}}, {r".*\.mlp\.down_proj": {"bits": 8}}):
        qc = GPTQConfig.from_dict(dict(base, dynamic=dyn))
        p = [plan.config_plan(cfg, 2, 1, L, 8, qcfg=qc) for L in (2048, 8192)]
        figs.append([p[0]["frozen"], plan.total(p[0], True), plan.total(p[1], True)])
    lo, hi = np.min(figs, 0) / 1e9, np.max(figs, 0) / 1e9
    cell = lambda i: f"{lo[i]:.1f}-{hi[i]:.1f} GB"  # noqa: E731
    row = f"| GLM-4.1V-9B, GPTQ Int4/Int8 mix (below) | 23.8 M | {cell(0)} | 5.2 GB / 20.6 GB | {cell(1)} | {cell(2)} |"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert row in f.read(), row
    bf16 = plan.config_plan(cfg, 2, 1, 2048, 8)
    assert plan.total(bf16, True) / 1e9 > hi[1] + 10   # the quantized base saves ~11 GB of the 27.6

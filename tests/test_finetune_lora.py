"""LoRA against transformers + PEFT (fp32, CPU; rel <= 1e-4) on tiny transformers-made GLM-4.1V and GLM-4.5V
checkpoints: the loss and every LoRA gradient of one step from a PEFT adapter with nonzero B (batch 1 and a
right-padded batch), one SGD step equal to torch.optim.SGD's, our saved adapter in PEFT, PEFT's adapters (a
target_modules list, full names, a regex; rslora) in ours, the merged checkpoints, and the choice of targets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tinylora
import tinyref
import torch
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.finetune import adapter, forward, lora, optim
try:   # MindSpore's set of compiled graphs (phases): mindspore.graph.api from 2.9, mindspore.common.api before
    from mindspore.graph.api import ms_compile_cache
except ImportError:
    from mindspore.common.api import ms_compile_cache
from peft import PeftModel
from test_finetune_full import LAYOUTS, layout_batch

TOL = 1e-4


@pytest.fixture(scope="module", params=["v", "moe"])
def base(request, tmp_path_factory):
    kind = request.param
    d = str(tmp_path_factory.mktemp(f"lora_{kind}"))
    tinylora.build(kind, d)
    return kind, d, AutoModelForImageTextToText.from_pretrained(d)


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_logits(ref_logits, ours, x):
    o = ours(**x).logits.asnumpy()
    real = x["attention_mask"].astype(bool)
    assert rel(o[real], ref_logits[real]) <= TOL
    assert (o.argmax(-1)[real] == ref_logits.argmax(-1)[real]).all()


def torch_logits(m, x):
    with torch.no_grad():
        return m(**tinylora.torch_inputs(x)).logits.float().numpy()


@pytest.mark.parametrize("case", ["one", "padded"])
def test_loss_grads_and_sgd_step(base, tmp_path, case):
    """From the same PEFT adapter (nonzero B): the loss, model(labels=).loss, every LoRA gradient (A and B of each
    source module, through our fused q/k/v and gate/up, the rotary row order undone), and one SGD step."""
    kind, d, ours = base
    pm = tinylora.peft_model(kind, d)
    pm.save_pretrained(str(tmp_path))
    adapter.load(ours, str(tmp_path))
    x, y = tinylora.one_sample() if case == "one" else tinylora.padded_batch()
    ref_loss, ref_grads = tinylora.peft_loss_and_grads(pm, x, y)

    out = ours(**x, labels=y)
    assert abs(float(out.loss.asnumpy()) - ref_loss) <= TOL * abs(ref_loss)

    st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
    params = lora.trainable(ours)
    total, grads = forward.Grad(ours, params, jit=False)(st)
    assert abs(float(total.asnumpy()) / st.tokens - ref_loss) <= TOL * abs(ref_loss)
    grads = [g / st.tokens for g in grads]
    n = 0
    for lo in ours.loras:
        for j, mod in enumerate(lo.targets):
            ga, gb = lo.peft(mod, grads[2 * n].asnumpy(), grads[2 * n + 1].asnumpy())
            for name, got in (("lora_A", ga), ("lora_B", gb)):
                want = ref_grads[f"base_model.model.{mod}.{name}.weight"]
                assert np.abs(want).max() > 0, f"{mod}.{name}: no gradient in the reference"
                assert rel(got, want) <= TOL, f"{mod}.{name}: relative error {rel(got, want):.2e}"
            n += 1
    assert 2 * n == len(ref_grads) == len(params)

    # one SGD step: every weight changes by -lr * grad, as torch.optim.SGD moves PEFT's
    lr = 0.5
    opt = optim.Optimizer(params, "sgd")
    opt.step(grads, lr)
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr).step()
    tensors = adapter.peft_tensors(ours)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            assert rel(tensors[key], p.detach().numpy()) <= TOL, key


def test_saved_adapter_loads_in_peft(base, tmp_path):
    """LoRA injected by lora_target all, B set nonzero, saved: PeftModel.from_pretrained on transformers' model gives
    our logits (an image prompt and a left-padded batch, through the inference path's cache)."""
    kind, d, ours = base
    lora.remove(ours)
    mods = lora.select(ours, "all")
    loras = lora.inject(ours, mods, r=4, alpha=16, seed=3)
    rng = np.random.default_rng(5)
    from mindspore import Tensor
    for lo in loras:
        for b in lo.B:
            b.set_data(Tensor(0.1 * rng.standard_normal(b.shape).astype(np.float32)))
    adapter.save(ours, str(tmp_path), adapter.config_dict(4, 16, 0.0, False, mods, d))
    with open(tmp_path / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["target_modules"] == sorted(mods) and all(m.startswith("model.language_model.layers.") for m in mods)
    pm = PeftModel.from_pretrained(tinylora.reference(kind, d), str(tmp_path)).eval()
    for x in (tinyref.Prompt(1).text(3).image(6, 10).text(7).inputs(),
              tinyref.batch(tinyref.Prompt(1).text(3).image(6, 10).text(7).inputs(),
                            tinyref.Prompt(2).text(2).image(4, 4).text(2).inputs())):
        check_logits(torch_logits(pm, x), ours, x)


@pytest.mark.parametrize("form", ["list", "full_names", "regex_rslora"])
def test_peft_adapter_loads_in_ours(base, tmp_path, form):
    """A PEFT-saved adapter, whatever form its target_modules takes (rslora: alpha / sqrt(r)), through
    model.load_adapter gives PEFT's logits."""
    kind, d, ours = base
    tm = {"list": ["q_proj", "v_proj", "o_proj"],
          "full_names": [f"model.language_model.layers.{i}.self_attn.k_proj" for i in range(2)]
          + ["model.language_model.layers.0.mlp.down_proj"],
          "regex_rslora": tinylora.text_regex(kind)}[form]
    pm = tinylora.peft_model(kind, d, target_modules=tm, r=8, alpha=4, rslora=form == "regex_rslora", seed=7,
                             b_scale=0.2).eval()
    pm.save_pretrained(str(tmp_path))
    ours.load_adapter(str(tmp_path))
    x = tinyref.Prompt(4).text(4).image(8, 8).text(6).inputs()
    check_logits(torch_logits(pm, x), ours, x)


def test_merge(base, tmp_path):
    """convert --adapter: the merged Hugging Face checkpoint in transformers and the merged port layout in ours
    both equal base + adapter (PEFT's logits)."""
    kind, d, ours = base
    pm = tinylora.peft_model(kind, d, seed=11).eval()
    ad = str(tmp_path / "adapter")
    pm.save_pretrained(ad)
    x = tinyref.Prompt(5).text(5).image(6, 6).text(5).inputs()
    want = torch_logits(pm, x)
    env = dict(os.environ, GLOG_v="3")
    for layout in ("hf", "ours"):
        out = str(tmp_path / layout)
        r = subprocess.run([sys.executable, "-m", "glm4v_ms.convert", "--src", d, "--adapter", ad, "--dst", out,
                            "--layout", layout], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        if layout == "hf":
            check = tinylora.reference(kind, out)
            real = x["attention_mask"].astype(bool)
            assert rel(torch_logits(check, x)[real], want[real]) <= TOL
        else:
            check_logits(want, AutoModelForImageTextToText.from_pretrained(out), x)


def test_lora_targets(base):
    """`all` = every text linear as LLaMA-Factory lists them (no vision, no head, no router); names match as
    substrings of the full names; GLM-4.5V's routed experts are refused by name; a name that matches nothing too."""
    kind, d, ours = base
    mods = lora.select(ours, "all")
    short = {m.rsplit(".", 1)[1] for m in mods}
    assert short == set(tinylora.TEXT[kind]) | ({"gate_proj", "up_proj", "down_proj"} if kind == "moe" else set())
    assert all(m.startswith("model.language_model.layers.") for m in mods)
    if kind == "moe":
        assert any(".shared_experts." in m for m in mods) and any(".0.mlp.gate_proj" in m for m in mods)
        with pytest.raises(lora.LoraError, match="routed experts"):
            lora.select(ours, "q_proj,experts")
    assert lora.select(ours, "q_proj, v_proj") == [m for m in mods if m.endswith(("q_proj", "v_proj"))]
    with pytest.raises(lora.LoraError, match="lora_target nope"):
        lora.select(ours, ["nope"])


_EMULATED = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from glm4v_ms.model import select_device
select_device("cpu")
from glm4v_ms import attention
assert attention.mode() == "emulated"
import numpy as np
import tinylora
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.finetune import adapter, forward, lora
d = sys.argv[1]
pm = tinylora.peft_model("v", d)
pm.save_pretrained(d + "/adapter")
ours = AutoModelForImageTextToText.from_pretrained(d)
adapter.load(ours, d + "/adapter")
x, y = tinylora.padded_batch()
ref_loss, ref_grads = tinylora.peft_loss_and_grads(pm, x, y)
st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
total, grads = forward.Grad(ours, lora.trainable(ours), jit=True)(st)
worst, n = 0.0, 0
for lo in ours.loras:
    for mod in lo.targets:
        ga, gb = lo.peft(mod, grads[2 * n].asnumpy() / st.tokens, grads[2 * n + 1].asnumpy() / st.tokens)
        for name, got in (("lora_A", ga), ("lora_B", gb)):
            want = ref_grads[f"base_model.model.{mod}.{name}.weight"]
            worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        n += 1
print(json.dumps({"loss": float(total.asnumpy()) / st.tokens, "ref": ref_loss, "worst": worst, "n": n}))
"""


def test_emulated_ascend_path_gradients(tmp_path):
    """GLM4V_MS_KERNELS=emulated: the Ascend code path on CPU (the training attention through the emulated
    FlashAttentionScore, BNSD with the causal + padding mask; fused rms_norm and rotary), compiled: the loss and
    every LoRA gradient of a padded batch equal transformers + PEFT's."""
    d = str(tmp_path)
    tinylora.build("v", d)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", GLM4V_MS_KERNELS="emulated", PYTHONPATH=root, GLOG_v="3")
    r = subprocess.run([sys.executable, "-c", _EMULATED, d, os.path.join(root, "tests")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 12 and out["worst"] <= TOL, out
    assert abs(out["loss"] - out["ref"]) <= TOL * abs(out["ref"]), out


MERGER = {"v": ["proj", "gate_proj", "up_proj", "down_proj"], "moe": ["proj", "gate_proj", "up_proj", "down_proj"]}


def test_merger_lora_grads_sgd_and_keys(base, tmp_path):
    """freeze_multi_modal_projector false: LoRA on visual.merger's linears (proj, and gate/up fused in ours) next to
    the text linears, from a PEFT adapter with nonzero B on transformers' model. Two batches of other image layouts
    (grids, image counts: 10 and 12 media tokens) in one bucket run on ONE compiled graph (the merger's input rows
    padded to patch_bucket; before, a graph per media token count), and each step, the padding rows present,
    equals PEFT: the loss (model(labels=) too) and every LoRA gradient, the merger's included. Then one SGD step;
    our saved adapter has PEFT's keys and tensors; `all` with the projector trained is LLaMA-Factory's own choice
    of modules. Without LoRA on the merger, the graph's inputs have the same shapes for both layouts too."""
    kind, d, ours = base
    merger = [f"model.visual.merger.{m}" for m in MERGER[kind]]
    tm = tinylora.text_regex(kind)[:-2] + "|" + "|".join(m.replace(".", r"\.") for m in merger) + ")$"
    pm = tinylora.peft_model(kind, d, target_modules=tm, seed=13)
    pm.save_pretrained(str(tmp_path / "peft"))
    lora.remove(ours)
    adapter.load(ours, str(tmp_path / "peft"), projector=True)
    assert forward.trains_merger(ours)
    params = lora.trainable(ours)
    grad = forward.Grad(ours, params, jit=True)
    compiled = len(ms_compile_cache)
    for layout in LAYOUTS.values():
        x, y = layout_batch(layout)
        ref_loss, ref_grads = tinylora.peft_loss_and_grads(pm, x, y)
        assert abs(float(ours(**x, labels=y).loss.asnumpy()) - ref_loss) <= TOL * abs(ref_loss)
        st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
        media = int((st.src.asnumpy() >= 0).sum())
        assert st.feats.shape[0] == forward.patch_bucket(4 * media) // 4 == 16 > media   # padding rows
        total, grads = grad(st)
        assert abs(float(total.asnumpy()) / st.tokens - ref_loss) <= TOL * abs(ref_loss), layout
        grads = [g / st.tokens for g in grads]
        n, seen = 0, set()
        for lo in ours.loras:
            for mod in lo.targets:
                ga, gb = lo.peft(mod, grads[2 * n].asnumpy(), grads[2 * n + 1].asnumpy())
                for name, got in (("lora_A", ga), ("lora_B", gb)):
                    want = ref_grads[f"base_model.model.{mod}.{name}.weight"]
                    assert np.abs(want).max() > 0, f"{mod}.{name}: no gradient in the reference"
                    assert rel(got, want) <= TOL, f"{layout} {mod}.{name}: relative error {rel(got, want):.2e}"
                seen.add(mod)
                n += 1
        assert set(merger) <= seen and 2 * n == len(ref_grads) == len(params)
    assert len(grad._mergers) == 1 and len(ms_compile_cache) - compiled == 1, list(grad._mergers)

    opt = optim.Optimizer(params, "sgd")
    opt.step(grads, 0.5)
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5).step()
    pm.save_pretrained(str(tmp_path / "peft_stepped"))
    mods = [m for lo in ours.loras for m in lo.targets]
    adapter.save(ours, str(tmp_path / "ours"), adapter.config_dict(4, 8, 0.0, False, mods, d))
    theirs, mine = (adapter.SafetensorsFile(str(tmp_path / f / adapter.WEIGHTS)) for f in ("peft_stepped", "ours"))
    assert sorted(mine.keys()) == sorted(theirs.keys())
    assert "base_model.model.model.visual.merger.gate_proj.lora_B.weight" in mine.keys()
    for k in theirs.keys():
        assert rel(mine.read(k)[0], theirs.read(k)[0]) <= TOL, k

    # lora_target all / a list, the projector trained or not: LLaMA-Factory's own choice (model/adapter.py)
    ref_model = tinylora.reference(kind, d)
    for target, frozen in ((["all"], False), (["all"], True), (["q_proj", "gate_proj", "merger.proj"], False)):
        lf = tinylora.llamafactory_lora_targets(ref_model, target, freeze_multi_modal_projector=frozen)
        assert sorted(lora.select(ours, target, projector=not frozen)) == sorted(lf), (target, frozen)
        assert any(m.startswith("model.visual.merger.") for m in lf) == (not frozen)

    # LoRA without the merger: the host's features written into the embeddings, no media count among the shapes
    lora.remove(ours)
    shapes = set()
    for layout in LAYOUTS.values():
        x, y = layout_batch(layout)
        st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
        assert st.src is None
        shapes.add(tuple(tuple(a.shape) for a in (st.h, st.cos, st.sin, st.seen, st.rows, st.targets, st.weight)))
    assert len(shapes) == 1, shapes

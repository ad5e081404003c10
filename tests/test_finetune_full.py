"""Full and freeze fine-tuning against transformers + LLaMA-Factory (fp32, CPU): the trained set is what
LLaMA-Factory's own _setup_full_tuning / _setup_freeze_tuning leave trainable on the transformers model (our
names carried over to transformers' by hf_params), and one SGD step changes every trained weight by
-lr * transformers' gradient on the same batch (per transformers tensor, fusion and row orders undone) and every
other weight not at all."""
import json
import os
import re
import shutil
import types

import numpy as np
import pytest

import lf_reference  # noqa: F401  (LLaMA-Factory importable: stubs, version check off)
import tinylora
import tinyref
import torch
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.config import Glm4vConfig
from glm4v_ms.finetune import forward, full, optim, trainer
from glm4v_ms.finetune.args import FinetuneArgs, FinetuneError
from glm4v_ms.finetune.export import _sources, hf_params
from glm4v_ms.weights import hf_table
from llamafactory.hparams import FinetuningArguments
from llamafactory.model.adapter import _setup_freeze_tuning, _setup_full_tuning
from test_finetune_dp import GLM41V_9B

TOL = 1e-4   # measured worst gradient rel error 3.3e-5 (vision norm weights), tower trained

# LLaMA-Factory's keys as its yaml gives them (comma-separated strings); ours takes the same values
CASES = {
    "full, tower frozen (the default)": dict(finetuning_type="full"),
    "full, tower and merger trained": dict(finetuning_type="full", freeze_vision_tower=False,
                                           freeze_multi_modal_projector=False),
    "full, language model frozen": dict(finetuning_type="full", freeze_vision_tower=False,
                                        freeze_language_model=True),
    "freeze (the default: last 2 layers)": dict(finetuning_type="freeze"),
    "freeze, first layer's attention + mlp, embedding, norm": dict(
        finetuning_type="freeze", freeze_trainable_layers=-1, freeze_trainable_modules="self_attn,mlp",
        freeze_extra_modules="embed_tokens,norm"),
    "freeze, last layer, tower and merger": dict(finetuning_type="freeze", freeze_trainable_layers=1,
                                                 freeze_vision_tower=False, freeze_multi_modal_projector=False),
}


def ours_args(kw):
    lists = ("freeze_trainable_modules", "freeze_extra_modules")
    return FinetuneArgs(model_name_or_path="m", dataset=["x"], output_dir="o",
                        **{k: v.split(",") if k in lists else v for k, v in kw.items()})


def lf_model(base, kw):
    """The transformers model with LLaMA-Factory's full / freeze setup run on it (no fp32 cast: fp32 already)."""
    ref = tinylora.reference("v", base)
    setup = _setup_full_tuning if kw["finetuning_type"] == "full" else _setup_freeze_tuning
    setup(ref, FinetuningArguments(**kw), True, False)
    return ref


def to_hf(cfg, ours):
    """Our tensors -> transformers' (export's inverse of the weight table: fusion and row orders undone)."""
    table = {e.ours: e for e in hf_table(cfg)}
    return {s: a for n, v in ours.items() for s, a in zip(table[n].sources, _sources(cfg, table[n], np.asarray(v)))}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full_v"))
    tinylora.build("v", d)
    return d


@pytest.fixture(scope="module")
def model(base):
    return AutoModelForImageTextToText.from_pretrained(base)


@pytest.mark.parametrize("case", list(CASES))
def test_trained_set_is_llamafactory(base, model, case):
    kw = CASES[case]
    want = {n for n, p in lf_model(base, kw).named_parameters() if p.requires_grad}
    names = hf_params(model)
    got = {h for n in full.select(model.config, ours_args(kw)) for h in names[n]}
    assert got == want, sorted(got ^ want)


def test_refusals(base, tmp_path):
    """An unknown module is refused naming its key and the choices (LLaMA-Factory raises ValueError there too);
    a rule that trains half of one of our fused tensors is refused naming both halves (GLM-4.5V: the extra module
    gate_proj matches the dense and shared-expert MLPs' gate_proj as a substring, not their up_proj)."""
    cfg = Glm4vConfig.from_pretrained(base)
    with pytest.raises(FinetuneError, match=r"^freeze_trainable_modules: attention is not a module of this model's "
                                            r"layers \(choose from all, .*self_attn"):
        full.select(cfg, ours_args(dict(finetuning_type="freeze", freeze_trainable_modules="attention")))
    with pytest.raises(ValueError, match="Module attention is not found"):   # LLaMA-Factory's own refusal
        lf_model(base, dict(finetuning_type="freeze", freeze_trainable_modules="attention"))
    with pytest.raises(FinetuneError, match=r"train .*gate_proj.* but not .*up_proj.*in one tensor"):
        tinylora.build("moe", str(tmp_path))
        full.select(Glm4vConfig.from_pretrained(str(tmp_path)),
                    ours_args(dict(finetuning_type="freeze", freeze_extra_modules="gate_proj")))


SGD = {"tower trained": "full, tower and merger trained", "tower frozen": "full, tower frozen (the default)",
       "freeze": "freeze (the default: last 2 layers)"}


@pytest.mark.parametrize("case", list(SGD))
def test_sgd_step(base, case):
    kw = CASES[SGD[case]]
    ours = AutoModelForImageTextToText.from_pretrained(base)
    ours.trained_names = full.select(ours.config, ours_args(kw))
    params = full.trainable(ours)
    before = {n: p.asnumpy().copy() for n, p in ours.parameters_and_names()}
    x, y = tinylora.padded_batch()
    st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
    # the tower runs in the graph whenever one of its tensors trains (the frozen-tower default trains its position
    # table and norms, LLaMA-Factory's rule); freeze's text layers take the host's features
    assert (st.tower is not None) == (case != "freeze")
    loss, grads = forward.Grad(ours, params, jit=True)(st)
    lr = 10.0
    optim.Optimizer(params, "sgd").step([g / st.tokens for g in grads], lr)
    ref = lf_model(base, kw)
    out = ref(**tinylora.torch_inputs(x), labels=torch.from_numpy(y))
    out.loss.backward()
    assert abs(float(loss.asnumpy()) / st.tokens - out.loss.item()) <= TOL * out.loss.item()
    after = {n: p.asnumpy() for n, p in ours.parameters_and_names()}
    delta = to_hf(ours.config, {n: after[n].astype(np.float64) - before[n] for n in ours.trained_names})
    want = {n: -lr * p.grad.numpy() for n, p in ref.named_parameters() if p.requires_grad}
    assert set(delta) == set(want)
    for n, w in want.items():
        assert np.abs(w).max() > 0, n
        err = float(np.abs(delta[n] - w).max() / np.abs(w).max())
        assert err <= TOL, (n, err)
    for n in before:
        if n not in ours.trained_names:
            np.testing.assert_array_equal(after[n], before[n])


# two batches of different image layouts (grids, image counts) in one bucket: 40 and 48 patches -> 64 rows (16
# feature rows), the rest padding; text 64, trained rows 16
LAYOUTS = {"two images, one per sample": [[(4, 6)], [(4, 4)]],
           "three images, other grids": [[(2, 4), (4, 4)], [(6, 4)]]}


def layout_batch(layout, seed=0):
    pairs = []
    for i, grids in enumerate(layout):
        p = tinyref.Prompt(seed + i).text(3)
        for gh, gw in grids:
            p = p.image(gh, gw).text(2)
        x = p.text(4).inputs()
        pairs.append((x, tinylora.answer_labels(x, 4)))
    return tinylora.right_padded(*pairs)


@pytest.mark.parametrize("case", ["tower trained", "freeze"])
def test_one_graph_for_image_layouts_of_a_bucket(base, case):
    """The tower trained: batches of other image layouts that fall in one patch bucket run on one compiled graph
    (Grad keys its tower graphs by the inputs' shapes, one compiled graph per key; before, by the segment
    lengths), and each step, the bucket's padding rows present, still equals transformers: the loss and every
    trained tensor's gradient (the tower's included). freeze: the host's features, their rows padded likewise."""
    kw = CASES[SGD[case]]
    ours = AutoModelForImageTextToText.from_pretrained(base)
    ours.trained_names = full.select(ours.config, ours_args(kw))
    grad = forward.Grad(ours, full.trainable(ours), jit=True)
    ref = lf_model(base, kw)
    for name, layout in LAYOUTS.items():
        x, y = layout_batch(layout)
        patches = sum(gh * gw for grids in layout for gh, gw in grids)
        st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
        rows = st.tower[0].shape[0] if case != "freeze" else 4 * st.feats.shape[0]
        assert rows == forward.patch_bucket(patches) == 64 > patches, name   # padding rows
        loss, grads = grad(st)
        ref.zero_grad()
        out = ref(**tinylora.torch_inputs(x), labels=torch.from_numpy(y))
        out.loss.backward()
        assert abs(float(loss.asnumpy()) / st.tokens - out.loss.item()) <= TOL * out.loss.item(), name
        got = to_hf(ours.config, {n: g.asnumpy() / st.tokens for n, g in zip(ours.trained_names, grads)})
        want = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.requires_grad}
        assert set(got) == set(want) and any(n.startswith("model.visual.blocks.") for n in want) == (case != "freeze")
        for n, w in want.items():
            err = float(np.abs(got[n] - w).max() / np.abs(w).max())
            assert err <= TOL, (name, n, err)
    assert len(grad._towers) == (case != "freeze"), list(grad._towers)


def test_patch_bucket():
    """The text rule (multiples of 64) up to 1023 patches, then 8 sizes per doubling: the padding stays under
    1/8 of the count, a multiple of the merge block."""
    assert [forward.patch_bucket(n) for n in (4, 64, 68, 1020, 1024, 1028, 5000, 20000)] == \
        [64, 64, 128, 1024, 1024, 1152, 5120, 20480]
    for n in range(4, 70000, 36):
        b = forward.patch_bucket(n)
        assert n <= b < n + max(64, n / 8) and b % 4 == 0, n
    assert forward.patch_bucket(100, 9) % 9 == 0


# ---------------------------------------------------------------------------------------------- the trainer
def sample(seed):
    """A user turn with an image, then a 6-token answer (the trained part), as data.Sample lays it out."""
    p = tinyref.Prompt(seed).text(3).image(4, 4).text(4)
    ans = np.random.default_rng(100 + seed).integers(1, 400, 6)
    ids = np.array(p.ids + ans.tolist(), np.int64)
    labels = np.full_like(ids, -100)
    labels[-6:] = ans
    media = {"pixel_values": np.concatenate(p.images), "image_grid_thw": np.array(p.image_grids, np.int64)}
    return types.SimpleNamespace(input_ids=ids, labels=labels, media=media)


def run_args(base, out, **kw):
    d = dict(model_name_or_path=base, dataset=["x"], output_dir=out, finetuning_type="full",
             per_device_train_batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-3, max_steps=2,
             lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.1, max_grad_norm=1.0, seed=3,
             logging_steps=1, save_steps=1, cutoff_len=64, bf16=False)
    d.update(kw)
    return FinetuneArgs(**d)


def weights(folder):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_train_save_resume_load(base, tmp_path):
    """Two AdamW steps (warmup, weight decay, clipping, accumulation 2) write checkpoint-1 and checkpoint-2 and the
    output folder, a Hugging Face checkpoint; a run resumed from checkpoint-1 ends at exactly the same weights and
    log; transformers loads the output with logits equal to ours (loaded from it, and the trained model itself);
    a checkpoint of another finetuning_type, another model or another trained set is refused with one line before
    anything is written."""
    train = [sample(s) for s in range(4)]
    straight = str(tmp_path / "straight")
    tr = trainer.run(run_args(base, straight), train, [], None, model=AutoModelForImageTextToText.from_pretrained(base))
    assert [os.path.basename(p) for p in trainer.checkpoints(straight)] == ["checkpoint-1", "checkpoint-2"]
    assert {"config.json", "trainer_log.jsonl"} <= set(os.listdir(straight))
    for f in os.listdir(base):   # tokenizer / processor files of the base come along
        if not f.endswith((".safetensors", ".json")) or f == "config.json":
            assert os.path.isfile(os.path.join(straight, f)), f
    first = weights(os.path.join(straight, "checkpoint-1"))
    final = weights(straight)
    assert sorted(first) == sorted(final)
    trained = {h for n in tr.model.trained_names for h in hf_params(tr.model)[n]}
    base_w = weights(base)
    for k in final:   # the second step moved every trained tensor, and no other one off the base
        assert np.array_equal(final[k], base_w[k]) != (k in trained), k
        assert np.array_equal(first[k], final[k]) != (k in trained), k

    resumed = str(tmp_path / "resumed")
    trainer.run(run_args(base, resumed, resume_from_checkpoint=os.path.join(straight, "checkpoint-1")), train, [],
                None, model=AutoModelForImageTextToText.from_pretrained(base))
    again = weights(resumed)
    for k in final:
        np.testing.assert_array_equal(again[k], final[k], err_msg=k)
    loss = lambda d: [e["loss"] for e in map(json.loads, open(os.path.join(d, "trainer_log.jsonl")))]  # noqa: E731
    assert len(loss(straight)) == 2 and loss(resumed)[-1] == loss(straight)[-1]

    x, y = tinylora.padded_batch()
    from transformers import Glm4vForConditionalGeneration
    ref = Glm4vForConditionalGeneration.from_pretrained(straight).eval()
    with torch.no_grad():
        want = ref(**tinylora.torch_inputs(x)).logits.numpy()
    for m in (AutoModelForImageTextToText.from_pretrained(straight), tr.model):
        got = m(**{k: v for k, v in x.items() if k != "mm_token_type_ids"}).logits.asnumpy()
        assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())

    ck = os.path.join(straight, "checkpoint-1")
    other = str(tmp_path / "other_base")
    shutil.copytree(base, other)
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["rms_norm_eps"] = 1e-3
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    for kw, line in ((dict(finetuning_type="lora"), f"{ck} is a finetuning_type full checkpoint, this run is lora"),
                     (dict(model_name_or_path=other), f"{ck} was trained from another model than {other}"),
                     (dict(finetuning_type="freeze"), f"{ck} is a finetuning_type full checkpoint"),
                     (dict(freeze_vision_tower=False), f"{ck} trained other parameters than this run's keys")):
        out = str(tmp_path / "refused")
        with pytest.raises(FinetuneError, match="^resume_from_checkpoint: " + re.escape(line)):
            trainer.run(run_args(base, out, resume_from_checkpoint=ck, **kw), train, [], None)
        assert not os.path.exists(out)


def test_bf16_weights_train_through_float32_masters():
    """A bf16 trained weight (bf16 full fine-tuning) is updated through a float32 master: three AdamW / SGD steps
    (weight decay) leave the master at torch's float32 update on the same (bf16) gradients exactly, the weight at
    its rounding; the master is in the optimizer state and a new optimizer takes it back."""
    import mindspore as ms
    from mindspore import Parameter, Tensor
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    for kind in ("sgd", "adamw_torch"):
        p = Parameter(Tensor(x).astype(ms.bfloat16), name=f"{kind}.w")
        start = p.astype(ms.float32).asnumpy()
        t = torch.nn.Parameter(torch.from_numpy(start.copy()))
        opt = optim.Optimizer([p], kind, weight_decay=0.1)
        topt = (torch.optim.AdamW([t], lr=1e-3, weight_decay=0.1) if kind != "sgd"
                else torch.optim.SGD([t], lr=1e-3, weight_decay=0.1))
        for _ in range(3):
            g = Tensor(rng.standard_normal((4, 8)).astype(np.float32) * 1e-2).astype(ms.bfloat16)
            t.grad = torch.from_numpy(g.astype(ms.float32).asnumpy())
            topt.step()
            opt.step([g], 1e-3)
        st = opt.state()
        np.testing.assert_allclose(st["master.0"], t.detach().numpy(), rtol=1e-6, atol=1e-8)
        assert not np.array_equal(st["master.0"], start)
        np.testing.assert_array_equal(p.astype(ms.float32).asnumpy(),
                                      Tensor(st["master.0"]).astype(ms.bfloat16).astype(ms.float32).asnumpy())
        again = optim.Optimizer([p], kind, weight_decay=0.1)
        again.load_state(st)
        np.testing.assert_array_equal(again.state()["master.0"], st["master.0"])


LF_GB = {(True, 2): 280, (False, 2): 304, (True, 3): 192, (False, 3): 210}   # FINETUNE.md: 4 x A100, total


def readme_rows():
    """The README's full fine-tuning rows for GLM-4.1V-9B from plan.full_config_plan: bf16, 4 ranks, batch 1 per
    rank, cutoff_len 2048, recompute, AdamW, accumulation 1."""
    from glm4v_ms.finetune import plan
    cfg = Glm4vConfig.from_dict(GLM41V_9B)
    rows = []
    for frozen in (True, False):
        a = ours_args(dict(finetuning_type="full", freeze_vision_tower=frozen))
        for stage in (2, 3):
            p = plan.full_config_plan(cfg, 2, 1, 2048, a, ranks=4, stage=stage)
            _, n, _ = plan.trained_counts(cfg, a)
            g = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
            tot = plan.total(p, True)
            rows.append(f"| {'frozen' if frozen else 'trained'} | {stage} | {n / 1e9:.2f} B | "
                        f"{g(p['frozen'] + p['trainable'])} | {g(p['grads'])} | {g(p['optimizer'])} | "
                        f"{g(p['activations_recompute'])} | {g(tot)} | {tot * 4 / 1e9:.0f} GB | "
                        f"{LF_GB[(frozen, stage)]} GB |")
    return rows


def test_readme_full_plan_table():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                  encoding="utf-8").read()
    for row in readme_rows():
        assert row in readme, row


def test_readme_command(tmp_path):
    """The README's freeze command as a user runs it (a subprocess, demo-tiny): it trains, logs, checkpoints and
    writes a Hugging Face folder whose trained layer moved and the rest is the base's, which transformers loads with
    our logits."""
    import subprocess
    import sys

    from glm4v_ms import demo
    from test_readme_commands import readme_command
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = readme_command("python -m glm4v_ms.finetune examples/finetune/demo_tiny_full.yaml --finetuning_type")
    assert cmd[-4:] == ["--finetuning_type", "freeze", "--freeze_trainable_layers", "1"], cmd
    cache = tmp_path / "cache"
    demo.build(str(cache / "demo-tiny"), "demo-tiny")
    out = tmp_path / "out"
    env = dict(os.environ, GLM4V_MS_CACHE=str(cache), GLM4V_MS_DEVICE="cpu", PYTHONPATH=root)
    p = subprocess.run([sys.executable, *cmd[1:], "--output_dir", str(out)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"the model is in {out}" in p.stderr and "[memory: frozen weights" in p.stderr
    files = set(os.listdir(out))
    assert {"checkpoint-2", "checkpoint-4", "config.json", "tokenizer.json", "trainer_log.jsonl"} <= files
    base, final = weights(str(cache / "demo-tiny")), weights(str(out))
    n = json.load(open(out / "config.json"))["text_config"]["num_hidden_layers"]
    last = f".layers.{n - 1}."
    for k in base:   # freeze_trainable_layers 1: the last text layer trains, nothing else
        assert np.array_equal(base[k], final[k]) != ("language_model" in k and last in k), k
    from transformers import Glm4vForConditionalGeneration
    ids = np.array([[5, 6, 7, 8, 9, 10]], np.int64)
    ref = Glm4vForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = AutoModelForImageTextToText.from_pretrained(str(out))(input_ids=ids).logits.asnumpy()
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


_EMULATED = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from glm4v_ms.model import select_device
select_device("cpu")
from glm4v_ms import attention
assert attention.mode() == "emulated"
import numpy as np
import tinylora
import torch
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.finetune import forward, full, trainer
from glm4v_ms.finetune.args import FinetuneArgs
d = sys.argv[1]
a = FinetuneArgs(model_name_or_path=d, dataset=["x"], output_dir="o", finetuning_type="full",
                 freeze_vision_tower=False, freeze_multi_modal_projector=False, gradient_checkpointing=True)
ours = AutoModelForImageTextToText.from_pretrained(d)
trainer.setup(a, ours)
grad = forward.Grad(ours, full.trainable(ours), jit=True)
ref = tinylora.reference("v", d)
from glm4v_ms.finetune.export import _sources
from glm4v_ms.weights import hf_table
table = {e.ours: e for e in hf_table(ours.config)}
worst, n, losses, rows = 0.0, 0, [], []
from test_finetune_full import LAYOUTS, layout_batch
for layout in LAYOUTS.values():   # two image layouts of one patch bucket, padding rows in both
    x, y = layout_batch(layout)
    st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
    rows.append([int(st.tower[0].shape[0]), int(len(x["pixel_values"]))])
    total, grads = grad(st)
    ref.zero_grad()
    out = ref(**tinylora.torch_inputs(x), labels=torch.from_numpy(y))
    out.loss.backward()
    want = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    for name, g in zip(ours.trained_names, grads):
        for s, got in zip(table[name].sources, _sources(ours.config, table[name], g.asnumpy() / st.tokens)):
            worst = max(worst, float(np.abs(got - want[s]).max() / np.abs(want[s]).max())); n += 1
    losses.append([float(total.asnumpy()) / st.tokens, out.loss.item()])
print(json.dumps({"losses": losses, "worst": worst, "n": n, "rows": rows, "graphs": len(grad._towers),
                  "fused": attention.fused("vision_attention"), "recompute": bool(ours.recompute_layers)}))
"""


def test_emulated_ascend_path_with_recompute(tmp_path):
    """GLM4V_MS_KERNELS=emulated (the Ascend code path on CPU), recompute on (per decoder layer and per vision
    block, the tower trained and in the graph, its attention the emulated FlashAttentionScore with the segment
    mask): two image layouts of one patch bucket (padding rows in both) on one graph, the loss and every gradient
    equal to transformers'."""
    import subprocess
    import sys
    d = str(tmp_path)
    tinylora.build("v", d)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", GLM4V_MS_KERNELS="emulated", PYTHONPATH=root, GLOG_v="3")
    r = subprocess.run([sys.executable, "-c", _EMULATED, d, os.path.join(root, "tests")], env=env, cwd=d,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["recompute"] and out["fused"] and out["n"] == 2 * 56 and out["worst"] <= TOL, out
    assert out["graphs"] == 1 and out["rows"] == [[64, 40], [64, 48]], out
    for loss, ref in out["losses"]:
        assert abs(loss - ref) <= TOL * abs(ref), out

"""finetune/export.py: a model's current weights as a Hugging Face checkpoint (what full fine-tuning saves).

Tiny sharded checkpoints made by transformers; every parameter of ours moved by its own random perturbation
(so a weight left at its base value, or put in the wrong place, shows), then save_hf. Checked: transformers' own
model loaded from the output gives our logits; every tensor of the output, read back through the forward weight
table, is our parameter (exactly for fp32, rounded to nearest even for a bf16 base); our from_pretrained reads it;
the shard files, names, dtypes and auxiliary files are base's; the converter's command takes it. Then each
refusal: one line, nothing written.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mindspore import Tensor
from safetensors import safe_open

import tinymoe
import tinyref
from glm4v_ms import Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration
from glm4v_ms.config import Glm4vConfig
from glm4v_ms.convert import convert, to_bfloat16
from glm4v_ms.finetune import lora
from glm4v_ms.finetune.export import hf_params, save_hf
from glm4v_ms.safetensors_io import Checkpoint, WeightError
from glm4v_ms.weights import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUX = {"tokenizer.json": '{"added_tokens": [{"id": 7, "content": "<think>"}]}', "tokenizer_config.json": "{}",
       "chat_template.jinja": "{{ messages }}", "preprocessor_config.json": '{"patch_size": 14}',
       "video_preprocessor_config.json": "{}", "generation_config.json": '{"eos_token_id": [1, 2]}'}
INPUTS = tinyref.Prompt(21).text(4).image(6, 8).text(5).inputs()


def _aux(folder):
    for fn, text in AUX.items():
        with open(os.path.join(folder, fn), "w") as f:
            f.write(text)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """GLM-4.1V fp32 and bf16 and GLM-4.5V fp32, each in several shards with an index and the aux files."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    dense = tinyref.build(str(root / "single"), seed=31)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        dense.to(dt).save_pretrained(str(root / name), max_shard_size="200KB")
        out[name] = str(root / name)
    tinymoe.build(str(root / "moe1"), seed=32).save_pretrained(str(root / "moe"), max_shard_size="200KB")
    out["moe"] = str(root / "moe")
    for d in out.values():
        _aux(d)
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    return out


def perturbed(cls, folder, seed):
    """Our model from folder with every parameter moved (a distinct random step per element)."""
    model = cls.from_pretrained(folder)
    rng = np.random.default_rng(seed)
    for _, p in model.parameters_and_names():
        v = p.asnumpy()
        p.set_data(Tensor((v + rng.standard_normal(v.shape) * (0.05 * np.abs(v).mean() + 0.01)).astype(v.dtype)))
    return model


def check_tensors(model, base, dst, exact=True):
    """Output tensors = base's names, shards, dtypes and shapes; each one, through the forward table, our value."""
    a, b = Checkpoint(base), Checkpoint(dst)
    assert b.where == a.where and {k: b.info(k) for k in b.keys()} == {k: a.info(k) for k in a.keys()}
    params = dict(model.parameters_and_names())
    names = hf_params(model)
    assert set(names) == set(params)
    assert sorted(s for v in names.values() for s in v) == sorted(a.keys())
    cfg = Glm4vConfig.from_pretrained(dst)
    for n, raw, st in load(cfg, dst):
        v = params[n].asnumpy()
        if exact:
            assert st == "F32" and np.array_equal(raw, v), n
        else:
            assert st == "BF16" and np.array_equal(raw, to_bfloat16(v)), n
    for s in a.keys():   # every tensor moved away from base
        assert not np.array_equal(a.read(s)[0], b.read(s)[0]), s
    for fn in [*AUX, "config.json", "model.safetensors.index.json"]:
        assert open(os.path.join(dst, fn), "rb").read() == open(os.path.join(base, fn), "rb").read(), fn
    for fn in b.files:   # transformers' safetensors reads the files, with base's metadata
        with safe_open(os.path.join(dst, fn), "pt") as f, safe_open(os.path.join(base, fn), "pt") as g:
            assert f.metadata() == g.metadata()


def no_leftovers(dst):
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_round_trip_through_transformers(bases, tmp_path, kind):
    from transformers import Glm4vForConditionalGeneration as RefDense, Glm4vMoeForConditionalGeneration as RefMoe
    cls, ref_cls, base = ((Glm4vForConditionalGeneration, RefDense, bases["fp32"]) if kind == "dense"
                          else (Glm4vMoeForConditionalGeneration, RefMoe, bases["moe"]))
    model = perturbed(cls, base, seed=5)
    dst = str(tmp_path / "out")
    save_hf(model, base, dst)
    assert not no_leftovers(dst)
    check_tensors(model, base, dst)
    ref = ref_cls.from_pretrained(dst, dtype=torch.float32).eval()
    # GLM-4.5V's unmodified tiny model is already 3.6e-5 from transformers (fp32 sums in another order, top-k
    # routing): the MoE case keeps the parity suite's 1e-4; a misplaced weight is orders of magnitude above either
    tinyref.check_logits(ref, model, INPUTS, tol=1e-5 if kind == "dense" else 1e-4)
    ours = model(**INPUTS).logits.asnumpy()
    assert np.array_equal(cls.from_pretrained(dst)(**INPUTS).logits.asnumpy(), ours)
    if kind == "dense":   # the converter's command, as the README writes it, takes the output
        out = str(tmp_path / "converted")
        r = subprocess.run([sys.executable, "-m", "glm4v_ms.convert", "--src", dst, "--dst", out], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert np.array_equal(cls.from_pretrained(out)(**INPUTS).logits.asnumpy(), ours)


def test_bf16_base_stays_bf16(bases, tmp_path):
    model = perturbed(Glm4vForConditionalGeneration, bases["bf16"], seed=6)
    dst = str(tmp_path / "out")
    save_hf(model, bases["bf16"], dst)
    check_tensors(model, bases["bf16"], dst, exact=False)


def test_into_an_empty_folder(bases, tmp_path):
    model = Glm4vForConditionalGeneration.from_pretrained(bases["fp32"])
    dst = tmp_path / "empty"
    dst.mkdir()
    save_hf(model, bases["fp32"], str(dst))
    a, b = Checkpoint(bases["fp32"]), Checkpoint(str(dst))   # unchanged weights: the same bytes
    assert all(np.array_equal(a.read(k)[0], b.read(k)[0]) for k in a.keys())


def _copy(src, dst, drop=(), config=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config:
        p = os.path.join(dst, "config.json")
        d = json.load(open(p))
        config(d)
        json.dump(d, open(p, "w"))
    return dst


def _gptq(d):
    d["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}


@pytest.fixture(scope="module")
def dense_model(bases):
    return Glm4vForConditionalGeneration.from_pretrained(bases["fp32"])


REFUSALS = {
    "converted": ("glm4v_ms.convert output", lambda b, t, m: (convert(b, str(t / "conv")) and str(t / "conv"), m)),
    "gptq": ("GPTQ", lambda b, t, m: (_copy(b, str(t / "q"), config=_gptq), m)),
    "no_config": ("no config.json", lambda b, t, m: (_copy(b, str(t / "nc"), drop=("config.json",)), m)),
    "another_model": ("another model's checkpoint", lambda b, t, m: (_copy(
        b, str(t / "o"), config=lambda d: d["text_config"].update(rms_norm_eps=1e-6)), m)),
    "no_folder": ("no such folder", lambda b, t, m: (str(t / "missing"), m)),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_base(bases, dense_model, tmp_path, case):
    words, make = REFUSALS[case]
    base, model = make(bases["fp32"], tmp_path, dense_model)
    dst = str(tmp_path / "out")
    with pytest.raises(WeightError, match=words) as e:
        save_hf(model, base, dst)
    assert "\n" not in str(e.value) and not os.path.lexists(dst) and not no_leftovers(dst)


def test_refused_model_or_dst(bases, dense_model, tmp_path):
    base, dst = bases["fp32"], str(tmp_path / "out")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    with pytest.raises(WeightError, match="not an empty folder") as e:
        save_hf(dense_model, base, str(full))
    assert os.listdir(full) == ["x"] and not no_leftovers(str(full))
    moe = Glm4vMoeForConditionalGeneration.from_pretrained(bases["moe"])
    with pytest.raises(WeightError, match="another model's checkpoint"):
        save_hf(moe, base, dst)
    msgs = [str(e.value)]
    old = dense_model.layout
    dense_model.layout = dataclasses.replace(old, world=2)
    try:
        with pytest.raises(WeightError, match="rank 0 of 2") as e:
            save_hf(dense_model, base, dst)
        msgs.append(str(e.value))
    finally:
        dense_model.layout = old
    lora.inject(dense_model, lora.select(dense_model, "q_proj"), r=2, alpha=4)
    try:
        with pytest.raises(WeightError, match="LoRA") as e:
            save_hf(dense_model, base, dst)
        msgs.append(str(e.value))
    finally:
        lora.remove(dense_model)
    assert all("\n" not in m for m in msgs) and not os.path.lexists(dst) and not no_leftovers(dst)

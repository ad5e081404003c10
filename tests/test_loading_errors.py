"""Bad checkpoints: one clear error that names the file or the tensor."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.config import ConfigError
from glm4v_ms.safetensors_io import WeightError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    tinyref.build(str(d), seed=5)
    return d


def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def edit_config(d, fn):
    cfg = json.load(open(d / "config.json"))
    fn(cfg)
    json.dump(cfg, open(d / "config.json", "w"))


def edit_tensors(d, fn):
    p = d / "model.safetensors"
    t = load_file(str(p))
    fn(t)
    save_file(t, str(p), metadata={"format": "pt"})


def load_error(d, exc):
    with pytest.raises(exc) as e:
        Glm4vForConditionalGeneration.from_pretrained(str(d))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_config(tmp_path):
    assert "config.json" in load_error(tmp_path, ConfigError)


def test_config_not_json(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "config.json").write_text("{not json")
    assert "config.json" in load_error(d, ConfigError) and "JSON" in load_error(d, ConfigError)


def test_unknown_model_type(good, tmp_path):
    d = copy(good, tmp_path)
    edit_config(d, lambda c: c.update(model_type="qwen2_vl"))
    assert "qwen2_vl" in load_error(d, ConfigError)


@pytest.mark.parametrize("change,word", [
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "yarn"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "gelu"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]), "mrope_section"),
    (lambda c: c["vision_config"].update(attention_bias=True), "attention_bias"),
])
def test_unimplemented_config_values(good, tmp_path, change, word):
    d = copy(good, tmp_path)
    edit_config(d, change)
    assert word in load_error(d, ConfigError)


def test_no_weights(good, tmp_path):
    d = copy(good, tmp_path)
    os.remove(d / "model.safetensors")
    assert "safetensors" in load_error(d, WeightError)


def test_truncated_shard(good, tmp_path):
    d = copy(good, tmp_path)
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    msg = load_error(d, WeightError)
    assert "model.safetensors" in msg and "truncated" in msg


def test_missing_tensor(good, tmp_path):
    d = copy(good, tmp_path)
    edit_tensors(d, lambda t: t.pop("model.language_model.layers.1.post_mlp_layernorm.weight"))
    assert "model.language_model.layers.1.post_mlp_layernorm.weight" in load_error(d, WeightError)


def test_unexpected_tensor(good, tmp_path):
    d = copy(good, tmp_path)
    edit_tensors(d, lambda t: t.update({"model.visual.blocks.0.attn.qkv.bias": t["model.visual.patch_embed.proj.bias"].clone()}))
    assert "model.visual.blocks.0.attn.qkv.bias" in load_error(d, WeightError)


@pytest.mark.parametrize("name", ["model.language_model.layers.0.self_attn.k_proj.weight",
                                  "model.visual.blocks.1.mlp.up_proj.weight", "lm_head.weight"])
def test_wrong_shape(good, tmp_path, name):
    d = copy(good, tmp_path)
    edit_tensors(d, lambda t: t.update({name: t[name][:-1].clone()}))
    msg = load_error(d, WeightError)
    assert name in msg and "shape" in msg


def test_index_names_missing_shard(good, tmp_path):
    d = copy(good, tmp_path)
    keys = load_file(str(d / "model.safetensors")).keys()
    json.dump({"weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}},
              open(d / "model.safetensors.index.json", "w"))
    assert "model-00001-of-00002.safetensors" in load_error(d, WeightError)

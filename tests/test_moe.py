"""GLM-4.5V (glm4v_moe): logits and greedy parity with transformers' Glm4vMoeForConditionalGeneration on tiny
random checkpoints (fp32, CPU), the router's rules, the weight table and the loading errors.

Criterion (as for GLM-4.1V): over every real position, max |ours - ref| <= 1e-4 * max |ref| and identical argmax.
"""
import json
import os
import shutil

import numpy as np
import pytest

import tinymoe
import tinyref
import torch
from glm4v_ms import AutoModelForImageTextToText, Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration
from glm4v_ms.config import ConfigError, Glm4vConfig
from glm4v_ms.safetensors_io import WeightError

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("moe_real"))
    ref = tinymoe.build(d, seed=1)
    return ref, AutoModelForImageTextToText.from_pretrained(d), d


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("moe_grouped"))
    ref = tinymoe.build(d, seed=2, routing="grouped")
    return ref, Glm4vMoeForConditionalGeneration.from_pretrained(d), d


def check(ref, ours, inputs):
    return tinyref.check_logits(ref, ours, inputs, TOL)


CASES = {
    "text": lambda: tinyref.Prompt(0).text(17).inputs(),
    "one_image": lambda: tinyref.Prompt(1).text(4).image(10, 14).text(6).inputs(),
    "several_images": lambda: tinyref.Prompt(2).text(3).image(4, 4).text(1).image(6, 8).image(8, 6).text(5).inputs(),
    "video": lambda: tinyref.Prompt(4).text(4).video(3, 8, 10).text(6).inputs(),
    "padded_batch": lambda: tinyref.batch(tinyref.Prompt(6).text(3).image(6, 6).text(12).inputs(),
                                          tinyref.Prompt(7).text(2).image(4, 8).text(2).inputs()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity(pair, case):
    ref, ours, _ = pair
    assert isinstance(ours, Glm4vMoeForConditionalGeneration)
    check(ref, ours, CASES[case]())


@pytest.mark.parametrize("case", ["text", "one_image", "padded_batch"])
def test_parity_grouped_routing(grouped, case):
    """n_group 4 / topk_group 2, routed_scaling_factor 2.5."""
    ref, ours, _ = grouped
    check(ref, ours, CASES[case]())


@pytest.mark.parametrize("case", ["one_image", "padded_batch"])
def test_greedy_matches_transformers(pair, case):
    ref, ours, _ = pair
    inputs = CASES[case]()
    n = 16
    got = ours.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.no_grad():
        want = ref.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False).numpy()
    np.testing.assert_array_equal(got, want)


def test_router_matches_reference(grouped):
    """Our router's picks and weights equal the reference router's on the same tokens, for the grouped config;
    the scaling factor is applied once (weights sum to routed_scaling_factor with norm_topk_prob)."""
    from mindspore import Tensor
    from glm4v_ms.moe import route
    ref, ours, _ = grouped
    gate = ref.model.language_model.layers[1].mlp.gate
    x = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    with torch.no_grad():
        _, rw, ri = gate(torch.from_numpy(x))
    mlp = ours.text.layers[1].mlp
    w, i = route(Tensor(x), mlp.router_weight, mlp.router_bias, ours.config.text)
    w, i = w.asnumpy(), i.asnumpy()
    order_r, order_o = np.argsort(ri.numpy(), 1), np.argsort(i, 1)
    np.testing.assert_array_equal(np.take_along_axis(i, order_o, 1), np.take_along_axis(ri.numpy(), order_r, 1))
    np.testing.assert_allclose(np.take_along_axis(w, order_o, 1), np.take_along_axis(rw.numpy(), order_r, 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.sum(1), 2.5, rtol=1e-5)
    groups = i // 2                               # 8 experts in 4 groups of 2: at most topk_group=2 groups used
    assert max(len(set(r)) for r in groups.tolist()) <= 2


def test_config_and_classes(pair):
    _, ours, d = pair
    cfg = Glm4vConfig.from_pretrained(d)
    t = cfg.text
    assert cfg.model_type == "glm4v_moe" and t.head_dim == 32 and t.q_size == 128 and not t.sandwich_norms
    assert (t.n_routed_experts, t.num_experts_per_tok, t.first_k_dense_replace) == (8, 3, 1)
    assert cfg.image_token_id == tinyref.IDS["image_token_id"]
    assert ours.text.layers[1].mlp.router_bias.dtype == ours.text.layers[1].mlp.router_weight.dtype
    with pytest.raises(ConfigError, match="glm4v_moe checkpoint"):
        Glm4vForConditionalGeneration.from_pretrained(d)


def test_real_config_token_ids_and_head_dim(tmp_path):
    """GLM-4.5V's real config.json fields (GLM45V.md): image token 151363, head_dim 128 != 4096/96."""
    d = {"model_type": "glm4v_moe", "image_token_id": 151363, "video_token_id": 151364,
         "text_config": {"vocab_size": 151552, "hidden_size": 4096, "num_hidden_layers": 46, "num_attention_heads": 96,
                         "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 10944,
                         "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                             "partial_rotary_factor": 0.5}},
         "vision_config": {"intermediate_size": 10944}}
    cfg = Glm4vConfig.from_dict(d)
    assert (cfg.image_token_id, cfg.video_token_id) == (151363, 151364)
    assert cfg.text.q_size == 12288 and cfg.text.kv_size == 1024 and cfg.text.rotary_dim == 64
    with pytest.raises(ConfigError, match="n_group"):
        Glm4vConfig.from_dict({**d, "text_config": {**d["text_config"], "n_group": 3}})


def test_missing_experts_is_one_clear_error(pair, tmp_path):
    _, _, d = pair
    from safetensors.numpy import load_file, save_file
    dst = tmp_path / "broken"
    shutil.copytree(d, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for k in [k for k in tensors if ".mlp.experts.5." in k]:
        del tensors[k]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"tensor model\.language_model\.layers\.1\.mlp\.experts\.5\.\w+_proj\.weight "
                                          r"is missing .*\(and 5 more\)"):
        Glm4vMoeForConditionalGeneration.from_pretrained(str(dst))


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_unsupported_quantization_format_is_one_clear_error(pair, tmp_path, method):
    """GLM-4.5V's published FP8 checkpoint (and other formats) are refused by name, before any weight is read."""
    _, _, d = pair
    dst = tmp_path / method
    shutil.copytree(d, dst)
    with open(dst / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": method}
    with open(dst / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=rf"'{method}'.*not supported"):
        AutoModelForImageTextToText.from_pretrained(str(dst))

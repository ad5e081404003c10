"""Tiny random GLM-4.1V checkpoints made by transformers itself, and hand-built prompts.

Every weight is random, norms and biases included (a norm left at 1 or a bias at 0 would hide a wrong mapping).
Prompts are built here from segments (text / image / video) so that the reference receives exactly what its
processor would give it, `mm_token_type_ids` included, without depending on our own processor.
"""
from __future__ import annotations

import json
import os

import numpy as np

import reference  # noqa: F401  (torchvision schemas before transformers)
import torch
from transformers import Glm4vConfig, Glm4vForConditionalGeneration

# token ids of the tiny configs (vocab 512): the structure tokens sit at the top of the vocabulary
IDS = dict(image_token_id=500, video_token_id=501, image_start_token_id=502, image_end_token_id=503,
           video_start_token_id=504, video_end_token_id=505)
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_config(**text_over):
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5,
                                 "rope_theta": 10000.0})
    text.update(text_over)
    vision = dict(depth=2, hidden_size=64, num_heads=2, out_hidden_size=128, intermediate_size=160, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=336, rms_norm_eps=1e-5)
    return Glm4vConfig(text_config=text, vision_config=vision, **IDS)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))
    return model


def build(folder, seed=0, fmt="v5", **text_over):
    """Save a random reference model into folder; return it (fp32, eval). fmt="official" rewrites config.json
    in the official hub layout (rope_scaling + partial_rotary_factor + rope_theta)."""
    torch.manual_seed(seed)
    model = randomize(Glm4vForConditionalGeneration(tiny_config(**text_over)).eval(), seed)
    model.save_pretrained(folder)
    if fmt == "official":
        to_official_config(os.path.join(folder, "config.json"))
    return model


def to_official_config(path):
    with open(path) as f:
        d = json.load(f)
    tc = d["text_config"]
    rp = tc.pop("rope_parameters")
    tc["rope_scaling"] = {"rope_type": "default", "mrope_section": rp["mrope_section"]}
    tc["partial_rotary_factor"] = rp["partial_rotary_factor"]
    tc["rope_theta"] = rp["rope_theta"]
    d["vision_config"].pop("rope_parameters", None)
    for k in ("hidden_size", "num_hidden_layers", "vocab_size", "partial_rotary_factor", "rope_theta"):
        d[k] = tc[k]   # the official file repeats LLM fields at the top level
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


class Prompt:
    """Segments -> input_ids, mm_token_type_ids, pixel values and grids, as GLM's processor lays them out."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.ids, self.types = [], []
        self.images, self.image_grids, self.videos, self.video_grids = [], [], [], []

    def text(self, n):
        self.ids += self.rng.integers(1, 400, n).tolist()
        self.types += [0] * n
        return self

    def image(self, gh, gw):
        n = gh * gw // 4
        self.ids += [IDS["image_start_token_id"]] + [IDS["image_token_id"]] * n + [IDS["image_end_token_id"]]
        self.types += [0] + [1] * n + [0]
        self.images.append(self.rng.standard_normal((gh * gw, PATCH_DIM)).astype(np.float32))
        self.image_grids.append([1, gh, gw])
        return self

    def video(self, t, gh, gw):
        n = gh * gw // 4
        self.ids.append(IDS["video_start_token_id"])
        self.types.append(0)
        for k in range(t):
            stamp = [300 + k]   # a timestamp's text token between frames
            self.ids += [IDS["image_start_token_id"]] + [IDS["image_token_id"]] * n + [IDS["image_end_token_id"]] + stamp
            self.types += [0] + [2] * n + [0, 0]
        self.ids.append(IDS["video_end_token_id"])
        self.types.append(0)
        self.videos.append(self.rng.standard_normal((t * gh * gw, PATCH_DIM)).astype(np.float32))
        self.video_grids.append([t, gh, gw])
        return self

    def inputs(self):
        d = {"input_ids": np.array([self.ids], np.int64), "attention_mask": np.ones((1, len(self.ids)), np.int64),
             "mm_token_type_ids": np.array([self.types], np.int64)}
        if self.images:
            d["pixel_values"] = np.concatenate(self.images)
            d["image_grid_thw"] = np.array(self.image_grids, np.int64)
        if self.videos:
            d["pixel_values_videos"] = np.concatenate(self.videos)
            d["video_grid_thw"] = np.array(self.video_grids, np.int64)
        return d


def batch(*prompts):
    """Left-padded batch of several Prompt.inputs() dicts (pixels concatenated in order)."""
    L = max(p["input_ids"].shape[1] for p in prompts)
    out = {k: [] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for p in prompts:
        pad = L - p["input_ids"].shape[1]
        for k in out:
            out[k].append(np.pad(p[k][0], (pad, 0)))
    out = {k: np.stack(v) for k, v in out.items()}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [p[k] for p in prompts if k in p]
        if parts:
            out[k] = np.concatenate(parts)
    return out


def reference_logits(model, inputs):
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        return model(**t).logits.float().numpy()


def check_logits(ref, ours, inputs, tol=1e-4):
    """Our logits against the transformers model's over every real position: max |ours - ref| <= tol * max |ref|
    and the same argmax. Returns the relative error."""
    r = reference_logits(ref, inputs)
    o = ours(**inputs).logits.asnumpy()
    assert o.shape == r.shape
    real = inputs["attention_mask"].astype(bool)
    err = np.abs(o - r)[real].max() / np.abs(r[real]).max()
    assert err <= tol, f"relative error {err:.2e}"
    assert (o.argmax(-1)[real] == r.argmax(-1)[real]).all()
    return err


def check_batch_and_greedy(ref, ours, new_tokens):
    """An image prompt and a padded batch: logits (check_logits) and `new_tokens` greedy tokens against
    transformers' generate. Returns the logits' relative error."""
    import torch
    inp = batch(Prompt(1).text(3).image(6, 10).text(7).inputs(), Prompt(2).text(2).image(4, 4).text(2).inputs())
    err = check_logits(ref, ours, inp)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    got = ours.generate(**inp, **kw)
    with torch.no_grad():
        want = ref.generate(**{k: torch.from_numpy(v) for k, v in inp.items()}, **kw).numpy()
    assert (got == want).all()
    return err
